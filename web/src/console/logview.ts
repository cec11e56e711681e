// A job log on screen: ANSI-coloured lines appended as output arrives, batched once per
// animation frame, with only the newest MAX_LINES lines (each cut at MAX_LINE_CHARS) kept in
// the DOM so a huge log stays responsive; the full log is a download. Follows the end while
// the user is scrolled to the bottom.

import { el } from "../dom";
import { AnsiParser, type Token, styledSpan } from "./ansi";

export const MAX_LINES = 5000;
const MAX_LINE_CHARS = 4000;
/** Output held for the next animation frame before it is drawn at once. */
const MAX_QUEUED_CHARS = 4_000_000;

export class LogView {
  readonly element: HTMLElement;
  private readonly lines: HTMLElement;
  private readonly notice: HTMLElement;
  private readonly parser = new AnsiParser();
  private queue: Array<{ text: string; stream: string }> = [];
  private frame: number | null = null;
  private current: HTMLElement | null = null;
  private currentChars = 0;
  private lineCount = 0;
  private dropped = 0;
  private bytes = 0;
  /** Lowercased text a line must contain to be shown; "" shows every line. */
  private filter = "";
  private queuedChars = 0;

  constructor(downloadUrl: string, downloadName: string) {
    this.lines = el("div", { class: "log-lines", role: "log", "aria-live": "off", tabindex: "0", "aria-label": "Job output" });
    this.notice = el(
      "p",
      { class: "log-notice", hidden: true },
      el("span", { class: "log-notice-text" }),
      " ",
      el("a", { href: downloadUrl, download: downloadName }, "Download the full log"),
    );
    this.element = el("div", { class: "log" }, this.notice, this.lines);
  }

  /** Queues output; it is drawn on the next animation frame. */
  append(text: string, stream = "stdout"): void {
    this.bytes += text.length;
    this.queue.push({ text, stream });
    this.queuedChars += text.length;
    if (this.queuedChars > MAX_QUEUED_CHARS) {
      // No animation frames in a hidden tab: draw now rather than hold a huge backlog.
      this.flush();
      return;
    }
    if (this.frame === null) {
      this.frame = window.requestAnimationFrame(() => this.flush());
    }
  }

  /** Draws everything queued now (before the page reads the log, e.g. at the end). */
  flush(): void {
    if (this.frame !== null) {
      window.cancelAnimationFrame(this.frame);
      this.frame = null;
    }
    if (this.queue.length === 0) {
      return;
    }
    const box = this.lines;
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    const tokens: Array<{ token: Token; stream: string }> = [];
    let newlines = 0;
    for (const { text, stream } of this.queue) {
      for (const token of this.parser.feed(text)) {
        tokens.push({ token, stream });
        if (token.kind === "newline") {
          newlines += 1;
        }
      }
    }
    // A huge batch: only its last MAX_LINES lines can stay on screen, so the earlier ones are
    // parsed (for the colour state) but never become elements.
    let start = 0;
    if (newlines > MAX_LINES) {
      let skip = newlines - MAX_LINES;
      const endsShownLine = this.current !== null;
      while (skip > 0 && start < tokens.length) {
        if (tokens[start]?.token.kind === "newline") {
          skip -= 1;
        }
        start += 1;
      }
      this.dropped += newlines - MAX_LINES - (endsShownLine ? 1 : 0);
      this.current = null;
    }
    const fragment = document.createDocumentFragment();
    for (let index = start; index < tokens.length; index += 1) {
      const { token, stream } = tokens[index] as { token: Token; stream: string };
      if (token.kind === "newline") {
        this.current = null;
      } else if (token.kind === "cr") {
        // A carriage return redraws the line (progress bars): start it over.
        if (this.current !== null) {
          this.current.replaceChildren();
          this.currentChars = 0;
        }
      } else {
        const line = this.line(fragment, stream);
        const room = MAX_LINE_CHARS - this.currentChars;
        if (room <= 0) {
          continue;
        }
        const text = token.text.length > room ? `${token.text.slice(0, room)}…` : token.text;
        this.currentChars += text.length;
        line.append(styledSpan(text, token.style));
      }
    }
    this.queue = [];
    this.queuedChars = 0;
    if (this.filter !== "") {
      for (const line of fragment.querySelectorAll<HTMLElement>(".log-line")) {
        this.applyFilter(line);
      }
    }
    box.append(fragment);
    this.trim();
    if (atBottom) {
      box.scrollTop = box.scrollHeight;
    }
  }

  /**
   * Shows only the lines (of those on screen) containing `text`, case-insensitively; "" shows
   * all. Returns how many lines match. Lines that arrive later are filtered as they come.
   */
  setFilter(text: string): number {
    this.flush();
    this.filter = text.toLowerCase();
    let matching = 0;
    for (const line of this.lines.querySelectorAll<HTMLElement>(".log-line")) {
      if (this.applyFilter(line)) {
        matching += 1;
      }
    }
    return matching;
  }

  private applyFilter(line: HTMLElement): boolean {
    const shown = this.filter === "" || (line.textContent ?? "").toLowerCase().includes(this.filter);
    line.classList.toggle("filtered-out", !shown);
    return shown;
  }

  /** Whether any output was received. */
  get empty(): boolean {
    return this.bytes === 0;
  }

  private line(fragment: DocumentFragment, stream: string): HTMLElement {
    if (this.current === null) {
      this.current = el("div", { class: stream === "stderr" ? "log-line stderr" : "log-line" });
      this.currentChars = 0;
      this.lineCount += 1;
      fragment.append(this.current);
    }
    return this.current;
  }

  private trim(): void {
    let excess = this.lineCount - MAX_LINES;
    while (excess > 0 && this.lines.firstChild !== null) {
      this.lines.firstChild.remove();
      excess -= 1;
      this.lineCount -= 1;
      this.dropped += 1;
    }
    if (this.dropped === 0) {
      return;
    }
    this.notice.hidden = false;
    const text = this.notice.querySelector(".log-notice-text");
    if (text !== null) {
      text.textContent = `${this.dropped.toLocaleString()} earlier lines are not shown (only the last ${MAX_LINES.toLocaleString()} are).`;
    }
  }
}
