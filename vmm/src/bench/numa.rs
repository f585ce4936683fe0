//! `vmm bench numa`: the NUMA scanner on a simulated two-node host (this
//! host has one node; the second is simulated, pages do not really move):
//! 64 regions, 8 vCPUs each writing its own eighth of them, every region
//! starting on the wrong node. Per round, with the accessor filter (rule 1)
//! on and off side by side: the (vCPU, region) scans made and skipped, the
//! scan time, and the share of each vCPU's pages on its node. The vCPUs
//! are host threads registered as vCPUs (host-driven, labelled): the
//! sampling is real userfaultfd write-protect.

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
    let rows: Vec<&NumaRound> = on.iter().chain(&off).collect();
    super::write_json("numa", args.json.as_deref(), &rows)
}
