//! `memory.bin`: raw guest memory, the byte at offset X being guest-physical
//! byte X, so it can be mapped directly. Sparse: unpopulated and all-zero
//! pages are holes. Each 2 MiB chunk has a checksum — the wrapping sum of
//! the CRC32s of (page index, content) of its non-zero pages — stored in
//! `state.bin`, so corruption and truncation are both detected (a non-zero
//! page turned zero drops out of the sum; a zero page turned non-zero enters
//! it), and pages can be summed in any order.

use super::state::CHUNK_BYTES;
use crate::oracle::MemoryImage;
use guest_mem::live_copy::is_zero;
use guest_mem::{GuestRam, RamError};
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

const PAGE: u64 = 4096;

/// Memory-file problems.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    /// I/O on the file failed.
    #[error("memory.bin: {0}")]
    Io(#[from] std::io::Error),
    /// Reading guest RAM failed.
    #[error("reading guest memory: {0}")]
    Ram(#[from] RamError),
    /// The file is shorter than the guest's memory.
    #[error("memory.bin is truncated: {got} bytes, the guest has {want}")]
    Truncated {
        /// File length.
        got: u64,
        /// Guest RAM size.
        want: u64,
    },
    /// A chunk's checksum does not match.
    #[error(
        "memory.bin: checksum mismatch in chunk {chunk} (guest-physical {start:#x}..{end:#x})"
    )]
    Checksum {
        /// Chunk index.
        chunk: u64,
        /// First byte.
        start: u64,
        /// End.
        end: u64,
    },
}

/// Per-chunk checksum accumulator.
struct ChunkSums {
    sums: Vec<u32>,
}

/// A page's contribution to its chunk's checksum: the CRC32 of its
/// little-endian page number followed by its content. A chunk's checksum is
/// the wrapping sum of its non-zero pages' contributions, so pages can be
/// added in any order and from several threads (a live snapshot copies
/// pages out of order).
pub fn page_sum(page: u64, content: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&page.to_le_bytes());
    h.update(content);
    h.finalize()
}

impl ChunkSums {
    fn new(mem_bytes: u64) -> ChunkSums {
        ChunkSums {
            sums: vec![0; mem_bytes.div_ceil(CHUNK_BYTES) as usize],
        }
    }

    fn add(&mut self, page: u64, content: &[u8]) {
        if let Some(s) = self.sums.get_mut((page * PAGE / CHUNK_BYTES) as usize) {
            *s = s.wrapping_add(page_sum(page, content));
        }
    }

    fn finish(self) -> Vec<u32> {
        self.sums
    }
}

/// What writing the memory file produced.
pub struct WrittenMemory {
    /// Chunk checksums.
    pub chunk_crc: Vec<u32>,
    /// Non-zero pages stored.
    pub pages_stored: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// Writes the populated, non-zero pages of `ram` to a new sparse file
/// (mode 0600) of the guest's size, and fsyncs it.
pub fn write_memory(ram: &GuestRam, path: &Path) -> Result<WrittenMemory, MemoryFileError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.set_len(ram.size())?;
    let mut sums = ChunkSums::new(ram.size());
    let mut stored = 0;
    let pages = ram.populated_pages();
    // Runs of consecutive populated pages, at most 2 MiB each: one read
    // from guest memory, one write per run of non-zero pages.
    let mut i = 0;
    let mut buf = vec![0u8; CHUNK_BYTES as usize];
    while i < pages.len() {
        let first = pages[i];
        let mut n = 1;
        while i + n < pages.len()
            && pages[i + n] == first + n as u64
            && (n as u64) < CHUNK_BYTES / PAGE
        {
            n += 1;
        }
        let bytes = &mut buf[..n * PAGE as usize];
        ram.read(first * PAGE, bytes)?;
        let mut j = 0;
        while j < n {
            let page = |k: usize| &bytes[k * PAGE as usize..(k + 1) * PAGE as usize];
            if is_zero(page(j)) {
                j += 1;
                continue;
            }
            let start = j;
            while j < n && !is_zero(page(j)) {
                sums.add(first + j as u64, page(j));
                j += 1;
            }
            file.write_all_at(
                &bytes[start * PAGE as usize..j * PAGE as usize],
                (first + start as u64) * PAGE,
            )?;
            stored += (j - start) as u64;
        }
        i += n;
    }
    file.sync_all()?;
    Ok(WrittenMemory {
        chunk_crc: sums.finish(),
        pages_stored: stored,
        bytes: stored * PAGE,
    })
}

/// The data (non-hole) ranges of a file, via `SEEK_DATA`/`SEEK_HOLE`.
fn data_ranges(file: &File, start: u64, end: u64) -> Result<Vec<(u64, u64)>, MemoryFileError> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = start as i64;
    while (pos as u64) < end {
        // SAFETY: lseek on a file we own; no memory is touched.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e.into());
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        if data as u64 >= end {
            break;
        }
        out.push((data as u64, (hole as u64).min(end)));
        pos = hole;
    }
    Ok(out)
}

/// An opened memory file.
pub struct MemoryFile {
    file: File,
    len: u64,
}

impl MemoryFile {
    /// Opens `path` for a guest of `mem_bytes`.
    pub fn open(path: &Path, mem_bytes: u64) -> Result<MemoryFile, MemoryFileError> {
        MemoryFile::of(File::open(path)?, mem_bytes)
    }

    /// Wraps an opened memory file, refusing one shorter than the guest.
    fn of(file: File, mem_bytes: u64) -> Result<MemoryFile, MemoryFileError> {
        let len = file.metadata()?.len();
        if len < mem_bytes {
            return Err(MemoryFileError::Truncated {
                got: len,
                want: mem_bytes,
            });
        }
        Ok(MemoryFile {
            file,
            len: mem_bytes,
        })
    }

    /// Visits every non-zero page (page number, content) of `[from, to)`
    /// in address order.
    fn for_each_page_in(
        &self,
        from: u64,
        to: u64,
        mut f: impl FnMut(u64, &[u8]) -> Result<(), MemoryFileError>,
    ) -> Result<(), MemoryFileError> {
        let mut buf = Vec::new();
        for (start, end) in data_ranges(&self.file, from, to.min(self.len))? {
            let mut pos = start & !(PAGE - 1);
            while pos < end {
                let n = (end - pos).min(CHUNK_BYTES).div_ceil(PAGE) * PAGE;
                let n = n.min(self.len - pos);
                buf.resize(n as usize, 0);
                self.file.read_exact_at(&mut buf[..n as usize], pos)?;
                for (i, page) in buf[..n as usize].chunks(PAGE as usize).enumerate() {
                    if !is_zero(page) {
                        f(pos / PAGE + i as u64, page)?;
                    }
                }
                pos += n;
            }
        }
        Ok(())
    }

    /// Page numbers of the pages in `[start, end)` that hold data (not
    /// holes), without reading them.
    pub fn data_pages_in(&self, start: u64, end: u64) -> Result<Vec<u64>, MemoryFileError> {
        let mut out = Vec::new();
        for (s, e) in data_ranges(&self.file, start, end.min(self.len))? {
            let (lo, hi) = (s.max(start), e.min(end));
            if lo < hi {
                out.extend(lo / PAGE..hi.div_ceil(PAGE));
            }
        }
        Ok(out)
    }

    /// Punches a hole over page `page` (its content becomes zero).
    pub fn punch(&self, page: u64) -> Result<(), MemoryFileError> {
        // SAFETY: fallocate on a file we own; no memory is touched.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (page * PAGE) as libc::off_t,
                PAGE as libc::off_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(())
    }

    /// A new, empty memory image in a memfd (tmpfs: userfaultfd works on a
    /// private mapping of it) for a guest of `mem_bytes`.
    pub fn new_memfd(mem_bytes: u64) -> Result<MemoryFile, MemoryFileError> {
        use std::os::fd::FromRawFd;
        // SAFETY: memfd_create takes a NUL-terminated name and flags.
        let fd = unsafe { libc::memfd_create(c"vmm-materialized".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: fd is a new descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(mem_bytes)?;
        MemoryFile::of(file, mem_bytes)
    }

    /// The open file (to map it).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Copies every data range of this file (never the holes) into `dst`
    /// at the same offsets; returns the bytes copied.
    pub fn copy_data_into(&self, dst: &MemoryFile) -> Result<u64, MemoryFileError> {
        let mut buf = Vec::new();
        let mut copied = 0;
        for (start, end) in data_ranges(&self.file, 0, self.len.min(dst.len))? {
            let mut pos = start;
            while pos < end {
                let n = (end - pos).min(CHUNK_BYTES);
                buf.resize(n as usize, 0);
                self.file.read_exact_at(&mut buf, pos)?;
                dst.file.write_all_at(&buf, pos)?;
                pos += n;
                copied += n;
            }
        }
        Ok(copied)
    }

    /// Stores `content` as guest page `page`: written, or a hole when zero.
    pub fn put_page(&self, page: u64, content: &[u8]) -> Result<(), MemoryFileError> {
        if is_zero(content) {
            self.punch(page)
        } else {
            Ok(self.file.write_all_at(content, page * PAGE)?)
        }
    }

    /// Opens `path` for writing (to turn a full memory file into a diff).
    pub fn open_rw(path: &Path, mem_bytes: u64) -> Result<MemoryFile, MemoryFileError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        MemoryFile::of(file, mem_bytes)
    }

    /// Checks every chunk checksum against `expected`.
    pub fn verify(&self, expected: &[u32]) -> Result<u64, MemoryFileError> {
        self.load_into(None, expected)
    }

    /// Copies every non-zero page into `ram` (when given), checking every
    /// chunk's checksum; returns the pages loaded.
    pub fn load_into(
        &self,
        ram: Option<&GuestRam>,
        expected: &[u32],
    ) -> Result<u64, MemoryFileError> {
        let mut sums = ChunkSums::new(self.len);
        let mut pages = 0;
        self.for_each_page_in(0, self.len, |page, content| {
            if let Some(ram) = ram {
                ram.write(page * PAGE, content)?;
            }
            sums.add(page, content);
            pages += 1;
            Ok(())
        })?;
        for (chunk, (got, want)) in sums.finish().iter().zip(expected).enumerate() {
            if got != want {
                let start = chunk as u64 * CHUNK_BYTES;
                return Err(MemoryFileError::Checksum {
                    chunk: chunk as u64,
                    start,
                    end: (start + CHUNK_BYTES).min(self.len),
                });
            }
        }
        Ok(pages)
    }

    /// The checksums the file's content has now.
    pub fn checksums(&self) -> Result<Vec<u32>, MemoryFileError> {
        let mut sums = ChunkSums::new(self.len);
        self.for_each_page_in(0, self.len, |page, content| {
            sums.add(page, content);
            Ok(())
        })?;
        Ok(sums.finish())
    }
}

impl MemoryFile {
    /// The checksum chunk `chunk` has now.
    /// Reads only the chunk's data ranges: holes add nothing to the sum.
    pub fn chunk_crc(&self, chunk: u64) -> Result<u32, MemoryFileError> {
        let start = chunk * CHUNK_BYTES;
        let mut sum = 0u32;
        self.for_each_page_in(start, start + CHUNK_BYTES, |page, content| {
            sum = sum.wrapping_add(page_sum(page, content));
            Ok(())
        })?;
        Ok(sum)
    }
}

impl MemoryImage for MemoryFile {
    fn read_at(&self, gpa: u64, buf: &mut [u8]) -> Result<(), RamError> {
        let len = buf.len() as u64;
        if gpa.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(RamError::OutOfRange { addr: gpa, len });
        }
        self.file
            .read_exact_at(buf, gpa)
            .map_err(|_| RamError::OutOfRange { addr: gpa, len })
    }
}

/// Writes `bytes` to a new file (mode 0600) and fsyncs it.
pub fn write_new_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}
