//! Opening KVM, creating the VM, and giving it guest RAM.

use guest_mem::GuestRam;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};

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

/// Creates the VM with an in-kernel irqchip (so the LAPIC and irqchip state
/// exist for snapshots) and registers `ram` as memory slot 0 at
/// guest-physical 0.
pub fn create_vm(kvm: &Kvm, ram: &GuestRam, vcpus: u32) -> Result<VmFd, VmError> {
    let max = kvm.get_max_vcpus();
    if vcpus as usize > max {
        return Err(VmError::TooManyVcpus(max));
    }
    let vm = kvm.create_vm().map_err(VmError::CreateVm)?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: ram.size(),
        userspace_addr: ram.host_addr(),
    };
    // SAFETY: the region describes `ram`'s live mapping, which outlives the
    // VM: the runner drops the VM fd (and so the slot) before `ram`.
    unsafe { vm.set_user_memory_region(region) }.map_err(VmError::MemorySlot)?;
    vm.create_irq_chip().map_err(VmError::Irqchip)?;
    Ok(vm)
}
