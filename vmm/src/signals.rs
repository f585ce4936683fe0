//! Signals: the kick that interrupts `KVM_RUN`, and the termination signals
//! (Ctrl-C, SIGTERM) that the event loop reads from a signalfd.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Once;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

/// The signal sent to a vCPU thread to make `KVM_RUN` return.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: delivery alone interrupts KVM_RUN with EINTR.
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}

/// Blocks SIGINT and SIGTERM in the calling thread (and so in threads it
/// spawns later), so they are only seen through [`TerminationSignals`].
pub fn block_termination_signals() {
    let set = termination_set();
    // SAFETY: `set` is initialised; the old mask is not needed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// A non-blocking signalfd for SIGINT and SIGTERM.
pub struct TerminationSignals {
    fd: OwnedFd,
}

impl TerminationSignals {
    /// Blocks the signals in this thread and opens the signalfd.
    pub fn new() -> std::io::Result<TerminationSignals> {
        block_termination_signals();
        let set = termination_set();
        // SAFETY: `set` is initialised; -1 asks for a new fd.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(TerminationSignals { fd })
    }

    /// Reads every pending signal; returns how many arrived.
    pub fn drain(&self) -> usize {
        let mut n = 0;
        loop {
            // SAFETY: zeroed siginfo is a valid buffer for signalfd_siginfo.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            // SAFETY: reading into a buffer of exactly `size` bytes.
            let r = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    &mut info as *mut _ as *mut libc::c_void,
                    size,
                )
            };
            if r != size as isize {
                return n;
            }
            n += 1;
        }
    }
}

impl AsRawFd for TerminationSignals {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
