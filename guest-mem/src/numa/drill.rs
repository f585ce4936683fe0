//! A host-driven drill for the scanner on a simulated multi-node host (the
//! extra nodes are simulated: pages change their recorded node, memory does
//! not move): regions split evenly among vCPUs, each vCPU a host thread
//! registered as that vCPU writing all its pages every round, every region
//! starting on a node its vCPU is not on. The tests and `vmm bench numa`
//! both run it; the write sampling under it is real userfaultfd.

use super::scanner::{NumaScanner, RoundStats, ScannerConfig};
use super::topology::{SimulatedTopology, Topology};
use crate::entry::PAGE_SIZE;
use crate::ram::{GuestRam, RamConfig, RamError};
use crate::region::RegionFlags;
use std::sync::{Arc, Barrier};

/// Where the drill's regions start (guest-physical), one per MiB.
const BASE: u64 = 64 << 20;

/// The drill's VM and host.
pub struct Drill {
    /// Guest RAM: a 4 MiB boot region and the drill's regions.
    pub ram: Arc<GuestRam>,
    /// The simulated host.
    pub topology: Arc<SimulatedTopology>,
    /// Per vCPU: the host addresses of its pages.
    pub pages: Vec<Vec<u64>>,
    nodes: u32,
}

/// One round of the drill: the scanner's stats and, per vCPU, the share of
/// its pages on its node afterwards.
pub type DrillRound = (RoundStats, Vec<f64>);

impl Drill {
    /// `regions` regions of `pages_per_region` pages shared out evenly among
    /// `vcpus` vCPUs on `nodes` nodes.
    pub fn new(
        vcpus: u32,
        regions: u64,
        pages_per_region: u64,
        nodes: u32,
    ) -> Result<Drill, RamError> {
        let ram = Arc::new(GuestRam::new(4 << 20, RamConfig::default())?);
        let nodes = nodes.max(1);
        let node_of = move |v: u32| v * nodes / vcpus.max(1);
        let mut owners = Vec::new();
        let mut pages = vec![Vec::new(); vcpus as usize];
        for i in 0..regions {
            let gpa = BASE + i * (1 << 20);
            let r = ram.add_region(gpa, pages_per_region * PAGE_SIZE, RegionFlags::default())?;
            let v = (i * vcpus as u64 / regions.max(1)) as u32;
            let host = r.host_of(gpa);
            owners.push((host, host + pages_per_region * PAGE_SIZE, v));
            pages[v as usize].extend((0..pages_per_region).map(|p| host + p * PAGE_SIZE));
        }
        let topology = Arc::new(SimulatedTopology::new(nodes, move |page| {
            let host = page * PAGE_SIZE;
            owners
                .iter()
                .find(|(s, e, _)| (*s..*e).contains(&host))
                .map_or(0, |(_, _, v)| (node_of(*v) + 1) % nodes)
        }));
        Ok(Drill {
            ram,
            topology,
            pages,
            nodes,
        })
    }

    /// The node of vCPU `v`.
    pub fn node_of(&self, v: u32) -> u32 {
        v * self.nodes / (self.pages.len() as u32).max(1)
    }

    /// Runs round 0 (the vCPUs populate their pages) and `rounds` more;
    /// the scanner (`cfg`, its vCPU nodes filled in) runs after each.
    pub fn run(&self, mut cfg: ScannerConfig, rounds: u32) -> Result<Vec<DrillRound>, RamError> {
        let vcpus = self.pages.len() as u32;
        cfg.vcpu_node = (0..vcpus).map(|v| self.node_of(v)).collect();
        let mut scanner = NumaScanner::new(cfg, self.topology.clone());
        let start = Arc::new(Barrier::new(vcpus as usize + 1));
        let done = Arc::new(Barrier::new(vcpus as usize + 1));
        let threads: Vec<_> = (0..vcpus)
            .map(|v| {
                let (ram, start, done) = (self.ram.clone(), start.clone(), done.clone());
                let mine = self.pages[v as usize].clone();
                std::thread::spawn(move || {
                    ram.register_vcpu_thread(v);
                    for round in 0..=rounds as u64 {
                        start.wait();
                        for h in &mine {
                            // SAFETY: a page of guest RAM's live mapping,
                            // which outlives this thread (joined below).
                            unsafe { (*h as *mut u64).write_volatile(round) };
                        }
                        done.wait();
                    }
                })
            })
            .collect();
        let mut out = Vec::new();
        let mut failure = None;
        for _ in 0..=rounds {
            start.wait();
            done.wait();
            match scanner.round(&self.ram) {
                Ok(stats) => out.push((stats, self.placement())),
                Err(e) => {
                    failure.get_or_insert(e);
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

    /// Per vCPU, the share of its pages on its node.
    pub fn placement(&self) -> Vec<f64> {
        self.pages
            .iter()
            .enumerate()
            .map(|(v, hosts)| {
                let on = self
                    .topology
                    .nodes_of(hosts)
                    .iter()
                    .filter(|n| **n == Some(self.node_of(v as u32)))
                    .count();
                on as f64 / hosts.len().max(1) as f64
            })
            .collect()
    }
}
