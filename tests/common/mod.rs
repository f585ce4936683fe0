//! Helpers shared by the end-to-end tests: running the `vmm` binary with a
//! deadline, and hand-made guest ELF images for hostile or broken kernels.
#![allow(dead_code)]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What a `vmm` invocation produced.
pub struct Output {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Output {
    /// Parses stdout as exactly one JSON object.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "stdout is not one JSON object ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }

    /// Asserts the run failed (exit 1) with a JSON report whose error
    /// contains `needle`; returns the report.
    pub fn failure(&self, needle: &str) -> serde_json::Value {
        assert_eq!(self.code, 1, "{}\n{}", self.stdout, self.stderr);
        let j = self.json();
        let e = j["error"].as_str().unwrap_or("");
        assert!(e.contains(needle), "error lacks {needle:?}: {j}");
        j
    }
}

/// Path of the `vmm` binary cargo built for these tests.
pub fn vmm_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vmm")
}

/// Runs `vmm` with `args`, killing it after `timeout`.
pub fn vmm(args: &[&str], timeout: Duration) -> Output {
    let mut child = Command::new(vmm_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vmm {args:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        code: status.code().unwrap_or(-1),
        stdout: t_out.join().expect("stdout reader"),
        stderr: t_err.join().expect("stderr reader"),
    }
}

/// The usual deadline for one small guest.
pub const T: Duration = Duration::from_secs(60);

/// Runs `vmm` with `args`, asserts exit 0 and returns its JSON.
pub fn run_ok(args: &[&str]) -> serde_json::Value {
    let o = vmm(args, T);
    assert_eq!(o.code, 0, "{args:?}: {}\n{}", o.stdout, o.stderr);
    o.json()
}

/// Builds a minimal static x86_64 ELF whose single segment, loaded at
/// 0x200000, holds `code`; the entry is the first byte of `code`.
pub fn tiny_elf(code: &[u8]) -> Vec<u8> {
    const HDR: usize = 64 + 56;
    let base = 0x20_0000u64;
    let total = (HDR + code.len()) as u64;
    let mut e = Vec::new();
    e.extend_from_slice(b"\x7fELF");
    e.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little-endian, version 1, SysV
    e.extend_from_slice(&[0; 8]);
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&62u16.to_le_bytes()); // x86_64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&(base + HDR as u64).to_le_bytes()); // entry
    e.extend_from_slice(&64u64.to_le_bytes()); // phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // shoff
    e.extend_from_slice(&0u32.to_le_bytes()); // flags
    e.extend_from_slice(&64u16.to_le_bytes()); // ehsize
    e.extend_from_slice(&56u16.to_le_bytes()); // phentsize
    e.extend_from_slice(&1u16.to_le_bytes()); // phnum
    e.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
    assert_eq!(e.len(), 64);
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&5u32.to_le_bytes()); // R+X
    e.extend_from_slice(&0u64.to_le_bytes()); // offset
    e.extend_from_slice(&base.to_le_bytes()); // vaddr
    e.extend_from_slice(&base.to_le_bytes()); // paddr
    e.extend_from_slice(&total.to_le_bytes()); // filesz
    e.extend_from_slice(&total.to_le_bytes()); // memsz
    e.extend_from_slice(&0x1000u64.to_le_bytes()); // align
    assert_eq!(e.len(), HDR);
    e.extend_from_slice(code);
    e
}

/// Machine code that writes `text` to COM1.
pub fn serial_code(text: &str) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for b in text.bytes() {
        c.extend_from_slice(&[0xb0, b, 0xee]); // mov al, b; out dx, al
    }
    c
}

/// Machine code that sends event `code` on the control port.
pub fn event_code(code: u32) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0x00, 0x05, 0xb8]; // mov dx, 0x500; mov eax, imm32
    c.extend_from_slice(&code.to_le_bytes());
    c.push(0xef); // out dx, eax
    c
}

/// `hlt` then spin.
pub const HALT: [u8; 3] = [0xf4, 0xeb, 0xfd];

/// Writes `bytes` to a fresh file in a temporary directory and returns its path.
pub fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write temp file");
    path
}

/// Asserts that `vmm args` is a usage error (exit 2) whose message contains `needle`.
pub fn assert_usage_error(args: &[&str], needle: &str) {
    let o = vmm(args, T);
    assert_eq!(
        o.code, 2,
        "{args:?}: want exit 2\nstdout: {}\nstderr: {}",
        o.stdout, o.stderr
    );
    assert!(
        o.stderr.contains(needle),
        "{args:?}: stderr lacks {needle:?}:\n{}",
        o.stderr
    );
    assert!(
        !o.stderr.contains("panicked"),
        "{args:?} panicked:\n{}",
        o.stderr
    );
}

/// Whether this process may create a private mount namespace (root and
/// `unshare`), for tests that hide or shrink file systems.
pub fn can_unshare_mount() -> bool {
    std::process::Command::new("unshare")
        .args(["--mount", "true"])
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs the shell `script` in a private mount namespace: its mounts are
/// gone when it exits.
pub fn in_mount_namespace(script: &str) -> std::process::Output {
    std::process::Command::new("unshare")
        .args(["--mount", "sh", "-c", script])
        .output()
        .expect("run unshare")
}

/// Asserts that a `vmm ... --json` child process failed with exit 1 and a
/// JSON report of `status`; returns the report.
pub fn json_failure(out: &std::process::Output, status: &str) -> serde_json::Value {
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(j["status"], status, "{j}");
    j
}

/// Asserts that a `vmm ... --json` child process failed with exit 1 and a
/// JSON report of `status` whose error contains `needle`.
pub fn assert_json_failure(out: &std::process::Output, status: &str, needle: &str) {
    let j = json_failure(out, status);
    let e = j["error"].as_str().unwrap_or("");
    assert!(e.contains(needle), "error lacks {needle:?}: {e}");
}

/// A page the test workloads never touch (inside a 64 MiB guest).
pub const UNUSED_PAGE: u64 = 48 << 20;

/// Runs a 64 MiB `seq-write` VM (128 pages, `passes` passes) in this
/// process; `hook` runs once the guest made `after` page stores.
pub fn run_with_hook(
    passes: u64,
    after: u64,
    hook: impl FnMut(&mut vmm::runner::VmHandle) -> Result<(), vmm::runner::HookError> + Send + 'static,
) -> vmm::report::RunReport {
    let cfg = vmm::config::VmConfig {
        mem_bytes: 64 << 20,
        workload: guest_protocol::Workload::SeqWrite,
        pages: 128,
        passes,
        ..vmm::config::VmConfig::default()
    };
    let hooks = vmm::runner::RunHooks::default().after_pages(after, Box::new(hook));
    vmm::runner::run(&cfg, hooks, vmm::runner::SerialSink::Capture).expect("run")
}

/// Takes a paused snapshot into `dir` of a VM whose page [`UNUSED_PAGE`]
/// is poisoned (rule 12's marker).
pub fn snapshot_with_a_poisoned_page(dir: &std::path::Path) {
    use vmm::snapshot::writer::{take_snapshot, SnapshotMode};
    let d = dir.to_path_buf();
    let report = run_with_hook(2, 64, move |vm| {
        vm.ram().poison_page(UNUSED_PAGE, "test memory error")?;
        let desc = vm.machine().clone();
        let r = take_snapshot(vm, &d, SnapshotMode::Paused, desc, None)
            .map_err(|e| vmm::runner::HookError(e.to_string()))?;
        vm.snapshots.push(r);
        Ok(())
    });
    assert_eq!(report.snapshots.len(), 1, "{:?}", report.error);
}

/// A fresh directory path (removed if it exists) on tmpfs when there is
/// one (the fault engine can then serve an `mmap` restore or a clone of a
/// snapshot there), else in the temporary directory.
pub fn tmpfs_dir(prefix: &str, name: &str) -> std::path::PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let d = base.join(format!("vmm-{prefix}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The guest the snapshot, clone and fork tests share: 2 vCPUs of
/// `rand-write` over 256 pages each, `passes` passes.
pub fn rand_write_args(passes: &str) -> [&str; 8] {
    [
        "--vcpus",
        "2",
        "--workload",
        "rand-write",
        "--pages",
        "256",
        "--passes",
        passes,
    ]
}

/// `vmm run --json --snapshot DIR --snapshot-after-pages AFTER ARGS...`,
/// as it ended.
pub fn run_with_snapshot(dir: &std::path::Path, after: &str, args: &[&str]) -> Output {
    let mut all = vec![
        "run",
        "--json",
        "--snapshot",
        dir.to_str().expect("utf-8"),
        "--snapshot-after-pages",
        after,
    ];
    all.extend_from_slice(args);
    vmm(&all, T)
}

/// `vmm restore DIR --mode MODE --json EXTRA...`, as it ended.
pub fn restore_mode(dir: &std::path::Path, mode: &str, extra: &[&str]) -> Output {
    let dir = dir.to_str().expect("utf-8");
    let mut all = vec!["restore", dir, "--mode", mode, "--json"];
    all.extend_from_slice(extra);
    vmm(&all, T)
}

/// `vmm clone DIR --count N --json EXTRA...`, as it ended.
pub fn clone_count(dir: &std::path::Path, count: &str, extra: &[&str]) -> Output {
    let dir = dir.to_str().expect("utf-8");
    let mut all = vec!["clone", dir, "--count", count, "--json"];
    all.extend_from_slice(extra);
    vmm(&all, T)
}

/// `vmm run --json --fork-after-pages AFTER --forks K ARGS...`, as it
/// ended.
pub fn run_with_fork(after: &str, forks: &str, args: &[&str]) -> Output {
    let mut all = vec![
        "run",
        "--json",
        "--fork-after-pages",
        after,
        "--forks",
        forks,
    ];
    all.extend_from_slice(args);
    vmm(&all, T)
}

/// [`run_with_snapshot`], asserted to succeed with exactly one snapshot;
/// returns the report.
pub fn take_snapshot(dir: &std::path::Path, after: &str, args: &[&str]) -> serde_json::Value {
    let o = run_with_snapshot(dir, after, args);
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    let j = o.json();
    assert_eq!(j["snapshots"].as_array().map(Vec::len), Some(1), "{j}");
    j
}

/// The process's open file descriptors (rule 7's unwind tests).
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("fd").count()
}

/// The process's mappings of files and kernel objects: guest memory
/// (memfds, snapshot images), the vCPUs' run areas. Anonymous ones are left
/// out: how many thread stacks glibc caches and how many malloc arenas it
/// made depend on how many threads happened to run at once (VMs are built
/// on several threads), not on what a failed setup left behind.
pub fn object_mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .expect("maps")
        .lines()
        .filter(|l| l.split_whitespace().nth(5).is_some())
        .count()
}
