//! `vmm clone`: VMs started from one snapshot share its memory
//! copy-on-write, run on with their own seeds and verify; poisoned pages
//! stay poisoned in every clone; bad input is refused.

mod common;
use common::*;
use std::path::PathBuf;

/// A snapshot directory on tmpfs when there is one (the fault engine then
/// serves the clones' holes), else in the temporary directory.
fn snap_dir(name: &str) -> PathBuf {
    tmpfs_dir("clone", name)
}

#[test]
fn clones_share_the_snapshot_and_each_verifies_with_its_own_seed() {
    let dir = snap_dir("share");
    let d = dir.to_str().expect("utf-8");
    take_snapshot(&dir, "300", &rand_write_args("3"));
    for mode in ["mmap", "uffd"] {
        check_clones(d, mode);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn check_clones(d: &str, mode: &str) {
    let j = run_ok(&[
        "clone",
        d,
        "--count",
        "3",
        "--seed-base",
        "100",
        "--mode",
        mode,
        "--json",
    ]);
    assert_eq!(j["status"], "ok", "{mode}: {j}");
    let clones = j["clones"].as_array().expect("clones");
    assert_eq!(clones.len(), 3);
    let mut exclusive = 0;
    for (i, c) in clones.iter().enumerate() {
        assert_eq!(c["status"], "ok", "{c}");
        assert_eq!(c["verify_mismatches"], 0, "{c}");
        assert_eq!(c["host_verify_mismatches"], 0, "{c}");
        // Its own seed took effect from a pass after the snapshot.
        let seeds = c["seed_history"].as_array().expect("seeds");
        assert!(
            seeds.iter().any(|s| s[1] == 100 + i as u64),
            "clone {i}: {seeds:?}"
        );
        // Code and untouched data stay shared; what it wrote is its own.
        assert!(c["shared_pages"].as_u64() > Some(0), "{c}");
        assert!(c["exclusive_pages"].as_u64() > Some(0), "{c}");
        exclusive += c["exclusive_pages"].as_u64().unwrap_or(0) * 4096;
    }
    let a = &j["accounting"];
    assert_eq!(a["exclusive_bytes"], exclusive);
    // The process grew by what the clones wrote, plus at most 1 MiB per
    // clone of fixed cost (thread stacks, tables, buffers).
    let growth = a["growth_bytes"].as_u64().expect("growth");
    assert!(
        growth <= exclusive + 3 * (2 << 20),
        "{mode}: grew {growth} bytes for {exclusive} exclusive"
    );
}

#[test]
fn poisoned_pages_stay_poisoned_in_every_clone() {
    use vmm::snapshot::clone::{clone_vms, CloneOptions};

    let dir = snap_dir("poisoned");
    snapshot_with_a_poisoned_page(&dir);
    let opts = CloneOptions {
        count: 2,
        ..CloneOptions::default()
    };
    let r = clone_vms(&dir, &opts).expect("clone");
    assert_eq!(r.exit_code(), 0, "{}", r.human_summary());
    for c in &r.clones {
        assert_eq!(
            c.outcome.poisoned_pages,
            vec![UNUSED_PAGE],
            "clone {}",
            c.index
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_clone_requests_are_refused_clearly() {
    assert_usage_error(&["clone", "/tmp", "--count", "0"], "--count");
    assert_usage_error(&["clone", "/tmp", "--count", "257"], "--count");
    assert_usage_error(
        &["clone", "/tmp", "--count", "2", "--mode", "eager"],
        "mode",
    );
    let o = vmm(
        &["clone", "/nonexistent-snapshot", "--count", "2", "--json"],
        T,
    );
    o.failure("nonexistent-snapshot");
}
