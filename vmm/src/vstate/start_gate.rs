//! A gate that holds a VM's vCPU threads before their first `KVM_RUN`.
//!
//! A fork starts each child's threads as soon as its machine is built, so
//! that their setup overlaps the building of the next child, but no child
//! runs guest code before every child exists: the gate opens once all are
//! built, and a failure cancels it (rule 7: the children are dropped
//! without having run).

use guest_mem::LockOrRecover;
use std::sync::{Arc, Condvar, Mutex};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GateState {
    Closed,
    Open,
    Cancelled,
}

/// Holds vCPU threads until it is opened or cancelled.
#[derive(Debug)]
pub struct StartGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

impl StartGate {
    /// A closed gate, and the guard that opens or cancels it: dropping the
    /// guard without [`GateGuard::open`] cancels the gate, so no error
    /// path leaves threads waiting.
    pub fn new() -> (Arc<StartGate>, GateGuard) {
        let gate = Arc::new(StartGate {
            state: Mutex::new(GateState::Closed),
            changed: Condvar::new(),
        });
        (gate.clone(), GateGuard(gate))
    }

    /// Waits until the gate opens (true) or is cancelled (false).
    pub fn wait(&self) -> bool {
        let mut s = self.state.lock_or_recover();
        while *s == GateState::Closed {
            s = self
                .changed
                .wait(s)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        *s == GateState::Open
    }

    fn settle(&self, to: GateState) {
        let mut s = self.state.lock_or_recover();
        if *s == GateState::Closed {
            *s = to;
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
