//! Where the guest's NUMA nodes go on this host: each node's region gets a
//! host memory policy (`mbind`), each vCPU thread the CPUs of its node's
//! host node (`sched_setaffinity`), and the report reads both back
//! (`get_mempolicy`, `move_pages` queries, `sched_getaffinity`).

use guest_mem::numa::policy::NumaPolicy;
use guest_mem::numa::topology::{HostTopology, Topology};
use guest_mem::{GuestRam, LockOrRecover, RamError};
use serde::Serialize;
use std::sync::Mutex;

/// Where each guest node lives on this host.
#[derive(Debug)]
pub struct Placement {
    /// The host node of each guest node.
    pub host_node: Vec<u32>,
    /// The memory policy each node's region gets.
    pub policy: Option<NumaPolicy>,
    /// Host nodes on this host.
    pub host_nodes: u32,
    /// How a recorded placement was mapped onto this host, when it had to
    /// change.
    pub note: Option<String>,
    /// Each vCPU's guest node.
    pub vcpu_node: Vec<u32>,
    /// The CPUs each vCPU thread ended up allowed on (read back).
    affinity: Mutex<Vec<Option<Vec<usize>>>>,
}

/// One region's placement, as reported.
#[derive(Clone, Debug, Serialize)]
pub struct RegionPlacementReport {
    /// The guest node (0 for RAM that is not split).
    pub guest_node: u32,
    /// First guest-physical address.
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
    /// The host node the guest node is placed on.
    pub host_node: u32,
    /// The policy the kernel reports for the region (`get_mempolicy`).
    pub policy: String,
    /// That policy's nodes.
    pub nodes: Vec<u32>,
    /// Resident pages per host node (`move_pages` queries).
    pub pages_per_node: Vec<u64>,
    /// The vCPUs that faulted on it or wrote it (its accessor bitmap, ids
    /// modulo 64), since the scanner last renewed it.
    pub accessors: Vec<u32>,
}

/// One vCPU's placement, as reported.
#[derive(Clone, Debug, Serialize)]
pub struct VcpuPlacementReport {
    /// vCPU id.
    pub vcpu: u32,
    /// Its guest node.
    pub guest_node: u32,
    /// That node's host node.
    pub host_node: u32,
    /// The CPUs its thread may run on (`sched_getaffinity`).
    pub cpus: Vec<usize>,
}

/// The `numa` object of a run's report.
#[derive(Clone, Debug, Serialize)]
pub struct NumaReport {
    /// Host NUMA nodes (from sysfs).
    pub host_nodes: u32,
    /// Guest NUMA nodes.
    pub guest_nodes: u32,
    /// How a recorded placement was mapped onto this host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Each region.
    pub regions: Vec<RegionPlacementReport>,
    /// Each vCPU.
    pub vcpus: Vec<VcpuPlacementReport>,
    /// The scanner's work (with `--numa-scan-ms`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scanner: Option<super::scan::ScanReport>,
}

/// A placement that cannot be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    /// `--numa-host-nodes` has the wrong length.
    #[error("--numa-host-nodes names {0} host node(s), but the guest has {1} NUMA node(s)")]
    Count(usize, usize),
    /// `--numa-host-nodes` names a node this host lacks.
    #[error("--numa-host-nodes: host node {0} does not exist; this host has {1} node(s)")]
    NoSuchNode(u32, u32),
}

impl Placement {
    /// Plans `guest_nodes` guest nodes (vCPU `v` on `vcpu_node[v]`) on
    /// `host`: on `requested` host nodes (`--numa-host-nodes`), else on
    /// those `recorded` in a snapshot (a node this host lacks wraps round,
    /// and the note says so), else guest node `k` on host node `k % host
    /// nodes`.
    pub fn plan(
        guest_nodes: u32,
        vcpu_node: Vec<u32>,
        policy: Option<NumaPolicy>,
        requested: Option<&[u32]>,
        recorded: Option<&[u32]>,
        host: &HostTopology,
    ) -> Result<Placement, PlacementError> {
        let host_nodes = host.nodes();
        let mut note = None;
        let host_node = match (requested, recorded) {
            (Some(r), _) => {
                if r.len() != guest_nodes as usize {
                    return Err(PlacementError::Count(r.len(), guest_nodes as usize));
                }
                if let Some(n) = r.iter().find(|n| **n >= host_nodes) {
                    return Err(PlacementError::NoSuchNode(*n, host_nodes));
                }
                r.to_vec()
            }
            (None, Some(saved)) if saved.len() == guest_nodes as usize => {
                let mapped: Vec<u32> = saved.iter().map(|n| n % host_nodes).collect();
                if mapped != saved {
                    note = Some(format!(
                        "the snapshot placed guest nodes on host nodes {saved:?}; this host has \
                         {host_nodes} node(s), so they go on host nodes {mapped:?}"
                    ));
                }
                mapped
            }
            _ => (0..guest_nodes).map(|k| k % host_nodes).collect(),
        };
        Ok(Placement {
            host_node,
            policy,
            host_nodes,
            note,
            affinity: Mutex::new(vec![None; vcpu_node.len()]),
            vcpu_node,
        })
    }

    /// The host node of guest node `node`.
    pub fn host_node_of(&self, node: u32) -> u32 {
        self.host_node.get(node as usize).copied().unwrap_or(0)
    }

    /// Gives each node's region its policy: `bind` and `preferred` on the
    /// node's host node, `interleave` over every host node. Pages allocated
    /// from now on follow it.
    pub fn apply_memory(&self, ram: &GuestRam) -> Result<(), RamError> {
        let Some(policy) = self.policy else {
            return Ok(());
        };
        let all: Vec<u32> = (0..self.host_nodes).collect();
        ram.apply_numa_policy(policy, &|guest_node| match policy {
            NumaPolicy::Interleave => all.clone(),
            _ => vec![self.host_node_of(guest_node.unwrap_or(0))],
        })
    }

    /// Pins the calling thread, vCPU `vcpu`'s, to its host node's CPUs and
    /// records what the kernel then allows it. A failure is logged: the
    /// vCPU runs anywhere, and the report shows where.
    pub fn pin_vcpu_thread(&self, vcpu: u32) {
        let node = self.vcpu_node.get(vcpu as usize).copied().unwrap_or(0);
        let cpus = node_cpus(self.host_node_of(node));
        if let Err(e) = set_affinity(&cpus) {
            log::warn!("vCPU {vcpu}: cannot pin to host node CPUs {cpus:?}: {e}");
        }
        if let Some(slot) = self.affinity.lock_or_recover().get_mut(vcpu as usize) {
            *slot = Some(current_affinity());
        }
    }

    /// The placement report: each region's policy and pages per host node,
    /// each vCPU's node and allowed CPUs.
    pub fn report(&self, ram: &GuestRam, host: &HostTopology) -> NumaReport {
        let regions = ram
            .numa_placement(host)
            .into_iter()
            .map(|p| {
                let guest_node = p.guest_node.unwrap_or(0);
                RegionPlacementReport {
                    guest_node,
                    gpa: p.gpa,
                    size: p.size,
                    host_node: self.host_node_of(guest_node),
                    policy: p.policy,
                    nodes: p.nodes,
                    pages_per_node: p.pages_per_node,
                    accessors: (0..64).filter(|v| p.accessors & (1 << v) != 0).collect(),
                }
            })
            .collect();
        let affinity = self.affinity.lock_or_recover().clone();
        let vcpus = self
            .vcpu_node
            .iter()
            .enumerate()
            .map(|(v, node)| VcpuPlacementReport {
                vcpu: v as u32,
                guest_node: *node,
                host_node: self.host_node_of(*node),
                cpus: affinity.get(v).cloned().flatten().unwrap_or_default(),
            })
            .collect();
        NumaReport {
            host_nodes: self.host_nodes,
            guest_nodes: self.host_node.len() as u32,
            note: self.note.clone(),
            regions,
            vcpus,
            scanner: None,
        }
    }
}

/// The CPUs of host node `node` (sysfs `cpulist`); every online CPU when
/// the node does not say.
pub fn node_cpus(node: u32) -> Vec<usize> {
    std::fs::read_to_string(format!("/sys/devices/system/node/node{node}/cpulist"))
        .ok()
        .map(|s| parse_cpulist(s.trim()))
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| {
            // SAFETY: sysconf has no memory-safety preconditions.
            let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
            (0..n).collect()
        })
}

/// Parses a kernel CPU list such as `0-3,8,10-11`.
pub fn parse_cpulist(s: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                    out.extend(a..=b);
                }
            }
            None => out.extend(part.parse::<usize>().ok()),
        }
    }
    out
}

fn set_affinity(cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it
    // for indices below CPU_SETSIZE, which the filter keeps.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for c in cpus.iter().filter(|c| **c < libc::CPU_SETSIZE as usize) {
            libc::CPU_SET(*c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The CPUs the calling thread may run on.
pub fn current_affinity() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills the set we own; CPU_ISSET reads it
    // for indices below CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|c| libc::CPU_ISSET(*c, &set))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpulists_parse() {
        assert_eq!(parse_cpulist("0-3,8,10-11"), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_cpulist(""), Vec::<usize>::new());
    }

    #[test]
    fn plans_follow_request_record_or_default() {
        let host = HostTopology::detect();
        let n = host.nodes();
        let p = Placement::plan(2, vec![0, 1], None, None, None, &host).unwrap();
        assert_eq!(p.host_node, vec![0, 1 % n]);
        assert_eq!(
            Placement::plan(2, vec![0], None, Some(&[0]), None, &host).unwrap_err(),
            PlacementError::Count(1, 2)
        );
        assert_eq!(
            Placement::plan(1, vec![0], None, Some(&[n]), None, &host).unwrap_err(),
            PlacementError::NoSuchNode(n, n)
        );
        // A recorded node this host lacks wraps round, and the note says so.
        let p = Placement::plan(2, vec![0, 1], None, None, Some(&[0, n]), &host).unwrap();
        assert_eq!(p.host_node, vec![0, 0]);
        assert!(p
            .note
            .as_deref()
            .is_some_and(|s| s.contains("this host has")));
    }
}
