//! Locks that outlive a panic elsewhere.
//!
//! A poisoned mutex only says that another thread panicked while holding
//! it. Every structure this workspace guards is changed in single steps
//! (a counter, one map or set operation, one pushed element), so the data
//! is consistent and a VM keeps running rather than cascading the panic
//! into every thread that shares the lock.

use std::sync::{Mutex, MutexGuard};

/// [`Mutex::lock`] that takes over a poisoned lock.
pub trait LockOrRecover<T: ?Sized> {
    /// Locks, recovering the guard from a poisoned lock.
    fn lock_or_recover(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> LockOrRecover<T> for Mutex<T> {
    fn lock_or_recover(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|e| e.into_inner())
    }
}
