//! The byte stream tungstenite sees for one client: reads come straight from
//! the nginx connection (NGX_AGAIN becomes `WouldBlock`), writes go into the
//! session's send queue, which the session flushes on write events.

use std::io::{self, Read, Write};
use std::rc::Rc;

use ngx::ffi::{ngx_connection_t, NGX_AGAIN, NGX_ERROR};
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use crate::send_queue::SendQueue;

pub struct ClientIo {
    c: *mut ngx_connection_t,
    pub queue: SendQueue,
}

impl ClientIo {
    pub fn new(c: *mut ngx_connection_t, send_limit: usize) -> Self {
        ClientIo {
            c,
            queue: SendQueue::new(send_limit),
        }
    }
}

/// The queue refused a frame because the client has not read what it was
/// sent already.
#[derive(Debug)]
pub struct SlowConsumer;

impl std::fmt::Display for SlowConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("slow consumer")
    }
}

impl std::error::Error for SlowConsumer {}

impl Read for ClientIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the session owning this adapter lives no longer than the
        // connection, and nginx is single-threaded.
        let c = unsafe { &mut *self.c };
        let recv = c.recv.ok_or(io::ErrorKind::Unsupported)?;
        // SAFETY: buf is valid for buf.len() bytes of writes.
        let n = unsafe { recv(c, buf.as_mut_ptr(), buf.len()) };
        match n {
            n if n >= 0 => Ok(n as usize),
            n if n == NGX_AGAIN as isize => Err(io::ErrorKind::WouldBlock.into()),
            n if n == NGX_ERROR as isize => Err(io::ErrorKind::ConnectionReset.into()),
            _ => Err(io::ErrorKind::Other.into()),
        }
    }
}

impl Write for ClientIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.queue
            .push(Rc::from(buf))
            .map_err(|_| io::Error::other(SlowConsumer))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Encodes one unmasked server frame. Server frames are the same bytes for
/// every recipient, so a broadcast is encoded once and shared.
fn frame(opcode: OpCode, payload: &[u8]) -> Rc<[u8]> {
    let header = FrameHeader {
        opcode,
        ..FrameHeader::default()
    };
    let mut out = Vec::with_capacity(payload.len() + 10);
    header
        .format(payload.len() as u64, &mut out)
        .expect("writing to a Vec cannot fail");
    out.extend_from_slice(payload);
    Rc::from(out)
}

pub fn text_frame(payload: &[u8]) -> Rc<[u8]> {
    frame(OpCode::Data(Data::Text), payload)
}

pub fn close_frame(code: u16, reason: &str) -> Rc<[u8]> {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    frame(
        OpCode::Control(tungstenite::protocol::frame::coding::Control::Close),
        &payload,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_text_frame_has_two_byte_header() {
        assert_eq!(&*text_frame(b"hi"), &[0x81, 2, b'h', b'i']);
    }

    #[test]
    fn medium_text_frame_uses_16_bit_length() {
        let f = text_frame(&[b'a'; 300]);
        assert_eq!(&f[..4], &[0x81, 126, 0x01, 0x2c]);
        assert_eq!(f.len(), 304);
    }

    #[test]
    fn large_text_frame_uses_64_bit_length() {
        let f = text_frame(&vec![b'a'; 70_000]);
        assert_eq!(&f[..2], &[0x81, 127]);
        assert_eq!(u64::from_be_bytes(f[2..10].try_into().unwrap()), 70_000);
    }

    #[test]
    fn close_frame_carries_code_then_reason() {
        assert_eq!(
            &*close_frame(1001, "bye"),
            &[0x88, 5, 0x03, 0xe9, b'b', b'y', b'e']
        );
    }
}
