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
    /// A run hook (e.g. a snapshot trigger) failed.
    HookFailed,
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
    /// Microseconds from the first vCPU's boot event to the last vCPU's end.
    pub workload_us: Option<u64>,
    /// True when Ctrl-C or SIGTERM ended the run early.
    pub interrupted: bool,
    /// Per-vCPU details.
    pub vcpu_reports: Vec<VcpuReport>,
    /// Serial lines, when the caller asked to capture them.
    #[serde(skip)]
    pub serial: Vec<String>,
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
            serde_json::to_value(self.status)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
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
