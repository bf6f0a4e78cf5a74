//! `SaveImage` and `PreviewImage` (ComfyUI names and inputs): write each image of the batch as
//! an 8-bit PNG with the workflow in a `prompt` text chunk, named as ComfyUI names them:
//! `<prefix>_<counter:05>_.png`, the counter one past the highest already in the folder, the
//! prefix's directory part a subfolder of the output folder. Reports ComfyUI's UI record
//! `{"images": [{"filename", "subfolder", "type"}]}`.

use crate::spec::{link, string};
use nova_dataflow::{
    Args, ChunkSpec, DataType, ExecContext, Inputs, JobEnv, Merger, Node, NodeError, NodeOutput,
    NodeSchema, Rect, SinkOp, Sinking, Value, ValueInfo,
};
use serde_json::json;
use std::collections::VecDeque;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;

/// Serializes counter allocation between concurrently running save nodes of this process.
static SAVE_LOCK: Mutex<()> = Mutex::new(());

/// Where a save node writes and how it labels its files.
#[derive(Clone, Copy)]
enum Kind {
    Output,
    Temp,
}

fn save_images(
    kind: Kind,
    prefix: &str,
    inputs: &Inputs<Value>,
    ctx: &ExecContext,
) -> Result<NodeOutput, NodeError> {
    let image = inputs.image("images")?;
    let (b, h, w, c) = image.dims4()?;
    if c != 3 && c != 4 && c != 1 {
        return Err(NodeError::input(
            "images",
            format!("{c} channels cannot be saved as PNG"),
        ));
    }
    let base = match kind {
        Kind::Output => ctx.env.output_dir.clone(),
        Kind::Temp => ctx.env.temp_dir.clone(),
    };
    let prefix = prefix
        .replace("%width%", &w.to_string())
        .replace("%height%", &h.to_string());
    let (subfolder, stem) = split_prefix(&prefix)?;
    let folder = nova_dataflow::output::folder(&base, &subfolder).map_err(|e| NodeError::File {
        path: base.join(&subfolder).display().to_string(),
        reason: e.to_string(),
    })?;
    let text = match &ctx.prompt {
        Some(p) => vec![("prompt".to_string(), ascii_json(&p.to_string()))],
        None => vec![],
    };
    let _guard = SAVE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let first = next_counter(&folder, &stem);
    let mut images = Vec::with_capacity(b);
    for i in 0..b {
        // One image at a time, so a batch never holds a second full copy as bytes.
        // ComfyUI stores `255 * x` clipped and truncated to u8.
        let samples: Vec<u8> = image
            .get(i)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|v| (v * 255.0).clamp(0.0, 255.0) as u8)
            .collect();
        let counter = first + i as u64;
        let name = stem.replace("%batch_num%", &i.to_string());
        let file = format!("{name}_{counter:05}_.png");
        let path = folder.join(&file);
        nova_media::encode_png(&path, w, h, c, &samples, &text).map_err(|e| NodeError::File {
            path: path.display().to_string(),
            reason: e.reason().to_string(),
        })?;
        images.push(json!({
            "filename": file,
            "subfolder": subfolder.to_string_lossy(),
            "type": match kind { Kind::Output => "output", Kind::Temp => "temp" },
        }));
    }
    Ok(NodeOutput {
        values: vec![],
        ui: Some(json!({ "images": images })),
    })
}

/// Where a save node's files go and how they are named, for a batch of `b` images of
/// `w` x `h`: each file's final path, its subfolder and its name, in batch order. The counter
/// is the next free one; each file's temporary name (`<file>.part`) is created here, new, so a
/// concurrent save never takes the same counter and nothing is written through a link.
fn reserve_images(
    kind: Kind,
    prefix: &str,
    (b, h, w): (usize, usize, usize),
    ctx: &ExecContext,
) -> Result<Vec<(PathBuf, std::fs::File, String, String)>, NodeError> {
    let base = match kind {
        Kind::Output => ctx.env.output_dir.clone(),
        Kind::Temp => ctx.env.temp_dir.clone(),
    };
    let prefix = prefix
        .replace("%width%", &w.to_string())
        .replace("%height%", &h.to_string());
    let (subfolder, stem) = split_prefix(&prefix)?;
    let io = |p: &Path, e: std::io::Error| NodeError::File {
        path: p.display().to_string(),
        reason: e.to_string(),
    };
    let folder = nova_dataflow::output::folder(&base, &subfolder)
        .map_err(|e| io(&base.join(&subfolder), e))?;
    let _guard = SAVE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let first = next_counter(&folder, &stem);
    let mut out = Vec::with_capacity(b);
    for i in 0..b {
        let name = stem.replace("%batch_num%", &i.to_string());
        let file = format!("{name}_{:05}_.png", first + i as u64);
        let path = folder.join(&file);
        let part = nova_dataflow::output::part_path(&path);
        match nova_dataflow::output::create_new(&part) {
            Ok(f) => out.push((path, f, subfolder.to_string_lossy().to_string(), file)),
            Err(e) => {
                for (p, ..) in &out {
                    release_reservation(p);
                }
                return Err(io(&part, e));
            }
        }
    }
    Ok(out)
}

/// The rows a PNG sink holds at most: for pieces cut in row-major order with at most
/// `inflight` of them past the first one missing, the rows from that piece's top to the
/// lowest row any of them reaches.
fn band_rows(chunks: &[ChunkSpec], inflight: usize) -> usize {
    let rects: Vec<Rect> = chunks.iter().filter_map(ChunkSpec::rect).collect();
    let k = inflight.max(1);
    (0..rects.len())
        .map(|f| {
            let bottom = rects[f..(f + k).min(rects.len())]
                .iter()
                .map(|r| r.y + r.h)
                .max()
                .unwrap_or(0);
            bottom.saturating_sub(rects[f].y)
        })
        .max()
        .unwrap_or(0)
}

/// Saves images as PNG piece by piece: each tile is quantized into a band of rows as it
/// arrives, and every row whose tiles are all in is compressed into the files at once, so
/// only the band is ever held (ComfyUI's `255 * x`, clipped and truncated, as [`save_images`]).
struct PngSinkOp {
    kind: Kind,
    /// `filename_prefix`; `None` for `PreviewImage` (named after the node).
    prefix: Option<String>,
}

/// Bytes a PNG stream writer holds besides its rows: the deflate window and buffers, and the
/// previous and current filtered rows.
const PNG_WRITER_BYTES: u64 = 320 << 10;

impl SinkOp for PngSinkOp {
    fn memory(&self, input: &ValueInfo, chunks: &[ChunkSpec], inflight: usize) -> u64 {
        let Some(i) = input.image() else {
            return 0;
        };
        let row = (i.width * i.channels) as u64;
        i.batch as u64 * (band_rows(chunks, inflight) as u64 * row + 2 * row + PNG_WRITER_BYTES)
    }

    fn open(
        &self,
        input: &ValueInfo,
        chunks: &[ChunkSpec],
        ctx: &ExecContext,
    ) -> Result<Box<dyn Merger>, NodeError> {
        let i = input
            .image()
            .ok_or_else(|| NodeError::input("images", "expected an IMAGE"))?;
        if !matches!(i.channels, 1 | 3 | 4) {
            return Err(NodeError::input(
                "images",
                format!("{} channels cannot be saved as PNG", i.channels),
            ));
        }
        if chunks.iter().any(|c| c.rect().is_none()) {
            return Err(NodeError::input("images", "a PNG sink takes image tiles"));
        }
        let prefix = match &self.prefix {
            Some(p) => p.clone(),
            None => format!("NOVA_temp_{}", file_safe(&ctx.node_id.0)),
        };
        let text = match &ctx.prompt {
            Some(p) => vec![("prompt".to_string(), ascii_json(&p.to_string()))],
            None => vec![],
        };
        let reserved = reserve_images(self.kind, &prefix, (i.batch, i.height, i.width), ctx)?;
        let mut sink = PngSink {
            info: i,
            kind: self.kind,
            files: Vec::new(),
            band_top: 0,
            band: VecDeque::new(),
            filled: VecDeque::new(),
        };
        let mut reserved = reserved.into_iter();
        while let Some((path, file, subfolder, name)) = reserved.next() {
            match nova_media::PngRows::start(file, &name, i.width, i.height, i.channels, &text) {
                // From here the sink owns the temporary file: dropped unfinished, it goes.
                Ok(rows) => sink.files.push(SinkFile {
                    path,
                    subfolder,
                    name,
                    rows: Some(rows),
                }),
                Err(e) => {
                    release_reservation(&path);
                    for (rest, ..) in reserved {
                        release_reservation(&rest);
                    }
                    return Err(NodeError::File {
                        path: path.display().to_string(),
                        reason: e.reason().to_string(),
                    });
                }
            }
        }
        Ok(Box::new(sink))
    }
}

/// One file of a PNG sink.
struct SinkFile {
    path: PathBuf,
    subfolder: String,
    name: String,
    /// The writer; `None` once ended.
    rows: Option<nova_media::PngRows>,
}

struct PngSink {
    info: nova_dataflow::ImageInfo,
    kind: Kind,
    files: Vec<SinkFile>,
    /// The first row not yet written.
    band_top: usize,
    /// Per held row (from `band_top`): its bytes for every image of the batch, one after
    /// another.
    band: VecDeque<Vec<u8>>,
    /// Per held row: pixels filled so far.
    filled: VecDeque<usize>,
}

impl Merger for PngSink {
    fn add(&mut self, chunk: &ChunkSpec, part: Value) -> Result<(), NodeError> {
        let rect = chunk
            .rect()
            .ok_or_else(|| NodeError::input("images", "a PNG sink takes image tiles"))?;
        let nova_dataflow::ImageInfo {
            batch: b,
            height: h,
            width: w,
            channels: c,
        } = self.info;
        if rect.x + rect.w > w || rect.y + rect.h > h || rect.y < self.band_top {
            return Err(NodeError::Other(format!(
                "tile {rect:?} lies outside the rows still open of the {w}x{h} image"
            )));
        }
        let t = part
            .as_image()
            .ok_or_else(|| NodeError::input("images", "expected an IMAGE"))?;
        let data = t.flatten_all()?.to_vec1::<f32>()?;
        if data.len() != b * rect.h * rect.w * c {
            return Err(NodeError::Other(format!(
                "tile {rect:?} has {} values, expected {}",
                data.len(),
                b * rect.h * rect.w * c
            )));
        }
        let row = w * c;
        while self.band_top + self.band.len() < rect.y + rect.h {
            self.band.push_back(vec![0u8; b * row]);
            self.filled.push_back(0);
        }
        for bi in 0..b {
            for y in 0..rect.h {
                let src = &data[((bi * rect.h + y) * rect.w) * c..][..rect.w * c];
                let held = &mut self.band[rect.y + y - self.band_top];
                let dst = &mut held[bi * row + rect.x * c..][..rect.w * c];
                for (d, v) in dst.iter_mut().zip(src) {
                    *d = (v * 255.0).clamp(0.0, 255.0) as u8;
                }
            }
        }
        for y in 0..rect.h {
            self.filled[rect.y + y - self.band_top] += rect.w;
        }
        // Every row now complete at the top of the band goes to the files.
        let mut done = 0;
        while self.filled.get(done).is_some_and(|f| *f >= w) {
            done += 1;
        }
        if done > 0 {
            let rows: Vec<Vec<u8>> = self.band.drain(..done).collect();
            self.filled.drain(..done);
            for (bi, f) in self.files.iter_mut().enumerate() {
                let mut bytes = Vec::with_capacity(done * row);
                for r in &rows {
                    bytes.extend_from_slice(&r[bi * row..(bi + 1) * row]);
                }
                if let Some(rows) = f.rows.as_mut() {
                    rows.write_rows(&bytes).map_err(|e| NodeError::File {
                        path: f.path.display().to_string(),
                        reason: e.reason().to_string(),
                    })?;
                }
            }
            self.band_top += done;
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<Value, NodeError> {
        self.finish_output().map(|_| Value::Boolean(true))
    }

    fn finish_output(mut self: Box<Self>) -> Result<NodeOutput, NodeError> {
        let mut images = Vec::with_capacity(self.files.len());
        for f in &mut self.files {
            let file_err = |reason: String| NodeError::File {
                path: f.path.display().to_string(),
                reason,
            };
            let rows = f
                .rows
                .take()
                .ok_or_else(|| file_err("ended twice".into()))?;
            rows.finish()
                .map_err(|e| file_err(e.reason().to_string()))?;
            std::fs::rename(nova_dataflow::output::part_path(&f.path), &f.path)
                .map_err(|e| file_err(e.to_string()))?;
            images.push(json!({
                "filename": f.name,
                "subfolder": f.subfolder,
                "type": match self.kind { Kind::Output => "output", Kind::Temp => "temp" },
            }));
        }
        self.files.clear();
        Ok(NodeOutput {
            values: vec![],
            ui: Some(json!({ "images": images })),
        })
    }
}

impl Drop for PngSink {
    fn drop(&mut self) {
        // Files not ended (the job failed or stopped) leave nothing behind.
        for f in &self.files {
            if f.rows.is_some() {
                release_reservation(&f.path);
            }
        }
    }
}

/// JSON text with every non-ASCII character escaped as `\uXXXX` (surrogate pairs beyond the
/// BMP), as ComfyUI's `json.dumps` writes it: PNG `tEXt` chunks hold Latin-1 only, and the
/// escaped text parses back to the same JSON.
pub(crate) fn ascii_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        if ch.is_ascii() {
            out.push(ch);
        } else {
            let mut units = [0u16; 2];
            for u in ch.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    out
}

/// A node id made safe for a file name: anything but ASCII letters, digits, `-` and `_`
/// becomes `_`.
fn file_safe(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The longest `filename_prefix`, and the longest single folder or file name in it (file
/// systems take 255 bytes per name; the counter and extension need the rest).
const MAX_PREFIX: usize = 1024;
const MAX_NAME: usize = 200;

/// Splits `sub/dir/name` into a safe subfolder and a file stem. Checked when the workflow is
/// validated: a prefix that could not be written (a NUL, a name too long for the file system,
/// `..` or an absolute path) fails before any work, not after it.
pub(crate) fn split_prefix(prefix: &str) -> Result<(PathBuf, String), NodeError> {
    let bad = |m: String| NodeError::input("filename_prefix", m);
    if prefix.contains('\0') {
        return Err(bad("contains a NUL character".into()));
    }
    if prefix.len() > MAX_PREFIX {
        return Err(bad(format!(
            "is {} bytes long; at most {MAX_PREFIX}",
            prefix.len()
        )));
    }
    let p = Path::new(prefix);
    if p.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(bad(format!(
            "'{prefix}' must stay inside the output folder (no '..' or absolute path)"
        )));
    }
    if let Some(long) = p.components().find(|c| c.as_os_str().len() > MAX_NAME) {
        return Err(bad(format!(
            "the name '{}…' is {} bytes long; at most {MAX_NAME} per folder or file name",
            long.as_os_str()
                .to_string_lossy()
                .chars()
                .take(32)
                .collect::<String>(),
            long.as_os_str().len()
        )));
    }
    let stem = p
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad("empty file name".into()))?;
    Ok((p.parent().map(Path::to_path_buf).unwrap_or_default(), stem))
}

/// Reserves the next `<stem>_<counter>_.<ext>` file for `prefix` under `base`: creates its
/// temporary name (`<file>.part`, new, so concurrent saves never pick the same counter and no
/// link is written through) for the writer to fill and rename. Returns the final path, the
/// subfolder and the file name, for ComfyUI's UI record. A writer that fails removes the
/// `.part` file, so nothing is left under either name.
pub(crate) fn reserve_file(
    base: &Path,
    prefix: &str,
    ext: &str,
) -> Result<(PathBuf, String, String), NodeError> {
    let (subfolder, stem) = split_prefix(prefix)?;
    let io = |e: std::io::Error| NodeError::File {
        path: base.join(&subfolder).display().to_string(),
        reason: e.to_string(),
    };
    let folder = nova_dataflow::output::folder(base, &subfolder).map_err(io)?;
    let _guard = SAVE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let counter = next_counter(&folder, &stem);
    let file = format!("{stem}_{counter:05}_.{ext}");
    let path = folder.join(&file);
    nova_dataflow::output::create_new(&nova_dataflow::output::part_path(&path)).map_err(io)?;
    Ok((path, subfolder.to_string_lossy().to_string(), file))
}

/// Removes the temporary file of a reservation whose writer could not start.
pub(crate) fn release_reservation(path: &Path) {
    let _ = std::fs::remove_file(nova_dataflow::output::part_path(path));
}

/// One past the highest counter of `<stem>_<counter>_` files in `folder`.
pub(crate) fn next_counter(folder: &Path, stem: &str) -> u64 {
    let probe = stem.replace("%batch_num%", "");
    let max = std::fs::read_dir(folder)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let rest = name.strip_prefix(&probe)?.strip_prefix('_')?;
            rest.split('_').next()?.parse::<u64>().ok()
        })
        .max()
        .unwrap_or(0);
    max + 1
}

/// `SaveImage`.
pub struct SaveImage {
    schema: NodeSchema,
}

impl SaveImage {
    pub fn new() -> Self {
        SaveImage {
            schema: NodeSchema {
                class_type: "SaveImage",
                display_name: "Save Image",
                category: "image",
                description: "Saves images to the output folder as PNG.",
                inputs: vec![
                    link("images", DataType::Image),
                    string("filename_prefix", "ComfyUI"),
                ],
                outputs: vec![],
                output_node: true,
            },
        }
    }
}

impl Node for SaveImage {
    fn schema(&self) -> &NodeSchema {
        &self.schema
    }

    fn check(&self, args: &Args, _env: &JobEnv) -> Result<(), NodeError> {
        split_prefix(args.string("filename_prefix")?).map(|_| ())
    }

    fn sink(&self, args: &Args, _inputs: &Inputs<ValueInfo>, _env: &JobEnv) -> Option<Sinking> {
        Some(Sinking {
            input: "images",
            op: Arc::new(PngSinkOp {
                kind: Kind::Output,
                prefix: Some(args.string("filename_prefix").ok()?.to_string()),
            }),
        })
    }

    fn execute(
        &self,
        args: &Args,
        inputs: Inputs<Value>,
        ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        save_images(Kind::Output, args.string("filename_prefix")?, &inputs, ctx)
    }
}

/// `PreviewImage`: like `SaveImage`, into the temp folder.
pub struct PreviewImage {
    schema: NodeSchema,
}

impl PreviewImage {
    pub fn new() -> Self {
        PreviewImage {
            schema: NodeSchema {
                class_type: "PreviewImage",
                display_name: "Preview Image",
                category: "image",
                description: "Saves images to the temp folder for preview.",
                inputs: vec![link("images", DataType::Image)],
                outputs: vec![],
                output_node: true,
            },
        }
    }
}

impl Node for PreviewImage {
    fn schema(&self) -> &NodeSchema {
        &self.schema
    }

    fn sink(&self, _args: &Args, _inputs: &Inputs<ValueInfo>, _env: &JobEnv) -> Option<Sinking> {
        Some(Sinking {
            input: "images",
            op: Arc::new(PngSinkOp {
                kind: Kind::Temp,
                prefix: None,
            }),
        })
    }

    fn execute(
        &self,
        _args: &Args,
        inputs: Inputs<Value>,
        ctx: &ExecContext,
    ) -> Result<NodeOutput, NodeError> {
        let prefix = format!("NOVA_temp_{}", file_safe(&ctx.node_id.0));
        save_images(Kind::Temp, &prefix, &inputs, ctx)
    }
}

crate::spec::default_via_new!(SaveImage, PreviewImage);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_with_subfolder_splits() {
        let (sub, stem) = split_prefix("runs/blur").unwrap();
        assert_eq!(sub, PathBuf::from("runs"));
        assert_eq!(stem, "blur");
    }

    #[test]
    fn escaping_prefix_is_refused() {
        assert!(split_prefix("../evil").is_err());
        assert!(split_prefix("/abs/evil").is_err());
        assert!(split_prefix("a\0b").is_err());
        assert!(split_prefix(&"x".repeat(201)).is_err());
        assert!(split_prefix(&format!("{}/x", "d/".repeat(600))).is_err());
        assert!(split_prefix(&"x".repeat(200)).is_ok());
    }

    #[test]
    fn non_ascii_prompt_text_is_escaped_and_parses_back() {
        let v = serde_json::json!({"1": {"inputs": {"text": "café 東京 🎨"}}});
        let text = ascii_json(&v.to_string());
        assert!(text.is_ascii(), "{text}");
        assert!(text.contains("caf\\u00e9"), "{text}");
        assert!(text.contains("\\ud83c\\udfa8"), "{text}");
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn node_ids_become_safe_file_names() {
        assert_eq!(file_safe("../x/é 1"), "___x___1");
        assert_eq!(file_safe("12:sub-a_b"), "12_sub-a_b");
    }

    #[test]
    fn counter_continues_after_existing_files() {
        let dir = std::env::temp_dir().join(format!("nova-save-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pic_00007_.png"), b"x").unwrap();
        std::fs::write(dir.join("other_00099_.png"), b"x").unwrap();
        assert_eq!(next_counter(&dir, "pic"), 8);
        assert_eq!(next_counter(&dir, "fresh"), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
