//! The NUMA scanner inside a run (`--numa-scan-ms`): a round on the
//! supervisor's tick every interval, sampling writes with write-protect
//! windows, or from the vCPUs' KVM dirty rings when the ring tracker is on,
//! and moving pages to their writers' host node.

use guest_mem::numa::scanner::{NumaScanner, RoundStats, SampleSignal, ScannerConfig};
use guest_mem::numa::topology::{HostTopology, SimulatedTopology, Topology};
use guest_mem::GuestRam;
use guest_protocol::layout::WorkArea;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Pages sampled per region per round: windows stay open one interval,
/// so they are wide enough to catch a few passes of a guest writing on.
const WINDOW_PAGES: u64 = 256;
/// Most pages moved per round.
const MAX_MOVES: u64 = 1024;
/// Rounds per accessor window (rule 1).
const ACCESSOR_WINDOW: u32 = 4;

/// What the scanner did in a run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ScanReport {
    /// `write-protect` or `dirty-ring`.
    pub signal: String,
    /// Host nodes simulated for the scanner, if the host's were not used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub simulated_host_nodes: Option<u32>,
    /// Milliseconds between rounds.
    pub interval_ms: u64,
    /// Rounds run.
    pub rounds: u64,
    /// (vCPU, region) scans made.
    pub regions_scanned: u64,
    /// (vCPU, region) scans skipped by the accessor filter (rule 1).
    pub regions_skipped: u64,
    /// Pages armed for sampling.
    pub pages_sampled: u64,
    /// Pages moved to their writers' node.
    pub pages_moved: u64,
    /// Moves the rate limit put off.
    pub moves_deferred: u64,
    /// Microseconds spent in rounds, in all.
    pub scan_us_total: u64,
    /// The longest round, in microseconds.
    pub scan_us_max: u64,
    /// Per vCPU: the share of its resident work pages on its host node at
    /// the end.
    pub vcpu_pages_on_node: Vec<f64>,
    /// Why the scanner stopped early, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Runs scanner rounds on the supervisor's tick.
pub struct ScanDriver {
    scanner: NumaScanner,
    topology: Arc<dyn Topology>,
    every: Duration,
    last: Instant,
    vcpu_host_node: Vec<u32>,
    report: ScanReport,
}

impl ScanDriver {
    /// A scanner for vCPUs whose host nodes are `vcpu_host_node`, every
    /// `every_ms`; on `simulated` host nodes instead of this host's (pages
    /// start on node 0 and moves change only their recorded node).
    pub fn new(
        vcpu_host_node: Vec<u32>,
        every_ms: u64,
        signal: SampleSignal,
        simulated: Option<u32>,
    ) -> ScanDriver {
        let topology: Arc<dyn Topology> = match simulated {
            Some(n) => Arc::new(SimulatedTopology::new(n, |_| 0)),
            None => Arc::new(HostTopology::detect()),
        };
        let cfg = ScannerConfig {
            vcpu_node: vcpu_host_node.clone(),
            window_pages: WINDOW_PAGES,
            max_moves: MAX_MOVES,
            filter_accessors: true,
            accessor_window: ACCESSOR_WINDOW,
            signal,
        };
        ScanDriver {
            scanner: NumaScanner::new(cfg, topology.clone()),
            topology,
            every: Duration::from_millis(every_ms.max(1)),
            last: Instant::now(),
            vcpu_host_node,
            report: ScanReport {
                signal: signal.name().into(),
                simulated_host_nodes: simulated,
                interval_ms: every_ms,
                ..ScanReport::default()
            },
        }
    }

    /// Runs a round when the interval has passed. A failed round stops the
    /// scanner (the run goes on) and the report says why.
    pub fn tick(&mut self, ram: &GuestRam) {
        if self.report.error.is_some() || self.last.elapsed() < self.every {
            return;
        }
        self.last = Instant::now();
        match self.scanner.round(ram) {
            Ok(s) => self.add(s),
            Err(e) => {
                log::warn!("the NUMA scanner stopped: {e}");
                self.report.error = Some(e.to_string());
            }
        }
    }

    fn add(&mut self, s: RoundStats) {
        let r = &mut self.report;
        r.rounds += 1;
        r.regions_scanned += s.regions_scanned;
        r.regions_skipped += s.regions_skipped;
        r.pages_sampled += s.pages_sampled;
        r.pages_moved += s.pages_moved;
        r.moves_deferred += s.moves_deferred;
        r.scan_us_total += s.scan_us;
        r.scan_us_max = r.scan_us_max.max(s.scan_us);
    }

    /// Ends the armed windows and reports, with where each vCPU's resident
    /// work pages (of `area`) are.
    pub fn finish(mut self, ram: &GuestRam, area: &WorkArea) -> ScanReport {
        if let Err(e) = self.scanner.disarm(ram) {
            log::warn!("ending the NUMA scanner's windows: {e}");
        }
        let regions = ram.regions();
        let populated: std::collections::HashSet<u64> = ram.populated_pages().into_iter().collect();
        self.report.vcpu_pages_on_node = self
            .vcpu_host_node
            .iter()
            .enumerate()
            .map(|(v, node)| {
                let hosts: Vec<u64> = (0..area.pages_per_vcpu)
                    .map(|p| area.page_gpa(v as u64, p))
                    .filter(|g| populated.contains(&(g / guest_protocol::layout::PAGE_SIZE)))
                    .filter_map(|g| {
                        regions
                            .iter()
                            .find(|r| r.contains_gpa(g))
                            .map(|r| r.host_of(g))
                    })
                    .collect();
                let on = self
                    .topology
                    .nodes_of(&hosts)
                    .into_iter()
                    .filter(|n| *n == Some(*node))
                    .count();
                if hosts.is_empty() {
                    0.0
                } else {
                    on as f64 / hosts.len() as f64
                }
            })
            .collect();
        self.report
    }
}
