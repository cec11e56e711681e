// What every page gets: the user (and what their role allows), the element to draw into, an
// AbortSignal that fires when the user navigates away (pollers and streams stop on it) and
// helpers to navigate and to report errors.

import type { User } from "../api";

export interface PageContext {
  user: User;
  /** Viewers see everything they may see but change nothing: no change buttons for them. */
  canWrite: boolean;
  isAdmin: boolean;
  /** The page's own area (inside <main>). */
  root: HTMLElement;
  /** Aborted when the page is left. */
  signal: AbortSignal;
  /** Sets the page's title (document title and the <h1>). */
  setTitle(title: string): void;
  /** Goes to a console route, e.g. "#/events/ID". */
  navigate(hash: string): void;
}

export type Page = (context: PageContext, params: Record<string, string>) => void | Promise<void>;
