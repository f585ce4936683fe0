//! The guest-to-VMM control port: a per-vCPU latch for the 64-bit argument
//! and the decoding of event codes (protocol in `guest_protocol::control`).

use guest_protocol::control::{Event, ARG_HI_PORT, ARG_LO_PORT, CONTROL_PORT};

/// What a port write on the control ports amounted to.
#[derive(Debug, PartialEq, Eq)]
pub enum ControlWrite {
    /// An argument half was latched.
    Latched,
    /// A complete event.
    Event(Event, u64),
    /// An event code the protocol does not know.
    Unknown(u32),
    /// A write of the wrong width.
    BadWidth(u16, usize),
}

/// One vCPU's control-port state.
#[derive(Default, Debug)]
pub struct ControlLatch {
    lo: u32,
    hi: u32,
}

impl ControlLatch {
    /// A latch holding the argument halves `[lo, hi]` (a restored vCPU's).
    pub fn holding(arg: [u32; 2]) -> ControlLatch {
        ControlLatch {
            lo: arg[0],
            hi: arg[1],
        }
    }

    /// The argument halves it holds, `[lo, hi]`.
    pub fn arg(&self) -> [u32; 2] {
        [self.lo, self.hi]
    }

    /// True for the ports this device decodes.
    pub fn claims(port: u16) -> bool {
        matches!(port, CONTROL_PORT | ARG_LO_PORT | ARG_HI_PORT)
    }

    /// Handles an `out` to one of the control ports.
    pub fn write(&mut self, port: u16, data: &[u8]) -> ControlWrite {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return ControlWrite::BadWidth(port, data.len());
        };
        let v = u32::from_le_bytes(bytes);
        match port {
            ARG_LO_PORT => {
                self.lo = v;
                ControlWrite::Latched
            }
            ARG_HI_PORT => {
                self.hi = v;
                ControlWrite::Latched
            }
            _ => {
                let arg = (self.hi as u64) << 32 | self.lo as u64;
                self.lo = 0;
                self.hi = 0;
                match Event::from_u32(v) {
                    Some(e) => ControlWrite::Event(e, arg),
                    None => ControlWrite::Unknown(v),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latches_the_argument_then_decodes() {
        let mut l = ControlLatch::default();
        assert_eq!(
            l.write(ARG_LO_PORT, &7u32.to_le_bytes()),
            ControlWrite::Latched
        );
        assert_eq!(
            l.write(ARG_HI_PORT, &1u32.to_le_bytes()),
            ControlWrite::Latched
        );
        assert_eq!(
            l.write(CONTROL_PORT, &(Event::Done as u32).to_le_bytes()),
            ControlWrite::Event(Event::Done, (1 << 32) | 7)
        );
        // The latch is cleared after each event.
        assert_eq!(
            l.write(CONTROL_PORT, &(Event::Progress as u32).to_le_bytes()),
            ControlWrite::Event(Event::Progress, 0)
        );
        assert_eq!(
            l.write(CONTROL_PORT, &99u32.to_le_bytes()),
            ControlWrite::Unknown(99)
        );
        assert_eq!(
            l.write(CONTROL_PORT, &[1]),
            ControlWrite::BadWidth(CONTROL_PORT, 1)
        );
    }
}
