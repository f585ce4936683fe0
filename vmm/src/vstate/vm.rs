//! Opening KVM, creating the VM, and giving it guest RAM.

use guest_mem::GuestRam;
use guest_mem::LockOrRecover;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};
use std::sync::Arc;

/// Why the VM could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` is missing.
    #[error("/dev/kvm does not exist: this host has no KVM (load the kvm module, or run on a host with virtualization)")]
    NoKvm,
    /// `/dev/kvm` exists but cannot be opened.
    #[error(
        "cannot open /dev/kvm: permission denied (add your user to the 'kvm' group or run as root)"
    )]
    KvmPermission,
    /// Any other failure opening `/dev/kvm`.
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    /// The KVM API version is not the stable one.
    #[error("unsupported KVM API version {0} (need 12)")]
    ApiVersion(i32),
    /// `KVM_CREATE_VM` failed.
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(kvm_ioctls::Error),
    /// `KVM_SET_USER_MEMORY_REGION` failed.
    #[error("cannot register guest memory with KVM: {0}")]
    MemorySlot(kvm_ioctls::Error),
    /// `KVM_CREATE_IRQCHIP` failed.
    #[error("cannot create the in-kernel irqchip: {0}")]
    Irqchip(kvm_ioctls::Error),
    /// The host allows fewer vCPUs than asked for.
    #[error("KVM on this host allows at most {0} vCPUs")]
    TooManyVcpus(usize),
}

/// Opens `/dev/kvm` with an error that says what to do.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENXIO | libc::ENODEV => VmError::NoKvm,
        libc::EACCES | libc::EPERM => VmError::KvmPermission,
        _ => VmError::OpenKvm(e),
    })?;
    let v = kvm.get_api_version();
    if v != 12 {
        return Err(VmError::ApiVersion(v));
    }
    Ok(kvm)
}

/// Guest RAM a restored VM's first memory slot covers; the rest gets its
/// slot when the guest first touches it ([`LazySlot`]).
pub const EAGER_SLOT_BYTES: u64 = 64 << 20;

/// The KVM memory slot of guest RAM above [`EAGER_SLOT_BYTES`], added when
/// the guest first touches that memory. Creating a slot costs time in
/// proportion to its size on this host's KVM (shadow paging allocates the
/// slot's reverse maps up front: about 1 ms for 2 GiB), which a restore
/// should not pay before its guest runs. Until the slot exists, a guest
/// access there exits as MMIO: the vCPU adds the slot, performs that one
/// access itself on guest RAM, and runs on.
pub struct LazySlot {
    vm: Arc<VmFd>,
    start: u64,
    size: u64,
    host: u64,
    added: std::sync::Mutex<bool>,
}

impl LazySlot {
    /// True when `gpa` lies in the lazy part of guest RAM.
    pub fn covers(&self, gpa: u64) -> bool {
        (self.start..self.start + self.size).contains(&gpa)
    }

    /// Adds the slot unless it is there already.
    pub fn ensure(&self) -> Result<(), VmError> {
        let mut added = self.added.lock_or_recover();
        if *added {
            return Ok(());
        }
        let region = kvm_userspace_memory_region {
            slot: 1,
            flags: 0,
            guest_phys_addr: self.start,
            memory_size: self.size,
            userspace_addr: self.host,
        };
        // SAFETY: the region is the rest of guest RAM's live mapping, which
        // outlives the VM (see `create_vm`).
        unsafe { self.vm.set_user_memory_region(region) }.map_err(VmError::MemorySlot)?;
        *added = true;
        Ok(())
    }
}

/// A VM whose memory slot covers only the first [`EAGER_SLOT_BYTES`] of
/// `ram`, and the [`LazySlot`] for the rest (none when RAM is that small).
pub fn create_vm_lazy(
    kvm: &Kvm,
    ram: &GuestRam,
    vcpus: u32,
) -> Result<(Arc<VmFd>, Option<Arc<LazySlot>>), VmError> {
    let writable = ram.writable_bytes();
    let eager = writable.min(EAGER_SLOT_BYTES);
    let vm = Arc::new(create_vm_slot(kvm, ram, vcpus, eager)?);
    let lazy = (eager < writable).then(|| {
        Arc::new(LazySlot {
            vm: vm.clone(),
            start: eager,
            size: writable - eager,
            host: ram.host_addr() + eager,
            added: std::sync::Mutex::new(false),
        })
    });
    Ok((vm, lazy))
}

/// Creates the VM with an in-kernel irqchip (so the LAPIC and irqchip state
/// exist for snapshots) and registers `ram` as memory slot 0 at
/// guest-physical 0 (its ROM, if any, as a read-only slot).
pub fn create_vm(kvm: &Kvm, ram: &GuestRam, vcpus: u32) -> Result<VmFd, VmError> {
    create_vm_slot(kvm, ram, vcpus, ram.writable_bytes())
}

/// The KVM memory slot of the ROM (slot 0 is RAM from 0, slot 1 the lazy
/// rest of RAM).
const ROM_SLOT: u32 = 2;

/// A VM with the irqchip, one memory slot over the first `bytes` of
/// `ram`, and `ram`'s ROM as a read-only slot: a guest write there exits
/// to the VMM as MMIO instead of reaching memory.
fn create_vm_slot(kvm: &Kvm, ram: &GuestRam, vcpus: u32, bytes: u64) -> Result<VmFd, VmError> {
    let max = kvm.get_max_vcpus();
    if vcpus as usize > max {
        return Err(VmError::TooManyVcpus(max));
    }
    let vm = kvm.create_vm().map_err(VmError::CreateVm)?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: bytes,
        userspace_addr: ram.host_addr(),
    };
    // SAFETY: the region describes `ram`'s live mapping, which outlives the
    // VM: the runner drops the VM fd (and so the slot) before `ram`.
    unsafe { vm.set_user_memory_region(region) }.map_err(VmError::MemorySlot)?;
    if let Some(rom) = ram.rom() {
        let region = kvm_userspace_memory_region {
            slot: ROM_SLOT,
            flags: kvm_bindings::KVM_MEM_READONLY,
            guest_phys_addr: rom.gpa,
            memory_size: rom.size,
            userspace_addr: rom.host_start(),
        };
        // SAFETY: the ROM's part of the same live mapping as above.
        unsafe { vm.set_user_memory_region(region) }.map_err(VmError::MemorySlot)?;
    }
    vm.create_irq_chip().map_err(VmError::Irqchip)?;
    Ok(vm)
}
