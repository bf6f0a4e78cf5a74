//! The VideoEngine: a video stream cut into frame windows that flow through the dataflow as
//! timestamped records, processed in parallel, and stitched back in order into a sink.
//!
//! - [`plan_windows`] (pure): windows of at most `window` source frames, consecutive ones
//!   sharing `overlap` frames (at least what the operator chain needs as temporal context),
//!   each with the output frames it yields after the chain.
//! - [`VideoWindows`] implements `ChunkedOp` for a node that consumes a video (a save, a
//!   conversion to an `IMAGE` batch): *split* decodes the window's frames in order (one
//!   decoder per run, frames shared with the previous window kept, never the whole clip),
//!   *process* runs the chain on one window (or replays it from the [`TemporalCache`] when
//!   the same frames went through the same chain before), and the merger stitches windows
//!   in order into a [`FrameSink`], cross-fading the frames consecutive windows share.
//!
//! Invariants: a window's output is a pure function of its source frames and the chain, so
//! the order and worker windows are processed on never changes the result; with no overlap
//! (per-frame chains) the stitched output equals running the chain frame by frame exactly,
//! and frames consecutive windows compute identically pass the cross-fade unchanged (the fade
//! is `a + (b - a)·w`, which is `a` when `a == b`). *split* and the merger run on the node's
//! owner worker with the same operator instance, so the merger sees the stream *split* was
//! given.

use candle_core::{Device, Tensor};
use nova_dataflow::{
    Accountant, AudioStream, ChunkMemory, ChunkRegion, ChunkSize, ChunkSpec, ChunkedOp, Frame,
    FrameCursor, Lease, MemoryFrames, Merger, NodeError, NodeOutput, Value, ValueInfo, VideoShape,
    VideoStream,
};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, OnceLock};

/// Windows of at most `window` source frames, consecutive ones sharing `overlap` frames (at
/// least the chain's own need, and less than the window). Pure.
pub fn plan_windows(shape: &VideoShape, window: usize, overlap: usize) -> Vec<ChunkSpec> {
    let total = shape.source_frames;
    let window = window.max(1) as u64;
    let overlap = (overlap as u64).max(shape.overlap as u64).min(window - 1);
    let mut starts = Vec::new();
    let mut start = 0u64;
    while start < total {
        starts.push(start);
        if start + window >= total {
            break;
        }
        start += window - overlap;
    }
    let count = starts.len() as u32;
    let out_total = shape.out_frames(total);
    starts
        .iter()
        .enumerate()
        .map(|(k, &s)| {
            let n = window.min(total - s);
            let out_next = starts
                .get(k + 1)
                .map_or(out_total, |&next| shape.out_index(next));
            ChunkSpec {
                index: k as u32,
                count,
                region: ChunkRegion::Frames {
                    start: s,
                    count: n,
                    out_start: shape.out_index(s),
                    out_count: shape.out_frames(n),
                    out_next,
                },
            }
        })
        .collect()
}

/// Where stitched frames go, in order: an encoder, a frame buffer.
pub trait FrameSink: Send {
    /// One output frame `[1, h, w, 3]` and its presentation time.
    fn write(&mut self, frame: &Tensor, pts: f64) -> Result<(), NodeError>;
    /// Called once after the last frame: the node's outputs.
    fn finish(self: Box<Self>) -> Result<NodeOutput, NodeError>;
}

/// Makes the sink of one run from the stream's shape and its audio track.
pub type SinkFactory = Arc<
    dyn Fn(&VideoShape, Option<&AudioStream>) -> Result<Box<dyn FrameSink>, NodeError>
        + Send
        + Sync,
>;

/// Processed windows kept for reuse, by content: the source frames' identity and the chain's.
/// Bounded in bytes; least recently used entries go first.
///
/// The cache lives within the device budget: a run that uses it first
/// [`attaches`](TemporalCache::attach) with its accountant and the memory its plan leaves spare;
/// the cache then keeps at most that much, each entry leased from that run's accountant (so
/// the run's tracked peak includes it, and a run with no spare memory caches nothing).
pub struct TemporalCache {
    inner: Mutex<CacheInner>,
}

struct Cached {
    frames: Tensor,
    pts: Vec<f64>,
    bytes: u64,
    /// The device memory this entry holds, on the accountant of the run that holds it.
    lease: Option<Lease>,
}

struct CacheInner {
    capacity: u64,
    bytes: u64,
    map: HashMap<u64, Cached>,
    order: VecDeque<u64>,
    /// The accountant of the run the cache works for now, and what it may hold.
    run: Option<(Arc<Accountant>, u64)>,
}

impl CacheInner {
    fn evict_oldest(&mut self) -> bool {
        let Some(old) = self.order.pop_front() else {
            return false;
        };
        if let Some(c) = self.map.remove(&old) {
            self.bytes -= c.bytes;
        }
        true
    }

    /// The most the cache may hold now.
    fn limit(&self) -> u64 {
        self.run
            .as_ref()
            .map_or(self.capacity, |(_, spare)| self.capacity.min(*spare))
    }
}

impl TemporalCache {
    /// An empty cache of at most `capacity` bytes.
    pub fn new(capacity: u64) -> TemporalCache {
        TemporalCache {
            inner: Mutex::new(CacheInner {
                capacity,
                bytes: 0,
                map: HashMap::new(),
                order: VecDeque::new(),
                run: None,
            }),
        }
    }

    /// The process's cache: `NOVA_TEMPORAL_CACHE_MB` megabytes (default 512; 0 turns it off).
    pub fn global() -> &'static TemporalCache {
        static CACHE: OnceLock<TemporalCache> = OnceLock::new();
        CACHE.get_or_init(|| {
            let mb = std::env::var("NOVA_TEMPORAL_CACHE_MB")
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(512);
            TemporalCache::new(mb << 20)
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Works for a run now: keeps the newest entries that fit in `spare`, moving their
    /// leases to `acct` (those that do not fit the accountant go), and evicts the rest.
    pub fn attach(&self, acct: &Arc<Accountant>, spare: u64) {
        let mut c = self.lock();
        if c.run
            .as_ref()
            .is_some_and(|(a, s)| Arc::ptr_eq(a, acct) && *s == spare)
        {
            return;
        }
        c.run = Some((acct.clone(), spare));
        let limit = c.limit();
        while c.bytes > limit && c.evict_oldest() {}
        let keys: Vec<u64> = c.order.iter().rev().copied().collect();
        for k in keys {
            let Some(e) = c.map.get_mut(&k) else { continue };
            if e.lease.as_ref().is_some_and(|l| l.of(acct)) {
                continue;
            }
            e.lease = None;
            match acct.try_lease(e.bytes, "temporal cache") {
                Ok(l) => e.lease = Some(l),
                Err(_) => {
                    if let Some(gone) = c.map.remove(&k) {
                        c.bytes -= gone.bytes;
                    }
                    c.order.retain(|x| *x != k);
                }
            }
        }
    }

    /// The processed window stored under `key`, if any.
    pub fn get(&self, key: u64) -> Option<(Tensor, Vec<f64>)> {
        let mut c = self.lock();
        let hit = c.map.get(&key).map(|e| (e.frames.clone(), e.pts.clone()));
        if hit.is_some() {
            c.order.retain(|k| *k != key);
            c.order.push_back(key);
        }
        hit
    }

    /// Stores a processed window, evicting the least recently used past what the cache may
    /// hold; nothing is stored when the run's accountant has no room for it.
    pub fn put(&self, key: u64, frames: &Tensor, pts: &[f64]) {
        let bytes = (frames.elem_count() * frames.dtype().size_in_bytes()) as u64;
        let mut c = self.lock();
        let limit = c.limit();
        if bytes > limit || c.map.contains_key(&key) {
            return;
        }
        while c.bytes + bytes > limit && c.evict_oldest() {}
        let lease = match &c.run {
            Some((acct, _)) => match acct.try_lease(bytes, "temporal cache") {
                Ok(l) => Some(l),
                Err(_) => return,
            },
            None => None,
        };
        c.bytes += bytes;
        c.map.insert(
            key,
            Cached {
                frames: frames.clone(),
                pts: pts.to_vec(),
                bytes,
                lease,
            },
        );
        c.order.push_back(key);
    }

    /// Evicts the least recently used entries until at most `bytes` are held: what a job
    /// that does not use the cache needs of the memory it holds (the service calls this before
    /// it starts any job, with what that job's plan leaves free).
    pub fn shrink_to(&self, bytes: u64) {
        let mut c = self.lock();
        while c.bytes > bytes && c.evict_oldest() {}
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }
}

/// The decoder of one run, positioned after the frames it gave.
struct Decoder {
    cursor: Box<dyn FrameCursor>,
    /// Source index of the next frame the cursor gives.
    next: u64,
    /// Frames already decoded that the next window shares.
    carry: Vec<(u64, Frame)>,
    ended: bool,
}

/// What a sink holds for the whole run, by output shape.
pub type SinkMemory = Arc<dyn Fn(&VideoShape) -> u64 + Send + Sync>;

/// The chunked form of a node that consumes a video window by window. See the module docs.
pub struct VideoWindows {
    sink: SinkFactory,
    /// What the sink holds for the whole run (an encoder's buffers), by output shape.
    sink_memory: Option<SinkMemory>,
    cache: Option<&'static TemporalCache>,
    /// Frames consecutive windows share at least (cross-faded), beyond the chain's own need.
    min_overlap: usize,
    /// The stream this run consumes (set by *split*, read by the merger).
    stream: Mutex<Option<VideoStream>>,
    decoder: Mutex<Option<Decoder>>,
}

impl VideoWindows {
    /// An operator writing stitched frames into sinks made by `sink`; processed windows are
    /// reused through the process's temporal cache.
    pub fn new(sink: SinkFactory) -> VideoWindows {
        VideoWindows {
            sink,
            sink_memory: None,
            cache: Some(TemporalCache::global()),
            min_overlap: 0,
            stream: Mutex::new(None),
            decoder: Mutex::new(None),
        }
    }

    /// The same without the temporal cache.
    pub fn uncached(sink: SinkFactory) -> VideoWindows {
        VideoWindows {
            cache: None,
            ..VideoWindows::new(sink)
        }
    }

    /// The same with a sink that holds `memory(output shape)` bytes while it runs (an
    /// encoder's frame buffers), which the plan and the accountant then count.
    pub fn with_sink_memory(
        mut self,
        memory: impl Fn(&VideoShape) -> u64 + Send + Sync + 'static,
    ) -> VideoWindows {
        self.sink_memory = Some(Arc::new(memory));
        self
    }

    /// The same with consecutive windows sharing at least `overlap` frames, cross-faded.
    pub fn with_overlap(mut self, overlap: usize) -> VideoWindows {
        self.min_overlap = overlap;
        self
    }

    /// Runs a whole stream through windows of `window` frames on this thread, into a sink made
    /// by `sink` (library use and nodes that run whole). The same path as the dataflow's.
    pub fn run_whole(
        stream: &VideoStream,
        window: usize,
        sink: SinkFactory,
    ) -> Result<NodeOutput, NodeError> {
        VideoWindows::new(sink).run(stream, window)
    }

    /// Runs a whole stream through this operator's windows on this thread.
    pub fn run(&self, stream: &VideoStream, window: usize) -> Result<NodeOutput, NodeError> {
        let shape = stream.shape();
        let input = Value::Video(stream.clone());
        let info = ValueInfo::Video(shape);
        let specs = self.plan(&info, ChunkSize::Frames { window, overlap: 0 })?;
        let Some((first, rest)) = specs.split_first() else {
            return Err(NodeError::Other(format!(
                "{} has no frames",
                stream.source().describe()
            )));
        };
        // The first window's split records the stream the merger writes with.
        let piece = self.split(&input, first)?;
        let mut merger = self.merger(&info)?;
        merger.add(first, self.process(&info, first, &piece)?)?;
        for spec in rest {
            let piece = self.split(&input, spec)?;
            merger.add(spec, self.process(&info, spec, &piece)?)?;
        }
        merger.finish_output()
    }

    fn lock_stream(&self) -> std::sync::MutexGuard<'_, Option<VideoStream>> {
        self.stream.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Source frames `[start, start + count)`, decoding forward from where the last window
    /// stopped (or from the start when asked for an earlier window).
    fn frames(
        &self,
        stream: &VideoStream,
        start: u64,
        count: u64,
        keep: u64,
    ) -> Result<Vec<Frame>, NodeError> {
        let mut guard = self.decoder.lock().unwrap_or_else(|p| p.into_inner());
        let reopen = match guard.as_ref() {
            None => true,
            Some(d) => d.carry.first().map_or(d.next, |(i, _)| *i) > start,
        };
        if reopen {
            *guard = Some(Decoder {
                cursor: stream.source().open()?,
                next: 0,
                carry: Vec::new(),
                ended: false,
            });
        }
        let d = guard.as_mut().expect("opened above");
        let mut out: Vec<(u64, Frame)> = std::mem::take(&mut d.carry)
            .into_iter()
            .filter(|(i, _)| *i >= start && *i < start + count)
            .collect();
        while !d.ended && d.next < start + count {
            match d.cursor.next_frame()? {
                Some(f) => {
                    if d.next >= start {
                        out.push((d.next, f));
                    }
                    d.next += 1;
                }
                None => d.ended = true,
            }
        }
        let tail_from = (start + count).saturating_sub(keep);
        d.carry = out
            .iter()
            .filter(|(i, _)| *i >= tail_from)
            .map(|(i, f)| (*i, f.clone()))
            .collect();
        Ok(out.into_iter().map(|(_, f)| f).collect())
    }
}

fn window_region(chunk: &ChunkSpec) -> Result<(u64, u64, u64, u64, u64), NodeError> {
    match chunk.region {
        ChunkRegion::Frames {
            start,
            count,
            out_start,
            out_count,
            out_next,
        } => Ok((start, count, out_start, out_count, out_next)),
        other => Err(NodeError::Other(format!(
            "a video window was asked for {other:?}"
        ))),
    }
}

fn shape_of(input: &ValueInfo) -> Result<VideoShape, NodeError> {
    match input {
        ValueInfo::Video(s) => Ok(*s),
        other => Err(NodeError::Other(format!(
            "expected a VIDEO, found {other:?}"
        ))),
    }
}

fn memory_frames(v: &Value) -> Result<(&VideoStream, &MemoryFrames), NodeError> {
    let s = v
        .as_video()
        .ok_or_else(|| NodeError::Other("a video window record holds no frames".into()))?;
    let m = s
        .source()
        .as_memory()
        .ok_or_else(|| NodeError::Other("a video window record is not in memory".into()))?;
    Ok((s, m))
}

impl ChunkedOp for VideoWindows {
    fn plan(&self, input: &ValueInfo, size: ChunkSize) -> Result<Vec<ChunkSpec>, NodeError> {
        let shape = shape_of(input)?;
        let ChunkSize::Frames { window, overlap } = size else {
            return Err(NodeError::Other(format!(
                "video windows cannot be cut as {size:?}"
            )));
        };
        Ok(plan_windows(&shape, window, overlap.max(self.min_overlap)))
    }

    fn output_info(&self, input: &ValueInfo) -> Result<ValueInfo, NodeError> {
        Ok(ValueInfo::Video(shape_of(input)?))
    }

    fn split(&self, input: &Value, chunk: &ChunkSpec) -> Result<Value, NodeError> {
        let stream = input
            .as_video()
            .ok_or_else(|| NodeError::input("video", "expected a VIDEO"))?;
        *self.lock_stream() = Some(stream.clone());
        let (start, count, _, _, _) = window_region(chunk)?;
        let next_start = start + count;
        let shape = stream.shape();
        // Frames the next window shares: from its start to the end of this one.
        let keep =
            plan_windows_next_start(chunk, &shape).map_or(0, |n| next_start.saturating_sub(n));
        let frames = self.frames(stream, start, count, keep)?;
        if frames.is_empty() {
            return Err(NodeError::Other(format!(
                "{} ended before frame {start} ({} frames expected)",
                stream.source().describe(),
                shape.source_frames
            )));
        }
        let pts: Vec<f64> = frames.iter().map(|f| f.pts).collect();
        let images: Vec<Tensor> = frames.into_iter().map(|f| f.image).collect();
        let tensor = Tensor::cat(&images, 0)?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (stream.source().signature(), start, pts.len()).hash(&mut h);
        let window = MemoryFrames {
            frames: tensor,
            pts,
            key: h.finish(),
            cached: false,
        };
        let mut piece = VideoStream::new(Arc::new(window), stream.source_meta(), None);
        for op in stream.ops() {
            piece = piece.then(op.clone());
        }
        if let Some((num, den)) = stream.rate() {
            piece = piece.with_rate(num, den);
        }
        Ok(Value::Video(piece))
    }

    fn process(
        &self,
        _input: &ValueInfo,
        chunk: &ChunkSpec,
        piece: &Value,
    ) -> Result<Value, NodeError> {
        let (stream, window) = memory_frames(piece)?;
        // Frames at a rate set on the stream are shown at their index over that rate.
        let retime = |pts: Vec<f64>| -> Vec<f64> {
            match (stream.set_rate(), chunk.region) {
                (Some(fps), ChunkRegion::Frames { out_start, .. }) => (0..pts.len())
                    .map(|k| (out_start + k as u64) as f64 / fps)
                    .collect(),
                _ => pts,
            }
        };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (window.key, stream.chain_signature()).hash(&mut h);
        let key = h.finish();
        let cache = self.cache.filter(|_| !stream.ops().is_empty());
        let (frames, pts, cached) = match cache.and_then(|c| c.get(key)) {
            Some((frames, pts)) => (frames, retime(pts), true),
            None => {
                let frames = stream.apply_ops(window.frames.clone())?;
                let pts = retime(stream.out_pts(&window.pts));
                if let Some(c) = cache {
                    c.put(key, &frames, &pts);
                }
                (frames, pts, false)
            }
        };
        let n = frames.dims().first().copied().unwrap_or(0);
        if n != pts.len() {
            return Err(NodeError::Other(format!(
                "the operator chain made {n} frames of a window whose times say {}",
                pts.len()
            )));
        }
        let done = MemoryFrames {
            frames,
            pts,
            key,
            cached,
        };
        let meta = stream.meta();
        Ok(Value::Video(VideoStream::new(Arc::new(done), meta, None)))
    }

    fn merger(&self, output: &ValueInfo) -> Result<Box<dyn Merger>, NodeError> {
        let stream = self.lock_stream().clone();
        let shape = match (&stream, output) {
            (Some(s), _) => s.shape(),
            (None, ValueInfo::Video(s)) => *s,
            (None, _) => {
                return Err(NodeError::Other(
                    "the video merger was made before any window was cut".into(),
                ))
            }
        };
        let sink = (self.sink)(&shape, stream.as_ref().and_then(|s| s.audio()))?;
        Ok(Box::new(Stitcher {
            sink,
            pending: BTreeMap::new(),
            next: 0,
            held: None,
        }))
    }

    /// The sink's own memory, and the frames the stitcher holds back for the next window's
    /// cross-fade (the overlap), for the whole run.
    fn merger_memory(&self, input: &ValueInfo) -> u64 {
        let Ok(shape) = shape_of(input) else { return 0 };
        let held = (shape.overlap as u64).max(self.min_overlap as u64) * shape.out.frame_bytes();
        held + self.sink_memory.as_ref().map_or(0, |f| f(&shape))
    }

    fn attach(&self, acct: &Arc<Accountant>, spare: u64) {
        if let Some(c) = self.cache {
            c.attach(acct, spare);
        }
    }

    fn chunk_memory(&self, input: &ValueInfo, chunk: &ChunkSpec) -> ChunkMemory {
        let (Ok(shape), Ok((_, count, _, out_count, _))) = (shape_of(input), window_region(chunk))
        else {
            return ChunkMemory::default();
        };
        let src = (shape.source_width * shape.source_height * 3 * 4) as u64;
        let out = shape.out.frame_bytes();
        ChunkMemory {
            piece: count * src,
            result: out_count * out,
            // The chain's temporaries, and the decoded frames the piece is built from.
            workspace: count * (shape.workspace_per_frame + src),
        }
    }
}

/// The source start of the window after `chunk`, if there is one (from the chunk's own
/// output range: the next window starts where this one's final frames end).
fn plan_windows_next_start(chunk: &ChunkSpec, shape: &VideoShape) -> Option<u64> {
    let ChunkRegion::Frames { out_next, .. } = chunk.region else {
        return None;
    };
    (chunk.index + 1 < chunk.count).then(|| out_next / shape.multiplier.max(1) as u64)
}

/// Puts processed windows in order into the sink, cross-fading shared frames.
struct Stitcher {
    sink: Box<dyn FrameSink>,
    /// Windows that arrived before their predecessors.
    pending: BTreeMap<u32, (ChunkSpec, MemoryFrames)>,
    /// The next window to write.
    next: u32,
    /// The previous window's frames that the next window shares (not yet written).
    held: Option<(Tensor, Vec<f64>)>,
}

impl Stitcher {
    fn write_window(&mut self, spec: &ChunkSpec, w: MemoryFrames) -> Result<(), NodeError> {
        let (_, _, out_start, _, out_next) = window_region(spec)?;
        let n = w.len();
        // Shared with the previous window: the first `lead` frames.
        let lead = self.held.as_ref().map_or(0, |(_, p)| p.len()).min(n);
        if let Some((tail, tail_pts)) = self.held.take() {
            for (j, &pts) in tail_pts.iter().enumerate().take(lead) {
                let a = tail.narrow(0, j, 1)?;
                let b = w.frames.narrow(0, j, 1)?;
                let wgt = (j + 1) as f64 / (lead + 1) as f64;
                // a + (b - a)·w: exactly `a` where both windows computed the same frame.
                let faded = (&a + ((&b - &a)? * wgt)?)?;
                self.sink.write(&faded, pts)?;
            }
        }
        // Frames from `out_next` on are shared with the next window.
        let keep_from = (out_next.saturating_sub(out_start) as usize).clamp(lead, n);
        for j in lead..keep_from {
            self.sink.write(&w.frames.narrow(0, j, 1)?, w.pts[j])?;
        }
        if keep_from < n {
            self.held = Some((
                w.frames.narrow(0, keep_from, n - keep_from)?,
                w.pts[keep_from..].to_vec(),
            ));
        }
        Ok(())
    }
}

impl Merger for Stitcher {
    fn add(&mut self, chunk: &ChunkSpec, part: Value) -> Result<(), NodeError> {
        let (_, frames) = memory_frames(&part)?;
        self.pending.insert(chunk.index, (*chunk, frames.clone()));
        while let Some((spec, w)) = self.pending.remove(&self.next) {
            self.write_window(&spec, w)?;
            self.next += 1;
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<Value, NodeError> {
        Ok(self
            .finish_output()?
            .values
            .into_iter()
            .next()
            .unwrap_or(Value::Boolean(true)))
    }

    fn finish_output(mut self: Box<Self>) -> Result<NodeOutput, NodeError> {
        if let Some(&missing) = self.pending.keys().next() {
            return Err(NodeError::Other(format!(
                "video window {} never arrived (window {missing} did)",
                self.next
            )));
        }
        if let Some((tail, pts)) = self.held.take() {
            for (j, p) in pts.iter().enumerate() {
                self.sink.write(&tail.narrow(0, j, 1)?, *p)?;
            }
        }
        self.sink.finish()
    }
}

/// A sink that collects every frame into one `IMAGE` batch (a video made into frames).
pub struct CollectFrames {
    frames: Vec<Tensor>,
}

impl CollectFrames {
    pub fn factory() -> SinkFactory {
        Arc::new(|_, _| Ok(Box::new(CollectFrames { frames: Vec::new() })))
    }
}

impl FrameSink for CollectFrames {
    fn write(&mut self, frame: &Tensor, _pts: f64) -> Result<(), NodeError> {
        self.frames.push(frame.clone());
        Ok(())
    }
    fn finish(self: Box<Self>) -> Result<NodeOutput, NodeError> {
        let batch = if self.frames.is_empty() {
            Tensor::zeros((0, 1, 1, 3), candle_core::DType::F32, &Device::Cpu)?
        } else {
            Tensor::cat(&self.frames, 0)?
        };
        Ok(NodeOutput {
            values: vec![Value::image(batch)],
            ui: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nova_dataflow::{FrameOp, Temporal, VideoMeta};

    fn meta(frames: u64) -> VideoMeta {
        VideoMeta {
            width: 4,
            height: 2,
            frames,
            fps_num: 24,
            fps_den: 1,
            audio: None,
        }
    }

    fn clip(frames: usize) -> VideoStream {
        let data: Vec<f32> = (0..frames * 2 * 4 * 3)
            .map(|i| (i % 97) as f32 / 97.0)
            .collect();
        let t = Tensor::from_vec(data, (frames, 2, 4, 3), &Device::Cpu).unwrap();
        let m = MemoryFrames::at_rate(t, 24.0).unwrap();
        VideoStream::new(Arc::new(m), meta(frames as u64), None)
    }

    /// Doubles the frame rate by averaging neighbours (a stand-in for interpolation).
    struct Midpoints;
    impl FrameOp for Midpoints {
        fn temporal(&self) -> Temporal {
            Temporal {
                overlap: 1,
                multiplier: 2,
            }
        }
        fn out_size(&self, w: usize, h: usize) -> (usize, usize) {
            (w, h)
        }
        fn apply(&self, f: &Tensor) -> Result<Tensor, NodeError> {
            let n = f.dims()[0];
            let mut out = Vec::new();
            for i in 0..n {
                out.push(f.narrow(0, i, 1)?);
                if i + 1 < n {
                    let mid = ((f.narrow(0, i, 1)? + f.narrow(0, i + 1, 1)?)? * 0.5)?;
                    out.push(mid);
                }
            }
            Ok(Tensor::cat(&out, 0)?)
        }
        fn signature(&self) -> u64 {
            7
        }
        fn describe(&self) -> String {
            "midpoints".into()
        }
    }

    /// Scales every pixel (a per-frame operator).
    struct Scale(f64);
    impl FrameOp for Scale {
        fn temporal(&self) -> Temporal {
            Temporal::PER_FRAME
        }
        fn out_size(&self, w: usize, h: usize) -> (usize, usize) {
            (w, h)
        }
        fn apply(&self, f: &Tensor) -> Result<Tensor, NodeError> {
            Ok((f * self.0)?)
        }
        fn signature(&self) -> u64 {
            self.0.to_bits()
        }
        fn describe(&self) -> String {
            "scale".into()
        }
    }

    fn collect(stream: &VideoStream, window: usize) -> Tensor {
        let out = VideoWindows::run_whole(stream, window, CollectFrames::factory()).unwrap();
        out.values[0].as_image().unwrap().clone()
    }

    #[test]
    fn windows_cover_every_frame_and_share_the_overlap() {
        let s = clip(10);
        let specs = plan_windows(&s.shape(), 4, 1);
        let starts: Vec<u64> = specs
            .iter()
            .map(|c| match c.region {
                ChunkRegion::Frames { start, .. } => start,
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(starts, vec![0, 3, 6]);
        let ChunkRegion::Frames { count, .. } = specs[2].region else {
            unreachable!()
        };
        assert_eq!(count, 4);
        // No overlap: disjoint windows, the last one short.
        let specs = plan_windows(&s.shape(), 4, 0);
        assert_eq!(specs.len(), 3);
        assert!(matches!(
            specs[2].region,
            ChunkRegion::Frames {
                start: 8,
                count: 2,
                ..
            }
        ));
    }

    #[test]
    fn windowed_per_frame_chain_equals_frame_by_frame_exactly() {
        let s = clip(11).then(Arc::new(Scale(0.5)));
        let whole = collect(&s, 64);
        for window in [1, 3, 4] {
            let windowed = collect(&s, window);
            let diff = (&windowed - &whole)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "window {window}");
        }
        let frame_by_frame = (clip(11).source().as_memory().unwrap().frames.clone() * 0.5).unwrap();
        let diff = (&whole - &frame_by_frame)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn doubling_chain_stitches_to_two_n_minus_one_frames() {
        let s = clip(9).then(Arc::new(Midpoints));
        assert_eq!(s.meta().frames, 17);
        assert_eq!(s.meta().fps_num, 48);
        let whole = collect(&s, 64);
        assert_eq!(whole.dims()[0], 17);
        for window in [2, 3, 5] {
            let windowed = collect(&s, window);
            assert_eq!(windowed.dims(), whole.dims(), "window {window}");
            let diff = (&windowed - &whole)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-6, "window {window}");
        }
    }

    #[test]
    fn cross_fade_blends_frames_windows_compute_differently() {
        // Two windows that disagree on the shared frames: the fade moves from one to the other.
        let mut st = Stitcher {
            sink: Box::new(CollectFrames { frames: Vec::new() }),
            pending: BTreeMap::new(),
            next: 0,
            held: None,
        };
        let spec = |index, start, out_next| ChunkSpec {
            index,
            count: 2,
            region: ChunkRegion::Frames {
                start,
                count: 4,
                out_start: start,
                out_count: 4,
                out_next,
            },
        };
        let frames = |v: f32| {
            let t = Tensor::full(v, (4, 1, 1, 3), &Device::Cpu).unwrap();
            Value::Video(VideoStream::new(
                Arc::new(MemoryFrames {
                    frames: t,
                    pts: vec![0.0; 4],
                    key: 0,
                    cached: false,
                }),
                meta(4),
                None,
            ))
        };
        st.add(&spec(0, 0, 2), frames(0.0)).unwrap();
        st.add(&spec(1, 2, 6), frames(1.0)).unwrap();
        let out = Box::new(st).finish_output().unwrap();
        let t = out.values[0].as_image().unwrap();
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let firsts: Vec<f32> = v.chunks(3).map(|c| c[0]).collect();
        // Frames 0,1 from the first window; 2,3 faded at 1/3 and 2/3; 4,5 from the second.
        let want = [0.0, 0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0, 1.0];
        assert_eq!(firsts.len(), 6);
        for (a, b) in firsts.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{firsts:?}");
        }
    }

    #[test]
    fn temporal_cache_replays_unchanged_windows() {
        let s = clip(8).then(Arc::new(Scale(0.25)));
        let op = VideoWindows::new(CollectFrames::factory());
        let info = ValueInfo::Video(s.shape());
        let input = Value::Video(s.clone());
        let spec = plan_windows(&s.shape(), 4, 0)[1];
        let first = op
            .process(&info, &spec, &op.split(&input, &spec).unwrap())
            .unwrap();
        let again = op
            .process(&info, &spec, &op.split(&input, &spec).unwrap())
            .unwrap();
        let (_, a) = memory_frames(&first).unwrap();
        let (_, b) = memory_frames(&again).unwrap();
        assert!(!a.cached);
        assert!(b.cached);
        let diff = (&a.frames - &b.frames)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        // A different chain is a different key.
        let other = clip(8).then(Arc::new(Scale(0.5)));
        let input = Value::Video(other);
        let c = op
            .process(&info, &spec, &op.split(&input, &spec).unwrap())
            .unwrap();
        assert!(!memory_frames(&c).unwrap().1.cached);
    }

    #[test]
    fn out_pts_interpolate_inserted_frames() {
        let s = clip(3).then(Arc::new(Midpoints));
        let pts = s.out_pts(&[0.0, 1.0, 3.0]);
        assert_eq!(pts, vec![0.0, 0.5, 1.0, 2.0, 3.0]);
    }
}
