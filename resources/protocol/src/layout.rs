//! Guest-physical memory layout.
//!
//! ```text
//! 0x0000_0000  unused (null page)
//! 0x0000_1000  boot-info page            (BootInfo)
//! 0x0000_2000  GDT
//! 0x0000_3000  PML4
//! 0x0000_4000  PDPT
//! 0x0000_5000  page directories, one per GiB of guest RAM (2 MiB pages)
//! 0x0005_0000  per-vCPU state pages      (VcpuState, one page each)
//! 0x0010_0000  per-vCPU stacks           (STACK_SIZE each)
//! 0x0020_0000  guest kernel image        (linked here, at most 2 MiB)
//! 0x0040_0000  work area: vCPU v owns pages [v*N, (v+1)*N) for --pages N
//! after work   verify scratch: one u64 per work page, per vCPU
//!              (with several NUMA nodes, each node's vCPUs' pages and
//!              scratch start at that node's memory: see `WorkArea`)
//! ```
//! The whole of guest RAM is identity-mapped with 2 MiB pages.

use crate::numa::{NumaLayout, MAX_NODES};

/// Size of a guest page.
pub const PAGE_SIZE: u64 = 4096;
/// Most vCPUs a guest may have (the boot-info page holds one command slot each).
pub const MAX_VCPUS: usize = 64;
/// Guest-physical address of the boot-info page.
pub const BOOT_INFO_GPA: u64 = 0x1000;
/// Guest-physical address of the GDT.
pub const GDT_GPA: u64 = 0x2000;
/// Guest-physical address of the PML4.
pub const PML4_GPA: u64 = 0x3000;
/// Guest-physical address of the PDPT.
pub const PDPT_GPA: u64 = 0x4000;
/// Guest-physical address of the first page directory.
pub const PD_GPA: u64 = 0x5000;
/// Most page directories (so most GiB of guest RAM) the layout has room for.
pub const MAX_PDS: u64 = (STATE_GPA - PD_GPA) / PAGE_SIZE;
/// Largest guest RAM the layout can map.
pub const MAX_MEM_BYTES: u64 = MAX_PDS << 30;
/// Guest-physical address of vCPU 0's state page.
pub const STATE_GPA: u64 = 0x5_0000;
/// Guest-physical address of the stack area.
pub const STACK_GPA: u64 = 0x10_0000;
/// Stack size per vCPU.
pub const STACK_SIZE: u64 = 0x4000;
/// Where the guest kernel is linked.
pub const KERNEL_GPA: u64 = 0x20_0000;
/// First guest-physical address of the work area.
pub const WORK_GPA: u64 = 0x40_0000;

/// GDT selector of the 64-bit code segment.
pub const CODE_SELECTOR: u16 = 0x8;
/// GDT selector of the data segment.
pub const DATA_SELECTOR: u16 = 0x10;

/// Guest-physical address of vCPU `vcpu`'s state page.
pub const fn state_gpa(vcpu: u64) -> u64 {
    STATE_GPA + vcpu * PAGE_SIZE
}

/// Initial stack pointer of vCPU `vcpu` (top of its stack).
pub const fn stack_top(vcpu: u64) -> u64 {
    STACK_GPA + (vcpu + 1) * STACK_SIZE
}

/// Where the work area and the verify scratch lie for a given workload shape
/// and NUMA layout: each node's vCPUs own consecutive page ranges from the
/// start of that node's memory (past the fixed layout on node 0), followed
/// by their verify scratch, so a vCPU's pages and scratch lie on its node.
/// With one node this is `WORK_GPA`, every vCPU's pages in vCPU order, then
/// every vCPU's scratch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkArea {
    /// Number of vCPUs.
    pub vcpus: u64,
    /// Pages each vCPU owns.
    pub pages_per_vcpu: u64,
    /// The guest's NUMA topology.
    pub numa: NumaLayout,
    /// Page number of each vCPU's first work page (32 bits: the layout
    /// maps less than 16 TiB; half the bytes for the guest to fill in).
    base: [u32; MAX_VCPUS],
    /// Page number of each vCPU's first scratch page.
    scratch: [u32; MAX_VCPUS],
}

impl WorkArea {
    /// The work area of `vcpus` vCPUs (at most `MAX_VCPUS`) owning
    /// `pages_per_vcpu` pages each, laid out over `numa`'s nodes.
    pub fn new(vcpus: u64, pages_per_vcpu: u64, numa: NumaLayout) -> WorkArea {
        let vcpus = vcpus.min(MAX_VCPUS as u64);
        let mut area = WorkArea {
            vcpus,
            pages_per_vcpu,
            numa,
            base: [0; MAX_VCPUS],
            scratch: [0; MAX_VCPUS],
        };
        let work_bytes = pages_per_vcpu.saturating_mul(PAGE_SIZE);
        let scratch_bytes = area.scratch_bytes_per_vcpu();
        for node in 0..numa.nodes.clamp(1, MAX_NODES as u32) {
            let on_node = numa.vcpus_on(node, vcpus);
            let first = area.node_work_gpa(node);
            let first_scratch = first.saturating_add(on_node.saturating_mul(work_bytes));
            let mut i = 0;
            for v in 0..vcpus {
                if numa.node_of_vcpu(v) == node {
                    let base = first.saturating_add(i * work_bytes);
                    let scratch = first_scratch.saturating_add(i * scratch_bytes);
                    area.base[v as usize] = (base / PAGE_SIZE) as u32;
                    area.scratch[v as usize] = (scratch / PAGE_SIZE) as u32;
                    i += 1;
                }
            }
        }
        area
    }

    /// One node holding all of `mem_bytes`.
    pub fn single_node(vcpus: u64, pages_per_vcpu: u64, mem_bytes: u64) -> WorkArea {
        WorkArea::new(vcpus, pages_per_vcpu, NumaLayout::single(mem_bytes))
    }

    /// Where `node`'s work pages start.
    fn node_work_gpa(&self, node: u32) -> u64 {
        let r = self.numa.ranges[(node as usize).min(MAX_NODES - 1)];
        if r.gpa < WORK_GPA {
            WORK_GPA
        } else {
            r.gpa
        }
    }

    /// Guest-physical address of page `page` of vCPU `vcpu`'s range.
    pub fn page_gpa(&self, vcpu: u64, page: u64) -> u64 {
        (self.base[(vcpu as usize).min(MAX_VCPUS - 1)] as u64 + page) * PAGE_SIZE
    }

    /// Bytes of verify scratch per vCPU (page-aligned).
    pub const fn scratch_bytes_per_vcpu(&self) -> u64 {
        (self.pages_per_vcpu * 8).div_ceil(PAGE_SIZE) * PAGE_SIZE
    }

    /// Guest-physical address of vCPU `vcpu`'s scratch.
    pub fn vcpu_scratch_gpa(&self, vcpu: u64) -> u64 {
        self.scratch[(vcpu as usize).min(MAX_VCPUS - 1)] as u64 * PAGE_SIZE
    }

    /// The guest-physical ranges `[start, end)` of each node's work pages.
    pub fn node_work_ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let work_bytes = self.pages_per_vcpu * PAGE_SIZE;
        (0..self.numa.nodes.clamp(1, MAX_NODES as u32)).map(move |node| {
            let first = self.node_work_gpa(node);
            (
                first,
                first + self.numa.vcpus_on(node, self.vcpus) * work_bytes,
            )
        })
    }

    /// The first node whose vCPUs' pages and scratch do not fit in its
    /// memory: (node, bytes needed from the node's start, node bytes). A
    /// node without vCPUs (memory only) always fits.
    pub fn overflow(&self) -> Option<(u32, u64, u64)> {
        let per_vcpu = self.pages_per_vcpu * PAGE_SIZE + self.scratch_bytes_per_vcpu();
        (0..self.numa.nodes.clamp(1, MAX_NODES as u32)).find_map(|node| {
            let r = self.numa.ranges[node as usize];
            let on_node = self.numa.vcpus_on(node, self.vcpus);
            let end = self.node_work_gpa(node) + on_node * per_vcpu;
            (on_node > 0 && end > r.end()).then_some((node, end - r.gpa, r.bytes))
        })
    }

    /// Smallest guest RAM size that holds the layout and this work area
    /// on one node.
    pub const fn required_mem_bytes(&self) -> u64 {
        WORK_GPA + self.vcpus * (self.pages_per_vcpu * PAGE_SIZE + self.scratch_bytes_per_vcpu())
    }
}

// The fixed areas do not overlap.
const _: () = assert!(PD_GPA + MAX_PDS * PAGE_SIZE <= STATE_GPA);
const _: () = assert!(state_gpa(MAX_VCPUS as u64) <= STACK_GPA);
const _: () = assert!(stack_top(MAX_VCPUS as u64 - 1) <= KERNEL_GPA);
const _: () = assert!(KERNEL_GPA + 0x20_0000 <= WORK_GPA);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_area_sizes() {
        let w = WorkArea::single_node(2, 1000, 64 << 20);
        assert_eq!(w.page_gpa(1, 0), WORK_GPA + 1000 * PAGE_SIZE);
        assert_eq!(w.scratch_bytes_per_vcpu(), 8192);
        assert_eq!(w.vcpu_scratch_gpa(0), WORK_GPA + 2000 * PAGE_SIZE);
        assert_eq!(w.vcpu_scratch_gpa(1), WORK_GPA + 2000 * PAGE_SIZE + 8192);
        assert_eq!(
            w.required_mem_bytes(),
            WORK_GPA + 2000 * PAGE_SIZE + 2 * 8192
        );
        assert_eq!(w.overflow(), None);
        assert!(WorkArea::single_node(2, 1000, 8 << 20).overflow().is_some());
    }

    #[test]
    fn each_node_holds_its_vcpus_pages() {
        let numa = NumaLayout::new(&[16 << 20, 16 << 20], &[0, 1, 0, 1]).unwrap();
        let w = WorkArea::new(4, 100, numa);
        assert_eq!(w.page_gpa(0, 0), WORK_GPA);
        assert_eq!(w.page_gpa(2, 0), WORK_GPA + 100 * PAGE_SIZE);
        assert_eq!(w.page_gpa(1, 0), 16 << 20);
        assert_eq!(w.page_gpa(3, 5), (16 << 20) + 105 * PAGE_SIZE);
        assert_eq!(
            w.vcpu_scratch_gpa(3),
            (16 << 20) + 200 * PAGE_SIZE + PAGE_SIZE
        );
        let ranges: [(u64, u64); 2] = [
            (WORK_GPA, WORK_GPA + 200 * PAGE_SIZE),
            (16 << 20, (16 << 20) + 200 * PAGE_SIZE),
        ];
        assert!(w.node_work_ranges().eq(ranges));
        let tight = NumaLayout::new(&[32 << 20, 1 << 20], &[0, 1]).unwrap();
        assert_eq!(
            WorkArea::new(2, 300, tight).overflow(),
            Some((1, 300 * PAGE_SIZE + PAGE_SIZE, 1 << 20))
        );
        // A small memory-only node below the work area is fine.
        let memory_only = NumaLayout::new(&[2 << 20, 30 << 20], &[1, 1]).unwrap();
        assert_eq!(WorkArea::new(2, 300, memory_only).overflow(), None);
        assert_eq!(WorkArea::new(2, 300, memory_only).page_gpa(0, 0), WORK_GPA);
    }
}
