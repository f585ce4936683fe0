//! Capturing vCPU state from the vCPU threads themselves (a `VcpuFd` lives
//! on its thread): a capture request bumps an epoch; each vCPU thread, when
//! it parks for the pause that follows, saves its state into its slot first.

use crate::snapshot::state::SavedVcpu;
use guest_mem::LockOrRecover;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A vCPU's capture: the request epoch it answers and the state (or why not).
type Capture = (u64, Result<SavedVcpu, String>);

/// One slot per vCPU for captured state.
#[derive(Debug)]
pub struct CaptureSlots {
    epoch: AtomicU64,
    slots: Mutex<Vec<Option<Capture>>>,
}

impl CaptureSlots {
    /// Slots for `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> CaptureSlots {
        CaptureSlots {
            epoch: AtomicU64::new(0),
            slots: Mutex::new((0..vcpus).map(|_| None).collect()),
        }
    }

    /// Asks every vCPU to capture its state when it next parks; returns the
    /// request's epoch.
    pub fn request(&self) -> u64 {
        self.epoch.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The epoch a vCPU must capture for, if it has not yet.
    pub fn pending(&self, vcpu: u32) -> Option<u64> {
        let epoch = self.epoch.load(Ordering::Acquire);
        let slots = self.slots.lock_or_recover();
        let done = slots
            .get(vcpu as usize)
            .and_then(|s| s.as_ref())
            .map_or(0, |s| s.0);
        (epoch > done).then_some(epoch)
    }

    /// Stores vCPU `vcpu`'s capture for `epoch`.
    pub fn store(&self, vcpu: u32, epoch: u64, state: Result<SavedVcpu, String>) {
        let mut slots = self.slots.lock_or_recover();
        if let Some(s) = slots.get_mut(vcpu as usize) {
            *s = Some((epoch, state));
        }
    }

    /// True when every vCPU has answered request `epoch`.
    pub fn complete(&self, epoch: u64) -> bool {
        let slots = self.slots.lock_or_recover();
        slots
            .iter()
            .all(|s| s.as_ref().is_some_and(|s| s.0 == epoch))
    }

    /// Takes the captures of `epoch`, one per vCPU, in index order.
    pub fn take(&self, epoch: u64) -> Result<Vec<SavedVcpu>, String> {
        let mut slots = self.slots.lock_or_recover();
        let mut out = Vec::with_capacity(slots.len());
        for (v, s) in slots.iter_mut().enumerate() {
            match s.take() {
                Some((e, Ok(state))) if e == epoch => out.push(state),
                Some((_, Err(why))) => return Err(format!("vCPU {v}: {why}")),
                _ => return Err(format!("vCPU {v} did not save its state (it has finished)")),
            }
        }
        Ok(out)
    }
}
