//! Every workload with 1 and 2 vCPUs boots, runs and verifies with 0
//! mismatches, on the guest's oracle and on the host's.

mod common;
use common::*;

fn run_workload(workload: &str, vcpus: u32) -> serde_json::Value {
    let vcpus_s = vcpus.to_string();
    let o = vmm(
        &[
            "run",
            "--json",
            "--mem",
            "64M",
            "--workload",
            workload,
            "--vcpus",
            &vcpus_s,
            "--pages",
            "96",
            "--passes",
            "3",
            "--seed",
            "7",
            "--write-ratio",
            "60",
        ],
        T,
    );
    assert_eq!(o.code, 0, "{workload} x{vcpus}: {}\n{}", o.stdout, o.stderr);
    let j = o.json();
    assert_eq!(j["status"], "ok");
    assert_eq!(j["vcpus"], vcpus);
    assert_eq!(j["verify_mismatches"], 0, "{j}");
    assert_eq!(j["host_verify_mismatches"], 0, "{j}");
    for v in 0..vcpus {
        assert!(
            o.stderr
                .contains(&format!("vcpu {v}: booted, workload {workload}")),
            "serial output missing for vCPU {v}:\n{}",
            o.stderr
        );
        assert_eq!(j["vcpu_reports"][v as usize]["outcome"], "done");
    }
    j
}

#[test]
fn seq_write() {
    for v in [1, 2] {
        let j = run_workload("seq-write", v);
        assert_eq!(j["pages_written"], 96 * 3 * v as u64);
    }
}

#[test]
fn rand_write() {
    for v in [1, 2] {
        let j = run_workload("rand-write", v);
        assert_eq!(j["pages_written"], 96 * 3 * v as u64);
    }
}

#[test]
fn read() {
    for v in [1, 2] {
        // Only the first pass writes; the later ones read and check.
        let j = run_workload("read", v);
        assert_eq!(j["pages_written"], 96 * v as u64);
    }
}

#[test]
fn mixed() {
    for v in [1, 2] {
        let j = run_workload("mixed", v);
        let written = j["pages_written"].as_u64().expect("count");
        // 60% of 288 steps per vCPU write, give or take the random draw.
        assert!(
            written > 100 * v as u64 && written < 250 * v as u64,
            "{written}"
        );
    }
}

#[test]
fn idle() {
    for v in [1, 2] {
        let j = run_workload("idle", v);
        assert_eq!(j["pages_written"], 0);
    }
}
