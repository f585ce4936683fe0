//! A userfaultfd: opening it (with a clear error when the host forbids it),
//! the API handshake, registration and the resolving ioctls.

pub mod sys;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use sys::*;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;

/// userfaultfd failures.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// The kernel has no userfaultfd.
    #[error("userfaultfd is not available: the kernel was built without CONFIG_USERFAULTFD (use --backing plain)")]
    Unsupported,
    /// The host forbids this process to use userfaultfd.
    #[error(
        "userfaultfd is not permitted for this process: run as root, or allow it with \
         `sysctl vm.unprivileged_userfaultfd=1`, or give this user read/write access to \
         /dev/userfaultfd (then it is used instead); --backing plain runs without it"
    )]
    NotPermitted,
    /// Opening failed otherwise.
    #[error("cannot open a userfaultfd: {0}")]
    Open(std::io::Error),
    /// The kernel lacks features this layer needs.
    #[error("userfaultfd lacks required features {missing:#x} (kernel offers {offered:#x})")]
    MissingFeatures {
        /// Missing feature bits.
        missing: u64,
        /// What the kernel offered.
        offered: u64,
    },
    /// An ioctl failed.
    #[error("{op} on {start:#x}+{len:#x} failed: {source}")]
    Ioctl {
        /// Which ioctl.
        op: &'static str,
        /// Host address.
        start: u64,
        /// Length.
        len: u64,
        /// The error.
        source: std::io::Error,
    },
}

impl UffdError {
    /// The errno of a failed ioctl.
    pub fn errno(&self) -> Option<i32> {
        match self {
            UffdError::Ioctl { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// An open userfaultfd after the API handshake.
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
    features: u64,
}

fn open_raw() -> Result<OwnedFd, UffdError> {
    // SAFETY: the userfaultfd syscall takes flags only and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd >= 0 {
        // SAFETY: a fresh descriptor nobody else owns.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENOSYS) => return Err(UffdError::Unsupported),
        Some(libc::EPERM) | Some(libc::EACCES) => {}
        _ => return Err(UffdError::Open(err)),
    }
    // Unprivileged userfaultfd is off: /dev/userfaultfd, if accessible, hands
    // out userfaultfds that may handle kernel faults too.
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .map_err(|_| UffdError::NotPermitted)?;
    // SAFETY: USERFAULTFD_IOC_NEW takes flags by value and returns a new fd.
    let fd = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            USERFAULTFD_IOC_NEW() as _,
            libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(UffdError::NotPermitted);
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Userfaultfd {
    /// Opens a non-blocking userfaultfd and enables `required` features
    /// (failing if any is missing) plus whichever of `optional` the kernel has.
    pub fn open(required: u64, optional: u64) -> Result<Userfaultfd, UffdError> {
        let fd = open_raw()?;
        // Ask what the kernel offers: a handshake with features = 0 on a
        // probe fd (the API ioctl can be done once per fd).
        let probe = open_raw()?;
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        // SAFETY: UFFDIO_API reads and writes a UffdioApi we own.
        let r = unsafe { ioctl_with_mut_ref(&probe, UFFDIO_API_IOCTL(), &mut api) };
        if r < 0 {
            return Err(UffdError::Open(std::io::Error::last_os_error()));
        }
        let offered = api.features;
        if offered & required != required {
            return Err(UffdError::MissingFeatures {
                missing: required & !offered,
                offered,
            });
        }
        let mut api = UffdioApi {
            api: UFFD_API,
            features: required | (optional & offered),
            ioctls: 0,
        };
        // SAFETY: as above, on the real fd.
        let r = unsafe { ioctl_with_mut_ref(&fd, UFFDIO_API_IOCTL(), &mut api) };
        if r < 0 {
            return Err(UffdError::Open(std::io::Error::last_os_error()));
        }
        Ok(Userfaultfd {
            fd,
            features: api.features,
        })
    }

    /// The features enabled.
    pub fn features(&self) -> u64 {
        self.features
    }

    fn call<T>(
        &self,
        op: &'static str,
        nr: libc::c_ulong,
        arg: &mut T,
        start: u64,
        len: u64,
    ) -> Result<(), UffdError> {
        // SAFETY: every userfaultfd ioctl here takes a pointer to a repr(C)
        // struct of the matching layout, which we own for the call.
        let r = unsafe { ioctl_with_mut_ref(&self.fd, nr, arg) };
        if r < 0 {
            return Err(UffdError::Ioctl {
                op,
                start,
                len,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Registers `[start, start + len)` with `mode` bits.
    pub fn register(&self, start: u64, len: u64, mode: u64) -> Result<u64, UffdError> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode,
            ioctls: 0,
        };
        self.call("UFFDIO_REGISTER", UFFDIO_REGISTER(), &mut reg, start, len)?;
        Ok(reg.ioctls)
    }

    /// Unregisters a range.
    pub fn unregister(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut r = UffdioRange { start, len };
        self.call("UFFDIO_UNREGISTER", UFFDIO_UNREGISTER(), &mut r, start, len)
    }

    /// Copies `len` bytes from `src` to the registered `dst`; returns the
    /// bytes copied (also on a partial failure, inside the error path's
    /// `copy` field, which the caller can inspect through `Err`).
    pub fn copy(
        &self,
        dst: u64,
        src: *const u8,
        len: u64,
        mode: u64,
    ) -> Result<u64, (UffdError, i64)> {
        let mut c = UffdioCopy {
            dst,
            src: src as u64,
            len,
            mode,
            copy: 0,
        };
        match self.call("UFFDIO_COPY", UFFDIO_COPY(), &mut c, dst, len) {
            Ok(()) => Ok(c.copy as u64),
            Err(e) => Err((e, c.copy)),
        }
    }

    /// Maps zero pages over `[start, start + len)`.
    pub fn zeropage(&self, start: u64, len: u64, mode: u64) -> Result<u64, (UffdError, i64)> {
        let mut z = UffdioZeropage {
            range: UffdioRange { start, len },
            mode,
            zeropage: 0,
        };
        match self.call("UFFDIO_ZEROPAGE", UFFDIO_ZEROPAGE(), &mut z, start, len) {
            Ok(()) => Ok(z.zeropage as u64),
            Err(e) => Err((e, z.zeropage)),
        }
    }

    /// Sets (`protect`) or clears write protection on a range.
    pub fn write_protect(&self, start: u64, len: u64, protect: bool) -> Result<(), UffdError> {
        let mode = if protect {
            UFFDIO_WRITEPROTECT_MODE_WP
        } else {
            0
        };
        self.writeprotect_ioctl(start, len, mode)
    }

    /// Removes write protection without waking waiting threads (the kernel
    /// refuses `DONTWAKE` together with protecting, which never wakes).
    pub fn write_unprotect_nowake(&self, start: u64, len: u64) -> Result<(), UffdError> {
        self.writeprotect_ioctl(start, len, UFFDIO_WRITEPROTECT_MODE_DONTWAKE)
    }

    fn writeprotect_ioctl(&self, start: u64, len: u64, mode: u64) -> Result<(), UffdError> {
        let mut w = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode,
        };
        self.call(
            "UFFDIO_WRITEPROTECT",
            UFFDIO_WRITEPROTECT(),
            &mut w,
            start,
            len,
        )
    }

    /// Wakes threads waiting on faults in a range.
    pub fn wake(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut r = UffdioRange { start, len };
        self.call("UFFDIO_WAKE", UFFDIO_WAKE(), &mut r, start, len)
    }

    /// Maps the page-cache pages already there over `[start, start + len)`
    /// (a minor fault's resolution, or a page just put in a shared cache);
    /// returns the bytes mapped.
    pub fn continue_mapping(
        &self,
        start: u64,
        len: u64,
        mode: u64,
    ) -> Result<u64, (UffdError, i64)> {
        let mut c = UffdioContinue {
            range: UffdioRange { start, len },
            mode,
            mapped: 0,
        };
        match self.call("UFFDIO_CONTINUE", UFFDIO_CONTINUE(), &mut c, start, len) {
            Ok(()) => Ok(c.mapped as u64),
            Err(e) => Err((e, c.mapped)),
        }
    }

    /// Installs poison markers over a range.
    pub fn poison(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut p = UffdioPoison {
            range: UffdioRange { start, len },
            mode: 0,
            updated: 0,
        };
        self.call("UFFDIO_POISON", UFFDIO_POISON(), &mut p, start, len)
    }

    /// Reads pending messages without blocking; returns how many.
    pub fn read_messages(&self, buf: &mut [UffdMsg]) -> std::io::Result<usize> {
        let bytes = std::mem::size_of_val(buf);
        // SAFETY: reading into a buffer of `bytes` bytes of plain-old-data messages.
        let r = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                bytes,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EAGAIN) {
                return Ok(0);
            }
            return Err(e);
        }
        Ok(r as usize / std::mem::size_of::<UffdMsg>())
    }
}

impl AsRawFd for Userfaultfd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
