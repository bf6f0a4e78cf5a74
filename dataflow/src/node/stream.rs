//! Streams: `VIDEO` and `AUDIO` values as lazy, pull-based descriptions of media, so a clip of
//! any length flows through a workflow in bounded memory.
//!
//! A [`VideoStream`] is a frame source (a decoder, frames in memory) followed by a chain of
//! [`FrameOp`]s — image operators applied per frame (or over a few neighbouring frames). An
//! [`AudioStream`] is a graph of [`AudioGraph`] nodes (a decoder, an oscillator, a gain, a
//! resampler...), each pulling bounded chunks from the ones before it. Nodes that transform
//! media only extend the description (cheap, no samples touched); the node that consumes the
//! media (a save, a preview, a conversion to an `IMAGE` batch) pulls it window by window, and
//! it does so as a chunked node of the dataflow, so every window is a timestamped record whose
//! completion the engine observes.
//!
//! Invariants:
//! - Opening a stream twice gives the same samples or frames (sources are files that do not
//!   change during a run, generators are seeded), so a window's content is a pure function of
//!   the stream and its range.
//! - A stream's metadata ([`VideoMeta`], [`AudioMeta`]) is known before any sample is read:
//!   the planner sizes windows from it.
//! - Every chunk a puller returns has at most the frames asked for, one `Vec` per channel of
//!   equal length; an empty chunk means the stream ended.

use crate::node::NodeError;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// Shape of an audio stream, known before reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AudioMeta {
    pub sample_rate: u32,
    pub channels: u16,
    /// Length in frames (samples per channel).
    pub frames: u64,
}

impl AudioMeta {
    /// Duration in seconds.
    pub fn seconds(&self) -> f64 {
        self.frames as f64 / self.sample_rate.max(1) as f64
    }
}

/// Shape of a video stream, known before decoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VideoMeta {
    pub width: usize,
    pub height: usize,
    /// Number of frames.
    pub frames: u64,
    /// Frame rate as a fraction.
    pub fps_num: u32,
    pub fps_den: u32,
    /// The audio track, if any.
    pub audio: Option<AudioMeta>,
}

impl VideoMeta {
    /// Frames per second.
    pub fn fps(&self) -> f64 {
        self.fps_num as f64 / self.fps_den.max(1) as f64
    }

    /// Bytes of one frame as f32 RGB.
    pub fn frame_bytes(&self) -> u64 {
        (self.width * self.height * 3 * 4) as u64
    }
}

/// What the planner knows of a video stream: its shape after every operator, and what a
/// window of its source costs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VideoShape {
    /// The video as it comes out of the operator chain.
    pub out: VideoMeta,
    /// The source's frames and frame size, before the operators.
    pub source_frames: u64,
    pub source_width: usize,
    pub source_height: usize,
    /// Output frames per source frame step, over the whole chain.
    pub multiplier: u32,
    /// Source frames consecutive windows must share.
    pub overlap: u32,
    /// Bytes of operator temporaries per source frame of a window.
    pub workspace_per_frame: u64,
}

impl VideoShape {
    /// Output frame index of source frame `i`.
    pub fn out_index(&self, i: u64) -> u64 {
        i * self.multiplier.max(1) as u64
    }

    /// Output frames for a window of `n` source frames.
    pub fn out_frames(&self, n: u64) -> u64 {
        Temporal {
            overlap: self.overlap as usize,
            multiplier: self.multiplier.max(1) as usize,
        }
        .out_frames(n)
    }
}

/// One decoded frame: `[1, height, width, 3]` f32 in `[0, 1]`, with its presentation time.
#[derive(Clone, Debug)]
pub struct Frame {
    pub image: Tensor,
    /// Presentation time in seconds, as the source gave it.
    pub pts: f64,
}

/// Frames of a source, in order, one at a time.
pub trait FrameCursor: Send {
    /// The next frame, or `None` at the end.
    fn next_frame(&mut self) -> Result<Option<Frame>, NodeError>;
}

/// Where a video's frames come from: a decoder, frames in memory.
pub trait FrameSource: Send + Sync {
    /// A cursor at the first frame.
    fn open(&self) -> Result<Box<dyn FrameCursor>, NodeError>;
    /// Identifies the content (file, size and modification time; or the frames' hash), for
    /// the temporal cache.
    fn signature(&self) -> u64;
    /// For messages: the file name or what made the frames.
    fn describe(&self) -> String;
    /// The frames, when they are in memory.
    fn as_memory(&self) -> Option<&MemoryFrames> {
        None
    }
}

/// Frames in memory: an `IMAGE` batch made into a video, or one window of a stream on its way
/// through the dataflow.
#[derive(Clone, Debug)]
pub struct MemoryFrames {
    /// `[n, h, w, 3]`.
    pub frames: Tensor,
    /// Presentation time of each frame.
    pub pts: Vec<f64>,
    /// Identifies the content.
    pub key: u64,
    /// Whether the frames were replayed from the temporal cache.
    pub cached: bool,
}

impl MemoryFrames {
    /// Frames at a constant rate of `fps`, identified by hashing their values.
    pub fn at_rate(frames: Tensor, fps: f64) -> Result<MemoryFrames, NodeError> {
        let n = frames.dims().first().copied().unwrap_or(0);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        frames.dims().hash(&mut h);
        for v in frames.flatten_all()?.to_vec1::<f32>()? {
            v.to_bits().hash(&mut h);
        }
        Ok(MemoryFrames {
            frames,
            pts: (0..n).map(|i| i as f64 / fps.max(1e-9)).collect(),
            key: h.finish(),
            cached: false,
        })
    }

    /// Number of frames.
    pub fn len(&self) -> usize {
        self.pts.len()
    }

    /// Whether there are no frames.
    pub fn is_empty(&self) -> bool {
        self.pts.is_empty()
    }
}

impl FrameSource for MemoryFrames {
    fn open(&self) -> Result<Box<dyn FrameCursor>, NodeError> {
        Ok(Box::new(MemoryCursor {
            frames: self.clone(),
            at: 0,
        }))
    }
    fn signature(&self) -> u64 {
        self.key
    }
    fn describe(&self) -> String {
        format!("{} frames in memory", self.len())
    }
    fn as_memory(&self) -> Option<&MemoryFrames> {
        Some(self)
    }
}

struct MemoryCursor {
    frames: MemoryFrames,
    at: usize,
}

impl FrameCursor for MemoryCursor {
    fn next_frame(&mut self) -> Result<Option<Frame>, NodeError> {
        if self.at >= self.frames.len() {
            return Ok(None);
        }
        let image = self.frames.frames.narrow(0, self.at, 1)?;
        let pts = self.frames.pts[self.at];
        self.at += 1;
        Ok(Some(Frame { image, pts }))
    }
}

/// How a frame operator relates output frames to input frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Temporal {
    /// Input frames a window must share with the next one for the operator to see every
    /// neighbourhood it needs (0 for per-frame operators; 1 for pairwise interpolation).
    pub overlap: usize,
    /// Output frames per input frame step: 1 keeps the frame rate, 2 doubles it (an output of
    /// `(n - 1) * multiplier + 1` frames for `n` inputs).
    pub multiplier: usize,
}

impl Temporal {
    /// An operator applied to each frame on its own.
    pub const PER_FRAME: Temporal = Temporal {
        overlap: 0,
        multiplier: 1,
    };

    /// Output frames for `n` input frames.
    pub fn out_frames(&self, n: u64) -> u64 {
        if self.multiplier <= 1 || n == 0 {
            n
        } else {
            (n - 1) * self.multiplier as u64 + 1
        }
    }
}

/// An operator over a window of frames: `[n, h, w, 3]` in, `[temporal.out_frames(n), h', w',
/// 3]` out. Image nodes applied to a `VIDEO` become one of these.
pub trait FrameOp: Send + Sync {
    fn temporal(&self) -> Temporal;
    /// The output frame size for an input frame size `(width, height)`.
    fn out_size(&self, width: usize, height: usize) -> (usize, usize);
    /// Runs the operator on a window of frames.
    fn apply(&self, frames: &Tensor) -> Result<Tensor, NodeError>;
    /// Identifies the operator and its settings, for the temporal cache.
    fn signature(&self) -> u64;
    /// Bytes of temporaries per input frame while it runs (beyond input and output).
    fn workspace_per_frame(&self, width: usize, height: usize) -> u64 {
        (width * height * 3 * 4) as u64
    }
    /// For messages: the node it came from.
    fn describe(&self) -> String;
}

/// A video: a source, the operators applied to its frames in order, and its audio track.
#[derive(Clone)]
pub struct VideoStream {
    source: Arc<dyn FrameSource>,
    /// The source's own shape.
    source_meta: VideoMeta,
    ops: Vec<Arc<dyn FrameOp>>,
    audio: Option<AudioStream>,
    /// A constant output rate set on the frames (ComfyUI's `CreateVideo`): output frame `i`
    /// is shown at `i / rate`, whatever the source's times.
    rate: Option<(u32, u32)>,
}

impl VideoStream {
    /// A stream of a source's frames as they are.
    pub fn new(
        source: Arc<dyn FrameSource>,
        meta: VideoMeta,
        audio: Option<AudioStream>,
    ) -> VideoStream {
        let mut meta = meta;
        meta.audio = audio.as_ref().map(|a| a.meta());
        VideoStream {
            source,
            source_meta: meta,
            ops: Vec::new(),
            audio,
            rate: None,
        }
    }

    /// The same frames at a constant rate of `num / den` frames per second: output frame `i`
    /// at `i * den / num` seconds.
    pub fn with_rate(&self, num: u32, den: u32) -> VideoStream {
        let mut s = self.clone();
        s.rate = Some((num.max(1), den.max(1)));
        s
    }

    /// The constant rate set on the frames, if any (frames per second).
    pub fn set_rate(&self) -> Option<f64> {
        self.rate.map(|(n, d)| n as f64 / d as f64)
    }

    /// The constant rate set on the frames, as a fraction.
    pub fn rate(&self) -> Option<(u32, u32)> {
        self.rate
    }

    /// The same stream with `op` applied after the existing operators.
    pub fn then(&self, op: Arc<dyn FrameOp>) -> VideoStream {
        let mut s = self.clone();
        s.ops.push(op);
        s
    }

    /// The same stream with another audio track (or none).
    pub fn with_audio(&self, audio: Option<AudioStream>) -> VideoStream {
        let mut s = self.clone();
        s.source_meta.audio = audio.as_ref().map(|a| a.meta());
        s.audio = audio;
        s
    }

    /// The source.
    pub fn source(&self) -> &Arc<dyn FrameSource> {
        &self.source
    }

    /// The source's shape (before the operators).
    pub fn source_meta(&self) -> VideoMeta {
        self.source_meta
    }

    /// The operators, in order.
    pub fn ops(&self) -> &[Arc<dyn FrameOp>] {
        &self.ops
    }

    /// The audio track.
    pub fn audio(&self) -> Option<&AudioStream> {
        self.audio.as_ref()
    }

    /// Input frames consecutive windows of the source must share so every operator sees the
    /// neighbours it needs.
    pub fn required_overlap(&self) -> usize {
        self.ops
            .iter()
            .map(|o| o.temporal().overlap)
            .max()
            .unwrap_or(0)
    }

    /// Output frames for a window of `n` source frames, through every operator.
    pub fn out_frames(&self, n: u64) -> u64 {
        self.ops.iter().fold(n, |n, o| o.temporal().out_frames(n))
    }

    /// Output frame index of source frame `i`.
    pub fn out_index(&self, i: u64) -> u64 {
        self.ops
            .iter()
            .fold(i, |i, o| i * o.temporal().multiplier.max(1) as u64)
    }

    /// The shape after every operator.
    pub fn meta(&self) -> VideoMeta {
        let mut m = self.source_meta;
        let mult: u64 = self
            .ops
            .iter()
            .map(|o| o.temporal().multiplier.max(1) as u64)
            .product();
        for o in &self.ops {
            let (w, h) = o.out_size(m.width, m.height);
            m.width = w;
            m.height = h;
        }
        m.frames = self.out_frames(self.source_meta.frames);
        m.fps_num = m.fps_num.saturating_mul(mult as u32);
        if let Some((num, den)) = self.rate {
            m.fps_num = num;
            m.fps_den = den;
        }
        m
    }

    /// What the planner needs to cut the stream into windows.
    pub fn shape(&self) -> VideoShape {
        let src = self.source_meta;
        let (mut w, mut h) = (src.width, src.height);
        let mut workspace = 0u64;
        let mut frames_per_source = 1u64;
        for o in &self.ops {
            workspace = workspace.max(o.workspace_per_frame(w, h) * frames_per_source);
            frames_per_source *= o.temporal().multiplier.max(1) as u64;
            (w, h) = o.out_size(w, h);
        }
        VideoShape {
            out: self.meta(),
            source_frames: src.frames,
            source_width: src.width,
            source_height: src.height,
            multiplier: frames_per_source as u32,
            overlap: self.required_overlap() as u32,
            workspace_per_frame: workspace,
        }
    }

    /// Presentation times of the output frames of a window whose source frames had `pts`:
    /// frames an operator inserts between two source frames get evenly spaced times.
    pub fn out_pts(&self, pts: &[f64]) -> Vec<f64> {
        let mut pts = pts.to_vec();
        for o in &self.ops {
            let m = o.temporal().multiplier.max(1);
            if m == 1 || pts.len() < 2 {
                continue;
            }
            let mut next = Vec::with_capacity((pts.len() - 1) * m + 1);
            for pair in pts.windows(2) {
                for k in 0..m {
                    next.push(pair[0] + (pair[1] - pair[0]) * k as f64 / m as f64);
                }
            }
            next.push(pts[pts.len() - 1]);
            pts = next;
        }
        pts
    }

    /// Identifies the operator chain (not the source), for the temporal cache.
    pub fn chain_signature(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for o in &self.ops {
            o.signature().hash(&mut h);
        }
        h.finish()
    }

    /// Runs the operator chain over a window of source frames `[n, h, w, 3]`.
    pub fn apply_ops(&self, frames: Tensor) -> Result<Tensor, NodeError> {
        self.ops.iter().try_fold(frames, |f, o| o.apply(&f))
    }
}

impl fmt::Debug for VideoStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VIDEO {} ({:?}", self.source.describe(), self.meta())?;
        for o in &self.ops {
            write!(f, " -> {}", o.describe())?;
        }
        write!(f, ")")
    }
}

/// Planar audio: one `Vec` per channel, equal lengths.
pub type Planar = Vec<Vec<f32>>;

/// Pulls chunks of an audio stream in order.
pub trait AudioPull: Send {
    /// Up to `max` frames; fewer only at the end; empty once the stream ended.
    fn pull(&mut self, max: usize) -> Result<Planar, NodeError>;
}

/// A node of an audio graph: a source or an operator over other streams.
pub trait AudioGraph: Send + Sync {
    fn meta(&self) -> AudioMeta;
    /// A puller at the stream's start.
    fn open(&self) -> Result<Box<dyn AudioPull>, NodeError>;
    /// Identifies the content and every operator before it, for caching.
    fn signature(&self) -> u64;
    fn describe(&self) -> String;
}

/// An audio stream (ComfyUI's `AUDIO`), lazy: samples are pulled chunk by chunk when consumed.
#[derive(Clone)]
pub struct AudioStream(Arc<dyn AudioGraph>);

impl AudioStream {
    /// Wraps a graph node.
    pub fn new(graph: Arc<dyn AudioGraph>) -> AudioStream {
        AudioStream(graph)
    }

    /// Samples in memory as a stream.
    pub fn from_planar(sample_rate: u32, samples: Planar) -> AudioStream {
        AudioStream(Arc::new(InMemoryAudio::new(sample_rate, samples)))
    }

    pub fn meta(&self) -> AudioMeta {
        self.0.meta()
    }

    pub fn open(&self) -> Result<Box<dyn AudioPull>, NodeError> {
        self.0.open()
    }

    pub fn signature(&self) -> u64 {
        self.0.signature()
    }

    pub fn graph(&self) -> &Arc<dyn AudioGraph> {
        &self.0
    }

    /// Reads the whole stream (for small streams: tests, previews of a chunk).
    pub fn read_all(&self) -> Result<Planar, NodeError> {
        let meta = self.meta();
        let mut out: Planar = vec![Vec::new(); meta.channels as usize];
        let mut p = self.open()?;
        loop {
            let chunk = p.pull(65536)?;
            if chunk.first().is_none_or(|c| c.is_empty()) {
                break;
            }
            for (o, c) in out.iter_mut().zip(chunk) {
                o.extend_from_slice(&c);
            }
        }
        Ok(out)
    }
}

impl fmt::Debug for AudioStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AUDIO {} ({:?})", self.0.describe(), self.meta())
    }
}

/// Samples held in memory.
pub struct InMemoryAudio {
    sample_rate: u32,
    samples: Arc<Planar>,
    /// Hashed on first use: chunks on their way through the dataflow never need it.
    signature: std::sync::OnceLock<u64>,
}

impl InMemoryAudio {
    pub fn new(sample_rate: u32, samples: Planar) -> InMemoryAudio {
        InMemoryAudio {
            sample_rate,
            samples: Arc::new(samples),
            signature: std::sync::OnceLock::new(),
        }
    }
}

impl AudioGraph for InMemoryAudio {
    fn meta(&self) -> AudioMeta {
        AudioMeta {
            sample_rate: self.sample_rate,
            channels: self.samples.len() as u16,
            frames: self.samples.first().map_or(0, |c| c.len()) as u64,
        }
    }
    fn open(&self) -> Result<Box<dyn AudioPull>, NodeError> {
        Ok(Box::new(MemoryPull {
            samples: self.samples.clone(),
            at: 0,
        }))
    }
    fn signature(&self) -> u64 {
        *self.signature.get_or_init(|| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            self.sample_rate.hash(&mut h);
            for c in self.samples.iter() {
                c.len().hash(&mut h);
                for s in c {
                    s.to_bits().hash(&mut h);
                }
            }
            h.finish()
        })
    }
    fn describe(&self) -> String {
        "samples in memory".into()
    }
}

struct MemoryPull {
    samples: Arc<Planar>,
    at: usize,
}

impl AudioPull for MemoryPull {
    fn pull(&mut self, max: usize) -> Result<Planar, NodeError> {
        let len = self.samples.first().map_or(0, |c| c.len());
        let end = (self.at + max).min(len);
        let out = self
            .samples
            .iter()
            .map(|c| c[self.at..end].to_vec())
            .collect();
        self.at = end;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporal_frame_counts() {
        assert_eq!(Temporal::PER_FRAME.out_frames(7), 7);
        let double = Temporal {
            overlap: 1,
            multiplier: 2,
        };
        assert_eq!(double.out_frames(5), 9);
        assert_eq!(double.out_frames(1), 1);
        assert_eq!(double.out_frames(0), 0);
    }

    #[test]
    fn memory_audio_pulls_in_bounded_chunks_and_ends_empty() {
        let s = AudioStream::from_planar(8000, vec![(0..10).map(|i| i as f32).collect(); 2]);
        let mut p = s.open().unwrap();
        assert_eq!(p.pull(4).unwrap()[1], vec![0.0, 1.0, 2.0, 3.0]);
        assert_eq!(p.pull(4).unwrap()[0].len(), 4);
        assert_eq!(p.pull(4).unwrap()[0], vec![8.0, 9.0]);
        assert!(p.pull(4).unwrap()[0].is_empty());
        assert_eq!(s.read_all().unwrap()[0].len(), 10);
        assert_eq!(s.meta().frames, 10);
    }
}
