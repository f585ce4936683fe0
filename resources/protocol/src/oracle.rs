//! The consistency oracle: replays a vCPU's schedule up to its cursor and
//! counts the pages of its range whose word differs from the last write the
//! schedule made to them.
//!
//! The guest runs it on its own memory (with its scratch area as `expected`);
//! the VMM runs the same code on a live VM's RAM or a memory image.

use crate::boot_info::{VcpuState, Workload};
use crate::schedule::{word, PassSteps, ScheduleParams, Step};

/// The one write that may or may not be in place: the step at the cursor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingWrite {
    /// Page index in the vCPU's range.
    pub page: u64,
    /// The word the store writes.
    pub word: u64,
}

/// The first pass whose writes can still be visible at `cursor`.
fn first_visible_pass(params: &ScheduleParams, cursor: u64) -> u64 {
    match params.workload {
        // A complete seq-write pass overwrites every page.
        Workload::SeqWrite => (cursor / params.pages).saturating_sub(1),
        _ => 0,
    }
}

/// Fills `expected[p]` (for `p < params.pages`) with the word page `p` of
/// vCPU `vcpu` must hold once the steps before `state.cursor` are done (0 for
/// never written) and returns the write at the cursor, if the step there is
/// a write.
pub fn replay_expected(
    params: &ScheduleParams,
    vcpu: u64,
    state: &VcpuState,
    expected: &mut [u64],
) -> Option<PendingWrite> {
    for e in expected.iter_mut() {
        *e = 0;
    }
    if params.pages == 0 || params.workload == Workload::Idle {
        return None;
    }
    let cursor = state.cursor.min(params.total_steps());
    let last_pass = cursor / params.pages;
    let mut pass = first_visible_pass(params, cursor);
    while pass <= last_pass {
        let seed = state.seed_for_pass(pass);
        let mut steps = PassSteps::new(params, vcpu, pass, seed);
        let end = if pass == last_pass {
            cursor % params.pages
        } else {
            params.pages
        };
        for _ in 0..end {
            if let Step::Write { page } = steps.step() {
                if let Some(slot) = expected.get_mut(page as usize) {
                    *slot = word(seed, vcpu, pass, page);
                }
            }
        }
        if pass == last_pass {
            if cursor >= params.total_steps() {
                return None;
            }
            return match steps.step() {
                Step::Write { page } => Some(PendingWrite {
                    page,
                    word: word(seed, vcpu, pass, page),
                }),
                _ => None,
            };
        }
        if params.workload == Workload::Read && pass == 0 {
            // Only pass 0 of `read` writes.
            return None;
        }
        pass += 1;
    }
    None
}

/// Counts the pages whose word (`read_word(page)`) is neither the expected
/// one nor, for the pending page, the pending write's word.
pub fn count_mismatches(
    expected: &[u64],
    pending: Option<PendingWrite>,
    mut read_word: impl FnMut(u64) -> u64,
) -> u64 {
    let mut mismatches = 0;
    for (page, want) in expected.iter().enumerate() {
        let page = page as u64;
        let got = read_word(page);
        let ok = got == *want || matches!(pending, Some(p) if p.page == page && p.word == got);
        if !ok {
            mismatches += 1;
        }
    }
    mismatches
}

/// Replays and counts in one call: the number of pages of vCPU `vcpu`'s range
/// that differ. `expected` must hold at least `params.pages` entries.
pub fn verify_vcpu(
    params: &ScheduleParams,
    vcpu: u64,
    state: &VcpuState,
    expected: &mut [u64],
    read_word: impl FnMut(u64) -> u64,
) -> u64 {
    let n = (params.pages as usize).min(expected.len());
    let pending = replay_expected(params, vcpu, state, &mut expected[..n]);
    count_mismatches(&expected[..n], pending, read_word)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec;
    use std::vec::Vec;

    /// Runs the schedule of one vCPU against a plain array, the way the
    /// guest does: store, then advance the cursor.
    fn run(params: &ScheduleParams, state: &mut VcpuState, mem: &mut [u64], steps: u64) {
        for _ in 0..steps {
            let pass = state.cursor / params.pages;
            let seed = state.seed_for_pass(pass);
            let mut s = PassSteps::new(params, 0, pass, seed);
            s.skip_to(state.cursor % params.pages);
            if let Step::Write { page } = s.step() {
                mem[page as usize] = word(seed, 0, pass, page);
            }
            state.cursor += 1;
        }
    }

    fn params(workload: Workload) -> ScheduleParams {
        ScheduleParams {
            workload,
            vcpus: 1,
            pages: 32,
            passes: 4,
            write_ratio: 60,
            remote_reads: None,
            numa: crate::numa::NumaLayout::single(1 << 30),
        }
    }

    #[test]
    fn clean_runs_verify_at_every_cursor() {
        for w in [
            Workload::SeqWrite,
            Workload::RandWrite,
            Workload::Read,
            Workload::Mixed,
        ] {
            let p = params(w);
            let mut state = VcpuState::new(42);
            let mut mem = vec![0u64; 32];
            let mut scratch = vec![0u64; 32];
            for k in 0..p.total_steps() {
                if k == 50 {
                    assert!(state.push_seed(1234, p.pages));
                }
                assert_eq!(
                    verify_vcpu(&p, 0, &state, &mut scratch, |i| mem[i as usize]),
                    0,
                    "{w:?} at {k}"
                );
                run(&p, &mut state, &mut mem, 1);
            }
            assert_eq!(
                verify_vcpu(&p, 0, &state, &mut scratch, |i| mem[i as usize]),
                0
            );
        }
    }

    #[test]
    fn pending_write_may_be_in_place() {
        let p = params(Workload::SeqWrite);
        let mut state = VcpuState::new(1);
        let mut mem = vec![0u64; 32];
        run(&p, &mut state, &mut mem, 5);
        // The store of step 5 landed, the cursor increment did not.
        mem[5] = word(1, 0, 0, 5);
        let mut scratch = vec![0u64; 32];
        assert_eq!(
            verify_vcpu(&p, 0, &state, &mut scratch, |i| mem[i as usize]),
            0
        );
    }

    #[test]
    fn corruption_and_stale_pages_are_counted() {
        for w in [Workload::SeqWrite, Workload::RandWrite, Workload::Mixed] {
            let p = params(w);
            let mut state = VcpuState::new(9);
            let mut mem = vec![0u64; 32];
            run(&p, &mut state, &mut mem, 70);
            let mut scratch = vec![0u64; 32];
            let written: Vec<usize> = (0..32).filter(|i| mem[*i] != 0).collect();
            let victim = written[written.len() / 2];
            mem[victim] ^= 1;
            assert_eq!(
                verify_vcpu(&p, 0, &state, &mut scratch, |i| mem[i as usize]),
                1,
                "{w:?}"
            );
        }
        // A page written in an older pass (a stale page) is caught too.
        let p = params(Workload::SeqWrite);
        let mut state = VcpuState::new(9);
        let mut mem = vec![0u64; 32];
        run(&p, &mut state, &mut mem, 40);
        mem[3] = word(9, 0, 0, 3);
        let mut scratch = vec![0u64; 32];
        assert_eq!(
            verify_vcpu(&p, 0, &state, &mut scratch, |i| mem[i as usize]),
            1
        );
    }
}
