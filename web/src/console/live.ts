// Keeping a page up to date without a manual refresh. The API pushes job logs and a run's job
// changes over server-sent events; lists (agents, runs, events) are polled: every `interval` while the tab is
// visible, backing off (doubling up to a minute) while requests fail, and stopping when the
// page is left (its AbortSignal).

export interface Poller {
  /** Fetches now (after a change the user made) instead of waiting for the next tick. */
  refresh(): void;
}

export function poll(
  signal: AbortSignal,
  intervalMs: number,
  tick: () => Promise<void>,
  onError: (error: unknown) => void,
): Poller {
  let delay = intervalMs;
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
      schedule(delay);
    }
  }

  const onVisible = (): void => {
    if (!document.hidden) {
      schedule(0);
    }
  };
  document.addEventListener("visibilitychange", onVisible);
  signal.addEventListener("abort", () => {
    window.clearTimeout(timer);
    document.removeEventListener("visibilitychange", onVisible);
  });
  void run();
  return { refresh: () => schedule(0) };
}
