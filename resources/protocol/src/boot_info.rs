//! The boot-info page (VMM → guest) and the per-vCPU state page (guest-owned,
//! read by the VMM's oracle).
//!
//! Both are `#[repr(C)]` and hold only integers, so either side can read them
//! from raw guest memory. The VMM fills the boot-info page before the first
//! vCPU runs and afterwards writes only the command slots.

use crate::layout::MAX_VCPUS;
use crate::numa::NumaLayout;

/// `BootInfo::magic`: "VMMBOOT1" in little-endian ASCII.
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"VMMBOOT1");
/// `BootInfo::version` of this protocol.
pub const BOOT_INFO_VERSION: u32 = 3;
/// Most seed changes a vCPU's history can hold.
pub const MAX_SEEDS: usize = 200;
/// `BootInfo::flags`: end a dirty-tracking round after every pass — report
/// `RoundEnd` and wait on the command word until the VMM has harvested.
pub const FLAG_ROUND_PER_PASS: u32 = 1 << 0;
/// `BootInfo::remote_reads` when `mixed`'s reads pick any vCPU.
pub const REMOTE_READS_ANY: u32 = u32::MAX;
/// A vCPU polls its command word at least once every this many page steps.
pub const POLL_INTERVAL: u64 = 64;

/// The workloads the guest kernel runs.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Write pages 0..N in order, every pass.
    SeqWrite = 1,
    /// Write N pages chosen by a seeded xorshift (repeats allowed) each pass.
    RandWrite = 2,
    /// Pass 0 writes the pattern in order; later passes read and check it.
    Read = 3,
    /// N random steps per pass, `write_ratio` percent writes to the own range,
    /// the rest reads of any vCPU's range.
    Mixed = 4,
    /// Poll the command word until told to stop.
    Idle = 5,
    /// `seq-write`, and after each page store the block device copies the
    /// page out to the vCPU's block for it; every 8th page the guest reads
    /// the block back into its scratch page and checks it.
    Io = 6,
}

impl Workload {
    /// All workloads, in CLI order.
    pub const ALL: [Workload; 6] = [
        Workload::SeqWrite,
        Workload::RandWrite,
        Workload::Read,
        Workload::Mixed,
        Workload::Idle,
        Workload::Io,
    ];

    /// Decodes `BootInfo::workload`.
    pub fn from_u32(v: u32) -> Option<Workload> {
        Workload::ALL.into_iter().find(|w| *w as u32 == v)
    }

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Workload::SeqWrite => "seq-write",
            Workload::RandWrite => "rand-write",
            Workload::Read => "read",
            Workload::Mixed => "mixed",
            Workload::Idle => "idle",
            Workload::Io => "io",
        }
    }

    /// Parses a CLI name.
    pub fn from_name(name: &str) -> Option<Workload> {
        Workload::ALL.into_iter().find(|w| w.name() == name)
    }
}

/// What the VMM asks a vCPU to do. Written into [`Command::word`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandOp {
    /// Keep running the workload (also ends an `EndRound` wait).
    Continue = 0,
    /// Run the consistency oracle now, report the result, then continue.
    Verify = 1,
    /// Stop the workload at this poll point, run the final verify (if the
    /// boot info asks for it) and report `Done`.
    Stop = 2,
    /// Report `RoundEnd` and wait until the command word changes again.
    EndRound = 3,
    /// Use seed `arg` from the next pass that has not started yet.
    SetSeed = 4,
    /// This VM is a child of a fork: say so, and use seed `arg` from the
    /// next pass that has not started yet.
    Forked = 5,
}

impl CommandOp {
    /// Decodes the low half of a command word.
    pub fn from_u32(v: u32) -> Option<CommandOp> {
        [
            CommandOp::Continue,
            CommandOp::Verify,
            CommandOp::Stop,
            CommandOp::EndRound,
            CommandOp::SetSeed,
            CommandOp::Forked,
        ]
        .into_iter()
        .find(|c| *c as u32 == v)
    }
}

/// One vCPU's command slot.
///
/// The VMM writes `arg` first, then `word = seq << 32 | op` with a single
/// 8-byte store; `seq` increases with every command, so the guest acts on
/// each command exactly once (it remembers the last `seq` in its state page).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Command {
    /// `seq << 32 | op`.
    pub word: u64,
    /// The operand (a seed for `SetSeed`).
    pub arg: u64,
}

impl Command {
    /// Packs a command word.
    pub const fn pack(seq: u32, op: CommandOp) -> u64 {
        ((seq as u64) << 32) | op as u64
    }

    /// Splits a command word into its sequence number and raw op.
    pub const fn unpack(word: u64) -> (u32, u32) {
        ((word >> 32) as u32, word as u32)
    }
}

/// The boot-info page. Each vCPU enters with `rdi` = its index and `rsi` =
/// the guest-physical address of this page.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`BOOT_INFO_VERSION`].
    pub version: u32,
    /// Number of vCPUs.
    pub num_vcpus: u32,
    /// Bytes of guest RAM (one range starting at guest-physical 0).
    pub mem_bytes: u64,
    /// Guest-physical address of the work area.
    pub work_gpa: u64,
    /// Pages each vCPU owns in the work area.
    pub pages_per_vcpu: u64,
    /// Guest-physical address of the verify scratch.
    pub scratch_gpa: u64,
    /// Bytes of verify scratch per vCPU.
    pub scratch_bytes_per_vcpu: u64,
    /// Guest-physical address of vCPU 0's state page (one page per vCPU).
    pub state_gpa: u64,
    /// A [`Workload`] as `u32`.
    pub workload: u32,
    /// Percentage of writes in the `mixed` workload.
    pub write_ratio: u32,
    /// Passes over the work range.
    pub passes: u64,
    /// Non-zero: run the oracle when the workload ends.
    pub verify_at_end: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// One command slot per vCPU.
    pub commands: [Command; MAX_VCPUS],
    /// Percent of `mixed`'s reads that target another NUMA node's vCPUs,
    /// or [`REMOTE_READS_ANY`].
    pub remote_reads: u32,
    /// Zero.
    pub reserved: u32,
    /// The guest's NUMA topology; the work area is laid out over it.
    pub numa: NumaLayout,
    /// Guest-physical address of the read-only memory (ROM) at the top of
    /// guest memory; 0 when there is none.
    pub rom_gpa: u64,
    /// Its bytes (a page multiple; 0: none).
    pub rom_bytes: u64,
    /// [`rom_sum`] of its content, for the guest to check it.
    pub rom_sum: u64,
    /// Guest-physical address of memory shared with the host (a file the
    /// host maps too; not copy-on-write), below the ROM; 0 when none.
    pub shared_gpa: u64,
    /// Its bytes (a page multiple; 0: none).
    pub shared_bytes: u64,
}

/// The word the guest stores into the first page of its shared memory
/// (`BootInfo::shared_gpa`) at boot: "VMMSHMEM". With the `io` workload the
/// block device copies it into the second page; the host finds both in
/// the shared file.
pub const SHARED_PROBE_WORD: u64 = u64::from_le_bytes(*b"VMMSHMEM");

/// The checksum of a ROM the guest checks: the first word of each page,
/// rotated by the page's index (so pages in the wrong place show), summed.
/// One word per page, as every workload touches its pages (guest
/// instructions are expensive where they are emulated).
pub fn rom_sum(first_words: impl Iterator<Item = u64>) -> u64 {
    first_words.enumerate().fold(0u64, |sum, (i, w)| {
        sum.wrapping_add(w.rotate_left(i as u32 % 64))
    })
}

/// A seed change in a vCPU's history: passes from `from_pass` on use `seed`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeedEntry {
    /// First pass that uses `seed`.
    pub from_pass: u64,
    /// The seed.
    pub seed: u64,
}

/// A vCPU's own state page: kept in guest memory so that the schedule can be
/// replayed after a snapshot, restore or fork. The VMM initialises it at boot.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VcpuState {
    /// Schedule steps completed (pass × pages + step). The step at `cursor`
    /// may already be in place (its store happens before the increment).
    pub cursor: u64,
    /// Page stores made.
    pub pages_written: u64,
    /// Reads that did not see the expected word (`read` workload).
    pub read_mismatches: u64,
    /// `seq` of the last command acted on.
    pub last_command_seq: u64,
    /// Valid entries in `seeds`.
    pub seed_count: u64,
    /// Seed history, ordered by `from_pass`; entry 0 has `from_pass` 0.
    pub seeds: [SeedEntry; MAX_SEEDS],
}

/// Guest-physical address of vCPU `vcpu`'s command slot.
pub const fn command_gpa(vcpu: u64) -> u64 {
    crate::layout::BOOT_INFO_GPA
        + core::mem::offset_of!(BootInfo, commands) as u64
        + vcpu * core::mem::size_of::<Command>() as u64
}

/// Guest-physical address of vCPU `vcpu`'s `VcpuState::last_command_seq`.
pub const fn last_command_seq_gpa(vcpu: u64) -> u64 {
    crate::layout::state_gpa(vcpu) + core::mem::offset_of!(VcpuState, last_command_seq) as u64
}

impl BootInfo {
    /// The schedule this page describes, for `workload` (decoded from
    /// `self.workload` by the caller, which decides what an unknown one
    /// means).
    pub fn schedule_params(&self, workload: Workload) -> crate::schedule::ScheduleParams {
        // SAFETY: a reference is valid for reads.
        unsafe { BootInfo::read_schedule(self, workload) }
    }

    /// [`BootInfo::schedule_params`] of the page at `bi`, reading only the
    /// fields it needs, each volatile (the guest reads its live page so:
    /// every word it copies is an emulated instruction here).
    ///
    /// # Safety
    /// `bi` is valid for reads of a `BootInfo`.
    pub unsafe fn read_schedule(
        bi: *const BootInfo,
        workload: Workload,
    ) -> crate::schedule::ScheduleParams {
        use core::ptr::read_volatile;
        // SAFETY: the caller's contract; each field is read on its own.
        unsafe {
            let remote_reads = read_volatile(&raw const (*bi).remote_reads);
            crate::schedule::ScheduleParams {
                workload,
                vcpus: read_volatile(&raw const (*bi).num_vcpus) as u64,
                pages: read_volatile(&raw const (*bi).pages_per_vcpu),
                passes: read_volatile(&raw const (*bi).passes),
                write_ratio: read_volatile(&raw const (*bi).write_ratio) as u64,
                remote_reads: (remote_reads != REMOTE_READS_ANY).then_some(remote_reads as u64),
                // One plain copy: a volatile read of the struct moves it
                // byte by byte (~350 instructions, emulated one by one on
                // hosts without hardware virtualization); the layout does
                // not change after boot.
                numa: core::ptr::read(&raw const (*bi).numa),
            }
        }
    }
}

impl VcpuState {
    /// A fresh state page for a vCPU starting with `seed`.
    pub fn new(seed: u64) -> VcpuState {
        let mut seeds = [SeedEntry::default(); MAX_SEEDS];
        seeds[0] = SeedEntry { from_pass: 0, seed };
        VcpuState {
            cursor: 0,
            pages_written: 0,
            read_mismatches: 0,
            last_command_seq: 0,
            seed_count: 1,
            seeds,
        }
    }

    /// The seed that pass `pass` uses.
    pub fn seed_for_pass(&self, pass: u64) -> u64 {
        let n = (self.seed_count as usize).clamp(1, MAX_SEEDS);
        let mut seed = self.seeds[0].seed;
        for e in &self.seeds[..n] {
            if e.from_pass <= pass {
                seed = e.seed;
            }
        }
        seed
    }

    /// Records that passes from the first not yet started one use `seed`.
    /// Returns false when the history is full.
    pub fn push_seed(&mut self, seed: u64, pages_per_vcpu: u64) -> bool {
        let from_pass = self.cursor.div_ceil(pages_per_vcpu.max(1));
        let n = self.seed_count as usize;
        if n > 0 && n <= MAX_SEEDS && self.seeds[n - 1].from_pass == from_pass {
            self.seeds[n - 1].seed = seed;
            return true;
        }
        if n >= MAX_SEEDS {
            return false;
        }
        self.seeds[n] = SeedEntry { from_pass, seed };
        self.seed_count += 1;
        true
    }
}

const _: () = assert!(core::mem::size_of::<BootInfo>() <= 4096);
const _: () = assert!(core::mem::size_of::<VcpuState>() <= 4096);

/// Plain-old-data page structures that can be viewed as bytes.
///
/// # Safety
/// Implementors are `#[repr(C)]`, hold only integers (so every bit pattern is
/// a valid value) and have no padding.
pub unsafe trait PageStruct: Copy {
    /// The structure's bytes, as they lie in guest memory.
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: the trait's contract: no padding, so every byte is initialised.
        unsafe {
            core::slice::from_raw_parts(
                self as *const Self as *const u8,
                core::mem::size_of::<Self>(),
            )
        }
    }

    /// Reads the structure from bytes (`None` if too short).
    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < core::mem::size_of::<Self>() {
            return None;
        }
        // SAFETY: the length was checked; every bit pattern is valid by the
        // trait's contract; `read_unaligned` tolerates any alignment.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr() as *const Self) })
    }
}

// SAFETY: repr(C), integers only; the field order leaves no padding (checked
// by the size assertions below).
unsafe impl PageStruct for BootInfo {}
// SAFETY: as above.
unsafe impl PageStruct for VcpuState {}

const _: () = assert!(
    core::mem::size_of::<BootInfo>()
        == 96 + 16 * MAX_VCPUS + core::mem::size_of::<NumaLayout>() + 40
);
const _: () =
    assert!(core::mem::size_of::<NumaLayout>() == 8 + 16 * crate::numa::MAX_NODES + MAX_VCPUS);
const _: () = assert!(core::mem::size_of::<VcpuState>() == 40 + 16 * MAX_SEEDS);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_history() {
        let mut s = VcpuState::new(7);
        assert_eq!(s.seed_for_pass(5), 7);
        s.cursor = 10; // in pass 1 of 8-page passes
        assert!(s.push_seed(9, 8));
        assert_eq!(s.seed_for_pass(1), 7);
        assert_eq!(s.seed_for_pass(2), 9);
        s.cursor = 16; // exactly at the start of pass 2: it has not started
        assert!(s.push_seed(11, 8));
        assert_eq!(s.seed_count, 2);
        assert_eq!(s.seed_for_pass(2), 11);
    }

    #[test]
    fn command_word_round_trip() {
        let w = Command::pack(5, CommandOp::SetSeed);
        assert_eq!(Command::unpack(w), (5, CommandOp::SetSeed as u32));
        assert_eq!(CommandOp::from_u32(4), Some(CommandOp::SetSeed));
        assert_eq!(CommandOp::from_u32(99), None);
    }

    #[test]
    fn workload_names() {
        for w in Workload::ALL {
            assert_eq!(Workload::from_name(w.name()), Some(w));
            assert_eq!(Workload::from_u32(w as u32), Some(w));
        }
    }
}
