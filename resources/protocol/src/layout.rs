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
//! ```
//! The whole of guest RAM is identity-mapped with 2 MiB pages.

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

/// Where the work area and the verify scratch lie for a given workload shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkArea {
    /// Number of vCPUs.
    pub vcpus: u64,
    /// Pages each vCPU owns.
    pub pages_per_vcpu: u64,
}

impl WorkArea {
    /// Guest-physical address of page `page` of vCPU `vcpu`'s range.
    pub const fn page_gpa(&self, vcpu: u64, page: u64) -> u64 {
        WORK_GPA + (vcpu * self.pages_per_vcpu + page) * PAGE_SIZE
    }

    /// Bytes of verify scratch per vCPU (page-aligned).
    pub const fn scratch_bytes_per_vcpu(&self) -> u64 {
        (self.pages_per_vcpu * 8).div_ceil(PAGE_SIZE) * PAGE_SIZE
    }

    /// Guest-physical address of the first scratch byte.
    pub const fn scratch_gpa(&self) -> u64 {
        WORK_GPA + self.vcpus * self.pages_per_vcpu * PAGE_SIZE
    }

    /// Guest-physical address of vCPU `vcpu`'s scratch.
    pub const fn vcpu_scratch_gpa(&self, vcpu: u64) -> u64 {
        self.scratch_gpa() + vcpu * self.scratch_bytes_per_vcpu()
    }

    /// Smallest guest RAM size that holds the layout and this work area.
    pub const fn required_mem_bytes(&self) -> u64 {
        self.scratch_gpa() + self.vcpus * self.scratch_bytes_per_vcpu()
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
        let w = WorkArea {
            vcpus: 2,
            pages_per_vcpu: 1000,
        };
        assert_eq!(w.page_gpa(1, 0), WORK_GPA + 1000 * PAGE_SIZE);
        assert_eq!(w.scratch_bytes_per_vcpu(), 8192);
        assert_eq!(
            w.required_mem_bytes(),
            WORK_GPA + 2000 * PAGE_SIZE + 2 * 8192
        );
    }
}
