//! Where model files are looked for: the models folder (laid out as ComfyUI's `models/`), then
//! the extra folders of a ComfyUI `extra_model_paths.yaml` file, so an existing ComfyUI or
//! A1111 model collection is used where it lies.
//!
//! The file format is ComfyUI's: top-level sections (any names), each a map with an optional
//! `base_path` (relative to the file's folder; `~` is the home folder), an optional
//! `is_default` (accepted, ignored: the models folder always comes first), and one key per
//! model kind (`checkpoints`, `vae`, `vae_approx`, `upscale_models`, ...) whose value is a
//! folder or several, one per line (YAML's `|` block), relative to `base_path`. ComfyUI's
//! older kind names `unet` and `clip` count as `diffusion_models` and `text_encoders`.
//!
//! Invariant: a name given in a workflow resolves inside one of the kind's folders, never
//! outside (see [`crate::JobEnv::resolve_in`]).
//!
//! Dependency: `yaml-rust2` (a maintained, pure-Rust YAML 1.2 parser; ComfyUI users already
//! have their paths in YAML).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use yaml_rust2::{Yaml, YamlLoader};

/// Why an extra-model-paths file could not be used: the file and what is wrong where.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("extra model paths file '{file}': {reason}")]
pub struct ModelPathsError {
    pub file: String,
    pub reason: String,
}

/// Extra model folders by kind, in the order the file gives them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelPaths {
    extra: BTreeMap<String, Vec<PathBuf>>,
}

impl ModelPaths {
    /// No extra folders.
    pub fn none() -> ModelPaths {
        ModelPaths::default()
    }

    /// Reads a ComfyUI `extra_model_paths.yaml`.
    pub fn load(path: &Path) -> Result<ModelPaths, ModelPathsError> {
        let err = |reason: String| ModelPathsError {
            file: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).map_err(err)
    }

    /// Parses the file's text; relative `base_path`s are taken from `dir`.
    pub fn parse(text: &str, dir: &Path) -> Result<ModelPaths, String> {
        let docs = YamlLoader::load_from_str(text).map_err(|e| {
            let m = e.marker();
            format!("line {}, column {}: {}", m.line(), m.col() + 1, e.info())
        })?;
        let mut paths = ModelPaths::default();
        let Some(doc) = docs.first() else {
            return Ok(paths);
        };
        let sections = match doc {
            Yaml::Hash(h) => h,
            Yaml::Null => return Ok(paths),
            _ => return Err("expected a map of sections at the top".into()),
        };
        for (name, body) in sections {
            let section = key_name(name)?;
            let Yaml::Hash(entries) = body else {
                if matches!(body, Yaml::Null) {
                    continue;
                }
                return Err(format!("section '{section}': expected a map of folders"));
            };
            let mut base = dir.to_path_buf();
            if let Some(b) = entries.get(&Yaml::String("base_path".into())) {
                let b = b
                    .as_str()
                    .ok_or_else(|| format!("section '{section}', base_path: expected a path"))?;
                base = dir.join(expand_home(b.trim()));
            }
            for (key, value) in entries {
                let kind = key_name(key)?;
                if kind == "base_path" || kind == "is_default" {
                    continue;
                }
                let text = value.as_str().ok_or_else(|| {
                    format!("section '{section}', {kind}: expected a folder or lines of folders")
                })?;
                let kind = match kind.as_str() {
                    "unet" => "diffusion_models".to_string(),
                    "clip" => "text_encoders".to_string(),
                    _ => kind,
                };
                let folders = paths.extra.entry(kind).or_default();
                for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                    folders.push(base.join(expand_home(line)));
                }
            }
        }
        Ok(paths)
    }

    /// The extra folders of a model kind.
    pub fn extra(&self, kind: &str) -> &[PathBuf] {
        self.extra.get(kind).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Whether no extra folder is configured.
    pub fn is_empty(&self) -> bool {
        self.extra.is_empty()
    }
}

fn key_name(k: &Yaml) -> Result<String, String> {
    match k {
        Yaml::String(s) => Ok(s.clone()),
        Yaml::Integer(i) => Ok(i.to_string()),
        other => Err(format!("expected a name as key, got {other:?}")),
    }
}

fn expand_home(p: &str) -> PathBuf {
    match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comfyuis_example_layout_is_read_with_bases_and_multiline_folders() {
        let text = "\
comfyui:
    base_path: /srv/ComfyUI/
    is_default: true
    checkpoints: models/checkpoints/
    vae_approx: models/vae_approx
    unet: models/unet
a111:
    base_path: webui
    checkpoints: models/Stable-diffusion
    upscale_models: |
                  models/ESRGAN
                  models/RealESRGAN
";
        let p = ModelPaths::parse(text, Path::new("/etc/nova")).unwrap();
        assert_eq!(
            p.extra("checkpoints"),
            [
                PathBuf::from("/srv/ComfyUI/models/checkpoints/"),
                PathBuf::from("/etc/nova/webui/models/Stable-diffusion"),
            ]
        );
        assert_eq!(
            p.extra("upscale_models"),
            [
                PathBuf::from("/etc/nova/webui/models/ESRGAN"),
                PathBuf::from("/etc/nova/webui/models/RealESRGAN"),
            ]
        );
        assert_eq!(
            p.extra("diffusion_models"),
            [PathBuf::from("/srv/ComfyUI/models/unet")]
        );
        assert!(p.extra("loras").is_empty());
    }

    #[test]
    fn bad_files_name_the_place() {
        let e = ModelPaths::parse("a:\n  checkpoints: [x, y]\n", Path::new(".")).unwrap_err();
        assert!(e.contains("section 'a', checkpoints"), "{e}");
        let e = ModelPaths::parse("a: {b: c\n", Path::new(".")).unwrap_err();
        assert!(e.starts_with("line "), "{e}");
        let e = ModelPaths::parse("- x\n", Path::new(".")).unwrap_err();
        assert!(e.contains("map of sections"), "{e}");
        let e = ModelPaths::load(Path::new("/nonexistent/extra.yaml")).unwrap_err();
        assert_eq!(e.file, "/nonexistent/extra.yaml");
        assert!(ModelPaths::parse("", Path::new(".")).unwrap().is_empty());
    }
}
