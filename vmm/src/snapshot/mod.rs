//! Snapshots: a directory holding `memory.bin` (raw, sparse guest memory)
//! and `state.bin` (machine, vCPUs, irqchip, devices, markers, checksums),
//! written under a temporary name, fsynced, then renamed into place, so a
//! crash never leaves a directory that looks valid. See
//! `docs/snapshot-format.md`.
//!
//! * [`state`]: `state.bin`'s contents and envelope, and saving/restoring
//!   KVM state.
//! * [`memory`]: `memory.bin`, its chunk checksums and loading.
//! * [`writer`]: taking a snapshot of a running VM.
//! * [`restore`]: booting a VM from a snapshot.
//! * [`clone`]: many VMs from one snapshot, sharing its memory copy-on-write.
//! * [`prefetch`]: a lazy restore's prefetch of the recorded working set.

pub mod chain;
pub mod clone;
pub mod inspect;
pub mod memory;
pub mod prefetch;
pub mod restore;
pub mod state;
pub mod writer;

use std::path::{Path, PathBuf};

/// Snapshot errors.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The directory or a file cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The target exists already.
    #[error("{0} exists already: choose a new snapshot directory")]
    Exists(PathBuf),
    /// `state.bin` is bad.
    #[error(transparent)]
    State(#[from] state::StateError),
    /// `memory.bin` is bad.
    #[error(transparent)]
    Memory(#[from] memory::MemoryFileError),
    /// Pausing or capturing the vCPUs failed.
    #[error("cannot capture the VM: {0}")]
    Capture(String),
    /// KVM refused a state ioctl.
    #[error("{what}: {source}")]
    Kvm {
        /// What was attempted.
        what: String,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// The snapshot cannot run on this host.
    #[error("snapshot is incompatible with this host: {0}")]
    Incompatible(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads and checks `DIR/state.bin` (size capped before reading).
pub fn read_state(dir: &Path) -> Result<(state::SnapshotState, u32), SnapshotError> {
    let path = dir.join("state.bin");
    let meta = std::fs::metadata(&path).map_err(io(&path))?;
    if meta.len() > state::MAX_STATE_BYTES {
        return Err(state::StateError::Size(format!("{} bytes", meta.len())).into());
    }
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    Ok(state::decode(&bytes)?)
}
