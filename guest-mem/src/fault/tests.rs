//! Real userfaultfd tests without KVM: host threads touch registered memory.

use crate::entry::PAGE_SIZE;
use crate::ram::{GuestRam, RamConfig};
use crate::region::{BackingKind, RegionFlags};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn ram(backing: BackingKind, fault_around: u64) -> GuestRam {
    GuestRam::new(
        16 << 20,
        RamConfig {
            backing,
            fault_around_pages: fault_around,
            ..RamConfig::default()
        },
    )
    .expect("guest RAM (needs userfaultfd: run as root or allow it)")
}

fn touch(addr: u64, write: bool) -> u64 {
    let p = addr as *mut u64;
    if write {
        // SAFETY: `addr` lies in a live region mapping owned by the test's GuestRam.
        unsafe { p.write_volatile(addr) };
        addr
    } else {
        // SAFETY: as above.
        unsafe { p.read_volatile() }
    }
}

#[test]
fn sequential_touches_cost_one_fault_per_fault_around_window() {
    for backing in [BackingKind::Memfd, BackingKind::Anon] {
        for write in [true, false] {
            let ram = ram(backing, 16);
            let base = 8 << 20;
            let before = ram.fault_stats();
            for p in 0..1024u64 {
                touch(ram.host_addr() + base + p * PAGE_SIZE, write);
            }
            let s = ram.fault_stats();
            let missing = s.missing() - before.missing();
            assert_eq!(missing, 1024 / 16, "{backing:?} write={write}");
            assert_eq!(
                s.pages_populated - before.pages_populated,
                1024,
                "{backing:?} write={write} {s:?}"
            );
            assert_eq!(s.fault_around_pages - before.fault_around_pages, 1024 - 64);
            assert_eq!(ram.populated_pages_in(base, base + (4 << 20)), 1024);
            // Written values read back; unwritten pages read zero (rule 8).
            if write {
                assert_eq!(
                    touch(ram.host_addr() + base + 5 * PAGE_SIZE, false),
                    ram.host_addr() + base + 5 * PAGE_SIZE
                );
            } else {
                assert_eq!(touch(ram.host_addr() + base + 5 * PAGE_SIZE, false), 0);
            }
            let e = ram.table().get(base);
            assert!(e.is_present());
            assert_eq!(
                e.is_zero_page(),
                !write && backing == BackingKind::Anon,
                "{e:?}"
            );
        }
    }
}

#[test]
fn fault_around_stays_inside_the_leaf_table_and_the_region() {
    let ram = ram(BackingKind::Anon, 512);
    // The last page of the first 2 MiB: the window is [0, 2 MiB).
    touch(ram.host_addr() + (2 << 20) - PAGE_SIZE, true);
    assert_eq!(ram.populated_pages_in(0, 2 << 20), 512);
    assert_eq!(ram.populated_pages_in(2 << 20, 4 << 20), 0);

    // A 10-page region: one fault fills exactly its 10 pages.
    let r = ram
        .add_region(1 << 30, 10 * PAGE_SIZE, RegionFlags::default())
        .expect("region");
    let before = ram.fault_stats();
    touch(r.host_of(r.gpa + 3 * PAGE_SIZE), false);
    assert_eq!(ram.fault_stats().missing() - before.missing(), 1);
    assert_eq!(ram.populated_pages_in(1 << 30, (1 << 30) + (2 << 20)), 10);

    // Already populated neighbours are not touched again: only the run of
    // empty pages around the fault is filled.
    let ram = ram_with(16);
    touch(ram.host_addr() + 5 * PAGE_SIZE + (4 << 20), true);
    assert_eq!(ram.populated_pages_in(4 << 20, 5 << 20), 16);
}

fn ram_with(fa: u64) -> GuestRam {
    ram(BackingKind::Memfd, fa)
}

#[test]
fn faults_are_attributed_to_registered_vcpu_threads() {
    let ram = Arc::new(ram(BackingKind::Memfd, 1));
    let r2 = ram.clone();
    std::thread::spawn(move || {
        r2.register_vcpu_thread(69);
        touch(r2.host_addr() + (1 << 20), true);
    })
    .join()
    .expect("thread");
    let region = &ram.boot_regions()[0];
    assert_eq!(region.accessors.load(Ordering::Relaxed), 1 << (69 % 64));
    // A host thread that is not a vCPU leaves no accessor bit.
    touch(ram.host_addr() + (2 << 20), true);
    assert_eq!(region.accessors.load(Ordering::Relaxed), 1 << 5);
}

#[test]
fn vm_memory_writes_fault_in_through_the_engine() {
    let ram = ram(BackingKind::Anon, 16);
    ram.write(0x12_3000, b"hello").expect("write");
    let mut buf = [0u8; 5];
    ram.read(0x12_3000, &mut buf).expect("read");
    assert_eq!(&buf, b"hello");
    assert_eq!(ram.fault_stats().missing_write, 1);
}

#[test]
fn stress_faults_on_regions_while_regions_come_and_go() {
    let ram = Arc::new(ram(BackingKind::Memfd, 4));
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (ram, stop) = (ram.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut cycles = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let gpa = (64 << 30) + (cycles % 8) * (4 << 20);
                let r = ram
                    .add_region(gpa, 4 << 20, RegionFlags::default())
                    .expect("add");
                // Touch it a little, so removal frees real tables.
                touch(r.host_of(gpa + (cycles % 1000) * PAGE_SIZE), true);
                ram.remove_region(r.id).expect("remove");
                cycles += 1;
            }
            cycles
        })
    };
    let workers: Vec<_> = (0..4u64)
        .map(|t| {
            let ram = ram.clone();
            std::thread::spawn(move || {
                let gpa = (1 << 30) * (t + 1);
                let r = ram
                    .add_region(gpa, 8 << 20, RegionFlags::default())
                    .expect("region");
                ram.register_vcpu_thread(t as u32);
                for round in 0..3u64 {
                    for p in (0..2048u64).step_by(3) {
                        let a = r.host_of(gpa + p * PAGE_SIZE);
                        // SAFETY: inside this thread's own live region.
                        unsafe { (a as *mut u64).write_volatile(round << 32 | p) };
                    }
                    for p in (0..2048u64).step_by(3) {
                        let a = r.host_of(gpa + p * PAGE_SIZE);
                        // SAFETY: as above.
                        let v = unsafe { (a as *const u64).read_volatile() };
                        assert_eq!(v, round << 32 | p, "lost update");
                    }
                }
                assert_eq!(r.accessors.load(Ordering::Relaxed), 1 << t);
                r.id
            })
        })
        .collect();
    let ids: Vec<u64> = workers
        .into_iter()
        .map(|w| w.join().expect("worker"))
        .collect();
    stop.store(true, Ordering::Relaxed);
    let cycles = churn.join().expect("churn");
    assert!(cycles > 0);
    let s = ram.fault_stats();
    assert!(s.fast_path > 0 && s.fallbacks > 0, "{s:?}");
    // Every table of the removed regions is gone; the workers' regions remain.
    for id in ids {
        assert!(ram.regions().iter().any(|r| r.id == id));
    }
    assert_eq!(ram.populated_pages_in(64 << 30, 65 << 30), 0);
    assert_eq!(ram.regions().len(), 5);
}
