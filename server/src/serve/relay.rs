//! The relay: turns each job's engine events into client messages — ComfyUI's for every
//! WebSocket client, NOVA's additive events for those that negotiated them, NOVA's schema for
//! SSE subscribers — on one thread of its own.
//!
//! Invariants:
//! - The engine's event sink only appends to the relay's channel: encoding previews and fanning
//!   out to clients never runs on the engine's driver thread.
//! - A job's end (`execution_success`/`_error`/`_interrupted`, then `status`, then
//!   `executing: null`, as ComfyUI orders them) is relayed only after its history entry has
//!   been committed, so a client that reacts by reading `/history/{id}` finds it.
//! - Progress, previews and partial outputs are droppable for slow clients; everything else
//!   is not (see [`super::hub`]).

use super::comfy;
use super::hub::{Audience, Client, Hub, Out};
use axum::body::Bytes;
use nova_dataflow::{Event, EventKind, Value};
use serde_json::{json, Value as Json};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};

/// Which job a message belongs to.
#[derive(Debug)]
pub(crate) struct JobTag {
    pub prompt_id: String,
    pub client_id: Option<String>,
}

enum Msg {
    Event(Arc<JobTag>, Event),
    /// ComfyUI messages built elsewhere (a job's start), for the job's audience.
    Deliver(Arc<JobTag>, Vec<Json>),
    End {
        tag: Arc<JobTag>,
        last: Json,
        queue_remaining: u64,
        /// For SSE, when the engine never ran (so sent no final event of its own).
        fallback: Json,
    },
    Status(u64),
}

/// The relay's inbox. Cheap to share.
pub(crate) struct Relay {
    tx: Mutex<mpsc::Sender<Msg>>,
}

impl Relay {
    /// Starts the relay thread.
    pub(crate) fn start(hub: Arc<Hub>) -> std::io::Result<Relay> {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("nova-relay".into())
            .spawn(move || relay(hub, rx))?;
        Ok(Relay { tx: Mutex::new(tx) })
    }

    fn send(&self, m: Msg) {
        let _ = self.tx.lock().unwrap_or_else(|p| p.into_inner()).send(m);
    }

    /// An engine event of a job.
    pub(crate) fn event(&self, tag: &Arc<JobTag>, ev: Event) {
        self.send(Msg::Event(tag.clone(), ev))
    }

    pub(crate) fn deliver(&self, tag: &Arc<JobTag>, msgs: Vec<Json>) {
        self.send(Msg::Deliver(tag.clone(), msgs))
    }

    /// A job ended; its history is committed.
    pub(crate) fn end(&self, tag: &Arc<JobTag>, last: Json, queue_remaining: u64, fallback: Json) {
        self.send(Msg::End {
            tag: tag.clone(),
            last,
            queue_remaining,
            fallback,
        })
    }

    /// The queue changed: `status` to everyone.
    pub(crate) fn status(&self, queue_remaining: u64) {
        self.send(Msg::Status(queue_remaining))
    }
}

/// What the relay remembers of a running job.
#[derive(Default)]
struct JobState {
    done: HashMap<String, u64>,
    /// The engine's final event, held for SSE until the history is committed.
    last_event: Option<String>,
}

/// Whether a slow client may miss this event.
fn droppable(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Chunk { .. }
            | EventKind::Step { .. }
            | EventKind::Preview { .. }
            | EventKind::PartialImage { .. }
            | EventKind::PartialVideo { .. }
            | EventKind::PartialAudio { .. }
    )
}

/// Whether ComfyUI has a message of its own for this event (then NOVA's form is not sent to
/// WebSocket clients, so no `type` arrives twice).
fn comfy_native(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Executed { .. }
            | EventKind::Success { .. }
            | EventKind::Error { .. }
            | EventKind::Interrupted { .. }
    )
}

fn relay(hub: Arc<Hub>, rx: mpsc::Receiver<Msg>) {
    let mut jobs: HashMap<String, JobState> = HashMap::new();
    for m in rx {
        match m {
            Msg::Status(n) => {
                let t = hub.ws_targets(Audience::All);
                hub.send_all(&t, &Out::json(&comfy::status(n, None)), false);
            }
            Msg::Deliver(tag, msgs) => {
                let t = hub.ws_targets(Audience::Job(tag.client_id.as_deref()));
                for m in &msgs {
                    hub.send_all(&t, &Out::json(m), false);
                }
            }
            Msg::Event(tag, ev) => {
                let st = jobs.entry(tag.prompt_id.clone()).or_default();
                on_event(&hub, &tag, st, &ev);
            }
            Msg::End {
                tag,
                last,
                queue_remaining,
                fallback,
            } => {
                let st = jobs.remove(&tag.prompt_id).unwrap_or_default();
                let t = hub.ws_targets(Audience::Job(tag.client_id.as_deref()));
                hub.send_all(&t, &Out::json(&last), false);
                let all = hub.ws_targets(Audience::All);
                hub.send_all(
                    &all,
                    &Out::json(&comfy::status(queue_remaining, None)),
                    false,
                );
                hub.send_all(
                    &t,
                    &Out::json(&comfy::executing(&tag.prompt_id, None)),
                    false,
                );
                let line = st.last_event.unwrap_or_else(|| fallback.to_string());
                let sse = hub.sse_targets(&tag.prompt_id);
                hub.send_all(&sse, &Out::Text(line.into()), false);
            }
        }
    }
}

fn on_event(hub: &Hub, tag: &JobTag, st: &mut JobState, ev: &Event) {
    let drop_ok = droppable(&ev.kind);
    let line = ev.to_json_line();
    // SSE: NOVA's schema, every event; the final one waits for the history.
    if matches!(
        ev.kind,
        EventKind::Success { .. } | EventKind::Error { .. } | EventKind::Interrupted { .. }
    ) {
        st.last_event = Some(line);
        return;
    }
    let sse = hub.sse_targets(&tag.prompt_id);
    if !sse.is_empty() {
        hub.send_all(&sse, &Out::Text(line.clone().into()), drop_ok);
    }
    let targets = hub.ws_targets(Audience::Job(tag.client_id.as_deref()));
    if targets.is_empty() {
        return;
    }
    let pid = tag.prompt_id.as_str();
    // ComfyUI's messages.
    let comfy_msg = match &ev.kind {
        EventKind::NodeStart { node, .. } => Some(comfy::executing(pid, Some(node))),
        EventKind::Chunk { node, chunks, .. } => {
            let d = st.done.entry(node.clone()).or_default();
            *d += 1;
            Some(comfy::progress(pid, node, *d, *chunks as u64))
        }
        EventKind::Step {
            node, step, steps, ..
        } => Some(comfy::progress(pid, node, *step as u64, *steps as u64)),
        EventKind::Executed { node, output } => Some(comfy::executed(pid, node, output)),
        _ => None,
    };
    let nova: Vec<&Arc<Client>> = targets
        .iter()
        .filter(|c| c.nova_events.load(Ordering::Relaxed))
        .collect();
    // NOVA's additive events go before ComfyUI's progress for the same fact, so a client
    // sees the telemetry first; ComfyUI clients never see them.
    if !comfy_native(&ev.kind) && !nova.is_empty() {
        let out = Out::Text(line.into());
        for c in &nova {
            hub.send(c, out.clone(), drop_ok);
        }
    }
    if let Some(m) = comfy_msg {
        hub.send_all(&targets, &Out::json(&m), drop_ok);
    }
    // Binary previews.
    match (&ev.kind, &ev.attachment) {
        (EventKind::Preview { node, .. }, Some(v)) => {
            let Some(jpeg) = encode_jpeg(v, 512) else {
                return;
            };
            let meta = frame_meta(node, pid, "image/jpeg", None);
            let with_meta = Out::Binary(Bytes::from(comfy::preview_frame_with_metadata(
                &meta, &jpeg,
            )));
            let plain = Out::Binary(Bytes::from(comfy::preview_frame(&jpeg, true)));
            for c in &targets {
                let out = if c.preview_metadata.load(Ordering::Relaxed) {
                    with_meta.clone()
                } else {
                    plain.clone()
                };
                hub.send(c, out, true);
            }
        }
        (
            EventKind::PartialImage {
                node,
                source_node,
                tile,
                tile_index,
                tiles,
                width,
                height,
            },
            Some(v),
        ) => {
            // Tiles go to clients that asked for NOVA's events and metadata frames only: a
            // ComfyUI client would take a tile for a whole preview.
            let want = metadata_clients(&nova);
            if want.is_empty() {
                return;
            }
            let Some(jpeg) = encode_jpeg(v, usize::MAX) else {
                return;
            };
            let nova = json!({ "kind": "tile", "source_node": source_node, "tile": tile,
                               "tile_index": tile_index, "tiles": tiles, "width": width, "height": height });
            send_frame(
                hub,
                &want,
                frame_meta(node, pid, "image/jpeg", Some(nova)),
                &jpeg,
            );
        }
        (
            EventKind::PartialVideo {
                node,
                window,
                windows,
                frame_start,
                pts_start,
                pts_end,
                fps,
                ..
            },
            Some(v),
        ) => {
            // Each final frame of the window as a JPEG (at most 512 px), for players.
            let want = metadata_clients(&nova);
            if want.is_empty() {
                return;
            }
            let Value::Image(t) = v else { return };
            let frames = t.tensor().dims().first().copied().unwrap_or(0);
            for i in 0..frames {
                let Some(jpeg) = encode_jpeg_at(v, i, 512) else {
                    return;
                };
                let pts = if frames > 1 {
                    pts_start + (pts_end - pts_start) * i as f64 / (frames - 1) as f64
                } else {
                    *pts_start
                };
                let nova = json!({ "kind": "video_frame", "window": window, "windows": windows,
                                   "frame": frame_start + i as u64, "frames_in_window": frames,
                                   "pts": pts, "fps": fps });
                send_frame(
                    hub,
                    &want,
                    frame_meta(node, pid, "image/jpeg", Some(nova)),
                    &jpeg,
                );
            }
        }
        (
            EventKind::PartialAudio {
                node,
                chunk,
                chunks,
                sample_start,
                sample_rate,
                channels,
                ..
            },
            Some(Value::Audio(a)),
        ) => {
            // The chunk's samples as interleaved 16-bit PCM, for players.
            let want = metadata_clients(&nova);
            if want.is_empty() {
                return;
            }
            let Ok(planar) = a.read_all() else { return };
            let pcm = interleave_s16le(&planar);
            let frames = planar.first().map_or(0, Vec::len);
            let nova = json!({ "kind": "audio_chunk", "chunk": chunk, "chunks": chunks,
                               "sample_start": sample_start, "sample_count": frames,
                               "sample_rate": sample_rate, "channels": channels });
            send_frame(
                hub,
                &want,
                frame_meta(node, pid, "audio/pcm-s16le", Some(nova)),
                &pcm,
            );
        }
        _ => {}
    }
}

/// ComfyUI's metadata of a type-4 frame, with NOVA's fields under `nova` when given.
fn frame_meta(node: &str, pid: &str, image_type: &str, nova: Option<Json>) -> Json {
    let mut m = json!({
        "node_id": node, "prompt_id": pid, "display_node_id": node,
        "parent_node_id": null, "real_node_id": node, "image_type": image_type,
    });
    if let Some(n) = nova {
        m["nova"] = n;
    }
    m
}

/// A type-4 frame of `meta` and `payload`, to each of `clients` (droppable).
fn send_frame(hub: &Hub, clients: &[&Arc<Client>], meta: Json, payload: &[u8]) {
    let out = Out::Binary(Bytes::from(comfy::preview_frame_with_metadata(
        &meta, payload,
    )));
    for c in clients {
        hub.send(c, out.clone(), true);
    }
}

/// Clients that asked for NOVA's events and for metadata frames: the only ones that can tell
/// a tile, a video frame or an audio chunk from a whole preview.
fn metadata_clients<'a>(nova: &[&'a Arc<Client>]) -> Vec<&'a Arc<Client>> {
    nova.iter()
        .filter(|c| c.preview_metadata.load(Ordering::Relaxed))
        .copied()
        .collect()
}

/// Planar f32 samples in [-1, 1] as interleaved little-endian 16-bit PCM.
fn interleave_s16le(planar: &[Vec<f32>]) -> Vec<u8> {
    let frames = planar.first().map_or(0, Vec::len);
    let mut out = Vec::with_capacity(frames * planar.len() * 2);
    for i in 0..frames {
        for ch in planar {
            let x = ch.get(i).copied().unwrap_or(0.0).clamp(-1.0, 1.0);
            out.extend_from_slice(&((x * 32767.0).round() as i16).to_le_bytes());
        }
    }
    out
}

/// The first image of an IMAGE value as JPEG, scaled to fit `max_side`.
pub(crate) fn encode_jpeg(v: &Value, max_side: usize) -> Option<Vec<u8>> {
    encode_jpeg_at(v, 0, max_side)
}

/// Image `index` of an IMAGE batch (a video window's frame) as JPEG, scaled to fit `max_side`.
pub(crate) fn encode_jpeg_at(v: &Value, index: usize, max_side: usize) -> Option<Vec<u8>> {
    let Value::Image(t) = v else { return None };
    let t = t.tensor();
    let dims = t.dims();
    if dims.len() != 4 || index >= dims[0] {
        return None;
    }
    let (h, w, c) = (dims[1], dims[2], dims[3]);
    let data: Vec<f32> = t
        .get(index)
        .ok()?
        .flatten_all()
        .ok()?
        .to_vec1::<f32>()
        .ok()?;
    let mut rgb = Vec::with_capacity(w * h * 3);
    for px in data.chunks(c) {
        for k in 0..3 {
            let x = px[k.min(c - 1)];
            rgb.push((x * 255.0).clamp(0.0, 255.0) as u8);
        }
    }
    let mut img = image::RgbImage::from_raw(w as u32, h as u32, rgb)?;
    if w.max(h) > max_side {
        let s = max_side as f64 / w.max(h) as f64;
        let (nw, nh) = (
            ((w as f64 * s).round() as u32).max(1),
            ((h as f64 * s).round() as u32).max(1),
        );
        img = image::imageops::resize(&img, nw, nh, image::imageops::FilterType::Triangle);
    }
    let mut out = Vec::new();
    let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90);
    img.write_with_encoder(enc).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcm_is_interleaved_little_endian_and_clamped() {
        let pcm = interleave_s16le(&[vec![0.0, 1.0, -2.0], vec![0.5, -1.0, 0.25]]);
        let v: Vec<i16> = pcm
            .chunks(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]))
            .collect();
        assert_eq!(v, [0, 16384, 32767, -32767, -32767, 8192]);
    }
}
