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
