//! Model weights from safetensors files: memory-mapped (memmap2), the header parsed and
//! checked by the `safetensors` crate, tensors read by name only when asked for.
//!
//! Invariant: opening a file checks everything a later read relies on (header size and
//! syntax, every tensor's dtype and byte range), so a bad file is refused at validation with
//! its path and the problem, never half-way through a run. Only safetensors are read: no
//! pickle, no code execution from model files.
//!
//! Safety: the file is mapped read-only; like every memory-mapped loader, NOVA assumes model
//! files are not modified while a run reads them.

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use nova_dataflow::{NodeError, WeightSource};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Headers larger than this are refused before mapping (real headers are kilobytes).
const MAX_HEADER: u64 = 100 << 20;

struct Entry {
    dtype: DType,
    shape: Vec<usize>,
    /// Byte range within the mapped file.
    start: usize,
    end: usize,
}

/// A memory-mapped safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    map: Mmap,
    tensors: BTreeMap<String, Entry>,
    order: Vec<String>,
    metadata: BTreeMap<String, String>,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> NodeError {
    NodeError::File {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

impl SafetensorsFile {
    /// Maps and checks `path`.
    pub fn open(path: &Path) -> Result<SafetensorsFile, NodeError> {
        let file = std::fs::File::open(path).map_err(|e| bad(path, e.to_string()))?;
        let len = file.metadata().map_err(|e| bad(path, e.to_string()))?.len();
        if len < 8 {
            return Err(bad(
                path,
                format!("{len} bytes is too short for a safetensors file (no header length)"),
            ));
        }
        // SAFETY: read-only map of a regular file; see the module docs.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| bad(path, e.to_string()))?;
        let header = u64::from_le_bytes(map[..8].try_into().expect("8 bytes checked above"));
        if header > MAX_HEADER {
            return Err(bad(
                path,
                format!("header of {header} bytes at byte offset 0 is over the {MAX_HEADER}-byte limit (not a safetensors file?)"),
            ));
        }
        if 8 + header > len {
            return Err(bad(
                path,
                format!("truncated: the header needs {header} bytes after byte offset 8, but the file has {len} bytes"),
            ));
        }
        let (n, meta) = SafeTensors::read_metadata(&map)
            .map_err(|e| bad(path, format!("invalid safetensors header: {e}")))?;
        let data_start = 8 + n;
        let mut tensors = BTreeMap::new();
        let mut order: Vec<(usize, String)> = Vec::new();
        for (name, info) in meta.tensors() {
            let dtype = match info.dtype {
                Dtype::F32 => DType::F32,
                Dtype::F16 => DType::F16,
                Dtype::BF16 => DType::BF16,
                Dtype::F64 => DType::F64,
                // Index tensors some checkpoints carry (e.g. CLIP's position_ids).
                Dtype::I64 => DType::I64,
                Dtype::U32 => DType::U32,
                Dtype::U8 => DType::U8,
                other => {
                    return Err(bad(
                        path,
                        format!("tensor '{name}' has dtype {other:?}; NOVA reads F32, F16, BF16, F64, I64, U32 and U8 tensors"),
                    ))
                }
            };
            let (s, e) = info.data_offsets;
            let (start, end) = (data_start + s, data_start + e);
            if end > map.len() {
                return Err(bad(
                    path,
                    format!("truncated: tensor '{name}' ends at byte offset {end}, past the end of the {}-byte file", map.len()),
                ));
            }
            order.push((s, name.clone()));
            tensors.insert(
                name.clone(),
                Entry {
                    dtype,
                    shape: info.shape.clone(),
                    start,
                    end,
                },
            );
        }
        order.sort();
        let metadata = meta
            .metadata()
            .clone()
            .map(|m| m.into_iter().collect())
            .unwrap_or_default();
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            map,
            tensors,
            order: order.into_iter().map(|(_, n)| n).collect(),
            metadata,
        })
    }

    /// A tensor's shape, if the file has it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|e| e.shape.as_slice())
    }

    /// The free-form `__metadata__` of the header.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Checks that `name` exists with `shape`, naming the tensor otherwise.
    pub fn expect(&self, name: &str, shape: &[usize]) -> Result<(), NodeError> {
        match self.shape(name) {
            None => Err(bad(&self.path, format!("tensor '{name}' is missing"))),
            Some(s) if s != shape => Err(bad(
                &self.path,
                format!("tensor '{name}' has shape {s:?}, expected {shape:?}"),
            )),
            Some(_) => Ok(()),
        }
    }
}

impl WeightSource for SafetensorsFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn names(&self) -> Vec<String> {
        self.order.clone()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|e| e.shape.clone())
    }

    fn f32_bytes(&self, name: &str) -> Option<u64> {
        self.tensors
            .get(name)
            .map(|e| e.shape.iter().product::<usize>() as u64 * 4)
    }

    fn read(&self, name: &str) -> Result<Tensor, NodeError> {
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| bad(&self.path, format!("tensor '{name}' is missing")))?;
        let t = Tensor::from_raw_buffer(&self.map[e.start..e.end], e.dtype, &e.shape, &Device::Cpu)
            .map_err(|err| bad(&self.path, format!("tensor '{name}': {err}")))?;
        Ok(t.to_dtype(DType::F32)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn valid() -> Vec<u8> {
        let header = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header);
        b.extend_from_slice(&1.5f32.to_le_bytes());
        b.extend_from_slice(&(-2.0f32).to_le_bytes());
        b
    }

    #[test]
    fn tensors_are_read_by_name_and_bad_files_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let f = SafetensorsFile::open(&write(dir.path(), "ok.safetensors", &valid())).unwrap();
        assert_eq!(f.read("w").unwrap().to_vec1::<f32>().unwrap(), [1.5, -2.0]);
        assert_eq!(f.f32_bytes("w"), Some(8));
        f.expect("w", &[2]).unwrap();
        let e = f.expect("w", &[3]).unwrap_err().to_string();
        assert!(e.contains("tensor 'w' has shape [2], expected [3]"), "{e}");
        assert!(f
            .expect("v", &[2])
            .unwrap_err()
            .to_string()
            .contains("'v' is missing"));

        let cut = valid();
        let p = write(dir.path(), "cut.safetensors", &cut[..cut.len() - 4]);
        let e = SafetensorsFile::open(&p).unwrap_err().to_string();
        assert!(
            e.contains("cut.safetensors") && e.contains("invalid safetensors header"),
            "{e}"
        );

        let mut huge = valid();
        huge[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let p = write(dir.path(), "huge.safetensors", &huge);
        let e = SafetensorsFile::open(&p).unwrap_err().to_string();
        assert!(e.contains("over the") && e.contains("byte offset 0"), "{e}");

        let mut short = valid();
        short[..8].copy_from_slice(&4096u64.to_le_bytes());
        let p = write(dir.path(), "short.safetensors", &short);
        let e = SafetensorsFile::open(&p).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");

        let p = write(dir.path(), "tiny.safetensors", b"abc");
        let e = SafetensorsFile::open(&p).unwrap_err().to_string();
        assert!(e.contains("too short"), "{e}");

        let header = br#"{"w":{"dtype":"BOOL","shape":[8],"data_offsets":[0,8]}}"#;
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header);
        b.extend_from_slice(&[0u8; 8]);
        let p = write(dir.path(), "int.safetensors", &b);
        let e = SafetensorsFile::open(&p).unwrap_err().to_string();
        assert!(e.contains("tensor 'w' has dtype BOOL"), "{e}");
    }
}
