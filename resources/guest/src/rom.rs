//! The read-only memory (ROM) the VMM may give the guest at the top of its
//! memory: vCPU 0 checks that it holds what the boot-info page says, and
//! that a CPU store and a device read into it are refused.

use crate::io;
use core::ptr::{read_volatile, write_volatile};
use guest_protocol::boot_info::{rom_sum, BootInfo};
use guest_protocol::control::{
    BLOCK_CMD_READ, BLOCK_STATUS_REFUSED, ROM_CHECK_CONTENT, ROM_CHECK_CPU_REFUSED,
    ROM_CHECK_DEVICE_COPIED, ROM_CHECK_DEVICE_REFUSED, ROM_CHECK_DEVICE_TRIED,
};
use guest_protocol::layout::PAGE_SIZE;

/// Where the ROM is and what it should hold.
#[derive(Clone, Copy)]
pub struct Rom {
    gpa: u64,
    pages: u64,
    sum: u64,
}

impl Rom {
    /// The ROM the boot-info page describes, if any.
    ///
    /// # Safety
    /// `bi` is the identity-mapped boot-info page.
    pub unsafe fn of(bi: *const BootInfo) -> Option<Rom> {
        // SAFETY: the caller's contract; each field is read on its own.
        let (gpa, bytes, sum) = unsafe {
            (
                read_volatile(&raw const (*bi).rom_gpa),
                read_volatile(&raw const (*bi).rom_bytes),
                read_volatile(&raw const (*bi).rom_sum),
            )
        };
        (bytes != 0).then_some(Rom {
            gpa,
            pages: bytes / PAGE_SIZE,
            sum,
        })
    }

    fn first_word(&self) -> *mut u64 {
        self.gpa as *mut u64
    }

    /// True when the ROM holds what the VMM put there.
    pub fn content_ok(&self) -> bool {
        let words = (0..self.pages).map(|p| {
            // SAFETY: a page of the ROM, identity-mapped (inside guest
            // memory); reading it is always allowed.
            unsafe { read_volatile((self.gpa + p * PAGE_SIZE) as *const u64) }
        });
        rom_sum(words) == self.sum
    }

    /// Checks the content, stores to the ROM's first word (the VMM must
    /// refuse the store and count it on the ROM port) and, given a block
    /// of the block device and a free scratch page, has the device copy
    /// the ROM's first page out to the block and back into the scratch
    /// page (allowed), then read the block into the ROM (it must refuse).
    /// Returns the `ROM_CHECK_*` bits of what held.
    pub fn probe(&self, device: Option<(u64, u64)>) -> u64 {
        let mut held = 0;
        if self.content_ok() {
            held |= ROM_CHECK_CONTENT;
        }
        let p = self.first_word();
        // SAFETY: the ROM's first word, identity-mapped. The store is
        // meant to fail: the VMM drops it and counts it.
        let (before, refused_before) = (unsafe { read_volatile(p) }, io::rom_refused());
        // SAFETY: as above.
        unsafe { write_volatile(p, !before) };
        // SAFETY: as above.
        if unsafe { read_volatile(p) } == before
            && io::rom_refused() == refused_before.wrapping_add(1)
        {
            held |= ROM_CHECK_CPU_REFUSED;
        }
        if let Some((block, scratch)) = device {
            let copied = io::copy_through_block(self.gpa / PAGE_SIZE, scratch / PAGE_SIZE, block);
            // SAFETY: the caller's free scratch page, identity-mapped.
            let copy = unsafe { read_volatile(scratch as *const u64) };
            if copied && copy == before {
                held |= ROM_CHECK_DEVICE_COPIED;
            }
            held |= ROM_CHECK_DEVICE_TRIED;
            let status = io::block(BLOCK_CMD_READ, self.gpa / PAGE_SIZE, block);
            // SAFETY: as above.
            if status == BLOCK_STATUS_REFUSED && unsafe { read_volatile(p) } == before {
                held |= ROM_CHECK_DEVICE_REFUSED;
            }
        }
        held
    }
}
