//! Runtime values that flow between nodes, their static types, and their shapes.
//!
//! Invariants: an `IMAGE` is an f32 tensor `[batch, height, width, channels]` with values in
//! `[0, 1]` (ComfyUI's convention); a `MASK` is `[batch, height, width]`. Values are cheap to
//! clone (tensors share storage), which matters because timely clones records for every
//! consumer of a stream.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

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

/// A tensor that can travel in a timely record.
///
/// Within one process timely moves records between worker threads without serializing them,
/// so cloning is an `Arc` bump. The serde impls exist for the cluster case (records crossing
/// processes): they write dims and f32 data, and read back onto the CPU.
#[derive(Clone, Debug)]
pub struct TensorBox(pub Tensor);

#[derive(Serialize, Deserialize)]
struct TensorWire {
    dims: Vec<usize>,
    data: Vec<f32>,
}

impl Serialize for TensorBox {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let flat = self
            .0
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(serde::ser::Error::custom)?;
        TensorWire {
            dims: self.0.dims().to_vec(),
            data: flat,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for TensorBox {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = TensorWire::deserialize(deserializer)?;
        Tensor::from_vec(wire.data, wire.dims, &Device::Cpu)
            .map(TensorBox)
            .map_err(serde::de::Error::custom)
    }
}

/// A value produced by a node output or consumed by a node input at run time.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Value {
    /// `[batch, height, width, channels]`, f32 in `[0, 1]`.
    Image(TensorBox),
    /// `[batch, height, width]`, f32 in `[0, 1]`.
    Mask(TensorBox),
    Int(i64),
    Float(f64),
    String(String),
    Boolean(bool),
}

impl Value {
    /// Wraps an image tensor.
    pub fn image(t: Tensor) -> Value {
        Value::Image(TensorBox(t))
    }

    /// Wraps a mask tensor.
    pub fn mask(t: Tensor) -> Value {
        Value::Mask(TensorBox(t))
    }

    /// The data type this value satisfies.
    pub fn data_type(&self) -> DataType {
        match self {
            Value::Image(_) => DataType::Image,
            Value::Mask(_) => DataType::Mask,
            Value::Int(_) => DataType::Int,
            Value::Float(_) => DataType::Float,
            Value::String(_) => DataType::String,
            Value::Boolean(_) => DataType::Boolean,
        }
    }

    /// The image tensor, if this is an image.
    pub fn as_image(&self) -> Option<&Tensor> {
        match self {
            Value::Image(t) => Some(&t.0),
            _ => None,
        }
    }

    /// The shape of this value, as the planner sees it.
    pub fn info(&self) -> ValueInfo {
        match self {
            Value::Image(t) => match t.0.dims4() {
                Ok((batch, height, width, channels)) => ValueInfo::Image(ImageInfo {
                    batch,
                    height,
                    width,
                    channels,
                }),
                Err(_) => ValueInfo::Unknown,
            },
            Value::Mask(t) => match t.0.dims3() {
                Ok((batch, height, width)) => ValueInfo::Mask {
                    batch,
                    height,
                    width,
                },
                Err(_) => ValueInfo::Unknown,
            },
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
            ValueInfo::Scalar => Some(16),
            ValueInfo::Unknown => None,
        }
    }
}
