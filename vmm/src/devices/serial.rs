//! A transmit-only COM1: bytes written to the data register are assembled
//! into lines; the line-status register always reads "transmitter empty".

/// Line-status value: transmit holding register and transmitter empty.
pub const LSR_IDLE: u8 = 0x60;
/// Longest line kept; longer output is split.
const MAX_LINE: usize = 4096;

/// Assembles one vCPU's serial bytes into lines.
#[derive(Default, Debug)]
pub struct LineAssembler {
    buf: Vec<u8>,
}

impl LineAssembler {
    /// Adds a byte; returns a complete line (without the newline) when one ends.
    pub fn push(&mut self, byte: u8) -> Option<String> {
        match byte {
            b'\n' => Some(self.take()),
            b'\r' => None,
            _ => {
                self.buf.push(byte);
                (self.buf.len() >= MAX_LINE).then(|| self.take())
            }
        }
    }

    /// Whatever is buffered without a newline yet.
    pub fn take(&mut self) -> String {
        let line = String::from_utf8_lossy(&self.buf).into_owned();
        self.buf.clear();
        line
    }

    /// True when nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembles_lines_and_splits_long_ones() {
        let mut a = LineAssembler::default();
        assert_eq!(a.push(b'h'), None);
        assert_eq!(a.push(b'\r'), None);
        assert_eq!(a.push(b'i'), None);
        assert_eq!(a.push(b'\n').as_deref(), Some("hi"));
        assert!(a.is_empty());
        let mut out = None;
        for _ in 0..MAX_LINE {
            out = out.or(a.push(b'x'));
        }
        assert_eq!(out.map(|l| l.len()), Some(MAX_LINE));
        a.push(0xff);
        assert_eq!(a.take(), "\u{fffd}");
    }
}
