//! permessage-deflate (RFC 7692) without compression state between
//! messages: what the handshake agrees to, and the client's compressed
//! messages turned back into plain frames for the WebSocket parser.
//!
//! Both directions use "no context takeover", so a message compresses to
//! the same bytes for every recipient (the server compresses it once) and
//! no connection keeps a zlib stream while it is idle. The zlib calls
//! themselves are the caller's (`Inflate`), so this stays testable.

use tungstenite::protocol::frame::coding::OpCode;
use tungstenite::protocol::frame::FrameHeader;

use crate::frame_guard::Violation;

/// What the server agreed to for one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreement {
    /// The largest LZ77 window the client can take (`server_max_window_bits`).
    pub window_bits: u8,
    /// The `Sec-WebSocket-Extensions` value of the 101.
    pub response: String,
}

/// zlib cannot make a raw deflate stream with a 256-byte window (it uses
/// 512), so an offer that demands one is declined.
const MIN_WINDOW_BITS: u8 = 9;
const MAX_WINDOW_BITS: u8 = 15;

/// Picks the first `permessage-deflate` offer of the request's
/// `Sec-WebSocket-Extensions` values that can be honoured; offers with an
/// unknown, repeated or malformed parameter are declined, as RFC 7692
/// section 5 requires.
pub fn negotiate<'a>(headers: impl IntoIterator<Item = &'a [u8]>) -> Option<Agreement> {
    headers
        .into_iter()
        .filter_map(|h| std::str::from_utf8(h).ok())
        .flat_map(|h| h.split(','))
        .find_map(accept_offer)
}

fn accept_offer(offer: &str) -> Option<Agreement> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case("permessage-deflate") {
        return None;
    }
    let mut seen: Vec<String> = Vec::new();
    let mut window_bits = None;
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(unquote(v.trim())?)),
            None => (param, None),
        };
        let name = name.to_ascii_lowercase();
        if seen.contains(&name) {
            return None;
        }
        match (name.as_str(), value) {
            ("server_no_context_takeover" | "client_no_context_takeover", None) => {}
            ("server_max_window_bits", Some(v)) => window_bits = Some(bits(v)?),
            // The client says it can limit its window; ours to inflate with
            // is the largest anyway.
            ("client_max_window_bits", None) => {}
            ("client_max_window_bits", Some(v)) => {
                bits(v)?;
            }
            _ => return None,
        }
        seen.push(name);
    }
    if window_bits.is_some_and(|b| b < MIN_WINDOW_BITS) {
        return None;
    }
    let mut response =
        String::from("permessage-deflate; server_no_context_takeover; client_no_context_takeover");
    if let Some(b) = window_bits {
        response.push_str(&format!("; server_max_window_bits={b}"));
    }
    Some(Agreement {
        window_bits: window_bits.unwrap_or(MAX_WINDOW_BITS),
        response,
    })
}

fn unquote(v: &str) -> Option<&str> {
    match v.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"'),
        None => Some(v),
    }
}

/// A window size parameter: 8 to 15, digits only (RFC 7692 7.1.2).
fn bits(v: &str) -> Option<u8> {
    if v.is_empty() || v.len() > 2 || !v.bytes().all(|b| b.is_ascii_digit()) || v.starts_with('0') {
        return None;
    }
    v.parse().ok().filter(|b| (8..=MAX_WINDOW_BITS).contains(b))
}

/// Why a compressed message could not be inflated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates past the message limit (a bomb stops there).
    TooBig,
    /// It is not a deflate stream.
    Corrupt,
}

/// Inflates one whole message (its payload with the `00 00 ff ff` tail put
/// back), producing at most `limit` bytes.
pub trait Inflate {
    fn inflate(&mut self, compressed: &[u8], limit: usize) -> Result<Vec<u8>, InflateError>;
}

/// The tail a sender strips from each compressed message (RFC 7692 7.2.1).
pub const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

const MAX_HEADER: usize = 14;

/// The frame being read.
struct Frame {
    fin: bool,
    /// Part of a compressed message: its payload is collected, unmasked.
    compressed: bool,
    remaining: u64,
    mask: [u8; 4],
    /// Bytes of payload unmasked so far (the mask key's phase).
    done: u64,
}

/// Turns the client's stream into one the WebSocket parser understands:
/// control frames and uncompressed messages pass as they are; a compressed
/// message is collected and passed on, once whole, as one plain frame.
/// Expects a stream the frame guard has already checked (RSV1 only on the
/// first frame of a data message).
pub struct Unframer {
    max_message: usize,
    header: [u8; MAX_HEADER],
    have: usize,
    frame: Option<Frame>,
    /// The compressed message being collected: its opcode and payload.
    message: Option<(u8, Vec<u8>)>,
    /// An uncompressed message has begun and not ended (its frames pass).
    plain_open: bool,
}

impl Unframer {
    pub fn new(max_message: usize) -> Self {
        Unframer {
            max_message,
            header: [0; MAX_HEADER],
            have: 0,
            frame: None,
            message: None,
            plain_open: false,
        }
    }

    /// Passes `data` on into `out`, inflating compressed messages as they
    /// complete. An error is the close the connection gets.
    pub fn feed(
        &mut self,
        mut data: &[u8],
        out: &mut Vec<u8>,
        inflater: &mut dyn Inflate,
    ) -> Result<(), Violation> {
        while !data.is_empty() {
            match &mut self.frame {
                None => {
                    self.header[self.have] = data[0];
                    self.have += 1;
                    data = &data[1..];
                    if let Some(frame) = self.take_header(out)? {
                        if frame.remaining == 0 {
                            self.end_frame(&frame, out, inflater)?;
                        } else {
                            self.frame = Some(frame);
                        }
                    }
                }
                Some(frame) => {
                    let take = frame.remaining.min(data.len() as u64) as usize;
                    let (now, rest) = data.split_at(take);
                    data = rest;
                    frame.remaining -= take as u64;
                    if frame.compressed {
                        let (_, buf) = self.message.as_mut().ok_or(Violation::ReservedBits)?;
                        if buf.len() + now.len() > self.max_message + TAIL.len() + 1024 {
                            return Err(Violation::TooBig);
                        }
                        buf.extend(
                            now.iter().enumerate().map(|(i, b)| {
                                b ^ frame.mask[((frame.done + i as u64) % 4) as usize]
                            }),
                        );
                        frame.done += take as u64;
                    } else {
                        out.extend_from_slice(now);
                    }
                    if frame.remaining == 0 {
                        let frame = self.frame.take().expect("a frame is being read");
                        self.end_frame(&frame, out, inflater)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A complete header: what its frame is. A frame that passes as it is
    /// has its header copied to `out` now.
    fn take_header(&mut self, out: &mut Vec<u8>) -> Result<Option<Frame>, Violation> {
        let h = &self.header[..self.have];
        if h.len() < 2 {
            return Ok(None);
        }
        let ext = match h[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let len_end = 2 + ext;
        if h.len() < len_end + 4 {
            return Ok(None);
        }
        let remaining = match ext {
            0 => u64::from(h[1] & 0x7f),
            _ => h[2..len_end]
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)),
        };
        let (fin, rsv1, opcode) = (h[0] & 0x80 != 0, h[0] & 0x40 != 0, h[0] & 0x0f);
        let control = opcode & 0x08 != 0;
        // A message's frames may only be interleaved with control frames
        // (RFC 6455 5.4); the parser never sees a compressed message's, so
        // this is checked here.
        let open = self.message.is_some() || self.plain_open;
        let compressed = !control
            && match (opcode, rsv1) {
                (_, _) if opcode != 0 && open => return Err(Violation::Interleaved),
                (0, _) => self.message.is_some(),
                (_, true) => {
                    self.message = Some((opcode, Vec::new()));
                    true
                }
                (_, false) => false,
            };
        if !control && !compressed {
            self.plain_open = !fin;
        }
        let mut mask = [0; 4];
        mask.copy_from_slice(&h[len_end..len_end + 4]);
        if !compressed {
            out.extend_from_slice(h);
        }
        self.have = 0;
        Ok(Some(Frame {
            fin,
            compressed,
            remaining,
            mask,
            done: 0,
        }))
    }

    /// The last frame of a compressed message is in: inflate it and pass it
    /// on as one unfragmented frame (masked with a zero key, as the parser
    /// requires client frames to be masked).
    fn end_frame(
        &mut self,
        frame: &Frame,
        out: &mut Vec<u8>,
        inflater: &mut dyn Inflate,
    ) -> Result<(), Violation> {
        if !(frame.compressed && frame.fin) {
            return Ok(());
        }
        let (opcode, mut data) = self.message.take().ok_or(Violation::ReservedBits)?;
        data.extend_from_slice(&TAIL);
        let plain = inflater
            .inflate(&data, self.max_message)
            .map_err(|e| match e {
                InflateError::TooBig => Violation::TooBig,
                InflateError::Corrupt => Violation::BadCompression,
            })?;
        // Masked with a zero key: the parser wants client frames masked.
        let header = FrameHeader {
            opcode: OpCode::from(opcode),
            mask: Some([0; 4]),
            ..FrameHeader::default()
        };
        header
            .format(plain.len() as u64, out)
            .expect("writing to a Vec cannot fail");
        out.extend_from_slice(&plain);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(h: &str) -> Option<Agreement> {
        negotiate([h.as_bytes()])
    }

    #[test]
    fn takes_the_browsers_offer() {
        let a = offer("permessage-deflate; client_max_window_bits").unwrap();
        assert_eq!(a.window_bits, 15);
        assert_eq!(
            a.response,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
    }

    #[test]
    fn honours_the_server_window_or_declines() {
        let a = offer("permessage-deflate; server_max_window_bits=10").unwrap();
        assert_eq!(a.window_bits, 10);
        assert!(a.response.ends_with("; server_max_window_bits=10"));
        assert_eq!(
            offer("permessage-deflate; server_max_window_bits=\"12\"")
                .unwrap()
                .window_bits,
            12
        );
        // 8 cannot be honoured with zlib; the next offer is taken.
        let a = offer("permessage-deflate; server_max_window_bits=8, permessage-deflate").unwrap();
        assert_eq!(a.window_bits, 15);
        assert_eq!(offer("permessage-deflate; server_max_window_bits=8"), None);
    }

    #[test]
    fn declines_bad_offers() {
        for bad in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; unknown",
            "x-webkit-deflate-frame",
            "",
        ] {
            assert_eq!(offer(bad), None, "{bad}");
        }
        assert_eq!(
            negotiate(["foo".as_bytes(), "permessage-deflate".as_bytes()])
                .unwrap()
                .window_bits,
            15
        );
    }

    /// "Compression" for the tests: the payload is the text, tail included.
    struct Identity;

    impl Inflate for Identity {
        fn inflate(&mut self, c: &[u8], limit: usize) -> Result<Vec<u8>, InflateError> {
            let body = c.strip_suffix(&TAIL).ok_or(InflateError::Corrupt)?;
            if body == b"bad" {
                return Err(InflateError::Corrupt);
            }
            if body.len() > limit {
                return Err(InflateError::TooBig);
            }
            Ok(body.to_vec())
        }
    }

    const MASK: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

    fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![b0, 0x80 | payload.len() as u8];
        f.extend_from_slice(&MASK);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
        f
    }

    fn plain(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![b0, 0x80 | payload.len() as u8, 0, 0, 0, 0];
        f.extend_from_slice(payload);
        f
    }

    fn run(stream: &[u8], chunk: usize) -> Result<Vec<u8>, Violation> {
        let mut u = Unframer::new(100);
        let mut out = Vec::new();
        for c in stream.chunks(chunk) {
            u.feed(c, &mut out, &mut Identity)?;
        }
        Ok(out)
    }

    #[test]
    fn compressed_messages_become_plain_frames_in_any_chunking() {
        let mut stream = frame(0xc1, b"hello");
        stream.extend(frame(0x89, b"ping"));
        stream.extend(frame(0x01, b"plain "));
        stream.extend(frame(0x80, b"text"));
        stream.extend(frame(0x41, b"frag"));
        stream.extend(frame(0x8a, b"pong"));
        stream.extend(frame(0x00, b"men"));
        stream.extend(frame(0x80, b"ted"));
        let mut want = plain(0x81, b"hello");
        want.extend(frame(0x89, b"ping"));
        want.extend(frame(0x01, b"plain "));
        want.extend(frame(0x80, b"text"));
        want.extend(frame(0x8a, b"pong"));
        want.extend(plain(0x81, b"fragmented"));
        for chunk in [1, 2, 3, 5, 64, stream.len()] {
            assert_eq!(run(&stream, chunk), Ok(want.clone()), "chunk {chunk}");
        }
    }

    #[test]
    fn messages_do_not_interleave() {
        let compressed_then_plain = [frame(0x41, b"comp"), frame(0x81, b"plain")].concat();
        let compressed_then_compressed = [frame(0x41, b"a"), frame(0xc1, b"b")].concat();
        let plain_then_compressed = [frame(0x01, b"a"), frame(0xc1, b"b")].concat();
        let plain_then_plain = [frame(0x01, b"a"), frame(0x81, b"b")].concat();
        for stream in [
            compressed_then_plain,
            compressed_then_compressed,
            plain_then_compressed,
            plain_then_plain,
        ] {
            assert_eq!(run(&stream, 1), Err(Violation::Interleaved));
        }
        // A plain message's continuation passes; so does one after it ended.
        let plain = [frame(0x01, b"a"), frame(0x80, b"b"), frame(0xc1, b"c")].concat();
        assert!(run(&plain, 2).is_ok());
    }

    #[test]
    fn bad_and_oversized_messages_are_refused() {
        assert_eq!(run(&frame(0xc1, b"bad"), 3), Err(Violation::BadCompression));
        let big = [b'x'; 101];
        let mut stream = frame(0x41, &big[..60]);
        stream.extend(frame(0x80, &big[60..]));
        assert_eq!(run(&stream, 7), Err(Violation::TooBig));
        assert!(run(&frame(0xc1, &big[..100]), 7).is_ok());
    }
}
