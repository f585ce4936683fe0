//! The tiny guest kernel: entered by the VMM in 64-bit long mode on every
//! vCPU with `rdi` = vCPU index and `rsi` = the boot-info page, it runs the
//! memory workload the boot-info page names and reports on the control port.
//! Built without SSE and without `core::fmt` (see docs/architecture.md).
#![no_std]
#![no_main]

mod io;
mod mem;
mod rom;
mod shared;
mod workload;

use core::arch::global_asm;
use guest_protocol::boot_info::{BootInfo, BOOT_INFO_MAGIC, BOOT_INFO_VERSION};
use guest_protocol::control::Event;
use guest_protocol::layout::{MAX_VCPUS, STACK_GPA, STACK_SIZE};

// Entry: set this vCPU's stack (STACK_GPA + (index + 1) * STACK_SIZE), then
// call into Rust with the registers the VMM set untouched.
global_asm!(
    ".section .text.start, \"ax\"",
    ".global _start",
    "_start:",
    "    lea rax, [rdi + 1]",
    "    imul rax, rax, {stack_size}",
    "    add rax, {stack_base}",
    "    mov rsp, rax",
    "    call {main}",
    "2:  cli",
    "    hlt",
    "    jmp 2b",
    stack_size = const STACK_SIZE,
    stack_base = const STACK_GPA,
    main = sym guest_main,
);

extern "C" fn guest_main(vcpu: u64, boot_info: *const BootInfo) -> ! {
    if vcpu >= MAX_VCPUS as u64 {
        fail(vcpu, "vCPU index out of range");
    }
    // SAFETY: the VMM passes the boot-info page's identity-mapped address;
    // only the header is read here, the command slots are read volatile later.
    let (magic, version) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*boot_info).magic),
            core::ptr::read_volatile(&raw const (*boot_info).version),
        )
    };
    if magic != BOOT_INFO_MAGIC {
        fail(vcpu, "boot info: bad magic");
    }
    if version != BOOT_INFO_VERSION {
        fail(vcpu, "boot info: unsupported version");
    }
    io::event(Event::Boot, BOOT_INFO_VERSION as u64);
    workload::run(vcpu, boot_info)
}

/// Reports a fatal guest error: the message on the serial line, then the
/// `Panic` event, then halt.
pub fn fail(vcpu: u64, msg: &str) -> ! {
    io::prefix(vcpu);
    io::print("PANIC: ");
    io::print(msg);
    io::print("\n");
    io::event(Event::Panic, vcpu);
    io::halt()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    io::print("PANIC: ");
    io::print(info.message().as_str().unwrap_or("(formatted message)"));
    if let Some(loc) = info.location() {
        io::print(" at ");
        io::print(loc.file());
        io::print(":");
        io::print_u64(loc.line() as u64);
    }
    io::print("\n");
    io::event(Event::Panic, u64::MAX);
    io::halt()
}
