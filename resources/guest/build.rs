//! Links the guest as a static, non-PIE ELF placed by `guest.ld`.
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rerun-if-changed=guest.ld");
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,--gc-sections",
    ] {
        println!("cargo:rustc-link-arg-bin=vmm-guest={arg}");
    }
    println!("cargo:rustc-link-arg-bin=vmm-guest=-T{dir}/guest.ld");
}
