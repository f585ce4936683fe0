//! A gate that holds a VM's vCPU threads before their first `KVM_RUN`.
//!
//! A fork starts each child's threads as soon as its machine is built, so
//! that their setup overlaps the building of the next child, but no child
//! runs guest code before every child exists: the gate opens once all are
//! built, and a failure cancels it (rule 7: the children are dropped
//! without having run). Once open, the gate also lets its members answer
//! in turn: a vCPU that made its first I/O exit waits (off the CPU, for a
//! bounded time) until every member has made its own, so on a host with
//! fewer CPUs than members no member's first answer queues behind the
//! others' later work.

use guest_mem::LockOrRecover;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GateState {
    Closed,
    Open,
    Cancelled,
}

#[derive(Debug)]
struct Gate {
    state: GateState,
    /// vCPU threads that waited at the gate.
    members: usize,
    /// Members that made their first I/O exit.
    answered: usize,
    /// When the last of them did.
    last_answer: Option<Instant>,
}

/// Holds vCPU threads until it is opened or cancelled.
#[derive(Debug)]
pub struct StartGate {
    gate: Mutex<Gate>,
    changed: Condvar,
}

impl StartGate {
    /// A closed gate, and the guard that opens or cancels it: dropping the
    /// guard without [`GateGuard::open`] cancels the gate, so no error
    /// path leaves threads waiting.
    pub fn new() -> (Arc<StartGate>, GateGuard) {
        let gate = Arc::new(StartGate {
            gate: Mutex::new(Gate {
                state: GateState::Closed,
                members: 0,
                answered: 0,
                last_answer: None,
            }),
            changed: Condvar::new(),
        });
        (gate.clone(), GateGuard(gate))
    }

    /// Joins the gate's members and waits until it opens (true) or is
    /// cancelled (false).
    pub fn wait(&self) -> bool {
        let mut g = self.gate.lock_or_recover();
        g.members += 1;
        while g.state == GateState::Closed {
            g = self
                .changed
                .wait(g)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        g.state == GateState::Open
    }

    /// A member made its first I/O exit: waits until every member has,
    /// or no member has for `limit` (members that take long to answer hold
    /// the others no longer than that; a large set still answering keeps
    /// them waiting).
    pub fn answered(&self, limit: Duration) {
        let mut g = self.gate.lock_or_recover();
        g.answered += 1;
        g.last_answer = Some(Instant::now());
        self.changed.notify_all();
        while g.answered < g.members {
            let deadline = g.last_answer.unwrap_or_else(Instant::now) + limit;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            g = self
                .changed
                .wait_timeout(g, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    fn settle(&self, to: GateState) {
        let mut g = self.gate.lock_or_recover();
        if g.state == GateState::Closed {
            g.state = to;
        }
        self.changed.notify_all();
    }
}

/// Opens its gate, or cancels it when dropped unopened.
#[derive(Debug)]
pub struct GateGuard(Arc<StartGate>);

impl GateGuard {
    /// Lets every waiting thread run.
    pub fn open(self) {
        self.0.settle(GateState::Open);
    }
}

impl Drop for GateGuard {
    fn drop(&mut self) {
        self.0.settle(GateState::Cancelled);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiters(gate: &Arc<StartGate>, n: usize) -> Vec<std::thread::JoinHandle<bool>> {
        (0..n)
            .map(|_| {
                let g = gate.clone();
                std::thread::spawn(move || g.wait())
            })
            .collect()
    }

    #[test]
    fn opening_releases_every_waiter_and_later_ones_pass() {
        let (gate, guard) = StartGate::new();
        let threads = waiters(&gate, 3);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(threads.iter().all(|t| !t.is_finished()));
        guard.open();
        for t in threads {
            assert!(t.join().expect("waiter"));
        }
        assert!(gate.wait());
    }

    /// An open gate two members passed.
    fn opened_with_two_members() -> Arc<StartGate> {
        let (gate, guard) = StartGate::new();
        let threads = waiters(&gate, 2);
        while gate.gate.lock_or_recover().members < 2 {
            std::thread::yield_now();
        }
        guard.open();
        for t in threads {
            assert!(t.join().expect("waiter"));
        }
        gate
    }

    #[test]
    fn members_answer_in_turn_and_a_slow_one_holds_the_rest_no_longer_than_the_limit() {
        let gate = opened_with_two_members();
        // The first to answer waits for the second.
        let g = gate.clone();
        let first = std::thread::spawn(move || {
            let t = Instant::now();
            g.answered(Duration::from_secs(10));
            t.elapsed()
        });
        std::thread::sleep(Duration::from_millis(30));
        assert!(!first.is_finished());
        gate.answered(Duration::from_secs(10));
        assert!(first.join().expect("first") >= Duration::from_millis(30));
        // A member that never answers holds the others only until no
        // answer came for the limit.
        let gate = opened_with_two_members();
        let t = Instant::now();
        gate.answered(Duration::from_millis(20));
        let waited = t.elapsed();
        assert!(waited >= Duration::from_millis(20) && waited < Duration::from_secs(5));
    }

    #[test]
    fn a_dropped_guard_cancels_the_gate() {
        let (gate, guard) = StartGate::new();
        let threads = waiters(&gate, 2);
        drop(guard);
        for t in threads {
            assert!(!t.join().expect("waiter"));
        }
        assert!(!gate.wait());
    }
}
