// The service's HTTP routes the studio uses. Same origin as the page (served by `nova serve`
// at `/`); a token, when the service has one, comes from the page's `?token=` once and is
// kept for the tab.

import type { ApiWorkflow } from "./layout";

const token = (() => {
  const fromUrl = new URLSearchParams(globalThis.location?.search ?? "").get("token");
  if (fromUrl) sessionStorage.setItem("nova_token", fromUrl);
  return fromUrl ?? globalThis.sessionStorage?.getItem("nova_token") ?? null;
})();

function headers(json = false): HeadersInit {
  const h: Record<string, string> = {};
  if (json) h["Content-Type"] = "application/json";
  if (token) h["Authorization"] = `Bearer ${token}`;
  return h;
}

/** ComfyUI's error body, or a plain failure. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly body: unknown,
  ) {
    super(
      (body as { error?: { message?: string } })?.error?.message ??
        (typeof body === "string" ? body : `HTTP ${status}`),
    );
  }
}

async function call<T>(method: string, path: string, body?: unknown): Promise<T> {
  const r = await fetch(path, {
    method,
    headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  let v: unknown = text;
  try {
    v = text ? JSON.parse(text) : null;
  } catch {
    /* plain text */
  }
  if (!r.ok) throw new ApiError(r.status, v);
  return v as T;
}

export interface InputSpec {
  required?: Record<string, [unknown, Record<string, unknown>?]>;
  optional?: Record<string, [unknown, Record<string, unknown>?]>;
}
export interface NodeInfo {
  name: string;
  display_name: string;
  category: string;
  input: InputSpec;
  output: string[];
  output_name: string[];
  output_node: boolean;
}

export interface PlanNode {
  node: string;
  class_type: string;
  mode: string;
  tile: number | null;
  chunks: number;
  weights_bytes: number;
  activations_bytes: number;
  forecast_bytes: number;
  fits: boolean;
}
export interface Plan {
  profile: string;
  budget_bytes: number | null;
  headroom_bytes: number;
  limit_bytes: number | null;
  forecast_peak_bytes: number;
  fits: boolean;
  refusal: { message: string } | null;
  nodes: PlanNode[];
}

/** One change Auto-Optimize made. */
export interface Change {
  node: string | null;
  field: string;
  from: unknown;
  to: unknown;
  reason: string;
}
export interface Optimized {
  prompt: ApiWorkflow;
  extra_data: { nova?: Record<string, unknown> } & Record<string, unknown>;
  changes: Change[];
  before: Plan;
  after: Plan;
  settings: Record<string, unknown>;
}

/** ComfyUI's history entry, as far as the studio reads it. */
export interface HistoryEntry {
  prompt: unknown[];
  outputs: Record<string, unknown>;
  status: { status_str: string; completed: boolean };
}

export const api = {
  objectInfo: () => call<Record<string, NodeInfo>>("GET", "/object_info"),
  stats: () => call<Record<string, unknown>>("GET", "/api/system/stats"),
  plan: (prompt: ApiWorkflow, extra: Record<string, unknown> = {}) =>
    call<Plan>("POST", "/api/plan", { prompt, extra_data: extra }),
  optimize: (prompt: ApiWorkflow, extra: Record<string, unknown> = {}) =>
    call<Optimized>("POST", "/api/optimize", { prompt, extra_data: extra }),
  history: (max = 10) => call<Record<string, HistoryEntry>>("GET", `/history?max_items=${max}`),
  job: (id: string) => call<Record<string, unknown>>("GET", `/api/jobs/${encodeURIComponent(id)}`),
  submit: (prompt: ApiWorkflow, clientId: string, extra: Record<string, unknown> = {}) =>
    call<{ prompt_id: string; number: number }>("POST", "/prompt", {
      prompt,
      client_id: clientId,
      extra_data: extra,
    }),
  queue: () => call<{ queue_running: unknown[][]; queue_pending: unknown[][] }>("GET", "/queue"),
  cancel: (ids: string[]) => call<unknown>("POST", "/queue", { delete: ids }),
  interrupt: (promptId?: string) =>
    call<unknown>("POST", "/interrupt", promptId ? { prompt_id: promptId } : {}),
  viewUrl: (img: { filename: string; subfolder: string; type: string }) => {
    const q = new URLSearchParams({ filename: img.filename, subfolder: img.subfolder, type: img.type });
    return `/view?${q}`;
  },
  /** A URL an element can load an output from: `/view` itself, or, when the service wants a
   * token (which only the WebSocket handshake may carry in a URL), the file fetched with the
   * token in a header, as a blob URL. */
  viewSrc: async (img: { filename: string; subfolder: string; type: string }): Promise<string> => {
    const url = api.viewUrl(img);
    if (!token) return url;
    const r = await fetch(url, { headers: headers() });
    if (!r.ok) throw new ApiError(r.status, await r.text());
    return URL.createObjectURL(await r.blob());
  },
  socketUrl: (clientId: string) => {
    const proto = location.protocol === "https:" ? "wss" : "ws";
    const q = new URLSearchParams({ clientId });
    if (token) q.set("token", token);
    return `${proto}://${location.host}/ws?${q}`;
  },
};
