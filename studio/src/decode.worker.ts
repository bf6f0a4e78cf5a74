// Decodes images off the page's main thread: creating a Blob and starting a decode costs the
// main thread about a millisecond per image in Chromium, too much at a thousand tiles a run.
// Receives `{id, bytes, mime}` (bytes transferred), answers `{id, bmp}` (bitmap transferred)
// or `{id, error}`.

interface Request {
  id: number;
  bytes: ArrayBuffer;
  mime: string;
}

self.onmessage = async (e: MessageEvent<Request>) => {
  const { id, bytes, mime } = e.data;
  try {
    const bmp = await createImageBitmap(new Blob([bytes], { type: mime }));
    (self as unknown as Worker).postMessage({ id, bmp }, [bmp]);
  } catch (err) {
    (self as unknown as Worker).postMessage({ id, error: String(err) });
  }
};
