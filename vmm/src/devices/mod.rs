//! Port-I/O devices each vCPU thread decodes: the COM1 serial line, the
//! structured control port, the io_uring block device, and the ROM's
//! guard (guest writes to read-only memory, refused); and memory shared
//! with the host.

pub mod block;
pub mod control_port;
pub mod rom;
pub mod serial;
pub mod shared_mem;
