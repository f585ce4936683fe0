//! Long-mode boot state built by the VMM: identity page tables, the GDT, the
//! boot-info and vCPU state pages, and each vCPU's registers. There is no
//! real-mode trampoline: every vCPU starts at the kernel's entry in 64-bit
//! mode with `rdi` = its index and `rsi` = the boot-info page.

use crate::config::VmConfig;
use guest_mem::{GuestRam, RamError};
use guest_protocol::boot_info::{
    rom_sum, PageStruct, BOOT_INFO_MAGIC, BOOT_INFO_VERSION, FLAG_ROUND_PER_PASS,
};
use guest_protocol::layout::{
    self, BOOT_INFO_GPA, CODE_SELECTOR, DATA_SELECTOR, GDT_GPA, PAGE_SIZE, PDPT_GPA, PD_GPA,
    PML4_GPA, STATE_GPA,
};
use guest_protocol::{BootInfo, Command, VcpuState};
use kvm_bindings::{
    kvm_fpu, kvm_mp_state, kvm_regs, kvm_segment, kvm_sregs, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_MP_STATE_RUNNABLE,
};
use kvm_ioctls::{Kvm, VcpuFd};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_MP: u64 = 1 << 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_WP: u64 = 1 << 16;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const X86_CR4_OSFXSR: u64 = 1 << 9;
const X86_CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;
const TSS_SELECTOR: u16 = 0x18;

/// Failures setting up the boot state.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Writing a boot structure into guest RAM failed.
    #[error("cannot write boot structures into guest memory: {0}")]
    Memory(#[from] RamError),
    /// A vCPU register ioctl failed.
    #[error("cannot set up vCPU {vcpu} ({what}): {source}")]
    Vcpu {
        /// The vCPU index.
        vcpu: u32,
        /// Which state.
        what: &'static str,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
}

/// The 64-bit GDT: null, code, data, TSS.
const GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff, // code: present, ring 0, execute/read, long mode, 4 KiB granularity
    0x00cf_9300_0000_ffff, // data: present, ring 0, read/write, 32-bit, 4 KiB granularity
    0x0080_8b00_0000_0067, // TSS: present, 64-bit busy TSS, limit 0x67
];

/// Writes the identity page tables (2 MiB pages over all of guest RAM), the
/// GDT, the boot-info page and one fresh state page per vCPU.
pub fn write_boot_structures(ram: &GuestRam, config: &VmConfig) -> Result<(), BootError> {
    let mem = ram.size();
    let huge = 2u64 << 20;
    let pds = mem.div_ceil(1 << 30);
    ram.store_u64(PML4_GPA, PDPT_GPA | PTE_PRESENT | PTE_WRITE)?;
    for i in 0..pds {
        ram.store_u64(
            PDPT_GPA + i * 8,
            (PD_GPA + i * PAGE_SIZE) | PTE_PRESENT | PTE_WRITE,
        )?;
    }
    for n in 0..mem.div_ceil(huge) {
        ram.store_u64(
            PD_GPA + n * 8,
            (n * huge) | PTE_PRESENT | PTE_WRITE | PTE_HUGE,
        )?;
    }
    for (i, entry) in GDT.iter().enumerate() {
        ram.store_u64(GDT_GPA + i as u64 * 8, *entry)?;
    }
    let area = config.work_area();
    let info = BootInfo {
        magic: BOOT_INFO_MAGIC,
        version: BOOT_INFO_VERSION,
        num_vcpus: config.vcpus,
        mem_bytes: mem,
        work_gpa: layout::WORK_GPA,
        pages_per_vcpu: config.pages,
        scratch_gpa: area.vcpu_scratch_gpa(0),
        scratch_bytes_per_vcpu: area.scratch_bytes_per_vcpu(),
        state_gpa: STATE_GPA,
        workload: config.workload as u32,
        write_ratio: config.write_ratio,
        passes: config.passes,
        verify_at_end: config.verify_at_end as u32,
        flags: if config.round_per_pass {
            FLAG_ROUND_PER_PASS
        } else {
            0
        },
        commands: [Command::default(); layout::MAX_VCPUS],
        remote_reads: config
            .numa
            .remote_reads
            .unwrap_or(guest_protocol::boot_info::REMOTE_READS_ANY),
        reserved: 0,
        numa: area.numa,
        rom_gpa: if config.rom.bytes > 0 {
            config.rom_gpa()
        } else {
            0
        },
        rom_bytes: config.rom.bytes,
        rom_sum: rom_sum_of(ram, config)?,
        shared_gpa: if config.shared_mem.bytes > 0 {
            config.shared_gpa()
        } else {
            0
        },
        shared_bytes: config.shared_mem.bytes,
    };
    ram.write(BOOT_INFO_GPA, info.as_bytes())?;
    for v in 0..config.vcpus as u64 {
        ram.write(layout::state_gpa(v), VcpuState::new(config.seed).as_bytes())?;
    }
    Ok(())
}

/// [`rom_sum`] of the ROM as it lies in `ram` (0 without one).
fn rom_sum_of(ram: &GuestRam, config: &VmConfig) -> Result<u64, BootError> {
    let start = config.rom_gpa();
    let words = (0..config.rom.bytes / PAGE_SIZE)
        .map(|page| ram.load_u64(start + page * PAGE_SIZE))
        .collect::<Result<Vec<u64>, RamError>>()?;
    Ok(rom_sum(words.into_iter()))
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The CPUID table a vCPU gets: what KVM supports, with the vCPU's APIC id.
pub fn cpuid_for(kvm: &Kvm, vcpu: u32) -> Result<CpuId, kvm_ioctls::Error> {
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (vcpu << 24),
            0xb | 0x1f => e.edx = vcpu,
            _ => {}
        }
    }
    Ok(cpuid)
}

/// Puts vCPU `index` into 64-bit mode at `entry`.
pub fn setup_vcpu(kvm: &Kvm, fd: &VcpuFd, index: u32, entry: u64) -> Result<(), BootError> {
    let err = |what| {
        move |source| BootError::Vcpu {
            vcpu: index,
            what,
            source,
        }
    };
    let cpuid = cpuid_for(kvm, index).map_err(err("supported CPUID"))?;
    fd.set_cpuid2(&cpuid).map_err(err("CPUID"))?;

    let mut sregs: kvm_sregs = fd.get_sregs().map_err(err("get special registers"))?;
    sregs.cs = segment(CODE_SELECTOR, 0xb, true);
    let data = segment(DATA_SELECTOR, 0x3, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: TSS_SELECTOR,
        type_: 0xb,
        present: 1,
        s: 0,
        g: 0,
        ..Default::default()
    };
    sregs.ldt = kvm_segment {
        type_: 0x2,
        present: 1,
        unusable: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_WP | X86_CR0_PG;
    sregs.cr3 = PML4_GPA;
    sregs.cr4 = X86_CR4_PAE | X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    fd.set_sregs(&sregs).map_err(err("special registers"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(err("FPU"))?;

    let regs = kvm_regs {
        rip: entry,
        rsp: layout::stack_top(index as u64),
        rdi: index as u64,
        rsi: BOOT_INFO_GPA,
        rflags: 0x2,
        ..Default::default()
    };
    fd.set_regs(&regs).map_err(err("registers"))?;
    // With the in-kernel irqchip, application processors start waiting for
    // a startup IPI; every vCPU here starts at the entry point directly.
    fd.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })
    .map_err(err("MP state"))?;
    Ok(())
}

/// A one-line dump of a vCPU's registers for error reports.
pub fn describe_registers(fd: &VcpuFd) -> String {
    match (fd.get_regs(), fd.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} \
             cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, s.cr0, s.cr2, s.cr3,
            s.cr4, s.efer, s.cs.selector
        ),
        (Err(e), _) | (_, Err(e)) => format!("(registers unavailable: {e})"),
    }
}
