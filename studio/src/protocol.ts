// The service's wire formats, as the studio reads them: ComfyUI's WebSocket messages
// (`{"type", "data"}`), NOVA's events (schema v1: `{"v", "seq", "job", "t_ms", "type",
// "data"}`, negotiated with `nova_events`), and binary preview frames
// (`[u32 BE type][payload]`: type 1 `[u32 image type: 1 JPEG, 2 PNG][bytes]`, type 4
// `[u32 length][metadata JSON][bytes]`, whose metadata carries NOVA's tile, video-frame or
// audio-chunk fields under `nova`).

/** A text message from the socket. */
export interface Message {
  type: string;
  data: Record<string, unknown>;
  /** NOVA events only. */
  v?: number;
  seq?: number;
  job?: string;
  t_ms?: number;
}

export interface Rect {
  x: number;
  y: number;
  w: number;
  h: number;
}

/** What a type-4 frame's metadata says (NOVA adds `nova` for image tiles). */
export interface PreviewMeta {
  node_id?: string;
  prompt_id?: string;
  display_node_id?: string;
  image_type?: string;
  nova?: TileMeta | VideoFrameMeta | AudioChunkMeta;
}

/** An image tile of a partial output. */
export interface TileMeta {
  kind: "tile";
  source_node: string;
  tile: Rect;
  tile_index: number;
  tiles: number;
  width: number;
  height: number;
}

/** A final frame of a video window (JPEG). */
export interface VideoFrameMeta {
  kind: "video_frame";
  window: number;
  windows: number;
  /** Output frame index. */
  frame: number;
  frames_in_window: number;
  /** Seconds. */
  pts: number;
  fps: number;
}

/** A final audio chunk: interleaved little-endian 16-bit PCM (`image_type` audio/pcm-s16le). */
export interface AudioChunkMeta {
  kind: "audio_chunk";
  chunk: number;
  chunks: number;
  sample_start: number;
  sample_count: number;
  sample_rate: number;
  channels: number;
}

/** A decoded binary frame. */
export interface Preview {
  kind: 1 | 4;
  mime: string;
  meta: PreviewMeta;
  image: Uint8Array;
}

/** The feature flags the studio sends as its first message. */
export const FEATURE_FLAGS = {
  type: "feature_flags",
  data: { supports_preview_metadata: true, nova_events: true },
};

/** Parses a binary frame; `null` for types the studio does not show. */
export function parseBinary(buf: ArrayBuffer): Preview | null {
  if (buf.byteLength < 8) return null;
  const view = new DataView(buf);
  const kind = view.getUint32(0, false);
  if (kind === 1) {
    const imageType = view.getUint32(4, false);
    return {
      kind: 1,
      mime: imageType === 2 ? "image/png" : "image/jpeg",
      meta: {},
      image: new Uint8Array(buf, 8),
    };
  }
  if (kind === 4) {
    const n = view.getUint32(4, false);
    if (8 + n > buf.byteLength) return null;
    const text = new TextDecoder().decode(new Uint8Array(buf, 8, n));
    let meta: PreviewMeta;
    try {
      meta = JSON.parse(text) as PreviewMeta;
    } catch {
      return null;
    }
    return {
      kind: 4,
      mime: meta.image_type ?? "image/jpeg",
      meta,
      image: new Uint8Array(buf, 8 + n),
    };
  }
  return null;
}

/** Parses a text frame; `null` when it is not a message. */
export function parseText(text: string): Message | null {
  try {
    const v = JSON.parse(text) as Message;
    return typeof v?.type === "string" ? v : null;
  } catch {
    return null;
  }
}
