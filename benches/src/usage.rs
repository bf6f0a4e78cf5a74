//! What a piece of work cost the process: wall time, CPU time (user and system, every thread)
//! and minor page faults, from `getrusage`, so benchmarks report CPU and faults next to wall
//! time.

use std::time::Instant;

/// The cost of one measured call.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub wall_ms: f64,
    pub cpu_ms: f64,
    pub minor_faults: u64,
}

fn rusage() -> (f64, u64) {
    // SAFETY: `r` is a valid, zeroed rusage for getrusage to fill.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut r) };
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    (ms(r.ru_utime) + ms(r.ru_stime), r.ru_minflt as u64)
}

/// Runs `f`, measuring it.
pub fn measure<T>(f: impl FnOnce() -> T) -> (T, Usage) {
    let (cpu0, flt0) = rusage();
    let t = Instant::now();
    let out = f();
    let wall_ms = t.elapsed().as_secs_f64() * 1e3;
    let (cpu1, flt1) = rusage();
    (
        out,
        Usage {
            wall_ms,
            cpu_ms: cpu1 - cpu0,
            minor_faults: flt1.saturating_sub(flt0),
        },
    )
}
