// The studio's socket: negotiates NOVA's events and metadata frames, feeds every text
// message to the store and every preview to `onPreview`, and reconnects with backoff (the
// service re-sends `status` and, for a running job, `executing` on connect).

import { FEATURE_FLAGS, parseBinary, parseText, type Message, type Preview } from "./protocol";

export interface SocketHandlers {
  onMessage: (m: Message) => void;
  onPreview: (p: Preview) => void;
  onState: (connected: boolean) => void;
}

export function connect(url: string, h: SocketHandlers): () => void {
  let ws: WebSocket | null = null;
  let closed = false;
  let wait = 250;
  const open = () => {
    ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    ws.onopen = () => {
      wait = 250;
      ws?.send(JSON.stringify(FEATURE_FLAGS));
      h.onState(true);
    };
    ws.onmessage = (ev) => {
      if (typeof ev.data === "string") {
        const m = parseText(ev.data);
        if (m) h.onMessage(m);
      } else {
        const p = parseBinary(ev.data as ArrayBuffer);
        if (p) h.onPreview(p);
      }
    };
    ws.onclose = () => {
      h.onState(false);
      if (!closed) {
        setTimeout(open, wait);
        wait = Math.min(wait * 2, 5000);
      }
    };
  };
  open();
  return () => {
    closed = true;
    ws?.close();
  };
}
