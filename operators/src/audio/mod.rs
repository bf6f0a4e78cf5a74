//! Audio nodes. `AUDIO` values are lazy streams ([`nova_dataflow::AudioStream`]): loaders and
//! generators make graph sources, operators wrap the graph, and `SaveAudio`/`PreviewAudio`
//! pull it chunk by chunk as a streamed node of the dataflow, so memory never depends on the
//! length of the audio. Nodes ComfyUI has keep its names and inputs (`LoadAudio`,
//! `SaveAudio`, `PreviewAudio`); the rest are NOVA's own.

pub mod biquad;
pub mod eq;
pub mod fade;
pub mod gain;
pub mod generate;
pub mod load;
pub mod mix;
pub mod resample;
pub mod save;

use nova_dataflow::{
    AudioGraph, AudioMeta, AudioPull, AudioStream, Inputs, NodeError, Planar, Value, ValueInfo,
};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// A media error as a node error naming the file.
pub(crate) fn media_error(e: nova_media::MediaError) -> NodeError {
    NodeError::File {
        path: e.path().to_string(),
        reason: e.reason().to_string(),
    }
}

/// The stream of a required `AUDIO` input.
pub(crate) fn audio_input(inputs: &Inputs<Value>, name: &str) -> Result<AudioStream, NodeError> {
    inputs
        .require(name)?
        .as_audio()
        .cloned()
        .ok_or_else(|| NodeError::input(name, "expected AUDIO"))
}

/// The shape of an `AUDIO` input at plan time.
pub(crate) fn audio_info(inputs: &Inputs<ValueInfo>, name: &str) -> Result<AudioMeta, NodeError> {
    match inputs.get(name) {
        Some(ValueInfo::Audio(m)) => Ok(*m),
        Some(other) => Err(NodeError::input(
            name,
            format!("expected AUDIO, found {other:?}"),
        )),
        None => Err(NodeError::input(name, "required input is not connected")),
    }
}

/// A hash of anything hashable, for stream signatures.
pub(crate) fn signature(parts: impl Hash) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

/// A stateful per-sample operator: sees each chunk in order, with its position in the stream.
pub(crate) trait SampleMap: Send {
    /// Changes `chunk` (planar) in place; `at` is the index of its first frame.
    fn apply(&mut self, chunk: &mut Planar, at: u64);
}

/// Makes a fresh [`SampleMap`] for a stream of this shape.
pub(crate) type MakeMap = Arc<dyn Fn(&AudioMeta) -> Box<dyn SampleMap> + Send + Sync>;

/// A stream through a [`SampleMap`] made fresh for every puller.
pub(crate) struct Mapped {
    pub input: AudioStream,
    pub make: MakeMap,
    pub signature: u64,
    pub name: String,
}

impl Mapped {
    pub(crate) fn stream(
        input: AudioStream,
        name: String,
        settings: impl Hash,
        make: impl Fn(&AudioMeta) -> Box<dyn SampleMap> + Send + Sync + 'static,
    ) -> AudioStream {
        let signature = signature((input.signature(), &name, settings));
        AudioStream::new(Arc::new(Mapped {
            input,
            make: Arc::new(make),
            signature,
            name,
        }))
    }
}

impl AudioGraph for Mapped {
    fn meta(&self) -> AudioMeta {
        self.input.meta()
    }
    fn open(&self) -> Result<Box<dyn AudioPull>, NodeError> {
        Ok(Box::new(MappedPull {
            upstream: self.input.open()?,
            map: (self.make)(&self.input.meta()),
            at: 0,
        }))
    }
    fn signature(&self) -> u64 {
        self.signature
    }
    fn describe(&self) -> String {
        format!("{} of {}", self.name, self.input.graph().describe())
    }
}

struct MappedPull {
    upstream: Box<dyn AudioPull>,
    map: Box<dyn SampleMap>,
    at: u64,
}

impl AudioPull for MappedPull {
    fn pull(&mut self, max: usize) -> Result<Planar, NodeError> {
        let mut chunk = self.upstream.pull(max)?;
        let n = chunk.first().map_or(0, |c| c.len()) as u64;
        self.map.apply(&mut chunk, self.at);
        self.at += n;
        Ok(chunk)
    }
}

/// Decibels to a linear factor.
pub(crate) fn db(gain_db: f64) -> f32 {
    10f64.powf(gain_db / 20.0) as f32
}
