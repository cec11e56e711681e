// The xterm.js set-up shared by the terminal page and the console's terminal tabs and recording
// player: the palette, the font, the addons (fit, unicode11, web links opened without an opener).

import { FitAddon } from "@xterm/addon-fit";
import { Unicode11Addon } from "@xterm/addon-unicode11";
import { WebLinksAddon } from "@xterm/addon-web-links";
import { Terminal } from "@xterm/xterm";

export const THEME = {
  background: "#0f1218",
  foreground: "#d6dbe4",
  cursor: "#f2c14e",
  cursorAccent: "#0f1218",
  selectionBackground: "#3a4a66",
  black: "#1b1f27",
  red: "#e06c75",
  green: "#98c379",
  yellow: "#e5c07b",
  blue: "#61afef",
  magenta: "#c678dd",
  cyan: "#56b6c2",
  white: "#d6dbe4",
  brightBlack: "#5c6370",
  brightRed: "#ff7a85",
  brightGreen: "#b5e890",
  brightYellow: "#ffd68a",
  brightBlue: "#82c4ff",
  brightMagenta: "#dd9cf0",
  brightCyan: "#7fd4de",
  brightWhite: "#ffffff",
};

/**
 * A terminal opened in `screen`, fitted to it (and refitted when it is resized) unless
 * `autoFit` is false (a recording keeps the size it was recorded with).
 */
export function openTerminal(
  screen: HTMLElement,
  options: { cursorBlink?: boolean; disableStdin?: boolean; autoFit?: boolean } = {},
): { terminal: Terminal; fit: FitAddon } {
  const terminal = new Terminal({
    allowProposedApi: true,
    cursorBlink: options.cursorBlink ?? true,
    disableStdin: options.disableStdin ?? false,
    fontFamily: "'DejaVu Sans Mono', 'Liberation Mono', Menlo, Consolas, monospace",
    fontSize: 14,
    scrollback: 5000,
    theme: THEME,
  });
  const fit = new FitAddon();
  terminal.loadAddon(fit);
  terminal.loadAddon(new Unicode11Addon());
  terminal.unicode.activeVersion = "11";
  terminal.loadAddon(
    new WebLinksAddon((event, uri) => {
      event.preventDefault();
      window.open(uri, "_blank", "noopener,noreferrer");
    }),
  );
  terminal.open(screen);
  if (options.autoFit === false) {
    return { terminal, fit };
  }
  fitSoon(fit, screen);
  let fitQueued = false;
  new ResizeObserver(() => {
    if (fitQueued) {
      return;
    }
    fitQueued = true;
    requestAnimationFrame(() => {
      fitQueued = false;
      fitSoon(fit, screen);
    });
  }).observe(screen);
  return { terminal, fit };
}

/** Fits unless the screen is hidden (a background tab): a hidden screen has no size. */
function fitSoon(fit: FitAddon, screen: HTMLElement): void {
  if (screen.offsetParent !== null || screen.getClientRects().length > 0) {
    fit.fit();
  }
}

/** Whether the terminal's buffer (scrollback included) has a line containing `text`. */
export function bufferHas(terminal: Terminal, text: string): boolean {
  const buffer = terminal.buffer.active;
  for (let row = 0; row < buffer.length; row += 1) {
    if (buffer.getLine(row)?.translateToString(true).includes(text) === true) {
      return true;
    }
  }
  return false;
}
