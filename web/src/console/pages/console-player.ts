// A player for terminal recordings (asciicast v2: a JSON header line, then one
// `[seconds, code, data]` line per event): output events are written into a read-only xterm.js
// terminal with their timing, scaled by the chosen speed; long idle gaps are shortened to
// MAX_GAP_S. Play/pause, restart and speed; `data-state` (playing, paused, ended) on the player.

import type { Terminal } from "@xterm/xterm";

import { el } from "../../dom";
import { openTerminal } from "../../terminal/xterm";

declare global {
  interface Window {
    /** The recording player's terminal, for tests and debugging. */
    croniumPlayerTerminal?: Terminal;
  }
}

/** Longest pause between two events during playback, in recording seconds. */
const MAX_GAP_S = 2;

/** Events this close together are written in one go. */
const BATCH_S = 0.005;

interface CastEvent {
  time: number;
  code: string;
  data: string;
}

/** The header's size and the events; lines that are not valid asciicast are skipped, counted. */
export function parseCast(text: string): { cols: number; rows: number; events: CastEvent[]; skipped: number } {
  const lines = text.split("\n").filter((line) => line.trim() !== "");
  let cols = 80;
  let rows = 24;
  let skipped = 0;
  const events: CastEvent[] = [];
  lines.forEach((line, index) => {
    let parsed: unknown;
    try {
      parsed = JSON.parse(line);
    } catch {
      skipped += 1;
      return;
    }
    if (index === 0 && typeof parsed === "object" && parsed !== null && !Array.isArray(parsed)) {
      const header = parsed as { width?: unknown; height?: unknown };
      cols = typeof header.width === "number" && header.width > 0 ? Math.min(header.width, 500) : cols;
      rows = typeof header.height === "number" && header.height > 0 ? Math.min(header.height, 200) : rows;
      return;
    }
    if (Array.isArray(parsed) && typeof parsed[0] === "number" && typeof parsed[1] === "string" && typeof parsed[2] === "string") {
      events.push({ time: parsed[0], code: parsed[1], data: parsed[2] });
    } else {
      skipped += 1;
    }
  });
  return { cols, rows, events, skipped };
}

export class RecordingPlayer {
  readonly element: HTMLElement;
  private readonly terminal: Terminal;
  private readonly events: CastEvent[];
  private readonly playButton = el("button", { type: "button", class: "primary", id: "player-play" }, "Pause");
  private readonly position = el("span", { class: "muted", id: "player-position" });
  private readonly speed = el(
    "select",
    { id: "player-speed", "aria-label": "Speed" },
    ...["0.5", "1", "2", "4", "8"].map((value) => el("option", { value, selected: value === "1" }, `${value}×`)),
  );
  private index = 0;
  private timer: number | undefined;
  private playing = false;

  constructor(region: HTMLElement, text: string, title: string) {
    const cast = parseCast(text);
    this.events = cast.events.filter((event) => event.code === "o" || event.code === "r");
    const restart = el("button", { type: "button", id: "player-restart" }, "Restart");
    const close = el("button", { type: "button", id: "player-close" }, "Close");
    const screen = el("div", { class: "terminal player-screen" });
    this.element = el(
      "div",
      { class: "player", id: "player", "data-state": "paused" },
      el("div", { class: "toolbar" }, el("strong", {}, title), this.position, el("span", { class: "spacer" }), this.playButton, restart, el("label", { for: "player-speed" }, "Speed "), this.speed, close),
      cast.skipped > 0 && el("p", { class: "hint" }, `${cast.skipped} malformed line(s) of the recording were skipped.`),
      screen,
    );
    region.append(this.element);
    ({ terminal: this.terminal } = openTerminal(screen, { cursorBlink: false, disableStdin: true, autoFit: false }));
    this.terminal.resize(cast.cols, cast.rows);
    window.croniumPlayerTerminal = this.terminal;
    this.playButton.addEventListener("click", () => (this.playing ? this.pause() : this.play()));
    restart.addEventListener("click", () => {
      this.pause();
      this.index = 0;
      this.terminal.reset();
      this.play();
    });
    close.addEventListener("click", () => this.dispose());
    this.speed.addEventListener("change", () => {
      if (this.playing) {
        this.pause();
        this.play();
      }
    });
    this.showPosition();
  }

  /** The player's terminal, for tests. */
  get screen(): Terminal {
    return this.terminal;
  }

  play(): void {
    if (this.index >= this.events.length) {
      this.index = 0;
      this.terminal.reset();
    }
    this.playing = true;
    this.playButton.textContent = "Pause";
    this.element.dataset.state = "playing";
    this.step();
  }

  pause(): void {
    window.clearTimeout(this.timer);
    this.playing = false;
    this.playButton.textContent = "Play";
    this.element.dataset.state = "paused";
  }

  dispose(): void {
    window.clearTimeout(this.timer);
    this.playing = false;
    this.terminal.dispose();
    this.element.remove();
    if (window.croniumPlayerTerminal === this.terminal) {
      delete window.croniumPlayerTerminal;
    }
  }

  /** Writes the next event and every one right after it, then waits for the one after. */
  private step(): void {
    if (!this.playing) {
      return;
    }
    const first = this.events[this.index];
    if (first === undefined) {
      this.playing = false;
      this.playButton.textContent = "Play again";
      this.element.dataset.state = "ended";
      this.showPosition();
      return;
    }
    let batch = "";
    let event: CastEvent | undefined = first;
    while (event !== undefined && event.time - first.time <= BATCH_S) {
      if (event.code === "o") {
        batch += event.data;
      } else {
        const [cols, rows] = event.data.split("x").map(Number);
        if (batch !== "") {
          this.terminal.write(batch);
          batch = "";
        }
        if (cols !== undefined && rows !== undefined && cols > 0 && rows > 0) {
          this.terminal.resize(Math.min(cols, 500), Math.min(rows, 200));
        }
      }
      this.index += 1;
      event = this.events[this.index];
    }
    if (batch !== "") {
      this.terminal.write(batch);
    }
    this.showPosition();
    const next = this.events[this.index];
    const last = this.events[this.index - 1];
    const gap = next === undefined || last === undefined ? 0 : Math.min(Math.max(next.time - last.time, 0), MAX_GAP_S);
    this.timer = window.setTimeout(() => this.step(), (gap * 1000) / Number(this.speed.value));
  }

  private showPosition(): void {
    const at = this.events[Math.max(this.index - 1, 0)]?.time ?? 0;
    const end = this.events[this.events.length - 1]?.time ?? 0;
    this.position.textContent = `${at.toFixed(1)} s / ${end.toFixed(1)} s`;
  }
}
