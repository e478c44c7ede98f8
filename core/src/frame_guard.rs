//! Checks each client frame header as soon as its bytes arrive, before the
//! payload is read. tungstenite checks the same rules only once a whole frame
//! is buffered, so a client could otherwise make the server wait for (and
//! hold) a payload that can only be refused: a 126-byte ping, a reserved
//! opcode, or a frame longer than the message limit.

use std::fmt;

/// What a header broke, and the close code that answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    ReservedBits,
    ReservedOpcode,
    Unmasked,
    ControlTooLong,
    FragmentedControl,
    /// A 64-bit length with its top bit set (RFC 6455 5.2).
    BadLength,
    TooBig,
    /// A compressed message that does not inflate (permessage-deflate).
    BadCompression,
    /// A new data message before the last one's final frame.
    Interleaved,
}

impl Violation {
    pub fn close_code(self) -> u16 {
        match self {
            Violation::TooBig => 1009,
            Violation::BadCompression => 1007,
            _ => 1002,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Violation::ReservedBits => "reserved bits set",
            Violation::ReservedOpcode => "reserved opcode",
            Violation::Unmasked => "unmasked client frame",
            Violation::ControlTooLong => "control frame too long",
            Violation::FragmentedControl => "fragmented control frame",
            Violation::BadLength => "invalid frame length",
            Violation::TooBig => "message too big",
            Violation::BadCompression => "invalid compressed data",
            Violation::Interleaved => "new message inside a fragmented one",
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for Violation {}

const MAX_HEADER: usize = 14;

enum State {
    Header { buf: [u8; MAX_HEADER], have: usize },
    Payload { remaining: u64 },
}

/// Follows frame boundaries in the client's byte stream.
pub struct FrameGuard {
    max_payload: u64,
    /// permessage-deflate was agreed: RSV1 marks a compressed message, on
    /// its first frame only.
    deflate: bool,
    state: State,
}

impl FrameGuard {
    /// `max_payload`: the longest data frame accepted.
    pub fn new(max_payload: u64) -> Self {
        FrameGuard {
            max_payload,
            deflate: false,
            state: State::Header {
                buf: [0; MAX_HEADER],
                have: 0,
            },
        }
    }

    /// The connection agreed to permessage-deflate.
    pub fn allow_compression(&mut self) {
        self.deflate = true;
    }

    /// Scans the next bytes of the stream. Returns how many of them may be
    /// handed on, and the violation found right after those, if any.
    pub fn scan(&mut self, data: &[u8]) -> (usize, Option<Violation>) {
        let mut pos = 0;
        // Where the header being read started in `data` (0 if it began in
        // an earlier chunk).
        let mut header_start = 0;
        while pos < data.len() {
            match &mut self.state {
                State::Payload { remaining } => {
                    let take = (*remaining).min((data.len() - pos) as u64);
                    *remaining -= take;
                    pos += take as usize;
                    if *remaining == 0 {
                        self.state = State::Header {
                            buf: [0; MAX_HEADER],
                            have: 0,
                        };
                        header_start = pos;
                    }
                }
                State::Header { buf, have } => {
                    buf[*have] = data[pos];
                    *have += 1;
                    pos += 1;
                    match check_header(&buf[..*have], self.max_payload, self.deflate) {
                        Ok(None) => {}
                        Ok(Some(len)) => {
                            self.state = State::Payload { remaining: len };
                            if len == 0 {
                                self.state = State::Header {
                                    buf: [0; MAX_HEADER],
                                    have: 0,
                                };
                                header_start = pos;
                            }
                        }
                        Err(v) => return (header_start, Some(v)),
                    }
                }
            }
        }
        (data.len(), None)
    }
}

/// `Ok(None)`: need more bytes; `Ok(Some(len))`: a complete, acceptable
/// header announcing `len` payload bytes.
fn check_header(h: &[u8], max_payload: u64, deflate: bool) -> Result<Option<u64>, Violation> {
    if h.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (h[0], h[1]);
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0f;
    let control = opcode & 0x08 != 0;
    // RSV1 may open a compressed text or binary message; nothing else may
    // set a reserved bit (RFC 7692 6: not on continuations or control frames).
    let rsv1_ok = deflate && matches!(opcode, 1 | 2);
    if b0 & 0x30 != 0 || (b0 & 0x40 != 0 && !rsv1_ok) {
        return Err(Violation::ReservedBits);
    }
    if matches!(opcode, 3..=7 | 0xb..=0xf) {
        return Err(Violation::ReservedOpcode);
    }
    if b1 & 0x80 == 0 {
        return Err(Violation::Unmasked);
    }
    if control && !fin {
        return Err(Violation::FragmentedControl);
    }
    let (ext, short) = match b1 & 0x7f {
        126 => (2, None),
        127 => (8, None),
        n => (0, Some(u64::from(n))),
    };
    if control && short.is_none_or(|n| n > 125) {
        return Err(Violation::ControlTooLong);
    }
    if h.len() < 2 + ext + 4 {
        return Ok(None);
    }
    let len = short.unwrap_or_else(|| {
        h[2..2 + ext]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    });
    if ext == 8 && len >> 63 != 0 {
        return Err(Violation::BadLength);
    }
    if len > max_payload {
        return Err(Violation::TooBig);
    }
    Ok(Some(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [1, 2, 3, 4];

    fn frame(b0: u8, len: usize) -> Vec<u8> {
        let mut f = vec![b0];
        match len {
            0..=125 => f.push(0x80 | len as u8),
            126..=0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&MASK);
        f.extend(std::iter::repeat_n(b'x', len));
        f
    }

    #[test]
    fn valid_frames_pass_whole_in_any_chunking() {
        let mut stream = frame(0x01, 5);
        stream.extend(frame(0x89, 125));
        stream.extend(frame(0x00, 0));
        stream.extend(frame(0x80, 300));
        stream.extend(frame(0x88, 2));
        for chunk in [1, 2, 3, 7, 64, stream.len()] {
            let mut g = FrameGuard::new(1024);
            for part in stream.chunks(chunk) {
                assert_eq!(g.scan(part), (part.len(), None), "chunk size {chunk}");
            }
        }
    }

    #[test]
    fn header_violations_are_found_before_the_payload() {
        let cases: &[(&[u8], Violation)] = &[
            (&[0xc1, 0x80], Violation::ReservedBits),
            (&[0x83, 0x80], Violation::ReservedOpcode),
            (&[0x8b, 0x80], Violation::ReservedOpcode),
            (&[0x81, 0x05], Violation::Unmasked),
            (&[0x09, 0x80], Violation::FragmentedControl),
            (&[0x89, 0xfe], Violation::ControlTooLong),
            (&[0x88, 0xff], Violation::ControlTooLong),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                FrameGuard::new(1024).scan(bytes),
                (0, Some(*want)),
                "{bytes:02x?}"
            );
        }
        // 126 announced by a 16-bit length: refused without a payload byte.
        let mut g = FrameGuard::new(1 << 20);
        assert_eq!(
            g.scan(&[0x89, 0xfe, 0, 126]),
            (0, Some(Violation::ControlTooLong))
        );
    }

    #[test]
    fn long_frames_are_refused_from_the_header() {
        let mut g = FrameGuard::new(1024);
        let header = &frame(0x81, 1025)[..8];
        assert_eq!(g.scan(header), (0, Some(Violation::TooBig)));
        let mut g = FrameGuard::new(u64::MAX);
        let mut huge = vec![0x81, 0xff];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        huge.extend_from_slice(&MASK);
        assert_eq!(g.scan(&huge), (0, Some(Violation::BadLength)));
        assert_eq!(FrameGuard::new(1024).scan(&frame(0x81, 1024)).1, None);
    }

    #[test]
    fn good_frames_before_a_bad_one_are_handed_on() {
        let mut stream = frame(0x81, 3);
        let good = stream.len();
        stream.extend_from_slice(&[0x83, 0x80, 0, 0, 0, 0]);
        let mut g = FrameGuard::new(1024);
        assert_eq!(g.scan(&stream), (good, Some(Violation::ReservedOpcode)));
    }

    #[test]
    fn a_header_split_across_chunks_is_refused_when_complete() {
        let mut g = FrameGuard::new(1024);
        let first = frame(0x81, 2);
        assert_eq!(g.scan(&first), (first.len(), None));
        assert_eq!(g.scan(&[0x89]), (1, None));
        assert_eq!(g.scan(&[0xfe]), (0, Some(Violation::ControlTooLong)));
    }

    #[test]
    fn rsv1_only_opens_a_message_and_only_with_deflate() {
        let mut g = FrameGuard::new(1000);
        g.allow_compression();
        let stream: Vec<u8> = [
            frame(0xc1, 3),
            frame(0x41, 2),
            frame(0x80, 2),
            frame(0xc2, 1),
        ]
        .concat();
        assert_eq!(g.scan(&stream), (stream.len(), None));
        for b0 in [0xc0, 0xc9, 0xca, 0xa1, 0x91] {
            let mut g = FrameGuard::new(1000);
            g.allow_compression();
            assert_eq!(
                g.scan(&frame(b0, 0)),
                (0, Some(Violation::ReservedBits)),
                "{b0:#x}"
            );
        }
        let mut plain = FrameGuard::new(1000);
        assert_eq!(
            plain.scan(&frame(0xc1, 1)),
            (0, Some(Violation::ReservedBits))
        );
    }

    #[test]
    fn close_codes() {
        assert_eq!(Violation::TooBig.close_code(), 1009);
        assert_eq!(Violation::Unmasked.close_code(), 1002);
        assert_eq!(Violation::BadCompression.close_code(), 1007);
    }
}
