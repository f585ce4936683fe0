//! The deterministic schedule of page steps of every workload, and the word a
//! page store writes.
//!
//! A vCPU's step `k` (its cursor) is step `k % pages` of pass `k / pages`.
//! What the step does depends only on the workload, the vCPU id, the pass, the
//! seed that pass uses (from the vCPU's seed history) and, for `mixed`, the
//! write ratio — so the schedule can be replayed by the guest, by the VMM, and
//! after a snapshot, restore or fork.

use crate::boot_info::Workload;
use crate::layout::WorkArea;
use crate::numa::NumaLayout;

/// What one step of the schedule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Store the pass's word at the start of the vCPU's own page `page`.
    Write {
        /// Page index in the vCPU's own range.
        page: u64,
    },
    /// Load the word of page `page` of vCPU `vcpu`'s range.
    Read {
        /// Whose range.
        vcpu: u64,
        /// Page index in that range.
        page: u64,
        /// The read must see the word pass 0 wrote (`read` workload);
        /// false when any value is fine.
        expect_from_pass0: bool,
    },
    /// Nothing (idle).
    Nothing,
}

/// The parameters a schedule depends on, besides the seed history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScheduleParams {
    /// The workload.
    pub workload: Workload,
    /// Number of vCPUs.
    pub vcpus: u64,
    /// Pages per vCPU (> 0).
    pub pages: u64,
    /// Passes.
    pub passes: u64,
    /// Percent of writes in `mixed`.
    pub write_ratio: u64,
    /// Percent of `mixed`'s reads that target another node's vCPUs (the
    /// rest read from the own node's); `None`: reads pick any vCPU.
    pub remote_reads: Option<u64>,
    /// The guest's NUMA topology.
    pub numa: NumaLayout,
}

impl ScheduleParams {
    /// Steps in the whole workload.
    pub fn total_steps(&self) -> u64 {
        match self.workload {
            Workload::Idle => 0,
            _ => self.pages.saturating_mul(self.passes),
        }
    }

    /// Where the work pages lie.
    pub fn work_area(&self) -> WorkArea {
        WorkArea::new(self.vcpus, self.pages, self.numa)
    }

    /// The vCPU whose range a `mixed` read with random bits `r` targets.
    #[inline(never)]
    fn read_target(&self, vcpu: u64, r: u64) -> u64 {
        let vcpus = self.vcpus.max(1);
        let Some(remote) = self.remote_reads else {
            return (r >> 32) % vcpus;
        };
        let node = self.numa.node_of_vcpu(vcpu);
        let local = self.numa.vcpus_on(node, vcpus);
        let far = ((r >> 16) & 0xffff) % 100 < remote && local < vcpus;
        let count = if far { vcpus - local } else { local.max(1) };
        let nth = (r >> 32) % count;
        self.numa
            .nth_vcpu(nth, vcpus, |n| (n == node) != far)
            .unwrap_or(vcpu)
    }
}

/// xorshift64 (Marsaglia), never zero.
#[derive(Clone, Copy, Debug)]
pub struct XorShift64(u64);

impl XorShift64 {
    /// A generator for one pass of one vCPU.
    pub fn for_pass(seed: u64, vcpu: u64, pass: u64) -> XorShift64 {
        let mut x = mix(seed ^ mix(vcpu.wrapping_add(0x9e37_79b9_7f4a_7c15) ^ mix(pass)));
        if x == 0 {
            x = 0x2545_f491_4f6c_dd1d;
        }
        XorShift64(x)
    }

    /// The next value.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// splitmix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The word a store of (seed, vCPU, pass, page) writes. Bit 63 is always set,
/// so a written page never reads as zero; then 15 bits of seed, 8 of vCPU,
/// 16 of pass and 24 of page index.
pub const fn word(seed: u64, vcpu: u64, pass: u64, page: u64) -> u64 {
    (1 << 63)
        | ((seed & 0x7fff) << 48)
        | ((vcpu & 0xff) << 40)
        | ((pass & 0xffff) << 24)
        | (page & 0xff_ffff)
}

/// Iterates the steps of one pass of one vCPU, in order.
pub struct PassSteps<'a> {
    params: &'a ScheduleParams,
    rng: XorShift64,
    vcpu: u64,
    pass: u64,
    index: u64,
}

impl<'a> PassSteps<'a> {
    /// The steps of pass `pass` of vCPU `vcpu`, which uses `seed`.
    pub fn new(params: &'a ScheduleParams, vcpu: u64, pass: u64, seed: u64) -> PassSteps<'a> {
        PassSteps {
            params,
            rng: XorShift64::for_pass(seed, vcpu, pass),
            vcpu,
            pass,
            index: 0,
        }
    }

    /// Skips to step `index` of the pass (random workloads replay the
    /// generator up to it).
    pub fn skip_to(&mut self, index: u64) {
        while self.index < index {
            self.step();
        }
    }

    /// The next step of the pass (`Nothing` once the pass is over).
    /// Inlined: it runs once per page step, and a call costs the guest
    /// (whose instructions are emulated here) more than the step itself.
    #[inline(always)]
    pub fn step(&mut self) -> Step {
        let p = &self.params;
        if self.index >= p.pages {
            return Step::Nothing;
        }
        let i = self.index;
        self.index += 1;
        match p.workload {
            Workload::SeqWrite | Workload::Io => Step::Write { page: i },
            Workload::RandWrite => Step::Write {
                page: self.rng.next() % p.pages,
            },
            Workload::Read if self.pass == 0 => Step::Write { page: i },
            Workload::Read => Step::Read {
                vcpu: self.vcpu,
                page: i,
                expect_from_pass0: true,
            },
            Workload::Mixed => {
                let r1 = self.rng.next();
                let r2 = self.rng.next();
                if r2 % 100 < p.write_ratio {
                    Step::Write { page: r1 % p.pages }
                } else {
                    Step::Read {
                        vcpu: p.read_target(self.vcpu, r2),
                        page: r1 % p.pages,
                        expect_from_pass0: false,
                    }
                }
            }
            Workload::Idle => Step::Nothing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(workload: Workload) -> ScheduleParams {
        ScheduleParams {
            workload,
            vcpus: 2,
            pages: 16,
            passes: 3,
            write_ratio: 50,
            remote_reads: None,
            numa: NumaLayout::single(1 << 30),
        }
    }

    #[test]
    fn words_are_never_zero_and_distinct() {
        assert_ne!(word(0, 0, 0, 0), 0);
        assert_ne!(word(1, 0, 0, 0), word(2, 0, 0, 0));
        assert_ne!(word(1, 0, 1, 0), word(1, 0, 2, 0));
        assert_ne!(word(1, 1, 1, 0), word(1, 0, 1, 0));
    }

    #[test]
    fn seq_write_visits_every_page() {
        let p = params(Workload::SeqWrite);
        let mut s = PassSteps::new(&p, 0, 0, 1);
        for i in 0..16 {
            assert_eq!(s.step(), Step::Write { page: i });
        }
        assert_eq!(s.step(), Step::Nothing);
    }

    #[test]
    fn read_writes_first_then_reads() {
        let p = params(Workload::Read);
        let mut s = PassSteps::new(&p, 1, 0, 1);
        assert_eq!(s.step(), Step::Write { page: 0 });
        let mut s = PassSteps::new(&p, 1, 1, 1);
        assert_eq!(
            s.step(),
            Step::Read {
                vcpu: 1,
                page: 0,
                expect_from_pass0: true
            }
        );
    }

    #[test]
    fn random_schedules_depend_on_seed_vcpu_and_pass() {
        let p = params(Workload::RandWrite);
        let collect = |vcpu, pass, seed| {
            let mut s = PassSteps::new(&p, vcpu, pass, seed);
            let mut v = [0u64; 16];
            for x in v.iter_mut() {
                if let Step::Write { page } = s.step() {
                    *x = page;
                }
            }
            v
        };
        assert_eq!(collect(0, 0, 1), collect(0, 0, 1));
        assert_ne!(collect(0, 0, 1), collect(0, 0, 2));
        assert_ne!(collect(0, 0, 1), collect(1, 0, 1));
        assert_ne!(collect(0, 0, 1), collect(0, 1, 1));
    }

    #[test]
    fn remote_reads_target_the_other_node() {
        let numa = NumaLayout::new(&[1 << 30, 1 << 30], &[0, 0, 1, 1]).unwrap();
        for (remote, want_far) in [(0, false), (100, true)] {
            let p = ScheduleParams {
                vcpus: 4,
                write_ratio: 0,
                remote_reads: Some(remote),
                numa,
                ..params(Workload::Mixed)
            };
            let mut s = PassSteps::new(&p, 1, 0, 3);
            let mut seen = [false; 4];
            for _ in 0..16 {
                let Step::Read { vcpu, .. } = s.step() else {
                    panic!("a read")
                };
                assert_eq!(numa.node_of_vcpu(vcpu) != 0, want_far);
                seen[vcpu as usize] = true;
            }
            assert_eq!(seen.iter().filter(|x| **x).count(), 2);
        }
    }

    #[test]
    fn mixed_respects_write_ratio_bounds() {
        for (ratio, want_writes) in [(0, false), (100, true)] {
            let p = ScheduleParams {
                write_ratio: ratio,
                ..params(Workload::Mixed)
            };
            let mut s = PassSteps::new(&p, 0, 0, 3);
            for _ in 0..16 {
                let st = s.step();
                assert_eq!(matches!(st, Step::Write { .. }), want_writes);
            }
        }
    }
}
