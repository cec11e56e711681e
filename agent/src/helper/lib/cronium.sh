# Cronium runtime helpers for Bash: source this file (`. ./cronium.sh`).
#
# Talks to the agent's per-job helper endpoint ($CRONIUM_HELPER_SOCKET, HTTP over a Unix socket)
# with the job's token ($CRONIUM_JOB_TOKEN), through curl, or python3 when there is no curl.
# Values are JSON. A failed call prints "cronium: <message>" to stderr and returns non-zero.

# The Python fallback: argv = method path; stdin = request body (may be empty).
# Prints the answer body, a newline and the HTTP status.
_CRONIUM_PY='
import http.client, os, socket, sys
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(os.environ["CRONIUM_HELPER_SOCKET"])
body = sys.stdin.buffer.read().strip()
headers = {"Authorization": "Bearer " + os.environ["CRONIUM_JOB_TOKEN"]}
if body:
    headers["Content-Type"] = "application/json"
c = C("cronium", timeout=60)
try:
    c.request(sys.argv[1], sys.argv[2], body=body or None, headers=headers)
    r = c.getresponse()
    sys.stdout.write(r.read().decode("utf-8", "replace") + "\n" + str(r.status))
except OSError as e:
    sys.stderr.write("cronium: cannot reach the Cronium helper endpoint: %s\n" % e)
    sys.exit(1)
'

# _cronium_call METHOD PATH [BODY]: prints the answer body on success.
_cronium_call() {
  local method=$1 path=$2 body=${3-} answer status message
  if [ -n "${CRONIUM_HELPER_UNAVAILABLE-}" ]; then
    echo "cronium: runtime helpers are unavailable in this job: $CRONIUM_HELPER_UNAVAILABLE" >&2
    return 1
  fi
  if [ -z "${CRONIUM_HELPER_SOCKET-}" ] || [ -z "${CRONIUM_JOB_TOKEN-}" ]; then
    echo "cronium: not running inside a Cronium job (CRONIUM_HELPER_SOCKET or CRONIUM_JOB_TOKEN is not set)" >&2
    return 1
  fi
  if command -v curl >/dev/null 2>&1; then
    # The token goes through stdin (curl config), not the command line other users can see.
    answer=$(printf 'header = "Authorization: Bearer %s"\n' "$CRONIUM_JOB_TOKEN" |
      curl -sS -K - --unix-socket "$CRONIUM_HELPER_SOCKET" -X "$method" \
        -H 'Content-Type: application/json' ${body:+--data-binary @/dev/fd/3} \
        -w '\n%{http_code}' "http://cronium$path" 3<<<"$body") || {
      echo "cronium: cannot reach the Cronium helper endpoint" >&2
      return 1
    }
  elif command -v python3 >/dev/null 2>&1; then
    answer=$(printf '%s' "$body" | python3 -c "$_CRONIUM_PY" "$method" "$path") || return 1
  else
    echo "cronium: the Bash helpers need curl or python3" >&2
    return 1
  fi
  status=${answer##*$'\n'}
  answer=${answer%$'\n'*}
  if [ "$status" -ge 200 ] 2>/dev/null && [ "$status" -lt 300 ]; then
    printf '%s' "$answer"
    return 0
  fi
  message=$(printf '%s' "$answer" | sed -n 's/.*"error"[[:space:]]*:[[:space:]]*"\(.*\)".*/\1/p')
  message=${message//\\\"/\"}
  echo "cronium: ${message:-helper call failed with HTTP status $status}" >&2
  return 1
}

# _cronium_json_string TEXT: TEXT as a JSON string.
_cronium_json_string() {
  local text=$1
  text=${text//\\/\\\\}
  text=${text//\"/\\\"}
  text=${text//$'\n'/\\n}
  text=${text//$'\r'/\\r}
  text=${text//$'\t'/\\t}
  printf '"%s"' "$text"
}

# cronium_input: prints the JSON given when the run was triggered (null when none).
cronium_input() {
  local answer
  answer=$(_cronium_call GET /v1/input) || return 1
  printf '%s\n' "$answer"
}

# cronium_output JSON: sets the job's result; the last call wins.
cronium_output() {
  if [ $# -ne 1 ]; then
    echo "cronium: usage: cronium_output JSON" >&2
    return 2
  fi
  _cronium_call POST /v1/output "{\"value\": $1}" >/dev/null
}

# cronium_set_condition true|false: sets the job's condition.
cronium_set_condition() {
  case ${1-} in
    true | false) _cronium_call POST /v1/condition "{\"value\": $1}" >/dev/null ;;
    *)
      echo "cronium: usage: cronium_set_condition true|false" >&2
      return 2
      ;;
  esac
}

# cronium_event: prints {"job_id","run_id","event_id","attempt"} as JSON.
cronium_event() {
  local answer
  answer=$(_cronium_call GET /v1/event) || return 1
  printf '%s\n' "$answer"
}

# cronium_get_variable NAME: prints a string value raw, any other value as JSON, and nothing
# when the variable is not set.
cronium_get_variable() {
  if [ $# -ne 1 ]; then
    echo "cronium: usage: cronium_get_variable NAME" >&2
    return 2
  fi
  local answer
  answer=$(_cronium_call POST /v1/variables/get \
    "{\"name\": $(_cronium_json_string "$1"), \"format\": \"text\"}") || return 1
  if [ -n "$answer" ]; then
    printf '%s\n' "$answer"
  fi
}

# cronium_set_variable NAME VALUE: stores VALUE as JSON when it parses as JSON, else as a string
# (the agent decides, so every shell agrees with the other libraries).
cronium_set_variable() {
  if [ $# -ne 2 ]; then
    echo "cronium: usage: cronium_set_variable NAME VALUE" >&2
    return 2
  fi
  _cronium_call POST /v1/variables/set \
    "{\"name\": $(_cronium_json_string "$1"), \"text\": $(_cronium_json_string "$2")}" >/dev/null
}

# cronium_notify [--tool NAME] [--title TITLE] MESSAGE...: sends a notification through one of
# the event owner's tools (Slack, Discord, webhook, email; without --tool: the owner's only tool).
cronium_notify() {
  local tool="" title="" fields=""
  while [ $# -gt 0 ]; do
    case $1 in
      --tool) [ $# -ge 2 ] || break; tool=$2; shift 2 ;;
      --title) [ $# -ge 2 ] || break; title=$2; shift 2 ;;
      --) shift; break ;;
      *) break ;;
    esac
  done
  if [ $# -lt 1 ]; then
    echo "cronium: usage: cronium_notify [--tool NAME] [--title TITLE] MESSAGE..." >&2
    return 2
  fi
  [ -n "$tool" ] && fields="$fields, \"tool\": $(_cronium_json_string "$tool")"
  [ -n "$title" ] && fields="$fields, \"title\": $(_cronium_json_string "$title")"
  _cronium_call POST /v1/notify "{\"message\": $(_cronium_json_string "$*")$fields}" >/dev/null
}
