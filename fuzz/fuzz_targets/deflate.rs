//! permessage-deflate as the module reads it (src/client_io.rs): client
//! bytes through the frame guard (compression allowed) and then the
//! `Unframer`, and `Sec-WebSocket-Extensions` offers through `negotiate`.
//!
//! Input layout:
//!   byte 0  how many bytes each read hands on (1..=255; 0 = all at once)
//!   rest    up to the first 0x00 0x00 pair: an extension offer header;
//!           after it: the bytes the client sent.
//!
//! The inflater is a stand-in whose "compressed" form is the text followed
//! by the 4-byte tail, refusing anything else: the zlib calls are not what is
//! fuzzed here, the framing around them is.
//!
//! Properties:
//! * no panic;
//! * an agreement is only ever a window of 9 to 15 and a response naming
//!   permessage-deflate with both no-context-takeover parameters;
//! * what the unframer hands on is a stream of well-formed client frames
//!   with no reserved bit set: a guard that allows no compression accepts
//!   all of it;
//! * how the bytes are split across reads changes nothing: the same output
//!   and the same outcome as one single read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wschat_core::deflate::{negotiate, Inflate, InflateError, Unframer, TAIL};
use wschat_core::frame_guard::{FrameGuard, Violation};

const MAX_MESSAGE: usize = 4096;

struct Stored;

impl Inflate for Stored {
    fn inflate(&mut self, compressed: &[u8], limit: usize) -> Result<Vec<u8>, InflateError> {
        let body = compressed.strip_suffix(&TAIL).ok_or(InflateError::Corrupt)?;
        if body.len() > limit {
            return Err(InflateError::TooBig);
        }
        Ok(body.to_vec())
    }
}

/// The guard and the unframer over `data`, `chunk` bytes per read.
fn run(data: &[u8], chunk: usize) -> (Vec<u8>, Option<Violation>) {
    let mut guard = FrameGuard::new(MAX_MESSAGE as u64);
    guard.allow_compression();
    let mut unframer = Unframer::new(MAX_MESSAGE);
    let mut out = Vec::new();
    for piece in data.chunks(chunk.max(1)) {
        let (ok, violation) = guard.scan(piece);
        if let Err(v) = unframer.feed(&piece[..ok], &mut out, &mut Stored) {
            return (out, Some(v));
        }
        if violation.is_some() {
            return (out, violation);
        }
    }
    (out, None)
}

fuzz_target!(|input: &[u8]| {
    let Some((&chunk, rest)) = input.split_first() else {
        return;
    };
    let split = rest.windows(2).position(|w| w == [0, 0]);
    let (offer, stream) = match split {
        Some(i) => (&rest[..i], &rest[i + 2..]),
        None => (rest, &[][..]),
    };

    if let Some(a) = negotiate([offer]) {
        assert!((9..=15).contains(&a.window_bits));
        assert!(a.response.starts_with(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        ));
    }

    let whole = run(stream, stream.len());
    let (out, _) = &whole;
    let mut plain = FrameGuard::new(u64::MAX);
    assert_eq!(plain.scan(out), (out.len(), None), "handed on: {out:02x?}");
    if chunk > 0 {
        assert_eq!(run(stream, usize::from(chunk)), whole);
    }
});
