//! The `vmm` command line.

use crate::bench;
use crate::config::{KernelSource, VmConfig};
use crate::dirty::TrackerKind;
use crate::report::RunReport;
use crate::report::{error_json, EXIT_ERROR, EXIT_USAGE};
use crate::runner::{run, HookError, RunError, RunHooks, SerialSink, VmHandle};
use crate::size::size_arg;
use crate::snapshot::restore::{restore, RestoreMode, RestoreOptions, RestoreReport};
use crate::snapshot::writer::{check_live, start_snapshot, SnapshotMode, SnapshotStarted};
use clap::{Args, Parser, Subcommand};
use guest_mem::{BackingKind, RamConfig};
use guest_protocol::Workload;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

/// A minimal KVM VMM whose guest RAM is run by its own memory manager.
#[derive(Parser, Debug)]
#[command(name = "vmm", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: CliCommand,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum CliCommand {
    /// Boot a micro-guest and run a memory workload on it.
    Run(Box<RunArgs>),
    /// Boot a VM from a snapshot directory and run the guest on.
    Restore(RestoreArgs),
    /// Print a snapshot's metadata, verify its checksums and run the
    /// consistency oracle on its memory image.
    Inspect(InspectArgs),
    /// Start several VMs from one snapshot, sharing its memory
    /// copy-on-write, run each to the end of its workload and verify it.
    Clone(CloneArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
}

fn parse_numa_policy(s: &str) -> Result<guest_mem::numa::policy::NumaPolicy, String> {
    guest_mem::numa::policy::NumaPolicy::from_name(s)
        .ok_or_else(|| format!("unknown NUMA policy {s:?}; one of: bind, preferred, interleave"))
}

fn parse_access_hint(s: &str) -> Result<guest_mem::AccessHint, String> {
    guest_mem::AccessHint::from_name(s)
        .ok_or_else(|| format!("unknown access hint {s:?}; one of: normal, sequential, random"))
}

fn parse_clone_mode(s: &str) -> Result<crate::snapshot::clone::CloneMode, String> {
    match s {
        "mmap" => Ok(crate::snapshot::clone::CloneMode::Mmap),
        "uffd" => Ok(crate::snapshot::clone::CloneMode::Uffd),
        _ => Err(format!("unknown clone mode {s:?}; one of: mmap, uffd")),
    }
}

fn parse_snapshot_mode(s: &str) -> Result<SnapshotMode, String> {
    match s {
        "paused" => Ok(SnapshotMode::Paused),
        "live" => Ok(SnapshotMode::Live),
        _ => Err(format!("unknown snapshot mode {s:?}; one of: live, paused")),
    }
}

fn parse_restore_mode(s: &str) -> Result<RestoreMode, String> {
    match s {
        "eager" => Ok(RestoreMode::Eager),
        "uffd" => Ok(RestoreMode::Uffd),
        "mmap" => Ok(RestoreMode::Mmap),
        _ => Err(format!(
            "unknown restore mode {s:?}; one of: eager, mmap, uffd"
        )),
    }
}

/// Snapshot flags shared by `vmm run` and `vmm restore`.
#[derive(Args, Debug, Clone)]
pub struct SnapshotArgs {
    /// Take a snapshot into this directory (which must not exist) once the
    /// guest has made --snapshot-after-pages page stores.
    #[arg(long, requires = "snapshot_after_pages")]
    pub snapshot: Option<PathBuf>,
    /// Page stores (all vCPUs) after which the snapshot is taken (0: once
    /// every vCPU has started; an idle guest, once it waits for commands).
    #[arg(long, requires = "snapshot")]
    pub snapshot_after_pages: Option<u64>,
    /// How the snapshot is taken: live (the guest keeps running; the pause
    /// covers only the vCPU state) or paused (stop-the-world).
    #[arg(long, default_value = "live", value_parser = parse_snapshot_mode)]
    pub snapshot_mode: SnapshotMode,
    /// Take a diff against this snapshot (the one the VM was restored from):
    /// only pages whose content differs are stored.
    #[arg(long, requires = "snapshot")]
    pub snapshot_parent: Option<PathBuf>,
}

/// Builds the snapshot hook the flags ask for; `restored_from` is the
/// snapshot the VM was restored from (a diff's parent must be that one).
fn snapshot_hooks(
    snap: &SnapshotArgs,
    backing: BackingKind,
    track: Option<TrackerKind>,
    restored_from: Option<&std::path::Path>,
) -> Result<RunHooks, RunError> {
    let hooks = RunHooks::default();
    let (Some(dir), Some(after)) = (snap.snapshot.clone(), snap.snapshot_after_pages) else {
        return Ok(hooks);
    };
    let mode = snap.snapshot_mode;
    if mode == SnapshotMode::Live {
        check_live(backing, track)
            .map_err(|e| RunError::Track(crate::dirty::TrackError::Combination(e)))?;
    }
    if let Some(parent) = &snap.snapshot_parent {
        let Some(from) = restored_from else {
            return Err(RunError::Config(crate::config::ConfigError::DiffParent(
                "--snapshot-parent needs a VM restored from that snapshot: \
                 vmm restore PARENT --snapshot DIR --snapshot-after-pages N --snapshot-parent PARENT"
                    .into(),
            )));
        };
        let (p, _) = crate::snapshot::read_state(parent)?;
        let (r, _) = crate::snapshot::read_state(from)?;
        if p.id != r.id {
            return Err(RunError::Config(crate::config::ConfigError::DiffParent(
                format!(
                    "--snapshot-parent {} is not the snapshot this VM was restored from ({})",
                    parent.display(),
                    from.display()
                ),
            )));
        }
    }
    let parent = snap.snapshot_parent.clone();
    Ok(hooks.after_pages(
        after,
        Box::new(move |vm: &mut VmHandle| {
            let desc = vm.machine().clone();
            match start_snapshot(vm, &dir, mode, desc, parent.as_deref()) {
                Ok(SnapshotStarted::Done(r)) => vm.snapshots.push(r),
                // A live snapshot's copy runs on; the supervisor collects it.
                Ok(SnapshotStarted::Writing(p)) => vm.pending_snapshots.push(p),
                // The guest runs on unaffected; the run reports the failure.
                Err(e) => vm.snapshot_errors.push(e.to_string()),
            }
            Ok(())
        }),
    ))
}

/// Adds the fork `--fork-after-pages N --forks K` asks for.
fn fork_hooks(
    args: &ForkArgs,
    backing: BackingKind,
    track: Option<TrackerKind>,
    hooks: RunHooks,
) -> Result<RunHooks, RunError> {
    let (Some(after), Some(count)) = (args.fork_after_pages, args.forks) else {
        return Ok(hooks);
    };
    if backing != BackingKind::Memfd {
        return Err(RunError::Config(crate::config::ConfigError::Fork(
            "a fork shares guest memory through its memfd: use --backing memfd".into(),
        )));
    }
    if track.is_some_and(TrackerKind::needs_wp_async) || track == Some(TrackerKind::UffdWp) {
        return Err(RunError::Config(crate::config::ConfigError::Fork(
            "a fork cannot keep userfaultfd write-protect tracking across its new mappings: \
             use --track kvm-bitmap or kvm-ring"
                .into(),
        )));
    }
    let opts = crate::fork::ForkOptions {
        count,
        seed_base: args.fork_seed_base,
        fail_setup_at: None,
    };
    Ok(hooks.after_pages(
        after,
        Box::new(move |vm: &mut VmHandle| {
            let pending = crate::fork::fork_vm(vm, opts).map_err(|e| HookError(e.to_string()))?;
            vm.pending_forks.push(pending);
            Ok(())
        }),
    ))
}

/// A fork was asked for but the guest never reached the threshold: say so,
/// do not exit 0.
fn check_fork_made(fork: &ForkArgs, r: &mut RunReport) {
    if let (Some(after), true) = (fork.fork_after_pages, r.forks.is_empty()) {
        if r.status == crate::report::RunStatus::Ok {
            r.status = crate::report::RunStatus::HookFailed;
            r.error = Some(format!(
                "no fork: {}",
                threshold_missed(after, r.pages_written, "--fork-after-pages")
            ));
        }
    }
}

/// A snapshot was asked for but the guest never reached the threshold: say
/// so, do not exit 0.
fn check_snapshot_taken(snap: &SnapshotArgs, r: &mut RunReport) {
    if let Some(after) = snap.snapshot_after_pages {
        if r.snapshots.is_empty() && r.status == crate::report::RunStatus::Ok {
            r.status = crate::report::RunStatus::SnapshotFailed;
            r.error = Some(format!(
                "no snapshot was taken: {}",
                threshold_missed(after, r.pages_written, "--snapshot-after-pages")
            ));
        }
    }
}

/// Why a page-store threshold given with `flag` was never reached.
fn threshold_missed(after: u64, pages_written: u64, flag: &str) -> String {
    if after == 0 {
        format!(
            "the guest never reported that every vCPU started its workload (or, for the idle \
             workload, waits for commands), which {flag} 0 waits for"
        )
    } else {
        format!("the guest made {pages_written} page stores, fewer than {flag} {after}")
    }
}

/// `vmm restore` flags.
#[derive(Args, Debug, Clone)]
pub struct RestoreArgs {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// How memory comes back: eager (read everything and check every
    /// checksum before the guest runs) or uffd (serve each missing page from
    /// memory.bin through the fault engine, checking a chunk's checksum when
    /// it is first served from) or mmap (map memory.bin privately; checksums
    /// verified in the background).
    #[arg(long, default_value = "eager", value_parser = parse_restore_mode)]
    pub mode: RestoreMode,
    /// Have the guest run its consistency check at its next poll point.
    #[arg(long)]
    pub verify: bool,
    /// For a snapshot of a guest that shared memory with the host
    /// (`vmm run --shared-mem`): the file to map there again, as large as
    /// it was (the snapshot names the file it had, but never maps one by
    /// itself).
    #[arg(long, value_name = "FILE")]
    pub shared_mem: Option<PathBuf>,
    /// Snapshot flags (a diff against the restored snapshot with
    /// --snapshot-parent).
    #[command(flatten)]
    pub snap: SnapshotArgs,
    /// Fork flags: fork the restored VM.
    #[command(flatten)]
    pub fork: ForkArgs,
    /// Print exactly one JSON object on stdout; serial output goes to stderr.
    #[arg(long)]
    pub json: bool,
}

/// `vmm clone` flags.
#[derive(Args, Debug, Clone)]
pub struct CloneArgs {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// How many VMs (1 to 256).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=crate::snapshot::clone::MAX_CLONES as i64))]
    pub count: u32,
    /// Give clone i the seed S+i from its next pass (default: every clone
    /// runs the snapshot's schedule).
    #[arg(long)]
    pub seed_base: Option<u64>,
    /// How memory comes to the clones: mmap (map the image privately; the
    /// kernel shares its page cache) or uffd (the fault engine serves pages
    /// from the snapshot into a page cache the clones share).
    #[arg(long, default_value = "mmap", value_parser = parse_clone_mode)]
    pub mode: crate::snapshot::clone::CloneMode,
    /// For a snapshot of a guest that shared memory with the host
    /// (`vmm run --shared-mem`): the file to map there again, as large as
    /// it was (the snapshot names the file it had, but never maps one by
    /// itself).
    #[arg(long, value_name = "FILE")]
    pub shared_mem: Option<PathBuf>,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs `vmm clone` and returns the exit code.
pub fn cmd_clone(args: &CloneArgs) -> i32 {
    let opts = crate::snapshot::clone::CloneOptions {
        count: args.count,
        mode: args.mode,
        seed_base: args.seed_base,
        fail_setup_at: None,
        shared_mem: args.shared_mem.clone(),
    };
    match crate::snapshot::clone::clone_vms(&args.dir, &opts) {
        Ok(r) => {
            if args.json {
                match serde_json::to_string(&r) {
                    Ok(j) => println!("{j}"),
                    Err(e) => {
                        eprintln!("vmm: cannot encode the report: {e}");
                        return EXIT_ERROR;
                    }
                }
            } else {
                print!("{}", r.human_summary());
            }
            r.exit_code()
        }
        Err(e) => {
            if args.json {
                println!("{}", error_json(e.kind(), &e.to_string()));
            }
            eprintln!("vmm: error: {e}");
            e.exit_code()
        }
    }
}

/// `vmm inspect` flags.
#[derive(Args, Debug, Clone)]
pub struct InspectArgs {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `vmm bench ...`.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Spawn `vmm run` repeatedly: time from spawn to the first serial byte,
    /// and the in-process boot time.
    Boot(bench::boot::BootBenchArgs),
    /// Populate guest memory through the page-tracking layer and through
    /// plain memory, side by side; table memory and walk costs.
    Faults(bench::faults::FaultBenchArgs),
    /// Compare every dirty-tracking backend against no tracking, guest- and
    /// host-driven, side by side.
    Dirty(bench::dirty::DirtyBenchArgs),
    /// Write-protect methods, live and paused snapshots side by side.
    Snapshot(bench::snapshot::SnapshotBenchArgs),
    /// Restore in each mode: time to the first I/O exit and to a verified end.
    Restore(bench::restore::RestoreBenchArgs),
    /// Clones of one snapshot next to as many eager restores; forks of a
    /// running VM.
    Clone(bench::clone::CloneBenchArgs),
    /// The NUMA scanner on a simulated two-node host, with the accessor
    /// filter on and off side by side.
    Numa(bench::numa::NumaBenchArgs),
}

fn parse_backing(s: &str) -> Result<BackingKind, String> {
    BackingKind::from_name(s)
        .ok_or_else(|| format!("unknown backing {s:?}; one of: memfd, anon, plain"))
}

fn parse_tracker(s: &str) -> Result<TrackerKind, String> {
    TrackerKind::from_name(s).ok_or_else(|| {
        let names: Vec<_> = TrackerKind::ALL.iter().map(|k| k.name()).collect();
        format!(
            "unknown tracking backend {s:?}; one of: {}",
            names.join(", ")
        )
    })
}

fn parse_workload(s: &str) -> Result<Workload, String> {
    Workload::from_name(s).ok_or_else(|| {
        let names: Vec<_> = Workload::ALL.iter().map(|w| w.name()).collect();
        format!("unknown workload {s:?}; one of: {}", names.join(", "))
    })
}

/// `vmm run` flags.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Guest RAM size (e.g. 64M, 1G); a multiple of 4 KiB.
    #[arg(long, default_value = "256M", value_parser = size_arg)]
    pub mem: u64,
    /// Number of vCPUs (each runs the workload on its own pages).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Workload: seq-write, rand-write, read, mixed or idle.
    #[arg(long, default_value = "seq-write", value_parser = parse_workload)]
    pub workload: Workload,
    /// Pages each vCPU owns.
    #[arg(long, default_value_t = 1024)]
    pub pages: u64,
    /// Passes over the pages.
    #[arg(long, default_value_t = 2)]
    pub passes: u64,
    /// Initial seed of the workload schedule.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Percent of steps that write, for the mixed workload.
    #[arg(long, default_value_t = 50)]
    pub write_ratio: u32,
    /// Another guest ELF to boot, entered the same way as the built-in one.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Skip the guest's verify at the end of the workload.
    #[arg(long)]
    pub no_verify: bool,
    /// Ask the guest to stop this many milliseconds after its vCPUs started
    /// (default: run to the end; the idle workload stops after 100 ms).
    /// A kernel that does not speak the protocol is stopped at once then.
    #[arg(long)]
    pub stop_after_ms: Option<u64>,
    /// Guest RAM backing: memfd (a memfd per region, served by the fault
    /// engine), anon (anonymous memory, served by the fault engine) or plain
    /// (kernel-managed anonymous memory without this layer).
    #[arg(long, default_value = "memfd", value_parser = parse_backing)]
    pub backing: BackingKind,
    /// Ask for transparent huge pages where the backing allows (the report
    /// says how much the host backs with them).
    #[arg(long)]
    pub thp: bool,
    /// Pages populated per missing fault (a power of two, 1 to 512).
    #[arg(long, default_value_t = 16)]
    pub fault_around: u64,
    /// How the guest will access its RAM: normal, sequential or random.
    /// Given to the kernel (`madvise`) and to the NUMA scanner, which
    /// samples hinted regions without preferring recently accessed pages.
    #[arg(long, default_value = "normal", value_parser = parse_access_hint)]
    pub access_hint: guest_mem::AccessHint,
    /// Track dirty pages with this backend, one round per pass: kvm-bitmap,
    /// kvm-ring, uffd-wp, uffd-async or soft-dirty.
    #[arg(long, value_parser = parse_tracker)]
    pub track: Option<TrackerKind>,
    /// Snapshot flags.
    #[command(flatten)]
    pub snap: SnapshotArgs,
    /// The block device's backing file for the io workload (created if
    /// missing, sized to one 4 KiB block per page of every vCPU; default:
    /// an unnamed temporary file).
    #[arg(long)]
    pub block_file: Option<PathBuf>,
    /// Inject memory errors: the page holding each guest-physical address
    /// (hex such as 0x3000000, or a size such as 48M) is poisoned before the
    /// guest starts, comma-separated. A guest touching one stops with a
    /// memory error naming it; snapshots, clones and forks keep the marks.
    /// Pages of the work area and above (from 4 MiB) only: the layout below
    /// is written at boot. Needs --backing memfd or anon.
    #[arg(long, value_name = "GPA,...", value_delimiter = ',', value_parser = gpa_arg)]
    pub poison: Vec<u64>,
    /// Give the guest read-only memory (a ROM) holding this file (at most
    /// 16 MiB, rounded up to pages) at the top of --mem, below which its
    /// RAM lies. The guest reads it; its writes there are refused (logged,
    /// counted, and readable by the guest), and so are device writes into
    /// it. The guest checks the ROM's content at boot and in every verify.
    #[arg(long, value_name = "FILE")]
    pub rom: Option<PathBuf>,
    /// Share this file with the guest: mapped shared (not copy-on-write)
    /// into the top of --mem below the ROM, all of it (a multiple of 4 KiB,
    /// 8 KiB to 1 GiB); the guest's and the block device's writes reach the
    /// file at once. Snapshots record the file, not its content: forks map
    /// the same file again, restores and clones the one their own
    /// --shared-mem names.
    #[arg(long, value_name = "FILE")]
    pub shared_mem: Option<PathBuf>,
    /// Fork flags.
    #[command(flatten)]
    pub fork: ForkArgs,
    /// NUMA flags.
    #[command(flatten)]
    pub numa: NumaArgs,
    /// Print exactly one JSON object on stdout; serial output goes to stderr.
    #[arg(long)]
    pub json: bool,
}

/// NUMA flags of `vmm run`.
#[derive(Args, Debug, Clone)]
pub struct NumaArgs {
    /// Give the guest N NUMA nodes (1 to 8): its RAM split evenly into
    /// one region per node, its vCPUs in consecutive blocks; the guest
    /// learns the topology from its boot-info page.
    #[arg(long, conflicts_with = "numa_layout")]
    pub numa_nodes: Option<u32>,
    /// The guest's NUMA nodes one by one: SIZE[:VCPUS],... where VCPUS is
    /// a `+`-separated list of vCPUs and ranges (e.g. 64M:0+2,192M:1-3);
    /// the sizes add up to --mem.
    #[arg(long, value_parser = parse_numa_layout)]
    pub numa_layout: Option<crate::numa::topology::NodeLayout>,
    /// A host memory policy for each node's region (`mbind`): bind or
    /// preferred on the node's host node, or interleave over every host
    /// node; the report gives the policy the kernel holds and the pages
    /// per host node.
    #[arg(long, value_parser = parse_numa_policy)]
    pub numa_policy: Option<guest_mem::numa::policy::NumaPolicy>,
    /// The host node of each guest node, comma-separated (default: guest
    /// node k on host node k modulo the host's nodes). vCPU threads run on
    /// their node's host node's CPUs.
    #[arg(long, value_delimiter = ',')]
    pub numa_host_nodes: Option<Vec<u32>>,
    /// Percent of the mixed workload's reads that go to another node's
    /// vCPUs' pages (the rest to the own node's).
    #[arg(long)]
    pub numa_remote_reads: Option<u32>,
    /// Run the NUMA scanner every this many milliseconds: it samples which
    /// vCPU writes which page (write-protect windows, or the KVM dirty
    /// rings with --track kvm-ring) and moves pages to their writers' host
    /// node.
    #[arg(long)]
    pub numa_scan_ms: Option<u64>,
    /// Run the scanner on this many simulated host nodes instead of the
    /// host's (for hosts with one node: pages start on node 0, and a move
    /// changes only the page's recorded node).
    #[arg(long, requires = "numa_scan_ms", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub numa_scan_simulated_nodes: Option<u32>,
}

impl NumaArgs {
    /// The NUMA settings these flags describe (not yet validated).
    pub fn to_config(&self) -> crate::numa::NumaConfig {
        use crate::numa::topology::NumaSpec;
        crate::numa::NumaConfig {
            spec: match (&self.numa_layout, self.numa_nodes) {
                (Some(l), _) => Some(NumaSpec::Layout(l.0.clone())),
                (None, Some(n)) => Some(NumaSpec::Nodes(n)),
                (None, None) => None,
            },
            policy: self.numa_policy,
            host_nodes: self.numa_host_nodes.clone(),
            remote_reads: self.numa_remote_reads,
            scan_ms: self.numa_scan_ms,
            scan_simulated_nodes: self.numa_scan_simulated_nodes,
            recorded_host_nodes: None,
        }
    }
}

fn parse_numa_layout(s: &str) -> Result<crate::numa::topology::NodeLayout, String> {
    crate::numa::topology::parse_layout(s)
        .map(crate::numa::topology::NodeLayout)
        .map_err(|e| e.to_string())
}

/// Fork flags shared by `vmm run` and `vmm restore`.
#[derive(Args, Debug, Clone)]
pub struct ForkArgs {
    /// Fork the running VM once the guest has made this many page stores
    /// (all vCPUs; 0: once every vCPU has started, an idle guest once it
    /// waits): children share its memory copy-on-write and run on.
    #[arg(long, requires = "forks")]
    pub fork_after_pages: Option<u64>,
    /// How many children the fork makes (1 to 64); each uses its own seed
    /// from its next pass.
    #[arg(long, requires = "fork_after_pages", value_parser = clap::value_parser!(u32).range(1..=crate::fork::MAX_FORKS as i64))]
    pub forks: Option<u32>,
    /// Child i of the fork uses seed S+i from its next pass.
    #[arg(long, default_value_t = 1000)]
    pub fork_seed_base: u64,
}

impl RunArgs {
    /// The VM configuration these flags describe (not yet validated; the
    /// ROM and shared files are sized here).
    pub fn to_config(&self) -> Result<VmConfig, crate::config::ConfigError> {
        let rom = self
            .rom
            .as_deref()
            .map(crate::devices::rom::rom_for_file)
            .transpose()
            .map_err(|e| crate::config::ConfigError::Rom(e.to_string()))?
            .unwrap_or_default();
        let shared_mem = self
            .shared_mem
            .as_deref()
            .map(crate::devices::shared_mem::shared_for_file)
            .transpose()
            .map_err(|e| crate::config::ConfigError::SharedMem(e.to_string()))?
            .unwrap_or_default();
        Ok(VmConfig {
            mem_bytes: self.mem,
            vcpus: self.vcpus,
            workload: self.workload,
            pages: self.pages,
            passes: self.passes,
            seed: self.seed,
            write_ratio: self.write_ratio,
            kernel: self
                .kernel
                .clone()
                .map_or(KernelSource::Embedded, KernelSource::File),
            verify_at_end: !self.no_verify,
            stop_after: self.stop_after_ms.map(Duration::from_millis),
            ram: RamConfig {
                backing: self.backing,
                thp: self.thp,
                fault_around_pages: self.fault_around,
                wp_async: self.track.is_some_and(TrackerKind::needs_wp_async),
                hint: self.access_hint,
                ..RamConfig::default()
            },
            round_per_pass: self.track.is_some(),
            track: self.track,
            disk: self
                .block_file
                .clone()
                .map_or_else(Default::default, crate::devices::block::DiskSource::File),
            numa: self.numa.to_config(),
            poison: self.poison.clone(),
            rom,
            shared_mem,
        })
    }
}

/// A guest-physical address: hex (`0x...`) or a size (`48M`).
fn gpa_arg(s: &str) -> Result<u64, String> {
    match s
        .trim()
        .strip_prefix("0x")
        .or_else(|| s.trim().strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16)
            .map_err(|_| format!("{s:?} is not a hex guest-physical address")),
        None => size_arg(s),
    }
}

/// Runs `vmm run` and returns the exit code.
pub fn cmd_run(args: &RunArgs) -> i32 {
    let sink = if args.json {
        SerialSink::Stderr
    } else {
        SerialSink::Stdout
    };
    let hooks = match snapshot_hooks(&args.snap, args.backing, args.track, None)
        .and_then(|h| fork_hooks(&args.fork, args.backing, args.track, h))
    {
        Ok(h) => h,
        Err(e) => return finish(Err(e), args.json),
    };
    let config = match args.to_config() {
        Ok(c) => c,
        Err(e) => return finish(Err(e.into()), args.json),
    };
    let result = run(&config, hooks, sink).map(|mut r| {
        check_snapshot_taken(&args.snap, &mut r);
        check_fork_made(&args.fork, &mut r);
        (r, None)
    });
    finish(result, args.json)
}

/// Prints a run's report (with an extra `restore` object) or its error and
/// returns the exit code.
fn finish(result: Result<(RunReport, Option<RestoreReport>), RunError>, json: bool) -> i32 {
    match result {
        Ok((report, restore)) => {
            if json {
                let mut v = match serde_json::to_value(&report) {
                    Ok(v) => v,
                    Err(e) => {
                        eprintln!("vmm: cannot encode the report: {e}");
                        return EXIT_ERROR;
                    }
                };
                if let (Some(r), Some(obj)) = (&restore, v.as_object_mut()) {
                    obj.insert(
                        "restore".into(),
                        serde_json::to_value(r).unwrap_or_default(),
                    );
                }
                println!("{v}");
            } else {
                if let Some(r) = &restore {
                    println!(
                        "vmm: restored snapshot {} ({} mode): {} pages loaded in {:.2} ms",
                        r.snapshot_id,
                        r.mode,
                        r.pages_loaded,
                        r.load_us as f64 / 1000.0
                    );
                }
                print!("{}", report.human_summary());
            }
            report.exit_code()
        }
        Err(e) => {
            if json {
                println!("{}", error_json(e.kind(), &e.to_string()));
            }
            eprintln!("vmm: error: {e}");
            e.exit_code()
        }
    }
}

/// Runs `vmm restore` and returns the exit code.
pub fn cmd_restore(args: &RestoreArgs) -> i32 {
    let sink = if args.json {
        SerialSink::Stderr
    } else {
        SerialSink::Stdout
    };
    let opts = RestoreOptions {
        mode: args.mode,
        verify: args.verify,
        shared_mem: args.shared_mem.clone(),
    };
    // The restored machine's backing decides whether a live snapshot can
    // run; the restore refuses it later if not, with the same message.
    let hooks = match snapshot_hooks(&args.snap, BackingKind::Memfd, None, Some(&args.dir))
        .and_then(|h| fork_hooks(&args.fork, BackingKind::Memfd, None, h))
    {
        Ok(h) => h,
        Err(e) => return finish(Err(e), args.json),
    };
    finish(
        restore(&args.dir, &opts, hooks, sink).map(|(mut r, rr)| {
            check_snapshot_taken(&args.snap, &mut r);
            check_fork_made(&args.fork, &mut r);
            (r, Some(rr))
        }),
        args.json,
    )
}

/// Parses `args` and runs the command; returns the process exit code.
pub fn main(args: impl IntoIterator<Item = OsString>) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    match cli.command {
        CliCommand::Run(args) => cmd_run(&args),
        CliCommand::Restore(args) => cmd_restore(&args),
        CliCommand::Inspect(args) => crate::snapshot::inspect::main(&args.dir, args.json),
        CliCommand::Clone(args) => cmd_clone(&args),
        CliCommand::Bench(BenchCommand::Boot(args)) => bench::boot::main(&args),
        CliCommand::Bench(BenchCommand::Faults(args)) => bench::faults::main(&args),
        CliCommand::Bench(BenchCommand::Dirty(args)) => bench::dirty::main(&args),
        CliCommand::Bench(BenchCommand::Snapshot(args)) => bench::snapshot::main(&args),
        CliCommand::Bench(BenchCommand::Restore(args)) => bench::restore::restore_main(&args),
        CliCommand::Bench(BenchCommand::Clone(args)) => bench::clone::main(&args),
        CliCommand::Bench(BenchCommand::Numa(args)) => bench::numa::main(&args),
    }
}
