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
//! - Every message is built once and published once into the hub's shared log, whatever the
//!   number of clients; JPEG tiles, frames and PCM chunks are encoded only when some client
//!   negotiated them.
//! - Progress, previews and partial outputs are droppable for clients that fall behind;
//!   progress and previews are keyed per node, so such a client gets the newest of each
//!   rather than a stale one; everything else is a result and is never dropped (see
//!   [`super::hub`]).

use super::comfy;
use super::hub::{Class, Hub, Out, To};
use axum::body::Bytes;
use axum::extract::ws::Utf8Bytes;
use nova_dataflow::{Event, EventKind, Value};
use serde_json::{json, Value as Json};
use std::collections::HashMap;
use std::sync::{mpsc, Arc, Mutex};

/// Which job a message belongs to.
#[derive(Debug)]
pub(crate) struct JobTag {
    pub prompt_id: String,
    pub client_id: Option<String>,
}

impl JobTag {
    fn cid(&self) -> Option<Arc<str>> {
        self.client_id.as_deref().map(Arc::from)
    }

    /// The job's WebSocket audience.
    fn job(&self) -> To {
        To::Job(self.cid())
    }

    /// Those of them that negotiated NOVA's events.
    fn nova(&self) -> To {
        To::JobNova(self.cid())
    }

    /// Those that take metadata frames.
    fn frames(&self) -> To {
        To::JobNovaMeta(self.cid())
    }
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

/// A key for messages where only the newest matters to a reader that is behind: the
/// progress of one node of one job, or its preview.
fn latest_key(prompt_id: &str, node: &str, what: &str) -> Class {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (prompt_id, node, what).hash(&mut h);
    Class::Latest(h.finish())
}

fn relay(hub: Arc<Hub>, rx: mpsc::Receiver<Msg>) {
    let mut jobs: HashMap<String, JobState> = HashMap::new();
    for m in rx {
        match m {
            Msg::Status(n) => {
                hub.publish(
                    To::AllWs,
                    Class::Result,
                    Out::json(&comfy::status(n, None)),
                    None,
                );
            }
            Msg::Deliver(tag, msgs) => {
                for m in &msgs {
                    hub.publish(tag.job(), Class::Result, Out::json(m), None);
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
                hub.publish(tag.job(), Class::Result, Out::json(&last), None);
                hub.publish(
                    To::AllWs,
                    Class::Result,
                    Out::json(&comfy::status(queue_remaining, None)),
                    None,
                );
                hub.publish(
                    tag.job(),
                    Class::Result,
                    Out::json(&comfy::executing(&tag.prompt_id, None)),
                    None,
                );
                if hub.has_sse() {
                    let line = st.last_event.unwrap_or_else(|| fallback.to_string());
                    hub.publish(
                        To::Sse(tag.prompt_id.as_str().into()),
                        Class::Result,
                        Out::Text(line.into()),
                        None,
                    );
                }
            }
        }
    }
}

fn on_event(hub: &Hub, tag: &JobTag, st: &mut JobState, ev: &Event) {
    let class = if droppable(&ev.kind) {
        Class::Droppable
    } else {
        Class::Result
    };
    // SSE: NOVA's schema, every event; the final one waits for the history.
    if matches!(
        ev.kind,
        EventKind::Success { .. } | EventKind::Error { .. } | EventKind::Interrupted { .. }
    ) {
        st.last_event = Some(ev.to_json_line());
        return;
    }
    let line: Utf8Bytes = ev.to_json_line().into();
    if hub.has_sse() {
        hub.publish(
            To::Sse(tag.prompt_id.as_str().into()),
            class,
            Out::Text(line.clone()),
            None,
        );
    }
    let pid = tag.prompt_id.as_str();
    // ComfyUI's messages.
    let comfy_msg = match &ev.kind {
        EventKind::NodeStart { node, .. } => Some((comfy::executing(pid, Some(node)), class)),
        EventKind::Chunk { node, chunks, .. } => {
            let d = st.done.entry(node.clone()).or_default();
            *d += 1;
            Some((
                comfy::progress(pid, node, *d, *chunks as u64),
                latest_key(pid, node, "progress"),
            ))
        }
        EventKind::Step {
            node, step, steps, ..
        } => Some((
            comfy::progress(pid, node, *step as u64, *steps as u64),
            latest_key(pid, node, "progress"),
        )),
        EventKind::Executed { node, output } => Some((comfy::executed(pid, node, output), class)),
        _ => None,
    };
    // NOVA's additive events go before ComfyUI's progress for the same fact, so a client
    // sees the telemetry first; ComfyUI clients never see them.
    if !comfy_native(&ev.kind) {
        hub.publish(tag.nova(), class, Out::Text(line), None);
    }
    if let Some((m, class)) = comfy_msg {
        hub.publish(tag.job(), class, Out::json(&m), None);
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
            hub.publish(
                tag.job(),
                latest_key(pid, node, "preview"),
                with_meta,
                Some(plain),
            );
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
            if !hub.wants_frames() {
                return;
            }
            let Some(jpeg) = encode_jpeg(v, usize::MAX) else {
                return;
            };
            let nova = json!({ "kind": "tile", "source_node": source_node, "tile": tile,
                               "tile_index": tile_index, "tiles": tiles, "width": width, "height": height });
            send_frame(
                hub,
                tag,
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
            if !hub.wants_frames() {
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
                    tag,
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
            if !hub.wants_frames() {
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
                tag,
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

/// A type-4 frame of `meta` and `payload` for the job's clients that take metadata frames
/// (droppable).
fn send_frame(hub: &Hub, tag: &JobTag, meta: Json, payload: &[u8]) {
    let out = Out::Binary(Bytes::from(comfy::preview_frame_with_metadata(
        &meta, payload,
    )));
    hub.publish(tag.frames(), Class::Droppable, out, None);
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
