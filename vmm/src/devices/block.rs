//! A DMA-style block device the guest drives through I/O ports, built on
//! io_uring with guest pages registered as fixed buffers: each registration
//! is a real long-term pin in the kernel, which is what unshare-on-pin
//! (rule 13) is about.
//!
//! Ports (32-bit writes for the arguments, an 8-bit write for the command,
//! an 8-bit read for the status of this vCPU's last command):
//!
//! | port | access | meaning |
//! |---|---|---|
//! | `0x520` | out 32 | argument A: a guest page number |
//! | `0x524` | out 32 | argument B: a block number |
//! | `0x528` | out 8 | command: 1 write page A to block B, 2 read block B into page A |
//! | `0x528` | in 8 | status of this vCPU's last command ([`Status`]) |
//!
//! A command runs on the vCPU thread that issued it, to completion: pin the
//! page (read-only for a block write, read-write for a block read), register
//! it as a fixed buffer, one `WRITE_FIXED` or `READ_FIXED`, unregister,
//! unpin. A block read writes guest memory behind the page tables' back, so
//! the page goes through a live snapshot's copy-before-write first and is
//! recorded dirty after (table and VMM-write log).
//!
//! [`BlockDevice::map`], [`BlockDevice::write_slot`],
//! [`BlockDevice::read_slot`] and [`BlockDevice::unmap`] keep a pin across
//! calls (a buffer registered once and used many times), the case where a
//! lost write could happen.

use guest_mem::pin::{Pin, PinAccess};
use guest_mem::LockOrRecover;
use guest_mem::{GuestRam, RamError};
use io_uring::{opcode, types, IoUring};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

pub use guest_protocol::control::{
    BLOCK_BLOCK_PORT as BLOCK_PORT_BLOCK, BLOCK_CMD_PORT as BLOCK_PORT_CMD,
    BLOCK_CMD_READ as CMD_READ, BLOCK_CMD_WRITE as CMD_WRITE, BLOCK_PAGE_PORT as BLOCK_PORT_PAGE,
};
/// Bytes per block: one guest page.
pub const BLOCK_BYTES: u64 = 4096;
/// Registered-buffer slots of the ring (one per vCPU for the port
/// commands, the rest for long-lived mappings).
pub const SLOTS: u32 = 64;

/// A command's outcome, as the guest reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Done.
    Ok = 0,
    /// A page or block number out of range, or an unknown command.
    BadRequest = 1,
    /// The I/O failed.
    IoError = 2,
    /// The page may not be written (a read-only region, rule 14) or is
    /// poisoned.
    Refused = guest_protocol::control::BLOCK_STATUS_REFUSED,
    /// No command yet (what a new device, e.g. a restored VM's, reports).
    NoCommand = 0xff,
}

/// Block device errors.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The backing file could not be opened or sized.
    #[error("block device file {path}: {source}")]
    File {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// io_uring could not be set up.
    #[error("block device: cannot set up io_uring: {0}")]
    Ring(std::io::Error),
    /// Registering a guest page as a fixed buffer failed.
    #[error(
        "block device: cannot register guest page {gpa:#x} as an io_uring fixed buffer: {source}{hint}"
    )]
    Register {
        /// The page.
        gpa: u64,
        /// The error.
        source: std::io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// The request is malformed.
    #[error("block device: {0}")]
    BadRequest(String),
    /// Guest memory refused the pin.
    #[error("block device: {0}")]
    Ram(#[from] RamError),
    /// The I/O itself failed.
    #[error("block device I/O: {0}")]
    Io(std::io::Error),
}

impl BlockError {
    fn status(&self) -> Status {
        match self {
            BlockError::BadRequest(_) => Status::BadRequest,
            BlockError::Ram(RamError::ReadOnly(_) | RamError::Poisoned(_)) => Status::Refused,
            BlockError::Ram(RamError::OutOfRange { .. }) => Status::BadRequest,
            _ => Status::IoError,
        }
    }
}

/// Where the device's disk comes from.
#[derive(Clone, Debug, Default)]
pub enum DiskSource {
    /// An unnamed temporary file, empty.
    #[default]
    Temporary,
    /// This file, used (and changed) in place.
    File(std::path::PathBuf),
    /// An unnamed temporary file starting as a copy of this image (a
    /// snapshot's `disk.bin`, a fork parent's disk), checked against its
    /// size and CRC first; the image is never changed.
    CopyOf {
        /// The image.
        image: Arc<File>,
        /// Its blocks.
        blocks: u64,
        /// Its CRC32.
        crc: u32,
    },
}

/// What the device did.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct BlockStats {
    /// Blocks written from guest memory.
    pub blocks_written: u64,
    /// Blocks read into guest memory.
    pub blocks_read: u64,
    /// Requests refused or failed.
    pub errors: u64,
    /// Of those, requests refused because their page may not be written
    /// (read-only memory, rule 14) or is poisoned.
    pub refused: u64,
}

struct Ring {
    ring: IoUring,
    /// Per slot: the pin and the guest address it holds.
    slots: Vec<Option<Pin>>,
    /// A copy of the disk taken while the guest runs (a live snapshot).
    disk_copy: Option<DiskCopy>,
}

/// A copy of the disk taken while the guest runs: a block is copied before
/// the device first overwrites it, the rest by
/// [`BlockDevice::finish_disk_copy`]. Every disk write holds the ring's
/// lock, so a block is copied either before or instead of being written.
struct DiskCopy {
    out: File,
    copied: Vec<bool>,
}

/// A new unnamed file (`O_TMPFILE`, mode 0600) in the temporary directory:
/// it is gone once closed.
fn unnamed_file() -> Result<File, BlockError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = std::env::temp_dir();
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o600)
        .open(&dir)
        .map_err(|source| BlockError::File {
            path: format!("an unnamed file in {}", dir.display()),
            source,
        })
}

/// Copies block `b` of `from` to `to`.
fn copy_block(from: &File, to: &File, b: u64) -> Result<(), BlockError> {
    use std::os::unix::fs::FileExt;
    let io = |source| BlockError::File {
        path: "(disk copy)".into(),
        source,
    };
    let mut buf = [0u8; BLOCK_BYTES as usize];
    from.read_exact_at(&mut buf, b * BLOCK_BYTES).map_err(io)?;
    if buf.iter().any(|x| *x != 0) {
        to.write_all_at(&buf, b * BLOCK_BYTES).map_err(io)?;
    }
    Ok(())
}

/// The device.
pub struct BlockDevice {
    ram: Arc<GuestRam>,
    file: File,
    blocks: u64,
    ring: Mutex<Ring>,
    /// Per vCPU: arguments A and B, and the last status.
    regs: Mutex<Vec<(u32, u32, u8)>>,
    stats: Mutex<BlockStats>,
}

/// Copies `len` bytes of `from` into `to` (sized to `len`; none: only
/// read) and returns their CRC32; holes are read as zeros.
fn copy_file(from: &File, to: Option<&File>, len: u64) -> Result<u32, BlockError> {
    use std::os::unix::fs::FileExt;
    let io = |source| BlockError::File {
        path: "(disk copy)".into(),
        source,
    };
    if let Some(to) = to {
        to.set_len(len).map_err(io)?;
    }
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; (1 << 20).min(len as usize)];
    let mut at = 0;
    while at < len {
        let n = ((len - at) as usize).min(buf.len());
        from.read_exact_at(&mut buf[..n], at).map_err(io)?;
        crc.update(&buf[..n]);
        if let Some(to) = to.filter(|_| buf[..n].iter().any(|b| *b != 0)) {
            to.write_all_at(&buf[..n], at).map_err(io)?;
        }
        at += n as u64;
    }
    Ok(crc.finalize())
}

/// Raises the soft `RLIMIT_MEMLOCK` to the hard one: fixed buffers count
/// as locked memory (unless the process has `CAP_IPC_LOCK`).
fn raise_memlock() {
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_MEMLOCK, &r);
        }
    }
}

impl BlockDevice {
    /// A device over `file` (sized to `blocks` blocks) for guest RAM `ram`
    /// and `vcpus` vCPUs.
    pub fn new(
        ram: Arc<GuestRam>,
        file: File,
        blocks: u64,
        vcpus: u32,
    ) -> Result<BlockDevice, BlockError> {
        let path = || "(open file)".to_string();
        file.set_len(blocks * BLOCK_BYTES)
            .map_err(|source| BlockError::File {
                path: path(),
                source,
            })?;
        raise_memlock();
        let ring = IoUring::new(8).map_err(BlockError::Ring)?;
        ring.submitter()
            .register_buffers_sparse(SLOTS)
            .map_err(BlockError::Ring)?;
        if vcpus > SLOTS / 2 {
            return Err(BlockError::BadRequest(format!(
                "{vcpus} vCPUs: at most {} can drive the device",
                SLOTS / 2
            )));
        }
        Ok(BlockDevice {
            ram,
            file,
            blocks,
            ring: Mutex::new(Ring {
                ring,
                slots: (0..SLOTS).map(|_| None).collect(),
                disk_copy: None,
            }),
            regs: Mutex::new(vec![(0, 0, Status::NoCommand as u8); vcpus as usize]),
            stats: Mutex::new(BlockStats::default()),
        })
    }

    /// Opens (creating if needed) `path` as the backing file.
    pub fn open(
        ram: Arc<GuestRam>,
        path: &std::path::Path,
        blocks: u64,
        vcpus: u32,
    ) -> Result<BlockDevice, BlockError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| BlockError::File {
                path: path.display().to_string(),
                source,
            })?;
        BlockDevice::new(ram, file, blocks, vcpus)
    }

    /// A device over an unnamed temporary file (`O_TMPFILE` in the
    /// temporary directory: gone when the device is).
    pub fn anonymous(
        ram: Arc<GuestRam>,
        blocks: u64,
        vcpus: u32,
    ) -> Result<BlockDevice, BlockError> {
        let file = unnamed_file()?;
        BlockDevice::new(ram, file, blocks, vcpus)
    }

    /// A device whose disk comes from `source`.
    pub fn from_source(
        ram: Arc<GuestRam>,
        source: &DiskSource,
        blocks: u64,
        vcpus: u32,
    ) -> Result<BlockDevice, BlockError> {
        match source {
            DiskSource::Temporary => BlockDevice::anonymous(ram, blocks, vcpus),
            DiskSource::File(p) => BlockDevice::open(ram, p, blocks, vcpus),
            DiskSource::CopyOf {
                image,
                blocks: b,
                crc,
            } => {
                if *b != blocks {
                    return Err(BlockError::BadRequest(format!(
                        "the disk image has {b} blocks, the guest needs {blocks}"
                    )));
                }
                let have = image.metadata().map(|m| m.len()).unwrap_or(0);
                if have < blocks * BLOCK_BYTES {
                    return Err(BlockError::BadRequest(format!(
                        "the disk image is truncated: {have} bytes, {} expected",
                        blocks * BLOCK_BYTES
                    )));
                }
                let dev = BlockDevice::anonymous(ram, blocks, vcpus)?;
                let got = copy_file(image, Some(&dev.file), blocks * BLOCK_BYTES)?;
                if got != *crc {
                    return Err(BlockError::BadRequest(format!(
                        "the disk image is corrupt (CRC {got:#010x}, expected {crc:#010x})"
                    )));
                }
                Ok(dev)
            }
        }
    }

    /// Writes the disk as it is now to `path` (a new file, mode 0600,
    /// fsynced) and returns its CRC32. Call while no request runs.
    pub fn save_disk_to(&self, path: &std::path::Path) -> Result<u32, BlockError> {
        use std::os::unix::fs::OpenOptionsExt;
        let err = |source| BlockError::File {
            path: path.display().to_string(),
            source,
        };
        let out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(err)?;
        let crc = copy_file(&self.file, Some(&out), self.blocks * BLOCK_BYTES)?;
        out.sync_all().map_err(err)?;
        Ok(crc)
    }

    /// Starts copying the disk as it is now to `path` (a new file, mode
    /// 0600) while the guest goes on: O(1), for a live snapshot's pause.
    pub fn begin_disk_copy(&self, path: &std::path::Path) -> Result<(), BlockError> {
        use std::os::unix::fs::OpenOptionsExt;
        let out = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| BlockError::File {
                path: path.display().to_string(),
                source,
            })?;
        self.begin_disk_copy_into(out)
    }

    /// [`BlockDevice::begin_disk_copy`] into an unnamed temporary file,
    /// returned (a handle on it) for reading once the copy is finished.
    pub fn begin_disk_copy_unnamed(&self) -> Result<File, BlockError> {
        let out = unnamed_file()?;
        let handle = out.try_clone().map_err(|source| BlockError::File {
            path: "(disk copy)".into(),
            source,
        })?;
        self.begin_disk_copy_into(out)?;
        Ok(handle)
    }

    fn begin_disk_copy_into(&self, out: File) -> Result<(), BlockError> {
        out.set_len(self.blocks * BLOCK_BYTES)
            .map_err(|source| BlockError::File {
                path: "(disk copy)".into(),
                source,
            })?;
        let mut r = self.ring.lock_or_recover();
        if r.disk_copy.is_some() {
            return Err(BlockError::BadRequest(
                "a copy of the disk is already being taken".into(),
            ));
        }
        r.disk_copy = Some(DiskCopy {
            out,
            copied: vec![false; self.blocks as usize],
        });
        Ok(())
    }

    /// Copies the blocks the device did not overwrite since
    /// [`BlockDevice::begin_disk_copy`] (one at a time, so requests go on
    /// in between), fsyncs the copy and returns its CRC32.
    pub fn finish_disk_copy(&self) -> Result<u32, BlockError> {
        for b in 0..self.blocks {
            let mut r = self.ring.lock_or_recover();
            let Some(dc) = &mut r.disk_copy else {
                return Err(BlockError::BadRequest(
                    "no copy of the disk in progress".into(),
                ));
            };
            if !dc.copied[b as usize] {
                copy_block(&self.file, &dc.out, b)?;
                dc.copied[b as usize] = true;
            }
        }
        let dc = self
            .ring
            .lock_or_recover()
            .disk_copy
            .take()
            .ok_or_else(|| BlockError::BadRequest("no copy of the disk in progress".into()))?;
        let io = |source| BlockError::File {
            path: "(disk copy)".into(),
            source,
        };
        dc.out.sync_all().map_err(io)?;
        copy_file(&dc.out, None, self.blocks * BLOCK_BYTES)
    }

    /// Drops a copy of the disk in progress (the snapshot failed).
    pub fn abort_disk_copy(&self) {
        self.ring.lock_or_recover().disk_copy = None;
    }

    /// Blocks of the disk.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// What the device did so far.
    pub fn stats(&self) -> BlockStats {
        *self.stats.lock_or_recover()
    }

    /// Pins guest page `gpa` for `access` and registers it as fixed buffer
    /// `slot` (a long-term pin in the kernel).
    pub fn map(&self, slot: u32, gpa: u64, access: PinAccess) -> Result<(), BlockError> {
        let mut r = self.ring.lock_or_recover();
        let Some(entry) = r.slots.get(slot as usize) else {
            return Err(BlockError::BadRequest(format!("no slot {slot}")));
        };
        if entry.is_some() {
            return Err(BlockError::BadRequest(format!("slot {slot} is in use")));
        }
        // Rule 13: this VM's own page first, then the kernel's pin.
        let pin = self.ram.pin(gpa, BLOCK_BYTES, access)?;
        let Some(host) = pin.host_addr(&self.ram) else {
            let _ = self.ram.unpin(pin);
            return Err(BlockError::BadRequest(format!(
                "page {gpa:#x} has no mapping"
            )));
        };
        let iov = libc::iovec {
            iov_base: host as *mut libc::c_void,
            iov_len: BLOCK_BYTES as usize,
        };
        // SAFETY: the buffer is a page of guest RAM's live mapping, which
        // outlives the ring (the device holds `ram`); the slot is emptied
        // before the pin is dropped.
        let registered = unsafe {
            r.ring
                .submitter()
                .register_buffers_update(slot, &[iov], None)
        };
        if let Err(source) = registered {
            let _ = self.ram.unpin(pin);
            let hint = if matches!(source.raw_os_error(), Some(libc::ENOMEM | libc::EPERM)) {
                " (fixed buffers count as locked memory: raise RLIMIT_MEMLOCK, e.g. ulimit -l)"
            } else {
                ""
            };
            return Err(BlockError::Register { gpa, source, hint });
        }
        r.slots[slot as usize] = Some(pin);
        Ok(())
    }

    /// Unregisters fixed buffer `slot` and drops its pin.
    pub fn unmap(&self, slot: u32) -> Result<(), BlockError> {
        let mut r = self.ring.lock_or_recover();
        let pin = r
            .slots
            .get_mut(slot as usize)
            .and_then(Option::take)
            .ok_or_else(|| BlockError::BadRequest(format!("slot {slot} is not mapped")))?;
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        // SAFETY: an empty iovec clears the slot (the kernel drops its pin).
        let cleared = unsafe {
            r.ring
                .submitter()
                .register_buffers_update(slot, &[empty], None)
        };
        self.ram.unpin(pin)?;
        cleared.map_err(BlockError::Io)
    }

    fn check_block(&self, block: u64) -> Result<(), BlockError> {
        if block >= self.blocks {
            return Err(BlockError::BadRequest(format!(
                "block {block} is beyond the device's {} blocks",
                self.blocks
            )));
        }
        Ok(())
    }

    /// One fixed-buffer transfer on `slot` and waits for it.
    fn transfer(&self, slot: u32, block: u64, to_file: bool) -> Result<(), BlockError> {
        self.check_block(block)?;
        let mut r = self.ring.lock_or_recover();
        let pin = r
            .slots
            .get(slot as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| BlockError::BadRequest(format!("slot {slot} is not mapped")))?;
        if !to_file && pin.access != PinAccess::ReadWrite {
            return Err(BlockError::BadRequest(format!(
                "slot {slot} is mapped read-only: the device may not write it"
            )));
        }
        let (gpa, host) = (
            pin.gpa,
            pin.host_addr(&self.ram)
                .ok_or_else(|| BlockError::BadRequest("unmapped page".into()))?,
        );
        // While the device writes the page, it holds it exclusively: guest
        // writes to it wait for the transfer (rule 6). Not where the kernel
        // serves the page (a shared file): nothing can hold the guest's
        // writes there, as with any memory shared with the host.
        let hold = !to_file && self.ram.engine_serves(gpa);
        if hold {
            self.ram.hold_exclusive(gpa)?;
        }
        let moved = self.submit(&mut r, host, block, to_file, slot, gpa);
        if hold {
            self.ram.release_exclusive(gpa)?;
        }
        moved
    }

    fn submit(
        &self,
        r: &mut Ring,
        host: u64,
        block: u64,
        to_file: bool,
        slot: u32,
        gpa: u64,
    ) -> Result<(), BlockError> {
        if !to_file {
            // The device is about to write guest memory.
            self.ram.before_device_write(gpa, BLOCK_BYTES)?;
        } else if let Some(dc) = &mut r.disk_copy {
            // A live snapshot's disk copy needs this block as it was.
            if !dc.copied[block as usize] {
                copy_block(&self.file, &dc.out, block)?;
                dc.copied[block as usize] = true;
            }
        }
        let fd = types::Fd(self.file.as_raw_fd());
        let index = slot as u16;
        let sqe = if to_file {
            opcode::WriteFixed::new(fd, host as *const u8, BLOCK_BYTES as u32, index)
                .offset(block * BLOCK_BYTES)
                .build()
        } else {
            opcode::ReadFixed::new(fd, host as *mut u8, BLOCK_BYTES as u32, index)
                .offset(block * BLOCK_BYTES)
                .build()
        };
        // SAFETY: the buffer is the registered, pinned page of this slot,
        // alive until the completion is reaped below.
        unsafe { r.ring.submission().push(&sqe) }
            .map_err(|_| BlockError::Io(std::io::Error::other("submission queue full")))?;
        // The vCPU thread is kicked with a signal to pause it: that ends the
        // wait early (with the request submitted, or with EINTR), so wait
        // again until the completion is there.
        let cqe = loop {
            if let Some(cqe) = r.ring.completion().next() {
                break cqe;
            }
            match r.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(BlockError::Io(e)),
            }
        };
        let done = cqe.result();
        if done < 0 {
            return Err(BlockError::Io(std::io::Error::from_raw_os_error(-done)));
        }
        if done as u64 != BLOCK_BYTES {
            return Err(BlockError::Io(std::io::Error::other(format!(
                "short transfer: {done} of {BLOCK_BYTES} bytes"
            ))));
        }
        if !to_file {
            self.ram.after_device_write(gpa, BLOCK_BYTES);
        }
        Ok(())
    }

    /// Writes the page mapped at `slot` to `block` (the device reads guest
    /// memory).
    pub fn write_slot(&self, slot: u32, block: u64) -> Result<(), BlockError> {
        self.transfer(slot, block, true)
    }

    /// Reads `block` into the page mapped at `slot` (the device writes guest
    /// memory).
    pub fn read_slot(&self, slot: u32, block: u64) -> Result<(), BlockError> {
        self.transfer(slot, block, false)
    }

    /// One port command of vCPU `vcpu`: map guest page `page` in the vCPU's
    /// own slot, transfer, unmap.
    fn command(&self, vcpu: u32, cmd: u8, page: u64, block: u64) -> Result<(), BlockError> {
        let (access, to_file) = match cmd {
            CMD_WRITE => (PinAccess::ReadOnly, true),
            CMD_READ => (PinAccess::ReadWrite, false),
            _ => return Err(BlockError::BadRequest(format!("unknown command {cmd}"))),
        };
        self.check_block(block)?;
        let gpa = page
            .checked_mul(BLOCK_BYTES)
            .filter(|g| g + BLOCK_BYTES <= self.ram.size())
            .ok_or_else(|| {
                BlockError::BadRequest(format!("page {page:#x} is outside guest RAM"))
            })?;
        let slot = vcpu;
        self.map(slot, gpa, access)?;
        let moved = self.transfer(slot, block, to_file);
        let unmapped = self.unmap(slot);
        moved.and(unmapped)
    }

    /// True for the device's ports.
    pub fn claims(port: u16) -> bool {
        port == BLOCK_PORT_PAGE || port == BLOCK_PORT_BLOCK || port == BLOCK_PORT_CMD
    }

    /// A port write from vCPU `vcpu`.
    pub fn io_out(&self, vcpu: u32, port: u16, data: &[u8]) {
        let value = data
            .iter()
            .rev()
            .fold(0u32, |acc, b| (acc << 8) | *b as u32);
        let mut regs = self.regs.lock_or_recover();
        let Some(r) = regs.get_mut(vcpu as usize) else {
            return;
        };
        match port {
            BLOCK_PORT_PAGE => r.0 = value,
            BLOCK_PORT_BLOCK => r.1 = value,
            BLOCK_PORT_CMD => {
                let (page, block) = (r.0 as u64, r.1 as u64);
                drop(regs);
                let outcome = self.command(vcpu, value as u8, page, block);
                let mut stats = self.stats.lock_or_recover();
                let status = match &outcome {
                    Ok(()) => {
                        if value as u8 == CMD_WRITE {
                            stats.blocks_written += 1;
                        } else {
                            stats.blocks_read += 1;
                        }
                        Status::Ok
                    }
                    Err(e) => {
                        stats.errors += 1;
                        let status = e.status();
                        if status == Status::Refused {
                            stats.refused += 1;
                        }
                        log::warn!("vCPU {vcpu}: block request refused: {e}");
                        status
                    }
                };
                let mut regs = self.regs.lock_or_recover();
                if let Some(r) = regs.get_mut(vcpu as usize) {
                    r.2 = status as u8;
                }
            }
            _ => {}
        }
    }

    /// vCPU `vcpu`'s registers: its page and block arguments and the
    /// status of its last command.
    pub fn regs_of(&self, vcpu: u32) -> Option<(u32, u32, u8)> {
        self.regs.lock_or_recover().get(vcpu as usize).copied()
    }

    /// Sets vCPU `vcpu`'s registers (a restored vCPU's, before it runs).
    pub fn set_regs_of(&self, vcpu: u32, regs: (u32, u32, u8)) {
        if let Some(r) = self.regs.lock_or_recover().get_mut(vcpu as usize) {
            *r = regs;
        }
    }

    /// A port read from vCPU `vcpu`: the status of its last command.
    pub fn io_in(&self, vcpu: u32, port: u16) -> u8 {
        if port != BLOCK_PORT_CMD {
            return 0xff;
        }
        self.regs
            .lock_or_recover()
            .get(vcpu as usize)
            .map_or(0xff, |r| r.2)
    }
}

impl Drop for BlockDevice {
    fn drop(&mut self) {
        // Release the kernel's pins before guest RAM can go away.
        let r = self.ring.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = r.ring.submitter().unregister_buffers();
        for pin in r.slots.iter_mut().filter_map(Option::take) {
            let _ = self.ram.unpin(pin);
        }
    }
}
