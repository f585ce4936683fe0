//! Forking a running VM (`vmm run ... --fork-after-pages N --forks K`):
//! the VM pauses briefly, its memory becomes an image it and its children
//! all map privately (copy-on-write both ways), and the children start from
//! its vCPU and irqchip state while it runs on.
//!
//! A fork is a snapshot that never touches the disk: the children are built
//! from an in-memory [`SnapshotState`] exactly as a restore builds a VM,
//! and the shared memfd plays the part of `memory.bin`.

use crate::report::{RunStatus, VmOutcome, EXIT_MISMATCH, EXIT_OK};
use crate::runner::{RunError, RunHooks, VmHandle};
use crate::snapshot::restore::{config_of, machine_from_state};
use crate::snapshot::state::{save_vm, DeviceState, MemoryDesc, SnapshotState, CHUNK_BYTES};
use crate::snapshot::writer::markers_of;
use crate::vm_set::{build_set, SetStart, StartedVm};
use crate::vstate::vm::open_kvm;
use guest_mem::GuestRam;
use guest_protocol::CommandOp;
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

/// Most children one fork makes.
pub const MAX_FORKS: u32 = 64;

/// What one fork asks for.
#[derive(Clone, Copy, Debug)]
pub struct ForkOptions {
    /// Children.
    pub count: u32,
    /// Child `i` uses seed `seed_base + i` from its next pass.
    pub seed_base: u64,
    /// Tests: make the setup of this child fail after its memory is
    /// mapped (an injected failure, rule 7).
    pub fail_setup_at: Option<u32>,
}

/// One child of a fork.
#[derive(Clone, Debug, Serialize)]
pub struct ForkChild {
    /// Its index.
    pub index: u32,
    /// The seed it uses from its next pass.
    pub seed: u64,
    /// How it ended and what it shares.
    #[serde(flatten)]
    pub outcome: VmOutcome,
    /// µs from the fork request to its machine being ready.
    pub setup_us: u64,
    /// µs from the fork request to its first `KVM_RUN` (the rest of
    /// `first_io_us` is the guest's own time, emulated on hosts without
    /// hardware virtualization).
    pub first_run_us: Option<u64>,
    /// µs from the fork request to its first I/O exit.
    pub first_io_us: Option<u64>,
}

/// One fork, as the parent's report shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ForkReport {
    /// µs the parent's vCPUs were paused.
    pub pause_us: u64,
    /// The parent's mapped pages still shared with the fork's image, when
    /// every child ended.
    pub parent_shared_pages: u64,
    /// The parent's own pages then.
    pub parent_exclusive_pages: u64,
    /// The process's PSS then (parent and children still mapped).
    pub pss_end_bytes: u64,
    /// The children.
    pub children: Vec<ForkChild>,
}

/// A fork whose children still run.
pub struct PendingFork {
    pause_us: u64,
    seed_base: u64,
    children: Vec<StartedVm>,
}

impl PendingFork {
    /// Waits for every child and reports; `parent` is the forked VM's RAM.
    pub fn wait(self, parent: &GuestRam) -> ForkReport {
        let mut rams = Vec::with_capacity(self.children.len());
        let seed_base = self.seed_base;
        let children = self
            .children
            .into_iter()
            .map(|c| {
                let c = c.wait();
                rams.push(c.ram);
                ForkChild {
                    index: c.index,
                    seed: seed_base.wrapping_add(c.index as u64),
                    setup_us: c.setup_us,
                    first_run_us: c.first_run_us,
                    first_io_us: c.first_io_us,
                    outcome: c.outcome,
                }
            })
            .collect();
        // Measured while the children's memory is still mapped (they hold
        // it until their reports are dropped).
        let sharing = parent.refresh_sharing().unwrap_or_default();
        let pss_end_bytes = crate::snapshot::clone::process_pss_bytes().unwrap_or(0);
        drop(rams);
        ForkReport {
            pause_us: self.pause_us,
            parent_shared_pages: sharing.shared_pages,
            parent_exclusive_pages: sharing.exclusive_pages,
            pss_end_bytes,
            children,
        }
    }
}

/// Forks the VM behind `vm` into `opts.count` children. The parent is
/// paused only to capture its vCPUs and irqchip and to freeze its memory;
/// the children are built after it resumed. On an error before the
/// children exist the parent runs on unchanged (rule 7).
pub fn fork_vm(vm: &mut VmHandle, opts: ForkOptions) -> Result<PendingFork, RunError> {
    let fail = |e: String| RunError::Runtime(format!("fork: {e}"));
    if opts.count == 0 || opts.count > MAX_FORKS {
        return Err(fail(format!(
            "the number of children must be 1 to {MAX_FORKS}, not {}",
            opts.count
        )));
    }
    let kvm = open_kvm()?;
    // Outside the pause: the remap inside it then tears down only what the
    // guest touches from now on.
    vm.ram().prepare_fork();
    let start = Instant::now();
    let vcpus = match vm.pause_and_capture() {
        Ok(v) => v,
        Err(e) => {
            vm.resume();
            return Err(fail(e));
        }
    };
    let frozen = save_vm(vm.vm_fd())
        .map_err(|e| fail(format!("reading the irqchip: {e}")))
        .and_then(|vm_state| {
            let image = vm
                .ram()
                .freeze_for_fork()
                .map_err(|e| fail(e.to_string()))?;
            Ok((vm_state, image))
        });
    let command_seq = vm.command_seqs();
    // The block device's disk as it is now, copied like a live snapshot
    // copies it: started here, finished once the parent runs again.
    let block = vm.block().cloned();
    let disk_copy = block
        .as_ref()
        .map(|b| b.begin_disk_copy_unnamed())
        .transpose()
        .map_err(|e| fail(e.to_string()));
    vm.resume();
    let pause_us = start.elapsed().as_micros() as u64;
    let (vm_state, image) = match frozen {
        Ok(f) => f,
        Err(e) => {
            if let Some(b) = &block {
                b.abort_disk_copy();
            }
            return Err(e);
        }
    };
    let disk = match (disk_copy?, &block) {
        (Some(file), Some(b)) => {
            let crc = b.finish_disk_copy().map_err(|e| fail(e.to_string()))?;
            Some((file, crc, b.blocks()))
        }
        _ => None,
    };
    let state = SnapshotState {
        id: *uuid::Uuid::new_v4().as_bytes(),
        mode: "fork".into(),
        machine: vm.machine().clone(),
        vcpus,
        vm: vm_state,
        devices: DeviceState {
            command_seq,
            disk: disk
                .as_ref()
                .map(|(_, crc, blocks)| crate::snapshot::state::DiskDesc {
                    blocks: *blocks,
                    crc: *crc,
                }),
        },
        markers: markers_of(vm.ram()),
        working_set: Vec::new(),
        memory: MemoryDesc {
            chunk_bytes: CHUNK_BYTES,
            chunk_crc: Vec::new(),
            pages_stored: 0,
        },
        diff: None,
    };
    // The parent's own shared file (its description is the VMM's, not
    // input), mapped again by every child.
    let shared = state.machine.regions.iter().find_map(|r| r.file.clone());
    let mut config =
        config_of(&state, shared.as_deref().map(std::path::Path::new)).map_err(RunError::from)?;
    if let Some((file, crc, blocks)) = disk {
        config.disk = crate::devices::block::DiskSource::CopyOf {
            image: Arc::new(file),
            blocks,
            crc,
        };
    }
    // The pages the image holds: those the parent had populated. Listed
    // after the pause (a walk over the table would grow it with memory);
    // a page the parent populated since is a hole in the memfd, which a
    // child that touches it reads as the zeros it held at the fork.
    let populated = vm.ram().populated_pages();
    let build = ChildBuild {
        kvm: &kvm,
        config: &config,
        state: &state,
        image: &image,
        populated: &populated,
    };
    // The children are built on as many threads as the host has CPUs and
    // start together (`vm_set`); a failure leaves none of them, and the
    // parent runs on with its content unchanged (rule 7).
    let set = SetStart {
        thread_name: "fork",
        label: "fork child",
        config: &config,
        since: start,
    };
    let (children, guard) = build_set(
        opts.count,
        |i| build.machine(i, opts.fail_setup_at == Some(i)),
        |i, machine, gate| {
            let seed = opts.seed_base.wrapping_add(i as u64);
            let setup_us = start.elapsed().as_micros() as u64;
            let initial = Some((CommandOp::Forked, seed));
            set.start(i, machine, setup_us, RunHooks::default(), gate, initial)
        },
        StartedVm::discard,
    )?;
    guard.open();
    Ok(PendingFork {
        pause_us,
        seed_base: opts.seed_base,
        children,
    })
}

/// What every child of one fork is built from.
struct ChildBuild<'a> {
    kvm: &'a kvm_ioctls::Kvm,
    config: &'a crate::config::VmConfig,
    state: &'a SnapshotState,
    image: &'a guest_mem::fork::ForkImage,
    populated: &'a [u64],
}

impl ChildBuild<'_> {
    /// Child `i`'s machine: its private mapping of the image, its table
    /// marked, the parent's pinned pages copied, its VM and vCPUs.
    /// `inject_failure`: tests fail it once its memory is mapped.
    fn machine(&self, i: u32, inject_failure: bool) -> Result<crate::runner::Machine, RunError> {
        let config = self.config;
        let mut ram = GuestRam::from_file_private(config.mem_bytes, config.ram, &self.image.file)?;
        crate::numa::split(config, &mut ram)?;
        if inject_failure {
            return Err(RunError::Runtime(format!(
                "fork: child {i}: injected failure after mapping its memory"
            )));
        }
        ram.mark_file_backed(self.populated)?;
        // Rule 13: the parent's pinned pages are copied, never shared.
        ram.adopt_pinned_copies(self.image)?;
        machine_from_state(self.kvm, self.state, config, Arc::new(ram))
    }
}

/// The worst outcome among a fork's children, as a run status for the
/// parent's report: `None` when all are ok.
pub fn worst_child(forks: &[ForkReport]) -> Option<(RunStatus, String)> {
    let mut worst: Option<(RunStatus, String)> = None;
    for c in forks.iter().flat_map(|f| &f.children) {
        let o = &c.outcome;
        let status = match o.exit_code {
            EXIT_OK => continue,
            EXIT_MISMATCH => RunStatus::VerifyMismatch,
            _ => RunStatus::HookFailed,
        };
        let msg = format!(
            "fork child {}: {}",
            c.index,
            o.error.clone().unwrap_or_else(|| o.status.clone())
        );
        if worst
            .as_ref()
            .is_none_or(|(s, _)| *s == RunStatus::VerifyMismatch)
        {
            worst = Some((status, msg));
        }
    }
    worst
}
