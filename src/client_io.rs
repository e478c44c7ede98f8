//! The byte stream tungstenite sees for one client: reads come straight from
//! the nginx connection (NGX_AGAIN becomes `WouldBlock`) through a frame
//! guard that refuses bad headers before their payload, and writes go into
//! the session's send queue, which the session flushes on write events.

use std::io::{self, Read, Write};
use std::rc::Rc;

use ngx::ffi::{ngx_connection_t, NGX_AGAIN, NGX_ERROR};

use wschat_core::deflate::Unframer;
use wschat_core::frame_guard::{FrameGuard, Violation};

use crate::metrics::{self, Counter};
use crate::send_queue::{Limit, SendQueue};
use crate::zlib::Inflater;

pub struct ClientIo {
    c: *mut ngx_connection_t,
    pub queue: SendQueue,
    guard: FrameGuard,
    /// A bad header seen past the bytes already handed on; reported by the
    /// next read, once tungstenite has had the good frames before it.
    violation: Option<Violation>,
    /// With permessage-deflate: compressed messages are inflated on the way
    /// to tungstenite, which knows no extensions.
    inflating: Option<Box<Inflating>>,
}

/// The client's stream after inflation, not yet taken by tungstenite.
struct Inflating {
    unframer: Unframer,
    out: Vec<u8>,
    taken: usize,
}

impl ClientIo {
    pub fn new(
        c: *mut ngx_connection_t,
        send_limit: Limit,
        max_message: usize,
        deflate: bool,
    ) -> Self {
        let mut guard = FrameGuard::new(max_message as u64);
        let inflating = deflate.then(|| {
            guard.allow_compression();
            Box::new(Inflating {
                unframer: Unframer::new(max_message),
                out: Vec::new(),
                taken: 0,
            })
        });
        ClientIo {
            c,
            queue: SendQueue::new(send_limit),
            guard,
            violation: None,
            inflating,
        }
    }

    /// Passes bytes the client sent with its handshake through the guard;
    /// returns those tungstenite may parse.
    pub fn admit_preread(&mut self, mut preread: Vec<u8>) -> Vec<u8> {
        let (ok, violation) = self.guard.scan(&preread);
        preread.truncate(ok);
        self.violation = violation;
        match &mut self.inflating {
            Some(inf) => {
                if let Err(v) = inf.unframer.feed(&preread, &mut inf.out, &mut Inflater) {
                    self.violation = Some(v);
                }
                std::mem::take(&mut inf.out)
            }
            None => preread,
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

impl ClientIo {
    /// One `recv` on the connection: NGX_AGAIN becomes `WouldBlock`.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the session owning this adapter lives no longer than the
        // connection, and nginx is single-threaded.
        let c = unsafe { &mut *self.c };
        let recv = c.recv.ok_or(io::ErrorKind::Unsupported)?;
        // SAFETY: buf is valid for buf.len() bytes of writes.
        let n = unsafe { recv(c, buf.as_mut_ptr(), buf.len()) };
        match n {
            n if n >= 0 => {
                metrics::count(Counter::BytesReceived, n as u64);
                Ok(n as usize)
            }
            n if n == NGX_AGAIN as isize => Err(io::ErrorKind::WouldBlock.into()),
            n if n == NGX_ERROR as isize => Err(io::ErrorKind::ConnectionReset.into()),
            _ => Err(io::ErrorKind::Other.into()),
        }
    }

    /// Reads and drops whatever the client sends (after our close frame):
    /// `Ok` with the bytes dropped when the socket has nothing more for now,
    /// `Err` once the client has closed or the connection failed.
    pub fn discard_input(&mut self) -> io::Result<usize> {
        let mut scratch = [0u8; 1024];
        let mut dropped = 0;
        loop {
            match self.recv(&mut scratch) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => dropped += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(dropped),
                Err(e) => return Err(e),
            }
        }
    }
}

impl ClientIo {
    /// A read for a connection with permessage-deflate: from what has been
    /// inflated, reading the socket when that is used up.
    fn read_inflated(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(inf) = &mut self.inflating {
                let ready = &inf.out[inf.taken..];
                if !ready.is_empty() {
                    let n = ready.len().min(buf.len());
                    buf[..n].copy_from_slice(&ready[..n]);
                    inf.taken += n;
                    if inf.taken == inf.out.len() {
                        // Freed, not kept: an idle connection holds no
                        // buffer sized by its last message.
                        inf.out = Vec::new();
                        inf.taken = 0;
                    }
                    return Ok(n);
                }
            }
            if let Some(v) = self.violation {
                return Err(io::Error::other(v));
            }
            let n = self.recv(buf)?;
            if n == 0 {
                return Ok(0);
            }
            let (ok, violation) = self.guard.scan(&buf[..n]);
            self.violation = violation;
            if let Some(inf) = &mut self.inflating {
                if let Err(v) = inf.unframer.feed(&buf[..ok], &mut inf.out, &mut Inflater) {
                    self.violation = Some(v);
                }
            }
        }
    }
}

impl Read for ClientIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.inflating.is_some() {
            return self.read_inflated(buf);
        }
        if let Some(v) = self.violation {
            return Err(io::Error::other(v));
        }
        let n = self.recv(buf)?;
        let (ok, violation) = self.guard.scan(&buf[..n]);
        self.violation = violation;
        match violation {
            Some(v) if ok == 0 => Err(io::Error::other(v)),
            _ => Ok(ok),
        }
    }
}

impl Write for ClientIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.queue
            .push(Rc::from(buf), crate::time::now_ms)
            .map_err(|_| io::Error::other(SlowConsumer))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
