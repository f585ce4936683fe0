//! `CLOCK_MONOTONIC` timestamps that another process can compare: the
//! benchmarks measure from process spawn (taken in the parent) to events in
//! the child (a first `KVM_RUN`, a first I/O exit).

use std::time::Instant;

/// Nanoseconds of `CLOCK_MONOTONIC`, the clock `Instant` reads on Linux.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own; CLOCK_MONOTONIC
    // always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Converts `Instant`s into `CLOCK_MONOTONIC` nanoseconds.
#[derive(Clone, Copy, Debug)]
pub struct MonotonicAnchor {
    instant: Instant,
    ns: u64,
}

impl MonotonicAnchor {
    /// An anchor taken now.
    pub fn now() -> Self {
        let instant = Instant::now();
        MonotonicAnchor {
            instant,
            ns: monotonic_ns(),
        }
    }

    /// `t` in `CLOCK_MONOTONIC` nanoseconds.
    pub fn ns_at(&self, t: Instant) -> u64 {
        match t.checked_duration_since(self.instant) {
            Some(d) => self.ns + d.as_nanos() as u64,
            None => self
                .ns
                .saturating_sub(self.instant.duration_since(t).as_nanos() as u64),
        }
    }
}
