//! Write-protect tracking with real userfaultfd and host threads.

use crate::entry::PAGE_SIZE;
use crate::ram::{GuestRam, RamConfig};
use crate::region::BackingKind;
use crate::tracking::pagemap::Pagemap;

fn ram(backing: BackingKind, wp_async: bool) -> GuestRam {
    GuestRam::new(
        8 << 20,
        RamConfig {
            backing,
            wp_async,
            ..RamConfig::default()
        },
    )
    .expect("guest RAM")
}

fn write(ram: &GuestRam, page: u64, v: u64) {
    let a = ram.host_addr() + page * PAGE_SIZE;
    // SAFETY: inside the live mapping of `ram`.
    unsafe { (a as *mut u64).write_volatile(v) };
}

fn read(ram: &GuestRam, page: u64) -> u64 {
    let a = ram.host_addr() + page * PAGE_SIZE;
    // SAFETY: as above.
    unsafe { (a as *const u64).read_volatile() }
}

#[test]
fn every_write_is_harvested_once_per_round() {
    for backing in [BackingKind::Memfd, BackingKind::Anon] {
        for wp_async in [false, true] {
            let ram = ram(backing, wp_async);
            let pagemap = Pagemap::open().expect("pagemap");
            let harvest = |ram: &GuestRam| -> Vec<u64> {
                if wp_async {
                    ram.harvest_wp_async(&pagemap).expect("harvest").0
                } else {
                    ram.harvest_wp_sync().expect("harvest")
                }
            };
            // Populate some pages before tracking (reads: zero pages on anon).
            for p in 0..64 {
                if p % 2 == 0 {
                    write(&ram, p, 1);
                } else {
                    read(&ram, p);
                }
            }
            ram.start_wp_tracking().expect("start");
            let _ = harvest(&ram);
            for round in 0..4u64 {
                // Written: old pages (populated and zero-page ones) and new ones.
                let pages: Vec<u64> = (0..40).map(|i| (i * 37 + round * 11) % 1500).collect();
                for &p in &pages {
                    write(&ram, p, round + 100);
                }
                // Read-only touches must not count.
                for p in 1500..1600 {
                    read(&ram, p);
                }
                let got = harvest(&ram);
                for p in &pages {
                    assert!(
                        got.contains(p),
                        "{backing:?} async={wp_async} round {round}: missed page {p}"
                    );
                }
                let extra = got.iter().filter(|p| !pages.contains(p)).count();
                assert!(
                    extra <= 16,
                    "{backing:?} async={wp_async}: {extra} false positives: {got:?}"
                );
                for &p in &pages {
                    assert_eq!(read(&ram, p), round + 100);
                }
            }
            // A round with no writes is empty.
            assert!(harvest(&ram).is_empty());
            ram.stop_wp_tracking().expect("stop");
            write(&ram, 7, 7);
            assert_eq!(read(&ram, 7), 7);
            // Rule 11 holds across the table.
            let e = ram.table().get(3 * PAGE_SIZE);
            assert!(e.check().is_ok() && !e.is_uffd_wp(), "{e:?}");
        }
    }
}

#[test]
fn wrong_mode_and_plain_backing_are_refused() {
    let ram = ram(BackingKind::Anon, false);
    let pagemap = Pagemap::open().expect("pagemap");
    assert!(ram.harvest_wp_async(&pagemap).is_err());
    let ram = ram_async();
    assert!(ram.harvest_wp_sync().is_err());
    let plain = GuestRam::new_anonymous(1 << 20).expect("plain");
    assert!(plain.start_wp_tracking().is_err());
}

fn ram_async() -> GuestRam {
    ram(BackingKind::Memfd, true)
}

#[test]
fn host_writes_are_logged_while_enabled() {
    let ram = ram(BackingKind::Anon, false);
    ram.write(0x5000, b"x").expect("write");
    assert!(ram.host_dirty().take().is_empty());
    ram.host_dirty().set_enabled(true);
    ram.write(0x5ffc, &[1; 8]).expect("write across pages");
    ram.store_u64(0x9000, 3).expect("store");
    assert_eq!(ram.host_dirty().take(), vec![5, 6, 9]);
    assert!(ram.host_dirty().take().is_empty());
}

#[test]
fn soft_dirty_detection_answers() {
    // Built without CONFIG_MEM_SOFT_DIRTY here; the answer must be stable.
    assert_eq!(
        super::soft_dirty::supported(),
        super::soft_dirty::supported()
    );
}

#[test]
fn discarding_pages_while_tracking_loses_no_write() {
    // Rule 15: a writer and a balloon-like discarder race; every page written
    // before a harvest is in that harvest or an earlier one, discarded or not.
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    for backing in [BackingKind::Memfd, BackingKind::Anon] {
        for wp_async in [false, true] {
            let ram = Arc::new(ram(backing, wp_async));
            let pagemap = Pagemap::open().expect("pagemap");
            ram.start_wp_tracking().expect("start");
            ram.host_dirty().set_enabled(true);
            // Pages written since the last harvest: one bit per page, set
            // after the store, so a set bit means "written before it was read".
            let written: Arc<Vec<AtomicU64>> =
                Arc::new((0..16).map(|_| AtomicU64::new(0)).collect());
            let stop = Arc::new(AtomicBool::new(false));
            let writer = {
                let (ram, written, stop) = (ram.clone(), written.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let page = (i * 7) % 1024;
                        write(&ram, page, i);
                        written[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Release);
                        i += 1;
                    }
                })
            };
            let discarder = {
                let (ram, stop) = (ram.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let page = (i * 64) % 1024;
                        ram.discard(page * PAGE_SIZE, 16 * PAGE_SIZE)
                            .expect("discard");
                        i += 1;
                        // A balloon discards now and then; back-to-back
                        // discards would starve the fault handler of the
                        // region lock (std's Mutex is not fair).
                        std::thread::sleep(std::time::Duration::from_micros(300));
                    }
                })
            };
            let mut previous: Vec<u64> = Vec::new();
            for _ in 0..20 {
                std::thread::sleep(std::time::Duration::from_millis(5));
                let before: Vec<u64> = written
                    .iter()
                    .enumerate()
                    .flat_map(|(w, bits)| {
                        let v = bits.swap(0, Ordering::Acquire);
                        (0..64)
                            .filter(move |b| v & (1 << b) != 0)
                            .map(move |b| w as u64 * 64 + b)
                    })
                    .collect();
                let mut got = if wp_async {
                    ram.harvest_wp_async(&pagemap).expect("harvest").0
                } else {
                    ram.harvest_wp_sync().expect("harvest")
                };
                got.extend(ram.host_dirty().take());
                got.sort_unstable();
                // A write racing the previous harvest may have landed in it.
                for p in before {
                    assert!(
                        got.binary_search(&p).is_ok() || previous.binary_search(&p).is_ok(),
                        "{backing:?} async={wp_async}: write to page {p} lost"
                    );
                }
                previous = got;
            }
            stop.store(true, Ordering::Relaxed);
            writer.join().expect("writer");
            discarder.join().expect("discarder");
        }
    }
}

#[test]
fn discard_reads_back_zero_and_rejects_bad_ranges() {
    let ram = ram(BackingKind::Memfd, false);
    write(&ram, 3, 42);
    ram.discard(3 * PAGE_SIZE, PAGE_SIZE).expect("discard");
    assert_eq!(read(&ram, 3), 0);
    assert!(ram.discard(5, PAGE_SIZE).is_err());
    assert!(ram.discard(ram.size(), PAGE_SIZE).is_err());
}
