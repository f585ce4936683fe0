//! A validated description of the VM to boot and the workload to run.

use crate::size::format_size;
use guest_mem::RamConfig;
use guest_protocol::layout::{WorkArea, MAX_MEM_BYTES, MAX_VCPUS, PAGE_SIZE, WORK_GPA};
use guest_protocol::numa::{NumaLayout, MAX_NODES};
use guest_protocol::Workload;
use std::path::PathBuf;

/// Where the guest kernel comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelSource {
    /// The kernel built from `resources/guest` and embedded in `vmm`.
    Embedded,
    /// Another ELF, entered the same way.
    File(PathBuf),
}

/// Most bytes a ROM (`--rom`) may have.
pub const MAX_ROM_BYTES: u64 = 16 << 20;

/// Read-only memory at the top of guest memory: the last `bytes` of
/// `--mem`, carved from the last NUMA node; the guest's RAM lies below.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RomConfig {
    /// Its bytes: a page multiple, 0 for none.
    pub bytes: u64,
    /// The file loaded into it at boot (a restored VM's ROM comes back
    /// with its memory image).
    pub file: Option<PathBuf>,
}

/// Most bytes of memory shared with the host (`--shared-mem`).
pub const MAX_SHARED_BYTES: u64 = 1 << 30;

/// Memory shared with the host: a file mapped shared (not copy-on-write)
/// into the top of `--mem`, below the ROM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SharedMemConfig {
    /// Its bytes (the file's length): a page multiple, 0 for none.
    pub bytes: u64,
    /// The file.
    pub file: Option<PathBuf>,
    /// The file lies where the kernel lets a device pin its pages for long
    /// (tmpfs or hugetlbfs; not a disk filesystem's page cache).
    pub pinnable: bool,
}

/// The VM and its workload.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Bytes of guest RAM.
    pub mem_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// The workload every vCPU runs.
    pub workload: Workload,
    /// Pages each vCPU owns.
    pub pages: u64,
    /// Passes over the pages.
    pub passes: u64,
    /// The initial seed.
    pub seed: u64,
    /// Percent of writes in `mixed`.
    pub write_ratio: u32,
    /// The guest kernel.
    pub kernel: KernelSource,
    /// Run the guest oracle when the workload ends.
    pub verify_at_end: bool,
    /// Ask the guest to stop this long after its vCPUs started (idle: default 100 ms).
    pub stop_after: Option<std::time::Duration>,
    /// How guest RAM is backed and populated.
    pub ram: RamConfig,
    /// End a dirty-tracking round (a doorbell) after every pass.
    pub round_per_pass: bool,
    /// Dirty-page tracking backend, if any.
    pub track: Option<crate::dirty::TrackerKind>,
    /// Where the block device's disk comes from (`io` workload).
    pub disk: crate::devices::block::DiskSource,
    /// The guest's NUMA nodes, their host placement and the scanner.
    pub numa: crate::numa::NumaConfig,
    /// Guest-physical addresses whose pages are poisoned before the guest
    /// starts (injected memory errors).
    pub poison: Vec<u64>,
    /// Read-only memory at the top of guest memory, if any.
    pub rom: RomConfig,
    /// Memory shared with the host below the ROM, if any.
    pub shared_mem: SharedMemConfig,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            mem_bytes: 256 << 20,
            vcpus: 1,
            workload: Workload::SeqWrite,
            pages: 1024,
            passes: 2,
            seed: 1,
            write_ratio: 50,
            kernel: KernelSource::Embedded,
            verify_at_end: true,
            stop_after: None,
            ram: RamConfig::default(),
            round_per_pass: false,
            track: None,
            disk: Default::default(),
            numa: Default::default(),
            poison: Vec::new(),
            rom: RomConfig::default(),
            shared_mem: SharedMemConfig::default(),
        }
    }
}

/// Why a configuration cannot be booted. Each is a usage error (exit 2).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `--mem` is not page-aligned.
    #[error("--mem {0} is not a multiple of the 4 KiB page size")]
    MemNotAligned(u64),
    /// `--mem` cannot hold the fixed layout.
    #[error("--mem {} is too small for the guest layout: at least {} is needed", format_size(*.0), format_size(*.1))]
    MemTooSmall(u64, u64),
    /// `--mem` exceeds what the identity map covers.
    #[error("--mem {} is larger than the guest layout can map ({})", format_size(*.0), format_size(MAX_MEM_BYTES))]
    MemTooLarge(u64),
    /// `--mem` exceeds the host's RAM.
    #[error("--mem {} is larger than this host's RAM ({})", format_size(*.0), format_size(*.1))]
    MemExceedsHost(u64, u64),
    /// `--vcpus` out of range.
    #[error("--vcpus {0} is out of range: 1 to {1}")]
    Vcpus(u32, u32),
    /// `--pages` is zero.
    #[error("--pages must be at least 1")]
    ZeroPages,
    /// `--passes` is zero.
    #[error("--passes must be at least 1")]
    ZeroPasses,
    /// The work area does not fit.
    #[error("--pages {pages} with {vcpus} vCPU(s) needs {} of guest memory, but the guest's RAM (--mem, less any --rom) is {}; at most {max_pages} pages per vCPU fit", format_size(*needed), format_size(*mem))]
    PagesDoNotFit {
        /// Requested pages per vCPU.
        pages: u64,
        /// vCPUs.
        vcpus: u32,
        /// Bytes the layout needs.
        needed: u64,
        /// The guest's RAM: `--mem` less the ROM.
        mem: u64,
        /// Largest `--pages` that fits.
        max_pages: u64,
    },
    /// `--write-ratio` above 100.
    #[error("--write-ratio {0} is not a percentage (0 to 100)")]
    WriteRatio(u32),
    /// `--fault-around` is not a power of two in 1..=512.
    #[error("--fault-around {0} is not a power of two between 1 and 512")]
    FaultAround(u64),
    /// A diff snapshot's parent is not usable.
    #[error("{0}")]
    DiffParent(String),
    /// A fork was asked for with flags it cannot run with.
    #[error("{0}")]
    Fork(String),
    /// A NUMA topology or placement the VM cannot have.
    #[error("{0}")]
    Numa(String),
    /// A NUMA node too small for its vCPUs' pages.
    #[error("NUMA node {node} is {} but its vCPUs' pages and scratch need {}: give it more memory (--numa-layout) or use fewer --pages", format_size(*size), format_size(*needed))]
    NodeTooSmall {
        /// The node.
        node: u32,
        /// Bytes needed from its start.
        needed: u64,
        /// Its bytes.
        size: u64,
    },
    /// A `--rom` the VM cannot have.
    #[error("{0}")]
    Rom(String),
    /// A `--shared-mem` the VM cannot have, or cannot run with.
    #[error("{0}")]
    SharedMem(String),
    /// A `--poison` address the VM cannot have poisoned.
    #[error("--poison {gpa:#x}: {why}")]
    Poison {
        /// The address given.
        gpa: u64,
        /// Why not.
        why: String,
    },
    /// `--pages` beyond what a word can encode.
    #[error("--pages {0} is too large: a page index must fit in 24 bits")]
    PagesTooLarge(u64),
}

impl VmConfig {
    /// The guest's NUMA topology (one node unless asked otherwise; call
    /// after `validate`).
    pub fn numa_layout(&self) -> NumaLayout {
        let mut layout = self
            .numa
            .spec
            .as_ref()
            .and_then(|s| s.resolve(self.mem_bytes, self.vcpus).ok())
            .unwrap_or(NumaLayout::single(self.mem_bytes));
        // The shared memory and the ROM are the top of the last node's
        // memory: the guest's RAM (and its work area) lies below them.
        let last = last_node(&layout);
        layout.ranges[last].bytes = layout.ranges[last]
            .bytes
            .saturating_sub(self.rom.bytes + self.shared_mem.bytes);
        layout
    }

    /// Bytes of the guest's RAM: guest memory below the shared memory
    /// and the ROM.
    pub fn ram_bytes(&self) -> u64 {
        self.mem_bytes
            .saturating_sub(self.rom.bytes + self.shared_mem.bytes)
    }

    /// Where the ROM starts (the top of guest memory less its size).
    pub fn rom_gpa(&self) -> u64 {
        self.mem_bytes.saturating_sub(self.rom.bytes)
    }

    /// Where the shared memory starts (right below the ROM).
    pub fn shared_gpa(&self) -> u64 {
        self.ram_bytes()
    }

    /// The work area this configuration lays out.
    pub fn work_area(&self) -> WorkArea {
        WorkArea::new(self.vcpus as u64, self.pages, self.numa_layout())
    }

    fn validate_numa(&self) -> Result<(), ConfigError> {
        let numa = &self.numa;
        let layout = match &numa.spec {
            Some(s) => s
                .resolve(self.mem_bytes, self.vcpus)
                .map_err(|e| ConfigError::Numa(e.to_string()))?,
            None => NumaLayout::single(self.mem_bytes),
        };
        if let Some(r) = numa.remote_reads {
            if r > 100 {
                return Err(ConfigError::Numa(format!(
                    "--numa-remote-reads {r} is not a percentage (0 to 100)"
                )));
            }
            if self.workload != Workload::Mixed {
                return Err(ConfigError::Numa(
                    "--numa-remote-reads steers the mixed workload's reads: use --workload mixed"
                        .into(),
                ));
            }
            if layout.nodes < 2 {
                return Err(ConfigError::Numa(
                    "--numa-remote-reads needs --numa-nodes 2 or more".into(),
                ));
            }
        }
        if numa.scan_ms == Some(0) {
            return Err(ConfigError::Numa(
                "--numa-scan-ms must be at least 1".into(),
            ));
        }
        if numa.scan_ms.is_some() && self.track != Some(crate::dirty::TrackerKind::KvmRing) {
            if !self.ram.backing.uses_fault_engine() {
                return Err(ConfigError::Numa(
                    "the NUMA scanner samples writes with userfaultfd: use --backing memfd or anon, or --track kvm-ring".into(),
                ));
            }
            if self.track == Some(crate::dirty::TrackerKind::UffdAsync) {
                return Err(ConfigError::Numa(
                    "the NUMA scanner cannot sample writes beside --track uffd-async (the kernel resolves its faults): use another tracker, or kvm-ring".into(),
                ));
            }
        }
        Ok(())
    }

    /// True when the last NUMA node keeps RAM past the fixed layout below
    /// the shared memory and the ROM carved from its top.
    fn ram_below_top(&self) -> bool {
        let layout = self.numa_layout();
        let last = layout.ranges[last_node(&layout)];
        last.bytes > 0 && last.end() > WORK_GPA
    }

    fn validate_rom(&self) -> Result<(), ConfigError> {
        let bytes = self.rom.bytes;
        if bytes == 0 {
            return Ok(());
        }
        if !bytes.is_multiple_of(PAGE_SIZE) || bytes > MAX_ROM_BYTES {
            return Err(ConfigError::Rom(format!(
                "--rom: a ROM of {bytes} bytes: it must be 1 byte to {} (rounded up to 4 KiB pages)",
                format_size(MAX_ROM_BYTES)
            )));
        }
        if !self.ram_below_top() {
            return Err(ConfigError::Rom(format!(
                "--rom: a ROM of {} leaves no RAM below it in the last NUMA node: give the guest more --mem",
                format_size(bytes)
            )));
        }
        if self.poison.iter().any(|g| *g >= self.rom_gpa()) {
            return Err(ConfigError::Rom(
                "--poison may not aim at the --rom (its content is loaded at boot)".into(),
            ));
        }
        Ok(())
    }

    fn validate_shared_mem(&self) -> Result<(), ConfigError> {
        let bytes = self.shared_mem.bytes;
        if bytes == 0 {
            return Ok(());
        }
        let refuse = |why: String| Err(ConfigError::SharedMem(format!("--shared-mem: {why}")));
        if !bytes.is_multiple_of(PAGE_SIZE) || !(2 * PAGE_SIZE..=MAX_SHARED_BYTES).contains(&bytes)
        {
            return refuse(format!(
                "the file is {bytes} bytes; it must be a multiple of 4 KiB from 8 KiB to {} (truncate it to such a size)",
                format_size(MAX_SHARED_BYTES)
            ));
        }
        if !self.ram_below_top() {
            return refuse(format!(
                "{} of shared memory leaves no RAM below it in the last NUMA node: give the guest more --mem",
                format_size(bytes)
            ));
        }
        if self.numa.scan_ms.is_some() || self.numa.policy.is_some() {
            return refuse(
                "shared memory is the host's: the NUMA scanner and memory policies do not place it"
                    .into(),
            );
        }
        if self.poison.iter().any(|g| *g >= self.shared_gpa()) {
            return refuse("--poison may not aim at shared memory".into());
        }
        if self.workload == Workload::Io && !self.shared_mem.pinnable {
            return refuse(
                "the io workload's block device pins shared pages for long, which the kernel allows only in files on tmpfs (e.g. /dev/shm) or hugetlbfs".into(),
            );
        }
        Ok(())
    }

    fn validate_poison(&self) -> Result<(), ConfigError> {
        let refuse = |gpa: u64, why: String| Err(ConfigError::Poison { gpa, why });
        for &gpa in &self.poison {
            if !self.ram.backing.uses_fault_engine() {
                return refuse(
                    gpa,
                    "poisoning needs the fault engine: use --backing memfd or anon".into(),
                );
            }
            if gpa < WORK_GPA {
                return refuse(
                    gpa,
                    format!("the guest's layout below {WORK_GPA:#x} (page tables, boot info, kernel) is written at boot; poison a page from {WORK_GPA:#x} up"),
                );
            }
            if gpa >= self.mem_bytes {
                return refuse(
                    gpa,
                    format!("beyond guest RAM ({})", format_size(self.mem_bytes)),
                );
            }
        }
        Ok(())
    }

    /// Checks the configuration against the layout and the host.
    pub fn validate(&self, host_ram: Option<u64>) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus as usize > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus, MAX_VCPUS as u32));
        }
        if !self.mem_bytes.is_multiple_of(PAGE_SIZE) {
            return Err(ConfigError::MemNotAligned(self.mem_bytes));
        }
        let min = WORK_GPA + 2 * PAGE_SIZE;
        if self.mem_bytes < min {
            return Err(ConfigError::MemTooSmall(self.mem_bytes, min));
        }
        if self.mem_bytes > MAX_MEM_BYTES {
            return Err(ConfigError::MemTooLarge(self.mem_bytes));
        }
        if let Some(host) = host_ram {
            if self.mem_bytes > host {
                return Err(ConfigError::MemExceedsHost(self.mem_bytes, host));
            }
        }
        if self.pages == 0 {
            return Err(ConfigError::ZeroPages);
        }
        if self.pages > 1 << 24 {
            return Err(ConfigError::PagesTooLarge(self.pages));
        }
        if self.passes == 0 {
            return Err(ConfigError::ZeroPasses);
        }
        let fa = self.ram.fault_around_pages;
        if !(1..=512).contains(&fa) || !fa.is_power_of_two() {
            return Err(ConfigError::FaultAround(fa));
        }
        if self.write_ratio > 100 {
            return Err(ConfigError::WriteRatio(self.write_ratio));
        }
        self.validate_numa()?;
        self.validate_poison()?;
        self.validate_rom()?;
        self.validate_shared_mem()?;
        if self.numa.spec.as_ref().is_some_and(|s| s.nodes() > 1) {
            if let Some((node, needed, size)) = self.work_area().overflow() {
                return Err(ConfigError::NodeTooSmall { node, needed, size });
            }
            return Ok(());
        }
        let needed = self.work_area().required_mem_bytes();
        let ram = self.ram_bytes();
        if needed > ram {
            // Each page needs 4 KiB of work area plus 8 bytes of scratch.
            let per_vcpu = ram.saturating_sub(WORK_GPA) / self.vcpus as u64;
            let mut max_pages = per_vcpu / (PAGE_SIZE + 8);
            while max_pages > 0
                && WorkArea::single_node(self.vcpus as u64, max_pages, ram).required_mem_bytes()
                    > ram
            {
                max_pages -= 1;
            }
            return Err(ConfigError::PagesDoNotFit {
                pages: self.pages,
                vcpus: self.vcpus,
                needed,
                mem: ram,
                max_pages,
            });
        }
        Ok(())
    }
}

/// The index of `layout`'s last node.
fn last_node(layout: &NumaLayout) -> usize {
    (layout.nodes.clamp(1, MAX_NODES as u32) - 1) as usize
}

/// The host's physical RAM in bytes, if it can be read.
pub fn host_ram_bytes() -> Option<u64> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages > 0 && size > 0 {
        Some(pages as u64 * size as u64)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        assert_eq!(VmConfig::default().validate(Some(1 << 40)), Ok(()));
    }

    #[test]
    fn rejects_each_bad_value() {
        let c = |f: fn(&mut VmConfig)| {
            let mut c = VmConfig::default();
            f(&mut c);
            c.validate(Some(1 << 34))
        };
        assert!(matches!(
            c(|c| c.mem_bytes = 4097),
            Err(ConfigError::MemNotAligned(_))
        ));
        assert!(matches!(
            c(|c| c.mem_bytes = 1 << 20),
            Err(ConfigError::MemTooSmall(..))
        ));
        assert!(matches!(
            c(|c| c.mem_bytes = 1 << 40),
            Err(ConfigError::MemTooLarge(_))
        ));
        assert!(matches!(
            c(|c| c.mem_bytes = 32 << 30),
            Err(ConfigError::MemExceedsHost(..))
        ));
        assert!(matches!(c(|c| c.vcpus = 0), Err(ConfigError::Vcpus(0, _))));
        assert!(matches!(c(|c| c.pages = 0), Err(ConfigError::ZeroPages)));
        assert!(matches!(c(|c| c.passes = 0), Err(ConfigError::ZeroPasses)));
        assert!(matches!(
            c(|c| c.write_ratio = 101),
            Err(ConfigError::WriteRatio(101))
        ));
        let e = c(|c| {
            c.mem_bytes = 8 << 20;
            c.pages = 2000;
        });
        match e {
            Err(ConfigError::PagesDoNotFit { max_pages, .. }) => {
                let mut ok = VmConfig {
                    mem_bytes: 8 << 20,
                    pages: max_pages,
                    ..VmConfig::default()
                };
                assert_eq!(ok.validate(None), Ok(()));
                ok.pages += 1;
                assert!(ok.validate(None).is_err());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
