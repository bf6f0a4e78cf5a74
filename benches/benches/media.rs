//! Video and audio pipelines against their command-line peers, in one run (see
//! `nova_benches::media`): 720p H.264 decode + lanczos 2x + x264 ultrafast versus ffmpeg, and
//! 48 kHz → 44.1 kHz resampling of a long WAV versus `sox rate -v`.
//!
//! Run: `cargo bench -p nova-benches --bench media` (`NOVA_BENCH_QUICK=1`: shorter inputs).

fn main() {
    let quick = std::env::var("NOVA_BENCH_QUICK").is_ok();
    let (clip_s, wav_s, rounds) = if quick { (1, 60, 3) } else { (4, 600, 5) };
    println!("== Video: NOVA vs ffmpeg (same clip, same run) ==");
    match nova_benches::media::video(clip_s, rounds) {
        Ok(c) => println!("{c}"),
        Err(e) => println!("video comparison failed: {e}"),
    }
    println!("\n== Audio: NOVA vs sox (same file, same run) ==");
    match nova_benches::media::audio(wav_s, rounds) {
        Ok(c) => println!("{c}"),
        Err(e) => println!("audio comparison failed: {e}"),
    }
}
