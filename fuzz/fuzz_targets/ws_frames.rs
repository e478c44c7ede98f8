//! Client frames through tungstenite exactly as the module reads them
//! (src/session.rs): `WebSocket::from_partially_read(stream, prefix,
//! Role::Server, config)` with a 4 KiB read buffer, no write buffer and
//! 64 KiB message and frame limits, driven by `read()` over a non-blocking
//! in-memory stream.
//!
//! Input layout:
//!   byte 0  how many of the client bytes nginx had already read (the prefix)
//!   byte 1  flags: bit 0 the client closes the TCP stream at the end (else
//!           the socket just has nothing more), bit 1 expand runs (0xFE c v =
//!           v repeated (c + 1) * 256 times, to reach the 64 KiB limits;
//!           past 8 KiB of client bytes, read sizes are multiplied by 64),
//!           bit 2 every read is followed by one WouldBlock (edge-triggered)
//!   byte 2  number of read sizes (1..=8), then that many size bytes:
//!           0 = a spurious WouldBlock, 1..=127 bytes, or (c - 127) * 512
//!   rest    the bytes the client sent.
//!
//! Properties:
//! * no panic, and reading terminates;
//! * Text is valid UTF-8 and, like Binary, at most 64 KiB; control payloads
//!   at most 125 bytes;
//! * nothing is accepted from a client unless its first frame is masked;
//! * how the bytes are split across reads and WouldBlocks changes nothing:
//!   the same messages and the same final outcome as one single read;
//! * what the server wrote back (pongs, close replies) is well-formed for a
//!   client, and every pong echoes a ping payload.
#![no_main]

use std::io::{self, Read, Write};

use libfuzzer_sys::fuzz_target;
use tungstenite::error::Error as WsError;
use tungstenite::protocol::{Role, WebSocket, WebSocketConfig};
use tungstenite::Message;

const MAX_MESSAGE: usize = 64 * 1024;
/// Enough to cross the 64 KiB limits with room to spare.
const MAX_EXPANDED: usize = 80 * 1024;
/// Above this many client bytes, read sizes are scaled up: tungstenite
/// zero-fills up to 4 KiB of buffer per read, so byte-sized reads of 64 KiB
/// would make each run take seconds.
const COARSE_ABOVE: usize = 8 * 1024;

fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

/// A non-blocking socket: reads hand out fuzz-sized pieces, writes always
/// succeed into `out`.
struct Stream {
    data: Vec<u8>,
    pos: usize,
    sizes: Vec<usize>,
    next_size: usize,
    block_after_read: bool,
    blocked: bool,
    eof: bool,
    out: Vec<u8>,
}

impl Stream {
    fn new(data: Vec<u8>, sizes: Vec<usize>, block_after_read: bool, eof: bool) -> Self {
        Stream {
            data,
            pos: 0,
            sizes,
            next_size: 0,
            block_after_read,
            blocked: false,
            eof,
            out: Vec::new(),
        }
    }

    fn exhausted(&self) -> bool {
        self.pos == self.data.len()
    }
}

fn would_block() -> io::Error {
    io::Error::from(io::ErrorKind::WouldBlock)
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.blocked {
            self.blocked = false;
            return Err(would_block());
        }
        if self.exhausted() {
            return if self.eof { Ok(0) } else { Err(would_block()) };
        }
        let size = self.sizes[self.next_size % self.sizes.len()];
        self.next_size += 1;
        if size == 0 {
            return Err(would_block());
        }
        let n = size.min(buf.len()).min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        self.blocked = self.block_after_read;
        Ok(n)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Outcome {
    messages: Vec<Message>,
    /// How reading ended: an error's text, or "idle" for a WouldBlock with
    /// nothing left to deliver.
    end: String,
    written: Vec<u8>,
}

/// Reads the way the module does: on WouldBlock it flushes and waits for the
/// next read event (here: simply tries again while bytes remain).
fn drive(prefix: Vec<u8>, stream: Stream) -> Outcome {
    let limit = 4 * (stream.data.len() + prefix.len()) + 64 * stream.sizes.len() + 1000;
    let mut ws = WebSocket::from_partially_read(stream, prefix, Role::Server, Some(config()));
    let mut messages = Vec::new();
    let mut end = None;
    for _ in 0..limit {
        match ws.read() {
            Ok(m) => messages.push(m),
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                let _ = ws.flush();
                let s = ws.get_ref();
                if s.exhausted() && !s.blocked && !s.eof {
                    end = Some("idle".to_owned());
                    break;
                }
            }
            Err(e) => {
                end = Some(e.to_string());
                break;
            }
        }
    }
    // Like the module, read no more after an error: it closes the session
    // then. (tungstenite itself is not ready for it: a read after a
    // MessageTooLong error trips a debug assertion in FrameCodec::read_in,
    // because the too-long header stays pending with a full buffer.)
    let end = end.expect("read() made no progress");
    let written = std::mem::take(&mut ws.get_mut().out);
    Outcome {
        messages,
        end,
        written,
    }
}

fn expand(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i..] {
            [0xfe, c, v, ..] if out.len() < MAX_EXPANDED => {
                out.resize(out.len() + (usize::from(c) + 1) * 256, v);
                i += 3;
            }
            _ => {
                out.push(raw[i]);
                i += 1;
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let [prefix_len, flags, nsizes, rest @ ..] = data else {
        return;
    };
    let nsizes = usize::from(nsizes % 8) + 1;
    if rest.len() < nsizes {
        return;
    }
    let (size_bytes, body) = rest.split_at(nsizes);
    let mut sizes: Vec<usize> = size_bytes
        .iter()
        .map(|&c| match c {
            0..=127 => usize::from(c),
            _ => (usize::from(c) - 127) * 512,
        })
        .collect();
    if sizes.iter().all(|&s| s == 0) {
        sizes[0] = 1;
    }
    let eof = flags & 1 != 0;
    let bytes = if flags & 2 != 0 { expand(body) } else { body.to_vec() };
    if bytes.len() > COARSE_ABOVE {
        for s in &mut sizes {
            *s *= 64;
        }
    }
    let split = usize::from(*prefix_len).min(bytes.len());
    let (prefix, tail) = bytes.split_at(split);

    let got = drive(
        prefix.to_vec(),
        Stream::new(tail.to_vec(), sizes, flags & 4 != 0, eof),
    );
    let once = drive(
        Vec::new(),
        Stream::new(bytes.clone(), vec![bytes.len().max(1)], false, eof),
    );

    for m in &got.messages {
        match m {
            Message::Text(t) => {
                assert!(std::str::from_utf8(t.as_bytes()).is_ok());
                assert!(t.len() <= MAX_MESSAGE, "text of {} bytes", t.len());
            }
            Message::Binary(b) => assert!(b.len() <= MAX_MESSAGE, "binary of {} bytes", b.len()),
            Message::Ping(p) | Message::Pong(p) => assert!(p.len() <= 125),
            Message::Close(Some(c)) => assert!(c.reason.len() <= 123),
            Message::Close(None) => {}
            Message::Frame(_) => panic!("read() never yields raw frames"),
        }
    }
    if !got.messages.is_empty() {
        assert!(
            bytes.len() >= 2 && bytes[1] & 0x80 != 0,
            "accepted a message although the first frame is unmasked"
        );
    }

    assert_eq!(got.messages, once.messages, "messages depend on how reads were split");
    assert_eq!(got.end, once.end, "outcome depends on how reads were split");
    assert_eq!(got.written, once.written, "replies depend on how reads were split");

    check_replies(&got);
});

/// Reads what the server wrote back as a client would.
fn check_replies(got: &Outcome) {
    if got.written.is_empty() {
        return;
    }
    let stream = Stream::new(got.written.clone(), vec![got.written.len()], false, false);
    let mut client = WebSocket::from_raw_socket(stream, Role::Client, None);
    let pings: Vec<&[u8]> = got
        .messages
        .iter()
        .filter_map(|m| match m {
            Message::Ping(p) => Some(p.as_ref()),
            _ => None,
        })
        .collect();
    let mut closes = 0;
    loop {
        match client.read() {
            Ok(Message::Pong(p)) => {
                assert!(pings.contains(&p.as_ref()), "pong without a matching ping");
                assert_eq!(closes, 0, "pong after close");
            }
            Ok(Message::Close(_)) => closes += 1,
            Ok(other) => panic!("server wrote {other:?}"),
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => break,
            Err(e) => panic!("server's replies are malformed: {e}"),
        }
    }
    assert!(closes <= 1);
    if closes == 1 {
        assert!(
            got.messages.iter().any(|m| matches!(m, Message::Close(_))),
            "server closed without being asked"
        );
    }
}
