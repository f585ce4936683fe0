//! `vmm bench snapshot`.
//!
//! * write-protect cost (the table of the `UFFD_FEATURE_WP_UNPOPULATED`
//!   commit): protecting a 25%-populated anonymous range by pre-reading
//!   every page, by `MADV_POPULATE_READ`, and by `WP_UNPOPULATED`, with and
//!   without THP, host-driven, side by side;
//! * a live and a paused snapshot of a guest whose RAM the host populated
//!   (labelled), with a memcpy of the same bytes into a fresh tmpfs file in
//!   the same run.

use super::median;
use crate::config::VmConfig;
use crate::report::EXIT_ERROR;
use crate::runner::{run, HookError, RunHooks, SerialSink, VmHandle};
use crate::size::{format_size, size_arg, sizes_arg};
use crate::snapshot::writer::{take_snapshot, SnapshotMode, SnapshotReport};
use clap::Args;
use guest_mem::uffd::sys::{UFFDIO_REGISTER_MODE_WP, UFFD_FEATURE_WP_UNPOPULATED};
use guest_mem::uffd::Userfaultfd;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// `vmm bench snapshot` flags.
#[derive(Args, Debug, Clone)]
pub struct SnapshotBenchArgs {
    /// Sizes for the write-protect comparison.
    #[arg(long, default_value = "1G,4G", value_parser = sizes_arg)]
    pub wp_sizes: Vec<Vec<u64>>,
    /// Guest RAM of the snapshot measurement (populated by the host).
    #[arg(long, default_value = "1G", value_parser = size_arg)]
    pub mem: u64,
    /// Directory for the snapshots (default: /dev/shm, a tmpfs like the
    /// memcpy the snapshot is compared with).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Rounds of (live snapshot, paused snapshot, memcpy); each is reported
    /// by its median round. The first round of a run is often much slower
    /// (the kernel reclaims memory for the new tmpfs pages), whichever mode
    /// goes first.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub runs: u32,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One write-protect measurement.
#[derive(Debug, Serialize)]
pub struct WpRow {
    /// Range size.
    pub bytes: u64,
    /// THP on the range.
    pub thp: bool,
    /// `pre-read`, `populate-read` or `wp-unpopulated`.
    pub method: String,
    /// µs to make the whole range write-protected.
    pub us: f64,
}

/// One snapshot measurement.
#[derive(Debug, Serialize)]
pub struct SnapRow {
    /// The snapshot's report.
    pub snapshot: SnapshotReport,
    /// Size on disk (allocated blocks).
    pub disk_bytes: u64,
    /// Total µs of every round of this mode, in run order (`snapshot` is
    /// the median one).
    pub round_totals_us: Vec<u64>,
}

/// The benchmark's result.
#[derive(Debug, Serialize)]
pub struct SnapshotBench {
    /// Write-protect comparison.
    pub write_protect: Vec<WpRow>,
    /// Live and paused snapshots.
    pub snapshots: Vec<SnapRow>,
    /// Guest RAM of the snapshots.
    pub mem_bytes: u64,
    /// Bytes the host populated in that guest.
    pub populated_bytes: u64,
    /// µs to memcpy the populated bytes into a fresh tmpfs file (median
    /// over the rounds).
    pub memcpy_tmpfs_us: f64,
}

fn anon(len: u64, thp: bool) -> Result<*mut u8, String> {
    // SAFETY: a fresh anonymous mapping; checked below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!("mmap {len}: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: advising our own mapping.
    unsafe {
        libc::madvise(
            p,
            len as usize,
            if thp {
                libc::MADV_HUGEPAGE
            } else {
                libc::MADV_NOHUGEPAGE
            },
        )
    };
    Ok(p as *mut u8)
}

/// Write-protects a 25%-populated range with `method`; returns µs.
fn wp_once(bytes: u64, thp: bool, method: &str) -> Result<f64, String> {
    let p = anon(bytes, thp)?;
    let pages = bytes / 4096;
    for i in (0..pages).step_by(4) {
        // SAFETY: inside the fresh mapping.
        unsafe { p.add((i * 4096) as usize).write_volatile(1) };
    }
    let uffd = Userfaultfd::open(UFFD_FEATURE_WP_UNPOPULATED, 0).map_err(|e| e.to_string())?;
    uffd.register(p as u64, bytes, UFFDIO_REGISTER_MODE_WP)
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    match method {
        "pre-read" => {
            for i in 0..pages {
                // SAFETY: inside the mapping.
                unsafe { p.add((i * 4096) as usize).read_volatile() };
            }
        }
        "populate-read" => {
            // SAFETY: advising our own mapping.
            let r = unsafe {
                libc::madvise(
                    p as *mut libc::c_void,
                    bytes as usize,
                    22, /* MADV_POPULATE_READ */
                )
            };
            if r != 0 {
                return Err(format!(
                    "MADV_POPULATE_READ: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        _ => {}
    }
    uffd.write_protect(p as u64, bytes, true)
        .map_err(|e| e.to_string())?;
    let us = start.elapsed().as_secs_f64() * 1e6;
    // SAFETY: unmapping our own mapping.
    unsafe { libc::munmap(p as *mut libc::c_void, bytes as usize) };
    Ok(us)
}

/// A snapshot's report and the bytes the host populated, or why it failed.
type SnapshotOutcome = Result<(SnapshotReport, u64), String>;

fn snapshot_once(mem: u64, mode: SnapshotMode, dir: PathBuf) -> Result<(SnapRow, u64), String> {
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = VmConfig {
        mem_bytes: mem,
        pages: 64,
        passes: 1000,
        stop_after: Some(std::time::Duration::from_millis(50)),
        ..VmConfig::default()
    };
    let out: Arc<Mutex<Option<SnapshotOutcome>>> = Arc::default();
    let out2 = out.clone();
    let hooks = RunHooks::default().after_pages(
        64,
        Box::new(move |vm: &mut VmHandle| -> Result<(), HookError> {
            // Host-driven population of most of guest RAM (labelled as such).
            vm.pause()?;
            let first = 16u64 << 20;
            let mut populated = 0;
            let page = [0x5au8; 4096];
            let mut gpa = first;
            while gpa + 4096 <= vm.ram().size() {
                vm.ram().write(gpa, &page)?;
                populated += 4096;
                gpa += 4096;
            }
            vm.resume();
            let desc = vm.machine().clone();
            let r = take_snapshot(vm, &dir, mode, desc, None).map_err(|e| e.to_string());
            *out2.lock().map_err(|_| HookError("poisoned".into()))? =
                Some(r.map(|r| (r, populated)));
            Ok(())
        }),
    );
    run(&cfg, hooks, SerialSink::Capture).map_err(|e| e.to_string())?;
    let r = out
        .lock()
        .map_err(|_| "poisoned")?
        .take()
        .ok_or("the snapshot hook did not run")??;
    let disk = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(r.0.dir.join("memory.bin"))
            .map(|m| m.blocks() * 512)
            .unwrap_or(0)
    };
    Ok((
        SnapRow {
            snapshot: r.0,
            disk_bytes: disk,
            round_totals_us: Vec::new(),
        },
        r.1,
    ))
}

fn memcpy_tmpfs(bytes: u64) -> Result<f64, String> {
    use std::io::Write;
    let path = PathBuf::from(format!("/dev/shm/vmm-bench-memcpy-{}", std::process::id()));
    let buf = vec![0x5au8; 2 << 20];
    let start = Instant::now();
    let mut f = std::fs::File::create(&path).map_err(|e| e.to_string())?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).map_err(|e| e.to_string())?;
        left -= n as u64;
    }
    let us = start.elapsed().as_secs_f64() * 1e6;
    let _ = std::fs::remove_file(path);
    Ok(us)
}

/// The round of one mode with the median total, carrying every round's
/// total; `None` for no rounds.
fn median_round(mut rows: Vec<SnapRow>) -> Option<SnapRow> {
    let totals: Vec<u64> = rows.iter().map(|r| r.snapshot.total_us).collect();
    rows.sort_by_key(|r| r.snapshot.total_us);
    let mid = rows.len() / 2;
    let mut row = rows.into_iter().nth(mid)?;
    row.round_totals_us = totals;
    Some(row)
}

/// Runs `vmm bench snapshot`; returns the exit code.
pub fn main(args: &SnapshotBenchArgs) -> i32 {
    let sizes: Vec<u64> = args.wp_sizes.iter().flatten().copied().collect();
    let mut wp = Vec::new();
    for &bytes in &sizes {
        for thp in [false, true] {
            for method in ["pre-read", "populate-read", "wp-unpopulated"] {
                let mut samples = Vec::new();
                for _ in 0..3 {
                    match wp_once(bytes, thp, method) {
                        Ok(us) => samples.push(us),
                        Err(e) => {
                            eprintln!("vmm bench snapshot: write-protect {method}: {e}");
                            return EXIT_ERROR;
                        }
                    }
                }
                wp.push(WpRow {
                    bytes,
                    thp,
                    method: method.into(),
                    us: median(&samples),
                });
            }
        }
    }
    // On tmpfs by default, like the memcpy it is compared with.
    let dir = args.dir.clone().unwrap_or_else(|| {
        let shm = PathBuf::from("/dev/shm");
        if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        }
    });
    // The modes alternate round by round, so neither gets the slow first
    // round every time; each is reported by its median round.
    let modes = [SnapshotMode::Live, SnapshotMode::Paused];
    let mut rounds: Vec<Vec<SnapRow>> = modes.iter().map(|_| Vec::new()).collect();
    let mut memcpy_us = Vec::new();
    let mut populated = 0;
    for _ in 0..args.runs {
        for (mode, rows) in modes.iter().zip(&mut rounds) {
            match snapshot_once(
                args.mem,
                *mode,
                dir.join(format!(
                    "vmm-bench-snap-{}-{}",
                    std::process::id(),
                    mode.name()
                )),
            ) {
                Ok((row, p)) => {
                    let _ = std::fs::remove_dir_all(&row.snapshot.dir);
                    populated = p;
                    rows.push(row);
                }
                Err(e) => {
                    eprintln!("vmm bench snapshot: {} snapshot: {e}", mode.name());
                    return EXIT_ERROR;
                }
            }
        }
        match memcpy_tmpfs(populated) {
            Ok(us) => memcpy_us.push(us),
            Err(e) => {
                eprintln!("vmm bench snapshot: memcpy to tmpfs: {e}");
                return EXIT_ERROR;
            }
        }
    }
    let snaps: Vec<SnapRow> = rounds.into_iter().filter_map(median_round).collect();
    let memcpy = median(&memcpy_us);
    let result = SnapshotBench {
        write_protect: wp,
        snapshots: snaps,
        mem_bytes: args.mem,
        populated_bytes: populated,
        memcpy_tmpfs_us: memcpy,
    };
    println!("write-protect a 25%-populated anonymous range (host-driven), median of 3:");
    for r in &result.write_protect {
        println!(
            "  {:>8} thp={:<5} {:<15} {:>10.1} ms",
            format_size(r.bytes),
            r.thp,
            r.method,
            r.us / 1000.0
        );
    }
    println!(
        "snapshots of a {} guest, {} populated by the host (labelled), the guest writing; median of {} rounds:",
        format_size(result.mem_bytes),
        format_size(result.populated_bytes),
        args.runs
    );
    for s in &result.snapshots {
        let r = &s.snapshot;
        println!(
            "  {:<6} pause {:>7.3} ms, total {:>8.1} ms, {} pages by faults, {} by the writer, {:.0} MB/s ({:.0}% of a memcpy into tmpfs), {} on disk",
            r.mode,
            r.pause_us as f64 / 1000.0,
            r.total_us as f64 / 1000.0,
            r.pages_by_faults,
            r.pages_by_writer,
            r.throughput_bytes_per_s / 1e6,
            100.0 * (r.bytes_written as f64 / (r.total_us as f64 / 1e6)) / (result.populated_bytes as f64 / (result.memcpy_tmpfs_us / 1e6)),
            format_size(s.disk_bytes / 4096 * 4096)
        );
        let totals: Vec<String> = s
            .round_totals_us
            .iter()
            .map(|us| format!("{:.1}", *us as f64 / 1000.0))
            .collect();
        println!("         every round's total (ms): {}", totals.join(", "));
    }
    println!(
        "  memcpy of the same bytes into a fresh tmpfs file: {:.1} ms",
        result.memcpy_tmpfs_us / 1000.0
    );
    super::write_json("snapshot", args.json.as_deref(), &result)
}
