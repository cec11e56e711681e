// Vite builds the console's pages into the directory control-plane/build.rs names (it passes
// --outDir); the control plane embeds that directory and serves it under /ui/.
//
// Every HTML file listed in `pages` is one page: the index is the console (a single-page app,
// src/main.ts, whose routes live in the address's hash) and the terminal has a page of its own
// (src/terminal/main.ts), linked from the console as `terminal?agent=ID`. A route of the console
// is not a page here; a new page is only needed for something that must not share the app's
// bundle. Vite splits what only some routes use (the CodeMirror editor) into chunks of their own.
import { resolve } from "node:path";
import { defineConfig } from "vite";

const root = import.meta.dirname;

const pages = {
  index: resolve(root, "index.html"),
  terminal: resolve(root, "terminal.html"),
};

export default defineConfig({
  base: "/ui/",
  // `npm run dev`: the pages with live reload; the API (and the terminal WebSocket) is the
  // control plane's at CRONIUM_URL.
  server: {
    proxy: {
      "/api": { target: process.env.CRONIUM_URL ?? "http://127.0.0.1:8080", ws: true },
    },
  },
  build: {
    outDir: "dist",
    emptyOutDir: true,
    // Source maps would double the size of the binary for no use in production.
    sourcemap: false,
    // Everything is a file of its own (no data: URLs), so the CSP needs no exceptions for scripts.
    assetsInlineLimit: 0,
    rolldownOptions: { input: pages },
  },
});
