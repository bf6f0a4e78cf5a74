//! Device memory as a counted resource: byte sizes ([`Bytes`]), and the [`Accountant`] that
//! every device allocation of a run goes through.
//!
//! Invariants:
//! - A run's tracked bytes are the sum of its live [`Lease`]s; a lease returns its bytes when
//!   dropped, so what is counted is exactly what is held.
//! - [`Accountant::try_lease`] never lets the tracked total pass the limit: a refused lease is an
//!   out-of-memory condition the engine can recover from (smaller tiles) before anything is
//!   allocated. On a CPU device the budget is simulated by the same counting, so "fits in
//!   2 GiB" is testable without a GPU.
//! - Values carry their lease ([`crate::TensorBox`]), so clones of a value (timely clones a
//!   record for every consumer) are counted once, and the bytes return when the last clone goes.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A number of bytes.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Bytes(pub u64);

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

impl Bytes {
    /// `n` gibibytes.
    pub const fn gib(n: u64) -> Bytes {
        Bytes(n * GIB)
    }

    /// `n` mebibytes.
    pub const fn mib(n: u64) -> Bytes {
        Bytes(n * MIB)
    }

    /// Parses a size such as `2GiB`, `1.5 GB`, `512MiB`, `768M`, `4096` (bytes).
    ///
    /// Binary and decimal spellings both mean binary units (`GB` = `GiB`), as GPU memory is
    /// always quoted that way.
    pub fn parse(text: &str) -> Result<Bytes, String> {
        let t = text.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("'{text}' is not a size (try 2GiB or 512MiB)"))?;
        let mult = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => KIB,
            "m" | "mb" | "mib" => MIB,
            "g" | "gb" | "gib" => GIB,
            "t" | "tb" | "tib" => 1 << 40,
            u => {
                return Err(format!(
                    "'{text}': unknown unit '{u}' (use B, KiB, MiB, GiB)"
                ))
            }
        };
        let v = n * mult as f64;
        if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
            return Err(format!("'{text}' is out of range"));
        }
        Ok(Bytes(v.round() as u64))
    }

    /// As gibibytes.
    pub fn as_gib(self) -> f64 {
        self.0 as f64 / GIB as f64
    }

    /// `self - other`, or 0.
    pub fn saturating_sub(self, other: Bytes) -> Bytes {
        Bytes(self.0.saturating_sub(other.0))
    }
}

impl fmt::Display for Bytes {
    /// Human form with one decimal: `3.5 GiB`, `768.0 MiB`, `12.0 KiB`, `100 B`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b >= GIB {
            write!(f, "{:.1} GiB", b as f64 / GIB as f64)
        } else if b >= MIB {
            write!(f, "{:.1} MiB", b as f64 / MIB as f64)
        } else if b >= KIB {
            write!(f, "{:.1} KiB", b as f64 / KIB as f64)
        } else {
            write!(f, "{b} B")
        }
    }
}

/// Makes the host allocator give large blocks back to the system when they are freed.
///
/// On the CPU device the budget is the process's own memory, so freed tensors must leave the
/// resident set. glibc's malloc raises its mmap threshold each time a large block is freed
/// (up to 32 MiB), after which frame-sized tensors come from the heap and freed ones stay
/// resident: a video run under a 256 MiB budget grew the resident set 95 MiB past what the
/// accountant tracked. Fixing the threshold at 4 MiB keeps blocks of that size and more (a
/// 720p frame is 10 MiB as f32) mapped on their own and returned on free; smaller ones still
/// come from the heap. The `nova` binary calls this first thing; a program using the library
/// may too. Elsewhere than glibc it does nothing.
pub fn return_large_blocks_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before other threads run.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}

/// A lease the accountant refused: taking it would pass the limit.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("out of device memory: {what} needs {need}, {held} of {limit} already held")]
pub struct OutOfMemory {
    pub what: String,
    pub need: Bytes,
    pub held: Bytes,
    pub limit: Bytes,
}

/// Counts the device memory of one run against its limit and remembers the peak.
#[derive(Debug)]
pub struct Accountant {
    limit: Bytes,
    current: AtomicU64,
    peak: AtomicU64,
    /// The peak since the last [`Accountant::take_window_peak`].
    window_peak: AtomicU64,
}

impl Accountant {
    /// An accountant that refuses leases past `limit` (the budget minus headroom).
    pub fn new(limit: Bytes) -> Arc<Accountant> {
        Arc::new(Accountant {
            limit,
            current: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            window_peak: AtomicU64::new(0),
        })
    }

    /// An accountant that counts but never refuses.
    pub fn unlimited() -> Arc<Accountant> {
        Accountant::new(Bytes(u64::MAX))
    }

    /// Takes `bytes` if they fit under the limit.
    pub fn try_lease(self: &Arc<Self>, bytes: u64, what: &str) -> Result<Lease, OutOfMemory> {
        let mut cur = self.current.load(Ordering::SeqCst);
        loop {
            let next = cur.saturating_add(bytes);
            if next > self.limit.0 {
                return Err(OutOfMemory {
                    what: what.to_string(),
                    need: Bytes(bytes),
                    held: Bytes(cur),
                    limit: self.limit,
                });
            }
            match self
                .current
                .compare_exchange(cur, next, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => {
                    self.peak.fetch_max(next, Ordering::SeqCst);
                    self.window_peak.fetch_max(next, Ordering::SeqCst);
                    return Ok(Lease {
                        acct: self.clone(),
                        bytes,
                    });
                }
                Err(actual) => cur = actual,
            }
        }
    }

    /// Counts `bytes` that already exist (a value a kernel has produced), even past the limit;
    /// the peak then shows the overrun.
    pub fn lease(self: &Arc<Self>, bytes: u64) -> Lease {
        let next = self.current.fetch_add(bytes, Ordering::SeqCst) + bytes;
        self.peak.fetch_max(next, Ordering::SeqCst);
        self.window_peak.fetch_max(next, Ordering::SeqCst);
        Lease {
            acct: self.clone(),
            bytes,
        }
    }

    /// The limit leases are held under.
    pub fn limit(&self) -> Bytes {
        self.limit
    }

    /// Bytes held now.
    pub fn current(&self) -> Bytes {
        Bytes(self.current.load(Ordering::SeqCst))
    }

    /// The most bytes held at once so far.
    pub fn peak(&self) -> Bytes {
        Bytes(self.peak.load(Ordering::SeqCst))
    }

    /// The most bytes held at once since the last call (or the start), and a new window
    /// starting from what is held now: the tracked peak of one node while nodes run one
    /// after another.
    pub fn take_window_peak(&self) -> Bytes {
        let now = self.current.load(Ordering::SeqCst);
        Bytes(self.window_peak.swap(now, Ordering::SeqCst).max(now))
    }
}

/// Bytes held against an [`Accountant`]; returned on drop.
#[derive(Debug)]
pub struct Lease {
    acct: Arc<Accountant>,
    bytes: u64,
}

impl Lease {
    /// The bytes held.
    pub fn bytes(&self) -> Bytes {
        Bytes(self.bytes)
    }

    /// Whether this lease is held against `acct`.
    pub fn of(&self, acct: &Arc<Accountant>) -> bool {
        Arc::ptr_eq(&self.acct, acct)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.acct.current.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(Bytes::parse("2GiB"), Ok(Bytes::gib(2)));
        assert_eq!(Bytes::parse("2 GB"), Ok(Bytes::gib(2)));
        assert_eq!(Bytes::parse("1.5g"), Ok(Bytes(3 * GIB / 2)));
        assert_eq!(Bytes::parse("512MiB"), Ok(Bytes::mib(512)));
        assert_eq!(Bytes::parse("4096"), Ok(Bytes(4096)));
        assert!(Bytes::parse("lots").is_err());
        assert!(Bytes::parse("2 parsecs").is_err());
        assert_eq!(Bytes::gib(3).to_string(), "3.0 GiB");
        assert_eq!(Bytes::mib(768).to_string(), "768.0 MiB");
    }

    #[test]
    fn leases_count_until_dropped_and_the_limit_holds() {
        let a = Accountant::new(Bytes(100));
        let l1 = a.try_lease(60, "a").unwrap();
        let err = a.try_lease(50, "b").unwrap_err();
        assert_eq!(
            (err.need, err.held, err.limit),
            (Bytes(50), Bytes(60), Bytes(100))
        );
        let l2 = a.try_lease(40, "c").unwrap();
        assert_eq!(a.current(), Bytes(100));
        drop(l1);
        assert_eq!(a.current(), Bytes(40));
        drop(l2);
        assert_eq!((a.current(), a.peak()), (Bytes(0), Bytes(100)));
        // Counting what already exists may pass the limit, and the peak says so.
        let over = a.lease(150);
        assert_eq!(a.peak(), Bytes(150));
        // A window's peak starts again from what is held.
        assert_eq!(a.take_window_peak(), Bytes(150));
        assert_eq!(a.take_window_peak(), a.current());
        drop(over);
    }
}
