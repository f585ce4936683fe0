//! The scanner on a simulated two-node host (the second node is simulated:
//! this host has one), with host threads registered as the vCPUs and real
//! userfaultfd write-protect sampling.

use super::drill::{Drill, DrillRound};
use super::scanner::ScannerConfig;
use crate::entry::PAGE_SIZE;
use crate::ram::{GuestRam, RamConfig};
use crate::region::RegionFlags;

const VCPUS: u32 = 8;
const REGIONS_PER_VCPU: u64 = 2;
const PAGES: u64 = 64;
const BASE: u64 = 64 << 20;

/// Two 64-page regions per vCPU, 8 vCPUs on 2 nodes, every region on the
/// node its vCPU is not on.
fn setup() -> Drill {
    Drill::new(VCPUS, VCPUS as u64 * REGIONS_PER_VCPU, PAGES, 2).expect("drill")
}

fn run(s: &Drill, filter: bool, rounds: u32) -> Vec<DrillRound> {
    let cfg = ScannerConfig {
        vcpu_node: Vec::new(),
        window_pages: 16,
        max_moves: 4096,
        filter_accessors: filter,
        accessor_window: 4,
        signal: Default::default(),
    };
    s.run(cfg, rounds).expect("drill")
}

#[test]
fn pages_move_to_their_writers_node_and_untouched_regions_are_skipped_after_two_scans() {
    let s = setup();
    let rounds = run(&s, true, 10);
    let (_, share) = rounds.last().expect("rounds");
    for (v, on) in share.iter().enumerate() {
        assert!(
            *on >= 0.9,
            "vCPU {v}: {:.0}% of its pages on its node",
            on * 100.0
        );
    }
    // 17 regions (the boot region too), 8 vCPUs: every region is scanned
    // twice for every vCPU; from then on only the vCPU's own two regions.
    let regions = VCPUS as u64 * REGIONS_PER_VCPU + 1;
    let scanned: u64 = rounds.iter().map(|r| r.0.regions_scanned).sum();
    let skipped: u64 = rounds.iter().map(|r| r.0.regions_skipped).sum();
    let later = rounds.len() as u64 - 2;
    assert_eq!(
        scanned,
        2 * VCPUS as u64 * regions + later * VCPUS as u64 * REGIONS_PER_VCPU
    );
    assert_eq!(skipped, later * VCPUS as u64 * (regions - REGIONS_PER_VCPU));
}

#[test]
fn without_the_filter_every_region_is_scanned_for_every_vcpu() {
    let s = setup();
    let rounds = run(&s, false, 4);
    assert!(rounds.iter().all(|r| r.0.regions_skipped == 0));
    let regions = VCPUS as u64 * REGIONS_PER_VCPU + 1;
    assert!(rounds
        .iter()
        .all(|r| r.0.regions_scanned == VCPUS as u64 * regions));
}

#[test]
fn a_moved_page_is_handed_to_the_trackers_first() {
    // Rule 15: the page's dirty state reaches the VMM-write log, which
    // every tracker merges, before the page moves.
    let s = setup();
    s.ram.host_dirty().set_enabled(true);
    let rounds = run(&s, true, 2);
    let moved: u64 = rounds.iter().map(|r| r.0.pages_moved).sum();
    assert!(moved > 0);
    let logged = s.ram.host_dirty().take();
    assert!(
        logged.len() as u64 >= moved,
        "{} logged, {moved} moved",
        logged.len()
    );
}

#[test]
fn sampling_beside_a_tracker_hides_no_write() {
    // Synchronous write-protect tracking: a page written this round is not
    // armed (re-protecting it would lose the write from the round).
    let ram = GuestRam::new(4 << 20, RamConfig::default()).expect("ram");
    let store = |gpa: u64, v: u64| {
        // SAFETY: inside guest RAM's live mapping.
        unsafe { ((ram.host_addr() + gpa) as *mut u64).write_volatile(v) }
    };
    for p in 0..8 {
        store(p * PAGE_SIZE, 1);
    }
    ram.start_wp_tracking().expect("track");
    let _ = ram.harvest_wp_sync().expect("baseline");
    store(0, 2);
    let armed = ram
        .arm_write_samples(&(0..8).map(|p| p * PAGE_SIZE).collect::<Vec<_>>())
        .expect("arm");
    assert_eq!(armed, 7, "the written page is left to the tracker");
    store(PAGE_SIZE, 3);
    let written = ram.harvest_wp_sync().expect("harvest");
    assert!(written.contains(&0) && written.contains(&1), "{written:?}");
    let samples = ram.take_write_samples().expect("samples");
    assert!(samples.contains_key(&PAGE_SIZE) && !samples.contains_key(&0));
    // uffd-async resolves its faults in the kernel: sampling is refused.
    let async_ram = GuestRam::new(
        4 << 20,
        RamConfig {
            wp_async: true,
            ..RamConfig::default()
        },
    )
    .expect("ram");
    async_ram.start_wp_tracking().expect("track");
    assert!(async_ram.arm_write_samples(&[0]).is_err());
}

#[test]
fn dirty_ring_style_writer_lists_mark_the_regions_accessors() {
    let ram = GuestRam::new(4 << 20, RamConfig::default()).expect("ram");
    let r = ram
        .add_region(BASE, PAGES * PAGE_SIZE, RegionFlags::default())
        .expect("region");
    ram.note_writers(5, &[BASE / PAGE_SIZE + 3, 7]);
    assert_eq!(
        r.accessors.load(std::sync::atomic::Ordering::Relaxed),
        1 << 5
    );
    assert_ne!(
        ram.regions()[0]
            .accessors
            .load(std::sync::atomic::Ordering::Relaxed)
            & (1 << 5),
        0
    );
}

#[test]
fn ring_windows_name_writers_and_stay_armed_until_a_ring_reports() {
    let ram = GuestRam::new(4 << 20, RamConfig::default()).expect("ram");
    for p in 0..4u64 {
        ram.store_u64(p * PAGE_SIZE, 1).expect("store");
    }
    // Nothing is protected: the window only notes the pages.
    assert_eq!(ram.arm_ring_samples(&[0, PAGE_SIZE, 64 * PAGE_SIZE]), 2);
    ram.note_writers(3, &[1, 9]);
    let got = ram.take_ring_samples(false);
    assert_eq!(got.len(), 1);
    assert_eq!(got[&PAGE_SIZE], 1 << 3);
    // Page 0 stays armed until a ring reports it.
    ram.note_writers(1, &[0]);
    assert_eq!(ram.take_ring_samples(true)[&0], 1 << 1);
    assert!(ram.take_ring_samples(true).is_empty());
}

#[test]
fn boot_ram_splits_into_node_regions_over_one_mapping() {
    let mut ram = GuestRam::new(8 << 20, RamConfig::default()).expect("ram");
    assert!(
        ram.split_into_nodes(&[3 << 20, 4 << 20]).is_err(),
        "sizes must add up"
    );
    ram.split_into_nodes(&[2 << 20, 6 << 20]).expect("split");
    let regions = ram.regions();
    assert_eq!(regions.len(), 2);
    assert_eq!(ram.boot_regions().len(), 2);
    let (a, b) = (&regions[0], &regions[1]);
    assert_eq!((a.guest_node, b.guest_node), (Some(0), Some(1)));
    assert_eq!((b.gpa, b.size), (2 << 20, 6 << 20));
    assert!(std::sync::Arc::ptr_eq(&a.mapping, &b.mapping));
    assert_eq!(b.host_start(), ram.host_addr() + (2 << 20));
    // A fault in node 1 is served there, recorded with its frame in the
    // shared backing, and attributed to the faulting vCPU's region only.
    ram.register_vcpu_thread(2);
    ram.store_u64((3 << 20) + 8, 7).expect("store");
    assert_eq!(ram.load_u64((3 << 20) + 8).expect("load"), 7);
    let e = ram.table().get(3 << 20);
    assert_eq!(e.frame(), Some(crate::entry::Frame((3 << 20) / PAGE_SIZE)));
    let bits = |r: &crate::region::Region| r.accessors.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!((bits(a), bits(b)), (0, 1 << 2));
    assert!(
        ram.split_into_nodes(&[4 << 20, 4 << 20]).is_err(),
        "split once"
    );
}

#[test]
fn every_fourth_accessor_window_one_round_scans_every_region() {
    // A vCPU whose region saw no sampled write for two windows would
    // otherwise never be sampled there again.
    let s = setup();
    let rounds = run(&s, true, 17);
    let skipped: Vec<u64> = rounds.iter().map(|r| r.0.regions_skipped).collect();
    let refresh = (4 * super::scanner::REFRESH_WINDOWS) as usize;
    assert_eq!(skipped[refresh - 1], 0, "{skipped:?}");
    assert!(
        skipped[refresh - 2] > 0 && skipped[refresh] > 0,
        "{skipped:?}"
    );
}
