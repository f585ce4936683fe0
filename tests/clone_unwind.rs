//! Rule 7: a clone that fails half way unwinds completely. Alone in its
//! test binary: it counts the process's file descriptors and mappings,
//! which other tests running beside it would disturb.

mod common;
use common::*;
use vmm::snapshot::clone::{clone_vms, CloneOptions};

#[test]
fn a_clone_that_fails_half_way_leaks_nothing_and_leaves_the_snapshot_as_it_was() {
    let dir = std::env::temp_dir().join(format!("vmm-clone-unwind-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    take_snapshot(&dir, "150", &["--mem", "64M", "--pages", "128"]);
    let files = |dir: &std::path::Path| -> Vec<Vec<u8>> {
        ["state.bin", "memory.bin"]
            .iter()
            .map(|f| std::fs::read(dir.join(f)).expect("read"))
            .collect()
    };
    let before_files = files(&dir);
    let failing = CloneOptions {
        count: 3,
        fail_setup_at: Some(2),
        ..CloneOptions::default()
    };
    // Once to warm up what the process keeps once it has it (thread-stack
    // caches, KVM's module state), then counted.
    let e = clone_vms(&dir, &failing).expect_err("injected failure");
    assert!(e.to_string().contains("clone 2: injected"), "{e}");
    let (f0, m0) = (open_fds(), object_mappings());
    for _ in 0..3 {
        assert!(clone_vms(&dir, &failing).is_err());
    }
    assert_eq!(open_fds(), f0, "file descriptors leaked");
    assert_eq!(object_mappings(), m0, "mappings leaked");
    assert!(before_files == files(&dir), "the snapshot changed");
    // The same snapshot still clones.
    let ok = CloneOptions {
        count: 2,
        ..CloneOptions::default()
    };
    let r = clone_vms(&dir, &ok).expect("clone");
    assert_eq!(r.exit_code(), 0, "{}", r.human_summary());
    let _ = std::fs::remove_dir_all(&dir);
}
