//! Rule 7 for forks: a fork that fails half way, its children built on
//! several threads and some already started (held at the start gate),
//! unwinds completely. Alone in its test binary: it counts the process's
//! file descriptors and mappings, which other tests running beside it
//! would disturb.

mod common;
use common::*;
use std::sync::{Arc, Mutex};
use vmm::fork::{fork_vm, ForkOptions};

/// File descriptors and mappings.
type Counts = (usize, usize);

#[test]
fn a_fork_that_fails_half_way_leaks_nothing_and_the_parent_runs_on() {
    // Child 3 of 4 fails: children 0-2 were built (on other threads too)
    // and started, their vCPUs waiting at the gate.
    let failing = ForkOptions {
        count: 4,
        seed_base: 7,
        fail_setup_at: Some(3),
    };
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let counts: Arc<Mutex<Option<[Counts; 2]>>> = Arc::default();
    let (s, c) = (seen.clone(), counts.clone());
    let report = run_with_hook(16, 150, move |vm| {
        let fail = |vm: &mut vmm::runner::VmHandle| match fork_vm(vm, failing) {
            Ok(_) => s.lock().expect("lock").push("the fork succeeded".into()),
            Err(e) => s.lock().expect("lock").push(e.to_string()),
        };
        // Once to warm up what the process keeps once it has it (thread
        // stack caches, KVM's module state), then counted.
        fail(vm);
        let before = (open_fds(), object_mappings());
        for _ in 0..3 {
            fail(vm);
        }
        *c.lock().expect("lock") = Some([before, (open_fds(), object_mappings())]);
        Ok(())
    });
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 4);
    for e in &seen {
        assert!(e.contains("child 3: injected"), "{e}");
    }
    let [before, after] = counts.lock().expect("lock").expect("counted");
    assert_eq!(after.0, before.0, "file descriptors leaked");
    assert_eq!(after.1, before.1, "mappings leaked");
    // The parent ran on to the end with its own content (rule 7).
    assert_eq!(
        report.status,
        vmm::report::RunStatus::Ok,
        "{:?}",
        report.error
    );
    assert!(report.forks.is_empty());
    assert_eq!(report.verify_mismatches, Some(0));
    assert_eq!(report.host_verify_mismatches, Some(0));
}
