//! Forking a running VM: parent and children share memory copy-on-write,
//! each side's later writes stay invisible to the others (the consistency
//! oracle of every VM replays only its own seeds), poisoned pages survive
//! the fork, and bad requests are refused.

mod common;
use common::*;

#[test]
fn a_forked_vm_and_its_children_run_on_isolated_and_verify() {
    let j = run_ok(&[
        "run",
        "--json",
        "--vcpus",
        "2",
        "--workload",
        "rand-write",
        "--pages",
        "256",
        "--passes",
        "4",
        "--fork-after-pages",
        "300",
        "--forks",
        "3",
        "--fork-seed-base",
        "50",
    ]);
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

#[test]
fn poisoned_pages_survive_a_fork() {
    use guest_protocol::Workload;
    use vmm::config::VmConfig;
    use vmm::fork::{fork_vm, ForkOptions};
    use vmm::runner::{run, HookError, RunHooks, SerialSink, VmHandle};

    let bad = 48u64 << 20; // unused by the workload
    let cfg = VmConfig {
        mem_bytes: 64 << 20,
        workload: Workload::SeqWrite,
        pages: 128,
        passes: 3,
        ..VmConfig::default()
    };
    let hooks = RunHooks::default().after_pages(
        150,
        Box::new(move |vm: &mut VmHandle| -> Result<(), HookError> {
            vm.ram().poison_page(bad, "test memory error")?;
            let opts = ForkOptions {
                count: 2,
                seed_base: 7,
                fail_setup_at: None,
            };
            let p = fork_vm(vm, opts).map_err(|e| HookError(e.to_string()))?;
            vm.pending_forks.push(p);
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
    let children = &report.forks[0].children;
    assert_eq!(children.len(), 2);
    for c in children {
        assert_eq!(c.status, "ok", "{:?}", c.error);
        assert_eq!(c.poisoned_pages, vec![bad], "child {}", c.index);
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
    assert_eq!(o.code, 1, "{}", o.stdout);
    assert!(
        o.json()["error"].as_str().unwrap_or("").contains("no fork"),
        "{}",
        o.stdout
    );
}

#[test]
fn a_fork_that_fails_half_way_leaves_the_parent_as_it_was() {
    use guest_protocol::Workload;
    use vmm::config::VmConfig;
    use vmm::fork::{fork_vm, ForkOptions};
    use vmm::runner::{run, HookError, RunHooks, SerialSink, VmHandle};

    let cfg = VmConfig {
        mem_bytes: 64 << 20,
        workload: Workload::SeqWrite,
        pages: 128,
        passes: 3,
        ..VmConfig::default()
    };
    let hooks = RunHooks::default().after_pages(
        150,
        Box::new(move |vm: &mut VmHandle| -> Result<(), HookError> {
            let opts = ForkOptions {
                count: 3,
                seed_base: 7,
                fail_setup_at: Some(1),
            };
            let p = fork_vm(vm, opts).map_err(|e| HookError(e.to_string()))?;
            vm.pending_forks.push(p);
            Ok(())
        }),
    );
    let report = run(&cfg, hooks, SerialSink::Capture).expect("run");
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
