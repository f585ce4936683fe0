//! Diff snapshots and chains.
//!
//! A diff snapshot stores only the pages whose content differs from its
//! parent chain's (including pages that became zero), with the explicit,
//! sorted list of those pages in `state.bin`: a hole in a diff's
//! `memory.bin` at a listed page means "now zero", and an unlisted page means
//! "unchanged". Opening a chain checks every link: the parent's id and
//! `state.bin` CRC must be the ones the child recorded.

use super::memory::{MemoryFile, MemoryFileError};
use super::state::{DiffDesc, SnapshotState};
use super::{read_state, SnapshotError};
use crate::oracle::MemoryImage;
use guest_mem::RamError;
use std::path::{Path, PathBuf};

/// Most links followed.
pub const MAX_CHAIN: usize = 64;
const PAGE: u64 = 4096;

/// One snapshot of a chain.
pub struct Link {
    /// Its directory.
    pub dir: PathBuf,
    /// Its state.
    pub state: SnapshotState,
    /// Its `state.bin` CRC.
    pub crc: u32,
    /// Its memory file.
    pub memory: MemoryFile,
}

/// A snapshot and its ancestors, newest first; the last link is a full
/// snapshot.
pub struct Chain {
    /// The links.
    pub links: Vec<Link>,
}

fn parent_path(child: &Path, parent_dir: &str) -> PathBuf {
    let p = PathBuf::from(parent_dir);
    if p.is_absolute() {
        p
    } else {
        child.parent().unwrap_or(Path::new(".")).join(p)
    }
}

impl Chain {
    /// Opens the snapshot in `dir` and every ancestor, checking each link.
    pub fn open(dir: &Path) -> Result<Chain, SnapshotError> {
        let mut links = Vec::new();
        let mut cur = dir.to_path_buf();
        loop {
            let (state, crc) = read_state(&cur)?;
            if let Some(last) = links.last() {
                let last: &Link = last;
                let want = last
                    .state
                    .diff
                    .as_ref()
                    .map(|d: &DiffDesc| (d.parent_id, d.parent_crc));
                if want != Some((state.id, crc)) {
                    return Err(SnapshotError::Incompatible(format!(
                        "{} is not the parent {} was taken from (id or state checksum differ)",
                        cur.display(),
                        last.dir.display()
                    )));
                }
                if state.machine.mem_bytes != last.state.machine.mem_bytes {
                    return Err(SnapshotError::Incompatible(format!(
                        "{} has another memory size than its diff",
                        cur.display()
                    )));
                }
            }
            let memory = MemoryFile::open(&cur.join("memory.bin"), state.machine.mem_bytes)?;
            let parent = state
                .diff
                .as_ref()
                .map(|d| parent_path(&cur, &d.parent_dir));
            links.push(Link {
                dir: cur.clone(),
                state,
                crc,
                memory,
            });
            match parent {
                None => return Ok(Chain { links }),
                Some(p) if links.len() < MAX_CHAIN => {
                    if !p.join("state.bin").exists() {
                        return Err(SnapshotError::Incompatible(format!(
                            "the parent of {} is missing: {}",
                            cur.display(),
                            p.display()
                        )));
                    }
                    cur = p;
                }
                Some(_) => {
                    return Err(SnapshotError::Incompatible(format!(
                        "diff chain longer than {MAX_CHAIN} snapshots"
                    )))
                }
            }
        }
    }

    /// The newest snapshot.
    pub fn head(&self) -> &Link {
        &self.links[0]
    }

    /// True when the chain has diffs.
    pub fn is_diff(&self) -> bool {
        self.links.len() > 1
    }

    /// The index of the link that holds `page`: the newest diff listing it,
    /// else the full snapshot at the end.
    pub fn owner(&self, page: u64) -> usize {
        for (i, l) in self.links.iter().enumerate() {
            match &l.state.diff {
                Some(d) if d.pages.binary_search(&page).is_ok() => return i,
                Some(_) => continue,
                None => return i,
            }
        }
        self.links.len() - 1
    }

    /// Pages of `[start, end)` (bytes) that may hold data anywhere in the
    /// chain, without reading them: the full snapshot's data ranges and the
    /// diffs' listed pages.
    pub fn data_pages_in(&self, start: u64, end: u64) -> Result<Vec<u64>, MemoryFileError> {
        let mut out = Vec::new();
        for l in &self.links {
            match &l.state.diff {
                Some(d) => out.extend(
                    d.pages
                        .iter()
                        .copied()
                        .filter(|p| (start..end).contains(&(p * PAGE))),
                ),
                None => out.extend(l.memory.data_pages_in(start, end)?),
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// The memory image the chain describes, written into a memfd: the
    /// full snapshot's data, then each diff's listed pages from the oldest
    /// on (so `mmap` restores of a diff map one file). Checksums are not
    /// checked here (see [`Chain::verify`]).
    pub fn materialize(&self) -> Result<MemoryFile, MemoryFileError> {
        let head = &self.head().state;
        let image = MemoryFile::new_memfd(head.machine.mem_bytes)?;
        let mut page = vec![0u8; PAGE as usize];
        for link in self.links.iter().rev() {
            match &link.state.diff {
                None => {
                    link.memory.copy_data_into(&image)?;
                }
                Some(d) => {
                    for &p in &d.pages {
                        link.memory.read_at(p * PAGE, &mut page)?;
                        image.put_page(p, &page)?;
                    }
                }
            }
        }
        Ok(image)
    }

    /// Checks every chunk checksum of every link.
    pub fn verify(&self) -> Result<(), MemoryFileError> {
        for l in &self.links {
            l.memory.verify(&l.state.memory.chunk_crc)?;
        }
        Ok(())
    }
}

impl MemoryImage for Chain {
    fn read_at(&self, gpa: u64, buf: &mut [u8]) -> Result<(), RamError> {
        let mut done = 0usize;
        while done < buf.len() {
            let addr = gpa + done as u64;
            let in_page = (PAGE - addr % PAGE) as usize;
            let n = in_page.min(buf.len() - done);
            let link = &self.links[self.owner(addr / PAGE)];
            link.memory.read_at(addr, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }
}

/// Serves missing faults from a snapshot chain (the `uffd` restore mode):
/// each page from the newest snapshot that holds it; a chunk's checksum is
/// checked the first time anything is served from it, and a chunk that
/// fails is never served (its pages are poisoned).
pub struct ChainSource {
    chain: std::sync::Arc<Chain>,
    /// Per link, per chunk: 0 unchecked, 1 good, 2 bad.
    checked: Vec<Vec<std::sync::atomic::AtomicU8>>,
}

impl ChainSource {
    /// A source over `chain`.
    pub fn new(chain: std::sync::Arc<Chain>) -> ChainSource {
        let checked = chain
            .links
            .iter()
            .map(|l| {
                (0..l.state.memory.chunk_crc.len())
                    .map(|_| std::sync::atomic::AtomicU8::new(0))
                    .collect()
            })
            .collect();
        ChainSource { chain, checked }
    }

    /// Checks (once) the chunk of `link` holding guest page `page`.
    fn check_link(&self, link: usize, page: u64) -> Result<(), String> {
        use std::sync::atomic::Ordering;
        let chunk = page * PAGE / super::state::CHUNK_BYTES;
        let l = &self.chain.links[link];
        let start = chunk * super::state::CHUNK_BYTES;
        let bad = || {
            format!(
                "snapshot {}/memory.bin: checksum mismatch in chunk {chunk} (guest-physical {start:#x}..{:#x})",
                l.dir.display(),
                start + super::state::CHUNK_BYTES
            )
        };
        let Some(state) = self.checked[link].get(chunk as usize) else {
            return Err(format!("page {page:#x} lies beyond the snapshot"));
        };
        match state.load(Ordering::Acquire) {
            1 => Ok(()),
            2 => Err(bad()),
            _ => {
                let ok = l
                    .memory
                    .chunk_crc(chunk)
                    .is_ok_and(|crc| Some(&crc) == l.state.memory.chunk_crc.get(chunk as usize));
                state.store(if ok { 1 } else { 2 }, Ordering::Release);
                if ok {
                    Ok(())
                } else {
                    Err(bad())
                }
            }
        }
    }
}

impl guest_mem::PageSource for ChainSource {
    fn check(&self, gpa: u64) -> Result<(), String> {
        let page = gpa / PAGE;
        self.check_link(self.chain.owner(page), page)
    }

    fn fill(&self, gpa: u64, buf: &mut [u8]) -> Result<(), String> {
        // One read per run of pages held by the same link.
        let pages = buf.len() as u64 / PAGE;
        let mut i = 0;
        while i < pages {
            let first = gpa / PAGE + i;
            let link = self.chain.owner(first);
            let mut n = 1;
            while i + n < pages && self.chain.owner(first + n) == link {
                n += 1;
            }
            for p in first..first + n {
                // Cheap after the first page of each chunk.
                self.check_link(link, p)?;
            }
            let range = (i * PAGE) as usize..((i + n) * PAGE) as usize;
            self.chain.links[link]
                .memory
                .read_at(first * PAGE, &mut buf[range])
                .map_err(|e| format!("reading the snapshot at {:#x}: {e}", first * PAGE))?;
            i += n;
        }
        Ok(())
    }
}
