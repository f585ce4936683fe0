//! `state.bin`: the machine, every vCPU's state, the in-kernel irqchip,
//! device state, table markers and memory checksums, serialized with serde
//! (postcard) inside a checked envelope:
//!
//! ```text
//! +----------+---------+-----------+---------------------------+---------+
//! | "VMMSNAP1" | version | body_len  | body (postcard, SnapshotState) | crc32 |
//! |  8 bytes   | u32 LE  | u64 LE    | body_len bytes               | u32 LE  |
//! +----------+---------+-----------+---------------------------+---------+
//! ```
//! The CRC covers everything before it. Every size read from the file is
//! capped before anything is allocated.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// File magic.
pub const STATE_MAGIC: &[u8; 8] = b"VMMSNAP1";
/// Format version this VMM writes and reads.
pub const STATE_VERSION: u32 = 4;
/// Largest `state.bin` accepted.
pub const MAX_STATE_BYTES: u64 = 64 << 20;
/// Bytes covered by one memory checksum.
pub const CHUNK_BYTES: u64 = guest_mem::live_copy::CHUNK_BYTES;

/// MSRs saved per vCPU (those a 64-bit kernel uses; EFER, the FS/GS bases
/// and the APIC base travel in the special registers).
pub const SAVED_MSRS: [u32; 11] = [
    0x10,        // TSC
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x1a0,       // MISC_ENABLE
    0x277,       // PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
];

/// One vCPU's full state.
#[derive(Debug, Serialize, Deserialize)]
pub struct SavedVcpu {
    /// General registers.
    pub regs: kvm_regs,
    /// Special registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// MSRs read (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// The local APIC.
    pub lapic: kvm_lapic_state,
    /// Pending events.
    pub events: kvm_vcpu_events,
    /// MP state.
    pub mp_state: kvm_mp_state,
    /// The CPUID the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Its port registers in the VMM's devices.
    pub ports: PortRegs,
}

/// One vCPU's registers in the VMM's port devices: what it wrote there
/// and what it may read next. A guest captured between the `out`s of one
/// event, or between a block command and the read of its status, goes on
/// from there in a restored VM, a clone or a fork child.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortRegs {
    /// The control port's argument halves (low, high).
    pub control_arg: [u32; 2],
    /// The block device's page and block arguments and last status.
    pub block: Option<(u32, u32, u8)>,
}

/// VM-wide state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedVm {
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    /// The KVM clock.
    pub clock: Option<kvm_clock_data>,
}

/// A guest memory region.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegionDesc {
    /// First guest-physical address.
    pub gpa: u64,
    /// Size.
    pub size: u64,
    /// Shared (not copy-on-write).
    pub shared: bool,
    /// Read-only.
    pub read_only: bool,
    /// The file a shared region maps (memory shared with the host, which
    /// a restore maps again; its content is not in the snapshot).
    pub file: Option<String>,
    /// Access hint (`normal`, `sequential`, `random`).
    pub hint: String,
}

/// What the snapshot's machine was.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MachineDesc {
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM bytes.
    pub mem_bytes: u64,
    /// Regions.
    pub regions: Vec<RegionDesc>,
    /// Backing name (`memfd`, `anon`, `plain`).
    pub backing: String,
    /// Fault-around window.
    pub fault_around_pages: u64,
    /// Workload name and shape (for reports; the guest keeps its own).
    pub workload: String,
    /// Pages per vCPU.
    pub pages: u64,
    /// Passes.
    pub passes: u64,
    /// Write ratio.
    pub write_ratio: u32,
    /// Rounds at each pass end.
    pub round_per_pass: bool,
    /// Hash of the guest kernel image (FNV-1a 64, hex).
    pub kernel_hash: String,
    /// The guest's NUMA layout and its placement on the host.
    pub numa: NumaDesc,
}

/// The guest's NUMA nodes (`regions` holds one region per node) and where
/// they were placed on the host the snapshot was taken on.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NumaDesc {
    /// Each vCPU's guest node.
    pub vcpu_node: Vec<u32>,
    /// Whether the nodes were placed on host nodes (policy, affinity).
    pub placed: bool,
    /// The memory policy each node's region had (`bind`, `preferred`,
    /// `interleave`), if any.
    pub policy: Option<String>,
    /// The host node of each guest node.
    pub host_nodes: Vec<u32>,
}

/// Device state.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DeviceState {
    /// The command sequence number each vCPU's slot reached.
    pub command_seq: Vec<u32>,
    /// The block device's disk (`io` workload), saved as `disk.bin`.
    pub disk: Option<DiskDesc>,
}

/// The block device's disk at the snapshot: `disk.bin`, `blocks` blocks of
/// 4 KiB, with its CRC32.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskDesc {
    /// Blocks.
    pub blocks: u64,
    /// CRC32 of the whole file.
    pub crc: u32,
}

/// A table marker (e.g. a poisoned page).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MarkerDesc {
    /// Guest-physical page address.
    pub gpa: u64,
    /// 1 write-protected-unpopulated, 2 poisoned, 3 snapshot-backed.
    pub kind: u8,
    /// Marker payload.
    pub payload: u64,
}

/// `memory.bin`'s description.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemoryDesc {
    /// Bytes per checksum chunk.
    pub chunk_bytes: u64,
    /// CRC32 per chunk over (page index, content) of its non-zero pages.
    pub chunk_crc: Vec<u32>,
    /// Non-zero pages stored.
    pub pages_stored: u64,
}

/// A diff snapshot's relation to its parent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiffDesc {
    /// The parent's id.
    pub parent_id: [u8; 16],
    /// The parent's `state.bin` CRC.
    pub parent_crc: u32,
    /// Where the parent was (as given when the diff was taken; a relative
    /// path is relative to the diff's own directory's parent).
    pub parent_dir: String,
    /// Guest page numbers present in this diff (a hole elsewhere means
    /// "unchanged", never "now zero").
    pub pages: Vec<u64>,
}

/// Everything in `state.bin`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    /// Snapshot id (UUID v4).
    pub id: [u8; 16],
    /// How the snapshot was taken (`paused` or `live`).
    pub mode: String,
    /// The machine.
    pub machine: MachineDesc,
    /// Every vCPU.
    pub vcpus: Vec<SavedVcpu>,
    /// VM-wide state.
    pub vm: SavedVm,
    /// Device state.
    pub devices: DeviceState,
    /// Table markers.
    pub markers: Vec<MarkerDesc>,
    /// Guest pages in the order to prefetch them (the recorded working set:
    /// execution chunks first, then the guest's first-touch order).
    pub working_set: Vec<u64>,
    /// The memory file.
    pub memory: MemoryDesc,
    /// For a diff snapshot: the parent and the pages present.
    pub diff: Option<DiffDesc>,
}

/// `state.bin` problems.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Not a state file.
    #[error("state.bin: bad magic (not a vmm snapshot)")]
    Magic,
    /// Another version.
    #[error("state.bin: format version {0} (this vmm reads version {STATE_VERSION})")]
    Version(u32),
    /// Too short, or a size field beyond the caps or the file.
    #[error("state.bin: truncated or absurd size ({0})")]
    Size(String),
    /// The checksum does not match.
    #[error("state.bin: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// Stored CRC.
        stored: u32,
        /// Computed CRC.
        computed: u32,
    },
    /// The body does not decode.
    #[error("state.bin: cannot decode: {0}")]
    Decode(String),
    /// A decoded value is out of range.
    #[error("state.bin: {0}")]
    Invalid(String),
}

/// Encodes the envelope; returns the bytes and their CRC.
pub fn encode(state: &SnapshotState) -> Result<(Vec<u8>, u32), StateError> {
    let body = postcard::to_allocvec(state).map_err(|e| StateError::Decode(e.to_string()))?;
    let mut out = Vec::with_capacity(body.len() + 24);
    out.extend_from_slice(STATE_MAGIC);
    out.extend_from_slice(&STATE_VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok((out, crc))
}

/// Decodes and checks the envelope; returns the state and the file's CRC.
pub fn decode(bytes: &[u8]) -> Result<(SnapshotState, u32), StateError> {
    if bytes.len() as u64 > MAX_STATE_BYTES {
        return Err(StateError::Size(format!("{} bytes", bytes.len())));
    }
    if bytes.len() < 24 {
        return Err(StateError::Size(format!("{} bytes", bytes.len())));
    }
    if &bytes[..8] != STATE_MAGIC {
        return Err(StateError::Magic);
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&bytes[12..20]);
    let body_len = u64::from_le_bytes(len8);
    if body_len != bytes.len() as u64 - 24 {
        return Err(StateError::Size(format!(
            "body length {body_len} in a {}-byte file",
            bytes.len()
        )));
    }
    let end = bytes.len() - 4;
    let stored = u32::from_le_bytes([bytes[end], bytes[end + 1], bytes[end + 2], bytes[end + 3]]);
    let computed = crc32fast::hash(&bytes[..end]);
    if stored != computed {
        return Err(StateError::Checksum { stored, computed });
    }
    if version != STATE_VERSION {
        return Err(StateError::Version(version));
    }
    let state: SnapshotState =
        postcard::from_bytes(&bytes[20..end]).map_err(|e| StateError::Decode(e.to_string()))?;
    validate(&state)?;
    Ok((state, stored))
}

fn validate(s: &SnapshotState) -> Result<(), StateError> {
    let m = &s.machine;
    let bad = |w: String| Err(StateError::Invalid(w));
    if m.vcpus == 0
        || m.vcpus as usize > guest_protocol::layout::MAX_VCPUS
        || s.vcpus.len() != m.vcpus as usize
    {
        return bad(format!(
            "{} vCPUs described, {} saved",
            m.vcpus,
            s.vcpus.len()
        ));
    }
    if m.mem_bytes == 0
        || !m.mem_bytes.is_multiple_of(4096)
        || m.mem_bytes > guest_protocol::layout::MAX_MEM_BYTES
    {
        return bad(format!("absurd memory size {}", m.mem_bytes));
    }
    if s.memory.chunk_bytes != CHUNK_BYTES
        || s.memory.chunk_crc.len() as u64 != m.mem_bytes.div_ceil(CHUNK_BYTES)
    {
        return bad("memory checksums do not match the memory size".into());
    }
    if let Some(d) = &s.diff {
        let pages = m.mem_bytes / 4096;
        if d.pages.windows(2).any(|w| w[0] >= w[1]) || d.pages.last().is_some_and(|p| *p >= pages) {
            return bad("the diff's page list is not sorted or lies beyond memory".into());
        }
    }
    if s.devices.command_seq.len() != m.vcpus as usize {
        return bad("device state does not match the vCPU count".into());
    }
    if s.devices
        .disk
        .is_some_and(|d| d.blocks > guest_protocol::layout::MAX_MEM_BYTES / 4096)
    {
        return bad("the block device's disk is absurdly large".into());
    }
    Ok(())
}

/// Reads vCPU `fd`'s full state (on its own thread).
pub fn save_vcpu(fd: &VcpuFd, cpuid: &[kvm_cpuid_entry2]) -> Result<SavedVcpu, kvm_ioctls::Error> {
    let mut msrs = Msrs::from_entries(
        &SAVED_MSRS
            .iter()
            .map(|i| kvm_msr_entry {
                index: *i,
                ..Default::default()
            })
            .collect::<Vec<_>>(),
    )
    .map_err(|_| kvm_ioctls::Error::new(libc::EINVAL))?;
    let n = fd.get_msrs(&mut msrs)?;
    Ok(SavedVcpu {
        regs: fd.get_regs()?,
        sregs: fd.get_sregs()?,
        xsave: fd.get_xsave()?,
        xcrs: fd.get_xcrs()?,
        msrs: msrs.as_slice()[..n]
            .iter()
            .map(|e| (e.index, e.data))
            .collect(),
        lapic: fd.get_lapic()?,
        events: fd.get_vcpu_events()?,
        mp_state: fd.get_mp_state()?,
        cpuid: cpuid.to_vec(),
        ports: PortRegs::default(),
    })
}

/// Puts saved state into a fresh vCPU.
pub fn restore_vcpu(fd: &VcpuFd, s: &SavedVcpu) -> Result<(), (&'static str, kvm_ioctls::Error)> {
    let cpuid = kvm_bindings::CpuId::from_entries(&s.cpuid)
        .map_err(|_| ("CPUID", kvm_ioctls::Error::new(libc::EINVAL)))?;
    fd.set_cpuid2(&cpuid).map_err(|e| ("CPUID", e))?;
    fd.set_sregs(&s.sregs)
        .map_err(|e| ("special registers", e))?;
    fd.set_regs(&s.regs).map_err(|e| ("registers", e))?;
    // SAFETY: the xsave area was produced by KVM_GET_XSAVE on a vCPU with
    // the same CPUID (checked by the restore's compatibility check).
    unsafe { fd.set_xsave(&s.xsave) }.map_err(|e| ("XSAVE", e))?;
    fd.set_xcrs(&s.xcrs).map_err(|e| ("XCRs", e))?;
    fd.set_lapic(&s.lapic).map_err(|e| ("LAPIC", e))?;
    let entries: Vec<kvm_msr_entry> = s
        .msrs
        .iter()
        .map(|(index, data)| kvm_msr_entry {
            index: *index,
            data: *data,
            ..Default::default()
        })
        .collect();
    let msrs =
        Msrs::from_entries(&entries).map_err(|_| ("MSRs", kvm_ioctls::Error::new(libc::EINVAL)))?;
    fd.set_msrs(&msrs).map_err(|e| ("MSRs", e))?;
    fd.set_vcpu_events(&s.events)
        .map_err(|e| ("vCPU events", e))?;
    fd.set_mp_state(s.mp_state).map_err(|e| ("MP state", e))?;
    Ok(())
}

/// Reads the VM's irqchips and clock.
pub fn save_vm(vm: &VmFd) -> Result<SavedVm, kvm_ioctls::Error> {
    let mut irqchips = Vec::new();
    for chip_id in 0..3 {
        let mut c = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut c)?;
        irqchips.push(c);
    }
    Ok(SavedVm {
        irqchips,
        clock: vm.get_clock().ok(),
    })
}

/// Restores the irqchips and clock into a VM that has its irqchip.
pub fn restore_vm(vm: &VmFd, s: &SavedVm) -> Result<(), kvm_ioctls::Error> {
    for c in &s.irqchips {
        vm.set_irqchip(c)?;
    }
    if let Some(clock) = &s.clock {
        let c = kvm_clock_data {
            clock: clock.clock,
            ..Default::default()
        };
        // The clock is advisory for this guest: it never reads it.
        if let Err(e) = vm.set_clock(&c) {
            log::debug!("KVM_SET_CLOCK: {e}");
        }
    }
    Ok(())
}

/// FNV-1a 64 of `bytes`, as hex: the kernel image hash.
pub fn fnv1a_hex(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The 2 MiB chunks a vCPU needs to run at all: those holding its
/// instruction pointer, stack pointer and page-table root. KVM on hosts
/// without hardware virtualization cannot take a userfaultfd fault on an
/// instruction fetch, so a lazy restore loads these before the vCPUs run.
pub fn execution_chunks(vcpus: &[SavedVcpu], mem_bytes: u64) -> Vec<u64> {
    let mut chunks: Vec<u64> = vcpus
        .iter()
        .flat_map(|v| {
            [
                v.regs.rip,
                v.regs.rsp.saturating_sub(8),
                v.sregs.cr3,
                v.sregs.gdt.base,
            ]
        })
        .filter(|a| *a < mem_bytes)
        .map(|a| a / CHUNK_BYTES)
        .collect();
    chunks.sort_unstable();
    chunks.dedup();
    chunks
}

/// The working set to prefetch, in order: the stored pages (`populated`,
/// sorted guest page numbers) inside the vCPUs' execution chunks (a lazy
/// restore needs them before the vCPUs run), then the other stored pages
/// the guest touched, in its first-touch order (`order`).
pub fn working_set(
    vcpus: &[SavedVcpu],
    mem_bytes: u64,
    populated: &[u64],
    order: &[u64],
) -> Vec<u64> {
    let chunks = execution_chunks(vcpus, mem_bytes);
    let in_chunks = |p: &u64| chunks.binary_search(&(p * 4096 / CHUNK_BYTES)).is_ok();
    let mut set: Vec<u64> = populated.iter().copied().filter(in_chunks).collect();
    set.extend(
        order
            .iter()
            .copied()
            .filter(|p| !in_chunks(p) && populated.binary_search(p).is_ok()),
    );
    set
}
