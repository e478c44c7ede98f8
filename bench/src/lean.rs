//! A receive-only WebSocket client for the thousands of member connections
//! that only listen, so that the load generator measures the servers rather
//! than itself. tungstenite zero-fills its 128 KB read buffer before every
//! read (15% of the clients' CPU in a 1600 msg/s fan-out) and hands out every
//! message in a buffer of its own; this reads into one reusable buffer per
//! connection and yields text messages as slices of it.
//!
//! Frames the servers send are parsed in place; the only frames written after
//! the opening handshake are the masked pong and close replies. Text is not
//! checked for UTF-8: the load generator reads only the ASCII header at the
//! front of each message, and validating every 16 KB message cost a tenth of
//! its CPU; the servers' UTF-8 is the test suite's business.

use crate::frame::{control_frame, parse_head, Head, Opcode, MAX_MESSAGE};
use crate::stats::wall_us;
use std::fmt;
use std::hash::BuildHasher;
use std::ops::Range;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};

/// Read buffer per connection at the start. Reads ask for all of it, so a
/// receiver that fell behind catches up with few system calls; only the
/// front is touched while it keeps up, since a drained buffer starts over at
/// offset 0.
const BUF_LEN: usize = 16 * 1024;

/// A read that fills the whole buffer doubles it, up to this: a member of a
/// room of big messages then takes several per read instead of one, while
/// the thousands of idle members keep 16 KB each.
const BUF_MAX: usize = 256 * 1024;

/// One message from the server. Pings are answered inside `next` and pongs
/// ignored, so they never show up here.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A text message, and when it was received: wall-clock µs at the end of
    /// the read that completed it. One clock read per read, not per message,
    /// and a message's receive time then excludes our own handling of the
    /// messages before it in the same read.
    Text(&'a [u8], u64),
    Binary,
    /// The close frame's payload (status code and reason, possibly empty).
    Close(&'a [u8]),
}

#[derive(Debug)]
pub enum Error {
    Io(std::io::Error),
    Eof,
    /// The server broke RFC 6455; the connection cannot be read any further.
    Protocol(&'static str),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "{e}"),
            Error::Eof => f.write_str("EOF"),
            Error::Protocol(what) => write!(f, "protocol error: {what}"),
        }
    }
}

/// Where a complete message's payload is, and whether it is compressed.
enum Msg {
    /// A single frame: the payload is in the read buffer.
    Frame(Opcode, Range<usize>, bool),
    /// Reassembled from fragments into `Receiver::frag`.
    Fragmented(Opcode, bool),
}

pub struct Receiver<S> {
    io: S,
    buf: Vec<u8>,
    /// Received bytes not parsed yet: `buf[start..end]`.
    start: usize,
    end: usize,
    /// Wall-clock µs when the last read returned.
    read_us: u64,
    /// Kind of the fragmented message being reassembled, if any, and
    /// whether it is compressed.
    frag_kind: Option<(Opcode, bool)>,
    frag: Vec<u8>,
    /// permessage-deflate (no context takeover): one raw inflater, reset
    /// for every message, and where it inflates to.
    inflater: Option<flate2::Decompress>,
    inflated: Vec<u8>,
}

/// Opening handshake over `io` (a connected stream) for a ws:// URL.
/// With `deflate`, offers permessage-deflate as browsers do.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    url: &str,
    deflate: bool,
) -> Result<Receiver<S>, String> {
    handshake(io, url, &generate_key(), deflate).await
}

async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    url: &str,
    key: &str,
    deflate: bool,
) -> Result<Receiver<S>, String> {
    let mut req = request(url, key)?;
    if deflate {
        req.truncate(req.len() - 2);
        req.push_str(
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n",
        );
    }
    io.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("send request: {e}"))?;
    let mut r = Receiver::new(io);
    let head_len = r.read_response_head().await?;
    if check_response(&r.buf[..head_len], key)? {
        r.inflater = Some(flate2::Decompress::new(false));
    }
    // Frames that came with the response stay in the buffer.
    r.start = head_len;
    Ok(r)
}

fn request(url: &str, key: &str) -> Result<String, String> {
    let rest = url.strip_prefix("ws://").ok_or("not a ws:// URL")?;
    let (host, target) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let slash = if target.starts_with('/') { "" } else { "/" };
    Ok(format!(
        "GET {slash}{target} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
    ))
}

/// The server must switch protocols and prove it read our key (RFC 6455
/// 4.1). True if it agreed to permessage-deflate.
fn check_response(head: &[u8], key: &str) -> Result<bool, String> {
    let head = std::str::from_utf8(head).map_err(|_| "response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    if status.split(' ').nth(1) != Some("101") {
        return Err(format!("HTTP status {status:?}"));
    }
    let (mut upgrade, mut connection, mut accept, mut deflate) = (false, false, false, false);
    for (name, value) in lines.filter_map(|l| l.split_once(':')) {
        let value = value.trim();
        if name.eq_ignore_ascii_case("sec-websocket-extensions") {
            deflate = value.starts_with("permessage-deflate");
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade = value.eq_ignore_ascii_case("websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection = value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
        } else if name.eq_ignore_ascii_case("sec-websocket-accept") {
            accept = value == derive_accept_key(key.as_bytes());
        }
    }
    match (upgrade, connection, accept) {
        (true, true, true) => Ok(deflate),
        (false, _, _) => Err("no Upgrade: websocket in the response".into()),
        (_, false, _) => Err("no Connection: upgrade in the response".into()),
        (_, _, false) => Err("wrong or missing Sec-WebSocket-Accept".into()),
    }
}

/// Masking keys need not be strong here, only vary (RFC 6455 5.3);
/// std's per-instance random hasher keys are enough.
fn mask_key() -> [u8; 4] {
    (std::collections::hash_map::RandomState::new().hash_one(0u8) as u32).to_ne_bytes()
}

impl<S: AsyncRead + AsyncWrite + Unpin> Receiver<S> {
    fn new(io: S) -> Self {
        Receiver {
            io,
            buf: vec![0; BUF_LEN],
            start: 0,
            end: 0,
            read_us: 0,
            frag_kind: None,
            frag: Vec::new(),
            inflater: None,
            inflated: Vec::new(),
        }
    }

    /// Reads until the response head's blank line; returns the head's length.
    async fn read_response_head(&mut self) -> Result<usize, String> {
        loop {
            if let Some(i) = self.buf[..self.end]
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
            {
                return Ok(i + 4);
            }
            if self.end == self.buf.len() {
                return Err(format!("response head over {BUF_LEN} bytes"));
            }
            match self.io.read(&mut self.buf[self.end..]).await {
                Ok(0) => return Err("EOF in the response head".into()),
                Ok(n) => {
                    self.end += n;
                    self.read_us = wall_us();
                }
                Err(e) => return Err(format!("read response: {e}")),
            }
        }
    }

    /// The next text, binary or close message, answering pings on the way.
    pub async fn next(&mut self) -> Result<Event<'_>, Error> {
        let (kind, payload, compressed) = match self.next_message().await? {
            Msg::Frame(kind, range, c) => (kind, &self.buf[range], c),
            Msg::Fragmented(kind, c) => (kind, &self.frag[..], c),
        };
        let payload = match (compressed, &mut self.inflater) {
            (false, _) => payload,
            (true, None) => return Err(Error::Protocol("RSV1 without permessage-deflate")),
            (true, Some(z)) => {
                inflate(z, payload, &mut self.inflated)?;
                &self.inflated[..]
            }
        };
        Ok(match kind {
            Opcode::Text => Event::Text(payload, self.read_us),
            Opcode::Close => Event::Close(payload),
            _ => Event::Binary,
        })
    }

    async fn next_message(&mut self) -> Result<Msg, Error> {
        loop {
            let (head, payload) = self.next_frame().await?;
            match head.opcode {
                Opcode::Ping => self.reply(Opcode::Pong, payload).await?,
                Opcode::Pong => {}
                Opcode::Close => {
                    // Echo the status code; the server may be gone already.
                    let code = payload.start..payload.end.min(payload.start + 2);
                    let _ = self.reply(Opcode::Close, code).await;
                    return Ok(Msg::Frame(Opcode::Close, payload, false));
                }
                Opcode::Text | Opcode::Binary => {
                    if self.frag_kind.is_some() {
                        return Err(Error::Protocol("new message inside a fragmented one"));
                    }
                    if head.fin {
                        return Ok(Msg::Frame(head.opcode, payload, head.compressed));
                    }
                    self.frag_kind = Some((head.opcode, head.compressed));
                    self.frag.clear();
                    self.add_fragment(payload)?;
                }
                Opcode::Continuation => {
                    let (kind, compressed) = self
                        .frag_kind
                        .ok_or(Error::Protocol("continuation outside a fragmented message"))?;
                    self.add_fragment(payload)?;
                    if head.fin {
                        self.frag_kind = None;
                        return Ok(Msg::Fragmented(kind, compressed));
                    }
                }
            }
        }
    }

    fn add_fragment(&mut self, payload: Range<usize>) -> Result<(), Error> {
        if self.frag.len() + payload.len() > MAX_MESSAGE {
            return Err(Error::Protocol("fragmented message too large"));
        }
        self.frag.extend_from_slice(&self.buf[payload]);
        Ok(())
    }

    /// The next complete frame; its payload is `buf[range]` until the next read.
    async fn next_frame(&mut self) -> Result<(Head, Range<usize>), Error> {
        loop {
            let avail = &self.buf[self.start..self.end];
            let need = match parse_head(avail).map_err(Error::Protocol)? {
                Some(h) if h.frame_len() <= avail.len() => {
                    let payload = self.start + h.head_len..self.start + h.frame_len();
                    self.start += h.frame_len();
                    return Ok((h, payload));
                }
                Some(h) => h.frame_len(),
                None => avail.len() + 1,
            };
            self.fill(need).await?;
        }
    }

    /// One read, after making room for at least `need` unparsed bytes.
    async fn fill(&mut self, need: usize) -> Result<(), Error> {
        // What is left is part of one frame: moving it to the front is cheap
        // and lets the read use the whole buffer.
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        if need > self.buf.len() {
            self.buf.resize(need, 0);
        }
        match self.io.read(&mut self.buf[self.end..]).await {
            Ok(0) => Err(Error::Eof),
            Ok(n) => {
                self.end += n;
                self.read_us = wall_us();
                if self.end == self.buf.len() && self.buf.len() < BUF_MAX {
                    self.buf.resize((self.buf.len() * 2).min(BUF_MAX), 0);
                }
                Ok(())
            }
            Err(e) => Err(Error::Io(e)),
        }
    }

    /// Sends a masked control frame carrying `buf[payload]`.
    async fn reply(&mut self, opcode: Opcode, payload: Range<usize>) -> Result<(), Error> {
        let (frame, len) = control_frame(opcode, &self.buf[payload], mask_key());
        self.io.write_all(&frame[..len]).await.map_err(Error::Io)
    }
}

/// One permessage-deflate message: its payload with the stripped
/// `00 00 ff ff` put back, inflated from a fresh window.
fn inflate(z: &mut flate2::Decompress, payload: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
    const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];
    z.reset(false);
    out.clear();
    for input in [payload, &TAIL[..]] {
        let mut input = input;
        while !input.is_empty() {
            if out.len() == out.capacity() {
                out.reserve(4096);
            }
            let before = z.total_in();
            z.decompress_vec(input, out, flate2::FlushDecompress::Sync)
                .map_err(|_| Error::Protocol("bad deflate data"))?;
            let used = (z.total_in() - before) as usize;
            input = &input[used..];
            if used == 0 && out.len() < out.capacity() {
                break;
            }
            if out.len() > MAX_MESSAGE {
                return Err(Error::Protocol("inflated message too large"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::io;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::io::ReadBuf;

    /// A stream that returns the given chunks one read at a time (so frames
    /// arrive split exactly as the test says), then EOF, and keeps what is
    /// written to it.
    struct Script {
        chunks: VecDeque<Vec<u8>>,
        written: Vec<u8>,
    }

    fn script(chunks: &[&[u8]]) -> Script {
        Script {
            chunks: chunks.iter().map(|c| c.to_vec()).collect(),
            written: Vec::new(),
        }
    }

    impl AsyncRead for Script {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            out: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if let Some(mut c) = self.chunks.pop_front() {
                let n = c.len().min(out.remaining());
                out.put_slice(&c[..n]);
                if n < c.len() {
                    self.chunks.push_front(c.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Script {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.written.extend_from_slice(b);
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn receiver(chunks: &[&[u8]]) -> Receiver<Script> {
        Receiver::new(script(chunks))
    }

    /// An unmasked server frame.
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n @ 0..=125 => f.push(n as u8),
            n @ 126..=65535 => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    fn text(s: &str) -> Vec<u8> {
        frame(true, 1, s.as_bytes())
    }

    async fn next_text(r: &mut Receiver<Script>) -> String {
        match r.next().await {
            Ok(Event::Text(t, _)) => String::from_utf8(t.to_vec()).unwrap(),
            other => panic!("expected text, got {other:?}"),
        }
    }

    /// The client frames written so far, unmasked: (first byte, payload).
    fn sent_frames(mut w: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while !w.is_empty() {
            assert_eq!(w[1] & 0x80, 0x80, "client frames are masked");
            let len = (w[1] & 0x7F) as usize;
            let key = &w[2..6];
            let payload = w[6..6 + len].iter().enumerate();
            out.push((w[0], payload.map(|(i, b)| b ^ key[i % 4]).collect()));
            w = &w[6 + len..];
        }
        out
    }

    #[tokio::test]
    async fn frames_split_across_reads() {
        let mut bytes = text("hello");
        bytes.extend(text("world"));
        let chunks: Vec<&[u8]> = bytes.chunks(1).collect();
        let mut r = receiver(&chunks);
        let t0 = wall_us();
        match r.next().await {
            Ok(Event::Text(b"hello", at)) => assert!(at >= t0),
            other => panic!("expected hello, got {other:?}"),
        }
        assert_eq!(next_text(&mut r).await, "world");
        assert!(matches!(r.next().await, Err(Error::Eof)));
    }

    #[tokio::test]
    async fn several_frames_in_one_read() {
        let mut bytes = text("a");
        bytes.extend(frame(true, 2, b"\x00\xff"));
        bytes.extend(text("b"));
        bytes.extend(&text("c")[..2]);
        let rest = &text("c")[2..];
        let mut r = receiver(&[&bytes, rest]);
        assert_eq!(next_text(&mut r).await, "a");
        assert_eq!(r.next().await.unwrap(), Event::Binary);
        assert_eq!(next_text(&mut r).await, "b");
        assert_eq!(next_text(&mut r).await, "c");
    }

    #[tokio::test]
    async fn full_reads_grow_the_buffer_up_to_its_cap() {
        let msg = "x".repeat(1000);
        let mut bytes = Vec::new();
        while bytes.len() < BUF_MAX * 2 {
            bytes.extend(text(&msg));
        }
        let n = bytes.len() / text(&msg).len();
        let mut r = receiver(&[&bytes]);
        assert_eq!(r.buf.len(), BUF_LEN);
        assert_eq!(next_text(&mut r).await, msg);
        assert_eq!(r.buf.len(), BUF_LEN * 2, "a full read doubles the buffer");
        for _ in 1..n {
            assert_eq!(next_text(&mut r).await, msg);
        }
        assert_eq!(r.buf.len(), BUF_MAX);
        assert!(matches!(r.next().await, Err(Error::Eof)));
    }

    #[tokio::test]
    async fn a_receiver_that_keeps_up_keeps_its_small_buffer() {
        let chunks: Vec<Vec<u8>> = (0..100).map(|_| text(&"y".repeat(500))).collect();
        let chunks: Vec<&[u8]> = chunks.iter().map(|c| &c[..]).collect();
        let mut r = receiver(&chunks);
        for _ in 0..100 {
            next_text(&mut r).await;
        }
        assert_eq!(r.buf.len(), BUF_LEN);
    }

    #[tokio::test]
    async fn sixteen_and_sixty_four_bit_lengths() {
        let mid = "m".repeat(300);
        // Longer than the read buffer, so the buffer has to grow.
        let big = "b".repeat(BUF_LEN * 4 + 7);
        let mut bytes = text(&mid);
        bytes.extend(text(&big));
        bytes.extend(text("end"));
        let (a, b) = bytes.split_at(1000);
        let mut r = receiver(&[a, b]);
        assert_eq!(next_text(&mut r).await, mid);
        assert_eq!(next_text(&mut r).await, big);
        assert_eq!(next_text(&mut r).await, "end");
    }

    #[tokio::test]
    async fn ping_is_answered_with_a_masked_pong() {
        let mut bytes = frame(true, 9, b"are you there");
        bytes.extend(frame(true, 0xA, b"unsolicited pong"));
        bytes.extend(text("after"));
        let mut r = receiver(&[&bytes]);
        assert_eq!(next_text(&mut r).await, "after");
        assert_eq!(
            sent_frames(&r.io.written),
            vec![(0x8A, b"are you there".to_vec())]
        );
    }

    #[tokio::test]
    async fn close_is_returned_and_its_code_echoed() {
        let mut r = receiver(&[&frame(true, 8, b"\x03\xe8bye")]);
        assert_eq!(r.next().await.unwrap(), Event::Close(b"\x03\xe8bye"));
        assert_eq!(sent_frames(&r.io.written), vec![(0x88, vec![0x03, 0xe8])]);
    }

    #[tokio::test]
    async fn masked_server_frame_is_an_error() {
        let mut r = receiver(&[&[0x81, 0x81, 1, 2, 3, 4, b'x' ^ 1]]);
        assert!(matches!(
            r.next().await,
            Err(Error::Protocol("masked frame from the server"))
        ));
    }

    #[tokio::test]
    async fn fragmented_message_is_reassembled() {
        // "é" split between fragments comes out whole.
        let mut bytes = frame(false, 1, b"caf\xc3");
        bytes.extend(frame(true, 9, b"p"));
        bytes.extend(frame(false, 0, b"\xa9 "));
        bytes.extend(frame(true, 0, b"au lait"));
        bytes.extend(text("next"));
        let (a, b) = bytes.split_at(9);
        let mut r = receiver(&[a, b]);
        assert_eq!(next_text(&mut r).await, "café au lait");
        assert_eq!(next_text(&mut r).await, "next");
        assert_eq!(sent_frames(&r.io.written), vec![(0x8A, b"p".to_vec())]);
    }

    #[tokio::test]
    async fn fragmentation_errors() {
        let mut r = receiver(&[&frame(true, 0, b"x")]);
        assert!(matches!(r.next().await, Err(Error::Protocol(_))));
        let mut bytes = frame(false, 1, b"a");
        bytes.extend(text("b"));
        let mut r = receiver(&[&bytes]);
        assert!(matches!(r.next().await, Err(Error::Protocol(_))));
    }

    // The key and accept value of RFC 6455 section 1.3.
    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    #[test]
    fn request_line_and_headers() {
        let r = request("ws://127.0.0.1:8080/ws?room=a&nick=b", KEY).unwrap();
        assert!(r.starts_with("GET /ws?room=a&nick=b HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"));
        assert!(r.contains(&format!("\r\nSec-WebSocket-Key: {KEY}\r\n")));
        assert!(r.ends_with("\r\n\r\n"));
        assert!(request("ws://h?x", KEY)
            .unwrap()
            .starts_with("GET /?x HTTP/1.1\r\nHost: h\r\n"));
        assert!(request("ws://h", KEY)
            .unwrap()
            .starts_with("GET / HTTP/1.1\r\n"));
    }

    #[tokio::test]
    async fn handshake_keeps_the_bytes_after_the_head() {
        let mut bytes = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
             Connection: upgrade\r\nSec-WebSocket-Accept: {ACCEPT}\r\n\r\n"
        )
        .into_bytes();
        bytes.extend(text("first"));
        let (a, b) = bytes.split_at(40);
        let mut r = handshake(script(&[a, b]), "ws://h:1/ws", KEY, false)
            .await
            .unwrap();
        assert!(r.io.written.starts_with(b"GET /ws HTTP/1.1\r\n"));
        assert_eq!(next_text(&mut r).await, "first");
    }

    #[tokio::test]
    async fn compressed_message_is_inflated() {
        let text = "compressed compressed compressed";
        let mut z = flate2::Compress::new(flate2::Compression::default(), false);
        let mut out = Vec::with_capacity(128);
        z.compress_vec(text.as_bytes(), &mut out, flate2::FlushCompress::Sync)
            .unwrap();
        assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
        out.truncate(out.len() - 4);
        let f = frame(true, 0x41, &out);
        let mut r = receiver(&[&f, &f]);
        assert!(matches!(r.next().await, Err(Error::Protocol(_))));
        let mut r = receiver(&[&f, &f]);
        r.inflater = Some(flate2::Decompress::new(false));
        assert_eq!(next_text(&mut r).await, text);
        assert_eq!(next_text(&mut r).await, text);
    }

    #[test]
    fn response_checks() {
        let ok = format!(
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: WebSocket\r\n\
             connection: keep-alive, Upgrade\r\nsec-websocket-accept: {ACCEPT}\r\n\r\n"
        );
        assert_eq!(check_response(ok.as_bytes(), KEY), Ok(false));
        let deflate = ok.replace(
            "\r\n\r\n",
            "\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n\r\n",
        );
        assert_eq!(check_response(deflate.as_bytes(), KEY), Ok(true));
        let wrong = ok.replace(ACCEPT, "AAAAAAAAAAAAAAAAAAAAAAAAAAA=");
        assert!(check_response(wrong.as_bytes(), KEY).is_err());
        let refused = "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            check_response(refused.as_bytes(), KEY),
            Err("HTTP status \"HTTP/1.1 403 Forbidden\"".into())
        );
    }
}
