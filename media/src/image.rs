//! Still images: decode PNG/JPEG into f32 planes, encode 8-bit PNG with text metadata.
//!
//! Invariants: decoded samples are in `[0, 1]`, interleaved row-major; EXIF orientation is
//! applied on decode (so `probe_image` reports the oriented size); PNG files are written to a
//! temporary name and renamed, so a reader never sees a half-written file.

use ::image::metadata::Orientation;
use ::image::{DynamicImage, ImageDecoder, ImageReader};
use std::io::BufWriter;
use std::path::Path;

pub use crate::error::MediaError;

fn io_err(path: &Path, e: impl std::fmt::Display) -> MediaError {
    MediaError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

fn decode_err(path: &Path, e: impl std::fmt::Display) -> MediaError {
    MediaError::Decode {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// A decoded image: RGB samples and, if the file had one, an alpha plane.
#[derive(Clone, Debug)]
pub struct DecodedImage {
    pub width: usize,
    pub height: usize,
    /// `height * width * 3` samples in `[0, 1]`.
    pub rgb: Vec<f32>,
    /// `height * width` samples in `[0, 1]`, if the image has alpha.
    pub alpha: Option<Vec<f32>>,
}

fn open_decoder(path: &Path) -> Result<impl ImageDecoder, MediaError> {
    ImageReader::open(path)
        .map_err(|e| io_err(path, e))?
        .with_guessed_format()
        .map_err(|e| io_err(path, e))?
        .into_decoder()
        .map_err(|e| decode_err(path, e))
}

fn swaps_axes(o: Orientation) -> bool {
    matches!(
        o,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

/// Width and height of an image file after EXIF orientation, reading only its header.
pub fn probe_image(path: &Path) -> Result<(usize, usize), MediaError> {
    let mut decoder = open_decoder(path)?;
    let (w, h) = decoder.dimensions();
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let (w, h) = (w as usize, h as usize);
    if w == 0 || h == 0 {
        return Err(decode_err(path, "image has zero width or height"));
    }
    Ok(if swaps_axes(orientation) {
        (h, w)
    } else {
        (w, h)
    })
}

/// Decodes a PNG or JPEG file.
pub fn decode_image(path: &Path) -> Result<DecodedImage, MediaError> {
    let mut decoder = open_decoder(path)?;
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| decode_err(path, e))?;
    img.apply_orientation(orientation);
    let (width, height) = (img.width() as usize, img.height() as usize);
    if width == 0 || height == 0 {
        return Err(decode_err(path, "image has zero width or height"));
    }
    let has_alpha = img.color().has_alpha();
    let rgba = img.to_rgba32f();
    let mut rgb = Vec::with_capacity(width * height * 3);
    let mut alpha = has_alpha.then(|| Vec::with_capacity(width * height));
    for px in rgba.pixels() {
        rgb.extend_from_slice(&px.0[..3]);
        if let Some(a) = alpha.as_mut() {
            a.push(px.0[3]);
        }
    }
    Ok(DecodedImage {
        width,
        height,
        rgb,
        alpha,
    })
}

/// Writes 8-bit RGB (`channels == 3`) or RGBA (`4`) samples as a PNG with `tEXt` chunks.
pub fn encode_png(
    path: &Path,
    width: usize,
    height: usize,
    channels: usize,
    samples: &[u8],
    text: &[(String, String)],
) -> Result<(), MediaError> {
    let enc_err = |e: &dyn std::fmt::Display| MediaError::Encode {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    if samples.len() != width * height * channels {
        return Err(enc_err(&format!(
            "{} samples for {width}x{height}x{channels}",
            samples.len()
        )));
    }
    let color = match channels {
        1 => png::ColorType::Grayscale,
        3 => png::ColorType::Rgb,
        4 => png::ColorType::Rgba,
        n => return Err(enc_err(&format!("{n} channels"))),
    };
    let tmp = path.with_extension("png.part");
    // A `.part` left by a crash, or a link planted in its place, is removed rather than
    // written through; the new file is created exclusively.
    let _ = std::fs::remove_file(&tmp);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| io_err(&tmp, e))?;
    let result = (|| {
        let mut enc = png::Encoder::new(BufWriter::new(file), width as u32, height as u32);
        enc.set_color(color);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            enc.add_text_chunk(k.clone(), v.clone())
                .map_err(|e| enc_err(&e))?;
        }
        let mut writer = enc.write_header().map_err(|e| enc_err(&e))?;
        writer.write_image_data(samples).map_err(|e| enc_err(&e))?;
        writer.finish().map_err(|e| enc_err(&e))
    })();
    match result {
        Ok(()) => std::fs::rename(&tmp, path).map_err(|e| io_err(path, e)),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_round_trip_keeps_pixels_and_text() {
        let dir = tempfile_dir();
        let path = dir.join("rt.png");
        let samples: Vec<u8> = (0..4 * 3 * 3).map(|i| (i * 7) as u8).collect();
        encode_png(&path, 4, 3, 3, &samples, &[("prompt".into(), "{}".into())]).unwrap();
        assert_eq!(probe_image(&path).unwrap(), (4, 3));
        let d = decode_image(&path).unwrap();
        let back: Vec<u8> = d.rgb.iter().map(|v| (v * 255.0).round() as u8).collect();
        assert_eq!(back, samples);
        assert!(d.alpha.is_none());
        let raw = std::fs::read(&path).unwrap();
        assert!(raw.windows(6).any(|w| w == b"prompt"));
    }

    #[test]
    fn garbage_file_is_a_decode_error_naming_the_file() {
        let dir = tempfile_dir();
        let path = dir.join("bad.png");
        std::fs::write(&path, b"\x89PNG\r\n\x1a\nnot really").unwrap();
        let e = decode_image(&path).unwrap_err().to_string();
        assert!(e.contains("bad.png"), "{e}");
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "nova-media-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
