//! The userfaultfd fault engine: handler threads that read fault messages,
//! consult the table, resolve each fault with the right ioctl and record
//! the result (rules 2, 4, 8).
//!
//! A handler thread never touches guest RAM itself: it copies from a private
//! zero buffer and issues ioctls, so it can never fault into its own
//! userfaultfd (which would deadlock).

mod resolve;
pub mod stats;

use crate::core::MemoryCore;
use crate::uffd::sys::UffdMsg;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Running handler threads; stopped and joined on drop.
pub struct FaultEngine {
    stop: Arc<EventFd>,
    threads: Vec<JoinHandle<()>>,
}

impl FaultEngine {
    /// Starts `threads` handler threads on `core`'s userfaultfd.
    pub(crate) fn start(core: Arc<MemoryCore>, threads: usize) -> std::io::Result<FaultEngine> {
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let core = core.clone();
            let stop = stop.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("uffd{i}"))
                    .spawn(move || handler_loop(&core, &stop))?,
            );
        }
        Ok(FaultEngine {
            stop,
            threads: handles,
        })
    }
}

impl Drop for FaultEngine {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                log::error!("a userfaultfd handler thread panicked");
            }
        }
    }
}

fn handler_loop(core: &MemoryCore, stop: &EventFd) {
    let Some(uffd) = core.uffd.as_ref() else {
        return;
    };
    let mut msgs = [UffdMsg::default(); 64];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: polling two descriptors we own, with a correctly sized array.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            log::error!("userfaultfd poll failed: {e}");
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        loop {
            match uffd.read_messages(&mut msgs) {
                Ok(0) => break,
                Ok(n) => {
                    for m in &msgs[..n] {
                        core.handle_message(m);
                    }
                }
                Err(e) => {
                    log::error!("reading userfaultfd messages failed: {e}");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
