//! Dirty-page tracking with real KVM guests: every backend this kernel
//! supports harvests every page the guest wrote in each round (the schedule
//! is known to the host), plus every page the VMM wrote; false positives are
//! counted; impossible or unavailable backends are refused clearly.

mod common;
use common::*;
use guest_protocol::Workload;
use std::sync::{Arc, Mutex};
use vmm::config::VmConfig;
use vmm::dirty::TrackerKind;
use vmm::report::RunStatus;
use vmm::runner::{run, HookError, RoundInfo, RunHooks, SerialSink, VmHandle};

const SUPPORTED: [TrackerKind; 4] = [
    TrackerKind::KvmBitmap,
    TrackerKind::KvmRing,
    TrackerKind::UffdWp,
    TrackerKind::UffdAsync,
];

fn config(kind: TrackerKind, workload: Workload, vcpus: u32) -> VmConfig {
    let mut c = VmConfig {
        mem_bytes: 64 << 20,
        vcpus,
        workload,
        pages: 192,
        passes: 3,
        seed: 5,
        write_ratio: 70,
        round_per_pass: true,
        track: Some(kind),
        ..VmConfig::default()
    };
    c.ram.wp_async = kind.needs_wp_async();
    c
}

/// A free page above the work area and scratch, for VMM writes.
const VMM_PAGE_BASE: u64 = 48 << 20;

#[test]
fn every_backend_sees_every_guest_and_vmm_write() {
    for kind in SUPPORTED {
        for (workload, vcpus) in [
            (Workload::SeqWrite, 1),
            (Workload::RandWrite, 2),
            (Workload::Mixed, 2),
        ] {
            let cfg = config(kind, workload, vcpus);
            let seen: Arc<Mutex<Vec<RoundInfo>>> = Arc::default();
            let seen2 = seen.clone();
            let hooks = RunHooks::default().on_round(Box::new(
                move |vm: &mut VmHandle, info: &RoundInfo| {
                    // The VMM writes two pages between rounds: they must be in
                    // the next round whatever the backend sees by itself.
                    let gpa = VMM_PAGE_BASE + info.index * 2 * 4096;
                    vm.ram().store_u64(gpa, 0xfeed)?;
                    vm.ram().write(gpa + 4096, b"device")?;
                    seen2
                        .lock()
                        .map_err(|_| HookError("poisoned".into()))?
                        .push(info.clone());
                    Ok(())
                },
            ));
            let report = run(&cfg, hooks, SerialSink::Capture).expect("run");
            let what = format!("{} {workload:?} x{vcpus}", kind.name());
            assert_eq!(report.status, RunStatus::Ok, "{what}: {:?}", report.error);
            assert_eq!(report.host_verify_mismatches, Some(0), "{what}");
            let rounds = seen.lock().expect("rounds");
            assert_eq!(rounds.len(), 3, "{what}: one round per pass");
            for (i, r) in rounds.iter().enumerate() {
                assert_eq!(r.pass, i as u64, "{what}");
                assert!(
                    r.missed.is_empty(),
                    "{what} round {i}: missed {:?}",
                    r.missed
                );
                assert!(!r.expected.is_empty() || workload == Workload::Mixed);
                if i > 0 {
                    let vmm_page = (VMM_PAGE_BASE >> 12) + (i as u64 - 1) * 2;
                    assert!(
                        r.pages.contains(&vmm_page) && r.pages.contains(&(vmm_page + 1)),
                        "{what} round {i}: VMM writes to pages {vmm_page}.. missing"
                    );
                }
                if kind == TrackerKind::KvmRing {
                    // The rings attribute each page to the vCPU that wrote it.
                    let by = r.by_vcpu.as_ref().expect("ring attribution");
                    assert_eq!(by.len(), vcpus as usize);
                    let pages_per_vcpu = cfg.pages;
                    let work0 = 0x40_0000 >> 12;
                    for p in &r.expected {
                        let v = ((p - work0) / pages_per_vcpu) as usize;
                        assert!(
                            by[v].binary_search(p).is_ok(),
                            "{what}: page {p} not attributed to vCPU {v}"
                        );
                    }
                }
            }
            let t = report.tracking.expect("tracking report");
            assert_eq!(t.rounds, 3);
            assert_eq!(t.missed_pages, 0);
            assert_eq!(t.backend, kind.name());
            assert!(t.false_positives.iter().all(Option::is_some));
        }
    }
}

#[test]
fn track_flag_reports_rounds_in_json() {
    let j = run_ok(&[
        "run",
        "--json",
        "--track",
        "uffd-async",
        "--pages",
        "128",
        "--passes",
        "2",
        "--vcpus",
        "2",
    ]);
    let t = &j["tracking"];
    assert_eq!(t["backend"], "uffd-async");
    assert_eq!(t["rounds"], 2);
    assert_eq!(t["missed_pages"], 0);
    for key in [
        "pages_per_round",
        "harvest_us",
        "false_positives",
        "memory_bytes",
    ] {
        assert!(t.get(key).is_some(), "missing {key}: {t}");
    }
}

#[test]
fn unknown_backend_is_a_usage_error() {
    assert_usage_error(&["run", "--track", "magic"], "unknown tracking backend");
}

#[test]
fn impossible_combinations_are_refused() {
    let o = vmm(
        &["run", "--json", "--track", "uffd-wp", "--backing", "plain"],
        T,
    );
    let j = o.failure("use --backing memfd or anon");
    assert_eq!(j["status"], "unsupported_combination");
}

#[test]
fn soft_dirty_is_refused_where_the_kernel_lacks_it() {
    if guest_mem::tracking::soft_dirty::supported() {
        // Where the kernel has soft-dirty, the backend must be as exact as the others.
        let o = vmm(
            &["run", "--json", "--track", "soft-dirty", "--pages", "128"],
            T,
        );
        assert_eq!(o.code, 0, "{}", o.stderr);
        assert_eq!(o.json()["tracking"]["missed_pages"], 0);
        return;
    }
    eprintln!("soft-dirty correctness skipped: this kernel has no CONFIG_MEM_SOFT_DIRTY");
    let o = vmm(&["run", "--json", "--track", "soft-dirty"], T);
    let j = o.failure("soft-dirty");
    assert_eq!(j["status"], "tracking_unavailable");
}

#[test]
fn bench_dirty_compares_backends_and_marks_the_unavailable() {
    let dir = std::env::temp_dir();
    let json = dir.join(format!("vmm-bench-dirty-{}.json", std::process::id()));
    let svg = dir.join(format!("vmm-bench-dirty-{}.svg", std::process::id()));
    let o = vmm(
        &[
            "bench",
            "dirty",
            "--guest-pages",
            "64",
            "--rounds",
            "2",
            "--host-mem",
            "16M",
            "--big-mem",
            "0",
            "--json",
            json.to_str().expect("utf-8"),
            "--plot",
            svg.to_str().expect("utf-8"),
        ],
        T,
    );
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json file")).expect("json");
    let rows = j["rows"].as_array().expect("rows");
    // none + five backends, for each driver.
    assert_eq!(rows.len(), 12);
    let row = |driver: &str, backend: &str| {
        rows.iter()
            .find(|r| r["driver"] == driver && r["backend"] == backend)
            .unwrap_or_else(|| panic!("no row {driver}/{backend}"))
    };
    for b in ["kvm-bitmap", "kvm-ring", "uffd-wp", "uffd-async"] {
        assert!(row("guest", b)["unavailable"].is_null(), "{b}");
        assert!(row("guest", b)["pages_per_s"]
            .as_f64()
            .is_some_and(|v| v > 0.0));
    }
    // KVM's log cannot see host threads: listed, marked, with the reason.
    assert!(row("host", "kvm-ring")["unavailable"]
        .as_str()
        .unwrap_or("")
        .contains("guest writes only"));
    assert!(row("host", "uffd-async")["host_cost_per_dirty_page_us"]
        .as_f64()
        .is_some_and(|v| v > 0.0));
    let svg_text = std::fs::read_to_string(&svg).expect("plot");
    assert!(svg_text.starts_with("<svg") && svg_text.contains("uffd-async"));
    let _ = std::fs::remove_file(json);
    let _ = std::fs::remove_file(svg);
}

#[test]
fn tracking_over_transparent_huge_pages_reports_4k_pages() {
    // Plain memory can get THP here (uffd-populated memory cannot); KVM
    // splits it while logging, so rounds stay at 4 KiB granularity.
    let j = run_ok(&[
        "run",
        "--json",
        "--backing",
        "plain",
        "--thp",
        "--track",
        "kvm-bitmap",
        "--pages",
        "1024",
        "--passes",
        "2",
    ]);
    let t = &j["tracking"];
    assert_eq!(t["missed_pages"], 0);
    assert!(
        t["granularity"].as_str().unwrap_or("").starts_with("4 KiB"),
        "{t}"
    );
    if j["memory"]["thp_bytes"].as_u64().unwrap_or(0) == 0 {
        eprintln!("note: the host gave no huge pages; granularity checked without them");
    }
    // 1024 pages written per round plus a few state/stack pages, not whole
    // 2 MiB pages (which would be 512-page multiples).
    for n in t["pages_per_round"].as_array().expect("rounds") {
        let n = n.as_u64().expect("count");
        assert!((1024..1100).contains(&n), "{n} pages in a round");
    }
}
