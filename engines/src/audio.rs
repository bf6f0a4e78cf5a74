//! The AudioEngine: an audio stream cut into time chunks that flow through the dataflow as
//! timestamped records, and spectral (STFT) processing whose chunked form equals the
//! whole-signal form.
//!
//! - [`plan_chunks`] (pure): spans of at most `len` frames covering the stream.
//! - [`AudioChunks`] implements `ChunkedOp` for a node that consumes audio (a save, a
//!   preview): *split* pulls each chunk in order from the stream's graph (one puller per run:
//!   stateful operators such as filters and resamplers carry their state across chunks, so
//!   the chunked result is the whole-signal result), and the merger hands chunks in order to
//!   an [`AudioSink`].
//! - [`Stft`] and [`plan_stft_chunks`]: a short-time Fourier transform with a square-root
//!   periodic Hann window on analysis and synthesis at 50% overlap (the squared windows sum to
//!   exactly one), the signal padded by one hop at the start and end so output sample `t`
//!   aligns with input sample `t`. Chunks are runs of whole STFT frames on the global frame
//!   grid; each chunk needs the input of its frames only and yields an output segment that
//!   overlap-adds with its neighbours, so chunks may be processed independently, in any
//!   order, and the sum equals the whole-signal result for any per-frame spectral operator.
//!   [`SpectralPull`] is the streaming form: it processes one chunk at a time and releases
//!   the samples no later frame touches.
//!
//! Invariant: memory is bounded by the chunk size, never by the stream's length.

use nova_dataflow::{
    AudioGraph, AudioMeta, AudioPull, AudioStream, ChunkMemory, ChunkRegion, ChunkSize, ChunkSpec,
    ChunkedOp, Merger, NodeError, NodeOutput, Planar, Value, ValueInfo,
};
use realfft::num_complex::Complex32;
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};
use std::sync::{Arc, Mutex};

/// Spans of at most `len` frames covering `meta.frames`. Pure.
pub fn plan_chunks(meta: &AudioMeta, len: usize) -> Vec<ChunkSpec> {
    let len = len.max(1) as u64;
    let count = meta.frames.div_ceil(len).max(1);
    (0..count)
        .map(|i| ChunkSpec {
            index: i as u32,
            count: count as u32,
            region: ChunkRegion::Samples {
                start: i * len,
                len: len.min(meta.frames.saturating_sub(i * len)),
            },
        })
        .collect()
}

/// Where chunks of audio go, in order: a WAV writer, a buffer.
pub trait AudioSink: Send {
    fn write(&mut self, chunk: &[Vec<f32>]) -> Result<(), NodeError>;
    /// Called once after the last chunk: the node's outputs.
    fn finish(self: Box<Self>) -> Result<NodeOutput, NodeError>;
}

/// Makes the sink of one run from the stream's shape.
pub type AudioSinkFactory =
    Arc<dyn Fn(&AudioMeta) -> Result<Box<dyn AudioSink>, NodeError> + Send + Sync>;

/// The chunked form of a node that consumes audio chunk by chunk. See the module docs.
pub struct AudioChunks {
    sink: AudioSinkFactory,
    /// This run's puller and the frame it stands at (*split* runs on the owner, in order).
    puller: Mutex<Option<(Box<dyn AudioPull>, u64)>>,
    meta: Mutex<Option<AudioMeta>>,
}

impl AudioChunks {
    pub fn new(sink: AudioSinkFactory) -> AudioChunks {
        AudioChunks {
            sink,
            puller: Mutex::new(None),
            meta: Mutex::new(None),
        }
    }

    /// Runs a whole stream through chunks of `len` frames on this thread (library use); the
    /// same path as the dataflow's.
    pub fn run_whole(
        stream: &AudioStream,
        len: usize,
        sink: AudioSinkFactory,
    ) -> Result<NodeOutput, NodeError> {
        let op = AudioChunks::new(sink);
        let info = ValueInfo::Audio(stream.meta());
        let input = Value::Audio(stream.clone());
        let mut merger = op.merger(&info)?;
        for spec in plan_chunks(&stream.meta(), len) {
            let piece = op.split(&input, &spec)?;
            let done = op.process(&info, &spec, &piece)?;
            merger.add(&spec, done)?;
        }
        merger.finish_output()
    }
}

fn span(chunk: &ChunkSpec) -> Result<(u64, u64), NodeError> {
    match chunk.region {
        ChunkRegion::Samples { start, len } => Ok((start, len)),
        other => Err(NodeError::Other(format!(
            "an audio chunk was asked for {other:?}"
        ))),
    }
}

fn meta_of(input: &ValueInfo) -> Result<AudioMeta, NodeError> {
    match input {
        ValueInfo::Audio(m) => Ok(*m),
        other => Err(NodeError::Other(format!("expected AUDIO, found {other:?}"))),
    }
}

/// Pulls exactly `len` frames (fewer only at the end of the stream).
pub fn pull_exact(p: &mut dyn AudioPull, channels: usize, len: usize) -> Result<Planar, NodeError> {
    let mut out: Planar = vec![Vec::with_capacity(len); channels];
    while out.first().map_or(0, |c| c.len()) < len {
        let want = len - out[0].len();
        let chunk = p.pull(want)?;
        let got = chunk.first().map_or(0, |c| c.len());
        if got == 0 {
            break;
        }
        if chunk.len() != channels {
            return Err(NodeError::Other(format!(
                "an audio operator gave {} channels, the stream has {channels}",
                chunk.len()
            )));
        }
        for (o, c) in out.iter_mut().zip(chunk) {
            o.extend_from_slice(&c[..got.min(want)]);
        }
    }
    Ok(out)
}

impl ChunkedOp for AudioChunks {
    fn plan(&self, input: &ValueInfo, size: ChunkSize) -> Result<Vec<ChunkSpec>, NodeError> {
        let meta = meta_of(input)?;
        let ChunkSize::Samples { len } = size else {
            return Err(NodeError::Other(format!(
                "audio chunks cannot be cut as {size:?}"
            )));
        };
        Ok(plan_chunks(&meta, len))
    }

    fn output_info(&self, input: &ValueInfo) -> Result<ValueInfo, NodeError> {
        Ok(ValueInfo::Audio(meta_of(input)?))
    }

    fn split(&self, input: &Value, chunk: &ChunkSpec) -> Result<Value, NodeError> {
        let stream = input
            .as_audio()
            .ok_or_else(|| NodeError::input("audio", "expected AUDIO"))?;
        let meta = stream.meta();
        *self.meta.lock().unwrap_or_else(|p| p.into_inner()) = Some(meta);
        let (start, len) = span(chunk)?;
        let mut guard = self.puller.lock().unwrap_or_else(|p| p.into_inner());
        if guard.as_ref().is_none_or(|(_, at)| *at > start) {
            *guard = Some((stream.open()?, 0));
        }
        let (p, at) = guard.as_mut().expect("opened above");
        if *at < start {
            // Skip to the chunk (only when chunks are asked out of order).
            pull_exact(p.as_mut(), meta.channels as usize, (start - *at) as usize)?;
            *at = start;
        }
        let mut samples = pull_exact(p.as_mut(), meta.channels as usize, len as usize)?;
        *at += len;
        // A stream that ends early is padded with silence to the length it announced.
        for c in &mut samples {
            c.resize(len as usize, 0.0);
        }
        Ok(Value::Audio(AudioStream::from_planar(
            meta.sample_rate,
            samples,
        )))
    }

    fn process(
        &self,
        _input: &ValueInfo,
        _chunk: &ChunkSpec,
        piece: &Value,
    ) -> Result<Value, NodeError> {
        // The stream's operators ran as the chunk was pulled (they are stateful and sequential).
        Ok(piece.clone())
    }

    fn merger(&self, output: &ValueInfo) -> Result<Box<dyn Merger>, NodeError> {
        let meta = match (*self.meta.lock().unwrap_or_else(|p| p.into_inner()), output) {
            (Some(m), _) => m,
            (None, ValueInfo::Audio(m)) => *m,
            (None, _) => {
                return Err(NodeError::Other(
                    "the audio merger was made before any chunk was cut".into(),
                ))
            }
        };
        Ok(Box::new(InOrder {
            sink: (self.sink)(&meta)?,
            pending: std::collections::BTreeMap::new(),
            next: 0,
        }))
    }

    fn chunk_memory(&self, input: &ValueInfo, chunk: &ChunkSpec) -> ChunkMemory {
        let (Ok(meta), Ok((_, len))) = (meta_of(input), span(chunk)) else {
            return ChunkMemory::default();
        };
        let bytes = len * meta.channels as u64 * 4;
        ChunkMemory {
            piece: bytes,
            result: bytes,
            // Operators' buffers while the chunk is pulled: about one more chunk.
            workspace: bytes,
        }
    }
}

/// Hands chunks to the sink in order.
struct InOrder {
    sink: Box<dyn AudioSink>,
    pending: std::collections::BTreeMap<u32, Planar>,
    next: u32,
}

impl Merger for InOrder {
    fn add(&mut self, chunk: &ChunkSpec, part: Value) -> Result<(), NodeError> {
        let a = part
            .as_audio()
            .ok_or_else(|| NodeError::Other("an audio chunk record holds no audio".into()))?;
        self.pending.insert(chunk.index, a.read_all()?);
        while let Some(c) = self.pending.remove(&self.next) {
            self.sink.write(&c)?;
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

    fn finish_output(self: Box<Self>) -> Result<NodeOutput, NodeError> {
        if let Some(&k) = self.pending.keys().next() {
            return Err(NodeError::Other(format!(
                "audio chunk {} never arrived (chunk {k} did)",
                self.next
            )));
        }
        self.sink.finish()
    }
}

/// A sink that keeps every chunk in memory (tests, small previews).
pub struct CollectAudio {
    sample_rate: u32,
    samples: Planar,
}

impl CollectAudio {
    pub fn factory() -> AudioSinkFactory {
        Arc::new(|m: &AudioMeta| {
            Ok(Box::new(CollectAudio {
                sample_rate: m.sample_rate,
                samples: vec![Vec::new(); m.channels as usize],
            }) as Box<dyn AudioSink>)
        })
    }
}

impl AudioSink for CollectAudio {
    fn write(&mut self, chunk: &[Vec<f32>]) -> Result<(), NodeError> {
        for (o, c) in self.samples.iter_mut().zip(chunk) {
            o.extend_from_slice(c);
        }
        Ok(())
    }
    fn finish(self: Box<Self>) -> Result<NodeOutput, NodeError> {
        Ok(NodeOutput {
            values: vec![Value::Audio(AudioStream::from_planar(
                self.sample_rate,
                self.samples,
            ))],
            ui: None,
        })
    }
}

/// A short-time Fourier transform: `frame` samples (even), hop `frame / 2`, square-root
/// periodic Hann windows. See the module docs.
#[derive(Clone)]
pub struct Stft {
    pub frame: usize,
    window: Arc<Vec<f32>>,
    forward: Arc<dyn RealToComplex<f32>>,
    inverse: Arc<dyn ComplexToReal<f32>>,
}

impl Stft {
    /// A transform of `frame` samples (rounded up to even, at least 4).
    pub fn new(frame: usize) -> Stft {
        let frame = (frame.max(4) + 1) & !1;
        let window = (0..frame)
            .map(|n| {
                let h = 0.5 - 0.5 * (2.0 * std::f64::consts::PI * n as f64 / frame as f64).cos();
                h.sqrt() as f32
            })
            .collect();
        let mut planner = RealFftPlanner::<f32>::new();
        Stft {
            frame,
            window: Arc::new(window),
            forward: planner.plan_fft_forward(frame),
            inverse: planner.plan_fft_inverse(frame),
        }
    }

    pub fn hop(&self) -> usize {
        self.frame / 2
    }

    /// Bins per frame.
    pub fn bins(&self) -> usize {
        self.frame / 2 + 1
    }

    /// STFT frames covering `len` samples (the padded signal).
    pub fn frames_for(&self, len: u64) -> u64 {
        len.div_ceil(self.hop() as u64) + 1
    }

    /// Processes STFT frames `[f0, f0 + n)` of a signal whose samples `[s, s + seg.len())`
    /// are in `seg` (samples outside read as zero): each frame windowed, transformed, changed
    /// by `op` (bins, and the frame index), transformed back, windowed, and overlap-added.
    /// Returns the output segment, which starts at sample `f0 * hop - hop`.
    pub fn process_frames(
        &self,
        seg: &[f32],
        seg_start: i64,
        f0: u64,
        n: u64,
        op: &dyn Fn(u64, &mut [Complex32]),
    ) -> Result<Vec<f32>, NodeError> {
        let (frame, hop) = (self.frame, self.hop());
        let out_start = f0 as i64 * hop as i64 - hop as i64;
        let mut out = vec![0f32; (n as usize).saturating_sub(1) * hop + frame];
        let mut buf = self.forward.make_input_vec();
        let mut spec = self.forward.make_output_vec();
        let mut scratch_f = self.forward.make_scratch_vec();
        let mut scratch_i = self.inverse.make_scratch_vec();
        let scale = 1.0 / frame as f32;
        for k in 0..n {
            let first = out_start + (k as usize * hop) as i64;
            // Hot loop per frame: fill, window, transform; no allocation.
            for (j, b) in buf.iter_mut().enumerate() {
                let t = first + j as i64 - seg_start;
                let x = if t >= 0 && (t as usize) < seg.len() {
                    seg[t as usize]
                } else {
                    0.0
                };
                *b = x * self.window[j];
            }
            self.forward
                .process_with_scratch(&mut buf, &mut spec, &mut scratch_f)
                .map_err(|e| NodeError::Other(format!("FFT failed: {e}")))?;
            op(f0 + k, &mut spec);
            // A real signal's DC and Nyquist bins are real.
            spec[0].im = 0.0;
            if let Some(last) = spec.last_mut() {
                last.im = 0.0;
            }
            self.inverse
                .process_with_scratch(&mut spec, &mut buf, &mut scratch_i)
                .map_err(|e| NodeError::Other(format!("inverse FFT failed: {e}")))?;
            let at = k as usize * hop;
            for (j, b) in buf.iter().enumerate() {
                out[at + j] += b * self.window[j] * scale;
            }
        }
        Ok(out)
    }

    /// The whole-signal result of a per-frame spectral operator (the reference the chunked
    /// forms equal).
    pub fn whole(
        &self,
        x: &[f32],
        op: &dyn Fn(u64, &mut [Complex32]),
    ) -> Result<Vec<f32>, NodeError> {
        let frames = self.frames_for(x.len() as u64);
        let seg = self.process_frames(x, 0, 0, frames, op)?;
        Ok(seg[self.hop()..self.hop() + x.len()].to_vec())
    }
}

/// One STFT chunk: frames `[frame_start, frame_start + frames)`, the input samples they read
/// `[in_start, in_end)` (clamped to the signal) and where their output segment begins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StftChunk {
    pub frame_start: u64,
    pub frames: u64,
    pub in_start: u64,
    pub in_end: u64,
    /// First output sample of the segment (may be negative: the padding before the signal).
    pub out_start: i64,
}

/// STFT chunks of `frames_per_chunk` frames over a signal of `len` samples. Pure.
pub fn plan_stft_chunks(stft: &Stft, len: u64, frames_per_chunk: u64) -> Vec<StftChunk> {
    let (hop, frame) = (stft.hop() as i64, stft.frame as i64);
    let total = stft.frames_for(len);
    let per = frames_per_chunk.max(1);
    (0..total.div_ceil(per))
        .map(|c| {
            let f0 = c * per;
            let n = per.min(total - f0);
            let out_start = f0 as i64 * hop - hop;
            let end = out_start + (n as i64 - 1) * hop + frame;
            StftChunk {
                frame_start: f0,
                frames: n,
                in_start: out_start.max(0) as u64,
                in_end: (end.max(0) as u64).min(len),
                out_start,
            }
        })
        .collect()
}

/// Chunked spectral processing: each chunk reads only its own input and the segments are
/// overlap-added. Equals [`Stft::whole`].
pub fn spectral_chunked(
    stft: &Stft,
    x: &[f32],
    frames_per_chunk: u64,
    op: &dyn Fn(u64, &mut [Complex32]),
) -> Result<Vec<f32>, NodeError> {
    let mut out = vec![0f32; x.len()];
    for c in plan_stft_chunks(stft, x.len() as u64, frames_per_chunk) {
        let seg = &x[c.in_start as usize..c.in_end as usize];
        let y = stft.process_frames(seg, c.in_start as i64, c.frame_start, c.frames, op)?;
        for (j, v) in y.iter().enumerate() {
            let t = c.out_start + j as i64;
            if t >= 0 && (t as usize) < out.len() {
                out[t as usize] += v;
            }
        }
    }
    Ok(out)
}

/// A per-frame spectral operator over all channels: bins of one frame of one channel.
pub type SpectralFn = Arc<dyn Fn(usize, u64, &mut [Complex32]) + Send + Sync>;

/// A spectral operator applied to an audio stream, as an audio graph node.
pub struct Spectral {
    input: AudioStream,
    stft: Stft,
    op: SpectralFn,
    frames_per_chunk: u64,
    signature: u64,
    name: String,
}

impl Spectral {
    /// `op` applied to every frame of `input` with frames of `frame` samples; `signature`
    /// identifies `op`'s settings.
    pub fn new(
        input: AudioStream,
        frame: usize,
        op: SpectralFn,
        signature: u64,
        name: &str,
    ) -> Spectral {
        Spectral {
            input,
            stft: Stft::new(frame),
            op,
            frames_per_chunk: 32,
            signature,
            name: name.to_string(),
        }
    }
}

impl AudioGraph for Spectral {
    fn meta(&self) -> AudioMeta {
        self.input.meta()
    }
    fn open(&self) -> Result<Box<dyn AudioPull>, NodeError> {
        let meta = self.input.meta();
        Ok(Box::new(SpectralPull {
            upstream: self.input.open()?,
            stft: self.stft.clone(),
            op: self.op.clone(),
            plan: plan_stft_chunks(&self.stft, meta.frames, self.frames_per_chunk),
            next_chunk: 0,
            channels: meta.channels as usize,
            len: meta.frames,
            input: vec![Vec::new(); meta.channels as usize],
            input_start: 0,
            acc: vec![Vec::new(); meta.channels as usize],
            acc_start: 0,
            emitted: 0,
        }))
    }
    fn signature(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (self.input.signature(), self.stft.frame, self.signature).hash(&mut h);
        h.finish()
    }
    fn describe(&self) -> String {
        format!("{} of {}", self.name, self.input.graph().describe())
    }
}

/// The streaming form of [`spectral_chunked`]: one STFT chunk at a time.
pub struct SpectralPull {
    upstream: Box<dyn AudioPull>,
    stft: Stft,
    op: SpectralFn,
    plan: Vec<StftChunk>,
    next_chunk: usize,
    channels: usize,
    len: u64,
    /// Input samples from `input_start` on that later chunks still read.
    input: Planar,
    input_start: u64,
    /// Output being overlap-added, from `acc_start` on.
    acc: Planar,
    acc_start: u64,
    /// Output samples handed out so far.
    emitted: u64,
}

impl SpectralPull {
    /// Output samples before this are final (no later chunk adds to them).
    fn final_until(&self) -> u64 {
        match self.plan.get(self.next_chunk) {
            Some(c) => c.out_start.max(0) as u64,
            None => self.len,
        }
    }

    fn run_chunk(&mut self) -> Result<(), NodeError> {
        let c = self.plan[self.next_chunk];
        // Read input up to the chunk's end.
        let have = self.input_start + self.input.first().map_or(0, |v| v.len()) as u64;
        if c.in_end > have {
            let more = pull_exact(
                self.upstream.as_mut(),
                self.channels,
                (c.in_end - have) as usize,
            )?;
            for (i, m) in self.input.iter_mut().zip(more) {
                i.extend_from_slice(&m);
            }
        }
        let acc_end = (c.out_start
            + ((c.frames as i64 - 1) * self.stft.hop() as i64)
            + self.stft.frame as i64)
            .clamp(0, self.len as i64) as u64;
        for ch in 0..self.channels {
            let seg = &self.input[ch];
            let op = self.op.clone();
            let y = self.stft.process_frames(
                seg,
                self.input_start as i64,
                c.frame_start,
                c.frames,
                &move |f, bins| op(ch, f, bins),
            )?;
            let acc = &mut self.acc[ch];
            if (acc.len() as u64) < acc_end - self.acc_start {
                acc.resize((acc_end - self.acc_start) as usize, 0.0);
            }
            for (j, v) in y.iter().enumerate() {
                let t = c.out_start + j as i64;
                if t >= self.acc_start as i64 && (t as u64) < acc_end {
                    acc[(t as u64 - self.acc_start) as usize] += v;
                }
            }
        }
        self.next_chunk += 1;
        // Input before the next chunk's first sample is not read again.
        if let Some(n) = self.plan.get(self.next_chunk) {
            let drop = n.in_start.saturating_sub(self.input_start) as usize;
            for i in &mut self.input {
                i.drain(..drop.min(i.len()));
            }
            self.input_start += drop as u64;
        }
        Ok(())
    }
}

impl AudioPull for SpectralPull {
    fn pull(&mut self, max: usize) -> Result<Planar, NodeError> {
        while self.final_until() < (self.emitted + max as u64).min(self.len)
            && self.next_chunk < self.plan.len()
        {
            self.run_chunk()?;
        }
        let end = self.final_until().min(self.emitted + max as u64);
        let n = end.saturating_sub(self.emitted) as usize;
        let mut out = Vec::with_capacity(self.channels);
        for acc in &mut self.acc {
            let mut c: Vec<f32> = acc.drain(..n.min(acc.len())).collect();
            c.resize(n, 0.0);
            out.push(c);
        }
        self.acc_start += n as u64;
        self.emitted += n as u64;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signal(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let t = i as f32 / 16000.0;
                (2.0 * std::f32::consts::PI * 440.0 * t).sin() * 0.5
                    + (2.0 * std::f32::consts::PI * 3100.0 * t).sin() * 0.25
                    + ((i * 7919) % 101) as f32 / 404.0
            })
            .collect()
    }

    /// A linear operator: a smooth gain curve over the bins.
    fn tilt(_f: u64, bins: &mut [Complex32]) {
        let n = bins.len() as f32;
        for (k, b) in bins.iter_mut().enumerate() {
            *b *= 1.0 - 0.8 * k as f32 / n;
        }
    }

    #[test]
    fn chunks_cover_the_stream() {
        let meta = AudioMeta {
            sample_rate: 8000,
            channels: 2,
            frames: 10_001,
        };
        let c = plan_chunks(&meta, 1000);
        assert_eq!(c.len(), 11);
        assert_eq!(
            c[10].region,
            ChunkRegion::Samples {
                start: 10_000,
                len: 1
            }
        );
    }

    #[test]
    fn identity_stft_reconstructs_the_signal() {
        let stft = Stft::new(512);
        let x = signal(5000);
        let y = stft.whole(&x, &|_, _| {}).unwrap();
        let err = x
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("STFT identity max abs error {err:.2e}");
        assert!(err < 1e-5, "{err}");
    }

    #[test]
    fn chunked_spectral_processing_equals_whole_signal() {
        let stft = Stft::new(256);
        let x = signal(7777);
        let whole = stft.whole(&x, &tilt).unwrap();
        for per in [1, 3, 8, 1000] {
            let chunked = spectral_chunked(&stft, &x, per, &tilt).unwrap();
            let err = whole
                .iter()
                .zip(&chunked)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            eprintln!("STFT chunks of {per} frames: max abs error vs whole {err:.2e}");
            assert!(err < 1e-5, "{per}: {err}");
        }
        // And the operator did something.
        let change = x
            .iter()
            .zip(&whole)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(change > 0.05);
    }

    #[test]
    fn streaming_spectral_pull_equals_whole_signal_for_any_pull_size() {
        let x = signal(9001);
        let stream =
            AudioStream::from_planar(16000, vec![x.clone(), x.iter().map(|v| -v).collect()]);
        let op: SpectralFn = Arc::new(|_, f, b| tilt(f, b));
        let spectral = AudioStream::new(Arc::new(Spectral::new(stream, 256, op, 1, "tilt")));
        let whole = Stft::new(256).whole(&x, &tilt).unwrap();
        for pull in [1usize, 100, 4096, 20000] {
            let mut p = spectral.open().unwrap();
            let mut got: Vec<f32> = Vec::new();
            let mut right: Vec<f32> = Vec::new();
            loop {
                let c = p.pull(pull).unwrap();
                if c[0].is_empty() {
                    break;
                }
                assert!(c[0].len() <= pull);
                got.extend_from_slice(&c[0]);
                right.extend_from_slice(&c[1]);
            }
            assert_eq!(got.len(), x.len(), "pull {pull}");
            let err = whole
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let err_r = whole
                .iter()
                .zip(&right)
                .map(|(a, b)| (a + b).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-5 && err_r < 1e-5, "pull {pull}: {err} {err_r}");
        }
    }

    #[test]
    fn chunked_run_through_the_sink_equals_the_stream() {
        let x = signal(12345);
        let stream = AudioStream::from_planar(16000, vec![x.clone()]);
        for len in [1000, 4096, 100_000] {
            let out = AudioChunks::run_whole(&stream, len, CollectAudio::factory()).unwrap();
            let got = out.values[0].as_audio().unwrap().read_all().unwrap();
            assert_eq!(got[0], x, "chunk {len}");
        }
    }
}
