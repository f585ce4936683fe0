//! `vmm bench restore`: how long a snapshot takes to come back in each
//! mode, measured from process spawn (the parent's `CLOCK_MONOTONIC`) to
//! the child's start of the restore, its first `KVM_RUN`, its guest's first
//! I/O exit, and its exit after the guest's verify.
//!
//! Two guests per size:
//! * `waiting`: an idle guest snapshotted right after boot, the way a
//!   serverless platform snapshots a function that waits for its request.
//!   After the restore the VMM sends the request (the verify command); the
//!   guest's first I/O exit is its answer, a few instructions later.
//! * `mid-run`: a seq-write guest snapshotted in the middle of its second
//!   pass; its first I/O exit comes with its next progress report, up to 64
//!   page stores of guest time later (emulated on this host, microseconds
//!   on hardware).
//!
//! The modes take turns within each round, so drift in the host's speed
//! hits all of them alike.

use super::{median, min_median, ok_report};
use crate::clock::monotonic_ns;
use crate::report::EXIT_ERROR;
use crate::size::{format_size, sizes_arg};
use clap::Args;
use serde::Serialize;
use std::path::{Path, PathBuf};

const MODES: [&str; 3] = ["eager", "mmap", "uffd"];

/// `vmm bench restore` flags.
#[derive(Args, Debug, Clone)]
pub struct RestoreBenchArgs {
    /// Guest sizes.
    #[arg(long, default_value = "256M,2G", value_parser = sizes_arg)]
    pub sizes: Vec<Vec<u64>>,
    /// Restores per mode, guest and size.
    #[arg(long, default_value_t = 5)]
    pub runs: u32,
    /// Directory for the snapshots (default: a temporary directory; put it
    /// on tmpfs to keep the fault engine in `mmap` mode).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One mode for one guest at one size; every time is µs from process spawn.
#[derive(Debug, Serialize)]
pub struct RestoreRow {
    /// Guest RAM.
    pub mem_bytes: u64,
    /// `waiting` or `mid-run`.
    pub guest: &'static str,
    /// `eager`, `mmap` or `uffd`.
    pub mode: &'static str,
    /// Median to the start of the restore (exec, loading, argument parsing).
    pub restore_start_median_us: f64,
    /// Median to the first `KVM_RUN` (the VMM's part ends here).
    pub first_run_median_us: f64,
    /// Fastest run to the first `KVM_RUN`.
    pub first_run_min_us: f64,
    /// Median to the guest's first I/O exit.
    pub first_io_median_us: f64,
    /// Fastest run to the guest's first I/O exit.
    pub first_io_min_us: f64,
    /// Median to the process's exit after the guest's verify.
    pub verified_median_us: f64,
}

/// The samples of one mode.
#[derive(Default)]
struct Samples {
    start: Vec<f64>,
    first_run: Vec<f64>,
    first_io: Vec<f64>,
    verified: Vec<f64>,
}

/// The guests the benchmark restores: name and `vmm run` arguments.
fn guests() -> [(&'static str, &'static [&'static str]); 2] {
    [
        (
            "waiting",
            &["--workload", "idle", "--snapshot-after-pages", "0"],
        ),
        (
            "mid-run",
            &[
                "--pages",
                "1024",
                "--passes",
                "2",
                "--snapshot-after-pages",
                "1100",
            ],
        ),
    ]
}

/// Restores `dir` once in `mode` and adds the times to `s`.
fn restore_once(exe: &Path, dir: &Path, mode: &str, s: &mut Samples) -> Result<(), String> {
    let spawned = monotonic_ns();
    let out = std::process::Command::new(exe)
        .args(["restore", "--json", "--verify", "--mode", mode])
        .arg(dir)
        .output()
        .map_err(|e| format!("cannot spawn: {e}"))?;
    let exited = monotonic_ns();
    let j = ok_report(&out.stdout).map_err(|e| format!("{mode} restore failed: {e}"))?;
    let since_spawn = |key: &str| {
        j["restore"][key]
            .as_u64()
            .map(|ns| ns.saturating_sub(spawned) as f64 / 1000.0)
    };
    s.start.extend(since_spawn("started_at_ns"));
    s.first_run.extend(since_spawn("first_run_at_ns"));
    s.first_io.extend(since_spawn("first_io_at_ns"));
    s.verified
        .push(exited.saturating_sub(spawned) as f64 / 1000.0);
    Ok(())
}

/// Runs `vmm bench restore`; returns the exit code.
pub fn restore_main(args: &RestoreBenchArgs) -> i32 {
    match bench(args) {
        Ok(rows) => {
            print_rows(&rows, args.runs);
            super::write_json("restore", args.json.as_deref(), &rows)
        }
        Err(e) => {
            eprintln!("vmm bench restore: {e}");
            EXIT_ERROR
        }
    }
}

fn bench(args: &RestoreBenchArgs) -> Result<Vec<RestoreRow>, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let mut rows = Vec::new();
    for &mem in args.sizes.iter().flatten() {
        for (guest, run_args) in guests() {
            let dir = base.join(format!(
                "vmm-bench-restore-{}-{guest}-{mem}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            let take = std::process::Command::new(&exe)
                .args(["run", "--json", "--mem"])
                .arg(mem.to_string())
                .args(run_args)
                .arg("--snapshot")
                .arg(&dir)
                .output();
            if !take.as_ref().is_ok_and(|o| o.status.success()) {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(format!(
                    "taking the {guest} snapshot at {} failed",
                    format_size(mem)
                ));
            }
            let mut samples: Vec<Samples> = MODES.iter().map(|_| Samples::default()).collect();
            let mut outcome = Ok(());
            'rounds: for _ in 0..args.runs.max(1) {
                for (mode, s) in MODES.iter().zip(&mut samples) {
                    outcome = restore_once(&exe, &dir, mode, s);
                    if outcome.is_err() {
                        break 'rounds;
                    }
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
            outcome?;
            for (mode, s) in MODES.iter().zip(&samples) {
                let min = |v: &[f64]| min_median(v).map_or(0.0, |m| m.0);
                rows.push(RestoreRow {
                    mem_bytes: mem,
                    guest,
                    mode,
                    restore_start_median_us: median(&s.start),
                    first_run_median_us: median(&s.first_run),
                    first_run_min_us: min(&s.first_run),
                    first_io_median_us: median(&s.first_io),
                    first_io_min_us: min(&s.first_io),
                    verified_median_us: median(&s.verified),
                });
            }
        }
    }
    Ok(rows)
}

fn print_rows(rows: &[RestoreRow], runs: u32) {
    println!("restore (warm page cache), ms from process spawn, median (fastest) of {runs} runs:");
    println!(
        "  {:>8} {:<8} {:<6} {:>8} {:>16} {:>16} {:>10}",
        "size", "guest", "mode", "start", "first KVM_RUN", "first I/O exit", "verified"
    );
    for r in rows {
        println!(
            "  {:>8} {:<8} {:<6} {:>8.2} {:>7.2} ({:>6.2}) {:>7.2} ({:>6.2}) {:>10.1}",
            format_size(r.mem_bytes),
            r.guest,
            r.mode,
            r.restore_start_median_us / 1000.0,
            r.first_run_median_us / 1000.0,
            r.first_run_min_us / 1000.0,
            r.first_io_median_us / 1000.0,
            r.first_io_min_us / 1000.0,
            r.verified_median_us / 1000.0
        );
    }
    println!("note: guest instructions are emulated on hosts without hardware virtualization");
}
