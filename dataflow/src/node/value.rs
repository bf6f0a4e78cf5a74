//! Runtime values that flow between nodes, their static types, and their shapes.
//!
//! Invariants: an `IMAGE` is an f32 tensor `[batch, height, width, channels]` with values in
//! `[0, 1]` (ComfyUI's convention); a `MASK` is `[batch, height, width]`. Values are cheap to
//! clone (tensors share storage), which matters because timely clones records for every
//! consumer of a stream.

use crate::node::memory::{Accountant, Lease};
use crate::node::stream::{AudioMeta, AudioStream, VideoShape, VideoStream};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::sync::Arc;

/// The type of a node input or output, named as ComfyUI names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DataType {
    #[serde(rename = "IMAGE")]
    Image,
    #[serde(rename = "LATENT")]
    Latent,
    #[serde(rename = "MASK")]
    Mask,
    #[serde(rename = "AUDIO")]
    Audio,
    #[serde(rename = "VIDEO")]
    Video,
    #[serde(rename = "MODEL")]
    Model,
    #[serde(rename = "UPSCALE_MODEL")]
    UpscaleModel,
    #[serde(rename = "VAE")]
    Vae,
    #[serde(rename = "CLIP")]
    Clip,
    #[serde(rename = "CONDITIONING")]
    Conditioning,
    #[serde(rename = "INT")]
    Int,
    #[serde(rename = "FLOAT")]
    Float,
    #[serde(rename = "STRING")]
    String,
    #[serde(rename = "BOOLEAN")]
    Boolean,
    /// A choice among fixed options (ComfyUI's "COMBO"); the options live in the input spec.
    #[serde(rename = "COMBO")]
    Combo,
}

impl DataType {
    /// ComfyUI's spelling of the type, as used in `/object_info` and error messages.
    pub fn as_str(&self) -> &'static str {
        match self {
            DataType::Image => "IMAGE",
            DataType::Latent => "LATENT",
            DataType::Mask => "MASK",
            DataType::Audio => "AUDIO",
            DataType::Video => "VIDEO",
            DataType::Model => "MODEL",
            DataType::UpscaleModel => "UPSCALE_MODEL",
            DataType::Vae => "VAE",
            DataType::Clip => "CLIP",
            DataType::Conditioning => "CONDITIONING",
            DataType::Int => "INT",
            DataType::Float => "FLOAT",
            DataType::String => "STRING",
            DataType::Boolean => "BOOLEAN",
            DataType::Combo => "COMBO",
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A tensor that can travel in a timely record, with the memory lease that counts it.
///
/// Within one process timely moves records between worker threads without serializing them,
/// so cloning is an `Arc` bump, and clones share one lease: the bytes are counted once and
/// returned when the last clone is dropped. The serde impls exist for the cluster case
/// (records crossing processes): they write dims and f32 data, and read back onto the CPU
/// untracked (the receiving engine tracks what it holds).
#[derive(Clone, Debug)]
pub struct TensorBox {
    tensor: Tensor,
    lease: Option<Arc<Lease>>,
}

impl TensorBox {
    /// An untracked tensor.
    pub fn new(tensor: Tensor) -> Self {
        TensorBox {
            tensor,
            lease: None,
        }
    }

    /// The tensor.
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }

    /// Bytes of the tensor's elements.
    pub fn bytes(&self) -> u64 {
        (self.tensor.elem_count() * self.tensor.dtype().size_in_bytes()) as u64
    }
}

#[derive(Serialize, Deserialize)]
struct TensorWire {
    dims: Vec<usize>,
    data: Vec<f32>,
}

impl Serialize for TensorBox {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let flat = self
            .tensor
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(serde::ser::Error::custom)?;
        TensorWire {
            dims: self.tensor.dims().to_vec(),
            data: flat,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for TensorBox {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = TensorWire::deserialize(deserializer)?;
        Tensor::from_vec(wire.data, wire.dims, &Device::Cpu)
            .map(TensorBox::new)
            .map_err(serde::de::Error::custom)
    }
}

/// A loaded model: its asset in the residency registry and what the loader learned of its
/// architecture (owned by the operator that runs it).
#[derive(Clone)]
pub struct ModelRef {
    /// The type of value it is (e.g. `UPSCALE_MODEL`).
    pub kind: DataType,
    pub asset: Arc<crate::node::residency::Asset>,
    pub arch: Arc<dyn std::any::Any + Send + Sync>,
    /// What the planner knows of it.
    pub info: ModelInfo,
}

impl fmt::Debug for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.asset.name())
    }
}

impl Serialize for ModelRef {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.asset.name())
    }
}

impl<'de> Deserialize<'de> for ModelRef {
    fn deserialize<D: Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Err(serde::de::Error::custom(
            "models are shared between workers of one process, never deserialized",
        ))
    }
}

/// A model's size as the planner sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Every weight as f32.
    pub bytes: u64,
    /// The largest block of weights that can be streamed on its own (0: cannot stream).
    pub block_bytes: u64,
    /// Spatial scale of an image model's output (1 when it keeps the size).
    pub scale: u32,
    /// Input pixels each output pixel depends on, on every side (image models).
    pub halo: u32,
    /// Activation bytes the model needs per input pixel while it runs (image models).
    pub activation_per_pixel: u64,
    /// Whether the model is local enough to run on tiles of its input.
    pub tileable: bool,
}

/// A value produced by a node output or consumed by a node input at run time.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Value {
    /// `[batch, height, width, channels]`, f32 in `[0, 1]`.
    Image(TensorBox),
    /// `[batch, height, width]`, f32 in `[0, 1]`.
    Mask(TensorBox),
    /// Diffusion latents `[batch, channels, height, width]` (ComfyUI's `{"samples": ...}`),
    /// f32, at 1/8 of the image's resolution for SD-family models.
    Latent(TensorBox),
    /// Text conditioning `[batch, tokens, dim]` (a text encoder's hidden states).
    Conditioning(TensorBox),
    Int(i64),
    Float(f64),
    String(String),
    Boolean(bool),
    /// A loaded model.
    Model(ModelRef),
    /// A video, lazy: frames are decoded and processed window by window when consumed
    /// ([`crate::node::stream`]). Shared within one process, never serialized.
    #[serde(skip)]
    Video(VideoStream),
    /// Audio (ComfyUI's `AUDIO`), lazy: samples are pulled chunk by chunk when consumed.
    #[serde(skip)]
    Audio(AudioStream),
}

impl Value {
    /// Wraps an image tensor.
    pub fn image(t: Tensor) -> Value {
        Value::Image(TensorBox::new(t))
    }

    /// Wraps a mask tensor.
    pub fn mask(t: Tensor) -> Value {
        Value::Mask(TensorBox::new(t))
    }

    /// Wraps a latent tensor.
    pub fn latent(t: Tensor) -> Value {
        Value::Latent(TensorBox::new(t))
    }

    /// The tensor of an image, mask, latent or conditioning.
    pub fn as_tensor(&self) -> Option<&Tensor> {
        match self {
            Value::Image(t) | Value::Mask(t) | Value::Latent(t) | Value::Conditioning(t) => {
                Some(&t.tensor)
            }
            _ => None,
        }
    }

    /// The tensor of a tensor value.
    fn tensor_box(&mut self) -> Option<&mut TensorBox> {
        match self {
            Value::Image(t) | Value::Mask(t) | Value::Latent(t) | Value::Conditioning(t) => Some(t),
            _ => None,
        }
    }

    /// Bytes of device memory the value holds (0 for scalars).
    pub fn device_bytes(&self) -> u64 {
        match self {
            Value::Image(t) | Value::Mask(t) | Value::Latent(t) | Value::Conditioning(t) => {
                t.bytes()
            }
            _ => 0,
        }
    }

    /// Whether the value's memory is counted by an accountant (or it holds none).
    pub fn is_tracked(&self) -> bool {
        match self {
            Value::Image(t) | Value::Mask(t) | Value::Latent(t) | Value::Conditioning(t) => {
                t.lease.is_some()
            }
            _ => true,
        }
    }

    /// Counts the value's memory against `acct`, unless it is counted already (a value passed
    /// through unchanged keeps its lease). A value that already exists is counted even past
    /// the limit, so the tracked peak shows any overrun.
    pub fn track(mut self, acct: &Arc<Accountant>) -> Value {
        if let Some(t) = self.tensor_box() {
            if t.lease.is_none() {
                let bytes = t.bytes();
                t.lease = Some(Arc::new(acct.lease(bytes)));
            }
        }
        self
    }

    /// Hands an existing lease (taken before the value was built) to the value.
    pub fn with_lease(mut self, lease: Lease) -> Value {
        if let Some(t) = self.tensor_box() {
            t.lease = Some(Arc::new(lease));
        }
        self
    }

    /// A copy of the value in host memory, not counted against any device budget (on the CPU
    /// device it shares the buffer).
    pub fn to_host(&self) -> candle_core::Result<Value> {
        Ok(match self {
            Value::Image(t) => Value::image(t.tensor.to_device(&candle_core::Device::Cpu)?),
            Value::Mask(t) => Value::mask(t.tensor.to_device(&candle_core::Device::Cpu)?),
            Value::Latent(t) => Value::latent(t.tensor.to_device(&candle_core::Device::Cpu)?),
            Value::Conditioning(t) => Value::Conditioning(TensorBox::new(
                t.tensor.to_device(&candle_core::Device::Cpu)?,
            )),
            other => other.clone(),
        })
    }

    /// The data type this value satisfies.
    pub fn data_type(&self) -> DataType {
        match self {
            Value::Image(_) => DataType::Image,
            Value::Mask(_) => DataType::Mask,
            Value::Latent(_) => DataType::Latent,
            Value::Conditioning(_) => DataType::Conditioning,
            Value::Int(_) => DataType::Int,
            Value::Float(_) => DataType::Float,
            Value::String(_) => DataType::String,
            Value::Boolean(_) => DataType::Boolean,
            Value::Model(m) => m.kind.clone(),
            Value::Video(_) => DataType::Video,
            Value::Audio(_) => DataType::Audio,
        }
    }

    /// The conditioning tensor, if this is conditioning.
    pub fn as_conditioning(&self) -> Option<&Tensor> {
        match self {
            Value::Conditioning(t) => Some(&t.tensor),
            _ => None,
        }
    }

    /// The latent tensor, if this is a latent.
    pub fn as_latent(&self) -> Option<&Tensor> {
        match self {
            Value::Latent(t) => Some(&t.tensor),
            _ => None,
        }
    }

    /// The video stream, if this is a video.
    pub fn as_video(&self) -> Option<&VideoStream> {
        match self {
            Value::Video(v) => Some(v),
            _ => None,
        }
    }

    /// The audio stream, if this is audio.
    pub fn as_audio(&self) -> Option<&AudioStream> {
        match self {
            Value::Audio(a) => Some(a),
            _ => None,
        }
    }

    /// The image tensor, if this is an image.
    pub fn as_image(&self) -> Option<&Tensor> {
        match self {
            Value::Image(t) => Some(&t.tensor),
            _ => None,
        }
    }

    /// The shape of this value, as the planner sees it.
    pub fn info(&self) -> ValueInfo {
        match self {
            Value::Image(t) => match t.tensor.dims4() {
                Ok((batch, height, width, channels)) => ValueInfo::Image(ImageInfo {
                    batch,
                    height,
                    width,
                    channels,
                }),
                Err(_) => ValueInfo::Unknown,
            },
            Value::Mask(t) => match t.tensor.dims3() {
                Ok((batch, height, width)) => ValueInfo::Mask {
                    batch,
                    height,
                    width,
                },
                Err(_) => ValueInfo::Unknown,
            },
            Value::Latent(t) => match t.tensor.dims4() {
                Ok((batch, channels, height, width)) => ValueInfo::Latent {
                    batch,
                    channels,
                    height,
                    width,
                },
                Err(_) => ValueInfo::Unknown,
            },
            Value::Conditioning(t) => match t.tensor.dims3() {
                Ok((batch, tokens, dim)) => ValueInfo::Conditioning { batch, tokens, dim },
                Err(_) => ValueInfo::Unknown,
            },
            Value::Model(m) => ValueInfo::Model(m.info),
            Value::Video(v) => ValueInfo::Video(v.shape()),
            Value::Audio(a) => ValueInfo::Audio(a.meta()),
            _ => ValueInfo::Scalar,
        }
    }
}

/// Shape of an image: `[batch, height, width, channels]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
}

impl ImageInfo {
    /// Bytes of the image as f32.
    pub fn bytes(&self) -> u64 {
        (self.batch * self.height * self.width * self.channels * 4) as u64
    }
}

/// What the planner knows of a value before it exists: its shape where it can be inferred.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValueInfo {
    Image(ImageInfo),
    Mask {
        batch: usize,
        height: usize,
        width: usize,
    },
    /// Latents `[batch, channels, height, width]`.
    Latent {
        batch: usize,
        channels: usize,
        height: usize,
        width: usize,
    },
    /// Text conditioning `[batch, tokens, dim]`.
    Conditioning {
        batch: usize,
        tokens: usize,
        dim: usize,
    },
    /// A model, whose weights the planner places.
    Model(ModelInfo),
    /// A video stream (lazy; its windows are counted where they are processed).
    Video(VideoShape),
    /// An audio stream (lazy; its chunks are counted where they are processed).
    Audio(AudioMeta),
    /// A scalar or small value whose size does not matter for planning.
    Scalar,
    /// Shape not known before running.
    Unknown,
}

impl ValueInfo {
    /// The image shape, if this is an image.
    pub fn image(&self) -> Option<ImageInfo> {
        match self {
            ValueInfo::Image(i) => Some(*i),
            _ => None,
        }
    }

    /// Bytes the value occupies as f32 data, if known.
    pub fn bytes(&self) -> Option<u64> {
        match self {
            ValueInfo::Image(i) => Some(i.bytes()),
            ValueInfo::Mask {
                batch,
                height,
                width,
            } => Some((batch * height * width * 4) as u64),
            ValueInfo::Latent {
                batch,
                channels,
                height,
                width,
            } => Some((batch * channels * height * width * 4) as u64),
            ValueInfo::Conditioning { batch, tokens, dim } => {
                Some((batch * tokens * dim * 4) as u64)
            }
            ValueInfo::Scalar => Some(16),
            // Weights are counted where a node puts them on the device, not as a value.
            ValueInfo::Model(_) => Some(0),
            // A stream holds no samples until it is consumed window by window.
            ValueInfo::Video(_) | ValueInfo::Audio(_) => Some(0),
            ValueInfo::Unknown => None,
        }
    }
}
