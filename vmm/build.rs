//! Builds the guest kernel (`resources/guest`) with SSE/AVX turned off and
//! hands its path to the crate, which embeds it with `include_bytes!`.
//!
//! The guest is its own cargo workspace with its own target directory under
//! `OUT_DIR`: the stable toolchain cannot set rustflags per package, and the
//! guest must never be built with SSE (this host's KVM emulator rejects SSE
//! arithmetic). `--target` is passed explicitly so the flags reach only the
//! guest, never its build script.

use std::path::PathBuf;
use std::process::Command;

const GUEST_FLAGS: &[&str] = &[
    "-Ctarget-feature=-sse,-sse2,-sse3,-ssse3,-sse4.1,-sse4.2,-avx,-avx2,-fma,-f16c",
    "-Crelocation-model=static",
    // The ABI warning about SSE2 is expected: the guest uses no floating point.
    "-Awarnings",
];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest.parent().expect("vmm/ sits in the workspace root");
    let guest = root.join("resources/guest");
    let protocol = root.join("resources/protocol");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    let target_dir = out.join("guest-target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let triple = "x86_64-unknown-linux-gnu";

    for p in [
        guest.join("src"),
        guest.join("Cargo.toml"),
        guest.join("build.rs"),
        guest.join("guest.ld"),
        protocol.join("src"),
        protocol.join("Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", p.display());
    }

    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--release")
        .arg("--locked")
        .arg("--manifest-path")
        .arg(guest.join("Cargo.toml"))
        .arg("--target")
        .arg(triple)
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", GUEST_FLAGS.join("\x1f"));
    for var in [
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_MAKEFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .expect("could not run cargo to build the guest kernel");
    assert!(
        status.success(),
        "building the guest kernel (resources/guest) failed"
    );

    let elf = target_dir.join(triple).join("release").join("vmm-guest");
    println!("cargo:rustc-env=VMM_GUEST_ELF={}", elf.display());
}
