//! Booting a VM from a snapshot (`vmm restore DIR`).
//!
//! `eager` mode: read `state.bin` (checked), check the snapshot against this
//! host, create the VM, copy every stored page of `memory.bin` into guest
//! RAM while checking every chunk checksum, restore the irqchip and each
//! vCPU, and hand the machine to the supervisor: the guest continues its
//! workload where it was.

use super::chain::{Chain, ChainSource};
use super::memory::MemoryFile;
use super::prefetch::{prefetch_execution, BackgroundPrefetch};
use super::state::{restore_vcpu, restore_vm, SnapshotState};
use super::SnapshotError;
use crate::clock::MonotonicAnchor;
use crate::config::RomConfig;
use crate::config::{KernelSource, VmConfig};
use crate::devices::block::DiskSource;
use crate::numa::topology::{NodeSpec, NumaSpec};
use crate::numa::NumaConfig;
use crate::oracle::MemoryImage;
use crate::report::RunReport;
use crate::runner::{prepare_process, supervise, Machine, RunError, RunHooks, SerialSink};
use crate::vstate::vm::{create_vm_lazy, open_kvm};
use guest_mem::numa::policy::NumaPolicy;
use guest_mem::{AccessHint, BackingKind, GuestRam, RamConfig};
use guest_protocol::{CommandOp, Workload};
use kvm_ioctls::Kvm;
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// How guest memory is brought back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreMode {
    /// Read everything and check every checksum before the guest runs.
    Eager,
    /// Serve missing faults from `memory.bin` through the fault engine,
    /// checking each chunk's checksum when it is first served from.
    Uffd,
    /// Map `memory.bin` privately (copy-on-write, pages shared through the
    /// page cache); checksums are verified in the background after resume.
    Mmap,
}

impl RestoreMode {
    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            RestoreMode::Eager => "eager",
            RestoreMode::Uffd => "uffd",
            RestoreMode::Mmap => "mmap",
        }
    }
}

/// Restore options.
#[derive(Clone, Debug)]
pub struct RestoreOptions {
    /// The mode.
    pub mode: RestoreMode,
    /// Make the guest run its consistency check at its next poll point.
    pub verify: bool,
    /// The file to map as the memory the guest shared with the host, for
    /// a snapshot of a guest that had some.
    pub shared_mem: Option<std::path::PathBuf>,
}

/// What the restore itself cost.
#[derive(Clone, Debug, Serialize)]
pub struct RestoreReport {
    /// The mode.
    pub mode: String,
    /// The snapshot id.
    pub snapshot_id: String,
    /// µs to read, check and load the snapshot.
    pub load_us: u64,
    /// Pages loaded (eager) or prefetched (uffd) before the vCPUs ran.
    pub pages_loaded: u64,
    /// `uffd`: pages of the recorded working set prefetched in the
    /// background while the guest ran.
    pub pages_prefetched_background: u64,
    /// µs from the start of the restore to the first `KVM_RUN`: the VMM's
    /// part of the restore.
    pub first_run_us: Option<u64>,
    /// µs from the start of the restore to the guest's first I/O exit
    /// (includes the guest's time until it does I/O).
    pub first_io_us: Option<u64>,
    /// How guest memory is served (mmap mode: with or without the fault
    /// engine, depending on the file system).
    pub memory: String,
    /// µs from the start of the restore to the end of each of its phases.
    pub phases_us: Vec<PhaseMark>,
    /// The start of the restore in `CLOCK_MONOTONIC` ns, to compare with a
    /// parent's spawn time.
    pub started_at_ns: u64,
    /// The first `KVM_RUN` in `CLOCK_MONOTONIC` ns.
    pub first_run_at_ns: Option<u64>,
    /// The guest's first I/O exit in `CLOCK_MONOTONIC` ns.
    pub first_io_at_ns: Option<u64>,
    /// The process's PSS when the guest ended, its memory still mapped
    /// (what this restored VM costs the host, shared pages counted in
    /// proportion).
    pub pss_end_bytes: Option<u64>,
}

/// The end of one restore phase.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseMark {
    /// The phase.
    pub phase: &'static str,
    /// µs from the start of the restore.
    pub at_us: u64,
}

/// Records where a restore's time goes.
struct Phases {
    start: Instant,
    marks: Vec<PhaseMark>,
}

impl Phases {
    fn new(start: Instant) -> Self {
        Phases {
            start,
            marks: Vec::new(),
        }
    }

    fn mark(&mut self, phase: &'static str) {
        self.marks.push(PhaseMark {
            phase,
            at_us: self.start.elapsed().as_micros() as u64,
        });
    }
}

/// Leaf-1, leaf-7 and leaf-0xD (XSAVE components) feature bits the
/// snapshot's CPUID (`saved`, vCPU 0's) has that this host's KVM does not
/// offer.
fn missing_cpu_features(
    kvm: &Kvm,
    saved: &[kvm_bindings::kvm_cpuid_entry2],
) -> Result<Vec<String>, SnapshotError> {
    let host =
        crate::vstate::host_cpu::supported_features(kvm).map_err(|source| SnapshotError::Kvm {
            what: "reading the host's CPUID".into(),
            source,
        })?;
    let mut missing = Vec::new();
    let leaf = |f: u32| saved.iter().find(|e| e.function == f && e.index == 0);
    // Leaf 1 EBX carries the APIC id, not features.
    let mut regs: Vec<(u32, &str, u32, u32)> = Vec::new();
    if let Some(w) = leaf(1) {
        regs.push((1, "ecx", w.ecx, host.leaf1[0]));
        regs.push((1, "edx", w.edx, host.leaf1[1]));
    }
    if let Some(w) = leaf(7) {
        regs.push((7, "ebx", w.ebx, host.leaf7[0]));
        regs.push((7, "ecx", w.ecx, host.leaf7[1]));
        regs.push((7, "edx", w.edx, host.leaf7[2]));
    }
    // The XSAVE components the guest was offered (its FPU/SSE/AVX state).
    if let Some(w) = leaf(0xd) {
        regs.push((0xd, "eax", w.eax, host.xsave[0]));
        regs.push((0xd, "edx", w.edx, host.xsave[1]));
    }
    for (leaf, name, w, h) in regs {
        let extra = w & !h;
        if extra != 0 {
            missing.push(format!("CPUID.{leaf:#x}.{name} bits {extra:#x}"));
        }
    }
    Ok(missing)
}

/// Refuses a snapshot whose guest was given CPU features this host's KVM
/// does not offer.
pub(crate) fn check_host_cpu(kvm: &Kvm, state: &SnapshotState) -> Result<(), SnapshotError> {
    let saved_cpuid = state.vcpus.first().map_or(&[][..], |v| &v.cpuid[..]);
    let missing = missing_cpu_features(kvm, saved_cpuid)?;
    if missing.is_empty() {
        Ok(())
    } else {
        Err(SnapshotError::Incompatible(format!(
            "the guest's CPU features are not available here: {}",
            missing.join(", ")
        )))
    }
}

/// The configuration a snapshot's machine ran with.
/// The disk a restored (or cloned) VM starts from: the snapshot's
/// `disk.bin` in `dir`, copied for it (the snapshot stays as it is).
pub(crate) fn disk_of(state: &SnapshotState, dir: &Path) -> Result<DiskSource, SnapshotError> {
    let Some(d) = state.devices.disk else {
        return Ok(DiskSource::Temporary);
    };
    let path = dir.join("disk.bin");
    let file = std::fs::File::open(&path).map_err(|source| SnapshotError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(DiskSource::CopyOf {
        image: Arc::new(file),
        blocks: d.blocks,
        crc: d.crc,
    })
}

/// `shared_mem`: the file to map as the memory the snapshot's guest
/// shared with the host (the user names it; a snapshot's own record of
/// its path is never mapped by itself).
pub(crate) fn config_of(
    state: &SnapshotState,
    shared_mem: Option<&Path>,
) -> Result<VmConfig, SnapshotError> {
    let m = &state.machine;
    let backing = BackingKind::from_name(&m.backing)
        .ok_or_else(|| SnapshotError::Incompatible(format!("unknown backing {:?}", m.backing)))?;
    let workload = Workload::from_name(&m.workload)
        .ok_or_else(|| SnapshotError::Incompatible(format!("unknown workload {:?}", m.workload)))?;
    let rom = rom_of(m)?;
    let shared_mem = shared_mem_of(m, rom.bytes, shared_mem)?;
    let numa = numa_of(m, rom.bytes + shared_mem.bytes)?;
    Ok(VmConfig {
        mem_bytes: m.mem_bytes,
        vcpus: m.vcpus,
        workload,
        pages: m.pages,
        passes: m.passes,
        seed: 0,
        write_ratio: m.write_ratio,
        kernel: KernelSource::Embedded,
        verify_at_end: true,
        stop_after: None,
        ram: RamConfig {
            backing,
            fault_around_pages: m.fault_around_pages,
            hint: match m.regions.first().map(|r| r.hint.as_str()) {
                None => AccessHint::Normal,
                Some(h) => AccessHint::from_name(h).ok_or_else(|| {
                    SnapshotError::Incompatible(format!("unknown access hint {h:?}"))
                })?,
            },
            ..RamConfig::default()
        },
        round_per_pass: m.round_per_pass,
        track: None,
        disk: Default::default(),
        numa,
        // Poisoned pages come back from the snapshot's markers.
        poison: Vec::new(),
        rom,
        shared_mem,
    })
}

/// The memory a snapshot's machine shared with the host: its one shared
/// region, right below the ROM of `rom_bytes` (or at the top). The file
/// mapped there
/// again is the one the user names (`given`), as large as the region: a
/// snapshot file is input, and naming a file in it must not be enough to
/// have the VMM map that file into a guest.
fn shared_mem_of(
    m: &crate::snapshot::state::MachineDesc,
    rom_bytes: u64,
    given: Option<&Path>,
) -> Result<crate::config::SharedMemConfig, SnapshotError> {
    let bad = |why: String| Err(SnapshotError::Incompatible(why));
    let mut shared = m.regions.iter().filter(|r| r.shared);
    let (r, None) = (shared.next(), shared.next()) else {
        return bad("more than one shared region: only one is supported".into());
    };
    let (r, given) = match (r, given) {
        (None, None) => return Ok(Default::default()),
        (None, Some(p)) => {
            return bad(format!(
                "--shared-mem {}: the snapshot's guest shared no memory with the host",
                p.display()
            ))
        }
        (Some(r), None) => {
            return bad(format!(
                "the snapshot's guest shared memory with the host ({}): name the file to map again with --shared-mem FILE",
                r.file.as_deref().unwrap_or("its file")
            ))
        }
        (Some(r), Some(p)) => (r, p),
    };
    if r.gpa.checked_add(r.size) != Some(m.mem_bytes - rom_bytes) {
        return bad(
            "the shared region must lie right below the ROM or at the top of guest memory".into(),
        );
    }
    let shared = crate::devices::shared_mem::shared_for_file(given)
        .map_err(|e| SnapshotError::Incompatible(e.to_string()))?;
    if shared.bytes != r.size {
        return bad(format!(
            "--shared-mem {} is {} bytes; the snapshot's guest shared {}",
            given.display(),
            shared.bytes,
            r.size
        ));
    }
    Ok(shared)
}

/// The ROM a snapshot's machine had: its one read-only region, the last,
/// ending at the top of guest memory. Its content is in the memory image.
fn rom_of(m: &crate::snapshot::state::MachineDesc) -> Result<RomConfig, SnapshotError> {
    let mut roms = m.regions.iter().filter(|r| r.read_only);
    match (roms.next(), roms.next()) {
        (None, _) => Ok(RomConfig::default()),
        (Some(r), None)
            if m.regions.last() == Some(r)
                && m.regions.len() > 1
                && r.gpa.checked_add(r.size) == Some(m.mem_bytes) =>
        {
            Ok(RomConfig {
                bytes: r.size,
                file: None,
            })
        }
        _ => Err(SnapshotError::Incompatible(
            "the read-only regions: only one ROM, at the top of guest memory, is supported".into(),
        )),
    }
}

/// The NUMA settings a snapshot's machine ran with: its nodes (one region
/// each) and vCPUs as they were, placed again where it was placed (mapped
/// onto this host by `Placement::plan`). `top_bytes`: the shared memory
/// and the ROM, carved from the top of the last node.
fn numa_of(
    m: &crate::snapshot::state::MachineDesc,
    top_bytes: u64,
) -> Result<NumaConfig, SnapshotError> {
    let bad = |why: &str| SnapshotError::Incompatible(format!("the NUMA layout: {why}"));
    let n = &m.numa;
    if n.vcpu_node.len() != m.vcpus as usize {
        return Err(bad("one node per vCPU is not recorded"));
    }
    // The nodes' RAM.
    let nodes: Vec<_> = m
        .regions
        .iter()
        .filter(|r| !r.read_only && !r.shared)
        .collect();
    let mut at = 0;
    for r in &nodes {
        if r.gpa != at {
            return Err(bad("the node regions do not lie back to back from 0"));
        }
        at = r.gpa.saturating_add(r.size);
    }
    if n.vcpu_node.iter().any(|v| *v as usize >= nodes.len()) {
        return Err(bad("a vCPU is on a node that has no region"));
    }
    let policy = n
        .policy
        .as_deref()
        .map(|p| NumaPolicy::from_name(p).ok_or_else(|| bad(&format!("unknown policy {p:?}"))))
        .transpose()?;
    let spec = (n.placed || nodes.len() > 1).then(|| {
        NumaSpec::Layout(
            nodes
                .iter()
                .enumerate()
                .map(|(k, r)| NodeSpec {
                    bytes: r.size + if k + 1 == nodes.len() { top_bytes } else { 0 },
                    vcpus: Some(
                        (0..m.vcpus)
                            .filter(|v| n.vcpu_node[*v as usize] == k as u32)
                            .collect(),
                    ),
                })
                .collect(),
        )
    });
    if let Some(s) = &spec {
        s.resolve(m.mem_bytes, m.vcpus)
            .map_err(|e| bad(&e.to_string()))?;
    }
    Ok(NumaConfig {
        spec,
        policy,
        recorded_host_nodes: n.placed.then(|| n.host_nodes.clone()),
        ..NumaConfig::default()
    })
}

/// `eager`: the full snapshot at the chain's end, then each diff from the
/// oldest on, every checksum checked before anything of a link is trusted.
fn load_chain(ram: &GuestRam, chain: &Chain) -> Result<u64, RunError> {
    let mut pages = 0;
    let mut buf = vec![0u8; 4096];
    for link in chain.links.iter().rev() {
        match &link.state.diff {
            None => {
                pages += link
                    .memory
                    .load_into(Some(ram), &link.state.memory.chunk_crc)
                    .map_err(SnapshotError::from)?;
            }
            Some(d) => {
                link.memory
                    .verify(&link.state.memory.chunk_crc)
                    .map_err(SnapshotError::from)?;
                for &p in &d.pages {
                    link.memory.read_at(p * 4096, &mut buf).map_err(|e| {
                        RunError::Runtime(format!("reading {}: {e}", link.dir.display()))
                    })?;
                    ram.write(p * 4096, &buf)?;
                    pages += 1;
                }
            }
        }
    }
    Ok(pages)
}

/// The machine `state` describes, on `ram` (its memory loaded or served
/// already): rule 12's poisoned pages marked again, then the VM with its
/// irqchip, then each vCPU. `config` is the run's configuration, made
/// from `state` by [`config_of`].
pub(crate) fn machine_from_state(
    kvm: &Kvm,
    state: &SnapshotState,
    config: &VmConfig,
    ram: Arc<GuestRam>,
) -> Result<Machine, RunError> {
    // The guest's nodes go where they were (mapped onto this host).
    let placement = crate::numa::place(config, &ram)?;
    // Rule 12: poisoned pages stay poisoned across a restore or a clone.
    for m in &state.markers {
        if m.kind == 2 {
            // A diff may have listed it as "now zero": drop that first.
            if !ram.table().get(m.gpa).is_empty() {
                ram.discard(m.gpa & !0xfff, 4096)?;
            }
            ram.poison_page(m.gpa, "poisoned in the snapshot")
                .map_err(|e| {
                    SnapshotError::Incompatible(format!(
                        "cannot keep the poisoned page {:#x}: {e}",
                        m.gpa
                    ))
                })?;
        }
    }
    let created = Instant::now();
    // The slot over most of guest RAM comes when the guest first needs it.
    let (vm, lazy_slot) = create_vm_lazy(kvm, &ram, state.machine.vcpus)?;
    restore_vm(&vm, &state.vm).map_err(|source| SnapshotError::Kvm {
        what: "restoring the irqchip".into(),
        source,
    })?;
    let mut fds = Vec::with_capacity(state.vcpus.len());
    for (i, saved) in state.vcpus.iter().enumerate() {
        let fd = vm
            .create_vcpu(i as u64)
            .map_err(|e| RunError::CreateVcpu(i as u32, e))?;
        restore_vcpu(&fd, saved).map_err(|(what, source)| SnapshotError::Kvm {
            what: format!("restoring vCPU {i}'s {what}"),
            source,
        })?;
        fds.push(fd);
    }
    let cpuid = state
        .vcpus
        .first()
        .map(|v| v.cpuid.clone())
        .unwrap_or_default();
    Ok(Machine {
        ram,
        vm,
        vcpus: fds,
        created,
        tracking: None,
        command_seq: state.devices.command_seq.clone(),
        ports: state.vcpus.iter().map(|v| v.ports).collect(),
        cpuid,
        machine: state.machine.clone(),
        restored: true,
        lazy_slot,
        placement,
    })
}

/// What an `mmap` restore (or a clone) maps: a full snapshot's
/// `memory.bin` as it is, or a diff chain materialized into a memfd.
/// userfaultfd registers on a private mapping of a tmpfs (or memfd) file
/// but not of an ext4 one: the fault engine (and live snapshots) stay on
/// tmpfs only; elsewhere the kernel serves the mapping alone.
pub(crate) struct MappableImage {
    materialized: Option<MemoryFile>,
    on_tmpfs: bool,
    /// Says what is mapped and how (for the report).
    pub note: String,
}

impl MappableImage {
    /// The image of `chain` (whose head is in `dir`).
    pub(crate) fn of(chain: &Chain, dir: &Path) -> Result<MappableImage, RunError> {
        let (materialized, on_tmp, what) = if chain.is_diff() {
            let t = Instant::now();
            let image = chain.materialize().map_err(SnapshotError::from)?;
            let what = format!(
                "a chain of {} snapshots, materialized into a memfd in {:.1} ms,",
                chain.links.len(),
                t.elapsed().as_secs_f64() * 1e3
            );
            (Some(image), true, what)
        } else {
            let on_tmp = crate::host_fs::on_tmpfs(&dir.join("memory.bin"));
            (None, on_tmp, "memory.bin".to_string())
        };
        let note = if on_tmp {
            format!("{what} mapped private, on tmpfs: fault engine and live snapshots available")
        } else {
            format!(
                "{what} mapped private, not on tmpfs: kernel-managed, without the fault engine or \
                 live snapshots (put the snapshot on tmpfs to keep them)"
            )
        };
        Ok(MappableImage {
            materialized,
            on_tmpfs: on_tmp,
            note,
        })
    }

    /// Maps the image privately as guest RAM for `config` (whose backing
    /// it sets: `memfd` with the fault engine on tmpfs, `plain` elsewhere).
    pub(crate) fn map(&self, chain: &Chain, config: &mut VmConfig) -> Result<GuestRam, RunError> {
        self.configure(config);
        self.map_configured(chain, config)
    }

    /// Sets the backing [`MappableImage::map`] gives guest RAM.
    pub(crate) fn configure(&self, config: &mut VmConfig) {
        config.ram.backing = if self.on_tmpfs {
            BackingKind::Memfd
        } else {
            BackingKind::Plain
        };
    }

    /// [`MappableImage::map`] for a `config` already configured.
    pub(crate) fn map_configured(
        &self,
        chain: &Chain,
        config: &VmConfig,
    ) -> Result<GuestRam, RunError> {
        let image = self.materialized.as_ref().unwrap_or(&chain.head().memory);
        let mut ram = GuestRam::from_file_private(config.mem_bytes, config.ram, image.file())?;
        crate::numa::split(config, &mut ram)?;
        if config.ram.backing.uses_fault_engine() {
            // The file's data pages are populated already: recorded, live
            // and diff snapshots copy them and fault-around zeroes only the
            // holes beside a fault, never a file page not mapped yet.
            let data = image
                .data_pages_in(0, config.mem_bytes)
                .map_err(SnapshotError::from)?;
            ram.mark_file_backed(&data)?;
        }
        Ok(ram)
    }
}

/// Restores the snapshot in `dir` and runs the guest to the end of its
/// workload.
pub fn restore(
    dir: &Path,
    opts: &RestoreOptions,
    hooks: RunHooks,
    sink: SerialSink,
) -> Result<(RunReport, RestoreReport), RunError> {
    let anchor = MonotonicAnchor::now();
    let start = Instant::now();
    let mut phases = Phases::new(start);
    let chain = Arc::new(Chain::open(dir)?);
    phases.mark("state_read");
    let state = &chain.head().state;
    let mut config = config_of(state, opts.shared_mem.as_deref())?;
    config.disk = disk_of(state, dir)?;
    let signals = prepare_process()?;
    let kvm = open_kvm()?;
    phases.mark("kvm_opened");
    check_host_cpu(&kvm, state)?;
    phases.mark("cpuid_checked");
    let mut hooks = hooks;
    // Where background checks (mmap's verification, uffd's prefetch)
    // report a corrupt snapshot: the guest stops and the run fails.
    let mut corrupt_slots: Vec<Arc<std::sync::Mutex<Option<String>>>> = Vec::new();
    let mut verifier_thread: Option<std::thread::JoinHandle<()>> = None;
    let mut background_order: Vec<u64> = Vec::new();
    if opts.mode == RestoreMode::Uffd && !config.ram.backing.uses_fault_engine() {
        // Lazy restore needs the fault engine: plain memory becomes memfd.
        config.ram.backing = BackingKind::Memfd;
    }
    let (ram, memory_note) = if opts.mode == RestoreMode::Mmap {
        let image = MappableImage::of(&chain, dir)?;
        (Arc::new(image.map(&chain, &mut config)?), image.note)
    } else {
        let note = format!(
            "{} backing through the fault engine",
            config.ram.backing.name()
        );
        let mut ram = GuestRam::new(config.mem_bytes, config.ram)?;
        crate::numa::split(&config, &mut ram)?;
        (Arc::new(ram), note)
    };
    phases.mark("memory_mapped");

    let pages_loaded = match opts.mode {
        RestoreMode::Eager => load_chain(&ram, &chain)?,
        RestoreMode::Uffd => {
            ram.set_page_source(Arc::new(ChainSource::new(chain.clone())))?;
            let first = prefetch_execution(&ram, &chain)?;
            background_order = state
                .working_set
                .iter()
                .filter(|p| first.binary_search(p).is_err())
                .copied()
                .collect();
            first.len() as u64
        }
        RestoreMode::Mmap => {
            // Verified in the background once the guest runs; a bad chunk
            // stops it (the run fails naming the chunk).
            let slot: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
            let (s2, chain2) = (slot.clone(), chain.clone());
            corrupt_slots.push(slot.clone());
            verifier_thread = std::thread::Builder::new()
                .name("verify".into())
                .spawn(move || {
                    super::prefetch::lower_priority();
                    if let Err(e) = chain2.verify() {
                        if let Ok(mut s) = s2.lock() {
                            *s = Some(format!("snapshot {e}"));
                        }
                    }
                })
                .map(Some)
                .map_err(|e| RunError::Runtime(format!("cannot start the verifier: {e}")))?;
            hooks = hooks.fail_on(slot);
            0
        }
    };
    phases.mark("memory_loaded");

    let machine = machine_from_state(&kvm, state, &config, ram)?;
    phases.mark("machine_created");
    let created = machine.created;
    let restore_report = RestoreReport {
        mode: opts.mode.name().into(),
        snapshot_id: uuid::Uuid::from_bytes(state.id).to_string(),
        load_us: start.elapsed().as_micros() as u64,
        pages_loaded,
        pages_prefetched_background: 0,
        first_run_us: None,
        first_io_us: None,
        memory: memory_note,
        phases_us: phases.marks,
        started_at_ns: anchor.ns_at(start),
        first_run_at_ns: None,
        first_io_at_ns: None,
        pss_end_bytes: None,
    };
    let initial = opts.verify.then_some((CommandOp::Verify, 0));
    let created_us = created.duration_since(start).as_micros() as u64;
    let background = if background_order.is_empty() {
        None
    } else {
        let slot: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
        hooks = hooks.fail_on(slot.clone());
        corrupt_slots.push(slot.clone());
        Some(BackgroundPrefetch::start(
            machine.ram.clone(),
            background_order,
            slot,
        )?)
    };
    let ram = machine.ram.clone();
    let report = supervise(&config, machine, hooks, sink, signals, initial);
    let prefetched = background.map_or(0, BackgroundPrefetch::finish);
    let pss_end = super::clone::process_pss_bytes().ok();
    drop(ram);
    let mut report = report?;
    // The background verification's verdict counts even when the guest
    // finished first.
    if let Some(t) = verifier_thread {
        let _ = t.join();
    }
    if let Some(e) = corrupt_slots
        .iter()
        .find_map(|v| v.lock().ok().and_then(|s| s.clone()))
    {
        report.status = crate::report::RunStatus::SnapshotCorrupt;
        report.error = Some(e);
    }
    let mut restore_report = restore_report;
    restore_report.pages_prefetched_background = prefetched;
    restore_report.pss_end_bytes = pss_end;
    restore_report.first_io_us = report.boot_us.map(|b| created_us + b);
    restore_report.first_run_us = report.first_run_us.map(|b| created_us + b);
    let created_ns = anchor.ns_at(created);
    restore_report.first_io_at_ns = report.boot_us.map(|b| created_ns + b * 1000);
    restore_report.first_run_at_ns = report.first_run_us.map(|b| created_ns + b * 1000);
    Ok((report, restore_report))
}
