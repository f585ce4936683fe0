//! `vmm bench faults`: what populating guest memory through the
//! page-tracking layer costs against kernel-managed memory, side by side in
//! one run, plus the table's memory and walk costs.
//!
//! * host-driven: one thread writes one word per page over `--host-mem`
//!   (1 GiB by default) of fresh guest RAM, per backing;
//! * guest-driven: the guest's `seq-write` over `--guest-pages` pages, one
//!   pass, per backing (guest instructions are emulated on hosts without
//!   hardware virtualization, so this is small);
//! * table: bytes per populated byte when population is clustered and in
//!   the scattered worst case (one page per 2 MiB), and the time to walk a
//!   64 GiB guest-physical space with 1% of its 2 MiB ranges populated.

use super::{median, min_median};
use crate::config::VmConfig;
use crate::report::EXIT_ERROR;
use crate::runner::{run, RunHooks, SerialSink};
use crate::size::{format_size, size_arg};
use clap::Args;
use guest_mem::{BackingKind, Entry, Frame, GuestRam, RamConfig, Stage2Table, WalkAction, Walker};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

/// `vmm bench faults` flags.
#[derive(Args, Debug, Clone)]
pub struct FaultBenchArgs {
    /// Guest RAM populated by the host-driven part.
    #[arg(long, default_value = "1G", value_parser = size_arg)]
    pub host_mem: u64,
    /// Pages the guest writes in the guest-driven part.
    #[arg(long, default_value_t = 1024)]
    pub guest_pages: u64,
    /// Fault-around window for the layer's backings.
    #[arg(long, default_value_t = 16)]
    pub fault_around: u64,
    /// Repetitions of each measurement (min and median are reported).
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One backing's row.
#[derive(Debug, Serialize)]
pub struct FaultRow {
    /// `memfd`, `anon` or `plain`.
    pub backing: String,
    /// Who touched the memory: `host` or `guest`.
    pub driver: String,
    /// Pages populated.
    pub pages: u64,
    /// Faults taken (uffd missing faults; for plain, one kernel fault per page).
    pub faults: u64,
    /// Median time to populate, µs.
    pub median_us: f64,
    /// Minimum time to populate, µs.
    pub min_us: f64,
    /// Faults per second (median run).
    pub faults_per_s: f64,
    /// µs per fault (median run).
    pub us_per_fault: f64,
    /// Pages per second (median run).
    pub pages_per_s: f64,
    /// Population speed relative to plain memory with the same driver.
    pub speed_vs_plain: f64,
}

/// The table's costs.
#[derive(Debug, Serialize)]
pub struct TableCosts {
    /// Table bytes / populated bytes, clustered population (host-driven run).
    pub clustered_ratio: f64,
    /// Table bytes / populated bytes, one page per 2 MiB (worst case).
    pub scattered_ratio: f64,
    /// Median µs to walk 64 GiB with 1% of its 2 MiB ranges populated.
    pub walk_64g_1pct_us: f64,
    /// Entries visited by that walk.
    pub walk_entries: u64,
}

/// The benchmark's result.
#[derive(Debug, Serialize)]
pub struct FaultBench {
    /// Rows.
    pub rows: Vec<FaultRow>,
    /// Table costs.
    pub table: TableCosts,
    /// The fault-around window used.
    pub fault_around: u64,
}

fn host_populate(
    backing: BackingKind,
    bytes: u64,
    fault_around: u64,
) -> Result<(f64, u64, u64), String> {
    let ram = GuestRam::new(
        bytes,
        RamConfig {
            backing,
            fault_around_pages: fault_around,
            ..RamConfig::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let base = ram.host_addr();
    let start = Instant::now();
    for p in 0..bytes / 4096 {
        let a = (base + p * 4096) as *mut u64;
        // SAFETY: inside `ram`'s live mapping, which this function owns.
        unsafe { a.write_volatile(p) };
    }
    let us = start.elapsed().as_secs_f64() * 1e6;
    let faults = if backing.uses_fault_engine() {
        ram.fault_stats().missing()
    } else {
        bytes / 4096
    };
    Ok((us, faults, ram.table().table_bytes() as u64))
}

fn guest_populate(
    backing: BackingKind,
    pages: u64,
    fault_around: u64,
) -> Result<(f64, u64), String> {
    let cfg = VmConfig {
        mem_bytes: 64 << 20,
        pages,
        passes: 1,
        verify_at_end: false,
        ram: RamConfig {
            backing,
            fault_around_pages: fault_around,
            ..RamConfig::default()
        },
        ..VmConfig::default()
    };
    let report = run(&cfg, RunHooks::default(), SerialSink::Capture).map_err(|e| e.to_string())?;
    let us = report
        .workload_us
        .ok_or("the guest did not report its workload")? as f64;
    let faults = if backing.uses_fault_engine() {
        report.memory.faults.missing
    } else {
        pages
    };
    Ok((us, faults))
}

fn table_costs(runs: u32) -> TableCosts {
    // Scattered worst case: one page per 2 MiB over 16 GiB.
    let t = Stage2Table::new();
    let n = (16u64 << 30) >> 21;
    for i in 0..n {
        let _ = t.set(i << 21, Entry::page(Frame(i), true));
    }
    let scattered_ratio = t.table_bytes() as f64 / (n * 4096) as f64;
    // 64 GiB guest-physical space, 1% of its 2 MiB ranges fully populated.
    let t = Stage2Table::new();
    let ranges = (64u64 << 30) >> 21;
    for r in (0..ranges).step_by(100) {
        for p in 0..512 {
            let gpa = (r << 21) + p * 4096;
            let _ = t.set(gpa, Entry::page(Frame(gpa >> 12), true));
        }
    }
    struct Count(u64);
    impl Walker for Count {
        fn leaf(&mut self, _gpa: u64, _e: Entry) -> WalkAction {
            self.0 += 1;
            WalkAction::Continue
        }
    }
    let mut times = Vec::new();
    let mut entries = 0;
    for _ in 0..runs.max(1) {
        let mut c = Count(0);
        let start = Instant::now();
        t.walk_range(0, 64 << 30, &mut c);
        times.push(start.elapsed().as_secs_f64() * 1e6);
        entries = c.0;
    }
    TableCosts {
        clustered_ratio: 0.0,
        scattered_ratio,
        walk_64g_1pct_us: median(&times),
        walk_entries: entries,
    }
}

fn row(backing: BackingKind, driver: &str, pages: u64, faults: u64, samples: &[f64]) -> FaultRow {
    let (min, median) = min_median(samples).unwrap_or((0.0, 0.0));
    FaultRow {
        backing: backing.name().into(),
        driver: driver.into(),
        pages,
        faults,
        median_us: median,
        min_us: min,
        faults_per_s: faults as f64 / (median / 1e6),
        us_per_fault: median / faults.max(1) as f64,
        pages_per_s: pages as f64 / (median / 1e6),
        speed_vs_plain: 0.0,
    }
}

fn measure(args: &FaultBenchArgs) -> Result<FaultBench, String> {
    let backings = [BackingKind::Plain, BackingKind::Anon, BackingKind::Memfd];
    let mut rows = Vec::new();
    let mut clustered_ratio = 0.0;
    for b in backings {
        let mut samples = Vec::new();
        let mut faults = 0;
        for _ in 0..args.runs.max(1) {
            let (us, f, table) = host_populate(b, args.host_mem, args.fault_around)?;
            samples.push(us);
            faults = f;
            if b == BackingKind::Memfd {
                clustered_ratio = table as f64 / args.host_mem as f64;
            }
        }
        rows.push(row(b, "host", args.host_mem / 4096, faults, &samples));
    }
    for b in backings {
        let mut samples = Vec::new();
        let mut faults = 0;
        for _ in 0..args.runs.max(1) {
            let (us, f) = guest_populate(b, args.guest_pages, args.fault_around)?;
            samples.push(us);
            faults = f;
        }
        rows.push(row(b, "guest", args.guest_pages, faults, &samples));
    }
    for driver in ["host", "guest"] {
        let plain = rows
            .iter()
            .find(|r| r.driver == driver && r.backing == "plain")
            .map_or(0.0, |r| r.pages_per_s);
        for r in rows.iter_mut().filter(|r| r.driver == driver) {
            r.speed_vs_plain = r.pages_per_s / plain;
        }
    }
    let mut table = table_costs(args.runs);
    table.clustered_ratio = clustered_ratio;
    Ok(FaultBench {
        rows,
        table,
        fault_around: args.fault_around,
    })
}

/// Runs the benchmark; returns the exit code.
pub fn main(args: &FaultBenchArgs) -> i32 {
    if !(1..=512).contains(&args.fault_around) || !args.fault_around.is_power_of_two() {
        eprintln!(
            "vmm bench faults: --fault-around {} is not a power of two between 1 and 512",
            args.fault_around
        );
        return crate::report::EXIT_USAGE;
    }
    let result = match measure(args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmm bench faults: {e}");
            return EXIT_ERROR;
        }
    };
    println!(
        "vmm bench faults: fault-around {}, {} runs each (min/median); host-driven {} , guest-driven {} pages",
        result.fault_around,
        args.runs,
        format_size(args.host_mem),
        args.guest_pages
    );
    println!(
        "{:<7} {:<7} {:>9} {:>9} {:>12} {:>12} {:>11} {:>10} {:>9}",
        "driver",
        "backing",
        "pages",
        "faults",
        "median ms",
        "faults/s",
        "us/fault",
        "pages/s",
        "vs plain"
    );
    for r in &result.rows {
        println!(
            "{:<7} {:<7} {:>9} {:>9} {:>12.2} {:>12.0} {:>11.2} {:>10.0} {:>8.0}%",
            r.driver,
            r.backing,
            r.pages,
            r.faults,
            r.median_us / 1000.0,
            r.faults_per_s,
            r.us_per_fault,
            r.pages_per_s,
            r.speed_vs_plain * 100.0
        );
    }
    let t = &result.table;
    println!(
        "table: {:.3}% of populated RAM clustered (target <= 0.25%), {:.1}% scattered (one page per 2 MiB)",
        t.clustered_ratio * 100.0,
        t.scattered_ratio * 100.0
    );
    println!(
        "walk: 64 GiB guest-physical, 1% of 2 MiB ranges populated: {:.3} ms median, {} entries (target <= 5 ms)",
        t.walk_64g_1pct_us / 1000.0,
        t.walk_entries
    );
    println!("note: guest rows are emulated instructions on hosts without hardware virtualization");
    super::write_json("faults", args.json.as_deref(), &result)
}
