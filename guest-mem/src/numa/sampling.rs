//! Write-sampling windows: which vCPU writes which page, learnt from the
//! thread id userfaultfd reports with a write-protect fault. The NUMA
//! scanner arms a window of pages (write-protects them), the guest runs,
//! and the writes that fault name their vCPUs; the fault is then resolved
//! as any write-protect fault is (dirty recorded, protection lifted).

use crate::core::WpMode;
use crate::entry::PAGE_SIZE;
use crate::ram::{GuestRam, RamError};
use crate::sync::LockOrRecover;
use std::collections::HashMap;

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
        for region in self.regions() {
            let mine: Vec<u64> = pages
                .iter()
                .copied()
                .filter(|g| {
                    let e = self.core.table.get(*g);
                    region.contains_gpa(*g) && e.is_present() && (!tracking || e.is_uffd_wp())
                })
                .collect();
            if mine.is_empty() {
                continue;
            }
            let _g = region.lock.lock_or_recover();
            let mut samples = self.core.samples.lock_or_recover();
            if !tracking {
                for (s, e) in crate::tracking::runs(&mine) {
                    uffd.write_protect(region.host_of(s), e - s, true)?;
                }
            }
            for gpa in mine {
                samples.entry(gpa).or_insert(0);
                let _ = self
                    .core
                    .table
                    .update(gpa, |e| e.is_present().then(|| e.write_protected()));
                armed += 1;
            }
        }
        Ok(armed)
    }

    /// Another accessor signal (rule 1): vCPU `vcpu` wrote guest pages
    /// `pages` (page numbers, e.g. from its KVM dirty ring): the regions
    /// holding them get its bit in their accessor bitmaps.
    pub fn note_writers(&self, vcpu: u32, pages: &[u64]) {
        let regions = self.regions();
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

    /// Ends the armed windows: each armed page with the vCPUs (bit = id %
    /// 64) whose writes faulted on it since. Pages nobody wrote get their
    /// protection lifted (unless a write-protect tracker or a live snapshot
    /// wants them protected).
    pub fn take_write_samples(&self) -> Result<HashMap<u64, u64>, RamError> {
        let samples = std::mem::take(&mut *self.core.samples.lock_or_recover());
        let keep = self.core.wp_mode() != WpMode::Off || self.core.live_copy.load().is_some();
        if !keep {
            if let Some(uffd) = &self.core.uffd {
                for region in self.regions() {
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
