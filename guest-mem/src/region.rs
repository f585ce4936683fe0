//! Regions, the VMA analogue: a contiguous guest-physical range with its
//! host backing, flags, NUMA node and accessor bitmap.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// How a region's memory is provided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackingKind {
    /// A memfd per region, mapped shared (clones and forks can share it);
    /// populated by the fault engine.
    Memfd,
    /// Anonymous private memory, populated by the fault engine.
    Anon,
    /// Kernel-managed anonymous memory without this layer (for comparison).
    Plain,
}

impl BackingKind {
    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            BackingKind::Memfd => "memfd",
            BackingKind::Anon => "anon",
            BackingKind::Plain => "plain",
        }
    }

    /// Parses a CLI name.
    pub fn from_name(s: &str) -> Option<BackingKind> {
        [BackingKind::Memfd, BackingKind::Anon, BackingKind::Plain]
            .into_iter()
            .find(|b| b.name() == s)
    }

    /// True when the fault engine serves this backing.
    pub fn uses_fault_engine(self) -> bool {
        self != BackingKind::Plain
    }
}

/// The access pattern a region expects (rule 9: such regions ignore recency).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AccessHint {
    /// No hint.
    #[default]
    Normal,
    /// Mostly sequential.
    Sequential,
    /// Mostly random.
    Random,
}

impl AccessHint {
    /// All hints, in CLI order.
    pub const ALL: [AccessHint; 3] = [
        AccessHint::Normal,
        AccessHint::Sequential,
        AccessHint::Random,
    ];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            AccessHint::Normal => "normal",
            AccessHint::Sequential => "sequential",
            AccessHint::Random => "random",
        }
    }

    /// Parses a CLI name.
    pub fn from_name(s: &str) -> Option<AccessHint> {
        AccessHint::ALL.into_iter().find(|h| h.name() == s)
    }

    /// The `madvise(2)` advice that tells the kernel the same.
    pub(crate) fn advice(self) -> libc::c_int {
        match self {
            AccessHint::Normal => libc::MADV_NORMAL,
            AccessHint::Sequential => libc::MADV_SEQUENTIAL,
            AccessHint::Random => libc::MADV_RANDOM,
        }
    }
}

/// Region flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionFlags {
    /// Shared with another VM or process (not copy-on-write).
    pub shared: bool,
    /// The guest may not write it (e.g. a ROM).
    pub read_only: bool,
    /// Expected access pattern.
    pub hint: AccessHint,
}

/// Region set-up errors.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// Size or address not page-aligned, or zero.
    #[error("region {gpa:#x}+{size:#x} is empty or not 4 KiB-aligned")]
    Unaligned {
        /// Guest-physical start.
        gpa: u64,
        /// Size.
        size: u64,
    },
    /// Overlaps an existing region.
    #[error("region {gpa:#x}+{size:#x} overlaps region {other}")]
    Overlap {
        /// Guest-physical start.
        gpa: u64,
        /// Size.
        size: u64,
        /// The other region's id.
        other: u64,
    },
    /// `memfd_create` or `ftruncate` failed.
    #[error("cannot create the memfd backing of {size:#x} bytes: {source}")]
    Memfd {
        /// Size.
        size: u64,
        /// The error.
        source: std::io::Error,
    },
    /// `mmap` failed.
    #[error("cannot map {size:#x} bytes of guest memory: {source}")]
    Map {
        /// Size.
        size: u64,
        /// The error.
        source: std::io::Error,
    },
}

/// The host mapping behind a region.
#[derive(Debug)]
pub struct HostMapping {
    addr: *mut u8,
    len: u64,
    memfd: Option<File>,
    /// A private mapping of an image file: its pages are shared with
    /// every other mapping of the file until written (set by a fork).
    private_image: AtomicBool,
    /// The image file of a private mapping made by `from_file_private`
    /// (a fork maps it for its children).
    image: Option<File>,
}

// SAFETY: the mapping is plain memory owned by this struct; concurrent access
// goes through atomic or volatile accessors and the kernel (KVM, uffd).
unsafe impl Send for HostMapping {}
// SAFETY: as above.
unsafe impl Sync for HostMapping {}

impl HostMapping {
    /// Maps `len` bytes for `kind`; `thp` asks for transparent huge pages.
    pub fn new(kind: BackingKind, len: u64, thp: bool) -> Result<HostMapping, RegionError> {
        let size = usize::try_from(len).map_err(|_| RegionError::Map {
            size: len,
            source: std::io::Error::from_raw_os_error(libc::ENOMEM),
        })?;
        let memfd = match kind {
            BackingKind::Memfd => {
                // SAFETY: memfd_create takes a NUL-terminated name and flags.
                let fd =
                    unsafe { libc::memfd_create(c"vmm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
                if fd < 0 {
                    return Err(RegionError::Memfd {
                        size: len,
                        source: std::io::Error::last_os_error(),
                    });
                }
                // SAFETY: a fresh descriptor nobody else owns.
                let file = unsafe { File::from_raw_fd(fd) };
                file.set_len(len)
                    .map_err(|source| RegionError::Memfd { size: len, source })?;
                Some(file)
            }
            _ => None,
        };
        let (flags, fd) = match &memfd {
            Some(f) => (libc::MAP_SHARED, f.as_raw_fd()),
            None => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
            ),
        };
        // SAFETY: a new mapping at an address the kernel picks (no aliasing of
        // existing memory), of a memfd we own or anonymous memory; checked below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(RegionError::Map {
                size: len,
                source: std::io::Error::last_os_error(),
            });
        }
        let advice = if thp {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        };
        // SAFETY: advising our own fresh mapping; failure only means no THP.
        if unsafe { libc::madvise(addr, size, advice) } != 0 {
            log::debug!(
                "madvise({advice}) on guest memory failed: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(HostMapping {
            addr: addr as *mut u8,
            len,
            memfd,
            private_image: AtomicBool::new(false),
            image: None,
        })
    }

    /// Maps `len` bytes of `file` privately (copy-on-write: guest writes
    /// never reach the file), e.g. a snapshot's memory file.
    pub fn from_file_private(file: &File, len: u64) -> Result<HostMapping, RegionError> {
        // SAFETY: a new private mapping of a file we hold open, at an address
        // the kernel picks; checked below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(RegionError::Map {
                size: len,
                source: std::io::Error::last_os_error(),
            });
        }
        let image = file.try_clone().ok();
        Ok(HostMapping {
            addr: addr as *mut u8,
            len,
            memfd: None,
            private_image: AtomicBool::new(true),
            image,
        })
    }

    /// True for a private mapping of an image file (see
    /// [`HostMapping::from_file_private`]): pages the guest has not written
    /// are shared with every other mapping of the file.
    pub fn is_private_image(&self) -> bool {
        self.private_image.load(Ordering::Acquire)
    }

    /// The file a private mapping maps (its image, or the memfd a fork
    /// froze), for more private mappings of it.
    pub fn image_file(&self) -> Option<&File> {
        if !self.is_private_image() {
            return None;
        }
        self.image.as_ref().or(self.memfd.as_ref())
    }

    /// Fork: maps this memfd mapping's range again, privately, at the same
    /// address (`MAP_FIXED`), so the memfd keeps the content it has now and
    /// later writes through the mapping become private copies, except the
    /// byte ranges `keep_shared` (offsets into the mapping, sorted, page
    /// aligned: pinned pages a device holds, which must stay the frames the
    /// device sees). Returns a handle on the memfd for others to map. The
    /// caller must re-register the range with userfaultfd (the old
    /// registration went with the old mapping) and make sure nothing
    /// touches the range meanwhile.
    pub fn remap_private(&self, keep_shared: &[(u64, u64)]) -> Result<File, RegionError> {
        let not_memfd = || RegionError::Map {
            size: self.len,
            source: std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "only a memfd mapping can be frozen for a fork",
            ),
        };
        let memfd = self.memfd.as_ref().ok_or_else(not_memfd)?;
        if self.is_private_image() {
            return Err(not_memfd());
        }
        let handle = memfd.try_clone().map_err(|source| RegionError::Memfd {
            size: self.len,
            source,
        })?;
        // The complement of `keep_shared`: the runs to make private.
        let mut runs = Vec::new();
        let mut at = 0;
        for &(s, e) in keep_shared {
            if s > at {
                runs.push((at, s));
            }
            at = at.max(e);
        }
        if at < self.len {
            runs.push((at, self.len));
        }
        for (s, e) in runs {
            // SAFETY: replaces part of our own mapping, at its own address,
            // by a private mapping of the memfd that backs it at the same
            // offset: the bytes seen there do not change (the memfd holds
            // them).
            let addr = unsafe {
                libc::mmap(
                    self.addr.add(s as usize) as *mut libc::c_void,
                    (e - s) as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED,
                    memfd.as_raw_fd(),
                    s as libc::off_t,
                )
            };
            if addr == libc::MAP_FAILED {
                return Err(RegionError::Map {
                    size: self.len,
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        self.private_image.store(true, Ordering::Release);
        Ok(handle)
    }

    /// Host address of the first byte.
    pub fn addr(&self) -> u64 {
        self.addr as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty mapping (never: regions are non-empty).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memfd, for a memfd backing.
    pub fn memfd(&self) -> Option<&File> {
        self.memfd.as_ref()
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `new`, which no
        // one uses any more (the region is isolated and unregistered).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
    }
}

/// A guest memory region.
#[derive(Debug)]
pub struct Region {
    /// Unique id.
    pub id: u64,
    /// First guest-physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Flags.
    pub flags: RegionFlags,
    /// The guest NUMA node this region is, when boot RAM is split into
    /// one region per node.
    pub guest_node: Option<u32>,
    /// The backing kind.
    pub backing: BackingKind,
    /// The host mapping (boot RAM split into NUMA node regions: one
    /// mapping shared by all of them).
    pub mapping: Arc<HostMapping>,
    /// Where the region starts in `mapping`.
    pub(crate) offset: u64,
    /// vCPUs that faulted or dirtied it (bit = vCPU id % 64).
    pub accessors: AtomicU64,
    /// Taken by faults on this region (rule 2).
    pub(crate) lock: Mutex<()>,
    /// Cleared when the region is being removed (isolated, rule 3).
    pub(crate) live: AtomicBool,
}

impl Region {
    /// True when `gpa` lies inside.
    pub fn contains_gpa(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa - self.gpa < self.size
    }

    /// Host address of the region's first byte.
    pub fn host_start(&self) -> u64 {
        self.mapping.addr() + self.offset
    }

    /// True when the host address lies inside the region.
    pub fn contains_host(&self, addr: u64) -> bool {
        addr >= self.host_start() && addr - self.host_start() < self.size
    }

    /// Host address of guest-physical `gpa` (inside the region).
    pub fn host_of(&self, gpa: u64) -> u64 {
        self.host_start() + (gpa - self.gpa)
    }

    /// Guest-physical address of host address `addr` (inside the region).
    pub fn gpa_of(&self, addr: u64) -> u64 {
        self.gpa + (addr - self.host_start())
    }

    /// Offset of guest-physical `gpa` (inside the region) in the mapping
    /// and its backing file: the frame the table records.
    pub fn mapping_offset(&self, gpa: u64) -> u64 {
        self.offset + (gpa - self.gpa)
    }

    /// Records that vCPU `vcpu` touched the region.
    pub fn note_accessor(&self, vcpu: u32) {
        self.accessors.fetch_or(1 << (vcpu % 64), Ordering::Relaxed);
    }

    /// True while faults may be served on it.
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }
}
