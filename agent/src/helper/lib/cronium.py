"""Cronium runtime helpers for Python (standard library only): `import cronium`.

Talks to the agent's per-job helper endpoint ($CRONIUM_HELPER_SOCKET, HTTP over a Unix socket)
with the job's token ($CRONIUM_JOB_TOKEN). Values are JSON. Failures raise CroniumError with
the agent's message.
"""

import http.client
import json
import os
import socket

__all__ = [
    "CroniumError",
    "input",
    "output",
    "set_condition",
    "event",
    "get_variable",
    "set_variable",
    "notify",
]


class CroniumError(Exception):
    """A helper call failed; the message says why."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=60):
        super().__init__("cronium", timeout=timeout)
        self._path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _call(method, path, body=None):
    unavailable = os.environ.get("CRONIUM_HELPER_UNAVAILABLE")
    if unavailable:
        raise CroniumError("runtime helpers are unavailable in this job: " + unavailable)
    socket_path = os.environ.get("CRONIUM_HELPER_SOCKET")
    token = os.environ.get("CRONIUM_JOB_TOKEN")
    if not socket_path or not token:
        raise CroniumError("not running inside a Cronium job (CRONIUM_HELPER_SOCKET or CRONIUM_JOB_TOKEN is not set)")
    headers = {"Authorization": "Bearer " + token}
    data = None
    if body is not None:
        data = json.dumps(body).encode("utf-8")
        headers["Content-Type"] = "application/json"
    connection = _UnixConnection(socket_path)
    try:
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        text = response.read().decode("utf-8", "replace")
        status = response.status
    except OSError as error:
        raise CroniumError("cannot reach the Cronium helper endpoint: %s" % error) from None
    finally:
        connection.close()
    try:
        answer = json.loads(text) if text else None
    except ValueError:
        answer = None
    if status < 200 or status >= 300:
        message = answer.get("error") if isinstance(answer, dict) else None
        raise CroniumError(message or "helper call failed with HTTP status %d" % status)
    return answer


def input():  # noqa: A001 - the contract names it `input`
    """The JSON given when the run was triggered (None when there was none)."""
    return _call("GET", "/v1/input")


def output(value):
    """Sets the job's result (any JSON value); the last call wins."""
    _call("POST", "/v1/output", {"value": value})


def set_condition(condition):
    """Sets the job's condition (True or False)."""
    if not isinstance(condition, bool):
        raise CroniumError("the condition must be True or False")
    _call("POST", "/v1/condition", {"value": condition})


def event():
    """The ids of this job: a dict with job_id, run_id, event_id and attempt."""
    return _call("GET", "/v1/event")


def get_variable(name):
    """The value of the variable `name` (None when it is not set).

    Variables belong to the event's owner and are shared by all of that owner's events."""
    answer = _call("POST", "/v1/variables/get", {"name": name})
    return answer.get("value") if isinstance(answer, dict) else None


def set_variable(name, value):
    """Sets the variable `name` to `value` (any JSON value).

    When the agent cannot reach the control plane the write is queued and sent later (in order);
    get_variable in this job already sees it."""
    _call("POST", "/v1/variables/set", {"name": name, "value": value})


def notify(message, tool=None, title=None):
    """Sends `message` through one of the event owner's tools (Slack, Discord, webhook, email).

    `tool` names the tool (default: the owner's only tool); `title` is optional."""
    body = {"message": message}
    if tool is not None:
        body["tool"] = tool
    if title is not None:
        body["title"] = title
    _call("POST", "/v1/notify", body)
