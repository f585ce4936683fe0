//! Port-I/O devices each vCPU thread decodes: the COM1 serial line and the
//! structured control port.

pub mod control_port;
pub mod serial;
