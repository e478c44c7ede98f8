//! WebSocket frame headers as a client sees them (RFC 6455 section 5.2):
//! server frames are parsed in place from the read buffer, and the few frames
//! a receiving client sends (pong, close) are built masked on the stack.

/// Frame kinds; the reserved opcodes are rejected while parsing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl Opcode {
    fn from_bits(b: u8) -> Option<Opcode> {
        Some(match b {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            Opcode::Continuation => 0x0,
            Opcode::Text => 0x1,
            Opcode::Binary => 0x2,
            Opcode::Close => 0x8,
            Opcode::Ping => 0x9,
            Opcode::Pong => 0xA,
        }
    }

    pub fn is_control(self) -> bool {
        matches!(self, Opcode::Close | Opcode::Ping | Opcode::Pong)
    }
}

/// A parsed frame header: the payload is `buf[head_len..head_len + payload_len]`.
#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    pub fin: bool,
    /// RSV1: a permessage-deflate message (whether that was agreed is the
    /// receiver's to check).
    pub compressed: bool,
    pub opcode: Opcode,
    pub head_len: usize,
    pub payload_len: usize,
}

impl Head {
    pub fn frame_len(&self) -> usize {
        self.head_len + self.payload_len
    }
}

/// Longest control frame payload (RFC 6455 5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Largest frame or message accepted: far above anything either server sends
/// here, low enough that a corrupt length cannot make us allocate gigabytes.
pub const MAX_MESSAGE: usize = 16 << 20;

/// Parses the header at the start of `buf`. `Ok(None)`: not all of the
/// header has arrived yet (the payload may still be incomplete on `Ok(Some)`).
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, &'static str> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    // RSV1 is permessage-deflate's; no extension uses the others.
    if b0 & 0x30 != 0 {
        return Err("reserved bits set");
    }
    let opcode = Opcode::from_bits(b0 & 0x0F).ok_or("reserved opcode")?;
    if b1 & 0x80 != 0 {
        return Err("masked frame from the server");
    }
    let (head_len, len) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (4, u64::from(u16::from_be_bytes([b[0], b[1]]))),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => (10, u64::from_be_bytes(b.try_into().expect("8 bytes"))),
            None => return Ok(None),
        },
        n => (2, u64::from(n)),
    };
    let fin = b0 & 0x80 != 0;
    if opcode.is_control() && (!fin || len > MAX_CONTROL_PAYLOAD as u64) {
        return Err("fragmented or oversized control frame");
    }
    if len > MAX_MESSAGE as u64 {
        return Err("frame too large");
    }
    Ok(Some(Head {
        fin,
        compressed: b0 & 0x40 != 0,
        opcode,
        head_len,
        payload_len: len as usize,
    }))
}

/// Longest frame `control_frame` builds: 2 header bytes, 4 mask bytes, payload.
pub const CONTROL_FRAME_MAX: usize = 6 + MAX_CONTROL_PAYLOAD;

/// A masked client control frame (pong, close): clients must mask every frame.
/// Returns the buffer and the frame's length in it.
pub fn control_frame(
    opcode: Opcode,
    payload: &[u8],
    key: [u8; 4],
) -> ([u8; CONTROL_FRAME_MAX], usize) {
    debug_assert!(opcode.is_control() && payload.len() <= MAX_CONTROL_PAYLOAD);
    let mut f = [0u8; CONTROL_FRAME_MAX];
    f[0] = 0x80 | opcode.bits();
    f[1] = 0x80 | payload.len() as u8;
    f[2..6].copy_from_slice(&key);
    for (i, (out, b)) in f[6..].iter_mut().zip(payload).enumerate() {
        *out = b ^ key[i % 4];
    }
    (f, 6 + payload.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(fin: bool, opcode: Opcode, head_len: usize, payload_len: usize) -> Head {
        Head {
            fin,
            compressed: false,
            opcode,
            head_len,
            payload_len,
        }
    }

    #[test]
    fn short_lengths() {
        assert_eq!(
            parse_head(&[0x81, 5, b'h']),
            Ok(Some(head(true, Opcode::Text, 2, 5)))
        );
        assert_eq!(
            parse_head(&[0x82, 125]),
            Ok(Some(head(true, Opcode::Binary, 2, 125)))
        );
    }

    #[test]
    fn sixteen_bit_length() {
        assert_eq!(
            parse_head(&[0x81, 126, 0x01, 0x00]),
            Ok(Some(head(true, Opcode::Text, 4, 256)))
        );
        assert_eq!(
            parse_head(&[0x81, 126, 0xFF, 0xFF]),
            Ok(Some(head(true, Opcode::Text, 4, 65535)))
        );
    }

    #[test]
    fn sixty_four_bit_length() {
        let f = [0x81, 127, 0, 0, 0, 0, 0, 0x01, 0x00, 0x00];
        assert_eq!(
            parse_head(&f),
            Ok(Some(head(true, Opcode::Text, 10, 65536)))
        );
        let huge = [0x81, 127, 0, 0, 0, 1, 0, 0, 0, 0];
        assert_eq!(parse_head(&huge), Err("frame too large"));
    }

    #[test]
    fn incomplete_header() {
        assert_eq!(parse_head(&[]), Ok(None));
        assert_eq!(parse_head(&[0x81]), Ok(None));
        assert_eq!(parse_head(&[0x81, 126, 1]), Ok(None));
        assert_eq!(parse_head(&[0x81, 127, 0, 0, 0, 0, 0, 0, 1]), Ok(None));
    }

    #[test]
    fn fragments_and_control() {
        assert_eq!(
            parse_head(&[0x01, 3]),
            Ok(Some(head(false, Opcode::Text, 2, 3)))
        );
        assert_eq!(
            parse_head(&[0x80, 3]),
            Ok(Some(head(true, Opcode::Continuation, 2, 3)))
        );
        assert_eq!(
            parse_head(&[0x89, 0]),
            Ok(Some(head(true, Opcode::Ping, 2, 0)))
        );
        assert_eq!(
            parse_head(&[0x09, 0]),
            Err("fragmented or oversized control frame")
        );
        assert_eq!(
            parse_head(&[0x88, 126, 0, 126]),
            Err("fragmented or oversized control frame")
        );
    }

    #[test]
    fn protocol_errors() {
        assert_eq!(
            parse_head(&[0x81, 0x85, 1, 2, 3, 4]),
            Err("masked frame from the server")
        );
        assert_eq!(parse_head(&[0xA1, 0]), Err("reserved bits set"));
        assert!(parse_head(&[0xC1, 0]).unwrap().unwrap().compressed);
        assert_eq!(parse_head(&[0x83, 0]), Err("reserved opcode"));
        assert_eq!(parse_head(&[0x8B, 0]), Err("reserved opcode"));
    }

    #[test]
    fn masked_control_frame() {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        let (f, n) = control_frame(Opcode::Pong, b"Hello", key);
        // RFC 6455 5.7: a masked "Hello" with this key.
        assert_eq!(
            &f[..n],
            &[0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]
        );
        let (f, n) = control_frame(Opcode::Close, &[], key);
        assert_eq!(&f[..n], &[0x88, 0x80, 0x37, 0xfa, 0x21, 0x3d]);
    }
}
