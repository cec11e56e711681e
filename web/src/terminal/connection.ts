// One WebSocket to `GET /api/v1/agents/{id}/terminal` (see the contract's "Terminal WebSocket"):
// binary frames carry terminal bytes both ways, text frames carry JSON control messages. This
// module knows the protocol and nothing about the page; the page reacts to its callbacks.

import { API_BASE, errorFrom } from "../api";

/** What the server said or did, in the order it happened. */
export interface ConnectionEvents {
  /** The socket is open (the upgrade succeeded). */
  open(): void;
  /** Terminal output: raw bytes, possibly ending inside a UTF-8 character. */
  output(bytes: Uint8Array): void;
  /** `{"type":"session","id"}`: the session this socket is attached to (always first). */
  session(id: string): void;
  /** `{"type":"exit","code"}`: the shell ended (always last). */
  exit(code: number | null): void;
  /** `{"type":"detached","reason"}`: the agent's link dropped; the session may still live. */
  detached(reason: string): void;
  /** `{"type":"error","message"}`. */
  error(message: string): void;
  /** The socket closed; `opened` tells whether it had ever opened. */
  closed(details: { opened: boolean; code: number; reason: string }): void;
}

/** Where a terminal socket goes: the same origin as the page, `wss:` under `https:`. */
export function terminalUrl(agentId: string, cols: number, rows: number, sessionId: string | null): URL {
  const url = new URL(`${API_BASE}/agents/${encodeURIComponent(agentId)}/terminal`, window.location.href);
  url.searchParams.set("cols", String(cols));
  url.searchParams.set("rows", String(rows));
  if (sessionId !== null) {
    url.searchParams.set("session", sessionId);
  }
  url.protocol = window.location.protocol === "https:" ? "wss:" : "ws:";
  return url;
}

/**
 * When a socket failed before it opened, the browser says nothing about why. The same URL asked
 * with a plain GET runs the same checks (credentials, agent, grant, session, limits) and answers
 * with the API's error message; that message is what the user should see. Returns null when the
 * plain request tells nothing: it got past those checks (the failure was the WebSocket itself),
 * or it was refused for lacking the `Origin` header, which browsers send with a WebSocket but
 * not with a same-origin GET.
 */
export async function probeFailure(url: URL): Promise<string | null> {
  const plain = new URL(url);
  plain.protocol = window.location.protocol;
  try {
    const response = await fetch(plain, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (response.ok) {
      return null;
    }
    const error = await errorFrom(response);
    const aboutTheProbe = error.status === 403 && /\borigin\b/i.test(error.message);
    return error.code === "http" || aboutTheProbe ? null : error.message;
  } catch {
    return "the control plane cannot be reached";
  }
}

const encoder = new TextEncoder();

export class TerminalConnection {
  readonly url: URL;
  private readonly socket: WebSocket;
  private readonly events: ConnectionEvents;
  private opened = false;
  /** Input typed before the socket opened, sent on open. */
  private pending: Uint8Array<ArrayBuffer>[] = [];

  constructor(url: URL, events: ConnectionEvents) {
    this.url = url;
    this.events = events;
    this.socket = new WebSocket(url);
    this.socket.binaryType = "arraybuffer";
    this.socket.addEventListener("open", () => {
      this.opened = true;
      for (const bytes of this.pending) {
        this.socket.send(bytes);
      }
      this.pending = [];
      this.events.open();
    });
    this.socket.addEventListener("message", (event: MessageEvent<ArrayBuffer | string>) => {
      if (typeof event.data === "string") {
        this.control(event.data);
      } else {
        this.events.output(new Uint8Array(event.data));
      }
    });
    this.socket.addEventListener("close", (event) => {
      this.events.closed({ opened: this.opened, code: event.code, reason: event.reason });
    });
  }

  /** Sends keystrokes (or pasted text) as one binary frame of UTF-8. */
  sendText(text: string): void {
    this.sendBytes(encoder.encode(text));
  }

  /** Sends bytes as they are (xterm's `onBinary`: one byte per character code). */
  sendBytes(bytes: Uint8Array<ArrayBuffer>): void {
    if (this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(bytes);
    } else if (this.socket.readyState === WebSocket.CONNECTING) {
      this.pending.push(bytes);
    }
  }

  resize(cols: number, rows: number): void {
    this.sendControl({ type: "resize", cols, rows });
  }

  /** Asks the server to end the session (the shell is hung up); `exit` follows. */
  closeSession(): void {
    this.sendControl({ type: "close" });
  }

  /** Closes this socket only; the session stays alive on the agent and can be re-attached. */
  disconnect(): void {
    this.socket.close(1000, "detach");
  }

  get isOpen(): boolean {
    return this.socket.readyState === WebSocket.OPEN;
  }

  private sendControl(message: Record<string, unknown>): void {
    if (this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify(message));
    }
  }

  private control(text: string): void {
    let message: { type?: unknown; id?: unknown; code?: unknown; reason?: unknown; message?: unknown };
    try {
      message = JSON.parse(text) as typeof message;
    } catch {
      this.events.error(`the server sent a control message that is not JSON: ${text.slice(0, 100)}`);
      return;
    }
    switch (message.type) {
      case "session":
        this.events.session(String(message.id));
        break;
      case "exit":
        this.events.exit(typeof message.code === "number" ? message.code : null);
        break;
      case "detached":
        this.events.detached(typeof message.reason === "string" ? message.reason : "the agent is unreachable");
        break;
      case "error":
        this.events.error(typeof message.message === "string" ? message.message : "unknown error");
        break;
      default:
        // Control messages added later are ignored by this page.
        break;
    }
  }
}
