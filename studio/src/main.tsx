// NOVA Studio: the graph editor, queue, live previews and the VRAM budget rail.

import { render } from "preact";
import { useEffect, useMemo, useRef, useState } from "preact/hooks";
import { api, ApiError, type NodeInfo, type Plan } from "./api";
import { edges, layout, type ApiWorkflow, COL_WIDTH, ROW_HEIGHT } from "./layout";
import type { Preview } from "./protocol";
import { connect } from "./socket";
import { apply, emptyState, Scheduler, type JobState } from "./store";
import { extraData, TEMPLATES, type Template } from "./templates";

const store = emptyState();
const clientId = `studio-${Math.random().toString(36).slice(2, 10)}`;

const mib = (b: number | null | undefined) =>
  b === null || b === undefined ? "—" : `${(b / 2 ** 20).toFixed(1)} MiB`;

/** Draws a job's tiles as they arrive: each tile decoded off the main thread. */
class TileCanvas {
  canvas: HTMLCanvasElement | null = null;
  job: string | null = null;
  async draw(p: Preview) {
    const t = p.meta.nova;
    if (!t || !this.canvas) return;
    if (this.job !== p.meta.prompt_id) {
      this.job = p.meta.prompt_id ?? null;
      this.canvas.width = t.width;
      this.canvas.height = t.height;
    }
    const bmp = await createImageBitmap(new Blob([p.image as BlobPart], { type: p.mime }));
    this.canvas.getContext("2d")?.drawImage(bmp, t.tile.x, t.tile.y, t.tile.w, t.tile.h);
    bmp.close();
  }
}
const tiles = new TileCanvas();
let stepPreview: (url: string) => void = () => {};

function defaults(info: NodeInfo): Record<string, unknown> {
  const inputs: Record<string, unknown> = {};
  for (const [name, spec] of Object.entries(info.input.required ?? {})) {
    const [kind, opts] = spec;
    if (Array.isArray(kind)) inputs[name] = kind[0];
    else if (opts && "default" in opts) inputs[name] = opts.default;
  }
  return inputs;
}

function NodeBox(props: {
  id: string;
  wf: ApiWorkflow;
  info?: NodeInfo;
  job?: JobState;
  x: number;
  y: number;
  onChange: (id: string, input: string, value: unknown) => void;
  onRemove: (id: string) => void;
}) {
  const n = props.wf[props.id];
  const state = props.job?.nodes.get(props.id);
  const spec = { ...(props.info?.input.required ?? {}), ...(props.info?.input.optional ?? {}) };
  return (
    <div
      class="node"
      style={{ left: props.x + 10, top: props.y + 10 }}
      data-status={state?.status ?? "idle"}
      data-node={props.id}
      role="group"
      aria-label={`node ${props.id} ${n.class_type}`}
    >
      <h3>
        <span>
          #{props.id} {props.info?.display_name ?? n.class_type}
        </span>
        <button aria-label={`remove node ${props.id}`} onClick={() => props.onRemove(props.id)}>
          ×
        </button>
      </h3>
      {Object.entries(n.inputs).map(([name, v]) => {
        if (Array.isArray(v) && v.length === 2 && typeof v[0] === "string") {
          return (
            <div class="link" key={name}>
              {name} ← #{v[0]}:{String(v[1])}
            </div>
          );
        }
        const [kind] = spec[name] ?? [];
        const inputId = `in-${props.id}-${name}`;
        return (
          <label key={name} for={inputId}>
            {name}
            {Array.isArray(kind) ? (
              <select
                id={inputId}
                value={String(v)}
                onChange={(e) => props.onChange(props.id, name, (e.target as HTMLSelectElement).value)}
              >
                {(kind as unknown[]).map((o) => (
                  <option key={String(o)}>{String(o)}</option>
                ))}
              </select>
            ) : (
              <input
                id={inputId}
                value={String(v)}
                type={kind === "INT" || kind === "FLOAT" ? "number" : "text"}
                step={kind === "FLOAT" ? "any" : undefined}
                onChange={(e) => {
                  const raw = (e.target as HTMLInputElement).value;
                  props.onChange(props.id, name, kind === "INT" || kind === "FLOAT" ? Number(raw) : raw);
                }}
              />
            )}
          </label>
        );
      })}
      {state && (
        <div class="lifecycle" data-testid={`state-${props.id}`}>
          {state.lifecycle ?? state.status}
          {state.progress && state.progress.max > 0 && ` ${state.progress.value}/${state.progress.max}`}
          {state.wallMs !== undefined && ` · ${state.wallMs.toFixed(0)} ms`}
        </div>
      )}
    </div>
  );
}

function BudgetRail(props: { plan: Plan | null; error: string | null }) {
  const p = props.plan;
  if (props.error) return <div class="rail refused" role="alert">{props.error}</div>;
  if (!p) return <div class="rail">Plan the workflow to see its memory forecast.</div>;
  const limit = p.limit_bytes ?? Math.max(...p.nodes.map((n) => n.forecast_bytes), 1);
  const top = Math.max(limit, ...p.nodes.map((n) => n.forecast_bytes), 1);
  return (
    <div class="rail" aria-label="VRAM budget rail">
      <div>
        {p.profile}: forecast peak {mib(p.forecast_peak_bytes)} of {mib(p.limit_bytes)} usable
        {p.fits ? " — fits" : ""}
        {p.refusal && <span class="refused" role="alert"> — refused: {p.refusal.message}</span>}
      </div>
      <div class="bars">
        {p.nodes.map((n) => (
          <div
            key={n.node}
            class={`bar${n.fits ? "" : " over"}`}
            style={{ height: `${(100 * n.forecast_bytes) / top}%` }}
            title={`#${n.node} ${n.class_type}: ${mib(n.forecast_bytes)} (${n.mode}${n.tile ? `, tile ${n.tile}` : ""})`}
            aria-label={`node ${n.node} forecast ${mib(n.forecast_bytes)}`}
          />
        ))}
      </div>
    </div>
  );
}

function App() {
  const [info, setInfo] = useState<Record<string, NodeInfo>>({});
  const [template, setTemplate] = useState<Template>(TEMPLATES[0]);
  const [tile, setTile] = useState<number>(TEMPLATES[0].tile);
  const [wf, setWf] = useState<ApiWorkflow>(TEMPLATES[0].workflow);
  const [plan, setPlan] = useState<Plan | null>(null);
  const [planError, setPlanError] = useState<string | null>(null);
  const [connected, setConnected] = useState(false);
  const [, setVersion] = useState(0);
  const [filter, setFilter] = useState("");
  const [stats, setStats] = useState<Record<string, unknown> | null>(null);
  const [current, setCurrent] = useState<string | null>(null);
  const [step, setStep] = useState<string | null>(null);
  const canvasRef = useRef<HTMLCanvasElement>(null);

  useEffect(() => {
    api.objectInfo().then(setInfo).catch(() => {});
    const sch = new Scheduler(
      () => setVersion(store.version),
      (cb) => requestAnimationFrame(cb),
    );
    stepPreview = (url) => setStep((old) => (old && URL.revokeObjectURL(old), url));
    const close = connect(api.socketUrl(clientId), {
      onMessage: (m) => {
        apply(store, m);
        sch.schedule();
      },
      onPreview: (p) => {
        if (p.meta.nova) void tiles.draw(p);
        else stepPreview(URL.createObjectURL(new Blob([p.image as BlobPart], { type: p.mime })));
      },
      onState: setConnected,
    });
    const poll = setInterval(() => api.stats().then(setStats).catch(() => {}), 2000);
    return () => {
      close();
      clearInterval(poll);
    };
  }, []);
  useEffect(() => {
    tiles.canvas = canvasRef.current;
  });

  const placed = useMemo(() => layout(wf), [wf]);
  const links = useMemo(() => edges(wf), [wf]);
  const job = current ? store.jobs.get(current) : undefined;
  const pos = new Map(placed.map((p) => [p.id, p]));

  const change = (id: string, input: string, value: unknown) => {
    setWf({ ...wf, [id]: { ...wf[id], inputs: { ...wf[id].inputs, [input]: value } } });
    setPlan(null);
  };
  const remove = (id: string) => {
    const next = { ...wf };
    delete next[id];
    setWf(next);
  };
  const add = (cls: string) => {
    const ids = Object.keys(wf).map(Number).filter(Number.isFinite);
    const id = String((ids.length ? Math.max(...ids) : 0) + 1);
    setWf({ ...wf, [id]: { class_type: cls, inputs: defaults(info[cls]) } });
  };
  const doPlan = async () => {
    try {
      setPlan(await api.plan(wf, extraData(template, tile)));
      setPlanError(null);
    } catch (e) {
      setPlan(null);
      setPlanError(e instanceof ApiError ? e.message : String(e));
    }
  };
  const queue = async () => {
    try {
      const r = await api.submit(wf, clientId, extraData(template, tile));
      setCurrent(r.prompt_id);
      setPlanError(null);
    } catch (e) {
      setPlanError(e instanceof ApiError ? e.message : String(e));
    }
  };
  const save = () => {
    const a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([JSON.stringify(wf, null, 2)], { type: "application/json" }));
    a.download = "workflow.json";
    a.click();
  };
  const load = async (f: File | undefined) => {
    if (!f) return;
    const v = JSON.parse(await f.text());
    setWf(v.prompt && typeof v.prompt === "object" ? v.prompt : v);
    setPlan(null);
  };
  const outputs = job
    ? Object.values(job.outputs).flatMap(
        (o) => ((o as { images?: Array<{ filename: string; subfolder: string; type: string }> }).images ?? []),
      )
    : [];
  const device = (stats?.device ?? {}) as Record<string, unknown>;
  const width = Math.max(...placed.map((p) => p.x), 0) + COL_WIDTH + 40;
  const height = Math.max(...placed.map((p) => p.y), 0) + ROW_HEIGHT * 2;

  return (
    <div class="app">
      <header>
        <h1>NOVA Studio</h1>
        <label>
          Template{" "}
          <select
            aria-label="hardware template"
            value={template.id}
            onChange={(e) => {
              const t = TEMPLATES.find((x) => x.id === (e.target as HTMLSelectElement).value)!;
              setTemplate(t);
              setTile(t.tile);
              setWf(t.workflow);
              setPlan(null);
            }}
          >
            {TEMPLATES.map((t) => (
              <option key={t.id} value={t.id}>
                {t.label}
              </option>
            ))}
          </select>
        </label>
        <label for="tile-size">
          Tile{" "}
          <input
            id="tile-size"
            type="number"
            min={16}
            step={16}
            value={tile}
            style={{ width: "5em" }}
            onChange={(e) => {
              setTile(Number((e.target as HTMLInputElement).value));
              setPlan(null);
            }}
          />
        </label>
        <button onClick={doPlan}>Plan</button>
        <button onClick={queue}>Queue</button>
        <button onClick={save}>Save</button>
        <label>
          Load <input type="file" accept="application/json" onChange={(e) => load((e.target as HTMLInputElement).files?.[0])} />
        </label>
        <div class="status" aria-live="polite">
          <span data-testid="connection">{connected ? "connected" : "offline"}</span>
          <span>queue {store.queueRemaining}</span>
          <span data-testid="memory-state">VRAM {String(device.state ?? "…")}</span>
        </div>
      </header>
      <nav class="palette" aria-label="node palette">
        <label>
          Add node{" "}
          <input value={filter} placeholder="search" onInput={(e) => setFilter((e.target as HTMLInputElement).value)} />
        </label>
        <ul>
          {Object.values(info)
            .filter((n) => n.name.toLowerCase().includes(filter.toLowerCase()))
            .sort((a, b) => a.name.localeCompare(b.name))
            .map((n) => (
              <li key={n.name}>
                <button onClick={() => add(n.name)}>{n.display_name}</button>
              </li>
            ))}
        </ul>
      </nav>
      <main class="graph" aria-label="workflow graph">
        <svg width={width} height={height} aria-hidden="true">
          {links.map((e) => {
            const a = pos.get(e.from);
            const b = pos.get(e.to);
            if (!a || !b) return null;
            return (
              <path
                key={`${e.from}-${e.to}-${e.input}`}
                d={`M${a.x + 220},${a.y + 40} C${a.x + 240},${a.y + 40} ${b.x},${b.y + 40} ${b.x + 10},${b.y + 40}`}
                stroke="#57606a"
                fill="none"
              />
            );
          })}
        </svg>
        {placed.map((p) => (
          <NodeBox
            key={p.id}
            id={p.id}
            wf={wf}
            info={info[wf[p.id].class_type]}
            job={job}
            x={p.x}
            y={p.y}
            onChange={change}
            onRemove={remove}
          />
        ))}
      </main>
      <aside class="side" aria-label="run">
        <section>
          <h2>Run</h2>
          {job ? (
            <div data-testid="job-status">
              {job.status}
              {job.lifecycle && ` (${job.lifecycle})`} — {job.tiles.length} tile(s)
              {job.error && <div class="refused">{job.error.message}</div>}
              {(job.status === "running" || job.status === "queued") && (
                <button onClick={() => api.interrupt(job.promptId)}>Interrupt</button>
              )}
            </div>
          ) : (
            <div>No run yet.</div>
          )}
          <div class="preview">
            <canvas ref={canvasRef} aria-label="partial output" />
          </div>
          {step && <img src={step} alt="sampler step preview" />}
        </section>
        <section>
          <h2>Outputs</h2>
          {outputs.map((img) => (
            <img key={img.filename} src={api.viewUrl(img)} alt={`output ${img.filename}`} data-testid="output" />
          ))}
        </section>
        <section>
          <h2>Jobs</h2>
          <ul class="jobs">
            {store.order
              .slice(-10)
              .reverse()
              .map((id) => {
                const j = store.jobs.get(id)!;
                return (
                  <li key={id}>
                    <button onClick={() => setCurrent(id)}>{id.slice(0, 8)}</button> {j.status}
                    {j.status === "queued" && <button onClick={() => api.cancel([id])}>Cancel</button>}
                  </li>
                );
              })}
          </ul>
        </section>
      </aside>
      <BudgetRail plan={plan} error={planError} />
    </div>
  );
}

const root = document.getElementById("app");
if (root) render(<App />, root);
