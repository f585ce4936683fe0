//! One contiguous range of guest RAM starting at guest-physical address 0,
//! backed by an anonymous private mapping of the VMM process.

use std::sync::atomic::Ordering;
use vm_memory::{
    mmap::MmapRegionBuilder, Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
};

/// Errors of guest RAM set-up and access.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    /// The size is zero or not a multiple of the 4 KiB page size.
    #[error("guest memory size {0:#x} is not a non-zero multiple of 4 KiB")]
    BadSize(u64),
    /// The host refused the mapping.
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Map {
        /// Requested bytes.
        size: u64,
        /// The `mmap` error.
        source: std::io::Error,
    },
    /// vm-memory refused the region.
    #[error("cannot describe guest memory to vm-memory: {0}")]
    Describe(String),
    /// An access fell outside guest RAM.
    #[error("guest-physical range {addr:#x}+{len:#x} is outside guest RAM")]
    OutOfRange {
        /// First guest-physical address.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// Guest RAM: `[0, size)` of guest-physical memory mapped at `host_addr`.
pub struct GuestRam {
    host_addr: *mut u8,
    size: u64,
    memory: GuestMemoryMmap,
}

// SAFETY: the mapping is plain memory owned by this struct; all access goes
// through vm-memory's volatile accessors or raw pointers handed to KVM, both
// of which tolerate concurrent use by several threads.
unsafe impl Send for GuestRam {}
// SAFETY: as above.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// Maps `size` bytes of zeroed anonymous memory (`MAP_NORESERVE`: pages
    /// are allocated by the host on first touch).
    pub fn new_anonymous(size: u64) -> Result<GuestRam, RamError> {
        if size == 0 || !size.is_multiple_of(4096) {
            return Err(RamError::BadSize(size));
        }
        let len = usize::try_from(size).map_err(|_| RamError::BadSize(size))?;
        // SAFETY: an anonymous private mapping at an address the kernel picks:
        // it aliases nothing, and the result is checked below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(RamError::Map {
                size,
                source: std::io::Error::last_os_error(),
            });
        }
        let host_addr = addr as *mut u8;
        // SAFETY: `host_addr` is a live mapping of `len` bytes with the given
        // protection and flags; it is unmapped only in `Drop`, after the
        // vm-memory view (which does not own it) is gone.
        let region: MmapRegion = unsafe {
            MmapRegionBuilder::new(len)
                .with_raw_mmap_pointer(host_addr)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
                .build()
        }
        .map_err(|e| {
            // SAFETY: unmapping the mapping created above, not used elsewhere.
            unsafe { libc::munmap(addr, len) };
            RamError::Describe(e.to_string())
        })?;
        let memory = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| RamError::Describe("region overflows the address space".into()))
            .and_then(|r| {
                GuestMemoryMmap::from_regions(vec![r])
                    .map_err(|e| RamError::Describe(e.to_string()))
            });
        match memory {
            Ok(memory) => Ok(GuestRam {
                host_addr,
                size,
                memory,
            }),
            Err(e) => {
                // SAFETY: as above.
                unsafe { libc::munmap(addr, len) };
                Err(e)
            }
        }
    }

    /// Bytes of guest RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host virtual address of guest-physical address 0.
    pub fn host_addr(&self) -> u64 {
        self.host_addr as u64
    }

    /// The vm-memory view, for loaders and devices.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    fn check(&self, addr: u64, len: u64) -> Result<(), RamError> {
        match addr.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(RamError::OutOfRange { addr, len }),
        }
    }

    /// Copies `data` into guest RAM at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), RamError> {
        self.check(addr, data.len() as u64)?;
        self.memory
            .write_slice(data, GuestAddress(addr))
            .map_err(|_| RamError::OutOfRange {
                addr,
                len: data.len() as u64,
            })
    }

    /// Copies guest RAM at `addr` into `buf`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), RamError> {
        self.check(addr, buf.len() as u64)?;
        self.memory
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| RamError::OutOfRange {
                addr,
                len: buf.len() as u64,
            })
    }

    /// Atomically stores an aligned 64-bit word (release ordering).
    pub fn store_u64(&self, addr: u64, value: u64) -> Result<(), RamError> {
        self.check(addr, 8)?;
        self.memory
            .store(value, GuestAddress(addr), Ordering::Release)
            .map_err(|_| RamError::OutOfRange { addr, len: 8 })
    }

    /// Atomically loads an aligned 64-bit word (acquire ordering).
    pub fn load_u64(&self, addr: u64) -> Result<u64, RamError> {
        self.check(addr, 8)?;
        self.memory
            .load(GuestAddress(addr), Ordering::Acquire)
            .map_err(|_| RamError::OutOfRange { addr, len: 8 })
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `new_anonymous` with this length
        // and nothing refers to it once `self` is dropped (KVM's memory slot
        // goes away with the VM fd, which the VMM drops first).
        unsafe { libc::munmap(self.host_addr as *mut libc::c_void, self.size as usize) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_zeroed_memory_and_checks_bounds() {
        let ram = GuestRam::new_anonymous(1 << 20).expect("map 1 MiB");
        assert_eq!(ram.load_u64(0x1000).expect("load"), 0);
        ram.store_u64(0x1000, 42).expect("store");
        assert_eq!(ram.load_u64(0x1000).expect("load"), 42);
        let mut buf = [0u8; 8];
        ram.read(0x1000, &mut buf).expect("read");
        assert_eq!(u64::from_le_bytes(buf), 42);
        assert!(matches!(
            ram.load_u64(1 << 20),
            Err(RamError::OutOfRange { .. })
        ));
        assert!(matches!(
            ram.write(u64::MAX, &[1]),
            Err(RamError::OutOfRange { .. })
        ));
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(
            GuestRam::new_anonymous(0),
            Err(RamError::BadSize(0))
        ));
        assert!(matches!(
            GuestRam::new_anonymous(4097),
            Err(RamError::BadSize(4097))
        ));
    }
}
