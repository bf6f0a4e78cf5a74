//! The glue between ffmpeg-next and `nova-media`: one-time library set-up, error mapping,
//! and the few raw FFmpeg calls the safe wrapper does not expose.
//!
//! Invariants: [`init`] runs once per process before any ffmpeg call this crate makes, sets
//! FFmpeg's log level from `NOVA_FFMPEG_LOG` (errors only by default, so libx264's per-run
//! statistics and the like do not flood stderr) and routes FFmpeg's messages through
//! [`log_line`] (`nova: ffmpeg <level>: ...`), so FFmpeg never prints by itself; every `unsafe` block here touches only a context the caller owns
//! exclusively (`&mut`), and says why it is sound.

use crate::error::{check_readable, shown, MediaError};
use ffmpeg_next as ffmpeg;
use ffmpeg_next::ffi;
use ffmpeg_next::format::context::Input;
use ffmpeg_next::software::scaling;
use std::ffi::CString;
use std::path::Path;
use std::sync::OnceLock;

/// Initialises FFmpeg once for the process.
pub(crate) fn init() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        // `ffmpeg::init` only registers components (a no-op since FFmpeg 4) and cannot fail in
        // practice; if it ever did, the first open would report the real problem.
        let _ = ffmpeg::init();
        let level = log_level_from_env(std::env::var("NOVA_FFMPEG_LOG").ok().as_deref());
        LOG_LEVEL.store(level, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: sets a global integer; FFmpeg skips formatting anything less important.
        unsafe { ffi::av_log_set_level(level) };
        route_log();
    });
}

/// FFmpeg's messages at or above this importance reach NOVA's log (`AV_LOG_*`: lower is more
/// important; -8 is quiet).
static LOG_LEVEL: std::sync::atomic::AtomicI32 =
    std::sync::atomic::AtomicI32::new(ffi::AV_LOG_ERROR);

/// `NOVA_FFMPEG_LOG`: `quiet`, `fatal`, `error` (the default), `warning`, `info`, `verbose`,
/// `debug` or `trace`; anything else is the default.
pub(crate) fn log_level_from_env(v: Option<&str>) -> i32 {
    match v.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
        Some("quiet") | Some("off") | Some("none") => ffi::AV_LOG_QUIET,
        Some("panic") | Some("fatal") => ffi::AV_LOG_FATAL,
        Some("warning") | Some("warn") => ffi::AV_LOG_WARNING,
        Some("info") => ffi::AV_LOG_INFO,
        Some("verbose") => ffi::AV_LOG_VERBOSE,
        Some("debug") => ffi::AV_LOG_DEBUG,
        Some("trace") => ffi::AV_LOG_TRACE,
        _ => ffi::AV_LOG_ERROR,
    }
}

fn level_name(level: i32) -> &'static str {
    match level {
        l if l <= ffi::AV_LOG_FATAL => "fatal",
        l if l <= ffi::AV_LOG_ERROR => "error",
        l if l <= ffi::AV_LOG_WARNING => "warning",
        l if l <= ffi::AV_LOG_INFO => "info",
        l if l <= ffi::AV_LOG_VERBOSE => "verbose",
        _ => "debug",
    }
}

/// One FFmpeg message as NOVA logs it: one line on stderr, `nova: ffmpeg <level>: <text>`
/// (FFmpeg's own `[component @ 0x...]` prefix kept inside the text), so FFmpeg never writes
/// to the terminal by itself.
pub(crate) fn log_line(level: i32, text: &str) {
    use std::io::Write;
    let text = text.trim_end();
    if !text.is_empty() {
        // Never panics (this runs inside FFmpeg's C callback): a closed stderr drops the line.
        let _ = writeln!(
            std::io::stderr(),
            "nova: ffmpeg {}: {text}",
            level_name(level)
        );
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn route_log() {
    /// FFmpeg's log callback: formats the message with FFmpeg's own formatter (the variadic
    /// arguments are passed through as the `va_list` they arrive as) and hands it to
    /// [`log_line`].
    unsafe extern "C" fn callback(
        avcl: *mut std::ffi::c_void,
        level: std::ffi::c_int,
        fmt: *const std::ffi::c_char,
        vl: *mut ffi::__va_list_tag,
    ) {
        if level > LOG_LEVEL.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let mut buf = [0 as std::ffi::c_char; 1024];
        let mut prefix: std::ffi::c_int = 1;
        // SAFETY: FFmpeg calls this with its own valid format string and argument list;
        // `av_log_format_line2` writes at most `buf.len()` bytes, NUL-terminated.
        let text = unsafe {
            ffi::av_log_format_line2(
                avcl,
                level,
                fmt,
                vl,
                buf.as_mut_ptr(),
                buf.len() as std::ffi::c_int,
                &mut prefix,
            );
            std::ffi::CStr::from_ptr(buf.as_ptr())
        };
        log_line(level, &text.to_string_lossy());
    }
    // SAFETY: installs a callback that is valid for the life of the process.
    unsafe { ffi::av_log_set_callback(Some(callback)) };
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn route_log() {
    // Where the va_list's layout is not known to this crate, FFmpeg prints by itself, at the
    // chosen level (set in `init`).
}

/// True for FFmpeg's "try again" (`AVERROR(EAGAIN)`): feed more input / drain more output.
/// The next packet of stream `stream` from `input`, skipping the other streams' packets;
/// `None` at the end of the file. Shared by the audio and video decoders' feeding.
pub(crate) fn next_packet(
    input: &mut Input,
    stream: usize,
) -> Result<Option<ffmpeg::Packet>, ffmpeg::Error> {
    let mut packet = ffmpeg::Packet::empty();
    loop {
        match packet.read(input) {
            Ok(()) if packet.stream() == stream => return Ok(Some(packet)),
            Ok(()) => continue,
            Err(ffmpeg::Error::Eof) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

pub(crate) fn is_again(e: &ffmpeg::Error) -> bool {
    matches!(e, ffmpeg::Error::Other { errno } if *errno == ffmpeg::util::error::EAGAIN)
}

/// Opens a file for demuxing: a missing file is `Open`, a 0-byte file is `Empty`, and a file
/// FFmpeg cannot make sense of is `Open` with FFmpeg's reason.
pub(crate) fn open_input(path: &Path) -> Result<Input, MediaError> {
    check_readable(path)?;
    init();
    ffmpeg::format::input(path).map_err(|e| MediaError::Open {
        path: shown(path),
        reason: match e {
            ffmpeg::Error::InvalidData => {
                "not a media container ffmpeg recognises, or its header is damaged".to_string()
            }
            other => format!("ffmpeg: {other}"),
        },
    })
}

/// The demuxer's current byte offset in the file, if it knows one.
pub(crate) fn input_position(input: &mut Input) -> Option<u64> {
    // SAFETY: `input` is a live, exclusively borrowed AVFormatContext; `pb` is either null
    // (checked) or the context's own AVIOContext, valid for the context's lifetime.
    unsafe {
        let pb = (*input.as_mut_ptr()).pb;
        if pb.is_null() {
            return None;
        }
        // `avio_tell` is a C inline: `avio_seek(pb, 0, SEEK_CUR)`.
        u64::try_from(ffi::avio_seek(pb, 0, SEEK_CUR)).ok()
    }
}

/// Sets a codec-private option (e.g. libx264's `preset`, `crf`) on an unopened codec context,
/// reporting an option the codec does not have, or a value it refuses, as an error instead of
/// silently ignoring it the way an options dictionary would.
pub(crate) fn set_private_option(
    ctx: &mut ffmpeg::codec::Context,
    key: &str,
    value: &str,
) -> Result<(), ffmpeg::Error> {
    let (Ok(k), Ok(v)) = (CString::new(key), CString::new(value)) else {
        return Err(ffmpeg::Error::InvalidData);
    };
    // SAFETY: `ctx` is an exclusively borrowed AVCodecContext allocated with its codec, so
    // `priv_data` is null (checked) or that codec's AVClass-led private struct; the strings
    // outlive the call, which copies them.
    unsafe {
        let priv_data = (*ctx.as_mut_ptr()).priv_data;
        if priv_data.is_null() {
            return Err(ffmpeg::Error::OptionNotFound);
        }
        match ffi::av_opt_set(priv_data, k.as_ptr(), v.as_ptr(), 0) {
            0 => Ok(()),
            e => Err(ffmpeg::Error::from(e)),
        }
    }
}

/// Whether the muxer `format` can store `codec` (FFmpeg's own table, normal compliance).
pub(crate) fn muxer_takes(format: &ffmpeg::format::Output, codec: ffmpeg::codec::Id) -> bool {
    // SAFETY: `format.as_ptr()` is a static AVOutputFormat from FFmpeg's muxer table.
    unsafe {
        ffi::avformat_query_codec(
            format.as_ptr(),
            codec.into(),
            ffi::FF_COMPLIANCE_NORMAL as std::os::raw::c_int,
        ) == 1
    }
}

/// A swscale context that may move between threads.
pub(crate) struct Scaler(pub(crate) scaling::Context);

// SAFETY: an SwsContext has no thread affinity (no thread-local state, no callbacks); it is
// only ever used through `&mut self`, so moving it to another thread is sound. ffmpeg-next
// leaves it `!Send` only because it holds a raw pointer.
unsafe impl Send for Scaler {}

/// Which YUV matrix a frame uses, as swscale's `SWS_CS_*` constant. Unspecified matrices follow
/// the players' convention: BT.709 from 720 lines up, BT.601 below.
pub(crate) fn sws_colorspace(space: ffmpeg::color::Space, height: u32) -> i32 {
    use ffmpeg::color::Space;
    let cs = match space {
        Space::BT709 => ffi::SWS_CS_ITU709,
        Space::FCC => ffi::SWS_CS_FCC,
        Space::BT470BG | Space::SMPTE170M => ffi::SWS_CS_ITU601,
        Space::SMPTE240M => ffi::SWS_CS_SMPTE240M,
        Space::BT2020NCL | Space::BT2020CL => ffi::SWS_CS_BT2020,
        _ if height >= 720 => ffi::SWS_CS_ITU709,
        _ => ffi::SWS_CS_ITU601,
    };
    // bindgen types these `#define`s as i32 or u32 depending on its version.
    #[allow(clippy::unnecessary_cast)]
    let cs = cs as i32;
    cs
}

/// Tells swscale which YUV matrix and range the YUV side of a conversion uses (the RGB side is
/// always full range). Without this swscale assumes BT.601 limited range in both directions.
pub(crate) fn set_yuv_details(scaler: &mut Scaler, yuv_is_source: bool, cs: i32, full: bool) {
    // SAFETY: the SwsContext is exclusively borrowed and initialised; `sws_getCoefficients`
    // returns a pointer into a static table that swscale only reads.
    unsafe {
        let coeffs = ffi::sws_getCoefficients(cs);
        let (src_range, dst_range) = if yuv_is_source {
            (full as i32, 1)
        } else {
            (1, full as i32)
        };
        ffi::sws_setColorspaceDetails(
            scaler.0.as_mut_ptr(),
            coeffs,
            src_range,
            coeffs,
            dst_range,
            0,
            1 << 16,
            1 << 16,
        );
    }
}

/// Whether a pixel format stores colour as Y'CbCr (so a YUV matrix and range apply to it).
pub(crate) fn is_yuv(fmt: ffmpeg::format::Pixel) -> bool {
    let Some(desc) = fmt.descriptor() else {
        return false;
    };
    // SAFETY: `desc.as_ptr()` points into FFmpeg's static pixel-format descriptor table.
    let flags = unsafe { (*desc.as_ptr()).flags };
    desc.nb_components() >= 3 && flags & (ffi::AV_PIX_FMT_FLAG_RGB as u64) == 0
}

/// `SEEK_CUR` from `<stdio.h>` (1 on every platform FFmpeg supports).
const SEEK_CUR: std::os::raw::c_int = 1;
