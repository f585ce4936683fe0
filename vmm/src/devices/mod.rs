//! Port-I/O devices each vCPU thread decodes: the COM1 serial line, the
//! structured control port, and the io_uring block device.

pub mod block;
pub mod control_port;
pub mod serial;
