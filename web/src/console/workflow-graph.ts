// The workflow graph in SVG, shared by the builder and the run view: node boxes (an event each),
// edges as curves coloured by their kind with an arrowhead and a label, an automatic layered
// layout, and node positions kept in localStorage per workflow (the API has no place for them).
// Text from the API goes into SVG text nodes, never parsed as markup.

import type { EdgeKind, WorkflowEdge, WorkflowNode } from "../workflows-api";

export interface Point {
  x: number;
  y: number;
}

export const NODE_W = 184;
export const NODE_H = 60;
const GAP_X = 88;
const GAP_Y = 36;
const MARGIN = 24;
const SVG_NS = "http://www.w3.org/2000/svg";

/** The colour classes of edges: the API's kinds, with `condition` split by its value. */
export type EdgeStyle = "success" | "failure" | "always" | "condition-true" | "condition-false";

export const EDGE_STYLES: Array<{ style: EdgeStyle; label: string }> = [
  { style: "success", label: "on success" },
  { style: "failure", label: "on failure" },
  { style: "always", label: "always" },
  { style: "condition-true", label: "if condition true" },
  { style: "condition-false", label: "if condition false" },
];

export function edgeStyle(edge: WorkflowEdge): EdgeStyle {
  const on: EdgeKind = edge.on ?? "success";
  if (on === "condition") {
    return edge.condition === false ? "condition-false" : "condition-true";
  }
  return on;
}

/** The API fields of an edge of `style` (`condition` only for condition edges). */
export function edgeFields(style: EdgeStyle): Pick<WorkflowEdge, "on" | "condition"> {
  switch (style) {
    case "condition-true":
      return { on: "condition", condition: true };
    case "condition-false":
      return { on: "condition", condition: false };
    default:
      return { on: style };
  }
}

export function edgeLabel(edge: WorkflowEdge): string {
  const style = edgeStyle(edge);
  return EDGE_STYLES.find((candidate) => candidate.style === style)?.label ?? style;
}

/**
 * A layered layout: each node in the column of its longest path from an entry node (cycles,
 * which the API refuses anyway, are cut), rows in definition order.
 */
export function autoLayout(nodes: WorkflowNode[], edges: WorkflowEdge[]): Map<string, Point> {
  const known = new Set(nodes.map((node) => node.id));
  const depth = new Map<string, number>(nodes.map((node) => [node.id, 0]));
  // Longest path by relaxation, at most |nodes| rounds (so a cycle cannot loop forever).
  for (let round = 0; round < nodes.length; round += 1) {
    let changed = false;
    for (const edge of edges) {
      if (!known.has(edge.from) || !known.has(edge.to) || edge.from === edge.to) {
        continue;
      }
      const wanted = (depth.get(edge.from) ?? 0) + 1;
      if (wanted > (depth.get(edge.to) ?? 0) && wanted < nodes.length) {
        depth.set(edge.to, wanted);
        changed = true;
      }
    }
    if (!changed) {
      break;
    }
  }
  const rows = new Map<number, number>();
  const positions = new Map<string, Point>();
  for (const node of nodes) {
    const column = depth.get(node.id) ?? 0;
    const row = rows.get(column) ?? 0;
    rows.set(column, row + 1);
    positions.set(node.id, { x: MARGIN + column * (NODE_W + GAP_X), y: MARGIN + row * (NODE_H + GAP_Y) });
  }
  return positions;
}

const storageKey = (workflowKey: string): string => `cronium.workflow-positions.${workflowKey}`;

/** Saved positions of a workflow's nodes (`workflowKey`: its id), or an empty map. */
export function loadPositions(workflowKey: string): Map<string, Point> {
  const positions = new Map<string, Point>();
  try {
    const parsed = JSON.parse(window.localStorage.getItem(storageKey(workflowKey)) ?? "{}") as Record<string, unknown>;
    for (const [node, value] of Object.entries(parsed)) {
      const point = value as Partial<Point> | null;
      if (typeof point?.x === "number" && typeof point.y === "number" && Number.isFinite(point.x) && Number.isFinite(point.y)) {
        positions.set(node, { x: point.x, y: point.y });
      }
    }
  } catch {
    // Unreadable or blocked storage: laid out automatically.
  }
  return positions;
}

export function savePositions(workflowKey: string, positions: Map<string, Point>): void {
  try {
    window.localStorage.setItem(storageKey(workflowKey), JSON.stringify(Object.fromEntries(positions)));
  } catch {
    // Storage full or blocked: positions last until the page is left.
  }
}

/** Saved positions where there are some, the automatic layout for the other nodes. */
export function positionsFor(workflowKey: string, nodes: WorkflowNode[], edges: WorkflowEdge[]): Map<string, Point> {
  const saved = loadPositions(workflowKey);
  const layout = autoLayout(nodes, edges);
  const positions = new Map<string, Point>();
  for (const node of nodes) {
    positions.set(node.id, saved.get(node.id) ?? layout.get(node.id) ?? { x: MARGIN, y: MARGIN });
  }
  return positions;
}

type SvgAttributes = Record<string, string | number | undefined>;

export function svg<K extends keyof SVGElementTagNameMap>(tag: K, attributes: SvgAttributes = {}, ...children: Array<Node | string>): SVGElementTagNameMap[K] {
  const element = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value !== undefined) {
      element.setAttribute(name, String(value));
    }
  }
  element.append(...children);
  return element;
}

/** Cuts `text` to about `max` characters with an ellipsis. */
function clip(text: string, max: number): string {
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}

export interface GraphModel {
  nodes: WorkflowNode[];
  edges: WorkflowEdge[];
  positions: Map<string, Point>;
  /** The second line of a node (its event's name, or its state). */
  subtitle(node: WorkflowNode): string;
  /** Extra classes of a node's group (e.g. `state-running`, `selected`). */
  nodeClass(node: WorkflowNode): string;
  /** Extra classes of an edge's group (e.g. `selected`, `invalid`). */
  edgeClass?(edge: WorkflowEdge, index: number): string;
  /** A link for a node (the run view: its run). */
  nodeHref?(node: WorkflowNode): string | null;
  /** The accessible name of a node. */
  nodeLabel(node: WorkflowNode): string;
  /** Whether nodes get an output handle to drag edges from (the builder). */
  handles: boolean;
}

/** The canvas size that holds every node. */
export function canvasSize(positions: Map<string, Point>): { width: number; height: number } {
  let width = 640;
  let height = 240;
  for (const point of positions.values()) {
    width = Math.max(width, point.x + NODE_W + MARGIN * 2);
    // Room for an edge that loops back below the lowest node.
    height = Math.max(height, point.y + NODE_H * 2.4 + MARGIN * 2);
  }
  return { width, height };
}

/**
 * The curve of an edge between two node boxes (right side → left side) and the point halfway
 * along it. An edge that goes back (its target not to the right) loops below the boxes.
 */
export function edgeCurve(from: Point, to: Point): { d: string; mid: Point } {
  const x1 = from.x + NODE_W;
  const y1 = from.y + NODE_H / 2;
  const x2 = to.x;
  const y2 = to.y + NODE_H / 2;
  let c1: Point;
  let c2: Point;
  if (x2 >= x1 + 24) {
    const bend = Math.max(40, (x2 - x1) / 2);
    c1 = { x: x1 + bend, y: y1 };
    c2 = { x: x2 - bend, y: y2 };
  } else {
    const drop = NODE_H * 1.6 + Math.abs(y2 - y1) / 4;
    c1 = { x: x1 + 90, y: y1 + drop };
    c2 = { x: x2 - 90, y: y2 + drop };
  }
  const mid = { x: (x1 + 3 * c1.x + 3 * c2.x + x2) / 8, y: (y1 + 3 * c1.y + 3 * c2.y + y2) / 8 };
  return { d: `M ${x1} ${y1} C ${c1.x} ${c1.y}, ${c2.x} ${c2.y}, ${x2} ${y2}`, mid };
}

export function edgePath(from: Point, to: Point): string {
  return edgeCurve(from, to).d;
}

/** Draws the whole graph into `canvas` (an <svg>), replacing what was there. */
export function drawGraph(canvas: SVGSVGElement, model: GraphModel): void {
  const { width, height } = canvasSize(model.positions);
  canvas.setAttribute("width", String(width));
  canvas.setAttribute("height", String(height));
  canvas.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const defs = svg(
    "defs",
    {},
    ...EDGE_STYLES.map(({ style }) =>
      svg(
        "marker",
        { id: `wf-arrow-${style}`, viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 10, markerHeight: 10, markerUnits: "userSpaceOnUse", orient: "auto-start-reverse" },
        svg("path", { d: "M 0 0 L 10 5 L 0 10 z", class: `wf-arrow wf-arrow-${style}` }),
      ),
    ),
  );
  const edges = svg("g", { class: "wf-edges" });
  model.edges.forEach((edge, index) => {
    const from = model.positions.get(edge.from);
    const to = model.positions.get(edge.to);
    if (from === undefined || to === undefined) {
      return;
    }
    const style = edgeStyle(edge);
    const { d, mid } = edgeCurve(from, to);
    const label = edgeLabel(edge);
    edges.append(
      svg(
        "g",
        {
          class: `wf-edge wf-edge-${style} ${model.edgeClass?.(edge, index) ?? ""}`.trim(),
          "data-edge": index,
          "data-from": edge.from,
          "data-to": edge.to,
        },
        svg("title", {}, `${edge.from} → ${edge.to}: ${label}`),
        // A wide transparent path makes the thin edge easy to click.
        svg("path", { d, class: "wf-edge-hit" }),
        svg("path", { d, class: "wf-edge-line", "marker-end": `url(#wf-arrow-${style})` }),
        svg("text", { x: mid.x, y: mid.y - 6, class: "wf-edge-label", "text-anchor": "middle" }, label),
      ),
    );
  });
  const nodes = svg("g", { class: "wf-nodes" });
  for (const node of model.nodes) {
    const at = model.positions.get(node.id);
    if (at === undefined) {
      continue;
    }
    const box = svg(
      "g",
      {
        class: `wf-node ${model.nodeClass(node)}`.trim(),
        "data-node": node.id,
        transform: `translate(${at.x} ${at.y})`,
      },
      svg("rect", { class: "wf-node-box", width: NODE_W, height: NODE_H, rx: 8, ry: 8 }),
      svg("text", { x: 12, y: 24, class: "wf-node-title" }, clip(node.id, 22)),
      svg("text", { x: 12, y: 44, class: "wf-node-subtitle" }, clip(model.subtitle(node), 26)),
    );
    if ((node.join ?? "all") === "any") {
      box.append(svg("text", { x: NODE_W - 10, y: 18, class: "wf-node-join", "text-anchor": "end" }, "any"));
    }
    if (model.handles) {
      box.append(
        svg("circle", { class: "wf-handle", cx: NODE_W, cy: NODE_H / 2, r: 7, "data-handle": node.id }, svg("title", {}, `Drag to another node to connect ${node.id}`)),
      );
    }
    const href = model.nodeHref?.(node) ?? null;
    if (href !== null) {
      nodes.append(svg("a", { href, class: "wf-node-link", "aria-label": model.nodeLabel(node), "data-node-link": node.id }, box));
    } else {
      box.setAttribute("aria-label", model.nodeLabel(node));
      nodes.append(box);
    }
  }
  canvas.replaceChildren(defs, edges, nodes);
}

/** The legend of edge colours. */
export function legend(): HTMLElement {
  const list = document.createElement("ul");
  list.className = "wf-legend";
  list.setAttribute("aria-label", "Edge colours");
  for (const { style, label } of EDGE_STYLES) {
    const item = document.createElement("li");
    const swatch = svg("svg", { width: 28, height: 10, "aria-hidden": "true", class: `wf-edge-${style}` }, svg("line", { x1: 0, y1: 5, x2: 28, y2: 5, class: "wf-edge-line" }));
    item.append(swatch, ` ${label}`);
    list.append(item);
  }
  return list;
}

/** A node id made from an event name: letters, digits, '_' and '-', unique among `taken`. */
export function nodeIdFor(name: string, taken: Set<string>): string {
  const base = name.replace(/[^A-Za-z0-9_-]+/g, "-").replace(/^-+|-+$/g, "").slice(0, 56) || "step";
  let candidate = base;
  for (let n = 2; taken.has(candidate); n += 1) {
    candidate = `${base}-${n}`;
  }
  return candidate;
}
