//! The persistent model index: every `.safetensors` file under the models folders, with its
//! size, modification time, SHA-256 (the hash model hubs publish), tensor names, shapes and
//! dtypes from the safetensors header, and compatibility tags.
//!
//! Invariants:
//! - The index lives in the queue database (`models` table) and survives restarts; a refresh
//!   re-reads only files whose size or modification time changed, and drops entries of files
//!   that are gone.
//! - Only the header is parsed (through a memory map); tensors are never read. Hashing reads
//!   the file once, sequentially, on the warm-up thread, never on a request.
//! - Folders are ComfyUI's (`checkpoints/`, `upscale_models/`, `vae_approx/`, ...) under the
//!   data folder's `models/`, then the extra model paths.

use super::store::Store;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

/// One tensor of a model file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct TensorEntry {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

/// One model file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct ModelEntry {
    pub path: String,
    /// The models folder kind (`upscale_models`, ...).
    pub folder: String,
    /// The name a workflow uses: relative to the folder.
    pub name: String,
    pub size: u64,
    pub mtime_ms: u64,
    pub sha256: String,
    /// `__metadata__` of the header.
    pub metadata: BTreeMap<String, String>,
    pub tensors: Vec<TensorEntry>,
    /// What the file is for, from its folder and tensor names (`sd1`, `vae`, `esrgan`, ...)
    /// and dtypes (`f16`, ...).
    pub tags: Vec<String>,
    /// Why the header could not be read, if it could not.
    pub error: Option<String>,
}

/// What a refresh did.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct RefreshReport {
    pub files: usize,
    pub read: usize,
    pub unchanged: usize,
    pub removed: usize,
    pub ms: f64,
}

/// The index in memory (a copy of the database table).
#[derive(Default)]
pub(crate) struct ModelIndex {
    entries: RwLock<BTreeMap<String, ModelEntry>>,
}

impl ModelIndex {
    /// Loads the persisted index.
    pub(crate) fn load(store: &Store) -> ModelIndex {
        let mut map = BTreeMap::new();
        if let Ok(rows) = store.models() {
            for (k, v) in rows {
                if let Ok(e) = serde_json::from_slice::<ModelEntry>(&v) {
                    map.insert(k, e);
                }
            }
        }
        ModelIndex {
            entries: RwLock::new(map),
        }
    }

    pub(crate) fn entries(&self) -> Vec<ModelEntry> {
        self.entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Rescans `roots` (folder kind, directory) and updates changed entries.
    pub(crate) fn refresh(&self, store: &Store, roots: &[(String, PathBuf)]) -> RefreshReport {
        let t = std::time::Instant::now();
        let mut report = RefreshReport::default();
        let mut found: BTreeMap<String, (String, String, u64, u64)> = BTreeMap::new();
        for (kind, dir) in roots {
            for path in walk(dir) {
                let Ok(meta) = std::fs::metadata(&path) else {
                    continue;
                };
                let mtime = meta
                    .modified()
                    .ok()
                    .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                let name = path
                    .strip_prefix(dir)
                    .map(|p| p.to_string_lossy().to_string())
                    .unwrap_or_default();
                found.entry(path.to_string_lossy().to_string()).or_insert((
                    kind.clone(),
                    name,
                    meta.len(),
                    mtime,
                ));
            }
        }
        report.files = found.len();
        let old = self
            .entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut put = vec![];
        let mut next = BTreeMap::new();
        for (path, (kind, name, size, mtime)) in found {
            match old.get(&path) {
                Some(e) if e.size == size && e.mtime_ms == mtime && e.folder == kind => {
                    report.unchanged += 1;
                    next.insert(path, e.clone());
                }
                _ => {
                    report.read += 1;
                    let e = read_entry(Path::new(&path), &kind, &name, size, mtime);
                    if let Ok(bytes) = serde_json::to_vec(&e) {
                        put.push((path.clone(), bytes));
                    }
                    next.insert(path, e);
                }
            }
        }
        let removed: Vec<String> = old
            .keys()
            .filter(|k| !next.contains_key(*k))
            .cloned()
            .collect();
        report.removed = removed.len();
        if !put.is_empty() || !removed.is_empty() {
            if let Err(e) = store.update_models(put, removed) {
                eprintln!("nova serve: saving the model index: {e}");
            }
        }
        *self.entries.write().unwrap_or_else(|p| p.into_inner()) = next;
        report.ms = t.elapsed().as_secs_f64() * 1e3;
        report
    }
}

/// `.safetensors`/`.sft` files under `dir`, recursively (links are not followed out of it).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            let p = e.path();
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file()
                && p.extension()
                    .is_some_and(|x| x == "safetensors" || x == "sft")
            {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn read_entry(path: &Path, kind: &str, name: &str, size: u64, mtime: u64) -> ModelEntry {
    let mut e = ModelEntry {
        path: path.to_string_lossy().to_string(),
        folder: kind.to_string(),
        name: name.to_string(),
        size,
        mtime_ms: mtime,
        sha256: String::new(),
        metadata: BTreeMap::new(),
        tensors: vec![],
        tags: vec![],
        error: None,
    };
    match header(path) {
        Ok((tensors, metadata)) => {
            e.tensors = tensors;
            e.metadata = metadata;
        }
        Err(m) => e.error = Some(m),
    }
    match sha256(path) {
        Ok(h) => e.sha256 = h,
        Err(m) => {
            e.error.get_or_insert(m);
        }
    }
    e.tags = tags(kind, &e.tensors);
    e
}

fn header(path: &Path) -> Result<(Vec<TensorEntry>, BTreeMap<String, String>), String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    // SAFETY: the map is read-only and dropped before this function returns; a file changed
    // underneath is caught by the header parser's bounds checks or the next refresh.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| e.to_string())?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&map[..])
        .map_err(|e| format!("not a safetensors file: {e}"))?;
    let mut tensors: Vec<TensorEntry> = meta
        .tensors()
        .into_iter()
        .map(|(name, info)| TensorEntry {
            name,
            dtype: format!("{:?}", info.dtype),
            shape: info.shape.clone(),
        })
        .collect();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let metadata = meta
        .metadata()
        .clone()
        .map(|m| m.into_iter().collect())
        .unwrap_or_default();
    Ok((tensors, metadata))
}

fn sha256(path: &Path) -> Result<String, String> {
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Compatibility tags from the folder and the tensor names.
pub(crate) fn tags(folder: &str, tensors: &[TensorEntry]) -> Vec<String> {
    let mut t = vec![];
    let has = |prefix: &str| tensors.iter().any(|x| x.name.starts_with(prefix));
    if has("model.diffusion_model.") {
        t.push("sd1-unet");
    }
    if has("first_stage_model.") || has("decoder.conv_in") {
        t.push("vae");
    }
    if has("cond_stage_model.") || has("text_model.") {
        t.push("clip-text");
    }
    if has("model.diffusion_model.") && has("first_stage_model.") && has("cond_stage_model.") {
        t.push("checkpoint");
    }
    if has("body.0.") && !has("body.0.rdb") {
        t.push("esrgan-compact");
    }
    if has("RRDB_trunk.") || has("body.0.rdb1.") || has("model.1.sub.") {
        t.push("esrgan-rrdb");
    }
    if has("block0.conv0.") || has("flownet.") {
        t.push("rife");
    }
    match folder {
        "upscale_models" => t.push("upscale"),
        "vae_approx" => t.push("taesd"),
        "frame_interpolation" => t.push("frame-interpolation"),
        _ => {}
    }
    let mut out: Vec<String> = t.into_iter().map(String::from).collect();
    let mut dtypes: Vec<String> = tensors.iter().map(|x| x.dtype.to_lowercase()).collect();
    dtypes.sort();
    dtypes.dedup();
    out.extend(dtypes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str) -> TensorEntry {
        TensorEntry {
            name: name.into(),
            dtype: "F16".into(),
            shape: vec![1],
        }
    }

    #[test]
    fn tags_come_from_tensor_names_folder_and_dtypes() {
        let sd = [
            t("model.diffusion_model.input_blocks.0.0.weight"),
            t("first_stage_model.decoder.conv_in.weight"),
            t("cond_stage_model.transformer.text_model.x"),
        ];
        let got = tags("checkpoints", &sd);
        for want in ["sd1-unet", "vae", "clip-text", "checkpoint", "f16"] {
            assert!(got.iter().any(|x| x == want), "{want} in {got:?}");
        }
        let esr = tags("upscale_models", &[t("body.0.weight")]);
        assert!(
            esr.contains(&"esrgan-compact".to_string()) && esr.contains(&"upscale".to_string())
        );
    }
}
