//! `vmm bench clone`: N clones of one snapshot next to N independent eager
//! restores of it, and forks of a running VM into K children.
//!
//! Two guests, as in `vmm bench restore`: `waiting` (an idle guest
//! snapshotted at boot; each clone gets a request, a new seed, and its
//! answer is its first I/O exit) and `mid-run` (a `seq-write` guest in its
//! second pass, which goes on writing about 900 pages per clone). Each
//! measurement runs in its own `vmm` process, so its memory accounting
//! sees nothing else.

use super::{median, ok_report};
use crate::report::EXIT_ERROR;
use crate::size::{format_size, size_arg};
use clap::Args;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// `vmm bench clone` flags.
#[derive(Args, Debug, Clone)]
pub struct CloneBenchArgs {
    /// Clone counts.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    pub counts: Vec<u32>,
    /// Fork child counts.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub forks: Vec<u32>,
    /// Forks per child count (each row reports medians).
    #[arg(long, default_value_t = 3)]
    pub fork_runs: u32,
    /// Guest RAM.
    #[arg(long, default_value = "256M", value_parser = size_arg)]
    pub mem: u64,
    /// Directory for the snapshots (default: /dev/shm, a tmpfs, so the
    /// clones keep the fault engine).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// N clones of one snapshot, and N eager restores of it.
#[derive(Debug, Serialize)]
pub struct CloneRow {
    /// `waiting` or `mid-run`.
    pub guest: &'static str,
    /// `mmap` or `uffd`.
    pub mode: &'static str,
    /// Clones.
    pub count: u32,
    /// Median µs to set one clone up (map, VM, vCPUs).
    pub setup_median_us: f64,
    /// Median µs from the command's start to a clone's first I/O exit.
    pub first_io_median_us: f64,
    /// The last clone's first I/O exit, µs from the command's start.
    pub first_io_max_us: f64,
    /// Wall time of the clone command, µs.
    pub wall_us: f64,
    /// Process PSS growth while the clones ran.
    pub growth_bytes: u64,
    /// Σ the clones' own pages.
    pub exclusive_bytes: u64,
    /// PSS of the clone process when every clone ended.
    pub pss_end_bytes: u64,
    /// Wall time of N eager restores run at once, µs.
    pub eager_wall_us: f64,
    /// Σ the eager restores' PSS when their guests ended.
    pub eager_pss_total_bytes: u64,
}

/// One fork of a running VM.
#[derive(Debug, Serialize)]
pub struct ForkRow {
    /// `waiting` or `mid-run`.
    pub guest: &'static str,
    /// Children.
    pub children: u32,
    /// Median µs the parent was paused.
    pub pause_us: f64,
    /// Longest pause of the runs, µs.
    pub pause_max_us: f64,
    /// Median µs from the fork request to a child's first I/O exit.
    pub first_io_median_us: f64,
    /// The last child's first I/O exit, µs from the fork request.
    pub first_io_max_us: f64,
    /// Median µs from the fork request to a child's machine being ready.
    pub ready_median_us: f64,
    /// Median µs from the fork request to a child's first `KVM_RUN` (what
    /// follows until its first I/O exit is guest time, emulated here).
    pub first_run_median_us: f64,
    /// The last child's first `KVM_RUN`, µs from the fork request.
    pub first_run_max_us: f64,
}

/// Everything `vmm bench clone` measured.
#[derive(Debug, Serialize)]
pub struct CloneBench {
    /// Guest RAM.
    pub mem_bytes: u64,
    /// Clones and eager restores.
    pub clones: Vec<CloneRow>,
    /// Forks.
    pub forks: Vec<ForkRow>,
}

/// The guests: name, `vmm run` arguments that snapshot or fork it, and
/// the page threshold.
const GUESTS: [(&str, &[&str], &str); 2] = [
    ("waiting", &["--workload", "idle"], "0"),
    ("mid-run", &["--pages", "1024", "--passes", "2"], "1100"),
];

fn run_json(exe: &Path, args: &[String]) -> Result<serde_json::Value, String> {
    let out = std::process::Command::new(exe)
        .args(args)
        .output()
        .map_err(|e| format!("cannot spawn vmm: {e}"))?;
    ok_report(&out.stdout).map_err(|e| format!("vmm {}: {e}", args.join(" ")))
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// N eager restores at once: wall time and Σ PSS.
fn eager_restores(exe: &Path, dir: &Path, n: u32) -> Result<(f64, u64), String> {
    let start = Instant::now();
    let children: Vec<_> = (0..n)
        .map(|_| {
            std::process::Command::new(exe)
                .args(["restore", "--json", "--mode", "eager"])
                .arg(dir)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
        })
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot spawn vmm restore: {e}"))?;
    let mut pss = 0;
    for c in children {
        let out = c
            .wait_with_output()
            .map_err(|e| format!("vmm restore: {e}"))?;
        let j = ok_report(&out.stdout).map_err(|e| format!("eager restore failed: {e}"))?;
        pss += j["restore"]["pss_end_bytes"].as_u64().unwrap_or(0);
    }
    Ok((start.elapsed().as_secs_f64() * 1e6, pss))
}

/// N clones in `mode`; the eager restores are measured once per count
/// (`eager`, reused for the other mode).
fn clone_row(
    exe: &Path,
    dir: &Path,
    guest: &'static str,
    count: u32,
    mode: &'static str,
    eager: &mut Option<(f64, u64)>,
) -> Result<CloneRow, String> {
    let d = dir.to_string_lossy().into_owned();
    let start = Instant::now();
    let j = run_json(
        exe,
        &strings(&[
            "clone",
            &d,
            "--count",
            &count.to_string(),
            "--seed-base",
            "100",
            "--mode",
            mode,
            "--json",
        ]),
    )?;
    let wall_us = start.elapsed().as_secs_f64() * 1e6;
    let clones = j["clones"].as_array().cloned().unwrap_or_default();
    let setup: Vec<f64> = clones
        .iter()
        .filter_map(|c| c["setup_us"].as_f64())
        .collect();
    let first: Vec<f64> = clones
        .iter()
        .filter_map(|c| c["first_io_us"].as_f64())
        .collect();
    let a = &j["accounting"];
    let (eager_wall_us, eager_pss_total_bytes) = match eager {
        Some(e) => *e,
        None => *eager.insert(eager_restores(exe, dir, count)?),
    };
    Ok(CloneRow {
        guest,
        mode,
        count,
        setup_median_us: median(&setup),
        first_io_max_us: first.iter().copied().fold(0.0, f64::max),
        first_io_median_us: median(&first),
        wall_us,
        growth_bytes: a["growth_bytes"].as_u64().unwrap_or(0),
        exclusive_bytes: a["exclusive_bytes"].as_u64().unwrap_or(0),
        pss_end_bytes: a["pss_end_bytes"].as_u64().unwrap_or(0),
        eager_wall_us,
        eager_pss_total_bytes,
    })
}

fn fork_row(
    exe: &Path,
    mem: u64,
    guest: &'static str,
    run_args: &[&str],
    at: &str,
    children: u32,
    runs: u32,
) -> Result<ForkRow, String> {
    let mut args = strings(&["run", "--json", "--mem", &mem.to_string()]);
    args.extend(strings(run_args));
    args.extend(strings(&[
        "--fork-after-pages",
        at,
        "--forks",
        &children.to_string(),
    ]));
    let (mut pause, mut first, mut ready, mut run) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs.max(1) {
        let j = run_json(exe, &args)?;
        let f = &j["forks"][0];
        pause.extend(f["pause_us"].as_f64());
        let kids = f["children"].as_array().cloned().unwrap_or_default();
        first.extend(kids.iter().filter_map(|c| c["first_io_us"].as_f64()));
        ready.extend(kids.iter().filter_map(|c| c["setup_us"].as_f64()));
        run.extend(kids.iter().filter_map(|c| c["first_run_us"].as_f64()));
    }
    Ok(ForkRow {
        guest,
        children,
        pause_max_us: pause.iter().copied().fold(0.0, f64::max),
        pause_us: median(&pause),
        first_io_max_us: first.iter().copied().fold(0.0, f64::max),
        first_io_median_us: median(&first),
        ready_median_us: median(&ready),
        first_run_median_us: median(&run),
        first_run_max_us: run.iter().copied().fold(0.0, f64::max),
    })
}

/// The parent's pause when forking a 1 GiB VM whose RAM the host
/// populated (labelled: guest instructions are emulated here), in this
/// process: median and longest of `runs`.
fn populated_fork_pause(runs: u32) -> Result<(f64, f64), String> {
    use crate::fork::{fork_vm, ForkOptions};
    use crate::runner::{run, HookError, RunHooks, SerialSink, VmHandle};
    let mut pauses = Vec::new();
    for _ in 0..runs.max(1) {
        let cfg = crate::config::VmConfig {
            mem_bytes: 1 << 30,
            pages: 64,
            passes: 400,
            ..crate::config::VmConfig::default()
        };
        let hooks = RunHooks::default().after_pages(
            64,
            Box::new(|vm: &mut VmHandle| -> Result<(), HookError> {
                vm.pause()?;
                let page = [0x5au8; 4096];
                let mut gpa = 16u64 << 20;
                while gpa + 4096 <= vm.ram().size() {
                    vm.ram().write(gpa, &page)?;
                    gpa += 4096;
                }
                vm.resume();
                let opts = ForkOptions {
                    count: 1,
                    seed_base: 7,
                    fail_setup_at: None,
                };
                let p = fork_vm(vm, opts).map_err(|e| HookError(e.to_string()))?;
                vm.pending_forks.push(p);
                Ok(())
            }),
        );
        let r = run(&cfg, hooks, SerialSink::Capture).map_err(|e| e.to_string())?;
        let f = r
            .forks
            .first()
            .ok_or_else(|| format!("the populated fork failed: {:?}", r.error))?;
        pauses.push(f.pause_us as f64);
    }
    let max = pauses.iter().copied().fold(0.0, f64::max);
    Ok((median(&pauses), max))
}

fn bench(args: &CloneBenchArgs) -> Result<CloneBench, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let base = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/dev/shm"));
    let mut result = CloneBench {
        mem_bytes: args.mem,
        clones: Vec::new(),
        forks: Vec::new(),
    };
    for (guest, run_args, at) in GUESTS {
        let dir = base.join(format!("vmm-bench-clone-{}-{guest}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut take = strings(&["run", "--json", "--mem", &args.mem.to_string()]);
        take.extend(strings(run_args));
        take.extend(strings(&[
            "--snapshot",
            &dir.to_string_lossy(),
            "--snapshot-after-pages",
            at,
        ]));
        let rows = run_json(&exe, &take).and_then(|_| {
            let mut rows = Vec::new();
            for &n in &args.counts {
                let mut eager = None;
                for mode in ["mmap", "uffd"] {
                    rows.push(clone_row(&exe, &dir, guest, n, mode, &mut eager)?);
                }
            }
            Ok(rows)
        });
        let _ = std::fs::remove_dir_all(&dir);
        result.clones.extend(rows?);
        for &k in &args.forks {
            result.forks.push(fork_row(
                &exe,
                args.mem,
                guest,
                run_args,
                at,
                k,
                args.fork_runs,
            )?);
        }
    }
    let (median, max) = populated_fork_pause(args.fork_runs)?;
    result.forks.push(ForkRow {
        guest: "1 GiB populated",
        children: 1,
        pause_us: median,
        pause_max_us: max,
        first_io_median_us: 0.0,
        first_io_max_us: 0.0,
        ready_median_us: 0.0,
        first_run_median_us: 0.0,
        first_run_max_us: 0.0,
    });
    Ok(result)
}

fn print(r: &CloneBench) {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "clones of a {} snapshot (one process), next to as many eager restores run at once:",
        format_size(r.mem_bytes)
    );
    println!(
        "  {:<8} {:<5} {:>5} {:>9} {:>14} {:>10} {:>10} {:>10} {:>9} | {:>10} {:>10}",
        "guest",
        "mode",
        "N",
        "setup ms",
        "1st I/O ms",
        "wall ms",
        "growth MiB",
        "own MiB",
        "PSS MiB",
        "eager ms",
        "eager MiB"
    );
    for c in &r.clones {
        println!(
            "  {:<8} {:<5} {:>5} {:>9.2} {:>6.1} ({:>5.1}) {:>10.1} {:>10.1} {:>10.1} {:>9.1} | {:>10.1} {:>10.1}",
            c.guest,
            c.mode,
            c.count,
            c.setup_median_us / 1000.0,
            c.first_io_median_us / 1000.0,
            c.first_io_max_us / 1000.0,
            c.wall_us / 1000.0,
            mib(c.growth_bytes),
            mib(c.exclusive_bytes),
            mib(c.pss_end_bytes),
            c.eager_wall_us / 1000.0,
            mib(c.eager_pss_total_bytes)
        );
    }
    println!(
        "forks of a running VM, medians of the runs (in parentheses: the longest pause, the last child), ms from the fork request:"
    );
    for f in &r.forks {
        // The populated guest's row measures the pause only.
        let children = if f.ready_median_us > 0.0 {
            format!(
                ", child ready {:.2} ms, first KVM_RUN {:.2} ({:.2}) ms, first I/O {:.2} ({:.2}) ms",
                f.ready_median_us / 1000.0,
                f.first_run_median_us / 1000.0,
                f.first_run_max_us / 1000.0,
                f.first_io_median_us / 1000.0,
                f.first_io_max_us / 1000.0
            )
        } else {
            " (host-populated RAM; the pause only)".into()
        };
        println!(
            "  {:<15} {:>3} children: parent paused {:.3} ({:.3}) ms{children}",
            f.guest,
            f.children,
            f.pause_us / 1000.0,
            f.pause_max_us / 1000.0,
        );
    }
    println!("note: guest instructions are emulated on hosts without hardware virtualization");
}

/// Runs `vmm bench clone`; returns the exit code.
pub fn main(args: &CloneBenchArgs) -> i32 {
    match bench(args) {
        Ok(r) => {
            print(&r);
            super::write_json("clone", args.json.as_deref(), &r)
        }
        Err(e) => {
            eprintln!("vmm bench clone: {e}");
            EXIT_ERROR
        }
    }
}
