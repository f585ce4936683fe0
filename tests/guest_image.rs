//! The embedded guest kernel is a static, non-PIE x86_64 ELF at the kernel
//! address, and contains no SSE/AVX arithmetic (this host's KVM emulator
//! rejects it; plain SSE moves are the only SSE it handles).

use guest_protocol::layout::KERNEL_GPA;
use iced_x86::{CpuidFeature, Decoder, DecoderOptions, Instruction, Mnemonic};
use vmm::guest_image::GUEST_ELF;

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// (address, bytes) of each executable PT_LOAD segment.
fn executable_segments(elf: &[u8]) -> Vec<(u64, &[u8])> {
    let phoff = u64_at(elf, 32) as usize;
    let phnum = u16_at(elf, 56) as usize;
    (0..phnum)
        .map(|i| phoff + i * 56)
        .filter(|o| u32::from_le_bytes([elf[*o], elf[o + 1], elf[o + 2], elf[o + 3]]) == 1)
        .filter(|o| elf[o + 4] & 1 != 0)
        .map(|o| {
            let off = u64_at(elf, o + 8) as usize;
            let size = u64_at(elf, o + 32) as usize;
            (u64_at(elf, o + 24), &elf[off..off + size])
        })
        .collect()
}

fn is_sse_or_avx(f: CpuidFeature) -> bool {
    let name = format!("{f:?}");
    ["SSE", "AVX", "MMX", "FMA", "F16C", "AES", "PCLMUL", "SHA"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// Plain SSE moves, which this host's emulator does run.
fn is_plain_move(i: &Instruction) -> bool {
    matches!(
        i.mnemonic(),
        Mnemonic::Movups | Mnemonic::Movaps | Mnemonic::Movdqu | Mnemonic::Movdqa
    )
}

#[test]
fn guest_is_static_non_pie_at_the_kernel_address() {
    assert_eq!(&GUEST_ELF[..4], b"\x7fELF");
    assert_eq!(u16_at(GUEST_ELF, 16), 2, "ET_EXEC: static and non-PIE");
    assert_eq!(u16_at(GUEST_ELF, 18), 62, "x86_64");
    assert_eq!(
        u64_at(GUEST_ELF, 24),
        KERNEL_GPA,
        "entry at the kernel address"
    );
}

#[test]
fn guest_has_no_sse_or_avx_arithmetic() {
    let segments = executable_segments(GUEST_ELF);
    assert!(!segments.is_empty());
    let mut decoded = 0;
    let mut offenders = Vec::new();
    for (addr, code) in segments {
        let mut d = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
        for i in &mut d {
            decoded += 1;
            if i.cpuid_features().iter().copied().any(is_sse_or_avx) && !is_plain_move(&i) {
                offenders.push(format!("{:#x}: {:?}", i.ip(), i.mnemonic()));
            }
        }
    }
    assert!(decoded > 100, "decoded only {decoded} instructions");
    assert!(
        offenders.is_empty(),
        "SSE/AVX arithmetic in the guest: {offenders:?}"
    );
}

#[test]
fn the_guard_catches_sse_arithmetic() {
    // pxor xmm0, xmm0 / paddq xmm1, xmm2: what LLVM emits with SSE on.
    let code = [0x66, 0x0f, 0xef, 0xc0, 0x66, 0x0f, 0xd4, 0xca];
    let d = Decoder::with_ip(64, &code, 0, DecoderOptions::NONE);
    let flagged = d
        .into_iter()
        .filter(|i| i.cpuid_features().iter().copied().any(is_sse_or_avx) && !is_plain_move(i))
        .count();
    assert_eq!(flagged, 2);
    // movups is allowed.
    let d = Decoder::with_ip(64, &[0x0f, 0x10, 0xc1], 0, DecoderOptions::NONE);
    assert!(d.into_iter().all(|i| is_plain_move(&i)));
}
