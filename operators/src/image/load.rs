//! `LoadImage` (ComfyUI name and inputs): a PNG or JPEG from the input folder, EXIF orientation
//! applied. Outputs the RGB image and a mask that is `1 − alpha` (zeros 64x64 without alpha),
//! as ComfyUI does.

use crate::spec::{input_file, out};
use candle_core::{Device, Tensor};
use nova_dataflow::{
    Args, ChunkRegion, DataType, ExecContext, ImageInfo, Inputs, JobEnv, Node, NodeError,
    NodeOutput, NodeSchema, RegionReader, SourceOp, Value, ValueInfo,
};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;

/// The node.
pub struct LoadImage {
    schema: NodeSchema,
}

impl LoadImage {
    pub fn new() -> Self {
        LoadImage {
            schema: NodeSchema {
                class_type: "LoadImage",
                display_name: "Load Image",
                category: "image",
                description: "Loads a PNG or JPEG from the input folder.",
                inputs: vec![input_file("image")],
                outputs: vec![out("IMAGE", DataType::Image), out("MASK", DataType::Mask)],
                output_node: false,
            },
        }
    }

    fn path(args: &Args, env: &JobEnv) -> Result<PathBuf, NodeError> {
        let name = args.string("image")?;
        JobEnv::resolve_in(&env.input_dir, name).map_err(|r| NodeError::input("image", r))
    }
}

fn media(e: nova_media::MediaError, path: &std::path::Path) -> NodeError {
    NodeError::File {
        path: path.display().to_string(),
        reason: match e {
            nova_media::MediaError::Decode { .. } => {
                format!("not a readable PNG or JPEG image: {}", e.reason())
            }
            _ => e.reason().to_string(),
        },
    }
}

impl Node for LoadImage {
    fn schema(&self) -> &NodeSchema {
        &self.schema
    }

    fn check(&self, args: &Args, env: &JobEnv) -> Result<(), NodeError> {
        let path = Self::path(args, env)?;
        nova_media::probe_image(&path).map_err(|e| media(e, &path))?;
        Ok(())
    }

    fn infer(
        &self,
        args: &Args,
        _inputs: &Inputs<ValueInfo>,
        env: &JobEnv,
    ) -> Result<Vec<ValueInfo>, NodeError> {
        let path = Self::path(args, env)?;
        let (width, height) = nova_media::probe_image(&path).map_err(|e| media(e, &path))?;
        Ok(vec![
            ValueInfo::Image(ImageInfo {
                batch: 1,
                height,
                width,
                channels: 3,
            }),
            // Without alpha the mask is 64x64; the header does not say, so stay conservative.
            ValueInfo::Mask {
                batch: 1,
                height: height.max(64),
                width: width.max(64),
            },
        ])
    }

    fn source(&self, args: &Args, env: &JobEnv) -> Option<Arc<dyn SourceOp>> {
        let path = Self::path(args, env).ok()?;
        let (width, _) = nova_media::png_streamable(&path).ok()??;
        Some(Arc::new(PngSource { path, width }))
    }

    fn execute(
        &self,
        args: &Args,
        _inputs: Inputs<Value>,
        ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        let path = Self::path(args, &ctx.env)?;
        let img = nova_media::decode_image(&path).map_err(|e| media(e, &path))?;
        let (h, w) = (img.height, img.width);
        let image =
            Tensor::from_vec(img.rgb, (1, h, w, 3), &Device::Cpu)?.to_device(&ctx.device)?;
        let mask = match img.alpha {
            Some(a) => Tensor::from_vec(a, (1, h, w), &Device::Cpu)?
                .affine(-1.0, 1.0)?
                .to_device(&ctx.device)?,
            None => Tensor::zeros((1, 64, 64), candle_core::DType::F32, &ctx.device)?,
        };
        Ok(NodeOutput {
            values: vec![Value::image(image), Value::mask(mask)],
            ui: None,
        })
    }
}

/// A PNG read band of rows by band of rows for a pipeline region: only the rows the current
/// tile row needs are held, so a large input never exists whole. Only PNGs that decode row by
/// row into exactly the whole decode's values qualify ([`nova_media::png_streamable`]: 8-bit
/// RGB or RGBA, not interlaced, no orientation); others are loaded whole.
struct PngSource {
    path: PathBuf,
    width: usize,
}

impl SourceOp for PngSource {
    fn memory(&self, _output: &ValueInfo, regions: &[ChunkRegion]) -> u64 {
        // Decoded rows are kept whole (f32 RGB) from the top of the part being read to its
        // bottom, plus the row being decoded.
        let tallest = regions
            .iter()
            .filter_map(|r| match r {
                ChunkRegion::Tile { rect } => Some(rect.h),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        ((tallest + 1) * self.width * 3 * 4) as u64
    }

    fn open(&self, _ctx: &ExecContext) -> Result<Box<dyn RegionReader>, NodeError> {
        let reader =
            nova_media::PngRowReader::open(&self.path).map_err(|e| media(e, &self.path))?;
        Ok(Box::new(PngBand {
            reader,
            rows: VecDeque::new(),
            top: 0,
            path: self.path.clone(),
        }))
    }
}

/// The rows of a PNG held for the parts being read: `rows[0]` is row `top`.
struct PngBand {
    reader: nova_media::PngRowReader,
    rows: VecDeque<Vec<f32>>,
    top: usize,
    path: PathBuf,
}

impl RegionReader for PngBand {
    fn read(&mut self, region: &ChunkRegion) -> Result<Value, NodeError> {
        let ChunkRegion::Tile { rect } = *region else {
            return Err(NodeError::Other(format!(
                "an image is read by tiles, not {region:?}"
            )));
        };
        let (w, h) = self.reader.size();
        if rect.x + rect.w > w || rect.y + rect.h > h || rect.y < self.top {
            return Err(NodeError::File {
                path: self.path.display().to_string(),
                reason: format!(
                    "part {rect:?} is outside the {w}x{h} image or above the rows still held"
                ),
            });
        }
        // Rows above the part are no longer needed.
        while self.top < rect.y && !self.rows.is_empty() {
            self.rows.pop_front();
            self.top += 1;
        }
        let mut scratch = vec![0f32; w * 3];
        if self.rows.is_empty() {
            while self.reader.rows_read() < rect.y {
                self.reader
                    .read_row(&mut scratch)
                    .map_err(|e| media(e, &self.path))?;
            }
            self.top = self.reader.rows_read();
        }
        while self.top + self.rows.len() < rect.y + rect.h {
            let mut row = vec![0f32; w * 3];
            self.reader
                .read_row(&mut row)
                .map_err(|e| media(e, &self.path))?;
            self.rows.push_back(row);
        }
        let mut data = Vec::with_capacity(rect.h * rect.w * 3);
        for y in rect.y..rect.y + rect.h {
            data.extend_from_slice(&self.rows[y - self.top][rect.x * 3..(rect.x + rect.w) * 3]);
        }
        Ok(Value::image(Tensor::from_vec(
            data,
            (1, rect.h, rect.w, 3),
            &Device::Cpu,
        )?))
    }
}

crate::spec::default_via_new!(LoadImage);
