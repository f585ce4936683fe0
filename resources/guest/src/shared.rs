//! Memory shared with the host (`vmm run --shared-mem FILE`): a file the
//! host maps too, below the ROM at the top of guest memory. vCPU 0 stores
//! a known word into its first page and, with the block device, copies
//! that page into the second through a block; the host reads both back
//! from the file.

use crate::io;
use core::ptr::{read_volatile, write_volatile};
use guest_protocol::boot_info::{BootInfo, SHARED_PROBE_WORD};
use guest_protocol::control::{SHARED_CHECK_DEVICE_COPIED, SHARED_CHECK_STORED};
use guest_protocol::layout::PAGE_SIZE;

/// Where the shared memory is.
#[derive(Clone, Copy)]
pub struct SharedMem {
    gpa: u64,
    pages: u64,
}

impl SharedMem {
    /// The shared memory the boot-info page describes, if any.
    ///
    /// # Safety
    /// `bi` is the identity-mapped boot-info page.
    pub unsafe fn of(bi: *const BootInfo) -> Option<SharedMem> {
        // SAFETY: the caller's contract; each field is read on its own.
        let (gpa, bytes) = unsafe {
            (
                read_volatile(&raw const (*bi).shared_gpa),
                read_volatile(&raw const (*bi).shared_bytes),
            )
        };
        (bytes != 0).then_some(SharedMem {
            gpa,
            pages: bytes / PAGE_SIZE,
        })
    }

    /// The first word of the third page, if there is one.
    pub fn third_page_word(&self) -> Option<u64> {
        // SAFETY: the shared memory's third page, identity-mapped.
        (self.pages >= 3)
            .then(|| unsafe { read_volatile((self.gpa + 2 * PAGE_SIZE) as *const u64) })
    }

    /// Stores `SHARED_PROBE_WORD` into the first page and, given a block
    /// of the block device, has the device copy the first page into the
    /// second through it. Returns the `SHARED_CHECK_*` bits of what held.
    pub fn probe(&self, block: Option<u64>) -> u64 {
        let mut held = 0;
        let first = self.gpa as *mut u64;
        // SAFETY: the shared memory's first word, identity-mapped, the
        // guest's to write.
        let stored = unsafe {
            write_volatile(first, SHARED_PROBE_WORD);
            read_volatile(first)
        };
        if stored == SHARED_PROBE_WORD {
            held |= SHARED_CHECK_STORED;
        }
        if let Some(block) = block.filter(|_| self.pages >= 2) {
            let page = self.gpa / PAGE_SIZE;
            let done = io::copy_through_block(page, page + 1, block);
            // SAFETY: the second page of the shared memory, identity-mapped.
            let copied = unsafe { read_volatile((self.gpa + PAGE_SIZE) as *const u64) };
            if done && copied == SHARED_PROBE_WORD {
                held |= SHARED_CHECK_DEVICE_COPIED;
            }
        }
        held
    }
}
