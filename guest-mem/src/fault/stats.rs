//! Fault-engine and lookup counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Buckets of the handler latency histogram: bucket `i` counts handler
/// runs that took `[2^i, 2^(i+1))` µs (bucket 0: under 2 µs).
pub const LATENCY_BUCKETS: usize = 20;

/// Counters, all updated with relaxed atomics.
#[derive(Debug, Default)]
pub struct FaultCounters {
    pub(crate) missing_read: AtomicU64,
    pub(crate) missing_write: AtomicU64,
    pub(crate) wp: AtomicU64,
    pub(crate) minor: AtomicU64,
    pub(crate) pages_populated: AtomicU64,
    pub(crate) fault_around_pages: AtomicU64,
    pub(crate) races: AtomicU64,
    pub(crate) fast_path: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) fallbacks: AtomicU64,
    pub(crate) outside: AtomicU64,
    pub(crate) latency: [AtomicU64; LATENCY_BUCKETS],
}

/// A snapshot of the counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Missing faults on reads.
    pub missing_read: u64,
    /// Missing faults on writes.
    pub missing_write: u64,
    /// Write-protect faults.
    pub wp: u64,
    /// Minor faults.
    pub minor: u64,
    /// Pages populated by the engine (faulting pages and neighbours).
    pub pages_populated: u64,
    /// Neighbours populated by fault-around.
    pub fault_around_pages: u64,
    /// Faults that found their page already resolved (a racing fault won).
    pub races: u64,
    /// Faults served under the region lock only (rule 2 fast path).
    pub fast_path: u64,
    /// Lookups retried because the region changed under them.
    pub retries: u64,
    /// Faults that fell back to the global lock (first fault of a leaf table).
    pub fallbacks: u64,
    /// Faults outside any live region (woken and left to the kernel).
    pub outside: u64,
    /// Handler latency histogram (see [`LATENCY_BUCKETS`]).
    pub latency_us_log2: Vec<u64>,
}

impl FaultStats {
    /// Missing faults of both kinds.
    pub fn missing(&self) -> u64 {
        self.missing_read + self.missing_write
    }
}

impl FaultCounters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn record_latency(&self, d: Duration) {
        let us = d.as_micros() as u64;
        let bucket = (64 - us.leading_zeros() as usize)
            .saturating_sub(1)
            .min(LATENCY_BUCKETS - 1);
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> FaultStats {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FaultStats {
            missing_read: r(&self.missing_read),
            missing_write: r(&self.missing_write),
            wp: r(&self.wp),
            minor: r(&self.minor),
            pages_populated: r(&self.pages_populated),
            fault_around_pages: r(&self.fault_around_pages),
            races: r(&self.races),
            fast_path: r(&self.fast_path),
            retries: r(&self.retries),
            fallbacks: r(&self.fallbacks),
            outside: r(&self.outside),
            latency_us_log2: self.latency.iter().map(r).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets() {
        let c = FaultCounters::default();
        c.record_latency(Duration::from_nanos(500));
        c.record_latency(Duration::from_micros(3));
        c.record_latency(Duration::from_secs(100));
        let s = c.snapshot();
        assert_eq!(s.latency_us_log2[0], 1);
        assert_eq!(s.latency_us_log2[1], 1);
        assert_eq!(s.latency_us_log2[LATENCY_BUCKETS - 1], 1);
    }
}
