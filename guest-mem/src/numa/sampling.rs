//! Write-sampling windows: which vCPU writes which page. Two signals: the
//! thread id userfaultfd reports with a write-protect fault (the NUMA
//! scanner arms a window of pages by write-protecting them, the guest runs,
//! and the writes that fault name their vCPUs; the fault is then resolved
//! as any write-protect fault is: dirty recorded, protection lifted), or
//! the per-vCPU KVM dirty rings (the window's pages are only noted; each
//! ring harvest names the vCPUs that wrote them, with nothing protected).

use crate::core::WpMode;
use crate::entry::PAGE_SIZE;
use crate::ram::{GuestRam, RamError};
use crate::sync::LockOrRecover;
use std::collections::HashMap;
use std::sync::atomic::Ordering;

impl GuestRam {
    /// Write-protects the present pages among `pages` (guest-physical
    /// addresses) and starts noting which vCPUs write them. Returns the
    /// pages armed.
    ///
    /// Beside a write-protect tracker the sampling must not hide writes:
    /// with `uffd-async` (the kernel resolves its faults, so nothing names
    /// a vCPU) it is refused; with synchronous tracking only pages the
    /// tracker still protects (not written this round) are armed, and they
    /// are not protected again.
    pub fn arm_write_samples(&self, pages: &[u64]) -> Result<u64, RamError> {
        let uffd = self.core.uffd.as_ref().ok_or(RamError::Describe(
            "write sampling needs the fault engine".into(),
        ))?;
        let tracking = match self.core.wp_mode() {
            WpMode::Async => {
                return Err(RamError::Describe(
                    "write sampling cannot run beside uffd-async tracking".into(),
                ))
            }
            WpMode::Sync => true,
            WpMode::Off => false,
        };
        let mut armed = 0;
        for region in self.engine_regions() {
            if !pages.iter().any(|g| region.contains_gpa(*g)) {
                continue;
            }
            // Chosen under the region lock: no write fault can unprotect a
            // page between the check and the arming.
            let _g = region.lock.lock_or_recover();
            let mine: Vec<u64> = pages
                .iter()
                .copied()
                .filter(|g| {
                    let e = self.core.table.get(*g);
                    region.contains_gpa(*g) && e.is_present() && (!tracking || e.is_uffd_wp())
                })
                .collect();
            let mut samples = self.core.samples.lock_or_recover();
            if !tracking {
                for (s, e) in crate::tracking::runs(&mine) {
                    uffd.write_protect(region.host_of(s), e - s, true)?;
                }
                for gpa in &mine {
                    let _ = self
                        .core
                        .table
                        .update(*gpa, |e| e.is_present().then(|| e.write_protected()));
                }
            }
            for gpa in mine {
                samples.entry(gpa).or_insert(0);
                armed += 1;
            }
        }
        Ok(armed)
    }

    /// Arms a sampling window read from the KVM dirty rings: the present
    /// pages among `pages` are noted, nothing is protected, and
    /// [`GuestRam::note_writers`] names their writers at each ring
    /// harvest. Returns the pages armed.
    pub fn arm_ring_samples(&self, pages: &[u64]) -> u64 {
        let mut samples = self.core.samples.lock_or_recover();
        self.core.ring_sampling.store(true, Ordering::Release);
        let mut armed = 0;
        for gpa in pages {
            if self.core.table.get(*gpa).is_present() {
                samples.entry(*gpa).or_insert(0);
                armed += 1;
            }
        }
        armed
    }

    /// Another accessor signal (rule 1): vCPU `vcpu` wrote guest pages
    /// `pages` (sorted page numbers, e.g. from its KVM dirty ring): the
    /// regions holding them get its bit in their accessor bitmaps, and
    /// armed ring samples among them name it.
    pub fn note_writers(&self, vcpu: u32, pages: &[u64]) {
        if self.core.ring_sampling.load(Ordering::Acquire) {
            let mut samples = self.core.samples.lock_or_recover();
            for p in pages {
                if let Some(users) = samples.get_mut(&(p * PAGE_SIZE)) {
                    *users |= 1 << (vcpu % 64);
                }
            }
        }
        let regions = self.engine_regions();
        let mut last: Option<&std::sync::Arc<crate::region::Region>> = None;
        for p in pages {
            let gpa = p * PAGE_SIZE;
            if last.is_some_and(|r| r.contains_gpa(gpa)) {
                continue;
            }
            last = regions.iter().find(|r| r.contains_gpa(gpa));
            if let Some(r) = last {
                r.note_accessor(vcpu);
            }
        }
    }

    /// Takes what windows armed with [`GuestRam::arm_ring_samples`]
    /// learnt: each armed page a ring reported since, with the vCPUs (bit
    /// = id % 64) that wrote it. Pages no ring reported yet stay armed
    /// (rings are harvested at round ends, less often than the scanner
    /// runs); `all` ends every window.
    pub fn take_ring_samples(&self, all: bool) -> HashMap<u64, u64> {
        let mut samples = self.core.samples.lock_or_recover();
        if all {
            self.core.ring_sampling.store(false, Ordering::Release);
            return std::mem::take(&mut *samples);
        }
        let written: HashMap<u64, u64> = samples
            .iter()
            .filter(|(_, users)| **users != 0)
            .map(|(g, u)| (*g, *u))
            .collect();
        samples.retain(|_, users| *users == 0);
        written
    }

    /// Ends the armed windows: each armed page with the vCPUs (bit = id %
    /// 64) whose writes faulted on it since. Pages nobody wrote get their
    /// protection lifted (unless a write-protect tracker or a live snapshot
    /// wants them protected).
    pub fn take_write_samples(&self) -> Result<HashMap<u64, u64>, RamError> {
        let samples = std::mem::take(&mut *self.core.samples.lock_or_recover());
        let keep = self.core.wp_mode() != WpMode::Off || self.core.live_copy.load().is_some();
        if !keep {
            if let Some(uffd) = &self.core.uffd {
                for region in self.engine_regions() {
                    let idle: Vec<u64> = samples
                        .iter()
                        .filter(|(g, users)| **users == 0 && region.contains_gpa(**g))
                        .map(|(g, _)| *g)
                        .collect();
                    if idle.is_empty() {
                        continue;
                    }
                    let mut idle = idle;
                    idle.sort_unstable();
                    let _g = region.lock.lock_or_recover();
                    let writable = !region.flags.read_only;
                    for (s, e) in crate::tracking::runs(&idle) {
                        uffd.write_protect(region.host_of(s), e - s, false)?;
                        let mut gpa = s;
                        while gpa < e {
                            let _ = self.core.table.update(gpa, |x| {
                                (x.is_present() && x.is_uffd_wp())
                                    .then(|| x.write_unprotected(writable))
                            });
                            gpa += PAGE_SIZE;
                        }
                    }
                }
            }
        }
        Ok(samples)
    }
}
