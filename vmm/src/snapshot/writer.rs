//! Taking a snapshot of a running VM.
//!
//! * `live`: write-protect guest RAM while the guest runs, pause only to
//!   capture the vCPUs and the irqchip and re-protect the pages written
//!   meanwhile, resume, then copy in the background while write faults copy
//!   a page before letting the write through (`guest_mem::live_copy`).
//! * `paused` (stop-the-world): the vCPUs are paused — each saves its own
//!   state as it parks — the irqchip and device state are read, every
//!   populated non-zero page is written to `memory.bin`, and the vCPUs
//!   resume.
//!
//! Everything goes into a temporary directory next to the target, fsynced,
//! then renamed into place; on any error the temporary directory is removed,
//! protection is lifted, and the guest runs on unaffected.

use super::chain::Chain;
use super::memory::MemoryFile;
use super::memory::{write_memory, write_new_file};
use super::state::working_set;
use super::state::DiffDesc;
use super::state::{
    encode, save_vm, DeviceState, MachineDesc, MemoryDesc, SnapshotState, CHUNK_BYTES,
};
use super::{io, SnapshotError};
use crate::runner::VmHandle;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How a snapshot is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotMode {
    /// Stop the world for the whole snapshot.
    Paused,
    /// Write-protect while the guest runs, pause only to save the vCPUs and
    /// re-protect what was written meanwhile, then copy in the background
    /// with copy-before-write.
    Live,
}

impl SnapshotMode {
    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            SnapshotMode::Paused => "paused",
            SnapshotMode::Live => "live",
        }
    }
}

/// Refuses what a live snapshot cannot run with (see docs/dirty-tracking.md).
pub fn check_live(
    backing: guest_mem::BackingKind,
    track: Option<crate::dirty::TrackerKind>,
) -> Result<(), String> {
    use crate::dirty::TrackerKind;
    if !backing.uses_fault_engine() {
        return Err(
            "a live snapshot needs the fault engine's userfaultfd (synchronous write-protect): \
                    use --backing memfd or anon, or --snapshot-mode paused"
                .into(),
        );
    }
    match track {
        Some(k @ (TrackerKind::UffdWp | TrackerKind::UffdAsync)) => Err(format!(
            "a live snapshot cannot run with --track {}: both need the VM's userfaultfd write-protect \
             (use kvm-bitmap or kvm-ring, or --snapshot-mode paused)",
            k.name()
        )),
        _ => Ok(()),
    }
}

/// What a snapshot cost.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotReport {
    /// The directory.
    pub dir: PathBuf,
    /// The snapshot id.
    pub id: String,
    /// `paused` or `live`.
    pub mode: String,
    /// µs the vCPUs were paused.
    pub pause_us: u64,
    /// µs from the request to the directory in place.
    pub total_us: u64,
    /// Pages copied by write faults (live mode).
    pub pages_by_faults: u64,
    /// Pages copied by the writer.
    pub pages_by_writer: u64,
    /// Bytes of memory written.
    pub bytes_written: u64,
    /// Bytes per second.
    pub throughput_bytes_per_s: f64,
}

fn temp_dir_for(dir: &Path) -> Result<PathBuf, SnapshotError> {
    let name = dir
        .file_name()
        .ok_or_else(|| SnapshotError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no directory name"),
        })?
        .to_string_lossy()
        .into_owned();
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok(parent.join(format!(".{name}.tmp-{}", std::process::id())))
}

fn fsync_dir(dir: &Path) -> Result<(), SnapshotError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io(dir))
}

/// A snapshot whose memory a background thread is still copying (live
/// mode): the guest runs on meanwhile, and the supervisor's event loop
/// stays free.
pub struct PendingSnapshot {
    thread: std::thread::JoinHandle<Result<SnapshotReport, SnapshotError>>,
}

impl PendingSnapshot {
    /// True once the writer is done (`wait` will not block).
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits for the writer and returns its outcome.
    pub fn wait(self) -> Result<SnapshotReport, SnapshotError> {
        self.thread.join().unwrap_or_else(|_| {
            Err(SnapshotError::Capture(
                "the snapshot writer panicked".into(),
            ))
        })
    }
}

/// What [`start_snapshot`] left behind.
pub enum SnapshotStarted {
    /// The snapshot is complete (paused mode).
    Done(SnapshotReport),
    /// The vCPUs run again; the memory is still being copied.
    Writing(PendingSnapshot),
}

/// Takes a snapshot of the VM behind `vm` into `dir` (which must not exist)
/// and waits until it is complete.
pub fn take_snapshot(
    vm: &mut VmHandle,
    dir: &Path,
    mode: SnapshotMode,
    machine: MachineDesc,
    parent: Option<&Path>,
) -> Result<SnapshotReport, SnapshotError> {
    match start_snapshot(vm, dir, mode, machine, parent)? {
        SnapshotStarted::Done(r) => Ok(r),
        SnapshotStarted::Writing(p) => p.wait(),
    }
}

/// Starts a snapshot of the VM behind `vm` into `dir` (which must not
/// exist). A paused snapshot is complete on return; a live one returns
/// once the vCPUs run again, its memory copied by a background thread.
pub fn start_snapshot(
    vm: &mut VmHandle,
    dir: &Path,
    mode: SnapshotMode,
    machine: MachineDesc,
    parent: Option<&Path>,
) -> Result<SnapshotStarted, SnapshotError> {
    if dir.exists() {
        return Err(SnapshotError::Exists(dir.to_path_buf()));
    }
    // A diff: the parent chain is opened (and checked) before anything else.
    let parent = match parent {
        Some(p) => Some(ParentRef {
            chain: Chain::open(p)?,
            dir: std::fs::canonicalize(p)
                .map_err(io(p))?
                .to_string_lossy()
                .into_owned(),
        }),
        None => None,
    };
    let start = Instant::now();
    let tmp = temp_dir_for(dir)?;
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    let target = Target {
        tmp,
        dir: dir.to_path_buf(),
        start,
    };
    match mode {
        SnapshotMode::Paused => {
            let written = write_paused(vm, &target.tmp, machine, parent);
            target.complete(written).map(SnapshotStarted::Done)
        }
        SnapshotMode::Live => {
            let job = match begin_live(vm, &target.tmp, machine, parent) {
                Ok(job) => job,
                Err(e) => return target.complete(Err(e)).map(SnapshotStarted::Done),
            };
            let (ram, tmp, block) = (job.ram.clone(), target.tmp.clone(), job.block.clone());
            let thread = std::thread::Builder::new()
                .name("snapshot-writer".into())
                .spawn(move || target.complete(job.run()));
            match thread {
                Ok(thread) => Ok(SnapshotStarted::Writing(PendingSnapshot { thread })),
                Err(e) => {
                    // The job went with the closure: undo what it held.
                    if let Err(u) = ram.live_finish() {
                        log::error!("removing the snapshot's write protection: {u}");
                    }
                    if let Some(b) = block {
                        b.abort_disk_copy();
                    }
                    let _ = std::fs::remove_dir_all(&tmp);
                    Err(SnapshotError::Capture(format!(
                        "cannot start the snapshot writer: {e}"
                    )))
                }
            }
        }
    }
}

/// Where a snapshot is written and where it goes once complete.
struct Target {
    tmp: PathBuf,
    dir: PathBuf,
    start: Instant,
}

impl Target {
    /// Renames the finished temporary directory into place (and completes
    /// the report), or removes it when `written` failed.
    fn complete(
        self,
        written: Result<SnapshotReport, SnapshotError>,
    ) -> Result<SnapshotReport, SnapshotError> {
        let mut report = match written {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&self.tmp);
                return Err(e);
            }
        };
        if let Err(e) = std::fs::rename(&self.tmp, &self.dir).map_err(io(&self.dir)) {
            let _ = std::fs::remove_dir_all(&self.tmp);
            return Err(e);
        }
        fsync_dir(
            self.dir
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new(".")),
        )?;
        let elapsed = self.start.elapsed();
        report.dir = self.dir;
        report.total_us = elapsed.as_micros() as u64;
        report.throughput_bytes_per_s =
            report.bytes_written as f64 / elapsed.as_secs_f64().max(1e-9);
        Ok(report)
    }
}

/// The paused (stop-the-world) snapshot.
fn write_paused(
    vm: &mut VmHandle,
    tmp: &Path,
    machine: MachineDesc,
    parent: Option<ParentRef>,
) -> Result<SnapshotReport, SnapshotError> {
    let mode = SnapshotMode::Paused;
    let paused_at = Instant::now();
    let vcpus = vm.pause_and_capture().map_err(SnapshotError::Capture);
    let vcpus = match vcpus {
        Ok(v) => v,
        Err(e) => {
            vm.resume();
            return Err(e);
        }
    };
    // Everything else happens with the vCPUs parked; they resume whatever
    // the outcome.
    let outcome = (|| {
        let vm_state = save_vm(vm.vm_fd()).map_err(|source| SnapshotError::Kvm {
            what: "reading the irqchip".into(),
            source,
        })?;
        let mem_path = tmp.join("memory.bin");
        let populated = vm.ram().populated_pages();
        let written = write_memory(vm.ram(), &mem_path)?;
        let order = vm.ram().access_order();
        let working_set = working_set(&vcpus, vm.ram().size(), &populated, &order);
        let parts = StateParts {
            parent,
            markers: markers_of(vm.ram()),
            mode,
            machine,
            vcpus,
            vm_state,
            command_seq: vm.command_seqs(),
            working_set,
            chunk_crc: written.chunk_crc,
            pages_stored: written.pages_stored,
            disk: save_disk(vm, tmp)?,
        };
        let mut report = write_state(tmp, parts)?;
        report.pages_by_writer = written.pages_stored;
        Ok(report)
    })();
    vm.resume();
    let pause_us = paused_at.elapsed().as_micros() as u64;
    outcome.map(|mut r| {
        r.pause_us = pause_us;
        r
    })
}

/// The live snapshot's first half, on the caller's thread: protect (guest
/// running), pause briefly to capture the vCPUs and re-protect what was
/// written meanwhile, resume. The copy is [`LiveJob::run`].
fn begin_live(
    vm: &mut VmHandle,
    tmp: &Path,
    machine: MachineDesc,
    parent: Option<ParentRef>,
) -> Result<LiveJob, SnapshotError> {
    let ram_fail = |e: guest_mem::tracking::TrackError| SnapshotError::Capture(e.to_string());
    vm.ram().live_protect().map_err(ram_fail)?;
    let abort = |vm: &mut VmHandle, e: SnapshotError| {
        if let Err(u) = vm.ram().live_finish() {
            log::error!("removing the snapshot's write protection: {u}");
        }
        e
    };
    let mem_path = tmp.join("memory.bin");
    let file = (|| {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&mem_path)?;
        f.set_len(vm.ram().size())?;
        Ok::<_, std::io::Error>(f)
    })()
    .map_err(io(&mem_path));
    let file = match file {
        Ok(f) => f,
        Err(e) => return Err(abort(vm, e)),
    };
    // The pause: capture the vCPUs and irqchip, freeze the page set.
    let paused_at = Instant::now();
    let vcpus = match vm.pause_and_capture() {
        Ok(v) => v,
        Err(e) => {
            vm.resume();
            return Err(abort(vm, SnapshotError::Capture(e)));
        }
    };
    let frozen = save_vm(vm.vm_fd())
        .map_err(|source| SnapshotError::Kvm {
            what: "reading the irqchip".into(),
            source,
        })
        .and_then(|vm_state| {
            let f2 = file.try_clone().map_err(io(&mem_path))?;
            let lc = vm
                .ram()
                .live_freeze(f2, super::memory::page_sum)
                .map_err(ram_fail)?;
            Ok((vm_state, lc))
        });
    let command_seq = vm.command_seqs();
    // The disk is copied like memory: started here, finished by the job,
    // blocks the device overwrites meanwhile copied first.
    let block = vm.block().cloned();
    let disk = match &block {
        Some(b) => b
            .begin_disk_copy(&tmp.join("disk.bin"))
            .map_err(|e| SnapshotError::Capture(e.to_string())),
        None => Ok(()),
    };
    vm.resume();
    let pause_us = paused_at.elapsed().as_micros() as u64;
    let abort_all = |vm: &mut VmHandle, e: SnapshotError| {
        if let Some(b) = &block {
            b.abort_disk_copy();
        }
        abort(vm, e)
    };
    if let Err(e) = disk {
        return Err(abort_all(vm, e));
    }
    let (vm_state, lc) = match frozen {
        Ok(v) => v,
        Err(e) => return Err(abort_all(vm, e)),
    };
    Ok(LiveJob {
        block,
        ram: vm.shared_ram(),
        lc,
        file,
        mem_path,
        tmp: tmp.to_path_buf(),
        parent,
        machine,
        vcpus,
        vm_state,
        command_seq,
        pause_us,
    })
}

/// The live snapshot's second half, on a writer thread while the guest
/// runs: copy what the write faults did not, lift the protection, write
/// `state.bin`.
struct LiveJob {
    ram: std::sync::Arc<guest_mem::GuestRam>,
    lc: std::sync::Arc<guest_mem::live_copy::LiveCopy>,
    file: std::fs::File,
    mem_path: PathBuf,
    tmp: PathBuf,
    parent: Option<ParentRef>,
    machine: MachineDesc,
    vcpus: Vec<super::state::SavedVcpu>,
    vm_state: super::state::SavedVm,
    command_seq: Vec<u32>,
    pause_us: u64,
    /// The block device whose disk is being copied, if any.
    block: Option<std::sync::Arc<crate::devices::block::BlockDevice>>,
}

impl LiveJob {
    fn run(self) -> Result<SnapshotReport, SnapshotError> {
        let block = self.block.clone();
        let result = self.copy_and_write();
        if result.is_err() {
            if let Some(b) = block {
                b.abort_disk_copy();
            }
        }
        result
    }

    fn copy_and_write(self) -> Result<SnapshotReport, SnapshotError> {
        let ram = &self.ram;
        // Pages populated since the pause are a superset, which only makes
        // the prefetch a little larger.
        let order = ram.access_order();
        let working_set = working_set(&self.vcpus, ram.size(), &ram.populated_pages(), &order);
        ram.live_write_all(&self.lc);
        if let Err(e) = ram.live_finish() {
            return Err(SnapshotError::Capture(e.to_string()));
        }
        if let Some(e) = self.lc.error() {
            return Err(SnapshotError::Io {
                path: self.mem_path,
                source: std::io::Error::other(e),
            });
        }
        self.file.sync_all().map_err(io(&self.mem_path))?;
        let disk = match &self.block {
            Some(b) => Some(super::state::DiskDesc {
                blocks: b.blocks(),
                crc: b
                    .finish_disk_copy()
                    .map_err(|e| SnapshotError::Capture(e.to_string()))?,
            }),
            None => None,
        };
        // Summed as the pages were copied: no second pass over the file.
        let chunk_crc = self.lc.chunk_sums();
        let stats = self.lc.stats();
        let parts = StateParts {
            parent: self.parent,
            markers: markers_of(ram),
            mode: SnapshotMode::Live,
            machine: self.machine,
            vcpus: self.vcpus,
            vm_state: self.vm_state,
            command_seq: self.command_seq,
            working_set,
            chunk_crc,
            pages_stored: stats.stored,
            disk,
        };
        let mut report = write_state(&self.tmp, parts)?;
        report.pause_us = self.pause_us;
        report.pages_by_faults = stats.by_faults;
        report.pages_by_writer = stats.by_writer;
        Ok(report)
    }
}

/// What `state.bin` is made of, besides what `write_state` adds.
struct StateParts {
    parent: Option<ParentRef>,
    markers: Vec<super::state::MarkerDesc>,
    mode: SnapshotMode,
    machine: MachineDesc,
    vcpus: Vec<super::state::SavedVcpu>,
    vm_state: super::state::SavedVm,
    command_seq: Vec<u32>,
    working_set: Vec<u64>,
    chunk_crc: Vec<u32>,
    pages_stored: u64,
    disk: Option<super::state::DiskDesc>,
}

/// The block device's disk into `tmp/disk.bin`, with the vCPUs paused (no
/// request runs then: each completes within the exit that issued it).
fn save_disk(vm: &VmHandle, tmp: &Path) -> Result<Option<super::state::DiskDesc>, SnapshotError> {
    let Some(b) = vm.block() else {
        return Ok(None);
    };
    let crc = b
        .save_disk_to(&tmp.join("disk.bin"))
        .map_err(|e| SnapshotError::Capture(e.to_string()))?;
    Ok(Some(super::state::DiskDesc {
        blocks: b.blocks(),
        crc,
    }))
}

/// Writes `state.bin` (a new id) into `tmp`, fsyncs the directory, and
/// starts the report.
fn write_state(tmp: &Path, mut p: StateParts) -> Result<SnapshotReport, SnapshotError> {
    let mut diff = None;
    if let Some(parent) = &p.parent {
        let (d, crc, stored) =
            make_diff(&tmp.join("memory.bin"), &parent.chain, parent.dir.clone())?;
        p.chunk_crc = crc;
        p.pages_stored = stored;
        diff = Some(d);
    }
    let id = uuid::Uuid::new_v4();
    let state = SnapshotState {
        id: *id.as_bytes(),
        mode: p.mode.name().into(),
        machine: p.machine,
        vcpus: p.vcpus,
        vm: p.vm_state,
        devices: DeviceState {
            command_seq: p.command_seq,
            disk: p.disk,
        },
        markers: p.markers,
        working_set: p.working_set,
        memory: MemoryDesc {
            chunk_bytes: CHUNK_BYTES,
            chunk_crc: p.chunk_crc,
            pages_stored: p.pages_stored,
        },
        diff,
    };
    let (bytes, _crc) = encode(&state)?;
    let state_path = tmp.join("state.bin");
    write_new_file(&state_path, &bytes).map_err(io(&state_path))?;
    fsync_dir(tmp)?;
    Ok(SnapshotReport {
        dir: tmp.to_path_buf(),
        id: id.to_string(),
        mode: p.mode.name().into(),
        pause_us: 0,
        total_us: 0,
        pages_by_faults: 0,
        pages_by_writer: 0,
        bytes_written: p.pages_stored * 4096,
        throughput_bytes_per_s: 0.0,
    })
}

/// The parent chain of a diff snapshot and the directory it records.
struct ParentRef {
    chain: Chain,
    dir: String,
}

/// Turns the full `memory` file just written into a diff against `parent`:
/// pages equal to the parent chain's become holes, and the sorted list of
/// pages that differ (zero ones included) is returned with the new chunk
/// checksums and the count of non-zero pages stored.
fn make_diff(
    memory: &Path,
    parent: &Chain,
    parent_dir: String,
) -> Result<(DiffDesc, Vec<u32>, u64), SnapshotError> {
    use crate::oracle::MemoryImage;
    let head = parent.head();
    let mem_bytes = head.state.machine.mem_bytes;
    let file = MemoryFile::open_rw(memory, mem_bytes)?;
    // The pages holding data in either, found without reading them.
    let mut candidates = file.data_pages_in(0, mem_bytes)?;
    candidates.extend(parent.data_pages_in(0, mem_bytes)?);
    candidates.sort_unstable();
    candidates.dedup();
    let (mut mine, mut theirs) = (vec![0u8; 4096], vec![0u8; 4096]);
    let mut pages = Vec::new();
    let mut stored = 0;
    let read_err =
        |e: guest_mem::RamError| SnapshotError::Capture(format!("reading for the diff: {e}"));
    for p in candidates {
        file.read_at(p * 4096, &mut mine).map_err(read_err)?;
        parent.read_at(p * 4096, &mut theirs).map_err(read_err)?;
        let zero = guest_mem::live_copy::is_zero(&mine);
        if mine != theirs {
            pages.push(p);
            stored += u64::from(!zero);
        } else if !zero {
            file.punch(p)?;
        }
    }
    let crc = file.checksums()?;
    Ok((
        DiffDesc {
            parent_id: head.state.id,
            parent_crc: head.crc,
            parent_dir,
            pages,
        },
        crc,
        stored,
    ))
}

/// Rule 12: the table's poisoned pages travel with the snapshot (their
/// content is not saved: they are holes in `memory.bin`).
pub(crate) fn markers_of(ram: &guest_mem::GuestRam) -> Vec<super::state::MarkerDesc> {
    ram.poisoned_pages()
        .into_iter()
        .map(|gpa| super::state::MarkerDesc {
            gpa,
            kind: 2,
            payload: 0,
        })
        .collect()
}
