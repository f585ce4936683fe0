use super::*;
use crate::entry::{Flag, Frame, Marker};
use proptest::prelude::*;
use std::collections::BTreeMap;

/// Collects every non-empty leaf and huge entry of a range.
#[derive(Default)]
struct Collect {
    leaves: BTreeMap<u64, Entry>,
    huge: Vec<(u8, u64)>,
    holes: Vec<(u64, u64)>,
    tables: usize,
}

impl Walker for Collect {
    fn table(&mut self, _level: u8, _s: u64, _e: u64) -> WalkAction {
        self.tables += 1;
        WalkAction::Continue
    }
    fn huge(&mut self, level: u8, start: u64, _entry: Entry) -> WalkAction {
        self.huge.push((level, start));
        WalkAction::Continue
    }
    fn leaf(&mut self, gpa: u64, entry: Entry) -> WalkAction {
        self.leaves.insert(gpa, entry);
        WalkAction::Continue
    }
    fn hole(&mut self, s: u64, e: u64) -> WalkAction {
        self.holes.push((s, e));
        WalkAction::Continue
    }
}

#[test]
fn lazily_allocates_and_frees_tables() {
    let t = Stage2Table::new();
    assert_eq!(t.table_bytes(), TABLE_BYTES);
    t.set(0x1234_5000, Entry::page(Frame(1), true))
        .expect("set");
    // Root + level 2 + level 1 + leaf table.
    assert_eq!(t.table_bytes(), 4 * TABLE_BYTES);
    assert_eq!(t.get(0x1234_5000), Entry::page(Frame(1), true));
    assert_eq!(t.get(0x1234_6000), Entry::EMPTY);
    // A neighbour in the same 2 MiB shares the leaf table.
    t.set(0x1234_6000, Entry::zero_page()).expect("set");
    assert_eq!(t.table_bytes(), 4 * TABLE_BYTES);
    t.free_range(0, 1 << 40);
    assert_eq!(t.table_bytes(), TABLE_BYTES);
    assert_eq!(t.get(0x1234_5000), Entry::EMPTY);
}

#[test]
fn huge_entries_cover_their_range() {
    let t = Stage2Table::new();
    t.set_huge(0x4000_0000, 2, Entry::page(Frame(0), true))
        .expect("1 GiB");
    t.set_huge(0x20_0000, 1, Entry::page(Frame(0x200), false))
        .expect("2 MiB");
    assert!(t.get(0x4123_4000).is_huge());
    assert!(t.get(0x20_1000).is_huge());
    assert_eq!(
        t.set(0x4000_1000, Entry::zero_page()),
        Err(TableError::InHugeEntry(0x4000_1000))
    );
    assert_eq!(
        t.set_huge(0x1000, 1, Entry::zero_page()),
        Err(TableError::BadHuge(0x1000, 1))
    );
    t.set(0x40_0000, Entry::zero_page())
        .expect("4 KiB next to it");
    assert_eq!(
        t.set_huge(0x40_0000, 1, Entry::zero_page()),
        Err(TableError::TableBelow(0x40_0000))
    );
    let mut c = Collect::default();
    t.walk_range(0, 2 << 30, &mut c);
    assert_eq!(c.huge, vec![(1, 0x20_0000), (2, 0x4000_0000)]);
    assert_eq!(c.leaves.len(), 1);
}

#[test]
fn walk_visits_only_populated_subtrees_and_reports_holes() {
    let t = Stage2Table::new();
    for gpa in [0x1000u64, 0x3000, 0x8000_0000, 0x8000_1000] {
        t.set(gpa, Entry::page(Frame(gpa >> 12), true))
            .expect("set");
    }
    let mut c = Collect::default();
    assert_eq!(t.walk_range(0, 4 << 30, &mut c), WalkOutcome::Completed);
    assert_eq!(
        c.leaves.keys().copied().collect::<Vec<_>>(),
        vec![0x1000, 0x3000, 0x8000_0000, 0x8000_1000]
    );
    // Two 1 GiB subtrees entered (levels 2 -> 1 -> 0): 1 root entry + 2 + 2 tables.
    assert_eq!(c.tables, 5);
    assert!(c.holes.contains(&(0x4000_0000, 0x8000_0000)));

    // Stop early.
    struct First(Option<u64>);
    impl Walker for First {
        fn leaf(&mut self, gpa: u64, _e: Entry) -> WalkAction {
            self.0 = Some(gpa);
            WalkAction::Stop
        }
    }
    let mut f = First(None);
    assert_eq!(t.walk_range(0x2000, 4 << 30, &mut f), WalkOutcome::Stopped);
    assert_eq!(f.0, Some(0x3000));

    // Skip a subtree.
    struct SkipLow(usize);
    impl Walker for SkipLow {
        fn table(&mut self, level: u8, start: u64, _e: u64) -> WalkAction {
            if level == 2 && start < 0x4000_0000 {
                WalkAction::Skip
            } else {
                WalkAction::Continue
            }
        }
        fn leaf(&mut self, _gpa: u64, _e: Entry) -> WalkAction {
            self.0 += 1;
            WalkAction::Continue
        }
    }
    let mut s = SkipLow(0);
    t.walk_range(0, 4 << 30, &mut s);
    assert_eq!(s.0, 2);
}

#[test]
fn concurrent_updates_lose_nothing() {
    let t = std::sync::Arc::new(Stage2Table::new());
    let threads: Vec<_> = (0..4u64)
        .map(|i| {
            let t = t.clone();
            std::thread::spawn(move || {
                for n in 0..2000u64 {
                    // All threads share pages: count updates in the frame field.
                    let gpa = (n % 64) << 12 | (i % 2) << 30;
                    t.update(gpa, |e| {
                        let c = e.frame().map_or(0, |f| f.0);
                        Some(Entry::page(Frame(c + 1), true))
                    })
                    .expect("update");
                }
            })
        })
        .collect();
    for th in threads {
        th.join().expect("thread");
    }
    let mut total = 0;
    let mut c = Collect::default();
    t.walk_range(0, 2 << 30, &mut c);
    for e in c.leaves.values() {
        total += e.frame().map_or(0, |f| f.0);
    }
    assert_eq!(total, 4 * 2000);
}

#[derive(Clone, Debug)]
enum Op {
    Map(u64, u64, bool),
    Unmap(u64),
    Protect(u64, u64),
    Unprotect(u64, u64),
    Mark(u64, u8, u64),
    Dirty(u64),
    Walk(u64, u64),
    Free(u64, u64),
}

/// Page numbers in three clusters spread over 8 GiB, so several leaf and
/// upper tables exist.
fn page() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..1024,
        (1u64 << 18)..(1u64 << 18) + 600,
        (2u64 << 20) - 300..(2u64 << 20)
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (page(), 0u64..1 << 30, any::<bool>()).prop_map(|(p, f, w)| Op::Map(p, f, w)),
        1 => page().prop_map(Op::Unmap),
        1 => (page(), 1u64..700).prop_map(|(p, n)| Op::Protect(p, n)),
        1 => (page(), 1u64..700).prop_map(|(p, n)| Op::Unprotect(p, n)),
        1 => (page(), 0u8..3, 0u64..1 << 30).prop_map(|(p, k, x)| Op::Mark(p, k, x)),
        1 => page().prop_map(Op::Dirty),
        1 => (page(), 1u64..5000).prop_map(|(p, n)| Op::Walk(p, n)),
        1 => (page(), 1u64..2000).prop_map(|(p, n)| Op::Free(p, n)),
    ]
}

/// The protect operation both sides apply: rule 11 says the result is never writable.
fn protect(e: Entry) -> Option<Entry> {
    (!e.is_empty() && e.marker_kind().is_none()).then(|| e.write_protected())
}

fn unprotect(e: Entry) -> Option<Entry> {
    e.is_uffd_wp().then(|| e.write_unprotected(true))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn table_agrees_with_an_ordered_map_model(ops in proptest::collection::vec(op(), 1..120)) {
        let t = Stage2Table::new();
        let mut model: BTreeMap<u64, Entry> = BTreeMap::new();
        let apply = |model: &mut BTreeMap<u64, Entry>, p: u64, f: &dyn Fn(Entry) -> Option<Entry>| {
            let cur = model.get(&p).copied().unwrap_or(Entry::EMPTY);
            if let Some(n) = f(cur) {
                if n.is_empty() { model.remove(&p); } else { model.insert(p, n); }
            }
        };
        for op in ops {
            match op {
                Op::Map(p, f, w) => {
                    let e = Entry::page(Frame(f), w);
                    t.set(p << 12, e).expect("set");
                    model.insert(p, e);
                }
                Op::Unmap(p) => {
                    t.clear(p << 12);
                    model.remove(&p);
                }
                Op::Protect(p, n) | Op::Unprotect(p, n) => {
                    let f: fn(Entry) -> Option<Entry> = if matches!(op, Op::Protect(..)) { protect } else { unprotect };
                    for q in p..p + n {
                        if model.contains_key(&q) || t.has_leaf_table(q << 12) {
                            t.update(q << 12, f).expect("update");
                        }
                        apply(&mut model, q, &f);
                    }
                }
                Op::Mark(p, k, x) => {
                    let kind = [Marker::WpUnpopulated, Marker::Poisoned, Marker::Snapshot][k as usize];
                    let e = Entry::marker(kind, x);
                    t.set(p << 12, e).expect("mark");
                    model.insert(p, e);
                }
                Op::Dirty(p) => {
                    let f = |e: Entry| e.is_present().then(|| e.with(Flag::Dirty));
                    if model.contains_key(&p) {
                        t.update(p << 12, f).expect("dirty");
                    }
                    apply(&mut model, p, &f);
                }
                Op::Walk(p, n) => {
                    let mut c = Collect::default();
                    t.walk_range(p << 12, (p + n) << 12, &mut c);
                    let want: BTreeMap<u64, Entry> =
                        model.range(p..p + n).map(|(k, v)| (k << 12, *v)).collect();
                    prop_assert_eq!(c.leaves, want);
                }
                Op::Free(p, n) => {
                    t.free_range(p << 12, (p + n) << 12);
                    let gone: Vec<u64> = model.range(p..p + n).map(|(k, _)| *k).collect();
                    for k in gone { model.remove(&k); }
                }
            }
            // Invariants after every step: rule 11 and agreement on lookups.
            for (p, e) in &model {
                prop_assert_eq!(t.get(p << 12), *e);
                prop_assert!(e.check().is_ok(), "invariant broken: {:?}", e);
            }
        }
        let mut c = Collect::default();
        t.walk_range(0, 1 << 40, &mut c);
        prop_assert_eq!(c.leaves.len(), model.len());
        for e in c.leaves.values() {
            prop_assert!(!(e.is_uffd_wp() && e.is_writable()), "rule 11");
        }
    }
}
