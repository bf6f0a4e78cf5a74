// NOVA Studio: the graph editor, queue and history, live previews (tiles, sampler steps,
// video frames, audio chunks), the VRAM budget rail, Auto-Optimize and the bottleneck
// inspector.

import { render } from "preact";
import { useEffect, useMemo, useRef, useState } from "preact/hooks";
import { decode, startDecoder } from "./decode";
import { api, ApiError, type Change, type HistoryEntry, type NodeInfo, type Plan } from "./api";
import { inspectorRows, PART_LABEL } from "./inspector";
import { compatibleOutputs, edges, isLinkKind, layout, type ApiWorkflow, COL_WIDTH, ROW_HEIGHT } from "./layout";
import { AudioPlayer, VideoPlayer } from "./media";
import type { Preview } from "./protocol";
import { rail } from "./rail";
import { connect } from "./socket";
import { apply, emptyState, Scheduler, type JobState, type RunTiming } from "./store";
import { extraData, TEMPLATES, type Template } from "./templates";

const store = emptyState();
const clientId = `studio-${Math.random().toString(36).slice(2, 10)}`;

const mib = (b: number | null | undefined) =>
  b === null || b === undefined ? "—" : `${(b / 2 ** 20).toFixed(1)} MiB`;
const ms = (v: number) => (v >= 1000 ? `${(v / 1000).toFixed(2)} s` : `${v.toFixed(1)} ms`);

/**
 * Runs `cb` on an animation frame at least 50 ms from now. Renders and tile paints go through
 * it, so a burst of messages costs the page one update (20 a second at most), and the main
 * thread is never busy with one burst for long.
 */
function afterAWhile(cb: () => void): number {
  return window.setTimeout(() => requestAnimationFrame(cb), 50);
}

/** Draws a job's tiles as they arrive: each tile decoded on a worker, and the decoded
 * tiles drawn together at most every 50 ms (one canvas update, not one per tile). */
class TileCanvas {
  canvas: HTMLCanvasElement | null = null;
  job: string | null = null;
  private pending: Array<{ bmp: ImageBitmap; x: number; y: number; w: number; h: number }> = [];
  private timer = 0;
  async draw(p: Preview) {
    const t = p.meta.nova;
    if (t?.kind !== "tile" || !this.canvas) return;
    if (this.job !== p.meta.prompt_id) {
      this.job = p.meta.prompt_id ?? null;
      this.canvas.width = t.width;
      this.canvas.height = t.height;
      for (const d of this.pending) d.bmp.close();
      this.pending = [];
    }
    const job = this.job;
    const bmp = await decode(p.image, p.mime);
    if (job !== this.job) return bmp.close();
    this.pending.push({ bmp, ...t.tile });
    this.timer ||= afterAWhile(() => this.flush());
  }
  private flush() {
    this.timer = 0;
    const ctx = this.canvas?.getContext("2d");
    for (const d of this.pending) {
      ctx?.drawImage(d.bmp, d.x, d.y, d.w, d.h);
      d.bmp.close();
    }
    this.pending = [];
  }
  /** Paints the final image over the tiles: a slow page may have missed some (previews are
   * droppable), never the result. */
  finish(job: string, url: string) {
    if (this.job !== job || !this.canvas) return;
    // Decoded off the main thread, like the tiles.
    void fetch(url)
      .then(async (r) => decode(new Uint8Array(await r.arrayBuffer()), r.headers.get("content-type") ?? "image/png"))
      .then((bmp) => {
        const c = this.canvas;
        if (c && this.job === job) c.getContext("2d")?.drawImage(bmp, 0, 0, c.width, c.height);
        bmp.close();
      })
      .catch(() => {});
  }
}
const tiles = new TileCanvas();
const video = new VideoPlayer();
const audio = new AudioPlayer();
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
  selected: boolean;
  outputsOf: (classType: string) => string[] | undefined;
  onSelect: (id: string) => void;
  onChange: (id: string, input: string, value: unknown) => void;
  onRemove: (id: string) => void;
}) {
  const n = props.wf[props.id];
  const state = props.job?.nodes.get(props.id);
  const spec = { ...(props.info?.input.required ?? {}), ...(props.info?.input.optional ?? {}) };
  return (
    <div
      class={`node${props.selected ? " selected" : ""}`}
      style={{ left: props.x + 10, top: props.y + 10 }}
      data-status={state?.status ?? "idle"}
      data-node={props.id}
      role="group"
      aria-label={`node ${props.id} ${n.class_type}`}
    >
      <h3>
        <label class="pick">
          <input
            type="checkbox"
            checked={props.selected}
            aria-label={`select node ${props.id} for the rail`}
            onChange={() => props.onSelect(props.id)}
          />
          #{props.id} {props.info?.display_name ?? n.class_type}
        </label>
        <button aria-label={`remove node ${props.id}`} onClick={() => props.onRemove(props.id)}>
          ×
        </button>
      </h3>
      {[...new Set([...Object.keys(spec), ...Object.keys(n.inputs)])].map((name) => {
        const v = n.inputs[name];
        const [kind] = spec[name] ?? [];
        const inputId = `in-${props.id}-${name}`;
        const linked = Array.isArray(v) && v.length === 2 && typeof v[0] === "string";
        if (linked || isLinkKind(kind)) {
          // A link: any earlier node's output of the input's type.
          const options = isLinkKind(kind)
            ? compatibleOutputs(props.wf, props.outputsOf, props.id, kind)
            : [];
          const value = linked ? `${(v as [string, number])[0]}:${(v as [string, number])[1]}` : "";
          if (linked && !options.some(([f, o]) => `${f}:${o}` === value)) options.unshift(v as [string, number]);
          return (
            <label class="link" key={name} for={inputId}>
              {name} ←
              <select
                id={inputId}
                value={value}
                onChange={(e) => {
                  const raw = (e.target as HTMLSelectElement).value;
                  const [from, slot] = raw.split(":");
                  props.onChange(props.id, name, raw ? [from, Number(slot)] : undefined);
                }}
              >
                <option value="">(not connected)</option>
                {options.map(([f, o]) => (
                  <option key={`${f}:${o}`} value={`${f}:${o}`}>
                    #{f} {props.wf[f]?.class_type}:{o}
                  </option>
                ))}
              </select>
            </label>
          );
        }
        if (v === undefined) return null;
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
        <div class="lifecycle" data-testid={`state-${props.id}`} title={state.phases.join(" → ")}>
          <span data-testid={`phase-${props.id}`}>{state.lifecycle ?? state.status}</span>
          {state.progress && state.progress.max > 0 && ` ${state.progress.value}/${state.progress.max}`}
          {state.wallMs !== undefined && ` · ${state.wallMs.toFixed(0)} ms`}
          {state.phases.length > 1 && <div class="phases">{state.phases.join(" → ")}</div>}
          {state.timing && (
            <div class="phases" data-testid={`split-${props.id}`}>
              {(
                [
                  ["load", state.timing.load_ms],
                  ["transfer", state.timing.transfer_ms],
                  ["compute", state.timing.compute_ms],
                  ["replay", state.timing.replay_ms],
                ] as Array<[string, number]>
              )
                .filter(([, v]) => v > 0)
                .map(([k, v]) => `${k} ${ms(v)}`)
                .join(" · ")}
            </div>
          )}
        </div>
      )}
    </div>
  );
}

function BudgetRail(props: {
  plan: Plan | null;
  error: string | null;
  job?: JobState;
  selected: ReadonlySet<string>;
}) {
  const p = props.plan;
  if (props.error) return <div class="rail refused" role="alert">{props.error}</div>;
  if (!p) return <div class="rail">Plan the workflow to see its memory forecast.</div>;
  const r = rail(p, props.job, props.selected);
  return (
    <div class="rail" aria-label="VRAM budget rail">
      <div>
        {p.profile}: forecast peak {mib(p.forecast_peak_bytes)} of {mib(p.limit_bytes)} usable
        {p.fits ? " — fits" : ""}
        {r.limit !== null && r.limitPct === null && <span> (the limit is above the scale)</span>}
        {r.run.trackedPeak !== null && (
          <span data-testid="tracked-peak"> · tracked {mib(r.run.trackedPeak)}</span>
        )}
        {p.refusal && <span class="refused" role="alert"> — refused: {p.refusal.message}</span>}
        {r.selection && (
          <span data-testid="selection">
            {" "}
            · selected {r.selection.nodes} node(s): peak {mib(r.selection.peak)}, weights {mib(r.selection.weights)}
            {r.selection.fits ? " — fits" : " — over"}
          </span>
        )}
      </div>
      <div class="bars" role="list">
        {r.limitPct !== null && <div class="limit" style={{ bottom: `${r.limitPct}%` }} title={`usable ${mib(r.limit)}`} />}
        {r.bars.map((b) => (
          <div
            key={b.node}
            role="listitem"
            class={`bar${b.over ? " over" : ""}${b.selected ? " selected" : ""}`}
            title={`#${b.node} ${b.classType}: forecast ${mib(b.forecast)} (weights ${mib(b.weights)}, activations ${mib(b.activations)})${b.tracked !== null ? `, tracked ${mib(b.tracked)}` : ""}`}
            aria-label={`node ${b.node} forecast ${mib(b.forecast)}${b.tracked !== null ? ` tracked ${mib(b.tracked)}` : ""}`}
          >
            <div class="forecast" style={{ height: `${b.forecastPct}%` }} />
            {b.trackedPct !== null && <div class="tracked" style={{ height: `${b.trackedPct}%` }} />}
            <span class="tag">#{b.node}</span>
          </div>
        ))}
      </div>
    </div>
  );
}

function Inspector(props: { timing?: RunTiming }) {
  if (!props.timing) return <div>Run a workflow to see where its time goes.</div>;
  const rows = inspectorRows(props.timing);
  return (
    <div aria-label="bottleneck inspector">
      <div class="legend">
        {Object.entries(PART_LABEL).map(([k, v]) => (
          <span key={k} class={`swatch ${k}`}>
            {v}
          </span>
        ))}
      </div>
      <table class="inspector">
        <tbody>
          {rows.map((r) => (
            <tr key={r.id} data-testid={`timing-${r.id}`}>
              <th scope="row">{r.label}</th>
              <td class="bar">
                <div class="stack">
                  {r.segments.map((s) => (
                    <span
                      key={s.part}
                      class={`seg ${s.part}`}
                      style={{ width: `${s.pct}%` }}
                      title={`${PART_LABEL[s.part]}: ${ms(s.ms)}`}
                    />
                  ))}
                </div>
              </td>
              <td>
                {ms(r.totalMs)}
                {r.bottleneck && <span class="bottleneck"> · {PART_LABEL[r.bottleneck]}</span>}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      <div class="note">Times are summed over worker threads; the run's wall time was {ms(props.timing.wall_ms)}.</div>
    </div>
  );
}

function ChangeList(props: { changes: Change[] | null }) {
  if (props.changes === null) return null;
  if (props.changes.length === 0)
    return (
      <div data-testid="optimize-changes" role="status">
        Already optimal for this profile: nothing changed.
      </div>
    );
  const show = (v: unknown) => (v === null || v === undefined ? "—" : String(v));
  return (
    <table data-testid="optimize-changes" role="status" class="changes">
      <thead>
        <tr>
          <th>what</th>
          <th>was</th>
          <th>now</th>
        </tr>
      </thead>
      <tbody>
        {props.changes.flatMap((c, i) => [
          <tr key={`${i}-c`}>
            <td>{c.node ? `#${c.node} ${c.field}` : c.field}</td>
            <td>{show(c.from)}</td>
            <td>{show(c.to)}</td>
          </tr>,
          <tr key={`${i}-r`} class="reason">
            <td colSpan={3}>{c.reason}</td>
          </tr>,
        ])}
      </tbody>
    </table>
  );
}

type OutputFile = { filename: string; subfolder: string; type: string };

function outputsOf(records: Record<string, unknown>): OutputFile[] {
  return Object.values(records).flatMap((o) => {
    const r = o as { images?: OutputFile[]; audio?: OutputFile[] };
    return [...(r.images ?? []), ...(r.audio ?? [])];
  });
}

function OutputView(props: { file: OutputFile }) {
  const [url, setUrl] = useState<string | undefined>(undefined);
  useEffect(() => {
    let live = true;
    let made: string | undefined;
    api
      .viewSrc(props.file)
      .then((u) => {
        if (u.startsWith("blob:")) made = u;
        if (live) setUrl(u);
      })
      .catch(() => live && setUrl(undefined));
    return () => {
      live = false;
      if (made) URL.revokeObjectURL(made);
    };
  }, [props.file.filename, props.file.subfolder, props.file.type]);
  const name = props.file.filename;
  if (/\.(webm|mp4|mkv|mov)$/i.test(name))
    return <video src={url} controls data-testid="output" aria-label={`output ${name}`} />;
  if (/\.(wav|flac|mp3|ogg|opus)$/i.test(name))
    return <audio src={url} controls data-testid="output" aria-label={`output ${name}`} />;
  return <img src={url} alt={`output ${name}`} data-testid="output" decoding="async" />;
}

function App() {
  const [info, setInfo] = useState<Record<string, NodeInfo>>({});
  const [template, setTemplateState] = useState<Template>(TEMPLATES[0]);
  const [tile, setTileState] = useState<number>(TEMPLATES[0].tile);
  const [wf, setWfState] = useState<ApiWorkflow>(TEMPLATES[0].workflow);
  // The latest edits, read by handlers: two edits before a re-render (a user, or a test,
  // typing faster than the page paints) must build on each other, and a button pressed right
  // after an edit must act on it, not on the state its render saw.
  const latest = useRef({ template: TEMPLATES[0], tile: TEMPLATES[0].tile, wf: TEMPLATES[0].workflow });
  const setTemplate = (t: Template) => {
    latest.current.template = t;
    setTemplateState(t);
  };
  const setTile = (t: number) => {
    latest.current.tile = t;
    setTileState(t);
  };
  const setWf = (w: ApiWorkflow) => {
    latest.current.wf = w;
    setWfState(w);
  };
  const [plan, setPlan] = useState<Plan | null>(null);
  const [planError, setPlanError] = useState<string | null>(null);
  const [changes, setChanges] = useState<Change[] | null>(null);
  const [connected, setConnected] = useState(false);
  const [, setVersion] = useState(0);
  const [filter, setFilter] = useState("");
  const [stats, setStats] = useState<Record<string, unknown> | null>(null);
  const [queue, setQueue] = useState<{ running: unknown[][]; pending: unknown[][] }>({ running: [], pending: [] });
  const [history, setHistory] = useState<Record<string, HistoryEntry>>({});
  const [current, setCurrent] = useState<string | null>(null);
  const [viewing, setViewing] = useState<{ id: string; outputs: Record<string, unknown> } | null>(null);
  const [step, setStep] = useState<string | null>(null);
  const [selected, setSelected] = useState<Set<string>>(new Set());
  const canvasRef = useRef<HTMLCanvasElement>(null);
  const videoRef = useRef<HTMLCanvasElement>(null);

  useEffect(() => {
    startDecoder();
    api.objectInfo().then(setInfo).catch(() => {});
    const sch = new Scheduler(() => setVersion(store.version), afterAWhile);
    video.onChange = () => sch.schedule();
    stepPreview = (url) => setStep((old) => (old && URL.revokeObjectURL(old), url));
    const close = connect(api.socketUrl(clientId), {
      onMessage: (m) => {
        apply(store, m);
        sch.schedule();
      },
      onPreview: (p) => {
        const k = p.meta.nova?.kind;
        if (k === "tile") void tiles.draw(p);
        else if (k === "video_frame" && p.meta.nova?.kind === "video_frame")
          void video.push(p.meta.prompt_id ?? "", p.meta.nova, p.image, p.mime);
        else if (k === "audio_chunk" && p.meta.nova?.kind === "audio_chunk") {
          audio.push(p.meta.prompt_id ?? "", p.meta.nova, p.image);
          sch.schedule();
        } else stepPreview(URL.createObjectURL(new Blob([p.image as BlobPart], { type: p.mime })));
      },
      onState: setConnected,
    });
    const poll = () => {
      api.stats().then(setStats).catch(() => {});
      api
        .queue()
        .then((q) => setQueue({ running: q.queue_running, pending: q.queue_pending }))
        .catch(() => {});
      api.history(10).then(setHistory).catch(() => {});
    };
    poll();
    const timer = setInterval(poll, 2000);
    return () => {
      close();
      clearInterval(timer);
    };
  }, []);
  useEffect(() => {
    tiles.canvas = canvasRef.current;
    video.canvas = videoRef.current;
  });

  const placed = useMemo(() => layout(wf), [wf]);
  const links = useMemo(() => edges(wf), [wf]);
  const job = current ? store.jobs.get(current) : undefined;
  const pos = new Map(placed.map((p) => [p.id, p]));

  const edited = (next: ApiWorkflow) => {
    setWf(next);
    setPlan(null);
    setChanges(null);
  };
  const change = (id: string, input: string, value: unknown) => {
    const cur = latest.current.wf;
    if (!cur[id]) return;
    const inputs = { ...cur[id].inputs, [input]: value };
    if (value === undefined) delete inputs[input];
    edited({ ...cur, [id]: { ...cur[id], inputs } });
  };
  const remove = (id: string) => {
    // The node goes, and so do the links that took its outputs.
    const next: ApiWorkflow = {};
    for (const [k, n] of Object.entries(latest.current.wf)) {
      if (k === id) continue;
      const inputs = Object.fromEntries(
        Object.entries(n.inputs).filter(([, v]) => !(Array.isArray(v) && v[0] === id && v.length === 2)),
      );
      next[k] = { ...n, inputs };
    }
    edited(next);
  };
  const add = (cls: string) => {
    const cur = latest.current.wf;
    const ids = Object.keys(cur).map(Number).filter(Number.isFinite);
    const id = String((ids.length ? Math.max(...ids) : 0) + 1);
    edited({ ...cur, [id]: { class_type: cls, inputs: defaults(info[cls]) } });
  };
  const toggle = (id: string) => {
    const next = new Set(selected);
    if (next.has(id)) next.delete(id);
    else next.add(id);
    setSelected(next);
  };
  const fail = (e: unknown) => setPlanError(e instanceof ApiError ? e.message : String(e));
  const doPlan = async () => {
    try {
      const { wf, template, tile } = latest.current;
      setPlan(await api.plan(wf, extraData(template, tile)));
      setPlanError(null);
    } catch (e) {
      setPlan(null);
      fail(e);
    }
  };
  const optimize = async () => {
    try {
      const { wf, template, tile } = latest.current;
      const o = await api.optimize(wf, extraData(template, tile));
      setWf(o.prompt);
      const t = Number(o.extra_data.nova?.tile_size);
      if (Number.isFinite(t) && t > 0) setTile(t);
      setPlan(o.after);
      setChanges(o.changes);
      setPlanError(null);
    } catch (e) {
      fail(e);
    }
  };
  const submit = async () => {
    // Web Audio wants a user gesture: this click, for workflows that make sound.
    const { wf, template, tile } = latest.current;
    if (Object.values(wf).some((n) => /Audio/.test(n.class_type))) audio.unlock();
    try {
      const r = await api.submit(wf, clientId, extraData(template, tile));
      setCurrent(r.prompt_id);
      setViewing(null);
      setPlanError(null);
      if (!plan) void doPlan();
    } catch (e) {
      fail(e);
    }
  };
  const save = () => {
    const a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([JSON.stringify(latest.current.wf, null, 2)], { type: "application/json" }));
    a.download = "workflow.json";
    a.click();
  };
  const load = async (f: File | undefined) => {
    if (!f) return;
    try {
      const v = JSON.parse(await f.text());
      edited(v.prompt && typeof v.prompt === "object" ? v.prompt : v);
    } catch (e) {
      setPlanError(`${f.name}: not a workflow (${String(e)})`);
    }
  };
  const outputs = viewing ? outputsOf(viewing.outputs) : job ? outputsOf(job.outputs) : [];
  const finalImage = job?.status === "success" ? outputsOf(job.outputs).find((f) => /\.(png|jpe?g|webp)$/i.test(f.filename)) : undefined;
  useEffect(() => {
    if (job && finalImage) {
      const promptId = job.promptId;
      void api.viewSrc(finalImage).then((u) => tiles.finish(promptId, u)).catch(() => {});
    }
  }, [job?.promptId, finalImage?.filename]);
  const device = (stats?.device ?? {}) as Record<string, unknown>;
  const width = Math.max(...placed.map((p) => p.x), 0) + COL_WIDTH + 40;
  const height = Math.max(...placed.map((p) => p.y), 0) + ROW_HEIGHT * 2;
  const idOf = (entry: unknown[]) => String(entry[1]);

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
              setSelected(new Set());
              edited(t.workflow);
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
              setChanges(null);
            }}
          />
        </label>
        <button onClick={doPlan}>Plan</button>
        <button onClick={optimize} title="Apply the planner's settings for this profile and show what changed">
          Auto-Optimize
        </button>
        <button onClick={submit}>Queue</button>
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
            selected={selected.has(p.id)}
            outputsOf={(c) => info[c]?.output}
            onSelect={toggle}
            onChange={change}
            onRemove={remove}
          />
        ))}
      </main>
      <aside class="side" aria-label="run">
        <section>
          <h2>Run</h2>
          {job ? (
            <div data-testid="job-status" data-job={job.promptId}>
              {job.status}
              {job.lifecycle && ` (${job.lifecycle})`} — {job.tiles.length} tile(s)
              {job.videoWindows > 0 && `, ${job.videoWindows} window(s)`}
              {job.audioChunks > 0 && `, ${job.audioChunks} chunk(s)`}
              {job.error && <div class="refused">{job.error.message}</div>}
              {(job.status === "running" || job.status === "queued") && (
                <button onClick={() => api.interrupt(job.promptId)}>Interrupt</button>
              )}
            </div>
          ) : (
            <div>No run yet.</div>
          )}
          <div class="preview" hidden={!!job && job.tiles.length === 0 && job.videoWindows + job.audioChunks > 0}>
            <canvas ref={canvasRef} aria-label="partial output" />
          </div>
          {step && <img src={step} alt="sampler step preview" data-testid="step-preview" decoding="async" />}
          <div class="preview" hidden={video.received === 0 || video.job !== current}>
            <canvas ref={videoRef} aria-label="video preview" data-testid="video-preview" data-played={video.played} />
          </div>
          {video.received > 0 && video.job === current && (
            <div data-testid="video-status">
              video: {video.played} of {video.received} frame(s) played
            </div>
          )}
          {audio.chunks > 0 && audio.job === current && (
            <div data-testid="audio-status">
              audio: {audio.chunks} chunk(s), {audio.queuedSeconds.toFixed(2)} s queued
            </div>
          )}
        </section>
        <section>
          <h2>Outputs{viewing && ` of ${viewing.id.slice(0, 8)}`}</h2>
          {outputs.map((f) => (
            <OutputView key={f.filename} file={f} />
          ))}
        </section>
        <section>
          <h2>Auto-Optimize</h2>
          <ChangeList changes={changes} />
        </section>
        <section>
          <h2>Bottleneck inspector</h2>
          <Inspector timing={job?.timing} />
        </section>
        <section>
          <h2>Queue</h2>
          <ul class="jobs" aria-label="queue">
            {queue.running.map((e) => (
              <li key={idOf(e)}>
                <button onClick={() => setCurrent(idOf(e))}>{idOf(e).slice(0, 8)}</button> running{" "}
                <button onClick={() => api.interrupt(idOf(e))}>Interrupt</button>
              </li>
            ))}
            {queue.pending.map((e) => (
              <li key={idOf(e)}>
                {idOf(e).slice(0, 8)} queued <button onClick={() => api.cancel([idOf(e)])}>Cancel</button>
              </li>
            ))}
            {queue.running.length + queue.pending.length === 0 && <li>empty</li>}
          </ul>
          <h2>History</h2>
          <ul class="jobs" aria-label="history">
            {Object.entries(history)
              .reverse()
              .map(([id, h]) => (
                <li key={id}>
                  <button
                    onClick={() => {
                      setViewing({ id, outputs: h.outputs });
                      if (store.jobs.has(id)) setCurrent(id);
                    }}
                  >
                    {id.slice(0, 8)}
                  </button>{" "}
                  {h.status.status_str}
                </li>
              ))}
          </ul>
        </section>
      </aside>
      <BudgetRail plan={plan} error={planError} job={job} selected={selected} />
    </div>
  );
}

const root = document.getElementById("app");
if (root) render(<App />, root);
