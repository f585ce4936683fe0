//! The io_uring block device and the classic lost-write scenario: guest
//! memory shared copy-on-write with clones, a device pin on one page, the
//! guest and the device writing it in turn. Whoever wrote last must be
//! what the other sees; the clones and the image never change.

mod common;

use guest_mem::pin::PinAccess;
use guest_mem::{BackingKind, GuestRam, RamConfig, RegionFlags};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use vmm::devices::block::{BlockDevice, BLOCK_BYTES};

const MIB: u64 = 1 << 20;
const P: u64 = 0x10000;
const Q: u64 = 0x20000;

fn memfd(name: &std::ffi::CStr, len: u64) -> std::fs::File {
    // SAFETY: memfd_create takes a NUL-terminated name and flags.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: a new descriptor nothing else owns.
    let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.set_len(len).expect("size");
    f
}

/// An image with pages P and Q filled, and two clones of it alive.
fn clones() -> (std::fs::File, Arc<GuestRam>, Arc<GuestRam>) {
    let image = memfd(c"image", 4 * MIB);
    image.write_all_at(&[b'A'; 4096], P).expect("P");
    image.write_all_at(&[b'a'; 4096], Q).expect("Q");
    let cfg = RamConfig {
        backing: BackingKind::Memfd,
        ..RamConfig::default()
    };
    let clone = || {
        let r = GuestRam::from_file_private(4 * MIB, cfg, &image).expect("clone");
        r.mark_file_backed(&[P / 4096, Q / 4096]).expect("mark");
        Arc::new(r)
    };
    let (a, b) = (clone(), clone());
    (image, a, b)
}

fn byte(ram: &GuestRam, gpa: u64) -> u8 {
    let mut b = [0u8; 1];
    ram.read(gpa, &mut b).expect("read");
    b[0]
}

fn guest_write(ram: &GuestRam, gpa: u64, v: u8) {
    // The guest's store: through the mapping, as KVM's would be.
    // SAFETY: inside the live mapping of `ram`.
    unsafe { std::ptr::write_bytes((ram.host_addr() + gpa) as *mut u8, v, 4096) };
}

/// The byte at `offset` of `file`.
fn file_byte(file: &std::fs::File, offset: u64) -> u8 {
    let mut x = [0u8; 1];
    file.read_exact_at(&mut x, offset).expect("read");
    x[0]
}

fn block(file: &std::fs::File, b: u64) -> u8 {
    file_byte(file, b * BLOCK_BYTES)
}

#[test]
fn a_pinned_page_the_guest_writes_reaches_the_file_with_the_guests_data() {
    let (image, vm, sibling) = clones();
    let disk = memfd(c"disk", 16 * BLOCK_BYTES);
    let dev = BlockDevice::new(vm.clone(), disk.try_clone().expect("dup"), 16, 1).expect("device");
    // The device pins P read-only while it is still the image's page...
    dev.map(40, P, PinAccess::ReadOnly).expect("map");
    // ... the guest writes it, the device writes it out.
    guest_write(&vm, P, b'B');
    dev.write_slot(40, 3).expect("write");
    assert_eq!(
        block(&disk, 3),
        b'B',
        "the file holds the guest's latest data"
    );
    guest_write(&vm, P, b'C');
    dev.write_slot(40, 4).expect("write");
    assert_eq!(block(&disk, 4), b'C');
    dev.unmap(40).expect("unmap");
    // Nobody else saw any of it.
    assert_eq!(byte(&sibling, P), b'A');
    assert_eq!(file_byte(&image, P), b'A');
    assert_eq!(dev.stats().errors, 0);
}

#[test]
fn a_device_write_into_a_pinned_page_is_what_the_guest_reads() {
    let (image, vm, sibling) = clones();
    let disk = memfd(c"disk", 16 * BLOCK_BYTES);
    disk.write_all_at(&[b'D'; 4096], 5 * BLOCK_BYTES)
        .expect("block 5");
    let dev = BlockDevice::new(vm.clone(), disk.try_clone().expect("dup"), 16, 1).expect("device");
    vm.host_dirty().set_enabled(true); // as a dirty tracker would
    dev.map(41, Q, PinAccess::ReadWrite).expect("map");
    dev.read_slot(41, 5).expect("read");
    // The device's write is recorded for the dirty trackers and the table.
    assert!(vm.host_dirty().take().contains(&(Q / 4096)));
    assert!(vm.table().get(Q).has(guest_mem::Flag::Dirty));
    assert_eq!(byte(&vm, Q), b'D', "the guest sees the device's data");
    // The guest writes on; the device reads the page back out.
    guest_write(&vm, Q, b'E');
    dev.write_slot(41, 6).expect("write");
    assert_eq!(block(&disk, 6), b'E');
    dev.unmap(41).expect("unmap");
    assert_eq!(byte(&sibling, Q), b'a');
    assert_eq!(file_byte(&image, Q), b'a');
}

#[test]
fn bad_device_requests_are_refused() {
    let ram = Arc::new(GuestRam::new(4 * MIB, RamConfig::default()).expect("ram"));
    let rom = RegionFlags {
        read_only: true,
        ..RegionFlags::default()
    };
    ram.add_region(64 * MIB, MIB, rom).expect("rom");
    let disk = memfd(c"disk", 0);
    let dev = BlockDevice::new(ram.clone(), disk, 4, 1).expect("device");
    // Rule 14: the device may not write a read-only region.
    let e = dev
        .map(1, 64 * MIB, PinAccess::ReadWrite)
        .expect_err("read-only");
    assert!(e.to_string().contains("read-only"), "{e}");
    dev.map(1, 64 * MIB, PinAccess::ReadOnly)
        .expect("read-only pin");
    assert!(
        dev.read_slot(1, 0).is_err(),
        "a read-only slot is never written"
    );
    dev.unmap(1).expect("unmap");
    dev.map(2, 0, PinAccess::ReadWrite).expect("map");
    assert!(dev.write_slot(2, 4).is_err(), "block 4 of 4");
    assert!(
        dev.map(2, 4096, PinAccess::ReadOnly).is_err(),
        "slot in use"
    );
    assert!(dev.unmap(3).is_err(), "not mapped");
    dev.unmap(2).expect("unmap");
}

mod cli {
    //! The `io` workload through the CLI: the guest drives the device.

    use super::common::*;

    fn snap_dir(name: &str) -> std::path::PathBuf {
        tmpfs_dir("block", name)
    }

    #[test]
    fn the_io_workload_drives_the_device_and_verifies() {
        let j = run_ok(&[
            "run",
            "--json",
            "--workload",
            "io",
            "--vcpus",
            "2",
            "--pages",
            "64",
            "--passes",
            "2",
        ]);
        assert_eq!(j["verify_mismatches"], 0, "{j}");
        assert_eq!(j["block"]["blocks_written"], 2 * 64 * 2);
        assert_eq!(j["block"]["blocks_read"], 2 * 64 * 2 / 8);
        assert_eq!(j["block"]["errors"], 0);
    }

    #[test]
    fn a_live_snapshot_taken_while_the_device_writes_restores_with_zero_mismatches() {
        let dir = snap_dir("live");
        let d = dir.to_str().expect("utf-8");
        let j = take_snapshot(
            &dir,
            "300",
            &[
                "--workload",
                "io",
                "--vcpus",
                "2",
                "--pages",
                "128",
                "--passes",
                "3",
            ],
        );
        assert_eq!(j["snapshots"][0]["mode"], "live", "{j}");
        assert!(
            dir.join("disk.bin").exists(),
            "the disk travels with the snapshot"
        );
        for mode in ["eager", "uffd", "mmap"] {
            let r = run_ok(&["restore", d, "--mode", mode, "--verify", "--json"]);
            assert_eq!(r["verify_mismatches"], 0, "{mode}: {r}");
            assert_eq!(r["host_verify_mismatches"], 0, "{mode}: {r}");
            assert_eq!(r["block"]["errors"], 0, "{mode}: {r}");
        }
        // A clone and a fork child each get their own copy of the disk.
        let c = run_ok(&["clone", d, "--count", "2", "--json"]);
        assert_eq!(c["status"], "ok", "{c}");
        // A missing or truncated disk image is refused, naming it.
        let disk_path = dir.join("disk.bin");
        let saved = std::fs::read(&disk_path).expect("disk");
        std::fs::remove_file(&disk_path).expect("rm");
        let o = vmm(&["restore", d, "--json"], T);
        o.failure("disk.bin");
        std::fs::write(&disk_path, &saved[..4096]).expect("truncate");
        let o = vmm(&["restore", d, "--json"], T);
        o.failure("disk image is truncated");
        std::fs::write(&disk_path, &saved).expect("restore the disk");
        // A corrupt disk image is refused, naming it.
        let mut disk = std::fs::read(dir.join("disk.bin")).expect("disk");
        disk[4096] ^= 1;
        std::fs::write(dir.join("disk.bin"), disk).expect("write");
        let o = vmm(&["restore", d, "--json"], T);
        o.failure("disk image is corrupt");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn fork_children_get_their_own_disk() {
        let j = run_ok(&[
            "run",
            "--json",
            "--workload",
            "io",
            "--pages",
            "128",
            "--passes",
            "3",
            "--fork-after-pages",
            "200",
            "--forks",
            "2",
        ]);
        assert_eq!(j["status"], "ok", "{j}");
        for c in j["forks"][0]["children"].as_array().expect("children") {
            assert_eq!(c["status"], "ok", "{c}");
            assert_eq!(c["verify_mismatches"], 0, "{c}");
        }
    }
}

/// A 64 MiB guest of the `io` workload, 128 pages.
const IO_GUEST: &[&str] = &["--mem", "64M", "--pages", "128", "--workload", "io"];

/// `--rom`: read-only memory at the top of guest memory, from the CLI on
/// real KVM and userfaultfd. The guest reads it; its CPU store there is
/// refused (KVM's read-only slot exits, the VMM drops and counts the
/// write, the guest reads the count); the io_uring device may copy the
/// ROM out (a read-only pin) but its read into the ROM is refused (rule
/// 14), each refusal in the log and the report. The ROM comes back from
/// a snapshot with every restore mode, in clones and in fork children,
/// checked by the guest's verify.
#[test]
fn a_rom_is_read_only_to_the_guest_and_the_device_and_survives_snapshots() {
    use common::*;
    let content: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let rom = temp_file("rom", &content);
    let rom = rom.to_str().expect("utf-8");
    let guest = [IO_GUEST, &["--rom", rom]].concat();
    let top = 64 * MIB - 3 * 4096;
    let check_rom = |j: &serde_json::Value, probed: bool| {
        assert_eq!(j["status"], "ok", "{j}");
        assert_eq!(j["verify_mismatches"], 0, "{j}");
        let r = &j["rom"];
        assert_eq!(
            (r["gpa"].as_u64(), r["bytes"].as_u64()),
            (Some(top), Some(3 * 4096)),
            "{j}"
        );
        let regions = j["memory"]["regions"].as_array().expect("regions");
        assert_eq!(
            regions.last().map(|r| &r["read_only"]),
            Some(&true.into()),
            "{j}"
        );
        if probed {
            for k in [
                "content_ok",
                "cpu_write_refused",
                "device_read_ok",
                "device_write_tried",
                "device_write_refused",
            ] {
                assert_eq!(r["guest_check"][k], true, "{k}: {j}");
            }
            assert_eq!(r["guest_writes_refused"], 1, "{j}");
            assert_eq!(r["device_writes_refused"], 1, "{j}");
            assert_eq!(j["block"]["refused"], 1, "{j}");
        }
    };

    let dir = tmpfs_dir("block", "rom");
    let o = run_with_snapshot(&dir, "64", &guest);
    assert_eq!(o.code, 0, "{}", o.stderr);
    check_rom(&o.json(), true);
    for logged in [
        format!("refused a guest write of 8 bytes to read-only memory at {top:#x}"),
        format!("guest-physical page {top:#x} lies in a read-only region"),
    ] {
        assert!(o.stderr.contains(&logged), "{logged}: {}", o.stderr);
    }
    // The file is what the ROM holds: the snapshot's image has it there.
    let image = std::fs::File::open(dir.join("memory.bin")).expect("memory.bin");
    let mut held = vec![0u8; 3 * 4096];
    image.read_exact_at(&mut held, top).expect("read");
    assert_eq!(&held[..content.len()], &content[..]);
    assert!(held[content.len()..].iter().all(|b| *b == 0));

    let i = run_ok(&["inspect", dir.to_str().expect("utf-8"), "--json"]);
    assert_eq!(i["rom"]["gpa"], top, "{i}");
    for mode in ["eager", "mmap", "uffd"] {
        let o = restore_mode(&dir, mode, &[]);
        assert_eq!(o.code, 0, "{mode}: {}", o.stderr);
        check_rom(&o.json(), false);
    }
    // A guest that shared no memory has none to map again.
    let o = restore_mode(&dir, "eager", &["--shared-mem", rom]);
    assert_ne!(o.code, 0, "{}", o.stdout);
    let e = o.json()["error"].as_str().unwrap_or("").to_string();
    assert!(e.contains("shared no memory"), "{e}");
    let o = clone_count(&dir, "2", &[]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let j = o.json();
    for c in j["clones"].as_array().expect("clones") {
        assert_eq!(c["status"], "ok", "{c}");
        assert_eq!(c["verify_mismatches"], 0, "{c}");
    }
    let _ = std::fs::remove_dir_all(&dir);

    let o = run_with_fork("64", "2", &guest);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let j = o.json();
    check_rom(&j, true);
    // Every dirty tracker runs beside it (the KVM ones log the RAM's slot
    // only: the ROM is another, read-only, slot).
    for track in ["kvm-bitmap", "kvm-ring", "uffd-wp"] {
        let mut args = vec!["run", "--json", "--track", track];
        args.extend_from_slice(&guest);
        let j = run_ok(&args);
        assert_eq!(
            j["rom"]["guest_check"]["cpu_write_refused"], true,
            "{track}: {j}"
        );
        assert_eq!(j["tracking"]["missed_pages"], 0, "{track}: {j}");
    }
    for c in j["forks"][0]["children"].as_array().expect("children") {
        assert_eq!(c["status"], "ok", "{c}");
        assert_eq!(c["verify_mismatches"], 0, "{c}");
    }
}

/// `--shared-mem`: a file mapped shared (not copy-on-write) into guest
/// memory, from the CLI on real KVM. The guest's store and the io_uring
/// device's write (a read-write pin of a shared page: rule 14, its unshare
/// does nothing) reach the file itself. A snapshot records the file, not
/// its content: every restore, clone and fork child maps the file again
/// and sees what the host wrote there since. A file the device could not
/// pin is refused.
#[test]
fn shared_memory_is_the_hosts_file_and_a_device_pin_leaves_it_shared() {
    use common::*;
    let dir = tmpfs_dir("block", "shared");
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("shared.bin");
    std::fs::write(&file, vec![0xeeu8; 16 * 4096]).expect("write");
    let path = file.to_str().expect("utf-8");
    let guest = [IO_GUEST, &["--shared-mem", path]].concat();
    let snap = dir.join("snap");
    let o = run_with_snapshot(&snap, "64", &guest);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let j = o.json();
    assert_eq!(j["verify_mismatches"], 0, "{j}");
    let s = &j["shared_mem"];
    assert_eq!(s["gpa"], 64 * MIB - 16 * 4096, "{j}");
    assert_eq!(s["guest_check"]["stored"], true, "{j}");
    assert_eq!(s["guest_check"]["device_copied"], true, "{j}");
    assert_eq!(s["seen_at_verify"], u64::from_le_bytes([0xee; 8]), "{j}");
    let regions = j["memory"]["regions"].as_array().expect("regions");
    assert_eq!(
        regions.last().map(|r| &r["shared"]),
        Some(&true.into()),
        "{j}"
    );
    // The file holds the guest's word in its first page and, in its
    // second, the device's copy of the whole first page.
    let bytes = std::fs::read(&file).expect("read");
    assert_eq!(&bytes[..8], b"VMMSHMEM");
    assert_eq!(bytes[..4096], bytes[4096..8192]);
    assert!(bytes[8192..].iter().all(|b| *b == 0xee));

    // The host writes its file after the snapshot: whatever runs from the
    // snapshot reads that (the snapshot holds none of the file).
    let word: u64 = 0x1234_5678_9abc_def0;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .and_then(|f| f.write_all_at(&word.to_le_bytes(), 2 * 4096))
        .expect("write");
    let i = run_ok(&["inspect", snap.to_str().expect("utf-8"), "--json"]);
    assert_eq!(i["shared_mem"]["file"], path, "{i}");
    // The snapshot names its file, but only the user's --shared-mem maps
    // one (a snapshot is input).
    let o = restore_mode(&snap, "eager", &[]);
    assert_ne!(o.code, 0, "{}", o.stdout);
    assert!(o.json()["error"]
        .as_str()
        .unwrap_or("")
        .contains("--shared-mem FILE"));
    let shm = ["--shared-mem", path];
    for mode in ["eager", "mmap", "uffd"] {
        let o = restore_mode(&snap, mode, &shm);
        assert_eq!(o.code, 0, "{mode}: {}", o.stderr);
        let j = o.json();
        assert_eq!(j["shared_mem"]["seen_at_verify"], word, "{mode}: {j}");
    }
    let o = clone_count(&snap, "2", &shm);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let j = o.json();
    for c in j["clones"].as_array().expect("clones") {
        assert_eq!(c["shared_seen"], word, "{c}");
    }
    let o = run_with_fork("64", "2", &guest);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let j = o.json();
    assert_eq!(j["shared_mem"]["seen_at_verify"], word, "{j}");
    for c in j["forks"][0]["children"].as_array().expect("children") {
        assert_eq!(
            (&c["status"], &c["shared_seen"]),
            (&"ok".into(), &word.into()),
            "{c}"
        );
    }
    // A snapshot whose file is gone is refused, naming it.
    let moved = dir.join("moved.bin");
    std::fs::rename(&file, &moved).expect("rename");
    let o = restore_mode(&snap, "eager", &shm);
    assert_ne!(o.code, 0, "{}", o.stdout);
    let j = o.json();
    let e = j["error"].as_str().unwrap_or("");
    assert!(e.contains("--shared-mem") && e.contains(path), "{j}");
    std::fs::rename(&moved, &file).expect("rename");
    // Userfaultfd tracking covers the VM's own memory and passes the
    // kernel-served file by.
    let mut args = vec!["run", "--json", "--track", "uffd-wp"];
    args.extend_from_slice(&guest);
    let j = run_ok(&args);
    assert_eq!(j["tracking"]["missed_pages"], 0, "{j}");

    for (len, needle) in [(4096, "from 8 KiB"), (5000, "multiple of 4 KiB")] {
        std::fs::write(&file, vec![0u8; len]).expect("write");
        assert_usage_error(&["run", "--shared-mem", path], needle);
    }
    let _ = std::fs::remove_dir_all(&dir);
    // A file on a disk filesystem: the kernel refuses the device's long
    // pins, so the io workload is refused with it up front.
    let disk = temp_file("shared-disk", &vec![0u8; 8192]);
    if !vmm::host_fs::on_tmpfs(&disk) {
        assert_usage_error(
            &[
                "run",
                "--workload",
                "io",
                "--shared-mem",
                disk.to_str().expect("utf-8"),
            ],
            "only in files on tmpfs",
        );
    }
}
