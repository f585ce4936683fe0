//! Port I/O: the serial line and the structured control port.

use core::arch::asm;
use guest_protocol::control::{
    Event, ARG_HI_PORT, ARG_LO_PORT, BLOCK_BLOCK_PORT, BLOCK_CMD_PORT, BLOCK_CMD_READ,
    BLOCK_CMD_WRITE, BLOCK_PAGE_PORT, CONTROL_PORT, SERIAL_PORT,
};

fn outl(port: u16, value: u32) {
    // SAFETY: port I/O has no memory effects in this guest; the VMM owns every port.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    };
}

fn outb(port: u16, value: u8) {
    // SAFETY: as for `outl`.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for `outl`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Asks the block device to run `cmd` on guest page number `page` and
/// block `block`; returns its status (0: done).
pub fn block(cmd: u8, page: u64, block: u64) -> u8 {
    outl(BLOCK_PAGE_PORT, page as u32);
    outl(BLOCK_BLOCK_PORT, block as u32);
    outb(BLOCK_CMD_PORT, cmd);
    inb(BLOCK_CMD_PORT)
}

/// Has the block device copy guest page `from` into guest page `to`
/// through block `block` (written out, then read back); true when both
/// commands succeeded.
pub fn copy_through_block(from: u64, to: u64, block: u64) -> bool {
    let out = self::block(BLOCK_CMD_WRITE, from, block);
    let back = self::block(BLOCK_CMD_READ, to, block);
    out == 0 && back == 0
}

fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as for `outl`.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack, preserves_flags))
    };
    v
}

/// How many guest writes to the ROM the VMM has refused so far.
pub fn rom_refused() -> u32 {
    inl(guest_protocol::control::ROM_PORT)
}

/// Reports `event` with `arg` on the control port.
pub fn event(event: Event, arg: u64) {
    outl(ARG_LO_PORT, arg as u32);
    outl(ARG_HI_PORT, (arg >> 32) as u32);
    outl(CONTROL_PORT, event as u32);
}

/// Waits for the next command: one exit, in which the VMM holds this vCPU
/// until a command may have come (see `control::IDLE_PORT`).
pub fn idle() {
    outl(guest_protocol::control::IDLE_PORT, 0);
}

/// Writes text to COM1 with one `rep outsb`: KVM may hand the whole string
/// to the VMM in one exit (an instruction emulator may still exit per byte).
pub fn print(s: &str) {
    if s.is_empty() {
        return;
    }
    // SAFETY: reads `s.len()` bytes from `s`, which is valid for that long;
    // the direction flag is clear (the VMM starts vCPUs with RFLAGS = 2 and
    // nothing sets it).
    unsafe {
        asm!(
            "rep outsb",
            in("dx") SERIAL_PORT,
            inout("rsi") s.as_ptr() => _,
            inout("rcx") s.len() => _,
            options(nostack, preserves_flags, readonly)
        )
    };
}

/// Writes an unsigned decimal number to COM1 (no `core::fmt` in this guest).
pub fn print_u64(mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    // SAFETY: the bytes are ASCII digits.
    print(unsafe { core::str::from_utf8_unchecked(&buf[i..]) });
}

/// Prints `vcpu N: ` at the start of a line.
pub fn prefix(vcpu: u64) {
    print("vcpu ");
    print_u64(vcpu);
    print(": ");
}

/// Stops this vCPU for good (interrupts are off, so `hlt` never returns in a
/// meaningful way; the VMM has already stopped running it after `Done`).
pub fn halt() -> ! {
    loop {
        // SAFETY: halting has no memory effects.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}
