//! `vmm bench dirty`: what each dirty-tracking backend costs, side by side
//! in one run with the same workload and memory size, against no tracking.
//!
//! * guest driver: the guest kernel's workload, one round per pass, for
//!   every backend and for none (guest instructions are emulated on hosts
//!   without hardware virtualization, so this part is small);
//! * host driver (labelled): host threads write a share of the pages of
//!   `--host-mem` of guest RAM each round; only backends that see host
//!   writes run it;
//! * the `kvm-bitmap` harvest of a 4 GiB guest with 1% of its pages dirty.

use super::median;
use crate::config::VmConfig;
use crate::dirty::{check_combination, TrackerKind};
use crate::report::{EXIT_ERROR, EXIT_OK, EXIT_USAGE};
use crate::runner::{run, RunHooks, SerialSink};
use crate::size::{format_size, size_arg};
use clap::Args;
use guest_mem::tracking::pagemap::Pagemap;
use guest_mem::{BackingKind, GuestRam, RamConfig};
use guest_protocol::Workload;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// `vmm bench dirty` flags.
#[derive(Args, Debug, Clone)]
pub struct DirtyBenchArgs {
    /// Pages the guest writes per round (per vCPU).
    #[arg(long, default_value_t = 1024)]
    pub guest_pages: u64,
    /// Rounds (passes) per run.
    #[arg(long, default_value_t = 3)]
    pub rounds: u64,
    /// Guest RAM of the host-driven part.
    #[arg(long, default_value = "1G", value_parser = size_arg)]
    pub host_mem: u64,
    /// Percent of the host-driven RAM written per round.
    #[arg(long, default_value_t = 10)]
    pub host_dirty_pct: u64,
    /// Guest RAM of the large-guest harvest measurement (0 skips it).
    #[arg(long, default_value = "4G", value_parser = size_arg)]
    pub big_mem: u64,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw the comparison as an SVG to this file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// One backend under one driver.
#[derive(Debug, Serialize)]
pub struct DirtyRow {
    /// `guest` or `host`.
    pub driver: String,
    /// Backend name, or `none`.
    pub backend: String,
    /// Why the backend did not run, if it did not.
    pub unavailable: Option<String>,
    /// Pages written (all rounds).
    pub pages_written: u64,
    /// Pages written per second.
    pub pages_per_s: f64,
    /// Median harvest time per round, µs.
    pub harvest_median_us: f64,
    /// Dirty pages per round (median).
    pub dirty_per_round: f64,
    /// Host cost per dirty page, µs: the writes' extra time over no
    /// tracking plus the harvest, divided by the dirty pages.
    pub host_cost_per_dirty_page_us: f64,
    /// Bytes the tracker uses.
    pub tracker_bytes: u64,
    /// Throughput without tracking / with it (1.0 = no overhead).
    pub overhead_ratio: f64,
    /// Harvest µs per GiB scanned (scanning backends).
    pub harvest_us_per_gib_scanned: Option<f64>,
}

/// The large-guest harvest measurement.
#[derive(Debug, Serialize)]
pub struct BigHarvest {
    /// Guest RAM.
    pub mem_bytes: u64,
    /// Pages dirty in the measured round.
    pub dirty_pages: u64,
    /// Harvest µs of that round.
    pub harvest_us: u64,
}

/// The benchmark's result.
#[derive(Debug, Serialize)]
pub struct DirtyBench {
    /// Rows.
    pub rows: Vec<DirtyRow>,
    /// kvm-bitmap on a large guest with 1% dirty.
    pub big_kvm_bitmap: Option<BigHarvest>,
}

fn unavailable(driver: &str, backend: &str, why: String) -> DirtyRow {
    DirtyRow {
        driver: driver.into(),
        backend: backend.into(),
        unavailable: Some(why),
        pages_written: 0,
        pages_per_s: 0.0,
        harvest_median_us: 0.0,
        dirty_per_round: 0.0,
        host_cost_per_dirty_page_us: 0.0,
        tracker_bytes: 0,
        overhead_ratio: 0.0,
        harvest_us_per_gib_scanned: None,
    }
}

fn guest_config(
    args: &DirtyBenchArgs,
    kind: Option<TrackerKind>,
    mem: u64,
    pages: u64,
) -> VmConfig {
    let mut c = VmConfig {
        mem_bytes: mem,
        pages,
        passes: args.rounds.max(1),
        workload: Workload::SeqWrite,
        verify_at_end: false,
        round_per_pass: true,
        track: kind,
        ..VmConfig::default()
    };
    c.ram.wp_async = kind.is_some_and(TrackerKind::needs_wp_async);
    c
}

fn guest_row(args: &DirtyBenchArgs, kind: Option<TrackerKind>) -> DirtyRow {
    let name = kind.map_or("none", TrackerKind::name);
    let cfg = guest_config(args, kind, 64 << 20, args.guest_pages);
    if let Some(k) = kind {
        if let Err(e) = check_combination(k, cfg.ram.backing) {
            return unavailable("guest", name, e.to_string());
        }
    }
    let report = match run(&cfg, RunHooks::default(), SerialSink::Capture) {
        Ok(r) => r,
        Err(e) => return unavailable("guest", name, e.to_string()),
    };
    let secs = report.workload_us.unwrap_or(1).max(1) as f64 / 1e6;
    let (harvest, dirty, bytes, per_gib) = match &report.tracking {
        Some(t) => {
            let h: Vec<f64> = t.harvest_us.iter().map(|v| *v as f64).collect();
            let d: Vec<f64> = t.pages_per_round.iter().map(|v| *v as f64).collect();
            let scanned: u64 = t.scanned_bytes.iter().sum();
            let per_gib = (scanned > 0)
                .then(|| h.iter().sum::<f64>() / (scanned as f64 / (1u64 << 30) as f64));
            (median(&h), median(&d), t.memory_bytes, per_gib)
        }
        None => (0.0, 0.0, 0, None),
    };
    DirtyRow {
        driver: "guest".into(),
        backend: name.into(),
        unavailable: None,
        pages_written: report.pages_written,
        pages_per_s: report.pages_written as f64 / secs,
        harvest_median_us: harvest,
        dirty_per_round: dirty,
        host_cost_per_dirty_page_us: if dirty > 0.0 { harvest / dirty } else { 0.0 },
        tracker_bytes: bytes,
        overhead_ratio: 0.0,
        harvest_us_per_gib_scanned: per_gib,
    }
}

/// Writes one word to every `stride`-th page from `first`; returns µs.
fn host_write(ram: &GuestRam, stride: u64, first: u64, value: u64) -> f64 {
    let start = Instant::now();
    let pages = ram.size() / 4096;
    let mut p = first;
    while p < pages {
        let a = (ram.host_addr() + p * 4096) as *mut u64;
        // SAFETY: inside `ram`'s live mapping, owned by the caller.
        unsafe { a.write_volatile(value) };
        p += stride;
    }
    start.elapsed().as_secs_f64() * 1e6
}

fn host_row(
    args: &DirtyBenchArgs,
    kind: Option<TrackerKind>,
    baseline_write_us: Option<f64>,
) -> (DirtyRow, f64) {
    let name = kind.map_or("none", TrackerKind::name);
    if let Some(k) = kind {
        if let Err(e) = check_combination(k, BackingKind::Anon) {
            return (unavailable("host", name, e.to_string()), 0.0);
        }
    }
    let ram = match GuestRam::new(
        args.host_mem,
        RamConfig {
            backing: BackingKind::Anon,
            fault_around_pages: 512,
            wp_async: kind.is_some_and(TrackerKind::needs_wp_async),
            ..RamConfig::default()
        },
    ) {
        Ok(r) => r,
        Err(e) => return (unavailable("host", name, e.to_string()), 0.0),
    };
    host_write(&ram, 1, 0, 1);
    let pagemap = Pagemap::open().ok();
    if kind.is_some() {
        if let Err(e) = ram.start_wp_tracking() {
            return (unavailable("host", name, e.to_string()), 0.0);
        }
    }
    let harvest = |ram: &GuestRam| -> Result<(u64, u64), String> {
        match kind {
            Some(TrackerKind::UffdWp) => ram
                .harvest_wp_sync()
                .map(|p| (p.len() as u64, 0))
                .map_err(|e| e.to_string()),
            Some(TrackerKind::UffdAsync) => {
                let pm = pagemap.as_ref().ok_or("cannot open /proc/self/pagemap")?;
                ram.harvest_wp_async(pm)
                    .map(|(p, s)| (p.len() as u64, s))
                    .map_err(|e| e.to_string())
            }
            _ => Ok((0, 0)),
        }
    };
    if let Err(e) = harvest(&ram) {
        return (unavailable("host", name, e), 0.0);
    }
    let stride = (100 / args.host_dirty_pct.clamp(1, 100)).max(1);
    let mut writes = Vec::new();
    let mut harvests = Vec::new();
    let mut dirty = Vec::new();
    let mut scanned = 0;
    let mut written = 0;
    for round in 0..args.rounds.max(1) {
        writes.push(host_write(&ram, stride, round % stride, round + 2));
        written += (ram.size() / 4096).div_ceil(stride);
        let t = Instant::now();
        match harvest(&ram) {
            Ok((n, s)) => {
                dirty.push(n as f64);
                scanned += s;
            }
            Err(e) => return (unavailable("host", name, e), 0.0),
        }
        harvests.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let write_med = median(&writes);
    let harvest_med = if kind.is_some() {
        median(&harvests)
    } else {
        0.0
    };
    let dirty_med = median(&dirty);
    let per_round = (ram.size() / 4096).div_ceil(stride) as f64;
    let extra = baseline_write_us.map_or(0.0, |b| (write_med - b).max(0.0));
    let row = DirtyRow {
        driver: "host".into(),
        backend: name.into(),
        unavailable: None,
        pages_written: written,
        pages_per_s: per_round / (write_med / 1e6),
        harvest_median_us: harvest_med,
        dirty_per_round: if kind.is_some() { dirty_med } else { per_round },
        host_cost_per_dirty_page_us: if kind.is_some() {
            (extra + harvest_med) / per_round
        } else {
            0.0
        },
        tracker_bytes: 0,
        overhead_ratio: 0.0,
        harvest_us_per_gib_scanned: (scanned > 0)
            .then(|| harvests.iter().sum::<f64>() / (scanned as f64 / (1u64 << 30) as f64)),
    };
    (row, write_med)
}

fn big_harvest(args: &DirtyBenchArgs) -> Result<BigHarvest, String> {
    let pages = args.big_mem / 4096 / 100;
    let cfg = guest_config(
        &DirtyBenchArgs {
            rounds: 2,
            ..args.clone()
        },
        Some(TrackerKind::KvmBitmap),
        args.big_mem,
        pages,
    );
    let report = run(&cfg, RunHooks::default(), SerialSink::Capture).map_err(|e| e.to_string())?;
    let t = report.tracking.ok_or("no tracking report")?;
    // Round 1 (the second pass) rewrites the same 1%: its harvest is the
    // steady-state cost.
    Ok(BigHarvest {
        mem_bytes: args.big_mem,
        dirty_pages: *t.pages_per_round.get(1).ok_or("no second round")?,
        harvest_us: *t.harvest_us.get(1).ok_or("no second round")?,
    })
}

/// A progress bar that stays hidden until the run has taken a second, and
/// only ever shows on a terminal.
struct Progress {
    bar: ProgressBar,
    start: Instant,
    shown: bool,
}

impl Progress {
    fn new(steps: u64) -> Progress {
        let bar = ProgressBar::with_draw_target(Some(steps), ProgressDrawTarget::hidden());
        if let Ok(style) =
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
        {
            bar.set_style(style);
        }
        Progress {
            bar,
            start: Instant::now(),
            shown: false,
        }
    }

    fn step(&mut self, msg: String) {
        if !self.shown
            && self.start.elapsed() > Duration::from_secs(1)
            && std::io::stderr().is_terminal()
        {
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
            self.bar.enable_steady_tick(Duration::from_millis(200));
            self.shown = true;
        }
        self.bar.set_message(msg);
    }
}

fn measure(args: &DirtyBenchArgs) -> DirtyBench {
    let kinds: Vec<Option<TrackerKind>> = std::iter::once(None)
        .chain(TrackerKind::ALL.map(Some))
        .collect();
    let mut pb = Progress::new(kinds.len() as u64 * 2 + 1);
    let mut rows = Vec::new();
    for k in &kinds {
        pb.step(format!("guest, {}", k.map_or("none", TrackerKind::name)));
        rows.push(guest_row(args, *k));
        pb.bar.inc(1);
    }
    let mut baseline = None;
    for k in &kinds {
        pb.step(format!("host, {}", k.map_or("none", TrackerKind::name)));
        let row = match k {
            Some(TrackerKind::KvmBitmap | TrackerKind::KvmRing) => unavailable(
                "host",
                k.map_or("none", TrackerKind::name),
                "KVM's dirty log sees guest writes only, not host threads".into(),
            ),
            _ => {
                let (row, write_us) = host_row(args, *k, baseline);
                if k.is_none() {
                    baseline = Some(write_us);
                }
                row
            }
        };
        rows.push(row);
        pb.bar.inc(1);
    }
    for driver in ["guest", "host"] {
        let none = rows
            .iter()
            .find(|r| r.driver == driver && r.backend == "none")
            .map_or(0.0, |r| r.pages_per_s);
        for r in rows
            .iter_mut()
            .filter(|r| r.driver == driver && r.unavailable.is_none())
        {
            r.overhead_ratio = if r.pages_per_s > 0.0 {
                none / r.pages_per_s
            } else {
                0.0
            };
        }
    }
    pb.step("kvm-bitmap, large guest".into());
    let big = (args.big_mem > 0).then(|| big_harvest(args)).and_then(|r| {
        r.map_err(|e| log::warn!("large-guest harvest skipped: {e}"))
            .ok()
    });
    pb.bar.finish_and_clear();
    DirtyBench {
        rows,
        big_kvm_bitmap: big,
    }
}

fn print_table(result: &DirtyBench, args: &DirtyBenchArgs) {
    println!(
        "vmm bench dirty: guest {} pages x {} rounds (emulated guest); host-driven {} with {}% written per round",
        args.guest_pages,
        args.rounds,
        format_size(args.host_mem),
        args.host_dirty_pct
    );
    println!(
        "{:<6} {:<11} {:>12} {:>11} {:>12} {:>13} {:>12} {:>9} {:>12}",
        "driver",
        "backend",
        "pages/s",
        "harvest us",
        "dirty/round",
        "us/dirty page",
        "tracker B",
        "overhead",
        "us/GiB scan"
    );
    for r in &result.rows {
        if let Some(why) = &r.unavailable {
            println!("{:<6} {:<11} unavailable: {why}", r.driver, r.backend);
            continue;
        }
        println!(
            "{:<6} {:<11} {:>12.0} {:>11.0} {:>12.0} {:>13.3} {:>12} {:>8.2}x {:>12}",
            r.driver,
            r.backend,
            r.pages_per_s,
            r.harvest_median_us,
            r.dirty_per_round,
            r.host_cost_per_dirty_page_us,
            r.tracker_bytes,
            r.overhead_ratio,
            r.harvest_us_per_gib_scanned
                .map_or("-".into(), |v| format!("{v:.0}"))
        );
    }
    if let Some(b) = &result.big_kvm_bitmap {
        println!(
            "kvm-bitmap harvest, {} guest, {} dirty pages: {:.3} ms (target <= 2 ms)",
            format_size(b.mem_bytes),
            b.dirty_pages,
            b.harvest_us as f64 / 1000.0
        );
    }
    println!("note: guest rows run emulated instructions on hosts without hardware virtualization");
}

/// Draws host cost per dirty page and guest overhead per backend.
fn plot(result: &DirtyBench, path: &PathBuf) -> Result<(), String> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let panels = root.split_evenly((1, 2));
    for (panel, (driver, title)) in panels.iter().zip([
        ("guest", "guest driver: throughput overhead (x)"),
        ("host", "host driver: µs per dirty page"),
    ]) {
        let rows: Vec<&DirtyRow> = result
            .rows
            .iter()
            .filter(|r| r.driver == driver && r.unavailable.is_none() && r.backend != "none")
            .collect();
        let value = |r: &DirtyRow| {
            if driver == "guest" {
                r.overhead_ratio
            } else {
                r.host_cost_per_dirty_page_us
            }
        };
        let max = rows
            .iter()
            .map(|r| value(r))
            .fold(0.0f64, f64::max)
            .max(0.001)
            * 1.2;
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d((0..rows.len().max(1)).into_segmented(), 0.0..max)
            .map_err(|e| e.to_string())?;
        let names: Vec<String> = rows.iter().map(|r| r.backend.clone()).collect();
        chart
            .configure_mesh()
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .draw()
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(rows.iter().enumerate().map(|(i, r)| {
                let mut bar = Rectangle::new(
                    [
                        (SegmentValue::Exact(i), 0.0),
                        (SegmentValue::Exact(i + 1), value(r)),
                    ],
                    BLUE.mix(0.6).filled(),
                );
                bar.set_margin(0, 0, 8, 8);
                bar
            }))
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}

/// Runs the benchmark; returns the exit code.
pub fn main(args: &DirtyBenchArgs) -> i32 {
    if args.host_dirty_pct == 0
        || args.host_dirty_pct > 100
        || args.rounds == 0
        || args.guest_pages == 0
    {
        eprintln!("vmm bench dirty: --host-dirty-pct must be 1 to 100, --rounds and --guest-pages at least 1");
        return EXIT_USAGE;
    }
    let result = measure(args);
    print_table(&result, args);
    if let Some(path) = &args.plot {
        if let Err(e) = plot(&result, path) {
            eprintln!("vmm bench dirty: cannot draw {}: {e}", path.display());
            return EXIT_ERROR;
        }
    }
    let code = super::write_json("dirty", args.json.as_deref(), &result);
    if code != EXIT_OK {
        return code;
    }
    EXIT_OK
}
