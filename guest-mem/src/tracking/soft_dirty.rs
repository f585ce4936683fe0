//! Soft-dirty: `/proc/self/clear_refs` (4) clears the bits, pagemap bit 55
//! reports pages written since. Kernels built without
//! `CONFIG_MEM_SOFT_DIRTY` accept the clear but never set the bit, so
//! support is detected by experiment.

use std::io::{Read, Seek, SeekFrom, Write};

/// Pagemap bit 55: soft-dirty.
pub const PM_SOFT_DIRTY: u64 = 1 << 55;

/// Clears every soft-dirty bit of this process.
pub fn clear_refs() -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/self/clear_refs")?
        .write_all(b"4")
}

/// Reads the pagemap entries of `pages` pages from host address `addr`.
pub fn pagemap_entries(addr: u64, pages: usize) -> std::io::Result<Vec<u64>> {
    let mut f = std::fs::File::open("/proc/self/pagemap")?;
    f.seek(SeekFrom::Start(addr / 4096 * 8))?;
    let mut buf = vec![0u8; pages * 8];
    f.read_exact(&mut buf)?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

/// True when this kernel tracks soft-dirty bits: clear them, write a fresh
/// page, and see whether pagemap reports it soft-dirty.
pub fn supported() -> bool {
    let mut page = vec![0u64; 1024];
    let addr = (page.as_ptr() as u64 + 4095) & !4095;
    // SAFETY: `addr` lies inside `page` (8 KiB, so a whole aligned page fits).
    unsafe { (addr as *mut u64).write_volatile(1) };
    if clear_refs().is_err() {
        return false;
    }
    // SAFETY: as above.
    unsafe { (addr as *mut u64).write_volatile(2) };
    let ok = pagemap_entries(addr, 1).is_ok_and(|e| e[0] & PM_SOFT_DIRTY != 0);
    page[0] = 0;
    ok
}
