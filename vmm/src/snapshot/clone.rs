//! `vmm clone DIR --count N`: N VMs started from one snapshot, in this
//! process, sharing the snapshot's memory copy-on-write.
//!
//! Every clone maps the same image privately (`memory.bin`, or a diff
//! chain materialized once into a memfd): a page stays the page cache's,
//! shared by all clones, until a clone writes it; then the kernel gives
//! that clone its own copy. One process holds all clones (why: see
//! `docs/snapshot-format.md`, "Clones").

use super::chain::Chain;
use super::restore::{check_host_cpu, config_of, machine_from_state, MappableImage};
use super::SnapshotError;
use crate::report::{severity, status_name, RunStatus, VmOutcome, EXIT_OK};
use crate::runner::{Machine, RunError, RunHooks};
use crate::vm_set::{build_set, SetStart, StartedVm};
use crate::vstate::vm::open_kvm;
use guest_mem::GuestRam;
use guest_protocol::CommandOp;
use serde::Serialize;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Most clones one command starts.
pub const MAX_CLONES: u32 = 256;

/// How clones get the snapshot's memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CloneMode {
    /// Map the image privately (a diff chain materialized first); the
    /// kernel shares its page cache.
    #[default]
    Mmap,
    /// Serve missing pages from the snapshot through the fault engine
    /// (chunk checksums checked on first use, once for all clones) into a
    /// page cache the clones share: the first clone to touch a page fills
    /// it, the others map it (minor faults, `UFFDIO_CONTINUE`).
    Uffd,
}

/// Clone options.
#[derive(Clone, Debug, Default)]
pub struct CloneOptions {
    /// How many VMs.
    pub count: u32,
    /// How memory comes to them.
    pub mode: CloneMode,
    /// Clone `i` runs with seed `seed_base + i` from its next pass.
    pub seed_base: Option<u64>,
    /// Tests: make the setup of this clone fail after its memory is mapped
    /// (an injected mapping failure, rule 7).
    pub fail_setup_at: Option<u32>,
    /// The file every clone maps as the memory the snapshot's guest shared
    /// with the host, for a snapshot of a guest that had some.
    pub shared_mem: Option<std::path::PathBuf>,
}

/// One clone's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct CloneVm {
    /// Its index.
    pub index: u32,
    /// Its seed from its next pass, when given one.
    pub seed: Option<u64>,
    /// How it ended and what it shares.
    #[serde(flatten)]
    pub outcome: VmOutcome,
    /// µs from the start of the command to its first I/O exit (clones
    /// start together once all are built, so this includes the building
    /// of the whole set).
    pub first_io_us: Option<u64>,
    /// µs to set it up (map memory, create the VM and vCPUs).
    pub setup_us: u64,
    /// vCPU 0's seed history from its state page at the end: (first pass,
    /// seed), showing the seed it was given took effect.
    pub seed_history: Vec<(u64, u64)>,
}

/// The process's memory, as clones add to it.
#[derive(Clone, Debug, Serialize)]
pub struct CloneMemory {
    /// Process PSS before any clone was set up.
    pub pss_before_bytes: u64,
    /// Process PSS with every clone set up, before any ran.
    pub pss_ready_bytes: u64,
    /// Process PSS after every clone ended (their memory still mapped).
    pub pss_end_bytes: u64,
    /// The fixed cost of one clone before it runs: (ready - before) / count
    /// (its table, vCPU and VMM structures, KVM's shared run page).
    pub per_vm_overhead_bytes: u64,
    /// What each clone cost beyond its own pages while it ran: (growth -
    /// exclusive) / count (thread stacks, table pages, buffers and, in
    /// `uffd` mode, its share of the page cache the clones share).
    pub per_vm_running_overhead_bytes: u64,
    /// PSS growth while the clones ran.
    pub growth_bytes: u64,
    /// Σ the clones' exclusive pages, in bytes: what their writes cost.
    pub exclusive_bytes: u64,
    /// Σ the clones' shared pages, in bytes (each counted in every clone
    /// that maps it; PSS counts it once).
    pub shared_mapped_bytes: u64,
}

/// What `vmm clone` did.
#[derive(Clone, Debug, Serialize)]
pub struct CloneReport {
    /// `ok`, or the worst clone's status.
    pub status: String,
    /// The snapshot id.
    pub snapshot_id: String,
    /// How the image is mapped.
    pub memory: String,
    /// Each clone.
    pub clones: Vec<CloneVm>,
    /// The process's memory.
    pub accounting: CloneMemory,
}

impl CloneReport {
    /// The exit code: 0 when every clone is ok, 3 when the worst is a
    /// verify mismatch, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        self.clones
            .iter()
            .map(|c| c.outcome.exit_code)
            .max_by_key(|c| severity(*c))
            .unwrap_or(EXIT_OK)
    }

    /// A few lines for people.
    pub fn human_summary(&self) -> String {
        use std::fmt::Write;
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "vmm: {} clones of snapshot {} ({}): {}",
            self.clones.len(),
            self.snapshot_id,
            self.memory,
            self.status
        );
        for c in &self.clones {
            let o = &c.outcome;
            let _ = writeln!(
                out,
                "  clone {:>3}: {:<16} {} page stores, verify {} (host {}), {} shared + {} exclusive pages, set up in {:.2} ms{}",
                c.index,
                o.status,
                o.pages_written,
                o.verify_mismatches.map_or("-".into(), |v| v.to_string()),
                o.host_verify_mismatches.map_or("-".into(), |v| v.to_string()),
                o.shared_pages,
                o.exclusive_pages,
                c.setup_us as f64 / 1000.0,
                o.error.as_ref().map_or(String::new(), |e| format!(": {e}"))
            );
        }
        let a = &self.accounting;
        let _ = writeln!(
            out,
            "  process PSS {:.1} MiB before, {:.1} MiB set up ({:.2} MiB per clone), {:.1} MiB at the end: \
             grew {:.1} MiB = the clones' own pages ({:.1} MiB) + {:.0} KiB per clone",
            mib(a.pss_before_bytes),
            mib(a.pss_ready_bytes),
            mib(a.per_vm_overhead_bytes),
            mib(a.pss_end_bytes),
            mib(a.growth_bytes),
            mib(a.exclusive_bytes),
            a.per_vm_running_overhead_bytes as f64 / 1024.0
        );
        out
    }
}

/// The process's proportional set size (`/proc/self/smaps_rollup`): shared
/// pages count once in total, however many clones map them.
pub fn process_pss_bytes() -> Result<u64, RunError> {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup")
        .map_err(|e| RunError::Runtime(format!("/proc/self/smaps_rollup: {e}")))?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| RunError::Runtime("/proc/self/smaps_rollup has no Pss line".into()))
}

/// Where the clones' memory comes from.
enum CloneMemorySource {
    /// The image they all map privately.
    Image(MappableImage),
    /// The page cache they share, and the snapshot that fills it.
    Cache(super::memory::MemoryFile, Arc<super::chain::ChainSource>),
}

/// A uffd-mode clone's memory: a private mapping of the shared cache,
/// whose missing pages the fault engine fills from `source`; the execution
/// chunks are brought in before it runs.
fn shared_cache_ram(
    chain: &Chain,
    config: &crate::config::VmConfig,
    cache: &super::memory::MemoryFile,
    source: &Arc<super::chain::ChainSource>,
) -> Result<GuestRam, RunError> {
    let file = cache.file();
    let mut ram = GuestRam::from_file_private(config.mem_bytes, config.ram, file)?;
    crate::numa::split(config, &mut ram)?;
    let dup = file
        .try_clone()
        .map_err(|e| RunError::Runtime(format!("sharing the page cache: {e}")))?;
    ram.set_shared_cache(dup)?;
    ram.set_page_source(source.clone())?;
    super::prefetch::prefetch_execution(&ram, chain)?;
    Ok(ram)
}

/// A clone set up, not yet running.
struct Prepared {
    machine: Machine,
    setup_us: u64,
}

/// Starts `opts.count` VMs from the snapshot in `dir`, runs each to the end
/// of its workload, and reports. Setting up is all or nothing: a clone that
/// fails stops and drops every clone built so far before any runs guest
/// code (rule 7).
pub fn clone_vms(dir: &Path, opts: &CloneOptions) -> Result<CloneReport, RunError> {
    if opts.count == 0 || opts.count > MAX_CLONES {
        return Err(RunError::Runtime(format!(
            "--count must be 1 to {MAX_CLONES}, not {}",
            opts.count
        )));
    }
    let begin = Instant::now();
    let chain = Arc::new(Chain::open(dir)?);
    let state = &chain.head().state;
    let mut config = config_of(state, opts.shared_mem.as_deref())?;
    config.disk = super::restore::disk_of(state, dir)?;
    let kvm = open_kvm()?;
    check_host_cpu(&kvm, state)?;
    // mmap mode: one image every clone maps; uffd mode: the page cache the
    // clones share, empty at first, and one page source (its chunk checks
    // count for every clone).
    let memory = match opts.mode {
        CloneMode::Mmap => CloneMemorySource::Image(MappableImage::of(&chain, dir)?),
        CloneMode::Uffd => CloneMemorySource::Cache(
            super::memory::MemoryFile::new_memfd(config.mem_bytes).map_err(SnapshotError::from)?,
            Arc::new(super::chain::ChainSource::new(chain.clone())),
        ),
    };
    match &memory {
        CloneMemorySource::Image(image) => image.configure(&mut config),
        CloneMemorySource::Cache(..) => {
            config.ram.backing = guest_mem::BackingKind::Memfd;
            config.ram.shared_cache = true;
        }
    }
    let memory_note = match &memory {
        CloneMemorySource::Image(i) => i.note.clone(),
        CloneMemorySource::Cache(..) => {
            "served from the snapshot through the fault engine into a page cache the clones share \
                 (minor faults map what another clone brought in)"
                .into()
        }
    };
    let pss_before = process_pss_bytes()?;
    // Built on as many threads as the host has CPUs, started together
    // once all are built (`vm_set`); a clone that fails leaves none of
    // them (rule 7).
    let corrupt: Arc<Mutex<Option<String>>> = Arc::default();
    let build = |i: u32| -> Result<Prepared, RunError> {
        let t = Instant::now();
        let ram = match &memory {
            CloneMemorySource::Image(image) => image.map_configured(&chain, &config)?,
            CloneMemorySource::Cache(cache, source) => {
                shared_cache_ram(&chain, &config, cache, source)?
            }
        };
        if opts.fail_setup_at == Some(i) {
            return Err(RunError::Runtime(format!(
                "clone {i}: injected failure after mapping its memory"
            )));
        }
        let machine = machine_from_state(&kvm, state, &config, Arc::new(ram))?;
        Ok(Prepared {
            machine,
            setup_us: t.elapsed().as_micros() as u64,
        })
    };
    let set = SetStart {
        thread_name: "clone",
        label: "clone",
        config: &config,
        since: begin,
    };
    let seed = |i: u32| opts.seed_base.map(|b| b.wrapping_add(i as u64));
    let (runs, gate) = build_set(
        opts.count,
        build,
        |i, p: Prepared, gate| {
            let hooks = RunHooks::default().fail_on(corrupt.clone());
            let initial = seed(i).map(|s| (CommandOp::SetSeed, s));
            set.start(i, p.machine, p.setup_us, hooks, gate, initial)
        },
        StartedVm::discard,
    )?;
    // The image's checksums, once for all clones, in the background: a bad
    // chunk stops every clone. The PSS is measured once every clone is
    // built, before any runs. Either failing stops the clones unrun.
    let ready = process_pss_bytes().and_then(|pss| {
        let (slot, chain) = (corrupt.clone(), chain.clone());
        std::thread::Builder::new()
            .name("verify".into())
            .spawn(move || {
                super::prefetch::lower_priority();
                if let Err(e) = chain.verify() {
                    if let Ok(mut s) = slot.lock() {
                        *s = Some(format!("snapshot {e}"));
                    }
                }
            })
            .map(|verifier| (pss, verifier))
            .map_err(|e| RunError::Runtime(format!("cannot start the verifier: {e}")))
    });
    let (pss_ready, verifier) = match ready {
        Ok(r) => r,
        Err(e) => {
            drop(gate);
            runs.into_iter().for_each(StartedVm::discard);
            return Err(e);
        }
    };
    gate.open();

    let mut clones = Vec::with_capacity(runs.len());
    let mut rams: Vec<Arc<GuestRam>> = Vec::with_capacity(runs.len());
    for c in runs {
        let c = c.wait();
        clones.push(CloneVm {
            index: c.index,
            seed: seed(c.index),
            first_io_us: c.first_io_us,
            setup_us: c.setup_us,
            seed_history: crate::oracle::seed_history(c.ram.as_ref(), 0).unwrap_or_default(),
            outcome: c.outcome,
        });
        rams.push(c.ram);
    }
    let _ = verifier.join();
    let corrupt = corrupt.lock().ok().and_then(|s| s.clone());
    if let Some(e) = &corrupt {
        for c in &mut clones {
            c.outcome.status = status_name(RunStatus::SnapshotCorrupt);
            c.outcome.exit_code = RunStatus::SnapshotCorrupt.exit_code();
            c.outcome.error.get_or_insert_with(|| e.clone());
        }
    }
    // Measured while every clone's memory is still mapped.
    let pss_end = process_pss_bytes()?;
    drop(rams);
    let status = clones
        .iter()
        .max_by_key(|c| severity(c.outcome.exit_code))
        .map_or_else(|| status_name(RunStatus::Ok), |c| c.outcome.status.clone());
    let exclusive: u64 = clones.iter().map(|c| c.outcome.exclusive_pages).sum();
    let shared: u64 = clones.iter().map(|c| c.outcome.shared_pages).sum();
    Ok(CloneReport {
        status,
        snapshot_id: uuid::Uuid::from_bytes(state.id).to_string(),
        memory: memory_note,
        clones,
        accounting: CloneMemory {
            pss_before_bytes: pss_before,
            pss_ready_bytes: pss_ready,
            pss_end_bytes: pss_end,
            per_vm_overhead_bytes: pss_ready.saturating_sub(pss_before) / opts.count as u64,
            per_vm_running_overhead_bytes: pss_end
                .saturating_sub(pss_ready)
                .saturating_sub(exclusive * 4096)
                / opts.count as u64,
            growth_bytes: pss_end.saturating_sub(pss_ready),
            exclusive_bytes: exclusive * 4096,
            shared_mapped_bytes: shared * 4096,
        },
    })
}
