//! Memory shared with the host (`vmm run --shared-mem FILE`).
//!
//! The file is mapped shared (`MAP_SHARED`, not copy-on-write) over the top
//! of guest memory below the ROM, before the guest runs: the guest's writes
//! and the block device's reach the file at once, and whoever else maps it
//! sees them, as with QEMU's ivshmem. A device pin there keeps the very
//! page the file has (its unshare does nothing, guest-mem's rule 14). The
//! kernel serves the range, not the fault engine, so write-protect
//! tracking and live snapshots pass it by. A snapshot records the file,
//! not its content: a restore, a clone or a fork child maps the same file
//! again and sees what the host and the other VMs have written there.

use crate::config::SharedMemConfig;
use guest_mem::{GuestRam, RamError};
use guest_protocol::control::{SHARED_CHECK_DEVICE_COPIED, SHARED_CHECK_STORED};
use std::path::{Path, PathBuf};

/// Why shared memory cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum SharedMemError {
    /// The file cannot be opened for reading and writing.
    #[error("--shared-mem {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file changed size since it was checked.
    #[error("--shared-mem {path} is {len} bytes now, not {want}")]
    Resized {
        /// The file.
        path: PathBuf,
        /// Its length now.
        len: u64,
        /// The length checked.
        want: u64,
    },
    /// Guest memory refused the mapping.
    #[error("mapping the shared memory: {0}")]
    Ram(#[from] RamError),
}

/// `path` opened for reading and writing, and its length.
fn open_sized(path: &Path) -> Result<(std::fs::File, u64), SharedMemError> {
    let fail = |source| SharedMemError::Open {
        path: path.into(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(fail)?;
    let len = file.metadata().map_err(fail)?.len();
    Ok((file, len))
}

/// The shared memory `path` gives: all of the file (the configuration's
/// check says whether its size will do).
pub fn shared_for_file(path: &Path) -> Result<SharedMemConfig, SharedMemError> {
    let (file, len) = open_sized(path)?;
    // Recorded in snapshots: whoever restores one finds it from anywhere.
    let path = std::fs::canonicalize(path).map_err(|source| SharedMemError::Open {
        path: path.into(),
        source,
    })?;
    Ok(SharedMemConfig {
        bytes: len,
        file: Some(path),
        pinnable: crate::host_fs::lets_devices_pin(&file),
    })
}

/// Maps the configuration's file into the top of `ram` below its ROM
/// (does nothing without one). Call before the guest runs.
pub fn map_into(ram: &mut GuestRam, shared: &SharedMemConfig) -> Result<(), SharedMemError> {
    let Some(path) = &shared.file else {
        return Ok(());
    };
    let (file, len) = open_sized(path)?;
    if len != shared.bytes {
        return Err(SharedMemError::Resized {
            path: path.clone(),
            len,
            want: shared.bytes,
        });
    }
    ram.set_shared_file(&file)?;
    Ok(())
}

/// The `"shared_mem"` object of a run report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SharedMemReport {
    /// Where it starts.
    pub gpa: u64,
    /// Its bytes.
    pub bytes: u64,
    /// The file.
    pub file: PathBuf,
    /// What the guest's probe at boot found, if it sent one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_check: Option<GuestSharedCheck>,
    /// The first word of the third page as the guest's last verify read
    /// it, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seen_at_verify: Option<u64>,
}

/// The guest's probe of its shared memory, from its `SharedCheck` event.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct GuestSharedCheck {
    /// Its store into the first page read back.
    pub stored: bool,
    /// The block device (`io` workload) copied the first page into the
    /// second through a block: a read-write pin of shared memory, which
    /// does not unshare it, so the copy is in the file too.
    pub device_copied: bool,
}

/// The report of `ram`'s shared memory, if it has one; `guest_check` is
/// the bits of the guest's `SharedCheck` event, `seen` the word of its
/// last `SharedSeen`, if it sent them.
pub fn report(
    ram: &GuestRam,
    shared: &SharedMemConfig,
    guest_check: Option<u64>,
    seen: Option<u64>,
) -> Option<SharedMemReport> {
    let region = ram.shared_file()?;
    Some(SharedMemReport {
        gpa: region.gpa,
        bytes: region.size,
        file: shared.file.clone().unwrap_or_default(),
        guest_check: guest_check.map(|bits| GuestSharedCheck {
            stored: bits & SHARED_CHECK_STORED != 0,
            device_copied: bits & SHARED_CHECK_DEVICE_COPIED != 0,
        }),
        seen_at_verify: seen,
    })
}
