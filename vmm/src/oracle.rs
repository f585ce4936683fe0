//! The host side of the consistency oracle: the same replay the guest runs
//! (`guest_protocol::oracle`), applied to a memory image read from the host —
//! a live VM's RAM now, a snapshot's memory file later.

use guest_mem::{GuestRam, RamError};
use guest_protocol::boot_info::{PageStruct, BOOT_INFO_MAGIC, BOOT_INFO_VERSION};
use guest_protocol::layout::{state_gpa, WorkArea, BOOT_INFO_GPA, MAX_VCPUS};
use guest_protocol::oracle::verify_vcpu;
use guest_protocol::schedule::ScheduleParams;
use guest_protocol::{BootInfo, VcpuState, Workload};

/// Why the image could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum OracleError {
    /// Reading the image failed.
    #[error("cannot read the memory image: {0}")]
    Read(#[from] RamError),
    /// The image holds no valid boot-info page.
    #[error("memory image has no valid boot-info page ({0})")]
    BootInfo(&'static str),
}

/// Mismatching pages found by the host-side oracle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostVerify {
    /// Pages that differ, per vCPU.
    pub per_vcpu: Vec<u64>,
    /// Their sum.
    pub total: u64,
}

/// Something guest-physical memory can be read from.
pub trait MemoryImage {
    /// Fills `buf` from guest-physical address `gpa`.
    fn read_at(&self, gpa: u64, buf: &mut [u8]) -> Result<(), RamError>;
}

impl MemoryImage for GuestRam {
    fn read_at(&self, gpa: u64, buf: &mut [u8]) -> Result<(), RamError> {
        self.read(gpa, buf)
    }
}

fn read_struct<T: PageStruct>(image: &dyn MemoryImage, gpa: u64) -> Result<T, OracleError> {
    let mut buf = vec![0u8; std::mem::size_of::<T>()];
    image.read_at(gpa, &mut buf)?;
    T::from_bytes(&buf).ok_or(OracleError::BootInfo("short read"))
}

/// Replays every vCPU's schedule against `image` and counts the pages that
/// differ (read-check failures the guest recorded included).
pub fn verify_image(image: &dyn MemoryImage) -> Result<HostVerify, OracleError> {
    let info: BootInfo = read_struct(image, BOOT_INFO_GPA)?;
    if info.magic != BOOT_INFO_MAGIC {
        return Err(OracleError::BootInfo("bad magic"));
    }
    if info.version != BOOT_INFO_VERSION {
        return Err(OracleError::BootInfo("unsupported version"));
    }
    let workload =
        Workload::from_u32(info.workload).ok_or(OracleError::BootInfo("unknown workload"))?;
    if info.num_vcpus == 0 || info.num_vcpus as usize > MAX_VCPUS {
        return Err(OracleError::BootInfo("bad vCPU count"));
    }
    if info.pages_per_vcpu > 1 << 24 {
        return Err(OracleError::BootInfo("bad page count"));
    }
    let params = ScheduleParams {
        workload,
        vcpus: info.num_vcpus as u64,
        pages: info.pages_per_vcpu,
        passes: info.passes,
        write_ratio: info.write_ratio as u64,
    };
    let area = WorkArea {
        vcpus: params.vcpus,
        pages_per_vcpu: params.pages,
    };
    let mut expected = vec![0u64; params.pages as usize];
    let mut per_vcpu = Vec::with_capacity(params.vcpus as usize);
    for v in 0..params.vcpus {
        let state: VcpuState = read_struct(image, state_gpa(v))?;
        let mut read_error = None;
        let mut word = [0u8; 8];
        let m = verify_vcpu(&params, v, &state, &mut expected, |page| {
            match image.read_at(area.page_gpa(v, page), &mut word) {
                Ok(()) => u64::from_le_bytes(word),
                Err(e) => {
                    read_error.get_or_insert(e);
                    0
                }
            }
        });
        if let Some(e) = read_error {
            return Err(e.into());
        }
        per_vcpu.push(m + state.read_mismatches);
    }
    Ok(HostVerify {
        total: per_vcpu.iter().sum(),
        per_vcpu,
    })
}
