//! NUMA in a run: the guest's topology (`--numa-nodes`, `--numa-layout`:
//! [`topology`]), where its nodes go on the host (memory policies per
//! node region, vCPU thread affinity, the placement report: [`placement`]),
//! and the scanner that keeps pages on their users' node while the guest
//! runs ([`scan`]).

pub mod placement;
pub mod scan;
pub mod topology;

use guest_mem::numa::policy::NumaPolicy;

/// The NUMA settings of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NumaConfig {
    /// The guest's nodes (none: one node, nothing placed unless a policy
    /// is asked for).
    pub spec: Option<topology::NumaSpec>,
    /// A host memory policy for each node's region.
    pub policy: Option<NumaPolicy>,
    /// The host node of each guest node (default: guest node `k` on host
    /// node `k % host nodes`).
    pub host_nodes: Option<Vec<u32>>,
    /// Percent of `mixed`'s reads that target another node's vCPUs.
    pub remote_reads: Option<u32>,
    /// Run the NUMA scanner every this many milliseconds.
    pub scan_ms: Option<u64>,
    /// Simulated host nodes for the scanner (this host's otherwise).
    pub scan_simulated_nodes: Option<u32>,
    /// The host node of each guest node where a snapshot was taken (a
    /// restore places them there again, mapped onto this host).
    pub recorded_host_nodes: Option<Vec<u32>>,
}

impl NumaConfig {
    /// True when guest nodes are placed on host nodes (a topology or a
    /// policy was asked for).
    pub fn places(&self) -> bool {
        self.spec.is_some() || self.policy.is_some()
    }
}

/// Lays out guest memory before the guest runs: splits `ram` into the
/// configuration's guest nodes, one region each, then carves the ROM (if
/// any) from the top of the last and the shared memory (if any) below it.
pub fn split(
    config: &crate::config::VmConfig,
    ram: &mut guest_mem::GuestRam,
) -> Result<(), guest_mem::RamError> {
    let layout = config.numa_layout();
    let mut sizes: Vec<u64> = layout.ranges[..layout.nodes as usize]
        .iter()
        .map(|r| r.bytes)
        .collect();
    // The last node's region holds the shared memory and the ROM too
    // until they are carved from its top.
    let rom = config.rom.bytes;
    if let Some(last) = sizes.last_mut() {
        *last += rom + config.shared_mem.bytes;
    }
    ram.split_into_nodes(&sizes)?;
    if rom > 0 {
        ram.set_rom(rom)?;
    }
    crate::devices::shared_mem::map_into(ram, &config.shared_mem)
        .map_err(|e| guest_mem::RamError::Describe(e.to_string()))
}

/// When the configuration asks for placement, places the guest's nodes on
/// this host: each region's memory policy now, the vCPU threads' affinity
/// when they start.
pub fn place(
    config: &crate::config::VmConfig,
    ram: &guest_mem::GuestRam,
) -> Result<Option<std::sync::Arc<placement::Placement>>, crate::runner::RunError> {
    if !config.numa.places() {
        return Ok(None);
    }
    let layout = config.numa_layout();
    let host = guest_mem::numa::topology::HostTopology::detect();
    let vcpu_node = (0..config.vcpus as u64)
        .map(|v| layout.node_of_vcpu(v))
        .collect();
    let placement = placement::Placement::plan(
        layout.nodes,
        vcpu_node,
        config.numa.policy,
        config.numa.host_nodes.as_deref(),
        config.numa.recorded_host_nodes.as_deref(),
        &host,
    )
    .map_err(|e| crate::config::ConfigError::Numa(e.to_string()))?;
    if let Some(note) = &placement.note {
        log::info!("{note}");
    }
    placement.apply_memory(ram)?;
    Ok(Some(std::sync::Arc::new(placement)))
}

/// The scanner a run asks for: its vCPUs' host nodes from the placement
/// (node 0 without one; guest node modulo the simulated nodes on a
/// simulated host), its signal the dirty rings when the ring tracker runs.
pub fn scan_driver(
    config: &crate::config::VmConfig,
    placement: Option<&placement::Placement>,
    vcpus: usize,
) -> Option<scan::ScanDriver> {
    let every = config.numa.scan_ms?;
    let layout = config.numa_layout();
    let vcpu_host_node = (0..vcpus as u64)
        .map(|v| {
            let node = layout.node_of_vcpu(v);
            match (config.numa.scan_simulated_nodes, placement) {
                (Some(n), _) => node % n.max(1),
                (None, Some(p)) => p.host_node_of(node),
                (None, None) => 0,
            }
        })
        .collect();
    let signal = if config.track == Some(crate::dirty::TrackerKind::KvmRing) {
        guest_mem::numa::scanner::SampleSignal::DirtyRing
    } else {
        guest_mem::numa::scanner::SampleSignal::WriteProtect
    };
    Some(scan::ScanDriver::new(
        vcpu_host_node,
        every,
        signal,
        config.numa.scan_simulated_nodes,
    ))
}

/// The `numa` object of a run's report, when anything was placed or
/// scanned.
pub fn report(
    placement: Option<&placement::Placement>,
    ram: &guest_mem::GuestRam,
    scanner: Option<scan::ScanReport>,
) -> Option<placement::NumaReport> {
    if placement.is_none() && scanner.is_none() {
        return None;
    }
    let host = guest_mem::numa::topology::HostTopology::detect();
    let mut report = match placement {
        Some(p) => p.report(ram, &host),
        None => {
            use guest_mem::numa::topology::Topology;
            placement::NumaReport {
                host_nodes: host.nodes(),
                guest_nodes: ram.boot_regions().len() as u32,
                note: None,
                regions: Vec::new(),
                vcpus: Vec::new(),
                scanner: None,
            }
        }
    };
    report.scanner = scanner;
    Some(report)
}
