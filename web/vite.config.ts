// Vite builds the console's pages into the directory control-plane/build.rs names (it passes
// --outDir); the control plane embeds that directory and serves it under /ui/.
//
// Every HTML file listed in `pages` is one page. Today there are two: the index (the agents and
// their "Open terminal" links) and the terminal. The console's other pages join this list, or
// replace the index with a client-side routed app, without changing how the files are embedded.
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
