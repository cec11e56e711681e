// The console's one stream of change notices (`GET /api/v1/changes`, server-sent events with
// the session cookie, like every GET): `change` {kind, id} when something a page may show
// changed, `resync` when notices were dropped. Pages do not use it directly: `poll` (live.ts)
// subscribes to the kinds a page shows and fetches again on a notice.
//
// The stream's state is "live" (connected), "reconnecting" (dropped or refused: the browser or
// this module retries, with a growing delay) or "off" (no EventSource). While it is not live,
// pollers fall back to their own interval; after a reconnect every subscriber fetches again,
// since notices were missed in between.

import { API_BASE } from "../api";

export type ChangeKind = "job" | "run" | "agent" | "server" | "event" | "workflow" | "workflow_run";

export interface Change {
  kind: ChangeKind;
  id: string;
}

export type LiveState = "connecting" | "live" | "reconnecting" | "off";

/** `null`: a resync (everything may have changed). */
type Listener = (change: Change | null) => void;

const listeners = new Map<Listener, Set<ChangeKind>>();
const stateListeners = new Set<(state: LiveState) => void>();
let source: EventSource | null = null;
let state: LiveState = "connecting";
let retryTimer: number | undefined;
let retryDelay = 2000;
/** Notices may have been missed: the next `ready` tells every subscriber to fetch again. */
let missed = false;

function setState(next: LiveState): void {
  if (state === next) {
    return;
  }
  state = next;
  for (const listener of stateListeners) {
    listener(next);
  }
}

function emit(change: Change | null): void {
  for (const [listener, kinds] of listeners) {
    if (change === null || kinds.has(change.kind)) {
      listener(change);
    }
  }
}

function connect(): void {
  window.clearTimeout(retryTimer);
  if (typeof EventSource === "undefined") {
    setState("off");
    return;
  }
  const stream = new EventSource(`${API_BASE}/changes`);
  source = stream;
  stream.addEventListener("ready", () => {
    retryDelay = 2000;
    setState("live");
    if (missed) {
      missed = false;
      emit(null);
    }
  });
  stream.addEventListener("change", (event) => {
    try {
      const change = JSON.parse((event as MessageEvent<string>).data) as Change;
      if (typeof change.kind === "string" && typeof change.id === "string") {
        emit(change);
      }
    } catch {
      // A malformed notice: nothing to act on.
    }
  });
  stream.addEventListener("resync", () => emit(null));
  stream.addEventListener("error", () => {
    if (source !== stream) {
      return;
    }
    missed = true;
    setState("reconnecting");
    if (stream.readyState === EventSource.CLOSED) {
      // Refused (e.g. the session ended): the browser gives up; retry later ourselves.
      source = null;
      retryTimer = window.setTimeout(connect, retryDelay);
      retryDelay = Math.min(retryDelay * 2, 60_000);
    }
    // Otherwise the browser reconnects by itself.
  });
}

/** Opens the stream once for the whole app (the shell calls it after login). */
export function startChanges(): void {
  if (source === null && state !== "off") {
    connect();
  }
}

/** The stream's state now. */
export function liveState(): LiveState {
  return state;
}

/** Calls `listener` with every state change until `signal` aborts. */
export function onLiveState(signal: AbortSignal | null, listener: (state: LiveState) => void): void {
  stateListeners.add(listener);
  signal?.addEventListener("abort", () => stateListeners.delete(listener));
}

/** Calls `listener` for each notice of `kinds` (and `null` for a resync) until `signal` aborts. */
export function subscribeChanges(signal: AbortSignal, kinds: readonly ChangeKind[], listener: (change: Change | null) => void): void {
  if (signal.aborted) {
    return;
  }
  const own: Listener = (change) => listener(change);
  listeners.set(own, new Set(kinds));
  signal.addEventListener("abort", () => listeners.delete(own));
}
