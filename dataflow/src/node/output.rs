//! Writing inside an output folder: no link is followed out of it, and nothing half-written
//! is left behind.
//!
//! Invariants (every node that writes files goes through here; reads have the same rule in
//! [`crate::JobEnv::resolve_in`]):
//! - A subfolder named by a workflow (`filename_prefix: "sub/dir/name"`) is created component
//!   by component under the base folder; a component that exists as a symbolic link (or as
//!   anything but a folder) is refused, so `out/link → elsewhere` never leads a write
//!   elsewhere. The base folder itself is the operator's choice and may be a link.
//! - New files are created with `O_CREAT | O_EXCL` ([`create_new`]), which never follows a
//!   link at the last component either.
//! - A file is written under a temporary name (`<final>.part`) and renamed into place when
//!   complete ([`write_atomically`]); a failed write (a full disk included) removes the
//!   temporary file, so no 0-byte or truncated output is ever left under a final name.

use std::io::Write;
use std::path::{Component, Path, PathBuf};

/// Creates `base/sub` (a relative path of plain components) without following links: each
/// component must be a real folder or not exist yet. Returns the folder.
pub fn folder(base: &Path, sub: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(base)?;
    let mut dir = base.to_path_buf();
    for c in sub.components() {
        let Component::Normal(part) = c else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("'{}' must be a plain relative path", sub.display()),
            ));
        };
        dir.push(part);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!(
                        "{} is a symbolic link; outputs are not written through links",
                        dir.display()
                    ),
                ))
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a folder", dir.display()),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match std::fs::create_dir(&dir) {
                Ok(()) => {}
                // Another save created it meanwhile: check it again.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if std::fs::symlink_metadata(&dir)?.file_type().is_symlink() {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::PermissionDenied,
                            format!("{} is a symbolic link", dir.display()),
                        ));
                    }
                }
                Err(e) => return Err(e),
            },
            Err(e) => return Err(e),
        }
    }
    Ok(dir)
}

/// [`folder`] for a folder given whole: `dir` must lie (lexically) inside `base`.
pub fn create_dirs_nofollow(base: &Path, dir: &Path) -> std::io::Result<PathBuf> {
    let sub = dir.strip_prefix(base).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not inside {}", dir.display(), base.display()),
        )
    })?;
    folder(base, sub)
}

/// Creates a new file, failing if anything (a link included) is already there.
pub fn create_new(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

/// The temporary name a file is written under before it is renamed to `path`.
pub fn part_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".part");
    PathBuf::from(p)
}

/// Writes `path` through `write` under its temporary name ([`part_path`], created new) and
/// renames it into place; on any failure the temporary file is removed and nothing is left.
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let tmp = part_path(path);
    // A `.part` left by a crash (or a link planted in its place) is removed, not followed.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let file = create_new(&tmp)?;
    let result = (|| {
        let mut w = std::io::BufWriter::new(file);
        write(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// [`write_atomically`] of a byte buffer.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomically(path, |w| w.write_all(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_inside_the_base_are_never_followed() {
        let base = tempfile_dir("base");
        let elsewhere = tempfile_dir("elsewhere");
        std::os::unix::fs::symlink(&elsewhere, base.join("link")).unwrap();
        assert!(folder(&base, Path::new("link")).is_err());
        assert!(folder(&base, Path::new("link/deeper")).is_err());
        assert!(folder(&base, Path::new("../x")).is_err());
        let made = folder(&base, Path::new("a/b")).unwrap();
        assert!(made.is_dir() && made.starts_with(&base));
        // The last component: a link planted where a new file goes is not written through.
        std::os::unix::fs::symlink(elsewhere.join("target"), base.join("a/f.png")).unwrap();
        assert!(create_new(&base.join("a/f.png")).is_err());
        assert!(!elsewhere.join("target").exists());
        std::fs::remove_dir_all(&base).unwrap();
        std::fs::remove_dir_all(&elsewhere).unwrap();
    }

    #[test]
    fn a_failed_write_leaves_nothing_behind() {
        let base = tempfile_dir("atomic");
        let path = base.join("out.bin");
        let r = write_atomically(&path, |w| {
            w.write_all(b"half")?;
            Err(std::io::Error::other("disk full"))
        });
        assert!(r.is_err());
        assert!(!path.exists() && !part_path(&path).exists());
        write_bytes(&path, b"whole").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"whole");
        assert!(!part_path(&path).exists());
        std::fs::remove_dir_all(&base).unwrap();
    }

    fn tempfile_dir(tag: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let d =
            std::env::temp_dir().join(format!("nova-output-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d.canonicalize().unwrap()
    }
}
