//! The memory functions the compiler expects; the host target's `core` does
//! not provide them to a `no_std` binary. Volatile accesses keep LLVM from
//! turning these loops back into calls to themselves.

use core::ptr::{read_volatile, write_volatile};

/// # Safety
/// `dest` and `src` must be valid for `n` bytes and not overlap.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid and disjoint.
    unsafe { memmove(dest, src, n) }
}

/// # Safety
/// `dest` and `src` must be valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // Word moves where both ends are 8-aligned, each run of them one
    // `rep movsq`: guest instructions are emulated one by one here, the
    // emulator steps a `rep movsq` once per word, and a struct copy byte by
    // byte (a 1.3 KiB boot-info page: ~5000 instructions) took
    // milliseconds. The copy runs backward only when `dest` overlaps the
    // source from above; every other copy (struct copies down or up the
    // stack included) runs forward.
    let words = (dest as usize | src as usize).is_multiple_of(8);
    let overlaps_from_above =
        (dest as usize) > (src as usize) && (dest as usize) - (src as usize) < n;
    if !overlaps_from_above {
        let mut i = 0;
        if words && n >= 8 {
            let count = n / 8;
            // SAFETY: both ranges are valid for `count` words, 8-aligned;
            // a forward copy is safe when dest does not overlap src from
            // above; the direction flag is clear (the ABI guarantees it
            // at calls).
            unsafe {
                core::arch::asm!(
                    "rep movsq",
                    inout("rcx") count => _,
                    inout("rdi") dest => _,
                    inout("rsi") src => _,
                    options(nostack, preserves_flags)
                );
            }
            i = count * 8;
        }
        while i < n {
            // SAFETY: i < n, both ranges valid for n bytes; copying forward is
            // safe when dest does not overlap src from above.
            unsafe { write_volatile(dest.add(i), read_volatile(src.add(i))) };
            i += 1;
        }
    } else {
        let mut i = n;
        if words {
            while !i.is_multiple_of(8) {
                i -= 1;
                // SAFETY: i < n as below.
                unsafe { write_volatile(dest.add(i), read_volatile(src.add(i))) };
            }
            let count = i / 8;
            if count > 0 {
                // SAFETY: both ranges are valid for the `count` words below
                // `i`, 8-aligned; with the direction flag set the copy runs
                // from the last word down, safe when dest is above src, and
                // the flag is cleared again before anything else runs.
                unsafe {
                    core::arch::asm!(
                        "std",
                        "rep movsq",
                        "cld",
                        inout("rcx") count => _,
                        inout("rdi") dest.add(i - 8) => _,
                        inout("rsi") src.add(i - 8) => _,
                        options(nostack)
                    );
                }
                i = 0;
            }
        }
        while i > 0 {
            i -= 1;
            // SAFETY: i < n as above; copying backward is safe when dest is above src.
            unsafe { write_volatile(dest.add(i), read_volatile(src.add(i))) };
        }
    }
    dest
}

/// # Safety
/// `dest` must be valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    let mut i = 0;
    // One `rep stosq` where aligned: guest instructions are emulated, and
    // the emulator steps it once per word.
    if (dest as usize).is_multiple_of(8) && n >= 8 {
        let b = (c as u8) as u64;
        let w = b * 0x0101_0101_0101_0101;
        let count = n / 8;
        // SAFETY: dest is 8-aligned and valid for `count` words; the
        // direction flag is clear (the ABI guarantees it at calls).
        unsafe {
            core::arch::asm!(
                "rep stosq",
                inout("rcx") count => _,
                inout("rdi") dest => _,
                in("rax") w,
                options(nostack, preserves_flags)
            );
        }
        i = count * 8;
    }
    while i < n {
        // SAFETY: i < n.
        unsafe { write_volatile(dest.add(i), c as u8) };
        i += 1;
    }
    dest
}

/// # Safety
/// `a` and `b` must be valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n.
        let (x, y) = unsafe { (read_volatile(a.add(i)), read_volatile(b.add(i))) };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// # Safety
/// `a` and `b` must be valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}

/// The precompiled `core` refers to this symbol; with `panic = "abort"` it is
/// never called.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
