//! Files clients send and fetch: uploads accepted by what they really are, and user files
//! served so that none can act as a page of the service's origin.
//!
//! - **Uploads** (`/upload/image`). The name's extension says what a file claims to be (PNG,
//!   JPEG, WAV, FLAC, MP3, Ogg, MP4/MOV/M4A, WebM/MKV); its first bytes must carry that kind's
//!   signature *and* its header must decode as that kind — images by the `image` crate, audio
//!   and video by FFmpeg's probe (the demuxer must be the claimed one and find a stream of the
//!   claimed kind). A file that only resembles a signature (an XHTML page that starts
//!   `<!--ftyp-->`) or claims a type that is not media is refused with 415. The body streams to
//!   a temporary file in the temp folder and is moved into place once checked (by a rename, or
//!   when the folders are on different file systems a copy made beside the destination first):
//!   an upload is never held whole in memory, a name is never taken by two uploads at once (the
//!   second gets `name (1).ext`), and at most `--max-uploads` (default 8) are received at once (more wait up to `--upload-wait`,
//!   default 30 s, then get 503), each within
//!   [`UPLOAD_DEADLINE`].
//! - **Serving** (`/view`). The type comes from an allow-list of media extensions; everything
//!   else is `application/octet-stream` with `Content-Disposition: attachment`. Every served
//!   file carries `X-Content-Type-Options: nosniff` and [`CSP`], which allows no script, no
//!   plugin and no form and puts the response in a sandbox: even a file a browser shows as a
//!   page cannot run in the service's origin.

use axum::http::{header, HeaderMap, HeaderValue};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The Content-Security-Policy of every served user file.
pub(crate) const CSP: &str =
    "default-src 'none'; img-src 'self' data: blob:; media-src 'self' blob:; style-src 'unsafe-inline'; sandbox";

/// The longest one upload may take to arrive, however steadily it trickles.
pub(crate) const UPLOAD_DEADLINE: std::time::Duration = std::time::Duration::from_secs(600);

/// What a file claims to be, by its extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Claim {
    Image(image::ImageFormat),
    /// Audio: FFmpeg demuxer names that may read it.
    Audio(&'static [&'static str]),
    /// Video: FFmpeg demuxer names that may read it.
    Video(&'static [&'static str]),
}

const MP4: &[&str] = &["mov", "mp4", "m4a"];
const MKV: &[&str] = &["matroska", "webm"];

/// A media extension: its served type and, for kinds NOVA's loaders read, what an upload of
/// it must be.
struct Media {
    ext: &'static str,
    mime: &'static str,
    upload: Option<Claim>,
}

const MEDIA: &[Media] = &[
    Media {
        ext: "png",
        mime: "image/png",
        upload: Some(Claim::Image(image::ImageFormat::Png)),
    },
    Media {
        ext: "jpg",
        mime: "image/jpeg",
        upload: Some(Claim::Image(image::ImageFormat::Jpeg)),
    },
    Media {
        ext: "jpeg",
        mime: "image/jpeg",
        upload: Some(Claim::Image(image::ImageFormat::Jpeg)),
    },
    Media {
        ext: "webp",
        mime: "image/webp",
        upload: None,
    },
    Media {
        ext: "gif",
        mime: "image/gif",
        upload: None,
    },
    Media {
        ext: "wav",
        mime: "audio/wav",
        upload: Some(Claim::Audio(&["wav"])),
    },
    Media {
        ext: "flac",
        mime: "audio/flac",
        upload: Some(Claim::Audio(&["flac"])),
    },
    Media {
        ext: "mp3",
        mime: "audio/mpeg",
        upload: Some(Claim::Audio(&["mp3"])),
    },
    Media {
        ext: "ogg",
        mime: "audio/ogg",
        upload: Some(Claim::Audio(&["ogg"])),
    },
    Media {
        ext: "opus",
        mime: "audio/ogg",
        upload: Some(Claim::Audio(&["ogg"])),
    },
    Media {
        ext: "m4a",
        mime: "audio/mp4",
        upload: Some(Claim::Audio(MP4)),
    },
    Media {
        ext: "mp4",
        mime: "video/mp4",
        upload: Some(Claim::Video(MP4)),
    },
    Media {
        ext: "mov",
        mime: "video/quicktime",
        upload: Some(Claim::Video(MP4)),
    },
    Media {
        ext: "webm",
        mime: "video/webm",
        upload: Some(Claim::Video(MKV)),
    },
    Media {
        ext: "mkv",
        mime: "video/x-matroska",
        upload: Some(Claim::Video(MKV)),
    },
];

fn media_of(name: &str) -> Option<&'static Media> {
    let ext = name.rsplit_once('.')?.1.to_ascii_lowercase();
    MEDIA.iter().find(|m| m.ext == ext)
}

/// What an upload named `name` claims to be; `None` when it is not a kind NOVA loads.
pub(crate) fn claim_of(name: &str) -> Option<Claim> {
    media_of(name)?.upload
}

/// The extensions uploads may have, for messages.
pub(crate) fn upload_extensions() -> String {
    MEDIA
        .iter()
        .filter(|m| m.upload.is_some())
        .map(|m| m.ext)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether `head` (a file's first bytes) carries the signature of the claimed kind.
fn signature_matches(claim: Claim, ext: &str, head: &[u8]) -> bool {
    let starts = |p: &[u8]| head.starts_with(p);
    match claim {
        Claim::Image(image::ImageFormat::Png) => starts(b"\x89PNG\r\n\x1a\n"),
        Claim::Image(image::ImageFormat::Jpeg) => starts(&[0xFF, 0xD8, 0xFF]),
        Claim::Image(_) => false,
        Claim::Audio(_) | Claim::Video(_) => match ext {
            "wav" => head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"WAVE",
            "flac" => starts(b"fLaC"),
            "ogg" | "opus" => starts(b"OggS"),
            "mp3" => {
                starts(b"ID3") || (head.len() > 1 && head[0] == 0xFF && head[1] & 0xE0 == 0xE0)
            }
            "webm" | "mkv" => starts(&[0x1A, 0x45, 0xDF, 0xA3]),
            // ISO base media: a first box of a sane size whose type is a box type.
            "mp4" | "mov" | "m4a" => iso_first_box_ok(head),
            _ => false,
        },
    }
}

/// An ISO base media file's first box: a big-endian size of at least 8 (or 1: a 64-bit size
/// follows), a type of four printable letters that starts such files, and for `ftyp` a
/// major brand of four printable letters.
fn iso_first_box_ok(head: &[u8]) -> bool {
    if head.len() < 16 {
        return false;
    }
    let size = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let kind = &head[4..8];
    let printable = |b: &[u8]| b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b' ');
    let known = [&b"ftyp"[..], b"moov", b"mdat", b"wide", b"free", b"skip"];
    (size == 1 || (8..=(1 << 30)).contains(&size))
        && known.contains(&kind)
        && (kind != b"ftyp" || printable(&head[8..12]))
}

/// Checks that the file at `path` is what `claim` says: signature, then a decoded header.
/// `ext` is the claimed extension (lower case). The error says what was wrong, for the 415.
pub(crate) fn verify(path: &Path, claim: Claim, ext: &str) -> Result<(), String> {
    let mut head = [0u8; 64];
    let n = {
        let mut f =
            std::fs::File::open(path).map_err(|e| format!("cannot read the upload: {e}"))?;
        let mut n = 0;
        while n < head.len() {
            match f.read(&mut head[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => return Err(format!("cannot read the upload: {e}")),
            }
        }
        n
    };
    if !signature_matches(claim, ext, &head[..n]) {
        return Err(format!(
            "the file is not a .{ext} file (its first bytes are not a .{ext} header)"
        ));
    }
    match claim {
        Claim::Image(format) => {
            let reader = image::ImageReader::with_format(
                std::io::BufReader::new(
                    std::fs::File::open(path)
                        .map_err(|e| format!("cannot read the upload: {e}"))?,
                ),
                format,
            );
            let (w, h) = reader
                .into_dimensions()
                .map_err(|e| format!("the .{ext} header does not decode: {e}"))?;
            if w == 0 || h == 0 {
                return Err(format!("the .{ext} image is {w}x{h}"));
            }
            Ok(())
        }
        Claim::Audio(formats) | Claim::Video(formats) => {
            let c = nova_media::probe_container(path)
                .map_err(|e| format!("the .{ext} header does not decode: {}", e.reason()))?;
            if !c.format.split(',').any(|f| formats.contains(&f)) {
                return Err(format!(
                    "the file is a '{}' container, not .{ext}",
                    c.format
                ));
            }
            let has = match claim {
                Claim::Video(_) => c.video,
                _ => c.audio,
            };
            if !has {
                return Err(format!(
                    "the .{ext} file has no {} stream",
                    if matches!(claim, Claim::Video(_)) {
                        "video"
                    } else {
                        "audio"
                    }
                ));
            }
            Ok(())
        }
    }
}

/// A `Content-Disposition` value: `inline` or `attachment`, with the name as an ASCII
/// fallback (anything but letters, digits, `.`, `-`, `_`, space and parentheses replaced)
/// and in full as RFC 5987's `filename*`.
fn disposition(attachment: bool, name: &str) -> HeaderValue {
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || " .-_()".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut encoded = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    let v = format!(
        "{}; filename=\"{ascii}\"; filename*=UTF-8''{encoded}",
        if attachment { "attachment" } else { "inline" }
    );
    HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static("attachment"))
}

/// Sets the headers of a served user file named `name`: its type from the allow-list (or
/// `application/octet-stream` as an attachment), `nosniff` and [`CSP`].
pub(crate) fn serve_headers(h: &mut HeaderMap, name: &str) {
    let (mime, attachment) = match media_of(name) {
        Some(m) => (m.mime, false),
        None => ("application/octet-stream", true),
    };
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
    h.insert(header::CONTENT_DISPOSITION, disposition(attachment, name));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
}

/// Whether two files hold the same bytes (sizes first, then a streaming comparison).
pub(crate) fn same_content(a: &Path, b: &Path) -> bool {
    let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) else {
        return false;
    };
    if ma.len() != mb.len() {
        return false;
    }
    let (Ok(fa), Ok(fb)) = (std::fs::File::open(a), std::fs::File::open(b)) else {
        return false;
    };
    let (mut ra, mut rb) = (
        std::io::BufReader::with_capacity(1 << 16, fa),
        std::io::BufReader::with_capacity(1 << 16, fb),
    );
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let na = match read_full(&mut ra, &mut ba) {
            Ok(n) => n,
            Err(_) => return false,
        };
        let nb = match read_full(&mut rb, &mut bb) {
            Ok(n) => n,
            Err(_) => return false,
        };
        if na != nb || ba[..na] != bb[..nb] {
            return false;
        }
        if na == 0 {
            return true;
        }
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Places a checked upload (`tmp`, beside the destination folder's files) at
/// `subfolder/name` inside `base`; returns the name it got. Without `overwrite`, a clash with
/// identical content reuses the file (and drops `tmp`) and any other clash gets
/// `"stem (i).ext"`, as ComfyUI.
pub(crate) fn place_upload(
    base: &Path,
    subfolder: &str,
    name: &str,
    tmp: &Path,
    overwrite: bool,
) -> Result<String, String> {
    let mut path = super::security::resolve(base, subfolder, name)?;
    let dir = path
        .parent()
        .ok_or_else(|| "no folder".to_string())?
        .to_path_buf();
    nova_dataflow::output::create_dirs_nofollow(base, &dir)
        .map_err(|e| format!("cannot create the folder: {e}"))?;
    // Re-check now that the folder exists: a link on the way must not lead out.
    super::security::resolve(base, subfolder, name)?;
    // On the destination's file system: moved by a rename or a link from here on.
    let local = beside(tmp, &dir).map_err(|e| format!("cannot write the file: {e}"))?;
    let result = (|| {
        if overwrite {
            if path
                .symlink_metadata()
                .is_ok_and(|m| m.file_type().is_symlink())
            {
                return Err(format!("'{name}' is a link; it is not written through"));
            }
            // A rename replaces the name itself, never what a link would point to.
            std::fs::rename(&local, &path).map_err(|e| format!("cannot write the file: {e}"))?;
            return Ok(name.to_string());
        }
        let (stem, ext) = match name.rsplit_once('.') {
            Some((s, e)) => (s.to_string(), format!(".{e}")),
            None => (name.to_string(), String::new()),
        };
        let mut final_name = name.to_string();
        for i in 1u32.. {
            if path.symlink_metadata().is_ok() {
                if path.is_file() && same_content(&path, &local) {
                    let _ = std::fs::remove_file(&local);
                    return Ok(final_name);
                }
            } else {
                // A hard link creates the name only if nothing holds it yet: two uploads of
                // one name at once get two names, never one file overwriting the other.
                match std::fs::hard_link(&local, &path) {
                    Ok(()) => {
                        let _ = std::fs::remove_file(&local);
                        return Ok(final_name);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(format!("cannot write the file: {e}")),
                }
            }
            final_name = format!("{stem} ({i}){ext}");
            path = dir.join(&final_name);
        }
        Err("no free name".into())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&local);
    }
    result
}

/// `tmp` on `dir`'s file system: moved there by a rename, or, across file systems, copied
/// into a new file in `dir` (a `.part` name no other upload uses) and the original removed.
fn beside(tmp: &Path, dir: &Path) -> std::io::Result<PathBuf> {
    let name = tmp
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "upload".into());
    let local = dir.join(format!("{name}.part"));
    match std::fs::rename(tmp, &local) {
        Ok(()) => Ok(local),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let copied = (|| {
                let mut out = nova_dataflow::output::create_new(&local)?;
                let mut inp = std::fs::File::open(tmp)?;
                std::io::copy(&mut inp, &mut out)?;
                out.sync_all()
            })();
            let _ = std::fs::remove_file(tmp);
            if let Err(e) = copied {
                let _ = std::fs::remove_file(&local);
                return Err(e);
            }
            Ok(local)
        }
        Err(e) => Err(e),
    }
}

/// A temporary file for an upload being received; removed when dropped unless kept.
pub(crate) struct TempUpload {
    pub path: PathBuf,
    pub file: Option<tokio::fs::File>,
    kept: bool,
}

impl TempUpload {
    /// A new temporary file in `dir` whose name ends in `.ext` (FFmpeg's probe weighs it).
    pub(crate) async fn create(dir: &Path, ext: &str) -> std::io::Result<TempUpload> {
        tokio::fs::create_dir_all(dir).await?;
        let path = dir.join(format!(".upload-{}.{ext}", uuid::Uuid::new_v4().simple()));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .await?;
        Ok(TempUpload {
            path,
            file: Some(file),
            kept: false,
        })
    }

    /// The file was moved into place (or reused): nothing to remove.
    pub(crate) fn keep(&mut self) {
        self.kept = true;
    }
}

impl Drop for TempUpload {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_must_match_the_claimed_kind() {
        let png = Claim::Image(image::ImageFormat::Png);
        assert!(signature_matches(png, "png", b"\x89PNG\r\n\x1a\nrest"));
        assert!(!signature_matches(png, "png", b"<html><script>"));
        let mp4 = claim_of("clip.MP4").unwrap();
        assert!(signature_matches(
            mp4,
            "mp4",
            b"\0\0\0\x20ftypisom\0\0\x02\0isomiso2"
        ));
        // An XHTML page that starts with a comment spelling ftyp at bytes 4..8.
        assert!(!signature_matches(
            mp4,
            "mp4",
            b"<!--ftyp--><html xmlns='http://www.w3.org/1999/xhtml'>"
        ));
        assert!(claim_of("evil.xml").is_none());
        assert!(claim_of("page.html").is_none());
        assert!(claim_of("noext").is_none());
    }

    #[test]
    fn only_media_is_served_inline_and_every_file_gets_the_policy() {
        let mut h = HeaderMap::new();
        serve_headers(&mut h, "a.png");
        assert_eq!(h[header::CONTENT_TYPE], "image/png");
        assert!(h[header::CONTENT_DISPOSITION]
            .to_str()
            .unwrap()
            .starts_with("inline"));
        assert_eq!(h[header::CONTENT_SECURITY_POLICY], CSP);
        for name in [
            "evil.xml",
            "x.html",
            "x.svg",
            "x.js",
            "data.latent",
            "noext",
        ] {
            let mut h = HeaderMap::new();
            serve_headers(&mut h, name);
            assert_eq!(
                h[header::CONTENT_TYPE],
                "application/octet-stream",
                "{name}"
            );
            assert!(
                h[header::CONTENT_DISPOSITION]
                    .to_str()
                    .unwrap()
                    .starts_with("attachment"),
                "{name}"
            );
            assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        }
        let mut h = HeaderMap::new();
        serve_headers(&mut h, "na\"me\r\nX: y.png");
        let d = h[header::CONTENT_DISPOSITION].to_str().unwrap();
        assert!(
            !d.contains('\r') && d.contains("filename*=UTF-8''na%22me%0D%0AX%3A%20y.png"),
            "{d}"
        );
    }

    #[test]
    fn upload_name_clashes_get_a_counter_unless_identical() {
        let dir = tempfile::tempdir().unwrap();
        let tmpdir = tempfile::tempdir().unwrap();
        let put = |name: &str, sub: &str, data: &[u8], overwrite: bool| {
            let tmp = tmpdir
                .path()
                .join(format!("t-{}", uuid::Uuid::new_v4().simple()));
            std::fs::write(&tmp, data).unwrap();
            place_upload(dir.path(), sub, name, &tmp, overwrite)
        };
        let png = b"\x89PNG\r\n\x1a\none";
        assert_eq!(put("a.png", "", png, false).unwrap(), "a.png");
        assert_eq!(put("a.png", "", png, false).unwrap(), "a.png");
        let other = b"\x89PNG\r\n\x1a\ntwo";
        assert_eq!(put("a.png", "", other, false).unwrap(), "a (1).png");
        assert_eq!(put("a.png", "s", other, true).unwrap(), "a.png");
        assert!(put("a.png", "../x", png, false).is_err());
        assert!(put("../a.png", "", png, false).is_err());
        // Eight different files under one name at once: eight names, nothing overwritten.
        let names: Vec<String> = std::thread::scope(|sc| {
            let handles: Vec<_> = (0..8u8)
                .map(|i| sc.spawn(move || put("same.png", "race", &[b'P', i], false).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let distinct: std::collections::BTreeSet<&String> = names.iter().collect();
        assert_eq!(distinct.len(), 8, "{names:?}");
        let mut contents: Vec<Vec<u8>> = names
            .iter()
            .map(|n| std::fs::read(dir.path().join("race").join(n)).unwrap())
            .collect();
        contents.sort();
        assert_eq!(
            contents,
            (0..8u8).map(|i| vec![b'P', i]).collect::<Vec<_>>()
        );
    }
}
