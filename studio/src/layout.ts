// Lays out a workflow (ComfyUI's API format) for the graph editor: each node in the column of
// its longest path from a source, rows in id order within a column, so links always run left
// to right. Pure: positions depend only on the graph.

export interface ApiNode {
  class_type: string;
  inputs: Record<string, unknown>;
  _meta?: { title?: string };
}
export type ApiWorkflow = Record<string, ApiNode>;

export interface Placed {
  id: string;
  col: number;
  row: number;
  x: number;
  y: number;
}

export interface Edge {
  from: string;
  output: number;
  to: string;
  input: string;
}

export const COL_WIDTH = 240;
export const ROW_HEIGHT = 140;

/** `[node_id, output_index]` links of a node's inputs. */
export function edges(wf: ApiWorkflow): Edge[] {
  const out: Edge[] = [];
  for (const [to, n] of Object.entries(wf)) {
    for (const [input, v] of Object.entries(n.inputs ?? {})) {
      if (Array.isArray(v) && v.length === 2 && typeof v[0] === "string" && typeof v[1] === "number") {
        if (v[0] in wf) out.push({ from: v[0], output: v[1], to, input });
      }
    }
  }
  return out;
}

const byId = (a: string, b: string) => {
  const x = Number(a);
  const y = Number(b);
  return Number.isFinite(x) && Number.isFinite(y) ? x - y : a.localeCompare(b);
};

/** Positions for every node. Nodes on a cycle (an invalid workflow) go to column 0. */
export function layout(wf: ApiWorkflow): Placed[] {
  const ids = Object.keys(wf).sort(byId);
  const inputsOf = new Map<string, string[]>(ids.map((id) => [id, []]));
  for (const e of edges(wf)) inputsOf.get(e.to)!.push(e.from);
  const depth = new Map<string, number>();
  const visiting = new Set<string>();
  const depthOf = (id: string): number => {
    const known = depth.get(id);
    if (known !== undefined) return known;
    if (visiting.has(id)) return 0;
    visiting.add(id);
    let d = 0;
    for (const src of inputsOf.get(id) ?? []) d = Math.max(d, depthOf(src) + 1);
    visiting.delete(id);
    depth.set(id, d);
    return d;
  };
  const rows = new Map<number, number>();
  return ids.map((id) => {
    const col = depthOf(id);
    const row = rows.get(col) ?? 0;
    rows.set(col, row + 1);
    return { id, col, row, x: col * COL_WIDTH, y: row * ROW_HEIGHT };
  });
}

/** ComfyUI's widget kinds: everything else in an input spec is a data type, taken by a link. */
const WIDGETS = new Set(["INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"]);

/** Whether an input spec's kind is a link (a data type such as `IMAGE`), not a widget. */
export function isLinkKind(kind: unknown): kind is string {
  return typeof kind === "string" && !WIDGETS.has(kind);
}

/** The outputs a link input of type `kind` on node `to` can take: `[node, slot]` of every other
 * node whose output has that type (`*` takes any), in id order. Nodes downstream of `to` are
 * left out, so a link never makes a cycle. */
export function compatibleOutputs(
  wf: ApiWorkflow,
  outputsOf: (classType: string) => string[] | undefined,
  to: string,
  kind: string,
): Array<[string, number]> {
  const downstream = new Set<string>([to]);
  const es = edges(wf);
  for (let grew = true; grew; ) {
    grew = false;
    for (const e of es) {
      if (downstream.has(e.from) && !downstream.has(e.to)) {
        downstream.add(e.to);
        grew = true;
      }
    }
  }
  const out: Array<[string, number]> = [];
  for (const id of Object.keys(wf).sort(byId)) {
    if (downstream.has(id)) continue;
    (outputsOf(wf[id].class_type) ?? []).forEach((t, slot) => {
      if (t === kind || kind === "*" || t === "*") out.push([id, slot]);
    });
  }
  return out;
}
