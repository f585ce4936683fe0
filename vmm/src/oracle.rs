//! The host side of the consistency oracle: the same replay the guest runs
//! (`guest_protocol::oracle`), applied to a memory image read from the host —
//! a live VM's RAM now, a snapshot's memory file later.

use guest_mem::{GuestRam, RamError};
use guest_protocol::boot_info::{PageStruct, BOOT_INFO_MAGIC, BOOT_INFO_VERSION};
use guest_protocol::layout::{state_gpa, WorkArea, BOOT_INFO_GPA, MAX_VCPUS, PAGE_SIZE};
use guest_protocol::oracle::verify_vcpu;
use guest_protocol::schedule::{PassSteps, ScheduleParams, Step};
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

/// The workload parameters recorded in `image`'s boot-info page.
fn read_params(image: &dyn MemoryImage) -> Result<(ScheduleParams, WorkArea), OracleError> {
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
    if info.numa.check(info.num_vcpus as u64).is_err() {
        return Err(OracleError::BootInfo("bad NUMA layout"));
    }
    let params = info.schedule_params(workload);
    Ok((params, params.work_area()))
}

/// Guest page numbers the schedules of all vCPUs write in pass `pass`
/// (sorted, unique), replayed from the boot-info and state pages in `image`.
pub fn pages_written_in_pass(image: &dyn MemoryImage, pass: u64) -> Result<Vec<u64>, OracleError> {
    let (params, area) = read_params(image)?;
    let mut out = Vec::new();
    if params.pages == 0 || pass >= params.passes {
        return Ok(out);
    }
    for v in 0..params.vcpus {
        let state: VcpuState = read_struct(image, state_gpa(v))?;
        let mut steps = PassSteps::new(&params, v, pass, state.seed_for_pass(pass));
        for _ in 0..params.pages {
            if let Step::Write { page } = steps.step() {
                out.push(area.page_gpa(v, page) / PAGE_SIZE);
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// The work-area guest pages vCPU `vcpu`'s schedule touches (writes and
/// reads), in the order it first touches them, over its whole workload.
pub fn first_touch_order(image: &dyn MemoryImage, vcpu: u64) -> Result<Vec<u64>, OracleError> {
    let (params, area) = read_params(image)?;
    let state: VcpuState = read_struct(image, state_gpa(vcpu))?;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for pass in 0..params.passes {
        let mut steps = PassSteps::new(&params, vcpu, pass, state.seed_for_pass(pass));
        for _ in 0..params.pages {
            let gpa = match steps.step() {
                Step::Write { page } => area.page_gpa(vcpu, page),
                Step::Read { vcpu, page, .. } => area.page_gpa(vcpu, page),
                Step::Nothing => continue,
            };
            if seen.insert(gpa) {
                out.push(gpa / PAGE_SIZE);
            }
        }
    }
    Ok(out)
}

/// The seeds vCPU `vcpu` recorded in its state page: (first pass, seed),
/// oldest first.
pub fn seed_history(image: &dyn MemoryImage, vcpu: u64) -> Result<Vec<(u64, u64)>, OracleError> {
    let state: VcpuState = read_struct(image, state_gpa(vcpu))?;
    let n = (state.seed_count as usize).min(state.seeds.len());
    Ok(state.seeds[..n]
        .iter()
        .map(|e| (e.from_pass, e.seed))
        .collect())
}

/// The guest page numbers of the work area: one range per NUMA node.
pub fn work_area_pages(image: &dyn MemoryImage) -> Result<WorkPages, OracleError> {
    let (_, area) = read_params(image)?;
    Ok(WorkPages(
        area.node_work_ranges()
            .map(|(s, e)| s / PAGE_SIZE..e / PAGE_SIZE)
            .collect(),
    ))
}

/// The work area's guest page numbers, as ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkPages(pub Vec<std::ops::Range<u64>>);

impl WorkPages {
    /// True when guest page `page` is a work page.
    pub fn contains(&self, page: &u64) -> bool {
        self.0.iter().any(|r| r.contains(page))
    }

    /// How many work pages there are.
    pub fn count(&self) -> u64 {
        self.0.iter().map(|r| r.end - r.start).sum()
    }
}

/// Replays every vCPU's schedule against `image` and counts the pages that
/// differ (read-check failures the guest recorded included).
pub fn verify_image(image: &dyn MemoryImage) -> Result<HostVerify, OracleError> {
    let (params, area) = read_params(image)?;
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
