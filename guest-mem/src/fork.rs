//! Freezing guest RAM for a fork: the content at this moment becomes an
//! image this VM and its children all map privately (copy-on-write), so a
//! write on any side stays invisible to the others.

use crate::core::WpMode;
use crate::entry::{Flag, PAGE_SIZE};
use crate::ram::{GuestRam, RamError};
use crate::region::BackingKind;
use crate::sync::LockOrRecover;
use crate::uffd::sys::{UFFDIO_REGISTER_MODE_MISSING, UFFDIO_REGISTER_MODE_WP};

impl GuestRam {
    /// Before a fork's pause, while the guest runs: drops this VM's page
    /// table entries for its memfd (`MADV_DONTNEED`; the pages stay in the
    /// memfd and the guest's next touch maps them again, without a
    /// userfaultfd fault). The remap inside the pause then has only the
    /// entries touched since to tear down: 0.9 ms instead of 41 ms for a
    /// GiB populated here, of which 1% was touched again. Does nothing for
    /// memory that is not a shared memfd mapping.
    pub fn prepare_fork(&self) {
        for region in self.regions() {
            if region.backing != BackingKind::Memfd || region.mapping.is_private_image() {
                continue;
            }
            // SAFETY: the region's own live, shared memfd mapping: dropping
            // its page table entries loses no data (the memfd keeps it).
            let rc = unsafe {
                libc::madvise(
                    region.host_start() as *mut libc::c_void,
                    region.size as usize,
                    libc::MADV_DONTNEED,
                )
            };
            if rc != 0 {
                log::debug!(
                    "dropping page table entries before a fork: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }

    /// Makes guest RAM's content at this moment the image of a fork: the
    /// memfd behind it stops changing (this VM's mapping becomes a private
    /// one of it, at the same address, so KVM's memory slot stays valid
    /// and the VM sees the same bytes). Returns the memfd, for the
    /// children to map privately ([`GuestRam::from_file_private`]).
    ///
    /// Call with the vCPUs paused. Needs one `memfd` mapping (one region,
    /// or the regions of guest NUMA nodes sharing it), and no
    /// write-protect tracking or live snapshot running (their protection
    /// would not survive the new mapping). A VM whose RAM already is a
    /// private image (restored by `mmap`, cloned, forked before) keeps its
    /// mapping: see `freeze_private_image`.
    pub fn freeze_for_fork(&self) -> Result<ForkImage, RamError> {
        let refuse = |why: &str| RamError::Describe(format!("cannot fork: {why}"));
        let regions = self.regions();
        let Some(region) = regions.first() else {
            return Err(refuse("guest RAM has no region"));
        };
        if regions
            .iter()
            .any(|r| !std::sync::Arc::ptr_eq(&r.mapping, &region.mapping))
        {
            return Err(refuse("guest RAM has more than one mapping"));
        }
        if region.backing != BackingKind::Memfd {
            return Err(refuse("guest RAM must be a memfd (--backing memfd)"));
        }

        if self.core.wp_mode() != WpMode::Off || self.core.live_copy.load().is_some() {
            return Err(refuse(
                "write-protect tracking or a live snapshot is running",
            ));
        }
        let uffd = self
            .core
            .uffd
            .as_ref()
            .ok_or_else(|| refuse("guest RAM has no fault engine"))?;
        if region.mapping.is_private_image() {
            return self.freeze_private_image(&regions);
        }
        // No fault is served on the regions while their mapping changes
        // (locks taken in address order).
        let _g: Vec<_> = regions.iter().map(|r| r.lock.lock_or_recover()).collect();
        let host_of = |gpa: u64| {
            regions
                .iter()
                .find(|r| r.contains_gpa(gpa))
                .map_or(0, |r| r.host_of(gpa))
        };
        // The regions lie back to back in the mapping.
        let base = region.gpa - region.offset;
        // Rule 13: pinned pages stay this VM's (shared with the device,
        // never with a child): their mapping stays as it is, and the
        // children get copies of their content now. (A pinned page of a
        // file shared with the host is that file's on every side.)
        let mut pinned: Vec<u64> = self.pinned_pages();
        pinned.retain(|g| {
            regions
                .iter()
                .any(|r| r.contains_gpa(*g) && r.backing.uses_fault_engine())
        });
        let mut copies = Vec::with_capacity(pinned.len());
        for &gpa in &pinned {
            let mut page = vec![0u8; PAGE_SIZE as usize];
            crate::live_copy::read_run(host_of(gpa), &mut page);
            copies.push((gpa, page));
        }
        // Regions the kernel serves (a file shared with the host) stay
        // the very shared mapping they are, on every side.
        let mut keep: Vec<(u64, u64)> = crate::tracking::runs(&pinned)
            .into_iter()
            .chain(
                regions
                    .iter()
                    .filter(|r| !r.backing.uses_fault_engine())
                    .map(|r| (r.gpa, r.gpa + r.size)),
            )
            .map(|(s, e)| (s - base, e - base))
            .collect();
        keep.sort_unstable();
        let file = region
            .mapping
            .remap_private(&keep)
            .map_err(|e| refuse(&e.to_string()))?;
        for r in regions.iter().filter(|r| r.backing.uses_fault_engine()) {
            uffd.register(
                r.host_start(),
                r.size,
                UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP,
            )
            .map_err(|e| refuse(&format!("re-registering guest RAM with userfaultfd: {e}")))?;
        }
        // The table's shared/exclusive bits are not rewritten here: that
        // walk would grow the pause with memory size. The kernel knows which
        // pages are shared; `refresh_sharing` records it when asked.
        Ok(ForkImage {
            file,
            pinned_copies: copies,
        })
    }

    /// A fork of a VM whose RAM already is a private mapping of an image
    /// (restored by `mmap`, cloned, or forked before): the image does not
    /// change, so the children map it too, and the pages that are this
    /// VM's own (written, or populated privately) are copied for them now.
    /// The pause grows with those pages, not with guest RAM.
    fn freeze_private_image(
        &self,
        regions: &[std::sync::Arc<crate::region::Region>],
    ) -> Result<ForkImage, RamError> {
        let refuse = |why: &str| RamError::Describe(format!("cannot fork: {why}"));
        let file = regions[0]
            .mapping
            .image_file()
            .ok_or_else(|| refuse("guest RAM's image file is not known"))?
            .try_clone()
            .map_err(|e| refuse(&format!("sharing guest RAM's image: {e}")))?;
        let own = self.own_pages()?;
        let _g: Vec<_> = regions.iter().map(|r| r.lock.lock_or_recover()).collect();
        let mut copies = Vec::with_capacity(own.len());
        for gpa in own {
            let Some(region) = regions.iter().find(|r| r.contains_gpa(gpa)) else {
                continue;
            };
            let mut page = vec![0u8; PAGE_SIZE as usize];
            crate::live_copy::read_run(region.host_of(gpa), &mut page);
            copies.push((gpa, page));
        }
        Ok(ForkImage {
            file,
            pinned_copies: copies,
        })
    }

    /// A fork child: takes `image`'s copies of the parent's pinned pages
    /// as its own private pages (they were never shared through the memfd
    /// the child maps). Call before the child runs.
    pub fn adopt_pinned_copies(&self, image: &ForkImage) -> Result<(), RamError> {
        for (gpa, content) in &image.pinned_copies {
            self.write(*gpa, content)?;
            let _ = self.core.table.update(*gpa, |e| {
                e.is_present()
                    .then(|| e.with(Flag::Exclusive).without(Flag::CowShared))
            });
        }
        Ok(())
    }
}

/// What a fork's children start from.
pub struct ForkImage {
    /// The memfd holding guest RAM at the fork (pinned pages aside), for
    /// the children to map privately.
    pub file: std::fs::File,
    /// Pages the children do not share with the parent through `file`
    /// (its pinned pages; for a parent whose RAM was already a private
    /// image, all its own pages): (guest-physical address, content at the
    /// fork). Each child gets its own copy.
    pub pinned_copies: Vec<(u64, Vec<u8>)>,
}
