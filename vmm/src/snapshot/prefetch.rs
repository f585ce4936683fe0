//! A lazy (`uffd`) restore's prefetch: the pages the vCPUs need before they
//! can run are copied in first, the rest of the recorded working set
//! follows in the background, in the guest's first-touch order, while the
//! guest runs and demand faults serve whatever it reaches first.

use super::chain::Chain;
use super::state::{execution_chunks, CHUNK_BYTES};
use super::SnapshotError;
use crate::runner::RunError;
use guest_mem::GuestRam;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Pages copied per `UFFDIO_COPY` by the background prefetch (and between
/// two looks at its stop flag).
const BATCH_PAGES: u64 = 64;
const PAGE: u64 = 4096;

/// Copies the data pages of the vCPUs' execution chunks straight from the
/// snapshot before the vCPUs run: KVM here cannot take a userfaultfd fault
/// on an instruction fetch, and the page tables, stack and descriptor
/// tables are needed at once anyway. Returns the guest page numbers
/// copied (holes stay to demand-fault as zeros).
pub fn prefetch_execution(ram: &GuestRam, chain: &Chain) -> Result<Vec<u64>, RunError> {
    let state = &chain.head().state;
    let mut pages = Vec::new();
    for c in execution_chunks(&state.vcpus, state.machine.mem_bytes) {
        pages.extend(
            chain
                .data_pages_in(c * CHUNK_BYTES, (c + 1) * CHUNK_BYTES)
                .map_err(SnapshotError::from)?,
        );
    }
    pages.sort_unstable();
    pages.dedup();
    let gpas: Vec<u64> = pages.iter().map(|p| p * PAGE).collect();
    for (start, end) in guest_mem::tracking::runs(&gpas) {
        ram.prefill(start, end).map_err(|e| {
            RunError::from(SnapshotError::Memory(super::memory::MemoryFileError::Io(
                std::io::Error::other(format!("the snapshot's working set cannot be served: {e}")),
            )))
        })?;
    }
    Ok(pages)
}

/// The background half of the prefetch.
pub struct BackgroundPrefetch {
    stop: Arc<AtomicBool>,
    pages: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl BackgroundPrefetch {
    /// Starts copying `order` (guest page numbers, first touch first;
    /// pages present already are skipped) into `ram`. A chunk that fails
    /// its checksum is poisoned by the fault engine and reported in
    /// `failure`, which stops the guest.
    pub fn start(
        ram: Arc<GuestRam>,
        order: Vec<u64>,
        failure: Arc<Mutex<Option<String>>>,
    ) -> Result<BackgroundPrefetch, RunError> {
        let stop = Arc::new(AtomicBool::new(false));
        let pages = Arc::new(AtomicU64::new(0));
        let (stop2, pages2) = (stop.clone(), pages.clone());
        let gpas: Vec<u64> = order.iter().map(|p| p * PAGE).collect();
        let thread = std::thread::Builder::new()
            .name("prefetch".into())
            .spawn(move || {
                lower_priority();
                for (start, end) in guest_mem::tracking::runs(&gpas) {
                    let mut at = start;
                    while at < end {
                        if stop2.load(Ordering::Relaxed) {
                            return;
                        }
                        let to = end.min(at + BATCH_PAGES * PAGE);
                        match ram.prefill(at, to) {
                            Ok(n) => {
                                pages2.fetch_add(n, Ordering::Relaxed);
                            }
                            Err(e) => {
                                if let Ok(mut f) = failure.lock() {
                                    f.get_or_insert(format!("snapshot {e}"));
                                }
                                return;
                            }
                        }
                        at = to;
                    }
                }
            })
            .map_err(|e| RunError::Runtime(format!("cannot start the prefetch: {e}")))?;
        Ok(BackgroundPrefetch {
            stop,
            pages,
            thread: Some(thread),
        })
    }

    /// Stops the prefetch (if still running) and returns the pages it
    /// copied.
    pub fn finish(mut self) -> u64 {
        self.halt();
        self.pages.load(Ordering::Relaxed)
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for BackgroundPrefetch {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Makes the calling thread yield to the vCPUs and the fault handlers: a
/// background job must not delay the guest it works for.
pub fn lower_priority() {
    // SAFETY: setpriority on this thread's own id (Linux nice values are
    // per thread); failure only leaves the priority as it was.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10);
    }
}
