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

/// Whether `path` is a PNG that can be decoded row by row into exactly what [`decode_image`]
/// gives: not interlaced (rows come in order) and without an `eXIf` chunk (no orientation to
/// apply). Returns its width and height when it can.
pub fn png_streamable(path: &Path) -> Result<Option<(usize, usize)>, MediaError> {
    let mut head = [0u8; 8];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
        if f.read_exact(&mut head).is_err() || head != *b"\x89PNG\r\n\x1a\n" {
            return Ok(None);
        }
    }
    let file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let mut dec = png::Decoder::new(std::io::BufReader::new(file));
    dec.set_transformations(png::Transformations::EXPAND);
    let reader = dec.read_info().map_err(|e| decode_err(path, e))?;
    let info = reader.info();
    if info.interlaced || info.exif_metadata.is_some() || info.width == 0 || info.height == 0 {
        return Ok(None);
    }
    // 8-bit colour only: the whole decode converts grey and 16-bit samples by other paths,
    // which this reader does not reproduce bit for bit.
    let (color, depth) = reader.output_color_type();
    if depth != png::BitDepth::Eight || !matches!(color, png::ColorType::Rgb | png::ColorType::Rgba)
    {
        return Ok(None);
    }
    Ok(Some((info.width as usize, info.height as usize)))
}

/// Reads a PNG (one [`png_streamable`] accepts) row by row as f32 RGB samples in `[0, 1]`,
/// converted as [`decode_image`] converts them (palette and low bit depths expanded, grey
/// replicated to RGB, `v / 255` or `v / 65535`), so a band of rows equals those rows of the
/// whole decode bit for bit. Alpha is not read.
pub struct PngRowReader {
    reader: png::Reader<std::io::BufReader<std::fs::File>>,
    width: usize,
    height: usize,
    next: usize,
    color: png::ColorType,
    sixteen: bool,
    name: String,
}

impl PngRowReader {
    /// Opens `path` at its first row.
    pub fn open(path: &Path) -> Result<PngRowReader, MediaError> {
        let file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
        let mut dec = png::Decoder::new(std::io::BufReader::new(file));
        dec.set_transformations(png::Transformations::EXPAND);
        let reader = dec.read_info().map_err(|e| decode_err(path, e))?;
        if reader.info().interlaced {
            return Err(decode_err(
                path,
                "an interlaced PNG cannot be read row by row",
            ));
        }
        let (color, depth) = reader.output_color_type();
        Ok(PngRowReader {
            width: reader.info().width as usize,
            height: reader.info().height as usize,
            next: 0,
            color,
            sixteen: depth == png::BitDepth::Sixteen,
            name: path.display().to_string(),
            reader,
        })
    }

    /// Width and height in pixels.
    pub fn size(&self) -> (usize, usize) {
        (self.width, self.height)
    }

    /// Rows already read.
    pub fn rows_read(&self) -> usize {
        self.next
    }

    /// Decodes the next row into `out` (`width * 3` samples).
    pub fn read_row(&mut self, out: &mut [f32]) -> Result<(), MediaError> {
        let bad = |reason: String| MediaError::Decode {
            path: self.name.clone(),
            reason,
        };
        if out.len() != self.width * 3 {
            return Err(bad(format!(
                "a row of {} samples was asked for, the image has {}",
                out.len(),
                self.width * 3
            )));
        }
        let row = self
            .reader
            .next_row()
            .map_err(|e| bad(e.to_string()))?
            .ok_or_else(|| bad(format!("the image ended at row {}", self.next)))?;
        let data = row.data();
        let per = match self.color {
            png::ColorType::Grayscale => 1,
            png::ColorType::GrayscaleAlpha => 2,
            png::ColorType::Rgb => 3,
            png::ColorType::Rgba => 4,
            png::ColorType::Indexed => return Err(bad("a palette was not expanded".into())),
        };
        let sample = |i: usize| -> f32 {
            if self.sixteen {
                let v = u16::from_be_bytes([data[2 * i], data[2 * i + 1]]);
                (v as f32 / u16::MAX as f32).clamp(0.0, 1.0)
            } else {
                (data[i] as f32 / u8::MAX as f32).clamp(0.0, 1.0)
            }
        };
        let need = self.width * per * if self.sixteen { 2 } else { 1 };
        if data.len() < need {
            return Err(bad(format!("row {} is short", self.next)));
        }
        for x in 0..self.width {
            let px = &mut out[x * 3..x * 3 + 3];
            if per >= 3 {
                for (c, v) in px.iter_mut().enumerate() {
                    *v = sample(x * per + c);
                }
            } else {
                let l = sample(x * per);
                px.fill(l);
            }
        }
        self.next += 1;
        Ok(())
    }
}

/// A PNG written band by band as its rows become final: header and text chunks first, then
/// rows in order, compressed as they come, so the whole image never has to be held. Writes into
/// a file the caller opened (a reserved temporary name it renames once [`Self::finish`] succeeds).
pub struct PngRows {
    writer: png::StreamWriter<'static, BufWriter<std::fs::File>>,
    row_bytes: usize,
    rows_left: usize,
    name: String,
}

impl PngRows {
    /// Starts an 8-bit grey (`channels == 1`), RGB (`3`) or RGBA (`4`) PNG of `width` x
    /// `height` in `file` (named `name` in messages).
    pub fn start(
        file: std::fs::File,
        name: &str,
        width: usize,
        height: usize,
        channels: usize,
        text: &[(String, String)],
    ) -> Result<PngRows, MediaError> {
        let enc_err = |e: &dyn std::fmt::Display| MediaError::Encode {
            path: name.to_string(),
            reason: e.to_string(),
        };
        let color = match channels {
            1 => png::ColorType::Grayscale,
            3 => png::ColorType::Rgb,
            4 => png::ColorType::Rgba,
            n => return Err(enc_err(&format!("{n} channels"))),
        };
        if width == 0 || height == 0 {
            return Err(enc_err(&"an image needs at least one pixel"));
        }
        let mut enc = png::Encoder::new(BufWriter::new(file), width as u32, height as u32);
        enc.set_color(color);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            enc.add_text_chunk(k.clone(), v.clone())
                .map_err(|e| enc_err(&e))?;
        }
        let writer = enc
            .write_header()
            .and_then(|w| w.into_stream_writer())
            .map_err(|e| enc_err(&e))?;
        Ok(PngRows {
            writer,
            row_bytes: width * channels,
            rows_left: height,
            name: name.to_string(),
        })
    }

    /// Rows still to come.
    pub fn rows_left(&self) -> usize {
        self.rows_left
    }

    /// Appends whole rows (`row_bytes` each, the next ones of the image, top to bottom).
    pub fn write_rows(&mut self, rows: &[u8]) -> Result<(), MediaError> {
        use std::io::Write;
        let n = rows.len() / self.row_bytes.max(1);
        if !rows.len().is_multiple_of(self.row_bytes.max(1)) || n > self.rows_left {
            return Err(MediaError::Encode {
                path: self.name.clone(),
                reason: format!(
                    "{} bytes are not whole rows of {} bytes within the {} left",
                    rows.len(),
                    self.row_bytes,
                    self.rows_left
                ),
            });
        }
        self.writer
            .write_all(rows)
            .map_err(|e| io_err(Path::new(&self.name), e))?;
        self.rows_left -= n;
        Ok(())
    }

    /// Ends the image once every row was written, and flushes it.
    pub fn finish(self) -> Result<(), MediaError> {
        if self.rows_left > 0 {
            return Err(MediaError::Encode {
                path: self.name.clone(),
                reason: format!("{} rows were never written", self.rows_left),
            });
        }
        let name = self.name.clone();
        self.writer.finish().map_err(|e| MediaError::Encode {
            path: name,
            reason: e.to_string(),
        })
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
    fn rows_written_in_bands_decode_to_the_same_pixels_as_a_whole_write() {
        let dir = tempfile_dir();
        let (w, h) = (37, 29);
        let samples: Vec<u8> = (0..w * h * 3).map(|i| (i * 13 % 251) as u8).collect();
        let whole = dir.join("whole.png");
        encode_png(&whole, w, h, 3, &samples, &[("prompt".into(), "{}".into())]).unwrap();
        let banded = dir.join("banded.png");
        let file = std::fs::File::create(&banded).unwrap();
        let mut rows = PngRows::start(
            file,
            "banded.png",
            w,
            h,
            3,
            &[("prompt".into(), "{}".into())],
        )
        .unwrap();
        for band in samples.chunks(w * 3 * 8) {
            rows.write_rows(band).unwrap();
        }
        assert_eq!(rows.rows_left(), 0);
        rows.finish().unwrap();
        let (a, b) = (
            decode_image(&whole).unwrap(),
            decode_image(&banded).unwrap(),
        );
        assert_eq!(a.rgb, b.rgb);
        assert!(std::fs::read(&banded)
            .unwrap()
            .windows(6)
            .any(|w| w == b"prompt"));
    }

    #[test]
    fn rows_read_one_by_one_equal_the_whole_decode() {
        let dir = tempfile_dir();
        for (channels, name) in [(3usize, "rgb.png"), (4, "rgba.png")] {
            let (w, h) = (23, 17);
            let samples: Vec<u8> = (0..w * h * channels)
                .map(|i| (i * 37 % 256) as u8)
                .collect();
            let path = dir.join(name);
            encode_png(&path, w, h, channels, &samples, &[]).unwrap();
            assert_eq!(png_streamable(&path).unwrap(), Some((w, h)));
            let whole = decode_image(&path).unwrap();
            let mut r = PngRowReader::open(&path).unwrap();
            let mut rows = vec![0f32; w * h * 3];
            for y in 0..h {
                r.read_row(&mut rows[y * w * 3..(y + 1) * w * 3]).unwrap();
            }
            let differ = whole
                .rgb
                .iter()
                .zip(&rows)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!((differ, whole.rgb.len()), (0, rows.len()), "{name}");
            assert!(r.read_row(&mut vec![0f32; w * 3]).is_err(), "past the end");
        }
        let grey = dir.join("grey.png");
        encode_png(&grey, 4, 4, 1, &[7u8; 16], &[]).unwrap();
        assert_eq!(
            png_streamable(&grey).unwrap(),
            None,
            "grey is decoded whole"
        );
        let jpeg = dir.join("not.png");
        std::fs::write(&jpeg, [0xFFu8, 0xD8, 0xFF, 0xE0, 0, 0, 0, 0, 0]).unwrap();
        assert_eq!(png_streamable(&jpeg).unwrap(), None);
    }

    #[test]
    fn unfinished_rows_are_an_error_not_a_short_file() {
        let dir = tempfile_dir();
        let file = std::fs::File::create(dir.join("short.png")).unwrap();
        let mut rows = PngRows::start(file, "short.png", 4, 4, 3, &[]).unwrap();
        rows.write_rows(&[0u8; 24]).unwrap();
        assert!(rows.write_rows(&[0u8; 5]).is_err());
        assert!(rows.finish().unwrap_err().to_string().contains("2 rows"));
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
