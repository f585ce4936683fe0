//! Read-only memory at the top of guest memory (`vmm run --rom FILE`).
//!
//! The file is loaded before the guest runs; KVM maps the ROM as a
//! read-only memory slot, so the guest reads it like RAM while each of its
//! writes exits to the VMM (as MMIO), which refuses it: the write is
//! dropped, logged and counted, and the guest can read the count on
//! [`ROM_PORT`]. The block device's pins refuse a write into the ROM
//! (guest-mem's rule 14: the region is read-only), so a device read into it
//! fails with the `Refused` status. The ROM's content lives in guest
//! memory's mapping, so snapshots, restores, clones and forks carry it.

use crate::config::{RomConfig, MAX_ROM_BYTES};
use crate::size::format_size;
use guest_mem::{GuestRam, RamError};
use guest_protocol::control::{
    ROM_CHECK_CONTENT, ROM_CHECK_CPU_REFUSED, ROM_CHECK_DEVICE_COPIED, ROM_CHECK_DEVICE_REFUSED,
    ROM_CHECK_DEVICE_TRIED, ROM_PORT,
};
use guest_protocol::layout::PAGE_SIZE;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a ROM cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum RomError {
    /// The file cannot be read.
    #[error("--rom {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is empty.
    #[error("--rom {0} is empty")]
    Empty(PathBuf),
    /// The file is larger than a ROM may be, or than the ROM it was
    /// sized for (it grew since).
    #[error("--rom {path} is {len} bytes; the ROM holds at most {}", format_size(*max))]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The most it may have.
        max: u64,
    },
    /// Guest memory refused the load.
    #[error("loading the ROM: {0}")]
    Ram(#[from] RamError),
}

/// The ROM that `path` needs: its length rounded up to whole pages.
pub fn rom_for_file(path: &Path) -> Result<RomConfig, RomError> {
    let len = std::fs::metadata(path)
        .map_err(|source| RomError::Read {
            path: path.into(),
            source,
        })?
        .len();
    if len == 0 {
        return Err(RomError::Empty(path.into()));
    }
    if len > MAX_ROM_BYTES {
        return Err(RomError::TooLarge {
            path: path.into(),
            len,
            max: MAX_ROM_BYTES,
        });
    }
    Ok(RomConfig {
        bytes: len.div_ceil(PAGE_SIZE) * PAGE_SIZE,
        file: Some(path.into()),
    })
}

/// Copies the ROM's file into the ROM at the top of `ram` (the rest of its
/// last page stays zero). Does nothing without a file (no ROM, or a
/// restored one, whose content came with the memory image).
pub fn load(ram: &GuestRam, rom: &RomConfig) -> Result<(), RomError> {
    let (Some(path), Some(region)) = (&rom.file, ram.rom()) else {
        return Ok(());
    };
    let content = std::fs::read(path).map_err(|source| RomError::Read {
        path: path.clone(),
        source,
    })?;
    if content.len() as u64 > region.size {
        return Err(RomError::TooLarge {
            path: path.clone(),
            len: content.len() as u64,
            max: region.size,
        });
    }
    ram.write(region.gpa, &content)?;
    Ok(())
}

/// What the VMM does about guest writes to the ROM, per VM.
pub struct RomGuard {
    start: u64,
    end: u64,
    refused: AtomicU64,
}

impl RomGuard {
    /// The guard of `ram`'s ROM, if it has one.
    pub fn of(ram: &GuestRam) -> Option<RomGuard> {
        ram.rom().map(|r| RomGuard {
            start: r.gpa,
            end: r.gpa + r.size,
            refused: AtomicU64::new(0),
        })
    }

    /// True when `gpa` lies in the ROM.
    pub fn covers(&self, gpa: u64) -> bool {
        (self.start..self.end).contains(&gpa)
    }

    /// Refuses vCPU `vcpu`'s write of `len` bytes at `gpa` (in the ROM):
    /// it is dropped, never applied; logged and counted.
    pub fn refuse_write(&self, vcpu: u32, gpa: u64, len: usize) {
        let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        log::warn!(
            "vCPU {vcpu}: refused a guest write of {len} bytes to read-only memory at {gpa:#x} (ROM {:#x}..{:#x}; {n} refused so far)",
            self.start,
            self.end
        );
    }

    /// True for the ROM's port.
    pub fn claims(port: u16) -> bool {
        port == ROM_PORT
    }

    /// A read of the ROM port: the writes refused so far (low 32 bits).
    pub fn io_in(&self) -> u32 {
        self.refused.load(Ordering::Relaxed) as u32
    }

    /// The ROM's part of a run report; `guest_check` is the bits of the
    /// guest's `RomCheck` event, if it sent one.
    pub fn report(&self, guest_check: Option<u64>, device_refused: u64) -> RomReport {
        RomReport {
            gpa: self.start,
            bytes: self.end - self.start,
            guest_writes_refused: self.refused.load(Ordering::Relaxed),
            device_writes_refused: device_refused,
            guest_check: guest_check.map(GuestRomCheck::from_bits),
        }
    }
}

/// The `"rom"` object of a run report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RomReport {
    /// Where the ROM starts.
    pub gpa: u64,
    /// Its bytes.
    pub bytes: u64,
    /// Guest CPU writes to it the VMM refused in this run.
    pub guest_writes_refused: u64,
    /// Block device requests refused in this run because their page may
    /// not be written (the ROM) or is poisoned.
    pub device_writes_refused: u64,
    /// What the guest's probe at boot found (absent for a restored guest,
    /// which probed before its snapshot, and for kernels that do not).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_check: Option<GuestRomCheck>,
}

/// The guest's own check of its ROM, from its `RomCheck` event.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct GuestRomCheck {
    /// The content matched the boot-info page's checksum.
    pub content_ok: bool,
    /// A CPU store left the ROM unchanged and the ROM port counted it.
    pub cpu_write_refused: bool,
    /// The block device (`io` workload) copied the ROM's first page out to
    /// a block and back into a scratch page intact (reading read-only
    /// memory is allowed).
    pub device_read_ok: bool,
    /// The guest asked the device to read a block into the ROM ...
    pub device_write_tried: bool,
    /// ... and the device refused, the ROM unchanged.
    pub device_write_refused: bool,
}

impl GuestRomCheck {
    fn from_bits(bits: u64) -> GuestRomCheck {
        GuestRomCheck {
            content_ok: bits & ROM_CHECK_CONTENT != 0,
            cpu_write_refused: bits & ROM_CHECK_CPU_REFUSED != 0,
            device_read_ok: bits & ROM_CHECK_DEVICE_COPIED != 0,
            device_write_tried: bits & ROM_CHECK_DEVICE_TRIED != 0,
            device_write_refused: bits & ROM_CHECK_DEVICE_REFUSED != 0,
        }
    }
}
