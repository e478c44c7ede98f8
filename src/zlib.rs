//! zlib for permessage-deflate: per worker, one deflate stream per window
//! size in use and one inflate stream, each reset between messages, so no
//! connection holds compression state. A message fanned out to a room is
//! compressed once: the last frame compressed is kept for the next
//! recipient.

use core::cell::RefCell;
use core::ffi::c_int;
use core::mem::{size_of, MaybeUninit};
use std::rc::Rc;

use wschat_core::deflate::{Inflate, InflateError, TAIL};
use wschat_core::frame;

#[allow(
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code,
    clippy::all
)]
mod sys {
    include!(concat!(env!("OUT_DIR"), "/zlib.rs"));
}

/// Smaller payloads go uncompressed (RFC 7692 lets a sender choose per
/// message): deflate's own framing would eat most of the gain.
const MIN_PAYLOAD: usize = 64;
const CHUNK: usize = 16 * 1024;

/// A zlib stream; boxed because zlib keeps a pointer back to it.
struct Stream {
    z: Box<MaybeUninit<sys::z_stream>>,
    deflate: bool,
}

impl Stream {
    fn new(deflate: bool, window_bits: u8) -> Option<Stream> {
        let mut z = Box::new(MaybeUninit::<sys::z_stream>::zeroed());
        // SAFETY: a zeroed z_stream (null zalloc/zfree/opaque) is what zlib
        // expects before init; negative window bits mean raw deflate.
        let rc = unsafe {
            let version = sys::zlibVersion();
            let size = size_of::<sys::z_stream>() as c_int;
            if deflate {
                sys::deflateInit2_(
                    z.as_mut_ptr(),
                    sys::Z_DEFAULT_COMPRESSION,
                    sys::Z_DEFLATED as c_int,
                    -c_int::from(window_bits),
                    8,
                    sys::Z_DEFAULT_STRATEGY as c_int,
                    version,
                    size,
                )
            } else {
                sys::inflateInit2_(z.as_mut_ptr(), -c_int::from(window_bits), version, size)
            }
        };
        (rc == sys::Z_OK as c_int).then_some(Stream { z, deflate })
    }

    fn z(&mut self) -> &mut sys::z_stream {
        // SAFETY: initialised by deflateInit2_/inflateInit2_ in `new`.
        unsafe { self.z.assume_init_mut() }
    }

    /// Runs the whole of `input` through, appending to `out` until it is
    /// done or `out` would pass `limit`. `Ok(false)`: the limit was hit.
    fn run(&mut self, input: &[u8], out: &mut Vec<u8>, limit: usize) -> Result<bool, ()> {
        let deflate = self.deflate;
        let z = self.z();
        // SAFETY: the stream is initialised; reset keeps its buffers.
        let rc = unsafe {
            if deflate {
                sys::deflateReset(z)
            } else {
                sys::inflateReset(z)
            }
        };
        if rc != sys::Z_OK as c_int {
            return Err(());
        }
        z.next_in = input.as_ptr().cast_mut();
        z.avail_in = input.len() as _;
        loop {
            let room = CHUNK.min(limit + 1 - out.len().min(limit + 1));
            if room == 0 {
                return Ok(false);
            }
            out.reserve(room);
            let spare = out.spare_capacity_mut();
            z.next_out = spare.as_mut_ptr().cast();
            z.avail_out = room as _;
            // SAFETY: next_in/next_out point at live buffers of the sizes given.
            let rc = unsafe {
                if deflate {
                    sys::deflate(z, sys::Z_SYNC_FLUSH as c_int)
                } else {
                    sys::inflate(z, sys::Z_SYNC_FLUSH as c_int)
                }
            };
            let written = room - z.avail_out as usize;
            // SAFETY: zlib initialised `written` bytes of the spare room.
            unsafe { out.set_len(out.len() + written) };
            match rc {
                rc if rc == sys::Z_OK as c_int || rc == sys::Z_BUF_ERROR as c_int => {
                    // Done once the input is in and zlib has no more to give.
                    if z.avail_in == 0 && (z.avail_out != 0 || written == 0) {
                        break;
                    }
                    if rc == sys::Z_BUF_ERROR as c_int && written == 0 {
                        return Err(());
                    }
                }
                // A final block ends the message; what follows it (the
                // tail put back, padding) is ignored (RFC 7692 7.2.3.4).
                rc if rc == sys::Z_STREAM_END as c_int => break,
                _ => return Err(()),
            }
        }
        Ok(out.len() <= limit)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let deflate = self.deflate;
        let z = self.z();
        // SAFETY: the stream was initialised; End frees zlib's state.
        unsafe {
            if deflate {
                sys::deflateEnd(z);
            } else {
                sys::inflateEnd(z);
            }
        }
    }
}

#[derive(Default)]
struct Zlib {
    /// Deflate streams by window bits (9 to 15), made when first needed.
    deflaters: [Option<Stream>; 7],
    inflater: Option<Stream>,
    last: Option<Compressed>,
}

/// The last frame compressed, with the window it was compressed for, and
/// what it became: the next recipient of the same frame gets the same bytes.
struct Compressed {
    plain: Rc<[u8]>,
    window_bits: u8,
    sent: Rc<[u8]>,
}

thread_local! {
    static ZLIB: RefCell<Zlib> = RefCell::default();
}

/// The frame a client that agreed to permessage-deflate (with this window)
/// gets for `frame`: compressed (RSV1 set) when that is smaller, else
/// `frame` itself. Only unfragmented text frames are compressed.
pub fn for_deflate(frame: &Rc<[u8]>, window_bits: u8) -> Rc<[u8]> {
    let Some(payload) = text_payload(frame) else {
        return frame.clone();
    };
    if payload.len() < MIN_PAYLOAD {
        return frame.clone();
    }
    ZLIB.with_borrow_mut(|z| {
        if let Some(last) = &z.last {
            if Rc::ptr_eq(&last.plain, frame) && last.window_bits == window_bits {
                return last.sent.clone();
            }
        }
        let sent = compress(z, payload, window_bits)
            .filter(|c| c.len() < payload.len())
            .map_or_else(|| frame.clone(), |c| frame::compressed_text_frame(&c));
        z.last = Some(Compressed {
            plain: frame.clone(),
            window_bits,
            sent: sent.clone(),
        });
        sent
    })
}

fn compress(z: &mut Zlib, payload: &[u8], window_bits: u8) -> Option<Vec<u8>> {
    let slot = usize::from(window_bits.checked_sub(9)?);
    let stream = z.deflaters.get_mut(slot)?;
    if stream.is_none() {
        *stream = Stream::new(true, window_bits);
    }
    let stream = stream.as_mut()?;
    let mut out = Vec::with_capacity(payload.len() / 2 + 16);
    stream.run(payload, &mut out, usize::MAX - 1).ok()?;
    if out.ends_with(&TAIL) {
        out.truncate(out.len() - TAIL.len());
    }
    Some(out)
}

/// The payload of a server frame (unmasked), if it is one whole text frame.
fn text_payload(frame: &[u8]) -> Option<&[u8]> {
    if frame.len() < 2 || frame[0] != 0x81 {
        return None;
    }
    let header = match frame[1] {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    frame.get(header..)
}

/// The worker's inflater, for `Unframer`.
pub struct Inflater;

impl Inflate for Inflater {
    fn inflate(&mut self, compressed: &[u8], limit: usize) -> Result<Vec<u8>, InflateError> {
        ZLIB.with_borrow_mut(|z| {
            if z.inflater.is_none() {
                z.inflater = Stream::new(false, 15);
            }
            let stream = z.inflater.as_mut().ok_or(InflateError::Corrupt)?;
            let mut out = Vec::new();
            match stream.run(compressed, &mut out, limit) {
                Ok(true) => Ok(out),
                Ok(false) => Err(InflateError::TooBig),
                Err(()) => Err(InflateError::Corrupt),
            }
        })
    }
}
