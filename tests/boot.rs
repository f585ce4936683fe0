//! `vmm run` on defaults, its output contract, and Ctrl-C.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn run_on_defaults_boots_and_verifies() {
    let o = vmm(&["run"], T);
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    assert!(o
        .stdout
        .contains("vcpu 0: booted, workload seq-write, 1024 pages x 2 passes"));
    assert!(o.stdout.contains("vcpu 0: verify: 0 mismatches"));
    assert!(o.stdout.contains("vmm: ok — 1 vCPU(s), 256 MiB"));
    assert!(o
        .stdout
        .contains("page stores 2048, verify mismatches 0 (guest) / 0 (host)"));
}

#[test]
fn json_mode_prints_one_object_and_serial_on_stderr() {
    let o = vmm(&["run", "--json", "--pages", "64", "--passes", "1"], T);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let j = o.json();
    for key in [
        "status",
        "vcpus",
        "mem_bytes",
        "pages_written",
        "verify_mismatches",
        "boot_us",
        "workload_us",
    ] {
        assert!(j.get(key).is_some(), "missing {key}: {j}");
    }
    assert_eq!(j["status"], "ok");
    assert_eq!(j["mem_bytes"], 256u64 << 20);
    assert_eq!(j["pages_written"], 64);
    assert!(j["boot_us"]
        .as_u64()
        .is_some_and(|b| b > 0 && b < 10_000_000));
    assert!(j["workload_us"].as_u64().is_some());
    assert!(o.stderr.contains("vcpu 0: booted"));
    assert!(!o.stdout.contains("vcpu 0:"));
}

#[test]
fn ctrl_c_stops_the_guest_cleanly() {
    // An idle guest told to run for a minute: SIGINT after its first serial
    // line must stop it through the command word, verified, exit 0.
    let mut child = Command::new(vmm_bin())
        .args([
            "run",
            "--json",
            "--workload",
            "idle",
            "--vcpus",
            "2",
            "--stop-after-ms",
            "60000",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let first = lines.next().expect("a serial line").expect("utf-8");
    assert!(first.contains("booted"), "{first}");
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let start = std::time::Instant::now();
    let out = child.wait_with_output().expect("wait");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "stop took {:?}",
        start.elapsed()
    );
    assert_eq!(out.status.code(), Some(0));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(j["interrupted"], true);
    assert_eq!(j["vcpu_reports"][0]["outcome"], "done");
    assert_eq!(j["vcpu_reports"][1]["outcome"], "done");
    assert_eq!(j["verify_mismatches"], 0);
}

#[test]
fn bench_boot_runs_and_writes_json() {
    let path = std::env::temp_dir().join(format!("vmm-bench-boot-{}.json", std::process::id()));
    let p = path.to_str().expect("utf-8 path");
    let o = vmm(&["bench", "boot", "--runs", "3", "--json", p], T);
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("spawn -> first serial byte"));
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("json file")).expect("json");
    assert_eq!(j["samples"].as_array().map(Vec::len), Some(3));
    assert!(j["spawn_to_serial_median_us"]
        .as_f64()
        .is_some_and(|v| v > 0.0));
    let _ = std::fs::remove_file(path);
}
