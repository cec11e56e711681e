// Keeping a page up to date without a manual refresh. The API pushes job logs and a run's job
// changes over server-sent events, and change notices for everything else (changes.ts: one
// stream for the whole console). A page's lists are fetched by `poll`: when given the kinds of
// notices that concern them, they are fetched again shortly after such a notice (debounced),
// with a slow safety-net interval while the notice stream is live; without kinds, or while the
// stream is down, every `interval` while the tab is visible. Requests that fail back off
// (doubling up to a minute); everything stops when the page is left (its AbortSignal).

import { type ChangeKind, liveState, onLiveState, subscribeChanges } from "./changes";

/** A notice's refetch waits this long for more notices (a burst costs one fetch). */
const DEBOUNCE_MS = 300;

/** The interval while the notice stream is live: only a safety net. */
const SAFETY_NET_MS = 60_000;

export interface Poller {
  /** Fetches now (after a change the user made) instead of waiting for the next tick. */
  refresh(): void;
}

export function poll(
  signal: AbortSignal,
  intervalMs: number,
  tick: () => Promise<void>,
  onError: (error: unknown) => void,
  kinds: readonly ChangeKind[] = [],
): Poller {
  let delay = intervalMs;
  const pushed = (): boolean => kinds.length > 0 && liveState() === "live";
  let timer: number | undefined;
  let running = false;
  let again = false;

  const schedule = (ms: number): void => {
    window.clearTimeout(timer);
    if (!signal.aborted) {
      timer = window.setTimeout(run, ms);
    }
  };

  async function run(): Promise<void> {
    if (signal.aborted) {
      return;
    }
    if (running) {
      again = true;
      return;
    }
    if (document.hidden) {
      // Fetched when the tab is shown again.
      return;
    }
    running = true;
    try {
      await tick();
      delay = intervalMs;
    } catch (error) {
      if (!signal.aborted) {
        onError(error);
      }
      delay = Math.min(delay * 2, 60_000);
    } finally {
      running = false;
    }
    if (again) {
      again = false;
      schedule(0);
    } else {
      schedule(pushed() && delay === intervalMs ? Math.max(intervalMs, SAFETY_NET_MS) : delay);
    }
  }

  let soon: number | undefined;
  const fetchSoon = (): void => {
    if (soon === undefined && !signal.aborted) {
      soon = window.setTimeout(() => {
        soon = undefined;
        schedule(0);
      }, DEBOUNCE_MS);
    }
  };
  if (kinds.length > 0) {
    subscribeChanges(signal, kinds, fetchSoon);
    onLiveState(signal, (state) => {
      // Back to the page's own interval when the stream drops; notices take over when it is back.
      if (state !== "live" && !running) {
        schedule(delay);
      }
    });
  }

  const onVisible = (): void => {
    if (!document.hidden) {
      schedule(0);
    }
  };
  document.addEventListener("visibilitychange", onVisible);
  signal.addEventListener("abort", () => {
    window.clearTimeout(timer);
    window.clearTimeout(soon);
    document.removeEventListener("visibilitychange", onVisible);
  });
  void run();
  return { refresh: () => schedule(0) };
}
