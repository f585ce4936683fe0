//! Boots a VM and supervises it: vCPU threads run the guest, the supervisor
//! serves their messages, signals and run hooks from an event loop built on
//! event-manager, then the host-side oracle checks guest RAM.

use crate::config::{host_ram_bytes, ConfigError, VmConfig};
use crate::dirty::{
    check_combination, new_tracker, TrackCtx, TrackError, Tracking, TrackingReport,
};
use crate::guest_image::{KernelError, KernelImage};
use crate::oracle::verify_image;
use crate::oracle::{pages_written_in_pass, work_area_pages};
use crate::report::{RunReport, RunStatus, VcpuReport};
use crate::signals::{install_kick_handler, kick_signal, TerminationSignals};
use crate::snapshot::state::{fnv1a_hex, MachineDesc, RegionDesc};
use crate::snapshot::writer::{PendingSnapshot, SnapshotReport};
use crate::vstate::boot::{cpuid_for, setup_vcpu, write_boot_structures, BootError};
use crate::vstate::capture::CaptureSlots;
use crate::vstate::control::{PauseTimeout, VcpuControl};
use crate::vstate::vcpu::{MsgSender, VcpuMsg, VcpuOutcome, VcpuRunner};
use crate::vstate::vm::{create_vm, open_kvm, VmError};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use guest_mem::LockOrRecover;
use guest_mem::{GuestRam, RamError};
use guest_protocol::boot_info::BOOT_INFO_VERSION;
use guest_protocol::control::Event;
use guest_protocol::layout::{state_gpa, BOOT_INFO_GPA};
use guest_protocol::{BootInfo, Command, CommandOp, VcpuState};
use kvm_bindings::kvm_cpuid_entry2;
use kvm_ioctls::{VcpuFd, VmFd};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::Killable;

/// How long the guest gets to stop cleanly after a stop request before its
/// vCPUs are stopped by force.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// How long a pause may take before it is abandoned.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default run time of the idle workload.
const IDLE_DEFAULT: Duration = Duration::from_millis(100);

/// Why a VM could not be booted or supervised.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration is invalid (usage error).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The kernel image is unusable.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// KVM or the VM could not be set up.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Guest RAM could not be set up.
    #[error(transparent)]
    Ram(#[from] RamError),
    /// Boot state could not be written.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A vCPU could not be created.
    #[error("cannot create vCPU {0}: {1}")]
    CreateVcpu(u32, kvm_ioctls::Error),
    /// Dirty tracking could not be set up.
    #[error(transparent)]
    Track(#[from] TrackError),
    /// A snapshot could not be read or restored.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// A thread, eventfd, signal or event-loop resource failed.
    #[error("VMM runtime error: {0}")]
    Runtime(String),
}

impl RunError {
    /// The JSON `status` kind of this error.
    pub fn kind(&self) -> &'static str {
        match self {
            RunError::Config(_) => "usage",
            RunError::Kernel(_) => "invalid_kernel",
            RunError::Vm(VmError::NoKvm | VmError::KvmPermission | VmError::OpenKvm(_)) => {
                "kvm_unavailable"
            }
            RunError::Vm(_) | RunError::CreateVcpu(..) | RunError::Boot(_) => "vm_setup_failed",
            RunError::Ram(RamError::Uffd(_)) => "userfaultfd_unavailable",
            RunError::Ram(_) => "memory_setup_failed",
            RunError::Track(TrackError::Combination(_)) => "unsupported_combination",
            RunError::Track(_) => "tracking_unavailable",
            RunError::Snapshot(crate::snapshot::SnapshotError::Incompatible(_)) => {
                "incompatible_snapshot"
            }
            RunError::Snapshot(_) => "bad_snapshot",
            RunError::Runtime(_) => "runtime_error",
        }
    }

    /// The process exit code: 2 for usage errors, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Config(_) => crate::report::EXIT_USAGE,
            _ => crate::report::EXIT_ERROR,
        }
    }
}

/// Where the guest's serial lines go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SerialSink {
    /// Standard output (the default).
    Stdout,
    /// Standard error (with `--json`).
    Stderr,
    /// Kept in the report (tests).
    Capture,
}

/// A hook failed; the run ends with status `hook_failed`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HookError(pub String);

impl From<PauseTimeout> for HookError {
    fn from(e: PauseTimeout) -> Self {
        HookError(e.to_string())
    }
}

/// How long [`VmHandle::send_command`] waits for the previous command to be taken.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// A command could not be delivered.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// No such vCPU.
    #[error("no vCPU {0}")]
    NoSuchVcpu(u32),
    /// The vCPU has finished; nobody will read the command.
    #[error("vCPU {0} has finished")]
    Exited(u32),
    /// The guest did not take the previous command in time (paused, or not polling).
    #[error("vCPU {0} did not take command {1} within {COMMAND_TIMEOUT:?}")]
    NotTaken(u32, u32),
    /// Guest RAM could not be accessed.
    #[error(transparent)]
    Ram(#[from] RamError),
}

impl From<CommandError> for HookError {
    fn from(e: CommandError) -> Self {
        HookError(e.to_string())
    }
}

impl From<RamError> for HookError {
    fn from(e: RamError) -> Self {
        HookError(e.to_string())
    }
}

/// An action run on the supervisor thread while the VM runs.
pub type HookAction = Box<dyn FnOnce(&mut VmHandle) -> Result<(), HookError> + Send>;

/// One harvested dirty-tracking round, as round hooks see it.
#[derive(Clone, Debug)]
pub struct RoundInfo {
    /// Round number, from 0.
    pub index: u64,
    /// The pass the vCPUs just completed.
    pub pass: u64,
    /// Dirty guest page numbers harvested (guest and VMM writes).
    pub pages: Vec<u64>,
    /// Pages the guest's schedules wrote in that pass.
    pub expected: Vec<u64>,
    /// Expected pages the harvest lacks (must be empty).
    pub missed: Vec<u64>,
    /// Harvested work-area pages no schedule wrote.
    pub false_positives: u64,
    /// Per-vCPU attribution, where the backend knows it.
    pub by_vcpu: Option<Vec<Vec<u64>>>,
}

/// An action run after each dirty-tracking round, while the vCPUs wait at
/// the doorbell.
pub type RoundHook = Box<dyn FnMut(&mut VmHandle, &RoundInfo) -> Result<(), HookError> + Send>;

/// Actions to run at points of a run (snapshots, fault injection in tests).
#[derive(Default)]
pub struct RunHooks {
    after_pages: Vec<(u64, HookAction)>,
    at_exit: Vec<HookAction>,
    on_round: Vec<RoundHook>,
    fail_on: Vec<Arc<Mutex<Option<String>>>>,
    start_gate: Option<Arc<crate::vstate::start_gate::StartGate>>,
}

impl RunHooks {
    /// Runs `action` once the guest has made at least `pages` page stores in
    /// total (seen at the vCPUs' progress reports, every 64 steps; 0 means
    /// once every vCPU has booted, or for the idle workload, waits for
    /// commands).
    pub fn after_pages(mut self, pages: u64, action: HookAction) -> Self {
        self.after_pages.push((pages, action));
        self.after_pages.sort_by_key(|(p, _)| *p);
        self
    }

    /// Stops the guest and fails the run as soon as another thread puts an
    /// error into `slot` (e.g. a background checksum verification).
    pub fn fail_on(mut self, slot: Arc<Mutex<Option<String>>>) -> Self {
        self.fail_on.push(slot);
        self
    }

    /// Holds the vCPUs before their first `KVM_RUN` until `gate` opens; a
    /// cancelled gate stops them without running guest code.
    pub fn start_gate(mut self, gate: Arc<crate::vstate::start_gate::StartGate>) -> Self {
        self.start_gate = Some(gate);
        self
    }

    /// Runs `hook` after every dirty-tracking round (with `--track`).
    pub fn on_round(mut self, hook: RoundHook) -> Self {
        self.on_round.push(hook);
        self
    }

    /// Runs `action` once every vCPU has left its run loop, while guest RAM
    /// is still there.
    pub fn at_exit(mut self, action: HookAction) -> Self {
        self.at_exit.push(action);
        self
    }
}

/// The supervisor's grip on a running VM, handed to hooks.
pub struct VmHandle {
    ram: Arc<GuestRam>,
    vm: Arc<VmFd>,
    control: Arc<VcpuControl>,
    capture: Arc<CaptureSlots>,
    threads: Vec<JoinHandle<()>>,
    exited: Arc<Vec<AtomicBool>>,
    command_seq: Vec<u32>,
    machine: MachineDesc,
    /// Snapshots taken during the run.
    pub snapshots: Vec<SnapshotReport>,
    /// Snapshots that failed (the guest ran on).
    pub snapshot_errors: Vec<String>,
    /// Live snapshots whose memory is still being copied.
    pub pending_snapshots: Vec<PendingSnapshot>,
    /// Forks whose children still run.
    pub pending_forks: Vec<crate::fork::PendingFork>,
    /// The block device (`io` workload).
    block: Option<Arc<crate::devices::block::BlockDevice>>,
    /// Forks whose children all ended.
    pub forks: Vec<crate::fork::ForkReport>,
}

impl VmHandle {
    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The block device, if the VM has one.
    pub fn block(&self) -> Option<&Arc<crate::devices::block::BlockDevice>> {
        self.block.as_ref()
    }

    /// Guest RAM, shared (for work that outlives the call, e.g. a live
    /// snapshot's writer).
    pub fn shared_ram(&self) -> Arc<GuestRam> {
        self.ram.clone()
    }

    /// Moves the pending snapshots that are complete (all of them, waiting,
    /// with `wait`) into `snapshots` or `snapshot_errors`.
    pub fn collect_snapshots(&mut self, wait: bool) {
        let (done, still): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending_snapshots)
            .into_iter()
            .partition(|p| wait || p.is_finished());
        self.pending_snapshots = still;
        for p in done {
            match p.wait() {
                Ok(r) => self.snapshots.push(r),
                Err(e) => self.snapshot_errors.push(e.to_string()),
            }
        }
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> u32 {
        self.command_seq.len() as u32
    }

    /// The VM.
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// The machine's description, as snapshots record it.
    pub fn machine(&self) -> &MachineDesc {
        &self.machine
    }

    /// The command sequence number each vCPU's slot reached.
    pub fn command_seqs(&self) -> Vec<u32> {
        self.command_seq.clone()
    }

    /// Pauses every vCPU, each saving its full state as it parks, and
    /// returns the states in vCPU order. The vCPUs stay paused.
    pub fn pause_and_capture(&self) -> Result<Vec<crate::snapshot::state::SavedVcpu>, String> {
        if self.exited.iter().any(|e| e.load(Ordering::Acquire)) {
            return Err("a vCPU has finished its workload".into());
        }
        let epoch = self.capture.request();
        self.pause().map_err(|e| e.to_string())?;
        // vCPUs already parked by an earlier pause capture when poked.
        let start = Instant::now();
        while !self.capture.complete(epoch) {
            if start.elapsed() > PAUSE_TIMEOUT {
                break;
            }
            self.control.poke();
            std::thread::sleep(Duration::from_micros(100));
        }
        self.capture.take(epoch)
    }

    fn kick_all(&self) {
        for (i, t) in self.threads.iter().enumerate() {
            if !self.exited[i].load(Ordering::Acquire) {
                // ESRCH for a thread that just ended is harmless.
                let _ = t.kill(kick_signal());
            }
        }
    }

    /// Pauses every vCPU (out of `KVM_RUN`, parked) and returns how long it took.
    pub fn pause(&self) -> Result<Duration, PauseTimeout> {
        self.control.pause(|| self.kick_all(), PAUSE_TIMEOUT)
    }

    /// Resumes paused vCPUs.
    pub fn resume(&self) {
        self.control.resume();
    }

    /// Writes a command into vCPU `vcpu`'s command slot (argument first,
    /// then the word with a new sequence number). The slot holds one
    /// command, so this first waits (up to [`COMMAND_TIMEOUT`]) until the
    /// guest has taken the previous one, as its state page records.
    pub fn send_command(&mut self, vcpu: u32, op: CommandOp, arg: u64) -> Result<(), CommandError> {
        let Some(&prev) = self.command_seq.get(vcpu as usize) else {
            return Err(CommandError::NoSuchVcpu(vcpu));
        };
        let taken_at = guest_protocol::boot_info::last_command_seq_gpa(vcpu as u64);
        let start = Instant::now();
        while prev != 0 && self.ram.load_u64(taken_at)? < prev as u64 {
            if self
                .exited
                .get(vcpu as usize)
                .is_some_and(|e| e.load(Ordering::Acquire))
            {
                return Err(CommandError::Exited(vcpu));
            }
            if start.elapsed() > COMMAND_TIMEOUT {
                return Err(CommandError::NotTaken(vcpu, prev));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        let seq = &mut self.command_seq[vcpu as usize];
        *seq += 1;
        let slot = guest_protocol::boot_info::command_gpa(vcpu as u64);
        self.ram.store_u64(slot + 8, arg)?;
        self.ram.store_u64(slot, Command::pack(*seq, op))?;
        self.control.notify_command();
        Ok(())
    }

    /// Sends `op` to every vCPU still running.
    pub fn broadcast(&mut self, op: CommandOp, arg: u64) -> Result<(), CommandError> {
        for v in 0..self.vcpus() {
            match self.send_command(v, op, arg) {
                Ok(()) | Err(CommandError::Exited(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Stops every vCPU thread now, wherever the guest is.
    pub fn force_stop(&self) {
        self.control.stop();
        self.kick_all();
    }
}

/// A VM whose RAM, vCPUs and tracker are set up, ready for its threads.
pub struct Machine {
    /// Guest RAM.
    pub ram: Arc<GuestRam>,
    /// The VM.
    pub vm: Arc<VmFd>,
    /// vCPU fds in index order.
    pub vcpus: Vec<VcpuFd>,
    /// When `KVM_CREATE_VM` was issued.
    pub created: Instant,
    /// The running tracker, if any.
    pub tracking: Option<Tracking>,
    /// The command sequence numbers to continue from (0 after a fresh boot).
    pub command_seq: Vec<u32>,
    /// Each vCPU's port registers to continue from (empty after a fresh
    /// boot).
    pub ports: Vec<crate::snapshot::state::PortRegs>,
    /// The CPUID the vCPUs were given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// What snapshots record about the machine.
    pub machine: MachineDesc,
    /// The guest already runs this VMM's protocol (a restored guest never
    /// announces itself again).
    pub restored: bool,
    /// Guest RAM whose KVM memory slot is added on first use.
    pub lazy_slot: Option<Arc<crate::vstate::vm::LazySlot>>,
    /// Where the guest's NUMA nodes go on this host, if placed.
    pub placement: Option<Arc<crate::numa::placement::Placement>>,
}

/// Per-process set-up every run needs: the vCPU kick handler and the
/// signalfd for Ctrl-C.
pub fn prepare_process() -> Result<TerminationSignals, RunError> {
    install_kick_handler()
        .map_err(|e| RunError::Runtime(format!("cannot install the vCPU kick handler: {e}")))?;
    TerminationSignals::new().map_err(|e| RunError::Runtime(format!("signalfd: {e}")))
}

/// The machine description of a configuration.
pub fn describe(
    config: &VmConfig,
    kernel_hash: String,
    placement: Option<&crate::numa::placement::Placement>,
) -> MachineDesc {
    let layout = config.numa_layout();
    MachineDesc {
        vcpus: config.vcpus,
        mem_bytes: config.mem_bytes,
        regions: layout.ranges[..layout.nodes as usize]
            .iter()
            .map(|r| (r.gpa, r.bytes, None, false))
            .chain(config.shared_mem.file.as_ref().map(|f| {
                (
                    config.shared_gpa(),
                    config.shared_mem.bytes,
                    Some(f.to_string_lossy().into_owned()),
                    false,
                )
            }))
            .chain((config.rom.bytes > 0).then(|| (config.rom_gpa(), config.rom.bytes, None, true)))
            .map(|(gpa, size, file, read_only)| RegionDesc {
                gpa,
                size,
                shared: file.is_some(),
                read_only,
                file,
                hint: config.ram.hint.name().into(),
            })
            .collect(),
        backing: config.ram.backing.name().into(),
        fault_around_pages: config.ram.fault_around_pages,
        workload: config.workload.name().into(),
        pages: config.pages,
        passes: config.passes,
        write_ratio: config.write_ratio,
        round_per_pass: config.round_per_pass,
        kernel_hash,
        numa: crate::snapshot::state::NumaDesc {
            vcpu_node: (0..config.vcpus as u64)
                .map(|v| layout.node_of_vcpu(v))
                .collect(),
            placed: placement.is_some(),
            policy: config.numa.policy.map(|p| p.name().into()),
            host_nodes: placement.map(|p| p.host_node.clone()).unwrap_or_default(),
        },
    }
}

/// Boots `config`, runs it to its end and reports.
pub fn run(config: &VmConfig, hooks: RunHooks, sink: SerialSink) -> Result<RunReport, RunError> {
    config.validate(host_ram_bytes())?;
    let image = KernelImage::from_source(&config.kernel)?;
    image.validate()?;
    let signals = prepare_process()?;
    if let Some(kind) = config.track {
        check_combination(kind, config.ram.backing)?;
    }
    let kvm = open_kvm()?;
    let mut ram = GuestRam::new(config.mem_bytes, config.ram)?;
    crate::numa::split(config, &mut ram)?;
    let placement = crate::numa::place(config, &ram)?;
    let ram = Arc::new(ram);
    let created = Instant::now();
    let vm = Arc::new(create_vm(&kvm, &ram, config.vcpus)?);
    let mut tracking = config
        .track
        .map(|kind| Tracking::new(new_tracker(kind, config.vcpus), config.mem_bytes / 4096));
    if let Some(t) = &mut tracking {
        t.tracker_mut().before_vcpus(&vm)?;
    }
    let entry = image.load(&ram)?.0;
    crate::devices::rom::load(&ram, &config.rom).map_err(|e| RunError::Runtime(e.to_string()))?;
    write_boot_structures(&ram, config)?;
    for &gpa in &config.poison {
        ram.poison_page(gpa, "injected by --poison")?;
        log::info!("page {:#x} poisoned (--poison)", gpa & !0xfff);
    }

    let mut fds = Vec::with_capacity(config.vcpus as usize);
    let mut cpuid = Vec::new();
    for i in 0..config.vcpus {
        let fd = vm
            .create_vcpu(i as u64)
            .map_err(|e| RunError::CreateVcpu(i, e))?;
        setup_vcpu(&kvm, &fd, i, entry)?;
        if i == 0 {
            cpuid = cpuid_for(&kvm, 0)
                .map(|c| c.as_slice().to_vec())
                .map_err(|e| RunError::CreateVcpu(0, e))?;
        }
        fds.push(fd);
    }
    if let Some(t) = &mut tracking {
        t.tracker_mut().after_vcpus(&vm, &fds)?;
        t.start(&TrackCtx { vm: &vm, ram: &ram })?;
    }
    let machine = Machine {
        ram,
        vm,
        vcpus: fds,
        created,
        tracking,
        command_seq: vec![0; config.vcpus as usize],
        ports: Vec::new(),
        cpuid,
        machine: describe(config, fnv1a_hex(&image.bytes), placement.as_deref()),
        restored: false,
        lazy_slot: None,
        placement,
    };
    supervise(config, machine, hooks, sink, signals, None)
}

/// Runs a prepared machine's vCPU threads under the supervisor's event loop
/// until the guest ends, and reports. `initial` is a command (and its
/// argument) sent to every
/// vCPU once they run (e.g. `Verify` after a restore).
pub fn supervise(
    config: &VmConfig,
    machine: Machine,
    hooks: RunHooks,
    sink: SerialSink,
    signals: TerminationSignals,
    initial: Option<(CommandOp, u64)>,
) -> Result<RunReport, RunError> {
    let Machine {
        ram,
        vm,
        vcpus: fds,
        created,
        tracking,
        command_seq,
        ports,
        cpuid,
        machine: desc,
        restored,
        lazy_slot,
        placement,
    } = machine;
    let ring_full = tracking
        .as_ref()
        .and_then(|t| t.tracker().ring_full_handler());
    let wake = Arc::new(
        EventFd::new(EFD_NONBLOCK).map_err(|e| RunError::Runtime(format!("eventfd: {e}")))?,
    );
    let (tx, rx) = mpsc::channel();
    let sender = MsgSender::new(tx, wake.clone());
    let vcpu_count = fds.len();
    let control = Arc::new(VcpuControl::new(vcpu_count));
    let capture = Arc::new(CaptureSlots::new(vcpu_count));
    let first_io = Arc::new(OnceLock::new());
    let first_run = Arc::new(OnceLock::new());
    let exited: Arc<Vec<AtomicBool>> =
        Arc::new((0..vcpu_count).map(|_| AtomicBool::new(false)).collect());
    // The io workload's block device, on the vCPU threads' ports.
    let block = if config.workload == guest_protocol::Workload::Io {
        let blocks = config.vcpus as u64 * config.pages;
        let dev = crate::devices::block::BlockDevice::from_source(
            ram.clone(),
            &config.disk,
            blocks,
            config.vcpus,
        );
        Some(Arc::new(dev.map_err(|e| RunError::Runtime(e.to_string()))?))
    } else {
        None
    };
    let rom = crate::devices::rom::RomGuard::of(&ram).map(Arc::new);
    let mut threads = Vec::with_capacity(vcpu_count);
    for (i, fd) in fds.into_iter().enumerate() {
        let runner = VcpuRunner::new(
            i as u32,
            fd,
            control.clone(),
            sender.clone(),
            first_io.clone(),
            ram.clone(),
        )
        .with_ring_full_handler(ring_full.clone())
        .with_capture(capture.clone(), cpuid.clone())
        .with_first_run(first_run.clone())
        .with_block(block.clone())
        .with_ports(ports.get(i).copied().unwrap_or_default())
        .with_rom(rom.clone())
        .with_lazy_slot(lazy_slot.clone())
        .with_start_gate(hooks.start_gate.clone());
        let exited = exited.clone();
        let placement = placement.clone();
        let t = std::thread::Builder::new()
            .name(format!("vcpu{i}"))
            .spawn(move || {
                if let Some(p) = placement {
                    p.pin_vcpu_thread(i as u32);
                }
                runner.run();
                exited[i].store(true, Ordering::Release);
            })
            .map_err(|e| RunError::Runtime(format!("cannot start vCPU thread {i}: {e}")));
        match t {
            Ok(t) => threads.push(t),
            Err(e) => {
                // Threads already started must not outlive the VM.
                control.stop();
                for t in threads {
                    let _ = t.kill(kick_signal());
                    let _ = t.join();
                }
                return Err(e);
            }
        }
    }
    drop(sender);

    let mut handle = VmHandle {
        ram: ram.clone(),
        vm: vm.clone(),
        control,
        capture,
        threads,
        exited,
        command_seq,
        machine: desc,
        snapshots: Vec::new(),
        snapshot_errors: Vec::new(),
        pending_snapshots: Vec::new(),
        pending_forks: Vec::new(),
        forks: Vec::new(),
        block: block.clone(),
    };
    if let Some((op, arg)) = initial {
        if let Err(e) = handle.broadcast(op, arg) {
            log::warn!("cannot send {op:?} to the guest: {e}");
        }
    }
    let stop_after = config
        .stop_after
        .or((config.workload == guest_protocol::Workload::Idle).then_some(IDLE_DEFAULT));
    let rounds = tracking.map(|t| RoundDriver::new(t, vm.clone(), vcpu_count));
    let mut sup = Supervisor::new(handle, rx, wake, signals, sink, hooks, stop_after, rounds);
    sup.scan = crate::numa::scan_driver(config, placement.as_deref(), vcpu_count);
    sup.idle_workload = config.workload == guest_protocol::Workload::Idle;
    sup.first_run = first_run.clone();
    if restored {
        sup.vcpu_started.iter_mut().for_each(|s| *s = true);
        sup.speaks_protocol = true;
        sup.first_boot = Some(Instant::now());
        // Its vCPUs started long ago: a threshold of 0 page stores is
        // reached now (a restored guest that waits sends no event until
        // its next command).
        sup.run_page_hooks();
    }
    let supervisor = Arc::new(Mutex::new(sup));
    let loop_result = event_loop(&supervisor);
    // The event manager (the only other owner) is gone once the loop returns.
    let mut sup = match Arc::try_unwrap(supervisor) {
        Ok(m) => m.into_inner().unwrap_or_else(PoisonError::into_inner),
        Err(_) => {
            return Err(RunError::Runtime(
                "the event loop kept the supervisor".into(),
            ))
        }
    };
    if let Err(e) = loop_result {
        sup.handle.force_stop();
        sup.join_threads();
        return Err(e);
    }
    sup.join_threads();
    let scanner = sup.scan.take().map(|s| s.finish(&ram, &config.work_area()));
    sup.stop_tracking();
    sup.run_exit_hooks();

    let since_created = |t: &OnceLock<Instant>| {
        t.get()
            .map(|t| t.duration_since(created).as_micros() as u64)
    };
    let (rom_check, shared_check, shared_seen) = (sup.rom_check, sup.shared_check, sup.shared_seen);
    let mut report = sup.into_report(config, &ram, since_created(&first_io));
    report.first_run_us = since_created(&first_run);
    report.block = block.map(|b| b.stats());
    report.rom = rom.map(|r| r.report(rom_check, report.block.map_or(0, |b| b.refused)));
    report.shared_mem =
        crate::devices::shared_mem::report(&ram, &config.shared_mem, shared_check, shared_seen);
    report.numa = crate::numa::report(placement.as_deref(), &ram, scanner);
    drop(vm);
    Ok(report)
}

fn event_loop(supervisor: &Arc<Mutex<Supervisor>>) -> Result<(), RunError> {
    let mut em: EventManager<Arc<Mutex<Supervisor>>> =
        EventManager::new().map_err(|e| RunError::Runtime(format!("event manager: {e:?}")))?;
    em.add_subscriber(supervisor.clone());
    loop {
        em.run_with_timeout(20)
            .map_err(|e| RunError::Runtime(format!("event loop: {e:?}")))?;
        let mut sup = supervisor.lock_or_recover();
        sup.tick();
        if sup.finished() {
            // Messages sent just before the last exit are still queued.
            sup.drain();
            return Ok(());
        }
    }
}

/// Dirty-tracking rounds: the tracker and the doorbell barrier.
struct RoundDriver {
    tracking: Tracking,
    vm: Arc<VmFd>,
    waiting: Vec<bool>,
    index: u64,
}

impl RoundDriver {
    fn new(tracking: Tracking, vm: Arc<VmFd>, vcpus: usize) -> RoundDriver {
        RoundDriver {
            tracking,
            vm,
            waiting: vec![false; vcpus],
            index: 0,
        }
    }

    /// Harvests the round and measures it against the schedules.
    fn harvest(&mut self, handle: &VmHandle) -> Result<RoundInfo, TrackError> {
        let ram = &handle.ram;
        let round = self.tracking.round(&TrackCtx { vm: &self.vm, ram })?;
        // The pass just completed, from the first waiting vCPU's cursor.
        let v = self.waiting.iter().position(|w| *w).unwrap_or(0) as u64;
        let cursor_at = state_gpa(v) + std::mem::offset_of!(VcpuState, cursor) as u64;
        let cursor = ram.load_u64(cursor_at).unwrap_or(0);
        let pages_per_vcpu = ram
            .load_u64(BOOT_INFO_GPA + std::mem::offset_of!(BootInfo, pages_per_vcpu) as u64)
            .unwrap_or(1)
            .max(1);
        let pass = (cursor / pages_per_vcpu).saturating_sub(1);
        let expected = pages_written_in_pass(ram.as_ref(), pass).unwrap_or_default();
        let work = work_area_pages(ram.as_ref()).unwrap_or_default();
        let missed: Vec<u64> = expected
            .iter()
            .filter(|p| round.pages.binary_search(p).is_err())
            .copied()
            .collect();
        let false_positives = round
            .pages
            .iter()
            .filter(|p| work.contains(p) && expected.binary_search(p).is_err())
            .count() as u64;
        self.tracking
            .note_accuracy(false_positives, missed.len() as u64);
        let info = RoundInfo {
            index: self.index,
            pass,
            pages: round.pages,
            expected,
            missed,
            false_positives,
            by_vcpu: round.by_vcpu,
        };
        self.index += 1;
        Ok(info)
    }
}

/// The event-loop side of a run.
struct Supervisor {
    handle: VmHandle,
    rx: Option<Receiver<VcpuMsg>>,
    wake: Option<Arc<EventFd>>,
    signals: Option<TerminationSignals>,
    sink: SerialSink,
    hooks: Vec<(u64, HookAction)>,
    at_exit: Vec<HookAction>,
    on_round: Vec<RoundHook>,
    fail_on: Vec<Arc<Mutex<Option<String>>>>,
    rounds: Option<RoundDriver>,
    stop_after: Option<Duration>,
    progress: Vec<u64>,
    /// Per vCPU: it has started its workload (booted, or for the idle
    /// workload, reached its wait for commands).
    vcpu_started: Vec<bool>,
    /// The guest runs the idle workload: a vCPU has started once it waits.
    idle_workload: bool,
    verify: Vec<Option<u64>>,
    outcomes: Vec<Option<VcpuOutcome>>,
    speaks_protocol: bool,
    first_boot: Option<Instant>,
    last_end: Option<Instant>,
    stop_sent: bool,
    force_at: Option<Instant>,
    interrupted: bool,
    hook_error: Option<String>,
    /// When a vCPU first entered `KVM_RUN`: `stop_after` counts from here
    /// (a VM held at a start gate has not started while it waits).
    first_run: Arc<OnceLock<Instant>>,
    panic_line: Option<String>,
    serial: Vec<String>,
    scan: Option<crate::numa::scan::ScanDriver>,
    /// The bits of vCPU 0's `RomCheck` event, if it sent one.
    rom_check: Option<u64>,
    /// The bits of vCPU 0's `SharedCheck` event, if it sent one.
    shared_check: Option<u64>,
    /// The word of vCPU 0's last `SharedSeen` event, if it sent one.
    shared_seen: Option<u64>,
}

impl Supervisor {
    #[allow(clippy::too_many_arguments)]
    fn new(
        handle: VmHandle,
        rx: Receiver<VcpuMsg>,
        wake: Arc<EventFd>,
        signals: TerminationSignals,
        sink: SerialSink,
        hooks: RunHooks,
        stop_after: Option<Duration>,
        rounds: Option<RoundDriver>,
    ) -> Supervisor {
        let n = handle.vcpus() as usize;
        Supervisor {
            handle,
            rx: Some(rx),
            wake: Some(wake),
            signals: Some(signals),
            sink,
            hooks: hooks.after_pages,
            at_exit: hooks.at_exit,
            on_round: hooks.on_round,
            fail_on: hooks.fail_on,
            rounds,
            stop_after,
            progress: vec![0; n],
            vcpu_started: vec![false; n],
            idle_workload: false,
            verify: vec![None; n],
            outcomes: (0..n).map(|_| None).collect(),
            speaks_protocol: false,
            first_boot: None,
            last_end: None,
            stop_sent: false,
            force_at: None,
            interrupted: false,
            hook_error: None,
            first_run: Arc::new(OnceLock::new()),
            panic_line: None,
            serial: Vec::new(),
            scan: None,
            rom_check: None,
            shared_check: None,
            shared_seen: None,
        }
    }

    fn run_exit_hooks(&mut self) {
        for action in std::mem::take(&mut self.at_exit) {
            if let Err(e) = action(&mut self.handle) {
                log::error!("exit hook failed: {e}");
                self.hook_error.get_or_insert(e.0);
            }
        }
    }

    fn finished(&self) -> bool {
        self.outcomes.iter().all(Option::is_some)
    }

    /// Joins the vCPU threads, then waits for live snapshots still being
    /// written (they need guest RAM, which outlives them) and for forked
    /// children still running.
    fn join_threads(&mut self) {
        for t in self.handle.threads.drain(..) {
            if t.join().is_err() {
                log::error!("a vCPU thread panicked");
            }
        }
        self.handle.collect_snapshots(true);
        for f in std::mem::take(&mut self.handle.pending_forks) {
            let report = f.wait(&self.handle.ram);
            self.handle.forks.push(report);
        }
    }

    /// Asks every vCPU to stop at its next poll point; forces the stop if
    /// the guest has not ended within the grace period, or at once for a
    /// kernel that never announced the protocol (it cannot hear the request).
    fn request_stop(&mut self) {
        if !self.speaks_protocol {
            self.force_stop();
            return;
        }
        if !self.stop_sent {
            self.stop_sent = true;
            if let Err(e) = self.handle.broadcast(CommandOp::Stop, 0) {
                log::warn!("cannot write the stop command: {e}");
            }
        }
        self.force_at.get_or_insert(Instant::now() + STOP_GRACE);
    }

    fn force_stop(&mut self) {
        self.handle.force_stop();
        self.force_at = None;
    }

    /// Periodic work: deadlines, errors reported by other threads, live
    /// snapshots that completed.
    fn tick(&mut self) {
        self.handle.collect_snapshots(false);
        if let Some(scan) = &mut self.scan {
            scan.tick(&self.handle.ram);
        }
        if self.hook_error.is_none() {
            let failed = self
                .fail_on
                .iter()
                .find_map(|slot| slot.lock().ok().and_then(|s| s.clone()));
            if let Some(e) = failed {
                log::error!("{e}");
                self.hook_error = Some(e);
                self.force_stop();
            }
        }
        if let (Some(limit), Some(t)) = (self.stop_after, self.first_run.get()) {
            if t.elapsed() >= limit {
                self.stop_after = None;
                self.request_stop();
            }
        }
        if self.force_at.is_some_and(|t| Instant::now() >= t) {
            log::warn!("the guest did not stop within {STOP_GRACE:?}; stopping its vCPUs");
            self.force_stop();
        }
    }

    fn drain(&mut self) {
        let msgs: Vec<VcpuMsg> = match &self.rx {
            Some(rx) => rx.try_iter().collect(),
            None => return,
        };
        for m in msgs {
            self.handle_msg(m);
        }
    }

    fn handle_msg(&mut self, msg: VcpuMsg) {
        match msg {
            VcpuMsg::Serial { line, .. } => self.serial_line(line),
            VcpuMsg::Event { vcpu, event, arg } => self.guest_event(vcpu as usize, event, arg),
            VcpuMsg::Exited { vcpu, outcome } => {
                let v = vcpu as usize;
                match &outcome {
                    VcpuOutcome::Fault(f) => {
                        log::error!("{f}");
                        // The guest is broken: the others cannot finish meaningfully.
                        self.force_stop();
                    }
                    VcpuOutcome::Panicked => self.force_stop(),
                    _ => {}
                }
                if let Some(slot) = self.outcomes.get_mut(v) {
                    *slot = Some(outcome);
                }
                self.last_end = Some(Instant::now());
                // The others may all be waiting at a doorbell for this one.
                self.maybe_finish_round();
            }
        }
    }

    fn serial_line(&mut self, line: String) {
        use std::io::Write;
        if line.contains("PANIC") {
            self.panic_line.get_or_insert_with(|| line.clone());
        }
        match self.sink {
            SerialSink::Stdout => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
            SerialSink::Stderr => eprintln!("{line}"),
            SerialSink::Capture => self.serial.push(line),
        }
    }

    fn guest_event(&mut self, v: usize, event: Event, arg: u64) {
        log::trace!("vCPU {v}: {event:?} {arg}");
        match event {
            Event::Boot => {
                self.speaks_protocol |= arg == BOOT_INFO_VERSION as u64;
                self.first_boot.get_or_insert_with(Instant::now);
                if !self.idle_workload {
                    self.vcpu_started(v);
                }
            }
            Event::Waiting => self.vcpu_started(v),
            Event::RomCheck => self.rom_check = Some(arg),
            Event::SharedCheck => self.shared_check = Some(arg),
            Event::SharedSeen => self.shared_seen = Some(arg),
            Event::Progress | Event::Done | Event::RoundEnd => {
                if let Some(p) = self.progress.get_mut(v) {
                    *p = arg;
                }
                self.run_page_hooks();
                if event == Event::RoundEnd {
                    match &mut self.rounds {
                        Some(r) => {
                            if let Some(w) = r.waiting.get_mut(v) {
                                *w = true;
                            }
                            self.maybe_finish_round();
                        }
                        // No tracking: nothing to harvest, let the vCPU go on.
                        None => self.release(v),
                    }
                }
            }
            Event::VerifyResult => {
                // Keep the worst result: a mid-run verify that found
                // mismatches must not be hidden by a later one.
                if let Some(slot) = self.verify.get_mut(v) {
                    *slot = Some(slot.map_or(arg, |old| old.max(arg)));
                }
            }
            Event::PassDone | Event::CommandAck | Event::Panic => {}
        }
    }

    fn release(&mut self, v: usize) {
        if let Err(e) = self.handle.send_command(v as u32, CommandOp::Continue, 0) {
            log::warn!("cannot release vCPU {v} from its round end: {e}");
        }
    }

    /// Harvests a round once every live vCPU waits at the doorbell, checks
    /// it against the pass the schedules just wrote, runs the round hooks,
    /// and releases the vCPUs.
    fn maybe_finish_round(&mut self) {
        let Some(mut r) = self.rounds.take() else {
            return;
        };
        let any = r.waiting.iter().any(|w| *w);
        let all = r
            .waiting
            .iter()
            .zip(&self.outcomes)
            .all(|(w, o)| *w || o.is_some());
        if any && all {
            match r.harvest(&self.handle) {
                Ok(info) => {
                    for hook in &mut self.on_round {
                        if let Err(e) = hook(&mut self.handle, &info) {
                            log::error!("round hook failed: {e}");
                            self.hook_error.get_or_insert(e.0);
                        }
                    }
                }
                Err(e) => {
                    log::error!("dirty tracking failed: {e}");
                    self.hook_error
                        .get_or_insert(format!("dirty tracking failed: {e}"));
                }
            }
            let waiting: Vec<usize> = (0..r.waiting.len()).filter(|v| r.waiting[*v]).collect();
            r.waiting.iter_mut().for_each(|w| *w = false);
            self.rounds = Some(r);
            for v in waiting {
                self.release(v);
            }
            if self.hook_error.is_some() {
                self.request_stop();
            }
        } else {
            self.rounds = Some(r);
        }
    }

    fn stop_tracking(&mut self) {
        if let Some(r) = &mut self.rounds {
            let ctx = TrackCtx {
                vm: &r.vm,
                ram: &self.handle.ram,
            };
            if let Err(e) = r.tracking.stop(&ctx) {
                log::warn!("stopping dirty tracking: {e}");
            }
        }
    }

    /// vCPU `v` has started its workload: a threshold of 0 page stores is
    /// reached once every vCPU has (for the idle workload, once every vCPU
    /// waits for commands: a snapshot or fork then captures a guest in its
    /// wait, not one still reading its boot-info page).
    fn vcpu_started(&mut self, v: usize) {
        if let Some(s) = self.vcpu_started.get_mut(v) {
            *s = true;
        }
        self.run_page_hooks();
    }

    fn run_page_hooks(&mut self) {
        let total: u64 = self.progress.iter().sum();
        let all_started = self.vcpu_started.iter().all(|s| *s);
        while self
            .hooks
            .first()
            .is_some_and(|(n, _)| total >= *n && (*n > 0 || all_started))
        {
            let (n, action) = self.hooks.remove(0);
            log::debug!("running the hook set for {n} page stores at {total}");
            if let Err(e) = action(&mut self.handle) {
                log::error!("hook failed: {e}");
                self.hook_error.get_or_insert(e.0);
                // Never leave the guest paused behind a failed hook.
                self.handle.resume();
                self.request_stop();
            }
        }
    }

    fn on_signal(&mut self) {
        let n = self.signals.as_ref().map_or(0, TerminationSignals::drain);
        if n == 0 {
            return;
        }
        if self.interrupted {
            log::warn!("second interrupt: stopping the vCPUs now");
            self.force_stop();
        } else {
            log::info!("interrupted: asking the guest to stop");
            self.interrupted = true;
            self.request_stop();
        }
    }

    fn into_report(mut self, config: &VmConfig, ram: &GuestRam, boot_us: Option<u64>) -> RunReport {
        let mut status = RunStatus::Ok;
        let mut error = None;
        let mut vcpu_reports = Vec::new();
        for (i, outcome) in self.outcomes.iter().enumerate() {
            let name = match outcome {
                Some(VcpuOutcome::Done) => "done",
                Some(VcpuOutcome::Halted) => "halted",
                Some(VcpuOutcome::Stopped) => "stopped",
                Some(VcpuOutcome::Panicked) => {
                    status = RunStatus::GuestPanic;
                    error.get_or_insert(format!(
                        "guest kernel panicked on vCPU {i}{}",
                        self.panic_line
                            .as_ref()
                            .map(|l| format!(": {l}"))
                            .unwrap_or_default()
                    ));
                    "panicked"
                }
                Some(VcpuOutcome::Fault(f)) => {
                    if status == RunStatus::Ok {
                        status = match f {
                            crate::vstate::vcpu::VcpuFault::Protocol { .. } => {
                                RunStatus::ProtocolError
                            }
                            // The guest touched a poisoned page.
                            crate::vstate::vcpu::VcpuFault::MemoryError { .. } => {
                                RunStatus::MemoryError
                            }
                            _ => RunStatus::VcpuFault,
                        };
                    }
                    error.get_or_insert(f.to_string());
                    "fault"
                }
                None => "unknown",
            };
            vcpu_reports.push(VcpuReport {
                vcpu: i as u32,
                outcome: name.to_string(),
                pages_written: self.progress.get(i).copied().unwrap_or(0),
                verify_mismatches: self.verify.get(i).copied().flatten(),
            });
        }
        let memory_errors = ram.take_memory_errors();
        if let Some(e) = memory_errors.first() {
            status = RunStatus::MemoryError;
            error = Some(format!("memory error: {e}"));
        }
        if let Some(e) = self.handle.snapshot_errors.first() {
            if status == RunStatus::Ok {
                status = RunStatus::SnapshotFailed;
            }
            error.get_or_insert(format!("snapshot failed: {e}"));
        }
        if let Some(e) = self.hook_error {
            if status == RunStatus::Ok {
                status = RunStatus::HookFailed;
            }
            error.get_or_insert(e);
        }
        let verify_mismatches = self
            .verify
            .iter()
            .copied()
            .reduce(|a, b| match (a, b) {
                (Some(a), Some(b)) => Some(a + b),
                (a, b) => a.or(b),
            })
            .flatten();
        // Only a kernel that announced this protocol laid out guest RAM the
        // way the oracle expects.
        let host_verify_mismatches = if self.speaks_protocol {
            match verify_image(ram) {
                Ok(v) => Some(v.total),
                Err(e) => {
                    log::warn!("host-side verify failed: {e}");
                    None
                }
            }
        } else {
            None
        };
        if status == RunStatus::Ok
            && (verify_mismatches.unwrap_or(0) > 0 || host_verify_mismatches.unwrap_or(0) > 0)
        {
            status = RunStatus::VerifyMismatch;
            error = Some(format!(
                "verification found mismatching pages: {} (guest), {} (host)",
                verify_mismatches.map_or("n/a".into(), |v| v.to_string()),
                host_verify_mismatches.map_or("n/a".into(), |v| v.to_string())
            ));
        }
        if status == RunStatus::Ok {
            if let Some((s, e)) = crate::fork::worst_child(&self.handle.forks) {
                status = s;
                error = Some(e);
            }
        }
        let tracking_report: Option<TrackingReport> =
            self.rounds.as_ref().map(|r| r.tracking.report());
        if let Some(t) = &tracking_report {
            if t.missed_pages > 0 && status == RunStatus::Ok {
                status = RunStatus::TrackingMissedWrites;
                error = Some(format!(
                    "the {} tracker missed {} written pages",
                    t.backend, t.missed_pages
                ));
            }
        }
        let workload_us = match (self.first_boot, self.last_end) {
            (Some(a), Some(b)) if b >= a => Some(b.duration_since(a).as_micros() as u64),
            _ => None,
        };
        RunReport {
            status,
            error,
            vcpus: config.vcpus,
            mem_bytes: config.mem_bytes,
            workload: config.workload.name().to_string(),
            pages: config.pages,
            passes: config.passes,
            pages_written: self.progress.iter().sum(),
            verify_mismatches,
            host_verify_mismatches,
            boot_us,
            first_run_us: None,
            workload_us,
            interrupted: self.interrupted,
            vcpu_reports,
            memory: (&ram.stats()).into(),
            tracking: tracking_report,
            snapshots: std::mem::take(&mut self.handle.snapshots),
            forks: std::mem::take(&mut self.handle.forks),
            block: None,
            rom: None,
            shared_mem: None,
            numa: None,
            serial: self.serial,
        }
    }
}

impl MutEventSubscriber for Supervisor {
    fn init(&mut self, ops: &mut EventOps) {
        if let Some(wake) = &self.wake {
            if let Err(e) = ops.add(Events::new(wake.as_ref(), event_manager::EventSet::IN)) {
                log::error!("cannot watch the vCPU eventfd: {e:?}");
            }
        }
        if let Some(sig) = &self.signals {
            if let Err(e) = ops.add(Events::new(sig, event_manager::EventSet::IN)) {
                log::error!("cannot watch the signalfd: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if self.wake.as_ref().is_some_and(|w| w.as_raw_fd() == fd) {
            if let Some(w) = &self.wake {
                let _ = w.read();
            }
            self.drain();
        } else if self.signals.as_ref().is_some_and(|s| s.as_raw_fd() == fd) {
            self.on_signal();
        }
    }
}
