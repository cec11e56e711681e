// A small, safe ANSI parser for job logs: SGR colour and style sequences become styled text
// runs (classes for the 16 standard colours, CSSOM colours for 256-colour and true-colour
// codes); every other escape sequence (cursor movement, erase, OSC titles) is dropped. Text is
// only ever inserted as text. The parser keeps its state across chunks, so a sequence or a
// style split between two SSE events still applies.

export interface Style {
  /** 0-15 (a class) or a CSS colour. */
  fg: number | string | null;
  bg: number | string | null;
  bold: boolean;
  dim: boolean;
  italic: boolean;
  underline: boolean;
  inverse: boolean;
  strike: boolean;
}

export type Token = { kind: "text"; text: string; style: Style } | { kind: "newline" } | { kind: "cr" };

const PLAIN: Style = {
  fg: null,
  bg: null,
  bold: false,
  dim: false,
  italic: false,
  underline: false,
  inverse: false,
  strike: false,
};

/** The xterm 256-colour palette entry `n` (16-255) as a CSS colour. */
export function palette256(n: number): string {
  if (n >= 232) {
    const level = 8 + (n - 232) * 10;
    return `rgb(${level}, ${level}, ${level})`;
  }
  const index = n - 16;
  const steps = [0, 95, 135, 175, 215, 255];
  const r = steps[Math.floor(index / 36) % 6] ?? 0;
  const g = steps[Math.floor(index / 6) % 6] ?? 0;
  const b = steps[index % 6] ?? 0;
  return `rgb(${r}, ${g}, ${b})`;
}

/** Reads an extended colour (38/48 ;5;n or ;2;r;g;b) starting at params[i]; returns it and the next index. */
function extendedColour(params: number[], i: number): [number | string | null, number] {
  const mode = params[i + 1];
  if (mode === 5) {
    const n = params[i + 2] ?? 0;
    return [n < 16 ? n : palette256(Math.min(n, 255)), i + 3];
  }
  if (mode === 2) {
    const clamp = (value: number | undefined): number => Math.max(0, Math.min(255, value ?? 0));
    return [`rgb(${clamp(params[i + 2])}, ${clamp(params[i + 3])}, ${clamp(params[i + 4])})`, i + 5];
  }
  return [null, params.length];
}

/** Applies one SGR parameter list to `style`, returning the new style. */
export function applySgr(style: Style, params: number[]): Style {
  const next = { ...style };
  if (params.length === 0) {
    return { ...PLAIN };
  }
  for (let i = 0; i < params.length; ) {
    const code = params[i] ?? 0;
    if (code === 0) {
      Object.assign(next, PLAIN);
    } else if (code === 1) {
      next.bold = true;
    } else if (code === 2) {
      next.dim = true;
    } else if (code === 3) {
      next.italic = true;
    } else if (code === 4) {
      next.underline = true;
    } else if (code === 7) {
      next.inverse = true;
    } else if (code === 9) {
      next.strike = true;
    } else if (code === 22) {
      next.bold = false;
      next.dim = false;
    } else if (code === 23) {
      next.italic = false;
    } else if (code === 24) {
      next.underline = false;
    } else if (code === 27) {
      next.inverse = false;
    } else if (code === 29) {
      next.strike = false;
    } else if (code >= 30 && code <= 37) {
      next.fg = code - 30;
    } else if (code === 39) {
      next.fg = null;
    } else if (code >= 40 && code <= 47) {
      next.bg = code - 40;
    } else if (code === 49) {
      next.bg = null;
    } else if (code >= 90 && code <= 97) {
      next.fg = code - 90 + 8;
    } else if (code >= 100 && code <= 107) {
      next.bg = code - 100 + 8;
    } else if (code === 38 || code === 48) {
      const [colour, after] = extendedColour(params, i);
      if (code === 38) {
        next.fg = colour;
      } else {
        next.bg = colour;
      }
      i = after;
      continue;
    }
    i += 1;
  }
  return next;
}

const ESC = "\u001b";

export class AnsiParser {
  private style: Style = { ...PLAIN };
  /** An escape sequence cut off at the end of the last chunk. */
  private pending = "";

  /** Splits `chunk` into styled text, newlines and carriage returns. */
  feed(chunk: string): Token[] {
    const input = this.pending + chunk;
    this.pending = "";
    const tokens: Token[] = [];
    const text = (from: number, to: number): void => {
      if (to > from) {
        tokens.push({ kind: "text", text: input.slice(from, to), style: this.style });
      }
    };
    // Plain text runs up to the next control character are sliced, not copied char by char.
    const special = /[\u0000-\u0008\u000a-\u001f\u007f]/g;
    let i = 0;
    while (i < input.length) {
      special.lastIndex = i;
      const found = special.exec(input);
      const at = found === null ? input.length : found.index;
      text(i, at);
      if (found === null) {
        break;
      }
      const c = input[at];
      i = at + 1;
      if (c === "\n") {
        tokens.push({ kind: "newline" });
      } else if (c === "\r") {
        if (i >= input.length) {
          // Is it \r\n? Decided by the next chunk.
          this.pending = "\r";
        } else if (input[i] !== "\n") {
          tokens.push({ kind: "cr" });
        }
      } else if (c === ESC) {
        const end = this.sequenceEnd(input, at);
        if (end === null) {
          // Kept for the next chunk, within reason: a runaway "sequence" is dropped.
          this.pending = input.length - at < 256 ? input.slice(at) : "";
          break;
        }
        const sequence = input.slice(at, end);
        if (sequence.startsWith(`${ESC}[`) && sequence.endsWith("m")) {
          const body = sequence.slice(2, -1);
          const params = body === "" ? [] : body.split(/[;:]/).map((part) => (part === "" ? 0 : Number.parseInt(part, 10) || 0));
          this.style = applySgr(this.style, params);
        }
        i = end;
      }
      // Other control characters (bell, backspace…) are not shown.
    }
    return tokens;
  }

  /** The index after the escape sequence starting at `start`, or null if it is incomplete. */
  private sequenceEnd(input: string, start: number): number | null {
    const kind = input[start + 1];
    if (kind === undefined) {
      return null;
    }
    if (kind === "[") {
      // CSI: parameters and intermediates, then a final byte in @-~.
      for (let j = start + 2; j < input.length; j += 1) {
        const code = input.charCodeAt(j);
        if (code >= 0x40 && code <= 0x7e) {
          return j + 1;
        }
      }
      return null;
    }
    if (kind === "]" || kind === "P" || kind === "_" || kind === "^") {
      // OSC/DCS/APC/PM: until BEL or ESC \.
      for (let j = start + 2; j < input.length; j += 1) {
        if (input[j] === "\u0007") {
          return j + 1;
        }
        if (input[j] === ESC && input[j + 1] === "\\") {
          return j + 2;
        }
      }
      return null;
    }
    // A two-character escape (ESC =, ESC 7, ESC ( B …).
    if (kind === "(" || kind === ")") {
      return input.length > start + 2 ? start + 3 : null;
    }
    return start + 2;
  }
}

/** Fills a <span> for a styled run: classes for standard colours and styles, CSSOM for others. */
export function styledSpan(text: string, style: Style): HTMLSpanElement | Text {
  let { fg, bg } = style;
  if (style.inverse) {
    [fg, bg] = [bg ?? "inverse-fg", fg ?? "inverse-bg"];
  }
  const classes: string[] = [];
  const span = document.createElement("span");
  if (typeof fg === "number") {
    classes.push(`ansi-fg-${fg}`);
  } else if (fg === "inverse-fg") {
    classes.push("ansi-fg-inverse");
  } else if (fg !== null) {
    span.style.color = fg;
  }
  if (typeof bg === "number") {
    classes.push(`ansi-bg-${bg}`);
  } else if (bg === "inverse-bg") {
    classes.push("ansi-bg-inverse");
  } else if (bg !== null) {
    span.style.backgroundColor = bg;
  }
  if (style.bold) classes.push("ansi-bold");
  if (style.dim) classes.push("ansi-dim");
  if (style.italic) classes.push("ansi-italic");
  if (style.underline) classes.push("ansi-underline");
  if (style.strike) classes.push("ansi-strike");
  if (classes.length === 0 && span.style.length === 0) {
    return document.createTextNode(text);
  }
  span.className = classes.join(" ");
  span.textContent = text;
  return span;
}
