//! The scanner on a simulated two-node host (the second node is simulated:
//! this host has one), with host threads registered as the vCPUs and real
//! userfaultfd write-protect sampling.

use super::scanner::{NumaScanner, ScannerConfig};
use super::topology::{SimulatedTopology, Topology};
use crate::entry::PAGE_SIZE;
use crate::ram::{GuestRam, RamConfig};
use crate::region::RegionFlags;
use std::sync::{Arc, Barrier};

const VCPUS: u32 = 8;
const REGIONS_PER_VCPU: u64 = 2;
const PAGES: u64 = 64;
const BASE: u64 = 64 << 20;

fn node_of_vcpu(v: u32) -> u32 {
    v / 4
}

/// Guest RAM with two 64-page regions per vCPU, the vCPUs' threads, and a
/// topology that puts every region on the node its vCPU is *not* on.
struct Setup {
    ram: Arc<GuestRam>,
    topology: Arc<SimulatedTopology>,
    /// Per vCPU: its pages' host addresses.
    pages: Vec<Vec<u64>>,
}

fn setup() -> Setup {
    let ram = Arc::new(GuestRam::new(4 << 20, RamConfig::default()).expect("ram"));
    let mut owners = Vec::new();
    let mut pages = vec![Vec::new(); VCPUS as usize];
    for i in 0..VCPUS as u64 * REGIONS_PER_VCPU {
        let gpa = BASE + i * (1 << 20);
        let r = ram
            .add_region(gpa, PAGES * PAGE_SIZE, RegionFlags::default())
            .expect("region");
        let v = (i / REGIONS_PER_VCPU) as u32;
        owners.push((r.host_of(gpa), r.host_of(gpa) + PAGES * PAGE_SIZE, v));
        pages[v as usize].extend((0..PAGES).map(|p| r.host_of(gpa + p * PAGE_SIZE)));
    }
    let topology = Arc::new(SimulatedTopology::new(2, move |page| {
        let host = page * PAGE_SIZE;
        owners
            .iter()
            .find(|(s, e, _)| (*s..*e).contains(&host))
            .map_or(0, |(_, _, v)| 1 - node_of_vcpu(*v))
    }));
    Setup {
        ram,
        topology,
        pages,
    }
}

/// Runs `rounds` rounds: each vCPU thread writes all its pages, then the
/// scanner runs. Returns each round's stats and each vCPU's share of pages
/// on its own node after each round.
fn run(s: &Setup, filter: bool, rounds: u32) -> Vec<(super::scanner::RoundStats, Vec<f64>)> {
    let cfg = ScannerConfig {
        vcpu_node: (0..VCPUS).map(node_of_vcpu).collect(),
        window_pages: 16,
        max_moves: 4096,
        filter_accessors: filter,
        accessor_window: 4,
    };
    let mut scanner = NumaScanner::new(cfg, s.topology.clone());
    let start = Arc::new(Barrier::new(VCPUS as usize + 1));
    let done = Arc::new(Barrier::new(VCPUS as usize + 1));
    let threads: Vec<_> = (0..VCPUS)
        .map(|v| {
            let (ram, start, done) = (s.ram.clone(), start.clone(), done.clone());
            let pages = s.pages[v as usize].clone();
            std::thread::spawn(move || {
                ram.register_vcpu_thread(v);
                for round in 0..=rounds as u64 {
                    start.wait();
                    for h in &pages {
                        // SAFETY: a page of guest RAM's live mapping.
                        unsafe { (*h as *mut u64).write_volatile(round) };
                    }
                    done.wait();
                }
            })
        })
        .collect();
    // Round 0 populates; the scanner runs after each round's writes.
    let mut out = Vec::new();
    for _ in 0..=rounds {
        start.wait();
        done.wait();
        let stats = scanner.round(&s.ram).expect("round");
        let share = s
            .pages
            .iter()
            .enumerate()
            .map(|(v, hosts)| {
                let on = s
                    .topology
                    .nodes_of(hosts)
                    .iter()
                    .filter(|n| **n == Some(node_of_vcpu(v as u32)))
                    .count();
                on as f64 / hosts.len() as f64
            })
            .collect();
        out.push((stats, share));
    }
    for t in threads {
        t.join().expect("vCPU thread");
    }
    out
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
