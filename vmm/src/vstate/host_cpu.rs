//! The CPU feature registers (CPUID leaves 1, 7 and 0xD) this host's KVM offers
//! its guests, which a restore compares a snapshot's CPUID with.
//!
//! `KVM_GET_SUPPORTED_CPUID` takes 0.3-0.4 ms here, a tenth of a restore's
//! budget before its first `KVM_RUN`, and its answer cannot change while
//! the KVM module stays loaded: so it is cached in `/dev/shm` per boot and
//! per `/dev/kvm` (its change time moves when the module is loaded again).
//! A missing, unreadable or foreign cache file is simply asked again.

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::Kvm;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// The registers compared: leaf 1 ECX and EDX, leaf 7 (subleaf 0) EBX,
/// ECX and EDX, leaf 0xD (subleaf 0) EAX and EDX.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FeatureRegs {
    /// Leaf 1: ECX, EDX.
    pub leaf1: [u32; 2],
    /// Leaf 7: EBX, ECX, EDX.
    pub leaf7: [u32; 3],
    /// Leaf 0xD (subleaf 0): EAX, EDX, the XSAVE state components (XCR0
    /// bits) KVM can give a guest.
    pub xsave: [u32; 2],
}

const MAGIC: &[u8; 8] = b"VMMCPUF2";

fn cache_path() -> Option<PathBuf> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let kvm = std::fs::metadata("/dev/kvm").ok()?;
    let dir = std::path::Path::new("/dev/shm");
    dir.is_dir().then(|| {
        dir.join(format!(
            "vmm-kvm-cpuid-{}-{}.{}",
            boot.trim(),
            kvm.ctime(),
            kvm.ctime_nsec()
        ))
    })
}

/// Only a cache file this user wrote, and nobody else may change, is
/// believed (`/dev/shm` is shared by every user).
fn trusted(path: &std::path::Path) -> bool {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    std::fs::symlink_metadata(path)
        .is_ok_and(|m| m.is_file() && m.uid() == me && m.mode() & 0o022 == 0)
}

fn decode(bytes: &[u8]) -> Option<FeatureRegs> {
    let body = bytes.strip_prefix(MAGIC.as_slice())?;
    if body.len() != 28 {
        return None;
    }
    let w = |i: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&body[i * 4..i * 4 + 4]);
        u32::from_le_bytes(b)
    };
    Some(FeatureRegs {
        leaf1: [w(0), w(1)],
        leaf7: [w(2), w(3), w(4)],
        xsave: [w(5), w(6)],
    })
}

fn encode(f: &FeatureRegs) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    for v in f.leaf1.iter().chain(&f.leaf7).chain(&f.xsave) {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

fn ask_kvm(kvm: &Kvm) -> Result<FeatureRegs, kvm_ioctls::Error> {
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    let leaf = |f: u32| {
        cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == f && e.index == 0)
            .copied()
    };
    let mut regs = FeatureRegs::default();
    if let Some(e) = leaf(1) {
        regs.leaf1 = [e.ecx, e.edx];
    }
    if let Some(e) = leaf(7) {
        regs.leaf7 = [e.ebx, e.ecx, e.edx];
    }
    if let Some(e) = leaf(0xd) {
        regs.xsave = [e.eax, e.edx];
    }
    Ok(regs)
}

/// What this host's KVM offers, from the cache when it is there.
pub fn supported_features(kvm: &Kvm) -> Result<FeatureRegs, kvm_ioctls::Error> {
    let path = cache_path();
    if let Some(f) = path
        .as_ref()
        .filter(|p| trusted(p))
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| decode(&b))
    {
        return Ok(f);
    }
    let regs = ask_kvm(kvm)?;
    if let Some(p) = path {
        // Written whole under a temporary name, then renamed: a reader
        // never sees half a file. A failure only costs the next restore.
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, encode(&regs)).is_ok() && std::fs::rename(&tmp, &p).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(regs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_format_round_trips_and_refuses_foreign_bytes() {
        let f = FeatureRegs {
            leaf1: [1, 2],
            leaf7: [3, 4, 5],
            xsave: [6, 7],
        };
        assert_eq!(decode(&encode(&f)), Some(f));
        assert_eq!(decode(b"VMMCPUF1short"), None);
        assert_eq!(decode(&[0u8; 28]), None);
    }
}
