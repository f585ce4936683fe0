//! Forking a running VM: parent and children share memory copy-on-write,
//! each side's later writes stay invisible to the others (the consistency
//! oracle of every VM replays only its own seeds), poisoned pages survive
//! the fork, and bad requests are refused.

mod common;
use common::*;

#[test]
fn a_forked_vm_and_its_children_run_on_isolated_and_verify() {
    let mut args = vec!["run", "--json"];
    args.extend(rand_write_args("4"));
    args.extend([
        "--fork-after-pages",
        "300",
        "--forks",
        "3",
        "--fork-seed-base",
        "50",
    ]);
    let j = run_ok(&args);
    assert_eq!(j["status"], "ok", "{j}");
    assert_eq!(j["verify_mismatches"], 0);
    assert_eq!(j["host_verify_mismatches"], 0);
    let forks = j["forks"].as_array().expect("forks");
    assert_eq!(forks.len(), 1);
    assert!(forks[0]["pause_us"].as_u64().is_some());
    let children = forks[0]["children"].as_array().expect("children");
    assert_eq!(children.len(), 3);
    for (i, c) in children.iter().enumerate() {
        assert_eq!(c["status"], "ok", "{c}");
        assert_eq!(c["seed"], 50 + i as u64);
        assert_eq!(c["verify_mismatches"], 0, "{c}");
        assert_eq!(c["host_verify_mismatches"], 0, "{c}");
        // Every child ran the whole workload (counted from the parent's
        // boot), sharing what it did not write.
        assert_eq!(c["pages_written"], 2 * 256 * 4, "{c}");
        assert!(c["shared_pages"].as_u64() > Some(0), "{c}");
        assert!(c["exclusive_pages"].as_u64() > Some(0), "{c}");
    }
}

/// Forks a 64 MiB VM into `count` children at 150 page stores, after
/// `before` ran on it.
fn fork_at_150(
    count: u32,
    fail_setup_at: Option<u32>,
    mut before: impl FnMut(&mut vmm::runner::VmHandle) + Send + 'static,
) -> vmm::report::RunReport {
    use vmm::fork::{fork_vm, ForkOptions};
    run_with_hook(3, 150, move |vm| {
        before(vm);
        let opts = ForkOptions {
            count,
            seed_base: 7,
            fail_setup_at,
        };
        let p = fork_vm(vm, opts).map_err(|e| vmm::runner::HookError(e.to_string()))?;
        vm.pending_forks.push(p);
        Ok(())
    })
}

#[test]
fn poisoned_pages_survive_a_fork() {
    let report = fork_at_150(2, None, |vm| {
        vm.ram()
            .poison_page(UNUSED_PAGE, "test memory error")
            .expect("poison");
    });
    assert_eq!(
        report.status,
        vmm::report::RunStatus::Ok,
        "{:?}",
        report.error
    );
    let children = &report.forks[0].children;
    assert_eq!(children.len(), 2);
    for c in children {
        assert_eq!(c.outcome.status, "ok", "{:?}", c.outcome.error);
        assert_eq!(
            c.outcome.poisoned_pages,
            vec![UNUSED_PAGE],
            "child {}",
            c.index
        );
    }
}

#[test]
fn bad_fork_requests_are_refused_clearly() {
    assert_usage_error(&["run", "--forks", "2"], "--fork-after-pages");
    assert_usage_error(
        &["run", "--fork-after-pages", "10", "--forks", "0"],
        "--forks",
    );
    assert_usage_error(
        &["run", "--fork-after-pages", "10", "--forks", "65"],
        "--forks",
    );
    assert_usage_error(
        &[
            "run",
            "--fork-after-pages",
            "10",
            "--forks",
            "2",
            "--backing",
            "anon",
        ],
        "--backing memfd",
    );
    // A threshold the guest never reaches is an error, not a silent success.
    let o = vmm(
        &[
            "run",
            "--json",
            "--pages",
            "64",
            "--passes",
            "1",
            "--fork-after-pages",
            "100000",
            "--forks",
            "1",
        ],
        T,
    );
    o.failure("no fork");
    // 0 page stores waits for the guest's start: a kernel that never
    // reports one (this one only halts) is told so.
    let halt = temp_file("fork-halt.elf", &tiny_elf(&[0xf4]));
    let o = vmm(
        &[
            "run",
            "--json",
            "--kernel",
            halt.to_str().expect("utf-8"),
            "--stop-after-ms",
            "100",
            "--fork-after-pages",
            "0",
            "--forks",
            "1",
        ],
        T,
    );
    o.failure("never reported that every vCPU started");
}

#[test]
fn a_fork_that_fails_half_way_leaves_the_parent_as_it_was() {
    let report = fork_at_150(3, Some(1), |_| {});
    // The fork is reported as failed; no child ran; the parent's memory
    // holds exactly what its own schedule wrote (rule 7).
    assert_eq!(report.status, vmm::report::RunStatus::HookFailed);
    assert!(
        report
            .error
            .as_deref()
            .unwrap_or("")
            .contains("child 1: injected"),
        "{:?}",
        report.error
    );
    assert!(report.forks.is_empty());
    assert_eq!(report.verify_mismatches, Some(0));
    assert_eq!(report.host_verify_mismatches, Some(0));
}

#[test]
fn a_vm_restored_copy_on_write_forks_too() {
    // Restored by mmap, the parent's RAM already is a private mapping of
    // the snapshot: its children map the snapshot too and get copies of
    // the pages the parent made its own.
    let dir = tmpfs_dir("fork", "restored");
    let d = dir.to_str().expect("utf-8");
    take_snapshot(&dir, "300", &rand_write_args("4"));
    for mode in ["mmap", "uffd"] {
        let j = run_ok(&[
            "restore",
            d,
            "--mode",
            mode,
            "--fork-after-pages",
            "1200",
            "--forks",
            "2",
            "--fork-seed-base",
            "77",
            "--json",
        ]);
        assert_eq!(j["verify_mismatches"], 0, "{mode}: {j}");
        let children = j["forks"][0]["children"].as_array().expect("children");
        assert_eq!(children.len(), 2, "{mode}");
        for c in children {
            assert_eq!(c["status"], "ok", "{mode}: {c}");
            assert_eq!(c["verify_mismatches"], 0, "{mode}: {c}");
            assert_eq!(c["host_verify_mismatches"], 0, "{mode}: {c}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// KVM completes a vCPU's port I/O only on its next `KVM_RUN`: a fork
/// must not capture the vCPU in between, or each child would run that I/O
/// again. The io workload reads the block device's status after every
/// command, and a child's new device answers "no command yet": a child
/// that ran its parent's last status read again counts a mismatch.
#[test]
fn fork_children_never_rerun_the_parents_last_io() {
    for after in ["40", "100", "170"] {
        let o = run_with_fork(
            after,
            "8",
            &["--mem", "64M", "--pages", "128", "--workload", "io"],
        );
        assert_eq!(o.code, 0, "{}", o.stdout);
        let j = o.json();
        for c in j["forks"][0]["children"].as_array().expect("children") {
            assert_eq!(c["verify_mismatches"], 0, "fork at {after}: {c}");
        }
    }
}
