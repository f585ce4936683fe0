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
use guest_mem::numa::scanner::{NumaScanner, RoundStats, ScannerConfig};
use guest_mem::numa::topology::{SimulatedTopology, Topology};
use guest_mem::{GuestRam, RamConfig, RegionFlags};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::{Arc, Barrier};

const VCPUS: u32 = 8;
const REGIONS: u64 = 64;
const PAGES: u64 = 64;
const PAGE: u64 = 4096;
const BASE: u64 = 64 << 20;

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

fn node_of(v: u32) -> u32 {
    v * 2 / VCPUS
}

fn one_run(filter: bool, rounds: u32) -> Result<Vec<NumaRound>, String> {
    let ram = Arc::new(GuestRam::new(4 << 20, RamConfig::default()).map_err(|e| e.to_string())?);
    let mut owners = Vec::new();
    let mut pages: Vec<Vec<u64>> = vec![Vec::new(); VCPUS as usize];
    for i in 0..REGIONS {
        let gpa = BASE + i * (1 << 20);
        let r = ram
            .add_region(gpa, PAGES * PAGE, RegionFlags::default())
            .map_err(|e| e.to_string())?;
        let v = (i * VCPUS as u64 / REGIONS) as u32;
        owners.push((r.host_of(gpa), r.host_of(gpa) + PAGES * PAGE, v));
        pages[v as usize].extend((0..PAGES).map(|p| r.host_of(gpa + p * PAGE)));
    }
    let topology = Arc::new(SimulatedTopology::new(2, move |page| {
        let host = page * PAGE;
        owners
            .iter()
            .find(|(s, e, _)| (*s..*e).contains(&host))
            .map_or(0, |(_, _, v)| 1 - node_of(*v))
    }));
    let cfg = ScannerConfig {
        vcpu_node: (0..VCPUS).map(node_of).collect(),
        window_pages: 16,
        max_moves: 2048,
        filter_accessors: filter,
        accessor_window: 4,
    };
    let mut scanner = NumaScanner::new(cfg, topology.clone());
    let start = Arc::new(Barrier::new(VCPUS as usize + 1));
    let done = Arc::new(Barrier::new(VCPUS as usize + 1));
    let threads: Vec<_> = (0..VCPUS)
        .map(|v| {
            let (ram, start, done) = (ram.clone(), start.clone(), done.clone());
            let mine = pages[v as usize].clone();
            std::thread::spawn(move || {
                ram.register_vcpu_thread(v);
                for round in 0..=rounds as u64 {
                    start.wait();
                    for h in &mine {
                        // SAFETY: a page of guest RAM's live mapping, which
                        // outlives this thread (joined below).
                        unsafe { (*h as *mut u64).write_volatile(round) };
                    }
                    done.wait();
                }
            })
        })
        .collect();
    let mut out = Vec::new();
    let mut failure = None;
    for round in 0..=rounds {
        start.wait();
        done.wait();
        match scanner.round(&ram) {
            Ok(s) => out.push(row(round, filter, s, &pages, topology.as_ref())),
            Err(e) => {
                failure.get_or_insert(e.to_string());
            }
        }
    }
    for t in threads {
        let _ = t.join();
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

fn row(
    round: u32,
    filter: bool,
    s: RoundStats,
    pages: &[Vec<u64>],
    topology: &dyn Topology,
) -> NumaRound {
    let worst_placement = pages
        .iter()
        .enumerate()
        .map(|(v, hosts)| {
            let on = topology
                .nodes_of(hosts)
                .iter()
                .filter(|n| **n == Some(node_of(v as u32)))
                .count();
            on as f64 / hosts.len().max(1) as f64
        })
        .fold(1.0, f64::min);
    NumaRound {
        round,
        filter,
        regions_scanned: s.regions_scanned,
        regions_skipped: s.regions_skipped,
        pages_sampled: s.pages_sampled,
        pages_moved: s.pages_moved,
        scan_us: s.scan_us,
        worst_placement,
    }
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
