//! Bad input gives a clear error and the documented exit code, never a panic.

mod common;
use common::*;

#[test]
fn invalid_sizes_and_counts_are_usage_errors() {
    assert_usage_error(
        &["run", "--mem", "1000"],
        "not a multiple of the 4 KiB page size",
    );
    assert_usage_error(&["run", "--mem", "lots"], "invalid size");
    assert_usage_error(&["run", "--mem", "1M"], "too small for the guest layout");
    assert_usage_error(
        &["run", "--mem", "1T"],
        "larger than the guest layout can map",
    );
    assert_usage_error(&["run", "--mem", "64M", "--pages", "100000"], "at most");
    assert_usage_error(&["run", "--vcpus", "0"], "--vcpus 0 is out of range");
    assert_usage_error(&["run", "--vcpus", "65"], "out of range");
    assert_usage_error(&["run", "--pages", "0"], "--pages must be at least 1");
    assert_usage_error(&["run", "--workload", "bogus"], "unknown workload");
    assert_usage_error(&["run", "--write-ratio", "101"], "not a percentage");
    assert_usage_error(&["run", "--no-such-flag"], "unexpected argument");
    assert_usage_error(&["run", "--poison", "0x1000"], "written at boot");
    assert_usage_error(
        &["run", "--mem", "64M", "--poison", "64M"],
        "beyond guest RAM",
    );
    assert_usage_error(&["run", "--poison", "0xz"], "not a hex");
    assert_usage_error(
        &["run", "--poison", "48M", "--backing", "plain"],
        "--backing memfd or anon",
    );
    assert_usage_error(&["bench", "snapshot", "--runs", "0"], "not in 1..=50");
}

#[test]
fn bad_roms_are_usage_errors() {
    assert_usage_error(
        &["run", "--rom", "/nonexistent-rom"],
        "--rom /nonexistent-rom",
    );
    let empty = temp_file("empty-rom", b"");
    assert_usage_error(
        &["run", "--rom", empty.to_str().expect("utf-8")],
        "is empty",
    );
    let big = temp_file("big-rom", b"");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&big)
        .and_then(|f| f.set_len(17 << 20))
        .expect("size");
    let big = big.to_str().expect("utf-8");
    assert_usage_error(&["run", "--rom", big], "the ROM holds at most 16 MiB");
    let rom = temp_file("rom-8m", &vec![1u8; 8 << 20]);
    let rom = rom.to_str().expect("utf-8");
    assert_usage_error(
        &["run", "--mem", "8M", "--pages", "1", "--rom", rom],
        "leaves no RAM below it",
    );
    assert_usage_error(
        &["run", "--mem", "64M", "--pages", "14000", "--rom", rom],
        "less any --rom",
    );
    assert_usage_error(
        &["run", "--mem", "64M", "--rom", rom, "--poison", "60M"],
        "--poison may not aim at the --rom",
    );
}

#[test]
fn mem_larger_than_host_ram_is_refused() {
    // 64 GiB fits the layout (75 GiB) but exceeds this 24 GiB host; skip on
    // a host that really has that much RAM.
    let o = vmm(&["run", "--mem", "64G"], T);
    if o.code == 0 {
        eprintln!("skipped: this host has at least 64 GiB of RAM");
        return;
    }
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(
        o.stderr.contains("larger than this host's RAM"),
        "{}",
        o.stderr
    );
}

#[test]
fn usage_errors_in_json_mode_are_one_json_object() {
    let o = vmm(&["run", "--json", "--mem", "1M"], T);
    assert_eq!(o.code, 2);
    let j = o.json();
    assert_eq!(j["status"], "usage");
    assert!(j["error"].as_str().unwrap_or("").contains("too small"));
}

#[test]
fn kernel_that_is_not_an_elf_is_refused() {
    let path = temp_file("not-elf", b"#!/bin/sh\necho hello\n");
    let o = vmm(&["run", "--kernel", path.to_str().expect("utf-8 path")], T);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(
        o.stderr.contains("is not a valid x86_64 ELF kernel"),
        "{}",
        o.stderr
    );

    let o = vmm(&["run", "--kernel", "/nonexistent/kernel"], T);
    assert_eq!(o.code, 1);
    assert!(
        o.stderr.contains("cannot read kernel /nonexistent/kernel"),
        "{}",
        o.stderr
    );

    // An ELF for another machine.
    let mut elf = tiny_elf(&HALT);
    elf[18] = 183; // aarch64
    let path = temp_file("arm.elf", &elf);
    let o = vmm(&["run", "--kernel", path.to_str().expect("utf-8 path")], T);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("machine is not x86_64"), "{}", o.stderr);
}

#[test]
fn kernel_segments_outside_the_kernel_area_are_refused() {
    let mut elf = tiny_elf(&HALT);
    // Move the segment's physical address onto the page tables.
    elf[64 + 24..64 + 32].copy_from_slice(&0x3000u64.to_le_bytes());
    let path = temp_file("low.elf", &elf);
    let o = vmm(&["run", "--kernel", path.to_str().expect("utf-8 path")], T);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("outside the kernel area"), "{}", o.stderr);
}

#[test]
fn triple_fault_reports_registers() {
    // ud2 with no IDT: #UD -> #GP -> #DF -> triple fault.
    let path = temp_file("ud2.elf", &tiny_elf(&[0x0f, 0x0b]));
    let o = vmm(
        &[
            "run",
            "--json",
            "--kernel",
            path.to_str().expect("utf-8 path"),
        ],
        T,
    );
    o.failure("rip=0x200078");
    assert_eq!(o.failure("triple fault")["status"], "vcpu_fault");
}

#[test]
fn guest_panic_is_an_error_with_its_message() {
    let mut code = serial_code("PANIC: boom\n");
    code.extend(event_code(7));
    code.extend(HALT);
    let path = temp_file("panic.elf", &tiny_elf(&code));
    let o = vmm(&["run", "--kernel", path.to_str().expect("utf-8 path")], T);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(o.stdout.contains("PANIC: boom"), "{}", o.stdout);
    assert!(
        o.stdout
            .contains("guest kernel panicked on vCPU 0: PANIC: boom"),
        "{}",
        o.stdout
    );
}

#[test]
fn hostile_guest_garbage_on_the_control_port_is_a_protocol_error() {
    // Unknown ports are ignored like an empty ISA bus; an unknown event code is not.
    let mut code = vec![0x66, 0xba, 0x34, 0x12, 0xb0, 0x55, 0xee]; // out 0x1234, 0x55
    code.extend(event_code(0xdead));
    code.extend(HALT);
    let path = temp_file("garbage.elf", &tiny_elf(&code));
    let o = vmm(
        &[
            "run",
            "--json",
            "--kernel",
            path.to_str().expect("utf-8 path"),
        ],
        T,
    );
    let j = o.failure("unknown event code 0xdead");
    assert_eq!(j["status"], "protocol_error");
}

#[test]
fn foreign_kernel_that_halts_is_stopped_without_host_verify() {
    // With the in-kernel irqchip, `hlt` with interrupts off parks the vCPU
    // inside KVM; --stop-after-ms stops a kernel that cannot hear the
    // protocol's stop command at once.
    let mut code = serial_code("hello from a foreign kernel\n");
    code.extend(HALT);
    let path = temp_file("hello.elf", &tiny_elf(&code));
    let kernel = path.to_str().expect("utf-8 path");
    let o = vmm(
        &[
            "run",
            "--json",
            "--stop-after-ms",
            "200",
            "--kernel",
            kernel,
        ],
        T,
    );
    assert!(
        o.stderr.contains("hello from a foreign kernel"),
        "{}",
        o.stderr
    );
    let j = o.json();
    assert_eq!(j["host_verify_mismatches"], serde_json::Value::Null);
    assert_eq!(j["vcpu_reports"][0]["outcome"], "stopped", "{j}");
    assert_eq!(o.code, 0);
}

#[test]
fn missing_kvm_is_a_clear_error() {
    // Hide /dev/kvm in a private mount namespace (needs root and unshare).
    if !can_unshare_mount() {
        eprintln!("skipped: cannot create a mount namespace here (needs root and unshare)");
        return;
    }
    let script = format!("mount -t tmpfs none /dev && exec {} run --json", vmm_bin());
    let out = in_mount_namespace(&script);
    assert_json_failure(&out, "kvm_unavailable", "/dev/kvm does not exist");
}

#[test]
fn kvm_permission_denied_is_a_clear_error() {
    // /dev/kvm is root-only on this host: an unprivileged user cannot open it.
    let meta = std::fs::metadata("/dev/kvm");
    let world_rw = meta.as_ref().is_ok_and(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode() & 0o006 == 0o006
    });
    let have_setpriv = std::process::Command::new("setpriv")
        .arg("--help")
        .output()
        .is_ok_and(|o| o.status.success());
    if world_rw || !have_setpriv {
        eprintln!("skipped: /dev/kvm is open to everyone here, or setpriv is missing");
        return;
    }
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            vmm_bin(),
            "run",
            "--json",
        ])
        .output()
        .expect("setpriv");
    assert_json_failure(&out, "kvm_unavailable", "permission denied");
}
