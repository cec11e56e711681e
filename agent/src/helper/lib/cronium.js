// Cronium runtime helpers for Node.js (standard library only): `require('./cronium')`.
//
// Talks to the agent's per-job helper endpoint ($CRONIUM_HELPER_SOCKET, HTTP over a Unix
// socket) with the job's token ($CRONIUM_JOB_TOKEN). Values are JSON. Every call returns a
// promise; a failure rejects it with a CroniumError carrying the agent's message.
'use strict';

const http = require('http');

class CroniumError extends Error {
  constructor(message) {
    super(message);
    this.name = 'CroniumError';
  }
}

function call(method, path, body) {
  return new Promise((resolve, reject) => {
    const unavailable = process.env.CRONIUM_HELPER_UNAVAILABLE;
    if (unavailable) {
      reject(new CroniumError('runtime helpers are unavailable in this job: ' + unavailable));
      return;
    }
    const socketPath = process.env.CRONIUM_HELPER_SOCKET;
    const token = process.env.CRONIUM_JOB_TOKEN;
    if (!socketPath || !token) {
      reject(new CroniumError('not running inside a Cronium job (CRONIUM_HELPER_SOCKET or CRONIUM_JOB_TOKEN is not set)'));
      return;
    }
    const headers = { Authorization: 'Bearer ' + token };
    let data = null;
    if (body !== undefined) {
      data = Buffer.from(JSON.stringify(body), 'utf8');
      headers['Content-Type'] = 'application/json';
      headers['Content-Length'] = data.length;
    }
    const request = http.request({ socketPath, path, method, headers }, (response) => {
      const chunks = [];
      response.on('data', (chunk) => chunks.push(chunk));
      response.on('error', (error) => reject(new CroniumError('cannot read the helper answer: ' + error.message)));
      response.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        let answer = null;
        try {
          answer = text ? JSON.parse(text) : null;
        } catch (_) {
          answer = null;
        }
        if (response.statusCode < 200 || response.statusCode >= 300) {
          const message = answer && typeof answer === 'object' && answer.error;
          reject(new CroniumError(message || 'helper call failed with HTTP status ' + response.statusCode));
          return;
        }
        resolve(answer);
      });
    });
    request.on('error', (error) => reject(new CroniumError('cannot reach the Cronium helper endpoint: ' + error.message)));
    if (data) request.write(data);
    request.end();
  });
}

/** The JSON given when the run was triggered (null when there was none). */
function input() {
  return call('GET', '/v1/input');
}

/** Sets the job's result (any JSON value); the last call wins. */
async function output(value) {
  await call('POST', '/v1/output', { value: value === undefined ? null : value });
}

/** Sets the job's condition (true or false). */
async function setCondition(condition) {
  if (typeof condition !== 'boolean') throw new CroniumError('the condition must be true or false');
  await call('POST', '/v1/condition', { value: condition });
}

/** The ids of this job: {job_id, run_id, event_id, attempt}. */
function event() {
  return call('GET', '/v1/event');
}

/** The value of the variable `name` (null when it is not set). */
async function getVariable(name) {
  const answer = await call('POST', '/v1/variables/get', { name });
  return answer && typeof answer === 'object' && 'value' in answer ? answer.value : null;
}

/** Sets the variable `name` to `value` (any JSON value). */
async function setVariable(name, value) {
  await call('POST', '/v1/variables/set', { name, value: value === undefined ? null : value });
}

/**
 * Sends `message` through one of the event owner's tools (Slack, Discord, webhook, email).
 * `options.tool` names the tool (default: the owner's only tool); `options.title` is optional.
 */
async function notify(message, options) {
  const body = { message };
  if (options && options.tool !== undefined) body.tool = options.tool;
  if (options && options.title !== undefined) body.title = options.title;
  await call('POST', '/v1/notify', body);
}

module.exports = {
  CroniumError,
  input,
  output,
  set_condition: setCondition,
  setCondition,
  event,
  get_variable: getVariable,
  getVariable,
  set_variable: setVariable,
  setVariable,
  notify,
};
