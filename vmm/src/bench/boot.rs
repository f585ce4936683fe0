//! `vmm bench boot`: spawns `vmm run --json` repeatedly and measures, per
//! run, the time from spawn to the first byte of guest serial output (read
//! from the child's stderr, where `--json` sends serial output) and the
//! child's own `boot_us` (`KVM_CREATE_VM` to the first I/O exit).

use super::min_median;
use crate::report::EXIT_ERROR;
use crate::size::{format_size, size_arg};
use clap::Args;
use serde::Serialize;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

/// `vmm bench boot` flags.
#[derive(Args, Debug, Clone)]
pub struct BootBenchArgs {
    /// How many VMs to boot.
    #[arg(long, default_value_t = 20)]
    pub runs: u32,
    /// Guest RAM of each VM.
    #[arg(long, default_value = "256M", value_parser = size_arg)]
    pub mem: u64,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One boot.
#[derive(Debug, Serialize)]
pub struct BootSample {
    /// Spawn to the first serial byte, µs.
    pub spawn_to_serial_us: f64,
    /// The child's `boot_us`.
    pub boot_us: Option<u64>,
}

/// The benchmark's result.
#[derive(Debug, Serialize)]
pub struct BootBench {
    /// Guest RAM per VM.
    pub mem_bytes: u64,
    /// Every run.
    pub samples: Vec<BootSample>,
    /// Minimum spawn-to-serial, µs.
    pub spawn_to_serial_min_us: f64,
    /// Median spawn-to-serial, µs.
    pub spawn_to_serial_median_us: f64,
    /// Minimum in-process boot, µs.
    pub boot_min_us: Option<f64>,
    /// Median in-process boot, µs.
    pub boot_median_us: Option<f64>,
    /// The target: spawn to first serial byte ≤ 4 ms.
    pub target_us: f64,
}

fn one_boot(exe: &PathBuf, mem: u64) -> Result<BootSample, String> {
    let start = Instant::now();
    let mut child = Command::new(exe)
        .args(["run", "--json", "--pages", "1", "--passes", "1", "--mem"])
        .arg(mem.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot spawn {}: {e}", exe.display()))?;
    let mut stderr = child.stderr.take().ok_or("no stderr pipe")?;
    let mut first = [0u8; 1];
    let n = stderr.read(&mut first).map_err(|e| e.to_string())?;
    let spawn_to_serial = start.elapsed();
    if n == 0 {
        return Err("the child printed no serial output".into());
    }
    let mut rest = String::new();
    let _ = stderr.read_to_string(&mut rest);
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("vmm run failed ({}): {}", out.status, rest.trim()));
    }
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("bad JSON from vmm run: {e}"))?;
    Ok(BootSample {
        spawn_to_serial_us: spawn_to_serial.as_secs_f64() * 1e6,
        boot_us: json["boot_us"].as_u64(),
    })
}

/// Runs the benchmark; returns the exit code.
pub fn main(args: &BootBenchArgs) -> i32 {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("vmm: cannot find my own executable: {e}");
            return EXIT_ERROR;
        }
    };
    let mut samples = Vec::new();
    for i in 0..args.runs.max(1) {
        match one_boot(&exe, args.mem) {
            Ok(s) => samples.push(s),
            Err(e) => {
                eprintln!("vmm bench boot: run {i} failed: {e}");
                return EXIT_ERROR;
            }
        }
    }
    let spawn: Vec<f64> = samples.iter().map(|s| s.spawn_to_serial_us).collect();
    let boot: Vec<f64> = samples
        .iter()
        .filter_map(|s| s.boot_us.map(|b| b as f64))
        .collect();
    let Some((smin, smed)) = min_median(&spawn) else {
        eprintln!("vmm bench boot: no samples");
        return EXIT_ERROR;
    };
    let b = min_median(&boot);
    let result = BootBench {
        mem_bytes: args.mem,
        spawn_to_serial_min_us: smin,
        spawn_to_serial_median_us: smed,
        boot_min_us: b.map(|b| b.0),
        boot_median_us: b.map(|b| b.1),
        target_us: 4000.0,
        samples,
    };
    println!(
        "vmm bench boot: {} runs, {} guest RAM",
        result.samples.len(),
        format_size(args.mem)
    );
    println!("{:<34} {:>10} {:>10}", "", "min", "median");
    println!(
        "{:<34} {:>8.2}ms {:>8.2}ms   (target <= 4 ms)",
        "spawn -> first serial byte",
        smin / 1000.0,
        smed / 1000.0
    );
    if let Some((bmin, bmed)) = b {
        println!(
            "{:<34} {:>8.2}ms {:>8.2}ms",
            "KVM_CREATE_VM -> first I/O exit",
            bmin / 1000.0,
            bmed / 1000.0
        );
    }
    println!("note: guest instructions are emulated on hosts without hardware virtualization");
    super::write_json("boot", args.json.as_deref(), &result)
}
