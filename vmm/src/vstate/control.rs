//! Pausing, resuming and stopping vCPU threads.
//!
//! Each vCPU thread passes [`VcpuControl::checkpoint`] before every
//! `KVM_RUN`. To pause, the supervisor sets the request and kicks the
//! threads with a signal (which makes a running `KVM_RUN` return `EINTR`)
//! until every live vCPU has parked at its checkpoint.

use guest_mem::LockOrRecover;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Stop,
}

#[derive(Debug)]
struct State {
    request: Request,
    parked: usize,
    live: usize,
    /// Commands sent so far (wakes vCPUs waiting idle).
    commands: u64,
}

/// Shared run/pause/stop state of a VM's vCPU threads.
#[derive(Debug)]
pub struct VcpuControl {
    state: Mutex<State>,
    changed: Condvar,
}

/// Pausing did not complete.
#[derive(Debug, thiserror::Error)]
#[error("vCPUs did not pause within {0:?} ({1} of {2} parked)")]
pub struct PauseTimeout(pub Duration, pub usize, pub usize);

impl VcpuControl {
    /// Control for `vcpus` threads, all running.
    pub fn new(vcpus: usize) -> VcpuControl {
        VcpuControl {
            state: Mutex::new(State {
                request: Request::Run,
                parked: 0,
                live: vcpus,
                commands: 0,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock_or_recover()
    }

    /// Called by a vCPU thread before each `KVM_RUN`: parks while a pause is
    /// requested; returns false when the thread must stop.
    pub fn checkpoint(&self) -> bool {
        self.checkpoint_with(&mut || {})
    }

    /// Like [`VcpuControl::checkpoint`]; `before_park` runs on the vCPU
    /// thread before it counts as parked (to capture its state).
    pub fn checkpoint_with(&self, before_park: &mut dyn FnMut()) -> bool {
        let mut s = self.lock();
        loop {
            match s.request {
                Request::Run => return true,
                Request::Stop => return false,
                Request::Pause => {
                    drop(s);
                    before_park();
                    s = self.lock();
                    if s.request != Request::Pause {
                        continue;
                    }
                    s.parked += 1;
                    self.changed.notify_all();
                    while s.request == Request::Pause {
                        s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
                        if s.request == Request::Pause {
                            // Still paused: a capture may have been asked
                            // for meanwhile (see `poke`).
                            drop(s);
                            before_park();
                            s = self.lock();
                        }
                    }
                    s.parked -= 1;
                }
            }
        }
    }

    /// True while a pause is asked for.
    pub fn pause_requested(&self) -> bool {
        self.lock().request == Request::Pause
    }

    /// Called by a vCPU thread when it leaves its run loop for good.
    pub fn exited(&self) {
        let mut s = self.lock();
        s.live = s.live.saturating_sub(1);
        self.changed.notify_all();
    }

    /// vCPU threads still in their run loop.
    pub fn live(&self) -> usize {
        self.lock().live
    }

    /// Requests a pause and waits until every live vCPU is parked, calling
    /// `kick` (which interrupts `KVM_RUN`) until they are. Returns how long
    /// it took.
    pub fn pause(&self, kick: impl Fn(), timeout: Duration) -> Result<Duration, PauseTimeout> {
        let start = Instant::now();
        let mut s = self.lock();
        if s.request == Request::Run {
            s.request = Request::Pause;
        }
        // vCPUs waiting idle (outside KVM_RUN) park at once.
        self.changed.notify_all();
        while s.parked < s.live {
            if start.elapsed() > timeout {
                let (parked, live) = (s.parked, s.live);
                s.request = Request::Run;
                self.changed.notify_all();
                return Err(PauseTimeout(timeout, parked, live));
            }
            drop(s);
            kick();
            s = self.lock();
            if s.parked < s.live {
                s = self
                    .changed
                    .wait_timeout(s, Duration::from_micros(200))
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        }
        Ok(start.elapsed())
    }

    /// Says a command word was written: wakes the vCPUs waiting idle.
    pub fn notify_command(&self) {
        let mut s = self.lock();
        s.commands = s.commands.wrapping_add(1);
        self.changed.notify_all();
    }

    /// A vCPU whose guest waits for its next command: returns when
    /// `pending()` says one is there, when one is sent meanwhile
    /// ([`VcpuControl::notify_command`]), on a pause or stop request, or
    /// after `max`. The guest polls again after each return, so the bound
    /// only matters for commands written without a notification.
    pub fn idle_wait(&self, max: Duration, pending: &dyn Fn() -> bool) {
        let deadline = Instant::now() + max;
        let seen = self.lock().commands;
        // Checked after `seen` is read: a command written after the check
        // notifies, one written before it is seen here.
        if pending() {
            return;
        }
        let mut s = self.lock();
        while s.request == Request::Run && s.commands == seen {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            s = self
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Wakes parked vCPUs without releasing them (so they notice a new
    /// capture request).
    pub fn poke(&self) {
        let _s = self.lock();
        self.changed.notify_all();
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        let mut s = self.lock();
        if s.request == Request::Pause {
            s.request = Request::Run;
        }
        self.changed.notify_all();
    }

    /// Makes every vCPU thread leave its run loop at its next checkpoint
    /// (the caller kicks them out of `KVM_RUN`).
    pub fn stop(&self) {
        let mut s = self.lock();
        s.request = Request::Stop;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    #[test]
    fn pause_parks_every_thread_and_resume_releases_them() {
        let ctl = Arc::new(VcpuControl::new(3));
        let stop = Arc::new(AtomicBool::new(false));
        let steps = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let (ctl, stop, steps) = (ctl.clone(), stop.clone(), steps.clone());
                std::thread::spawn(move || {
                    while ctl.checkpoint() && !stop.load(Ordering::Relaxed) {
                        steps.fetch_add(1, Ordering::Relaxed);
                        std::thread::yield_now();
                    }
                    ctl.exited();
                })
            })
            .collect();
        ctl.pause(|| {}, Duration::from_secs(5)).expect("pause");
        let frozen = steps.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(steps.load(Ordering::Relaxed), frozen, "a paused thread ran");
        ctl.resume();
        while steps.load(Ordering::Relaxed) == frozen {
            std::thread::yield_now();
        }
        ctl.stop();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(ctl.live(), 0);
    }

    #[test]
    fn an_idle_wait_ends_on_a_command_a_pause_or_its_bound() {
        let ctl = Arc::new(VcpuControl::new(1));
        let t = Instant::now();
        ctl.idle_wait(Duration::from_millis(30), &|| false);
        assert!(t.elapsed() >= Duration::from_millis(30));
        let t = Instant::now();
        ctl.idle_wait(Duration::from_secs(5), &|| true);
        assert!(t.elapsed() < Duration::from_secs(1), "a pending command");
        for pause in [false, true] {
            let waiter = {
                let ctl = ctl.clone();
                std::thread::spawn(move || {
                    let t = Instant::now();
                    ctl.idle_wait(Duration::from_secs(5), &|| false);
                    let waited = t.elapsed();
                    // Like a vCPU thread: its checkpoint comes next.
                    ctl.checkpoint();
                    waited
                })
            };
            std::thread::sleep(Duration::from_millis(20));
            if pause {
                ctl.pause(|| {}, Duration::from_secs(5)).expect("parked");
                ctl.resume();
            } else {
                ctl.notify_command();
            }
            let waited = waiter.join().expect("waiter");
            assert!(waited < Duration::from_secs(2), "woken: {waited:?}");
        }
    }
}
