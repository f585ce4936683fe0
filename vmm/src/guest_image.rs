//! The guest kernel image: the embedded one built from `resources/guest`, or
//! another ELF given with `--kernel`, checked and loaded into guest RAM.

use crate::config::KernelSource;
use guest_mem::GuestRam;
use guest_protocol::layout::{KERNEL_GPA, WORK_GPA};
use linux_loader::loader::{elf::Elf, KernelLoader};
use std::io::Cursor;
use std::path::PathBuf;
use vm_memory::GuestAddress;

/// The guest kernel built from `resources/guest` by `build.rs` (SSE off).
pub static GUEST_ELF: &[u8] = include_bytes!(env!("VMM_GUEST_ELF"));

/// Why a kernel image cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The file cannot be read.
    #[error("cannot read kernel {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not an ELF file for this machine.
    #[error("{0} is not a valid x86_64 ELF kernel: {1}")]
    NotElf(String, &'static str),
    /// A segment lies outside the area reserved for kernels.
    #[error("{name}: segment at {start:#x}..{end:#x} lies outside the kernel area {KERNEL_GPA:#x}..{WORK_GPA:#x}")]
    SegmentOutsideKernelArea {
        /// The image's name.
        name: String,
        /// First byte.
        start: u64,
        /// End (exclusive).
        end: u64,
    },
    /// The entry point lies outside the loaded segments' area.
    #[error("{0}: entry point {1:#x} lies outside the kernel area")]
    EntryOutsideKernelArea(String, u64),
    /// linux-loader refused the image.
    #[error("{0}: loading failed: {1}")]
    Load(String, linux_loader::loader::Error),
}

/// A kernel image in memory, with the name used in messages.
pub struct KernelImage {
    /// Shown in errors.
    pub name: String,
    /// The ELF bytes.
    pub bytes: Vec<u8>,
}

impl KernelImage {
    /// Reads the image `source` names.
    pub fn from_source(source: &KernelSource) -> Result<KernelImage, KernelError> {
        match source {
            KernelSource::Embedded => Ok(KernelImage {
                name: "embedded guest kernel".into(),
                bytes: GUEST_ELF.to_vec(),
            }),
            KernelSource::File(path) => Ok(KernelImage {
                name: path.display().to_string(),
                bytes: std::fs::read(path).map_err(|source| KernelError::Read {
                    path: path.clone(),
                    source,
                })?,
            }),
        }
    }

    /// Checks the ELF header and that every loadable segment and the entry
    /// point lie in the kernel area, so a kernel can never overwrite the
    /// boot structures or the work area.
    pub fn validate(&self) -> Result<u64, KernelError> {
        let b = &self.bytes;
        let bad = |why| KernelError::NotElf(self.name.clone(), why);
        let u16_at = |o: usize| b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
        let u32_at = |o: usize| {
            b.get(o..o + 4)
                .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        };
        let u64_at = |o: usize| {
            b.get(o..o + 8).map(|s| {
                let mut a = [0u8; 8];
                a.copy_from_slice(s);
                u64::from_le_bytes(a)
            })
        };
        if b.len() < 64 || &b[..4] != b"\x7fELF" {
            return Err(bad("no ELF magic"));
        }
        if b[4] != 2 || b[5] != 1 {
            return Err(bad("not a little-endian 64-bit ELF"));
        }
        if u16_at(18) != Some(62) {
            return Err(bad("machine is not x86_64"));
        }
        let entry = u64_at(24).ok_or_else(|| bad("truncated header"))?;
        let phoff = u64_at(32).ok_or_else(|| bad("truncated header"))? as usize;
        let phentsize = u16_at(54).ok_or_else(|| bad("truncated header"))? as usize;
        let phnum = u16_at(56).ok_or_else(|| bad("truncated header"))? as usize;
        if phentsize != 56 || phnum == 0 {
            return Err(bad("no usable program headers"));
        }
        let mut loads = 0;
        for i in 0..phnum {
            let o = phoff
                .checked_add(i * phentsize)
                .ok_or_else(|| bad("program header offset overflows"))?;
            let p_type = u32_at(o).ok_or_else(|| bad("truncated program headers"))?;
            if p_type != 1 {
                continue;
            }
            let offset = u64_at(o + 8).ok_or_else(|| bad("truncated program headers"))?;
            let paddr = u64_at(o + 24).ok_or_else(|| bad("truncated program headers"))?;
            let filesz = u64_at(o + 32).ok_or_else(|| bad("truncated program headers"))?;
            let memsz = u64_at(o + 40).ok_or_else(|| bad("truncated program headers"))?;
            if offset
                .checked_add(filesz)
                .is_none_or(|e| e > b.len() as u64)
            {
                return Err(bad("segment extends past the end of the file"));
            }
            let end = paddr
                .checked_add(memsz.max(filesz))
                .ok_or_else(|| bad("segment overflows"))?;
            if paddr < KERNEL_GPA || end > WORK_GPA {
                return Err(KernelError::SegmentOutsideKernelArea {
                    name: self.name.clone(),
                    start: paddr,
                    end,
                });
            }
            loads += 1;
        }
        if loads == 0 {
            return Err(bad("no loadable segment"));
        }
        if !(KERNEL_GPA..WORK_GPA).contains(&entry) {
            return Err(KernelError::EntryOutsideKernelArea(
                self.name.clone(),
                entry,
            ));
        }
        Ok(entry)
    }

    /// Validates the image, copies its segments into guest RAM and returns
    /// the entry point.
    pub fn load(&self, ram: &GuestRam) -> Result<GuestAddress, KernelError> {
        self.validate()?;
        let mut cursor = Cursor::new(&self.bytes[..]);
        let result = Elf::load(ram.memory(), None, &mut cursor, None)
            .map_err(|e| KernelError::Load(self.name.clone(), e))?;
        Ok(result.kernel_load)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_kernel_is_valid() {
        let k = KernelImage::from_source(&KernelSource::Embedded).expect("embedded");
        assert_eq!(k.validate().expect("valid"), KERNEL_GPA);
    }

    #[test]
    fn rejects_non_elf_and_foreign_machines() {
        let img = |bytes: Vec<u8>| KernelImage {
            name: "t".into(),
            bytes,
        };
        assert!(matches!(
            img(b"hello".to_vec()).validate(),
            Err(KernelError::NotElf(_, "no ELF magic"))
        ));
        let mut b = GUEST_ELF.to_vec();
        b[18] = 183; // aarch64
        assert!(matches!(
            img(b).validate(),
            Err(KernelError::NotElf(_, "machine is not x86_64"))
        ));
        let mut b = GUEST_ELF.to_vec();
        b.truncate(100);
        assert!(img(b).validate().is_err());
    }
}
