//! Server-to-client WebSocket frames, encoded once per message.

use std::io;
use std::rc::Rc;

use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Encodes one unmasked server frame. Server frames are the same bytes for
/// every recipient, so a broadcast is encoded once and shared.
fn encode(opcode: OpCode, payload: &[u8]) -> Rc<[u8]> {
    encode_with(
        FrameHeader {
            opcode,
            ..FrameHeader::default()
        },
        payload,
    )
}

/// The longest header of a server frame (no mask): what a frame adds to
/// its payload, at most.
pub const MAX_SERVER_HEAD: usize = 10;

fn encode_with(header: FrameHeader, payload: &[u8]) -> Rc<[u8]> {
    let mut head = io::Cursor::new([0u8; MAX_SERVER_HEAD]);
    header
        .format(payload.len() as u64, &mut head)
        .expect("a server frame header fits in 10 bytes");
    let head_len = head.position() as usize;
    // Two memcpys: collecting the chained bytes into the Rc allocated once
    // but copied byte by byte, 7% of a worker with 16 KB messages.
    let mut frame = Vec::with_capacity(head_len + payload.len());
    frame.extend_from_slice(&head.get_ref()[..head_len]);
    frame.extend_from_slice(payload);
    Rc::from(frame)
}

pub fn text_frame(payload: &[u8]) -> Rc<[u8]> {
    encode(OpCode::Data(Data::Text), payload)
}

/// A text message compressed with permessage-deflate (RSV1 set).
pub fn compressed_text_frame(payload: &[u8]) -> Rc<[u8]> {
    encode_with(
        FrameHeader {
            rsv1: true,
            opcode: OpCode::Data(Data::Text),
            ..FrameHeader::default()
        },
        payload,
    )
}

pub fn ping_frame(payload: &[u8]) -> Rc<[u8]> {
    encode(OpCode::Control(Control::Ping), payload)
}

pub fn close_frame(code: u16, reason: &str) -> Rc<[u8]> {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    encode(OpCode::Control(Control::Close), &payload)
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
    fn compressed_text_frame_sets_rsv1() {
        assert_eq!(&*compressed_text_frame(b"z"), &[0xc1, 1, b'z']);
    }

    #[test]
    fn ping_frame_is_a_control_frame() {
        assert_eq!(&*ping_frame(b""), &[0x89, 0]);
    }

    #[test]
    fn close_frame_carries_code_then_reason() {
        assert_eq!(
            &*close_frame(1001, "bye"),
            &[0x88, 5, 0x03, 0xe9, b'b', b'y', b'e']
        );
    }
}
