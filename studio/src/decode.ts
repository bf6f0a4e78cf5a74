// Image decoding for previews, on a worker (see decode.worker.ts); falls back to the page's
// own createImageBitmap where workers are unavailable.

type Pending = { ok: (b: ImageBitmap) => void; fail: (e: Error) => void };

let worker: Worker | null | undefined;
const pending = new Map<number, Pending>();
let next = 0;

function getWorker(): Worker | null {
  if (worker !== undefined) return worker;
  try {
    worker = new Worker(new URL("./decode.worker.ts", import.meta.url), { type: "module" });
    worker.onmessage = (e: MessageEvent<{ id: number; bmp?: ImageBitmap; error?: string }>) => {
      const p = pending.get(e.data.id);
      pending.delete(e.data.id);
      if (!p) return;
      if (e.data.bmp) p.ok(e.data.bmp);
      else p.fail(new Error(e.data.error ?? "decode failed"));
    };
  } catch {
    worker = null;
  }
  return worker;
}

/** Starts the worker now (at page start), so the first tile does not pay for it. */
export function startDecoder(): void {
  getWorker();
}

/** Decodes `bytes` (a view; copied before it is sent) to a bitmap. */
export function decode(bytes: Uint8Array, mime: string): Promise<ImageBitmap> {
  const w = getWorker();
  if (!w) return createImageBitmap(new Blob([bytes as BlobPart], { type: mime }));
  const copy = bytes.slice().buffer;
  const id = next++;
  return new Promise((ok, fail) => {
    pending.set(id, { ok, fail });
    w.postMessage({ id, bytes: copy, mime }, [copy]);
  });
}
