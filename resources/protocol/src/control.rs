//! The guest-to-VMM channel.
//!
//! * Text: bytes written to COM1's data register ([`SERIAL_PORT`]); a line
//!   ends with `\n`. The VMM reports the line-status register as "transmitter
//!   empty", so the guest never waits.
//! * Structured events: a 32-bit `out` of an [`Event`] code to
//!   [`CONTROL_PORT`], after its 64-bit argument has been written as two
//!   32-bit halves to [`ARG_LO_PORT`] and [`ARG_HI_PORT`]. The latch is per
//!   vCPU, so vCPUs never interleave.
//! * Waiting: a vCPU with nothing to do until its next command (the `idle`
//!   workload, a round's doorbell) writes [`IDLE_PORT`] between polls of its
//!   command word instead of spinning; the VMM holds the vCPU there until a
//!   command may have come, a pause or stop, or a few milliseconds pass.

/// COM1 data register.
pub const SERIAL_PORT: u16 = 0x3f8;
/// COM1 line-status register.
pub const SERIAL_LSR_PORT: u16 = 0x3fd;
/// Event code register.
pub const CONTROL_PORT: u16 = 0x500;
/// Low half of the next event's argument.
pub const ARG_LO_PORT: u16 = 0x504;
/// High half of the next event's argument.
pub const ARG_HI_PORT: u16 = 0x508;
/// "Nothing to do until my next command" (any 32-bit out).
pub const IDLE_PORT: u16 = 0x50c;

/// Block device: argument A, a guest page number (32-bit out).
pub const BLOCK_PAGE_PORT: u16 = 0x520;
/// Block device: argument B, a block number (32-bit out).
pub const BLOCK_BLOCK_PORT: u16 = 0x524;
/// Block device: the command (8-bit out) and this vCPU's last status
/// (8-bit in: 0 ok).
pub const BLOCK_CMD_PORT: u16 = 0x528;
/// Block command: write guest page A to block B.
pub const BLOCK_CMD_WRITE: u8 = 1;
/// Block command: read block B into guest page A.
pub const BLOCK_CMD_READ: u8 = 2;
/// Block status: the command was refused, its guest page may not be
/// written (read-only memory) or is poisoned.
pub const BLOCK_STATUS_REFUSED: u8 = 3;

/// Read-only memory: a 32-bit `in` returns how many guest writes to the
/// VM's ROM the VMM has refused so far (the write is dropped, never
/// applied; each is also logged).
pub const ROM_PORT: u16 = 0x530;

/// [`Event::RomCheck`] bit: the ROM's content matched `BootInfo::rom_sum`.
pub const ROM_CHECK_CONTENT: u64 = 1 << 0;
/// [`Event::RomCheck`] bit: a CPU store to the ROM left it unchanged and
/// [`ROM_PORT`] counted it.
pub const ROM_CHECK_CPU_REFUSED: u64 = 1 << 1;
/// [`Event::RomCheck`] bit: the block device was asked to read a block
/// into the ROM (`io` workload).
pub const ROM_CHECK_DEVICE_TRIED: u64 = 1 << 2;
/// [`Event::RomCheck`] bit: the device refused that read and the ROM is
/// unchanged.
pub const ROM_CHECK_DEVICE_REFUSED: u64 = 1 << 3;
/// [`Event::RomCheck`] bit: the device wrote the ROM's first page to the
/// block (a read-only pin of read-only memory is allowed) and read it back
/// into a scratch page intact.
pub const ROM_CHECK_DEVICE_COPIED: u64 = 1 << 4;

/// [`Event::SharedCheck`] bit: the guest's store of `SHARED_PROBE_WORD`
/// into its shared memory's first page reads back.
pub const SHARED_CHECK_STORED: u64 = 1 << 0;
/// [`Event::SharedCheck`] bit: the block device copied that page out to a
/// block and read the block into the second page (a read-write pin of
/// shared memory: its unshare does nothing), which now holds the word.
pub const SHARED_CHECK_DEVICE_COPIED: u64 = 1 << 1;

/// Events a vCPU reports on [`CONTROL_PORT`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The vCPU entered the guest kernel; arg = protocol version it speaks.
    Boot = 1,
    /// arg = page stores this vCPU has made so far (sent at every poll).
    Progress = 2,
    /// arg = the pass that just completed.
    PassDone = 3,
    /// The vCPU reached a round end and now waits on its command word;
    /// arg = page stores so far.
    RoundEnd = 4,
    /// The oracle ran; arg = pages that differ (read-check failures included).
    VerifyResult = 5,
    /// The workload is over; arg = page stores made. The vCPU does no more.
    Done = 6,
    /// The guest kernel panicked; the message went to the serial line first.
    Panic = 7,
    /// The vCPU acted on a command; arg = the command's `seq`.
    CommandAck = 8,
    /// The vCPU has started the `idle` workload and now waits for
    /// commands; arg = 0. A guest that waits is what a snapshot or fork
    /// "at 0 page stores" captures.
    Waiting = 9,
    /// vCPU 0 probed the ROM before its first page store: arg = the
    /// `ROM_CHECK_*` bits of what held. Every check that failed also
    /// counts as a read mismatch in its verify.
    RomCheck = 10,
    /// vCPU 0 probed its shared memory before its first page store: arg =
    /// the `SHARED_CHECK_*` bits of what held. Every check that failed
    /// also counts as a read mismatch in its verify.
    SharedCheck = 11,
    /// vCPU 0's verify read this word (the arg) from the start of the
    /// third page of its shared memory: what the host's file holds there
    /// now (a restored, cloned or forked guest maps the file again).
    SharedSeen = 12,
}

impl Event {
    /// Decodes an event code.
    pub fn from_u32(v: u32) -> Option<Event> {
        [
            Event::Boot,
            Event::Progress,
            Event::PassDone,
            Event::RoundEnd,
            Event::VerifyResult,
            Event::Done,
            Event::Panic,
            Event::CommandAck,
            Event::Waiting,
            Event::RomCheck,
            Event::SharedCheck,
            Event::SharedSeen,
        ]
        .into_iter()
        .find(|e| *e as u32 == v)
    }
}
