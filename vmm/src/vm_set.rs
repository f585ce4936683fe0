//! Building a set of VMs that start together: a fork's children, a
//! snapshot's clones.
//!
//! The VMs are built on as many threads as the host has CPUs (at most one
//! per VM). Each starts its threads as soon as it is built, so that their
//! setup overlaps the building of the others, but its vCPUs wait at a
//! [`StartGate`] before their first `KVM_RUN` until every VM of the set is
//! built: no VM runs guest code while others are still being built. A
//! failure cancels the gate: the VMs started so far stop without running
//! and are joined, and nothing of the set is left (rule 7).

use crate::config::VmConfig;
use crate::report::{RunReport, VmOutcome};
use crate::runner::{prepare_process, supervise, Machine, RunError, RunHooks, SerialSink};
use crate::vstate::start_gate::{GateGuard, StartGate};
use guest_mem::{GuestRam, LockOrRecover};
use guest_protocol::CommandOp;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

/// Builds `count` VMs with `build(i)` and starts each with
/// `start(i, vm, gate)` on the thread that built it. Returns the started
/// VMs in index order and the guard that opens their gate (the caller
/// opens it, after measuring what it needs of the set before it runs).
/// On a failure, cancels the gate, hands every VM started so far to
/// `join`, and returns the error (the lowest index's, when several
/// failed).
pub fn build_set<M, T: Send>(
    count: u32,
    build: impl Fn(u32) -> Result<M, RunError> + Sync,
    start: impl Fn(u32, M, &Arc<StartGate>) -> Result<T, RunError> + Sync,
    mut join: impl FnMut(T),
) -> Result<(Vec<T>, GateGuard), RunError> {
    let (gate, guard) = StartGate::new();
    let next = AtomicU32::new(0);
    let failed = AtomicBool::new(false);
    let slots: Vec<Mutex<Option<Result<T, RunError>>>> =
        (0..count).map(|_| Mutex::new(None)).collect();
    let worker = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= count || failed.load(Ordering::Relaxed) {
            return;
        }
        let result = build(i).and_then(|vm| start(i, vm, &gate));
        if result.is_err() {
            failed.store(true, Ordering::Relaxed);
        }
        *slots[i as usize].lock_or_recover() = Some(result);
    };
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(count as usize);
    std::thread::scope(|s| {
        // This thread is one of the builders; a helper that cannot be
        // started only leaves more for the others.
        for _ in 1..workers {
            let helper = std::thread::Builder::new()
                .name("vm-builder".into())
                .spawn_scoped(s, worker);
            if helper.is_err() {
                break;
            }
        }
        worker();
    });
    let mut started = Vec::with_capacity(count as usize);
    let mut error = None;
    for slot in slots {
        match slot.into_inner().unwrap_or_else(PoisonError::into_inner) {
            Some(Ok(vm)) => started.push(vm),
            Some(Err(e)) => {
                error.get_or_insert(e);
            }
            // Not built: another one failed first.
            None => {}
        }
    }
    match error {
        None => Ok((started, guard)),
        Some(e) => {
            drop(guard);
            started.into_iter().for_each(&mut join);
            Err(e)
        }
    }
}

/// How the VMs of one set start.
pub struct SetStart<'a> {
    /// A VM's thread is named this and its index ("fork3").
    pub thread_name: &'static str,
    /// A VM is called this and its index in errors ("fork child 3").
    pub label: &'static str,
    /// Every VM's configuration.
    pub config: &'a VmConfig,
    /// When the set was asked for: its VMs' times count from here.
    pub since: Instant,
}

impl SetStart<'_> {
    /// Starts `machine` as VM `index` on its own thread: `supervise` with
    /// `hooks` and its vCPUs held at `gate`, serial output captured,
    /// `initial` its first command; `setup_us` is what the caller counts
    /// as its setup.
    pub fn start(
        &self,
        index: u32,
        machine: Machine,
        setup_us: u64,
        hooks: RunHooks,
        gate: &Arc<StartGate>,
        initial: Option<(CommandOp, u64)>,
    ) -> Result<StartedVm, RunError> {
        let created_after_us = machine.created.duration_since(self.since).as_micros() as u64;
        let ram = machine.ram.clone();
        let config = self.config.clone();
        let hooks = hooks.start_gate(gate.clone());
        let signals = prepare_process()?;
        let thread = std::thread::Builder::new()
            .name(format!("{}{index}", self.thread_name))
            .spawn(move || {
                supervise(
                    &config,
                    machine,
                    hooks,
                    SerialSink::Capture,
                    signals,
                    initial,
                )
            })
            .map_err(|e| RunError::Runtime(format!("cannot start {} {index}: {e}", self.label)))?;
        Ok(StartedVm {
            index,
            label: self.label,
            setup_us,
            created_after_us,
            ram,
            thread,
        })
    }
}

/// A VM of a set, running on its own thread.
pub struct StartedVm {
    /// Its index in the set.
    pub index: u32,
    label: &'static str,
    setup_us: u64,
    created_after_us: u64,
    ram: Arc<GuestRam>,
    thread: JoinHandle<Result<RunReport, RunError>>,
}

/// A VM of a set whose run ended.
pub struct EndedVm {
    /// Its index in the set.
    pub index: u32,
    /// What its caller counted as its setup, µs.
    pub setup_us: u64,
    /// µs from the set's request to its first `KVM_RUN`.
    pub first_run_us: Option<u64>,
    /// µs from the set's request to its first I/O exit.
    pub first_io_us: Option<u64>,
    /// How it ended and what it shares.
    pub outcome: VmOutcome,
    /// Its memory: the caller reads what it needs, then drops it.
    pub ram: Arc<GuestRam>,
}

impl StartedVm {
    /// Waits for its run to end.
    pub fn wait(self) -> EndedVm {
        let result = self.thread.join().unwrap_or_else(|_| {
            Err(RunError::Runtime(format!(
                "{} {} panicked",
                self.label, self.index
            )))
        });
        let outcome = VmOutcome::of(result, &self.ram);
        let since_request = |us: Option<u64>| us.map(|b| self.created_after_us + b);
        EndedVm {
            index: self.index,
            setup_us: self.setup_us,
            first_run_us: since_request(outcome.first_run_us),
            first_io_us: since_request(outcome.boot_us),
            outcome,
            ram: self.ram,
        }
    }

    /// Waits for it, discarding its report (a set that failed).
    pub fn discard(self) {
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_vm_is_started_in_index_order_behind_one_gate() {
        let (started, guard) = build_set(
            5,
            |i| Ok(i * 10),
            |i, vm, gate| Ok((i, vm, gate.clone())),
            |_| panic!("nothing to join"),
        )
        .expect("built");
        assert_eq!(
            started
                .iter()
                .map(|(i, vm, _)| (*i, *vm))
                .collect::<Vec<_>>(),
            [(0, 0), (1, 10), (2, 20), (3, 30), (4, 40)]
        );
        let gate = started[0].2.clone();
        assert!(started.iter().all(|(_, _, g)| Arc::ptr_eq(g, &gate)));
        guard.open();
        assert!(gate.wait());
    }

    #[test]
    fn a_failure_cancels_the_gate_and_joins_every_started_vm() {
        let joined = Mutex::new(Vec::new());
        let gates = Mutex::new(Vec::new());
        let e = build_set(
            6,
            |i| {
                if i == 3 {
                    Err(RunError::Runtime(format!("vm {i} failed")))
                } else {
                    Ok(i)
                }
            },
            |i, _, gate| {
                gates.lock_or_recover().push(gate.clone());
                Ok(i)
            },
            |i| joined.lock_or_recover().push(i),
        )
        .map(|_| ())
        .expect_err("the set failed");
        assert_eq!(
            e.to_string(),
            RunError::Runtime("vm 3 failed".into()).to_string()
        );
        let joined = joined.into_inner().expect("lock");
        let started = gates.into_inner().expect("lock");
        // Every VM started was joined; 0-2 were, whatever ran on the other
        // builder; 3 never started.
        assert_eq!(joined.len(), started.len());
        assert!([0, 1, 2].iter().all(|i| joined.contains(i)), "{joined:?}");
        assert!(!joined.contains(&3));
        assert!(started.iter().all(|g| !g.wait()), "the gate was cancelled");
    }
}
