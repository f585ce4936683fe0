//! What a run produced: the report printed for people or as one JSON object,
//! and the process exit code.

use crate::size::format_size;
use serde::Serialize;

/// Exit code: success.
pub const EXIT_OK: i32 = 0;
/// Exit code: a VMM or guest failure.
pub const EXIT_ERROR: i32 = 1;
/// Exit code: invalid usage.
pub const EXIT_USAGE: i32 = 2;
/// Exit code: the oracle found mismatching pages.
pub const EXIT_MISMATCH: i32 = 3;

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Every vCPU finished and nothing mismatched.
    Ok,
    /// The oracle found pages that differ.
    VerifyMismatch,
    /// The guest kernel panicked.
    GuestPanic,
    /// A vCPU failed (triple fault, emulation error, bad exit).
    VcpuFault,
    /// The guest broke the control protocol.
    ProtocolError,
    /// A run hook (e.g. a snapshot trigger) or dirty tracking failed.
    HookFailed,
    /// The dirty tracker missed pages the guest wrote.
    TrackingMissedWrites,
    /// A snapshot could not be written (the guest ran on).
    SnapshotFailed,
    /// Guest memory could not be served (poisoned: a failed checksum or read).
    MemoryError,
    /// The snapshot being run failed its checksums (found in the background).
    SnapshotCorrupt,
}

impl RunStatus {
    /// The process exit code for this status.
    pub fn exit_code(self) -> i32 {
        match self {
            RunStatus::Ok => EXIT_OK,
            RunStatus::VerifyMismatch => EXIT_MISMATCH,
            _ => EXIT_ERROR,
        }
    }
}

/// One vCPU's part of the report.
#[derive(Clone, Debug, Serialize)]
pub struct VcpuReport {
    /// The vCPU index.
    pub vcpu: u32,
    /// How it ended (`done`, `halted`, `stopped`, `panicked`, `fault`).
    pub outcome: String,
    /// Page stores it made.
    pub pages_written: u64,
    /// Its last guest-side verify result.
    pub verify_mismatches: Option<u64>,
}

/// Fault counts by kind.
#[derive(Clone, Debug, Serialize)]
pub struct FaultsReport {
    /// Missing faults (read and write).
    pub missing: u64,
    /// Missing faults on reads.
    pub missing_read: u64,
    /// Missing faults on writes.
    pub missing_write: u64,
    /// Write-protect faults.
    pub wp: u64,
    /// Minor faults.
    pub minor: u64,
}

/// Region lookups on the fault path (rule 2).
#[derive(Clone, Debug, Serialize)]
pub struct LockReport {
    /// Faults served under the region lock only.
    pub fast_path: u64,
    /// Lookups retried because the region changed.
    pub retries: u64,
    /// Faults that fell back to the global lock.
    pub fallbacks: u64,
}

/// One region in the memory report.
#[derive(Clone, Debug, Serialize)]
pub struct RegionReport {
    /// First guest-physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// vCPUs that faulted on it (bit = vCPU id % 64).
    pub accessors: u64,
    /// Its access hint (`normal`, `sequential`, `random`).
    pub hint: &'static str,
    /// The guest may not write it (a ROM, `--rom`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// Shared with the host, not copy-on-write (`--shared-mem`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
}

/// The `"memory"` object of a run report.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryReport {
    /// `memfd`, `anon` or `plain`.
    pub backing: String,
    /// Pages populated.
    pub populated_pages: u64,
    /// Faults by kind.
    pub faults: FaultsReport,
    /// Pages populated by fault-around (neighbours of faulting pages).
    pub fault_around_pages: u64,
    /// The fault-around window, in pages.
    pub fault_around_window: u64,
    /// Bytes of the page table.
    pub table_bytes: u64,
    /// Fault-path locking counters.
    pub locking: LockReport,
    /// Faults that found their page already resolved.
    pub races: u64,
    /// Handler latency histogram: entry i counts faults served in [2^i, 2^(i+1)) µs.
    pub handler_latency_us_log2: Vec<u64>,
    /// THP asked for.
    pub thp_requested: bool,
    /// Bytes backed by huge pages (when asked for).
    pub thp_bytes: Option<u64>,
    /// The regions.
    pub regions: Vec<RegionReport>,
    /// Poisoned pages (guest-physical addresses), if any.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub poisoned_pages: Vec<u64>,
}

impl From<&guest_mem::MemoryStats> for MemoryReport {
    fn from(m: &guest_mem::MemoryStats) -> Self {
        let f = &m.faults;
        MemoryReport {
            backing: m.backing.name().to_string(),
            populated_pages: m.populated_pages,
            faults: FaultsReport {
                missing: f.missing(),
                missing_read: f.missing_read,
                missing_write: f.missing_write,
                wp: f.wp,
                minor: f.minor,
            },
            fault_around_pages: f.fault_around_pages,
            fault_around_window: m.fault_around_pages,
            table_bytes: m.table_bytes,
            locking: LockReport {
                fast_path: f.fast_path,
                retries: f.retries,
                fallbacks: f.fallbacks,
            },
            races: f.races,
            handler_latency_us_log2: f.latency_us_log2.clone(),
            thp_requested: m.thp_requested,
            thp_bytes: m.thp_bytes,
            regions: m
                .regions
                .iter()
                .map(|r| RegionReport {
                    gpa: r.gpa,
                    size: r.size,
                    accessors: r.accessors,
                    hint: r.hint.name(),
                    read_only: r.read_only,
                    shared: r.shared,
                })
                .collect(),
            poisoned_pages: m.poisoned_pages.clone(),
        }
    }
}

/// The result of `vmm run`.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// How the run ended.
    pub status: RunStatus,
    /// The error message when the status is not ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM bytes.
    pub mem_bytes: u64,
    /// Workload name.
    pub workload: String,
    /// Pages per vCPU.
    pub pages: u64,
    /// Passes.
    pub passes: u64,
    /// Page stores by all vCPUs.
    pub pages_written: u64,
    /// Mismatches the guest's own oracle reported (summed over vCPUs); null
    /// when no guest verify ran.
    pub verify_mismatches: Option<u64>,
    /// Mismatches the host-side oracle found in guest RAM after the run;
    /// null for kernels that do not speak the protocol.
    pub host_verify_mismatches: Option<u64>,
    /// Microseconds from `KVM_CREATE_VM` to the guest's first I/O exit.
    pub boot_us: Option<u64>,
    /// Microseconds from `KVM_CREATE_VM` to the first `KVM_RUN` (the rest
    /// of `boot_us` is the guest's own time, emulated on hosts without
    /// hardware virtualization).
    pub first_run_us: Option<u64>,
    /// Microseconds from the first vCPU's boot event to the last vCPU's end.
    pub workload_us: Option<u64>,
    /// True when Ctrl-C or SIGTERM ended the run early.
    pub interrupted: bool,
    /// Per-vCPU details.
    pub vcpu_reports: Vec<VcpuReport>,
    /// Guest memory: backing, population, faults, table size.
    pub memory: MemoryReport,
    /// Dirty tracking (with `--track`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracking: Option<crate::dirty::TrackingReport>,
    /// Snapshots taken during the run.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<crate::snapshot::writer::SnapshotReport>,
    /// NUMA placement and the scanner (with `--numa-*`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub numa: Option<crate::numa::placement::NumaReport>,
    /// The block device's work (`io` workload).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block: Option<crate::devices::block::BlockStats>,
    /// The ROM (`--rom`): where, refused writes, the guest's own check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rom: Option<crate::devices::rom::RomReport>,
    /// Memory shared with the host (`--shared-mem`): where, the guest's
    /// own check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_mem: Option<crate::devices::shared_mem::SharedMemReport>,
    /// Forks made during the run, with their children's outcomes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub forks: Vec<crate::fork::ForkReport>,
    /// Serial lines, when the caller asked to capture them.
    #[serde(skip)]
    pub serial: Vec<String>,
}

/// How one VM of a clone set or a fork ended, and what of its memory it
/// shares (serialized flat into the clone's or child's object).
#[derive(Clone, Debug, Serialize)]
pub struct VmOutcome {
    /// How its run ended (a run status, or the error kind of a run that
    /// could not go on).
    pub status: String,
    /// Its exit code alone (0, 3 or 1).
    pub exit_code: i32,
    /// What went wrong, if anything.
    pub error: Option<String>,
    /// Page stores (all its vCPUs), counted from the first boot.
    pub pages_written: u64,
    /// The guest's verify.
    pub verify_mismatches: Option<u64>,
    /// The VMM's verify of its memory.
    pub host_verify_mismatches: Option<u64>,
    /// Mapped guest pages it still shares (with an image, other clones, a
    /// fork's other side).
    pub shared_pages: u64,
    /// Guest pages that are its own.
    pub exclusive_pages: u64,
    /// Pages mapped to the host's shared zero page (read, never written).
    pub zero_pages: u64,
    /// Its poisoned pages (rule 12: markers survive clones and forks).
    pub poisoned_pages: Vec<u64>,
    /// With memory shared with the host: the word its last verify read
    /// from the shared memory's third page (it maps the host's file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_seen: Option<u64>,
    /// µs from its machine's creation to its first I/O exit.
    #[serde(skip)]
    pub boot_us: Option<u64>,
    /// µs from its machine's creation to its first `KVM_RUN`.
    #[serde(skip)]
    pub first_run_us: Option<u64>,
}

impl VmOutcome {
    /// The outcome of a VM's run (`result`), its memory `ram` still mapped.
    pub fn of(
        result: Result<RunReport, crate::runner::RunError>,
        ram: &guest_mem::GuestRam,
    ) -> VmOutcome {
        let sharing = ram.refresh_sharing().unwrap_or_default();
        let mut o = VmOutcome {
            status: status_name(RunStatus::Ok),
            exit_code: EXIT_OK,
            error: None,
            pages_written: 0,
            verify_mismatches: None,
            host_verify_mismatches: None,
            shared_pages: sharing.shared_pages,
            exclusive_pages: sharing.exclusive_pages,
            zero_pages: sharing.zero_pages,
            poisoned_pages: ram.poisoned_pages(),
            shared_seen: None,
            boot_us: None,
            first_run_us: None,
        };
        match result {
            Ok(r) => {
                o.status = status_name(r.status);
                o.exit_code = r.exit_code();
                o.error = r.error;
                o.pages_written = r.pages_written;
                o.verify_mismatches = r.verify_mismatches;
                o.host_verify_mismatches = r.host_verify_mismatches;
                o.boot_us = r.boot_us;
                o.first_run_us = r.first_run_us;
                o.shared_seen = r.shared_mem.and_then(|s| s.seen_at_verify);
            }
            Err(e) => {
                o.status = e.kind().into();
                o.exit_code = e.exit_code();
                o.error = Some(e.to_string());
            }
        }
        o
    }
}

/// A run status as the JSON spells it.
pub fn status_name(s: RunStatus) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{s:?}"))
}

/// Orders exit codes by how bad they are: ok < mismatch < error.
pub fn severity(code: i32) -> u8 {
    match code {
        EXIT_OK => 0,
        EXIT_MISMATCH => 1,
        _ => 2,
    }
}

impl RunReport {
    /// The process exit code.
    pub fn exit_code(&self) -> i32 {
        self.status.exit_code()
    }

    /// A few lines for people.
    pub fn human_summary(&self) -> String {
        let opt = |v: Option<u64>| v.map_or("n/a".to_string(), |v| v.to_string());
        let ms = |v: Option<u64>| {
            v.map_or("n/a".to_string(), |v| {
                format!("{:.2} ms", v as f64 / 1000.0)
            })
        };
        let mut s = format!(
            "vmm: {} — {} vCPU(s), {}, {} {} pages x {} passes{}\n",
            status_name(self.status),
            self.vcpus,
            format_size(self.mem_bytes),
            self.workload,
            self.pages,
            self.passes,
            if self.interrupted {
                " (interrupted)"
            } else {
                ""
            },
        );
        s += &format!(
            "  page stores {}, verify mismatches {} (guest) / {} (host)\n",
            self.pages_written,
            opt(self.verify_mismatches),
            opt(self.host_verify_mismatches)
        );
        s += &format!(
            "  boot {}, workload {}\n",
            ms(self.boot_us),
            ms(self.workload_us)
        );
        let m = &self.memory;
        s += &format!(
            "  memory: {} backing, {} pages populated, {} missing faults ({} pages by fault-around of {}), table {} KiB{}\n",
            m.backing,
            m.populated_pages,
            m.faults.missing,
            m.fault_around_pages,
            m.fault_around_window,
            m.table_bytes / 1024,
            match (m.thp_requested, m.thp_bytes) {
                (true, Some(b)) => format!(", THP {}", format_size(b)),
                _ => String::new(),
            }
        );
        for f in &self.forks {
            s += &format!(
                "  fork: paused {:.3} ms; parent {} shared + {} exclusive pages; process PSS {}\n",
                f.pause_us as f64 / 1000.0,
                f.parent_shared_pages,
                f.parent_exclusive_pages,
                format_size(f.pss_end_bytes)
            );
            for c in &f.children {
                let o = &c.outcome;
                s += &format!(
                    "    child {} (seed {}): {}, verify {} / {}, {} shared + {} exclusive pages, first I/O {}\n",
                    c.index,
                    c.seed,
                    o.status,
                    opt(o.verify_mismatches),
                    opt(o.host_verify_mismatches),
                    o.shared_pages,
                    o.exclusive_pages,
                    ms(c.first_io_us)
                );
            }
        }
        if let Some(e) = &self.error {
            s += &format!("  error: {e}\n");
        }
        s
    }
}

/// The JSON object printed for an error that happened before a run started.
pub fn error_json(kind: &str, message: &str) -> serde_json::Value {
    serde_json::json!({ "status": kind, "error": message })
}
