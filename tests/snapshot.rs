//! Snapshots taken while the guest runs (paused mode for now), restored
//! eagerly with 0 mismatches; the check can fail (a stale page is caught);
//! bad snapshot files and a failed snapshot give clear errors.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use vmm::snapshot::memory::MemoryFile;
use vmm::snapshot::state::{decode, encode};

fn snap_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-snap-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn restore(dir: &Path) -> Output {
    restore_in(dir, "eager")
}

/// `vmm restore DIR --mode MODE --verify --json`.
fn restore_in(dir: &Path, mode: &str) -> Output {
    vmm(
        &[
            "restore",
            dir.to_str().expect("utf-8"),
            "--mode",
            mode,
            "--verify",
            "--json",
        ],
        T,
    )
}

/// [`restore_in`], asserted to exit 0; its JSON report.
fn restored(dir: &Path, mode: &str) -> serde_json::Value {
    let o = restore_in(dir, mode);
    assert_eq!(o.code, 0, "{mode}: {}\n{}", o.stdout, o.stderr);
    o.json()
}

#[test]
fn snapshots_mid_workload_restore_with_zero_mismatches() {
    let cases = [
        ("seq-write", "1"),
        ("seq-write", "2"),
        ("rand-write", "1"),
        ("rand-write", "2"),
    ];
    for mode in ["live", "paused"] {
        for (workload, vcpus) in cases {
            check_round_trip(mode, workload, vcpus);
        }
    }
}

fn check_round_trip(mode: &str, workload: &str, vcpus: &str) {
    let dir = snap_dir(&format!("{mode}-{workload}-{vcpus}"));
    let args = [
        "--snapshot-mode",
        mode,
        "--workload",
        workload,
        "--vcpus",
        vcpus,
        "--pages",
        "192",
        "--passes",
        "3",
    ];
    let j = take_snapshot(&dir, "200", &args);
    let s = &j["snapshots"][0];
    assert_eq!(s["mode"], mode);
    assert!(s["pause_us"].as_u64().is_some() && s["bytes_written"].as_u64().unwrap_or(0) > 0);
    // Files are private and memory.bin is sparse: about what was populated.
    let meta = std::fs::metadata(dir.join("memory.bin")).expect("memory.bin");
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert!(meta.blocks() * 512 < 8 << 20, "memory.bin is not sparse");
    // mmap mode both where the snapshot is (ext4 here: kernel-managed) and
    // from a copy on tmpfs (with the fault engine).
    let shm = Path::new("/dev/shm").join(dir.file_name().expect("name"));
    let on_tmpfs = Path::new("/dev/shm").is_dir() && {
        let _ = std::fs::remove_dir_all(&shm);
        std::fs::create_dir_all(&shm).is_ok()
            && std::fs::copy(dir.join("memory.bin"), shm.join("memory.bin")).is_ok()
            && std::fs::copy(dir.join("state.bin"), shm.join("state.bin")).is_ok()
    };
    let mut restores = vec![
        ("eager", dir.clone()),
        ("uffd", dir.clone()),
        ("mmap", dir.clone()),
    ];
    if on_tmpfs {
        restores.push(("mmap", shm.clone()));
    }
    for (restore_mode, from) in restores {
        let o = restore_in(&from, restore_mode);
        let what = format!(
            "{mode} snapshot, {restore_mode} restore from {}, {workload} x{vcpus}",
            from.display()
        );
        assert_eq!(o.code, 0, "{what}: {}\n{}", o.stdout, o.stderr);
        let r = o.json();
        assert_eq!(r["status"], "ok");
        assert_eq!(r["verify_mismatches"], 0, "{what}");
        assert_eq!(r["host_verify_mismatches"], 0, "{what}");
        // The guest went on from where it was to the end of its workload.
        let total = 192 * 3 * vcpus.parse::<u64>().expect("n");
        assert_eq!(r["pages_written"], total, "{r}");
        assert_eq!(r["restore"]["mode"], restore_mode);
        // The VMM's part ends at the first KVM_RUN, before the guest's I/O.
        let (run, io) = (
            r["restore"]["first_run_us"].as_u64(),
            r["restore"]["first_io_us"].as_u64(),
        );
        assert!(
            run.zip(io).is_some_and(|(run, io)| run <= io),
            "{what}: {}",
            r["restore"]
        );
        if restore_mode == "uffd" {
            // Lazy: only the execution chunks were loaded up front.
            assert!(r["memory"]["faults"]["missing"].as_u64().unwrap_or(0) > 0);
        }
    }
    let o = vmm(&["inspect", dir.to_str().expect("utf-8"), "--json"], T);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.json()["verify_mismatches"], 0);
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(shm);
}

/// A VM restored by mapping `memory.bin` (on tmpfs, with the fault engine)
/// runs on the file's pages without faulting them in: a live snapshot of it
/// must still hold them. Without recording them, the snapshot held only the
/// pages written after the restore and its restore triple-faulted.
#[test]
fn a_snapshot_of_an_mmap_restore_holds_the_file_pages() {
    if !Path::new("/dev/shm").is_dir() {
        eprintln!("skipped: no /dev/shm (tmpfs) for the fault engine's mmap restore");
        return;
    }
    let name = |n: &str| Path::new("/dev/shm").join(format!("vmm-snap-{}-{n}", std::process::id()));
    let (first, second) = (name("mmap-parent"), name("mmap-child"));
    for d in [&first, &second] {
        let _ = std::fs::remove_dir_all(d);
    }
    let args = [
        "--snapshot-mode",
        "paused",
        "--pages",
        "192",
        "--passes",
        "3",
    ];
    take_snapshot(&first, "200", &args);
    let r = run_ok(&[
        "restore",
        first.to_str().expect("utf-8"),
        "--mode",
        "mmap",
        "--snapshot",
        second.to_str().expect("utf-8"),
        "--snapshot-after-pages",
        "100",
        "--json",
    ]);
    assert_eq!(r["snapshots"][0]["mode"], "live", "{r}");
    for mode in ["eager", "uffd"] {
        let r = restored(&second, mode);
        assert_eq!(r["status"], "ok", "{mode}: {r}");
        assert_eq!(r["verify_mismatches"], 0, "{mode}: {r}");
        assert_eq!(r["host_verify_mismatches"], 0, "{mode}: {r}");
        assert_eq!(r["pages_written"], 192 * 3, "{mode}: {r}");
    }
    for d in [&first, &second] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn live_snapshots_refuse_what_they_cannot_run_with() {
    for (extra, needle) in [
        (["--backing", "plain"], "use --backing memfd or anon"),
        (
            ["--track", "uffd-async"],
            "cannot run with --track uffd-async",
        ),
    ] {
        let dir = snap_dir("refused");
        let mut args = vec![
            "run",
            "--json",
            "--snapshot",
            dir.to_str().expect("utf-8"),
            "--snapshot-after-pages",
            "64",
        ];
        args.extend_from_slice(&extra);
        let o = vmm(&args, T);
        let j = o.failure(needle);
        assert_eq!(j["status"], "unsupported_combination");
        assert!(!dir.exists());
    }
    // kvm-bitmap tracking and a live snapshot run together.
    let dir = snap_dir("with-kvm-bitmap");
    let j = take_snapshot(
        &dir,
        "200",
        &["--track", "kvm-bitmap", "--pages", "192", "--passes", "2"],
    );
    assert_eq!(j["tracking"]["missed_pages"], 0);
    assert_eq!(restore(&dir).code, 0);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_stale_page_is_caught() {
    let dir = snap_dir("stale");
    take_snapshot(&dir, "400", &["--pages", "256", "--passes", "2"]);
    // Put an older pass's word back into a page of memory.bin (a lost
    // write), then make the checksums agree so only the oracle can tell.
    let (mut state, _) =
        decode(&std::fs::read(dir.join("state.bin")).expect("state")).expect("decode");
    let mem = dir.join("memory.bin");
    let gpa = 0x40_0000u64; // vCPU 0, page 0: rewritten in pass 1 by now
    let stale = guest_protocol::schedule::word(1, 0, 0, 0);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&mem)
            .expect("open");
        f.write_all_at(&stale.to_le_bytes(), gpa).expect("write");
    }
    state.memory.chunk_crc = MemoryFile::open(&mem, state.machine.mem_bytes)
        .expect("open")
        .checksums()
        .expect("crc");
    let (bytes, _) = encode(&state).expect("encode");
    std::fs::write(dir.join("state.bin"), bytes).expect("state");
    let o = vmm(&["inspect", dir.to_str().expect("utf-8")], T);
    assert_eq!(o.code, 3, "{}", o.stdout);
    let o = restore(&dir);
    assert_eq!(o.code, 3, "{}", o.stderr);
    assert_eq!(o.json()["status"], "verify_mismatch");
    let _ = std::fs::remove_dir_all(dir);
}

fn expect_bad(dir: &Path, needle: &str) {
    let o = restore(dir);
    o.failure(needle);
    assert!(!o.stderr.contains("panicked"));
    let o = vmm(&["inspect", dir.to_str().expect("utf-8")], T);
    assert_eq!(o.code, 1, "inspect: {}", o.stdout);
}

#[test]
fn bad_snapshots_are_refused_clearly() {
    let base = snap_dir("base");
    take_snapshot(&base, "200", &["--pages", "128", "--passes", "2"]);
    let copy = |name: &str| {
        let d = snap_dir(name);
        std::fs::create_dir_all(&d).expect("dir");
        for f in ["memory.bin", "state.bin"] {
            std::fs::copy(base.join(f), d.join(f)).expect("copy");
        }
        d
    };
    let state = std::fs::read(base.join("state.bin")).expect("state");

    let d = copy("missing");
    std::fs::remove_file(d.join("memory.bin")).expect("rm");
    expect_bad(&d, "memory.bin");

    let d = copy("truncated");
    std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("memory.bin"))
        .and_then(|f| f.set_len(1 << 20))
        .expect("truncate");
    expect_bad(&d, "truncated");

    let d = copy("flip-state");
    let mut s = state.clone();
    let mid = s.len() / 2;
    s[mid] ^= 0x40;
    std::fs::write(d.join("state.bin"), s).expect("write");
    expect_bad(&d, "checksum mismatch");

    let d = copy("flip-memory");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(d.join("memory.bin"))
            .expect("open");
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 0x40_0000).expect("read");
        f.write_all_at(&[b[0] ^ 1], 0x40_0000).expect("write");
    }
    expect_bad(&d, "checksum mismatch in chunk 2");
    // Lazily, the bad chunk is found when the guest first needs it (its
    // pages are poisoned, the vCPU stops with a memory error) or when the
    // background prefetch reaches it first (the guest is stopped): exit 1
    // either way, naming the chunk.
    let o = restore_in(&d, "uffd");
    assert_eq!(o.code, 1, "{}", o.stderr);
    let j = o.json();
    assert!(
        j["status"] == "memory_error" || j["status"] == "snapshot_corrupt",
        "{j}"
    );
    assert!(
        j["error"]
            .as_str()
            .unwrap_or("")
            .contains("checksum mismatch in chunk 2"),
        "{j}"
    );
    // Mapped: the background verification stops the guest, naming the chunk.
    let o = vmm(
        &[
            "restore",
            d.to_str().expect("utf-8"),
            "--mode",
            "mmap",
            "--json",
        ],
        T,
    );
    o.failure("checksum mismatch in chunk 2");

    // Another format version, with a valid checksum.
    let d = copy("version");
    let mut s = state.clone();
    s[8..12].copy_from_slice(&7u32.to_le_bytes());
    let end = s.len() - 4;
    let crc = crc32fast::hash(&s[..end]);
    s[end..].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(d.join("state.bin"), s).expect("write");
    expect_bad(&d, "format version 7");

    // An absurd size field.
    let d = copy("absurd");
    let mut s = state.clone();
    s[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(d.join("state.bin"), s).expect("write");
    expect_bad(&d, "absurd size");

    // Not a snapshot at all.
    let d = copy("garbage");
    std::fs::write(d.join("state.bin"), b"hello").expect("write");
    expect_bad(&d, "truncated");

    let o = restore(Path::new("/nonexistent/snapshot"));
    o.failure("/nonexistent/snapshot/state.bin");
    for n in [
        "base",
        "missing",
        "truncated",
        "flip-state",
        "flip-memory",
        "version",
        "absurd",
        "garbage",
    ] {
        let _ = std::fs::remove_dir_all(snap_dir(n));
    }
}

#[test]
fn a_failed_snapshot_leaves_nothing_and_the_guest_runs_on() {
    // The parent directory does not exist: the snapshot fails, the guest
    // finishes its workload verified, no directory is left.
    let o = vmm(
        &[
            "run",
            "--json",
            "--pages",
            "128",
            "--snapshot",
            "/nonexistent/parent/snap",
            "--snapshot-after-pages",
            "64",
        ],
        T,
    );
    assert_eq!(o.code, 1, "{}", o.stderr);
    let j = o.json();
    assert_eq!(j["status"], "snapshot_failed");
    assert_eq!(j["verify_mismatches"], 0);
    assert_eq!(j["pages_written"], 256);
    assert!(!Path::new("/nonexistent/parent/snap").exists());

    // A threshold the guest never reaches is an error, not a silent success.
    let o = vmm(
        &[
            "run",
            "--json",
            "--pages",
            "64",
            "--passes",
            "1",
            "--snapshot",
            "/tmp/never",
            "--snapshot-after-pages",
            "100000",
        ],
        T,
    );
    o.failure("no snapshot was taken");

    // An existing target is refused the same way (never overwritten).
    let dir = snap_dir("exists");
    std::fs::create_dir_all(&dir).expect("dir");
    let o = vmm(
        &[
            "run",
            "--json",
            "--pages",
            "128",
            "--snapshot",
            dir.to_str().expect("utf-8"),
            "--snapshot-after-pages",
            "64",
        ],
        T,
    );
    o.failure("exists already");

    // A full disk: a tiny tmpfs in a private mount namespace (needs root).
    if !can_unshare_mount() {
        eprintln!("disk-full case skipped: cannot create a mount namespace here");
        return;
    }
    let mnt = snap_dir("tiny");
    std::fs::create_dir_all(&mnt).expect("dir");
    let script = format!(
        "mount -t tmpfs -o size=64k none {m} && {bin} run --json --pages 512 --snapshot {m}/snap --snapshot-after-pages 300; \
         rc=$?; ls -a {m} >&2; exit $rc",
        m = mnt.display(),
        bin = vmm_bin()
    );
    let out = in_mount_namespace(&script);
    let j = json_failure(&out, "snapshot_failed");
    assert_eq!(j["verify_mismatches"], 0);
    let listing = String::from_utf8_lossy(&out.stderr);
    assert!(
        !listing.contains("snap"),
        "a snapshot directory was left behind: {listing}"
    );
}

#[test]
fn snapshot_and_restore_benches_run() {
    let o = vmm(
        &["bench", "snapshot", "--wp-sizes", "16M", "--mem", "64M"],
        T,
    );
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    assert!(
        o.stdout.contains("wp-unpopulated")
            && o.stdout.contains("live")
            && o.stdout.contains("paused")
    );
    let o = vmm(&["bench", "restore", "--sizes", "64M", "--runs", "1"], T);
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("eager") && o.stdout.contains("uffd"));
}

#[test]
fn diff_chains_of_three_restore_like_a_full_snapshot() {
    let (c0, c1, c2, full) = (
        snap_dir("c0"),
        snap_dir("c1"),
        snap_dir("c2"),
        snap_dir("full"),
    );
    let s = |p: &Path| p.to_str().expect("utf-8").to_string();
    take_snapshot(&c0, "300", &rand_write_args("6"));
    // A live diff of the restored VM, then a paused diff of the restored diff.
    run_ok(&[
        "restore",
        &s(&c0),
        "--json",
        "--snapshot",
        &s(&c1),
        "--snapshot-after-pages",
        "500",
        "--snapshot-parent",
        &s(&c0),
    ]);
    run_ok(&[
        "restore",
        &s(&c1),
        "--json",
        "--snapshot",
        &s(&c2),
        "--snapshot-after-pages",
        "500",
        "--snapshot-parent",
        &s(&c1),
        "--snapshot-mode",
        "paused",
    ]);
    // The same point, as a full snapshot.
    run_ok(&[
        "restore",
        &s(&c1),
        "--json",
        "--snapshot",
        &s(&full),
        "--snapshot-after-pages",
        "500",
        "--snapshot-mode",
        "paused",
    ]);
    let i = run_ok(&["inspect", &s(&c2), "--json"]);
    assert_eq!(i["chain_length"], 3);
    assert_eq!(i["verify_mismatches"], 0);
    let diff_pages = i["diff_pages"].as_u64().expect("diff pages");
    let f = run_ok(&["inspect", &s(&full), "--json"]);
    assert!(f["chain_length"] == 1 && f["verify_mismatches"] == 0);
    assert!(
        diff_pages < f["pages_stored"].as_u64().expect("pages"),
        "a diff stores less than a full snapshot"
    );
    let full_end = run_ok(&["restore", &s(&full), "--verify", "--json"]);
    for mode in ["eager", "uffd", "mmap"] {
        let r = restored(&c2, mode);
        assert_eq!(r["verify_mismatches"], 0, "{mode}: {r}");
        assert_eq!(r["host_verify_mismatches"], 0, "{mode}");
        assert_eq!(r["pages_written"], full_end["pages_written"], "{mode}");
        assert_eq!(r["pages_written"], 256 * 6 * 2);
        if mode == "mmap" {
            // One file to map: the chain is materialized into a memfd.
            let note = r["restore"]["memory"].as_str().unwrap_or("");
            assert!(
                note.contains("chain of 3 snapshots, materialized"),
                "{note}"
            );
        }
    }

    // A parent that is not the one the diff was taken from is refused...
    let moved = snap_dir("c1-moved");
    std::fs::rename(&c1, &moved).expect("move");
    std::fs::create_dir_all(&c1).expect("dir");
    for f in ["memory.bin", "state.bin"] {
        std::fs::copy(c0.join(f), c1.join(f)).expect("copy");
    }
    let o = vmm(&["restore", &s(&c2), "--json"], T);
    o.failure("is not the parent");
    // ... and so is a missing one.
    std::fs::remove_dir_all(&c1).expect("rm");
    let o = vmm(&["restore", &s(&c2), "--json"], T);
    o.failure("is missing");
    std::fs::rename(&moved, &c1).expect("move back");

    // --snapshot-parent only makes sense for a VM restored from it.
    assert_usage_error(
        &[
            "run",
            "--snapshot",
            "/tmp/x",
            "--snapshot-after-pages",
            "10",
            "--snapshot-parent",
            &s(&c0),
        ],
        "needs a VM restored from that snapshot",
    );
    assert_usage_error(
        &[
            "restore",
            &s(&c1),
            "--snapshot",
            "/tmp/x",
            "--snapshot-after-pages",
            "10",
            "--snapshot-parent",
            &s(&c0),
        ],
        "is not the snapshot this VM was restored from",
    );
    for d in [c0, c1, c2, full] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn poisoned_pages_survive_snapshot_and_restore() {
    use vmm::runner::{HookError, RunHooks, SerialSink, VmHandle};
    use vmm::snapshot::restore::{restore, RestoreMode, RestoreOptions};

    let dir = snap_dir("poisoned");
    let bad = UNUSED_PAGE;
    snapshot_with_a_poisoned_page(&dir);
    let i = run_ok(&["inspect", dir.to_str().expect("utf-8"), "--json"]);
    assert_eq!(i["poisoned_pages"][0], format!("{bad:#x}"));
    for mode in [RestoreMode::Eager, RestoreMode::Uffd] {
        let hooks = RunHooks::default().at_exit(Box::new(
            move |vm: &mut VmHandle| -> Result<(), HookError> {
                // Still poisoned: refused, never zeros.
                match vm.ram().load_u64(bad) {
                    Err(guest_mem::RamError::Poisoned(p)) if p == bad => Ok(()),
                    other => Err(HookError(format!("page {bad:#x} after restore: {other:?}"))),
                }
            },
        ));
        let opts = RestoreOptions {
            mode,
            verify: true,
            shared_mem: None,
        };
        let (r, _) = restore(&dir, &opts, hooks, SerialSink::Capture).expect("restore");
        assert_eq!(
            r.status,
            vmm::report::RunStatus::Ok,
            "{mode:?}: {:?}",
            r.error
        );
        assert_eq!(r.verify_mismatches, Some(0));
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_working_set_follows_the_guests_first_touch_order_and_a_uffd_restore_prefetches_it() {
    let dir = snap_dir("order");
    // rand-write touches its pages in a seeded random order; fault-around 1
    // makes each first touch its own fault, so the trace is exact.
    take_snapshot(
        &dir,
        "200",
        &[
            "--workload",
            "rand-write",
            "--pages",
            "128",
            "--passes",
            "3",
            "--fault-around",
            "1",
            "--snapshot-mode",
            "paused",
        ],
    );
    let chain = vmm::snapshot::chain::Chain::open(&dir).expect("open");
    let work = vmm::oracle::work_area_pages(&chain).expect("work area");
    let expected = vmm::oracle::first_touch_order(&chain, 0).expect("replay");
    let ws = &chain.head().state.working_set;
    let touched: Vec<u64> = ws.iter().copied().filter(|p| work.contains(p)).collect();
    assert!(
        touched.len() >= 64,
        "{} work-area pages recorded",
        touched.len()
    );
    assert_eq!(
        touched,
        expected[..touched.len()],
        "the recorded order is the schedule's first-touch order"
    );
    let mut sorted = touched.clone();
    sorted.sort_unstable();
    assert_ne!(sorted, touched, "a random order, not the address order");

    // The restore copies the execution chunks first and the rest of the
    // working set in the background: the guest demand-faults little.
    let j = restored(&dir, "uffd");
    assert_eq!(j["verify_mismatches"], 0);
    let background = j["restore"]["pages_prefetched_background"]
        .as_u64()
        .expect("count");
    assert!(background > 0, "{j}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_guest_waiting_for_requests_is_snapshotted_once_it_waits_and_answers_after_a_restore() {
    let dir = snap_dir("waiting");
    // 0 page stores: for the idle workload the threshold is reached once
    // every vCPU waits for commands (not at boot, while it still starts).
    let j = take_snapshot(&dir, "0", &["--workload", "idle", "--vcpus", "2"]);
    assert_eq!(j["status"], "ok", "{j}");
    for mode in ["uffd", "mmap"] {
        let o = restore_in(&dir, mode);
        assert_eq!(o.code, 0, "{mode}: {}\n{}", o.stdout, o.stderr);
        // Both vCPUs had printed their start before the snapshot: the
        // restored guest goes on from its wait, and all it prints is its
        // answer to the verify request and its end.
        for line in o.stderr.lines().filter(|l| l.starts_with("vcpu ")) {
            assert!(
                line.contains(": verify: ") || line.contains(": done, "),
                "{mode}: {}",
                o.stderr
            );
        }
        let r = o.json()["restore"].clone();
        // The verify command is its request; the answer is an I/O exit.
        let (run, io) = (&r["first_run_at_ns"], &r["first_io_at_ns"]);
        assert!(
            run.as_u64().is_some() && io.as_u64() >= run.as_u64(),
            "{mode}: {r}"
        );
        assert!(r["started_at_ns"].as_u64() <= run.as_u64(), "{mode}: {r}");
    }
    // Restored, it has started long ago: 0 page stores are reached at once
    // (a waiting guest sends no event until its next command), so a
    // snapshot or a fork at 0 happens while it waits, not at its end.
    let again = snap_dir("waiting-again");
    let o = vmm(
        &[
            "restore",
            dir.to_str().expect("utf-8"),
            "--snapshot",
            again.to_str().expect("utf-8"),
            "--snapshot-after-pages",
            "0",
            "--json",
        ],
        T,
    );
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    assert_eq!(o.json()["snapshots"].as_array().map(Vec::len), Some(1));
    assert_eq!(restored(&again, "mmap")["verify_mismatches"], 0);
    let j = run_ok(&[
        "restore",
        dir.to_str().expect("utf-8"),
        "--fork-after-pages",
        "0",
        "--forks",
        "2",
        "--json",
    ]);
    let children = j["forks"][0]["children"].as_array().expect("children");
    assert_eq!(children.len(), 2, "{j}");
    for c in children {
        assert_eq!(c["status"], "ok", "{c}");
        assert_eq!(c["host_verify_mismatches"], 0, "{c}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&again);
}

#[test]
fn a_live_snapshot_copies_in_the_background_and_refuses_a_second_one_meanwhile() {
    use guest_protocol::Workload;
    use vmm::config::VmConfig;
    use vmm::runner::{run, HookError, RunHooks, SerialSink, VmHandle};
    use vmm::snapshot::writer::{start_snapshot, SnapshotMode, SnapshotStarted};

    let (dir, second) = (snap_dir("background"), snap_dir("background-2"));
    let cfg = VmConfig {
        mem_bytes: 128 << 20,
        workload: Workload::SeqWrite,
        pages: 256,
        passes: 3,
        ..VmConfig::default()
    };
    let (d, d2) = (dir.clone(), second.clone());
    let hooks = RunHooks::default().after_pages(
        300,
        Box::new(move |vm: &mut VmHandle| -> Result<(), HookError> {
            // 96 MiB of host-written pages: a copy of tens of milliseconds.
            vm.pause()?;
            let page = [0x5au8; 4096];
            let mut gpa = 32u64 << 20;
            while gpa < vm.ram().size() {
                vm.ram().write(gpa, &page)?;
                gpa += 4096;
            }
            vm.resume();
            let desc = vm.machine().clone();
            let started = start_snapshot(vm, &d, SnapshotMode::Live, desc.clone(), None)
                .map_err(|e| HookError(e.to_string()))?;
            let SnapshotStarted::Writing(pending) = started else {
                return Err(HookError("a live snapshot returned complete".into()));
            };
            // While the first copy runs, a second live snapshot is refused
            // and leaves nothing behind.
            if !pending.is_finished() {
                match start_snapshot(vm, &d2, SnapshotMode::Live, desc, None) {
                    Err(e) if e.to_string().contains("still being written") => {}
                    Err(e) => return Err(HookError(format!("wrong refusal: {e}"))),
                    Ok(_) => return Err(HookError("a second live snapshot started".into())),
                }
            }
            vm.pending_snapshots.push(pending);
            Ok(())
        }),
    );
    let report = run(&cfg, hooks, SerialSink::Capture).expect("run");
    assert_eq!(
        report.status,
        vmm::report::RunStatus::Ok,
        "{:?}",
        report.error
    );
    assert_eq!(report.snapshots.len(), 1, "collected by the supervisor");
    assert!(!second.exists());
    assert_eq!(restored(&dir, "uffd")["verify_mismatches"], 0);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_restore_gives_guest_ram_beyond_its_first_slot_a_slot_when_the_guest_gets_there() {
    // vCPU 1's pages run from 35 MiB past the first slot's 64 MiB: the
    // restored guest's first store there adds the rest of guest RAM.
    let dir = snap_dir("lazy-slot");
    take_snapshot(
        &dir,
        "200",
        &["--vcpus", "2", "--pages", "8000", "--passes", "1"],
    );
    for mode in ["mmap", "uffd"] {
        let j = restored(&dir, mode);
        assert_eq!(j["verify_mismatches"], 0, "{mode}");
        assert_eq!(j["host_verify_mismatches"], 0, "{mode}");
        assert_eq!(j["pages_written"], 2 * 8000, "{mode}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_guest_given_cpu_features_this_host_lacks_is_refused_before_it_runs() {
    // A reserved XCR0 bit (63) in the XSAVE components the guest was
    // offered, and a reserved leaf-7 bit: no KVM offers either.
    for (leaf, set) in [(0xd_u32, 1u32 << 31), (7, 1 << 31)] {
        let dir = snap_dir("cpuid");
        take_snapshot(&dir, "100", &["--pages", "128", "--passes", "1"]);
        let (mut state, _) =
            decode(&std::fs::read(dir.join("state.bin")).expect("state")).expect("decode");
        for v in &mut state.vcpus {
            let e = v
                .cpuid
                .iter_mut()
                .find(|e| e.function == leaf && e.index == 0)
                .expect("leaf");
            e.edx |= set;
        }
        let (bytes, _) = encode(&state).expect("encode");
        std::fs::write(dir.join("state.bin"), bytes).expect("state");
        // Restore refuses before the guest runs, naming the register.
        let o = restore(&dir);
        o.failure("CPU features are not available");
        o.failure(&format!("CPUID.{leaf:#x}.edx"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
