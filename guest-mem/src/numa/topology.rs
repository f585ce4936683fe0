//! Where host memory lives: the host's NUMA nodes (sysfs, `move_pages`),
//! or a simulated multi-node host, behind one trait, so the placement
//! logic runs the same on both.

use crate::entry::PAGE_SIZE;
use crate::sync::LockOrRecover;
use std::collections::HashMap;
use std::sync::Mutex;

/// A host's NUMA nodes, as the scanner needs them.
pub trait Topology: Send + Sync {
    /// Number of nodes.
    fn nodes(&self) -> u32;
    /// The node of each host page (`None`: not resident, or unknown).
    fn nodes_of(&self, hosts: &[u64]) -> Vec<Option<u32>>;
    /// Moves the host pages `hosts` to `node`; returns how many moved.
    fn move_to(&self, hosts: &[u64], node: u32) -> u64;
}

/// This host's nodes: counted in sysfs, queried and moved with
/// `move_pages(2)`.
pub struct HostTopology {
    nodes: u32,
}

impl HostTopology {
    /// The nodes `/sys/devices/system/node` lists (at least one).
    pub fn detect() -> HostTopology {
        let nodes = std::fs::read_dir("/sys/devices/system/node")
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| {
                        let n = e.file_name();
                        let n = n.to_string_lossy();
                        n.strip_prefix("node")
                            .is_some_and(|i| i.parse::<u32>().is_ok())
                    })
                    .count() as u32
            })
            .unwrap_or(1)
            .max(1);
        HostTopology { nodes }
    }

    fn move_pages(hosts: &[u64], nodes: Option<&[i32]>) -> Vec<i32> {
        let ptrs: Vec<*mut libc::c_void> = hosts.iter().map(|h| *h as *mut libc::c_void).collect();
        let mut status = vec![-1i32; hosts.len()];
        // SAFETY: move_pages on our own process (pid 0) with arrays of
        // `hosts.len()` entries each, which outlive the call.
        unsafe {
            libc::syscall(
                libc::SYS_move_pages,
                0,
                hosts.len() as libc::c_ulong,
                ptrs.as_ptr(),
                nodes.map_or(std::ptr::null(), |n| n.as_ptr()),
                status.as_mut_ptr(),
                0,
            );
        }
        status
    }
}

impl Topology for HostTopology {
    fn nodes(&self) -> u32 {
        self.nodes
    }

    fn nodes_of(&self, hosts: &[u64]) -> Vec<Option<u32>> {
        HostTopology::move_pages(hosts, None)
            .into_iter()
            .map(|s| u32::try_from(s).ok())
            .collect()
    }

    fn move_to(&self, hosts: &[u64], node: u32) -> u64 {
        let target = vec![node as i32; hosts.len()];
        HostTopology::move_pages(hosts, Some(&target))
            .into_iter()
            .filter(|s| *s == node as i32)
            .count() as u64
    }
}

/// A simulated multi-node host: each page's node is a number in a table
/// (pages start on `initial`); moving a page changes that number. Memory
/// itself does not move: tests and benchmarks use it to check placement
/// logic on a host with one node.
pub struct SimulatedTopology {
    nodes: u32,
    placement: Mutex<HashMap<u64, u32>>,
    initial: Box<dyn Fn(u64) -> u32 + Send + Sync>,
}

impl SimulatedTopology {
    /// `nodes` nodes; a page not moved yet is on `initial(host page)`.
    pub fn new(nodes: u32, initial: impl Fn(u64) -> u32 + Send + Sync + 'static) -> Self {
        SimulatedTopology {
            nodes: nodes.max(1),
            placement: Mutex::new(HashMap::new()),
            initial: Box::new(initial),
        }
    }
}

impl Topology for SimulatedTopology {
    fn nodes(&self) -> u32 {
        self.nodes
    }

    fn nodes_of(&self, hosts: &[u64]) -> Vec<Option<u32>> {
        let p = self.placement.lock_or_recover();
        hosts
            .iter()
            .map(|h| {
                let page = h / PAGE_SIZE;
                Some(
                    p.get(&page)
                        .copied()
                        .unwrap_or_else(|| (self.initial)(page)),
                )
            })
            .collect()
    }

    fn move_to(&self, hosts: &[u64], node: u32) -> u64 {
        if node >= self.nodes {
            return 0;
        }
        let mut p = self.placement.lock_or_recover();
        for h in hosts {
            p.insert(h / PAGE_SIZE, node);
        }
        hosts.len() as u64
    }
}
