//! `vmm bench numa`: the NUMA scanner on a simulated two-node host (this
//! host has one node; the second is simulated, pages do not really move):
//! 64 regions, 8 vCPUs each writing its own eighth of them, every region
//! starting on the wrong node. Per round, with the accessor filter (rule 1)
//! on and off side by side: the (vCPU, region) scans made and skipped, the
//! scan time, and the share of each vCPU's pages on its node. The vCPUs
//! are host threads registered as vCPUs (host-driven, labelled): the
//! sampling is real userfaultfd write-protect.
//!
//! Then the scanner inside real runs (KVM guest, emulated instructions on
//! this host): 2 vCPUs on 2 guest nodes, the scanner every 2 ms on 2
//! simulated host nodes, each signal next to the same run without it: the
//! guest's workload time, the scanner's rounds, time and moves, and where
//! each vCPU's pages ended up.

use crate::report::EXIT_ERROR;
use clap::Args;
use guest_mem::numa::drill::Drill;
use guest_mem::numa::scanner::ScannerConfig;
use serde::Serialize;
use std::path::PathBuf;

const VCPUS: u32 = 8;
const REGIONS: u64 = 64;
const PAGES: u64 = 64;

/// `vmm bench numa` flags.
#[derive(Args, Debug, Clone)]
pub struct NumaBenchArgs {
    /// Scanner rounds.
    #[arg(long, default_value_t = 10)]
    pub rounds: u32,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One round with the filter on or off.
#[derive(Debug, Serialize)]
pub struct NumaRound {
    /// Round number (1 = the first scan).
    pub round: u32,
    /// Accessor filter on.
    pub filter: bool,
    /// (vCPU, region) scans made.
    pub regions_scanned: u64,
    /// (vCPU, region) scans skipped.
    pub regions_skipped: u64,
    /// Pages armed for sampling.
    pub pages_sampled: u64,
    /// Pages moved.
    pub pages_moved: u64,
    /// µs the round took.
    pub scan_us: u64,
    /// Smallest share of a vCPU's pages on its node after the round.
    pub worst_placement: f64,
}

fn one_run(filter: bool, rounds: u32) -> Result<Vec<NumaRound>, String> {
    let drill = Drill::new(VCPUS, REGIONS, PAGES, 2).map_err(|e| e.to_string())?;
    let cfg = ScannerConfig {
        vcpu_node: Vec::new(),
        window_pages: 16,
        max_moves: 2048,
        filter_accessors: filter,
        accessor_window: 4,
        signal: Default::default(),
    };
    let rounds = drill.run(cfg, rounds).map_err(|e| e.to_string())?;
    Ok(rounds
        .into_iter()
        .enumerate()
        .map(|(round, (s, placed))| NumaRound {
            round: round as u32,
            filter,
            regions_scanned: s.regions_scanned,
            regions_skipped: s.regions_skipped,
            pages_sampled: s.pages_sampled,
            pages_moved: s.pages_moved,
            scan_us: s.scan_us,
            worst_placement: placed.into_iter().fold(1.0, f64::min),
        })
        .collect())
}

/// One guest run of the in-run comparison.
#[derive(Debug, Serialize)]
pub struct GuestRun {
    /// `off`, `write-protect` or `dirty-ring` (the scanner's signal).
    pub scanner: String,
    /// The dirty tracker beside it, if any.
    pub track: Option<String>,
    /// µs of the guest's workload (first boot event to last end).
    pub workload_us: u64,
    /// Scanner rounds.
    pub rounds: u64,
    /// µs in scanner rounds, in all.
    pub scan_us_total: u64,
    /// Pages moved.
    pub pages_moved: u64,
    /// Write-protect faults the run took.
    pub wp_faults: u64,
    /// The worst vCPU's share of its pages on its node at the end (with
    /// the scanner).
    pub worst_placement: Option<f64>,
}

fn guest_run(scan: bool, track: Option<crate::dirty::TrackerKind>) -> Result<GuestRun, String> {
    use crate::numa::{topology::NumaSpec, NumaConfig};
    let cfg = crate::config::VmConfig {
        vcpus: 2,
        pages: 512,
        passes: 6,
        round_per_pass: track.is_some(),
        track,
        numa: NumaConfig {
            spec: Some(NumaSpec::Nodes(2)),
            scan_ms: scan.then_some(2),
            scan_simulated_nodes: scan.then_some(2),
            ..NumaConfig::default()
        },
        ..crate::config::VmConfig::default()
    };
    let r = crate::runner::run(
        &cfg,
        crate::runner::RunHooks::default(),
        crate::runner::SerialSink::Capture,
    )
    .map_err(|e| e.to_string())?;
    if r.status != crate::report::RunStatus::Ok {
        return Err(format!("guest run: {:?}", r.error));
    }
    let s = r.numa.as_ref().and_then(|n| n.scanner.clone());
    Ok(GuestRun {
        scanner: s.as_ref().map_or("off".into(), |s| s.signal.clone()),
        track: track.map(|t| t.name().into()),
        workload_us: r.workload_us.unwrap_or(0),
        rounds: s.as_ref().map_or(0, |s| s.rounds),
        scan_us_total: s.as_ref().map_or(0, |s| s.scan_us_total),
        pages_moved: s.as_ref().map_or(0, |s| s.pages_moved),
        wp_faults: r.memory.faults.wp,
        worst_placement: s
            .as_ref()
            .map(|s| s.vcpu_pages_on_node.iter().copied().fold(1.0, f64::min)),
    })
}

/// The scanner inside guest runs, each signal beside the same run
/// without the scanner.
fn guest_runs() -> Result<Vec<GuestRun>, String> {
    use crate::dirty::TrackerKind;
    Ok(vec![
        guest_run(false, None)?,
        guest_run(true, None)?,
        guest_run(false, Some(TrackerKind::KvmRing))?,
        guest_run(true, Some(TrackerKind::KvmRing))?,
    ])
}

/// Runs `vmm bench numa`; returns the exit code.
pub fn main(args: &NumaBenchArgs) -> i32 {
    let runs = one_run(true, args.rounds).and_then(|on| Ok((on, one_run(false, args.rounds)?)));
    let (on, off) = match runs {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmm bench numa: {e}");
            return EXIT_ERROR;
        }
    };
    println!(
        "NUMA scanner, {REGIONS} regions + the boot region, {VCPUS} vCPUs (host threads) each writing its own eighth, \
         2 nodes (the second simulated), every region on the wrong node at first:"
    );
    println!(
        "  {:>5} | {:>22} {:>10} {:>9} | {:>22} {:>10} {:>9}",
        "round",
        "filter on: scanned/skip",
        "scan µs",
        "placed",
        "filter off: scanned/skip",
        "scan µs",
        "placed"
    );
    for (a, b) in on.iter().zip(&off) {
        println!(
            "  {:>5} | {:>14}/{:<7} {:>10} {:>8.0}% | {:>14}/{:<7} {:>10} {:>8.0}%",
            a.round,
            a.regions_scanned,
            a.regions_skipped,
            a.scan_us,
            a.worst_placement * 100.0,
            b.regions_scanned,
            b.regions_skipped,
            b.scan_us,
            b.worst_placement * 100.0
        );
    }
    println!("(round 0 is the first scan after the vCPUs populated their pages; \"placed\": the worst vCPU's share of pages on its node)");
    let guests = match guest_runs() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("vmm bench numa: {e}");
            return EXIT_ERROR;
        }
    };
    println!(
        "\nThe scanner in a run: 2 vCPUs x 512 pages x 6 passes on 2 guest nodes, every 2 ms on 2 simulated host nodes (guest instructions emulated here):"
    );
    println!(
        "  {:<14} {:<9} {:>12} {:>7} {:>10} {:>7} {:>9} {:>7}",
        "scanner", "tracker", "workload ms", "rounds", "scan ms", "moved", "wp faults", "placed"
    );
    for g in &guests {
        println!(
            "  {:<14} {:<9} {:>12.1} {:>7} {:>10.1} {:>7} {:>9} {:>7}",
            g.scanner,
            g.track.as_deref().unwrap_or("-"),
            g.workload_us as f64 / 1e3,
            g.rounds,
            g.scan_us_total as f64 / 1e3,
            g.pages_moved,
            g.wp_faults,
            g.worst_placement
                .map_or("-".into(), |p| format!("{:.0}%", p * 100.0))
        );
    }
    #[derive(Serialize)]
    struct All<'a> {
        drill: Vec<&'a NumaRound>,
        guests: &'a [GuestRun],
    }
    let all = All {
        drill: on.iter().chain(&off).collect(),
        guests: &guests,
    };
    super::write_json("numa", args.json.as_deref(), &all)
}
