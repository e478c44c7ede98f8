//! A bounded queue of byte chunks waiting to leave on one nginx connection.
//!
//! Chunks are reference-counted so that one encoded frame can sit in the
//! queues of every recipient without a copy. Whatever is queued when the
//! socket becomes writable leaves in one `send_chain` call (one `writev` on a
//! plain socket), which coalesces many small messages into one syscall.

use core::mem::{self, MaybeUninit};
use core::ptr;
use std::collections::VecDeque;
use std::rc::Rc;

use ngx::ffi::{ngx_buf_t, ngx_chain_t, ngx_connection_t};

/// How many chunks one `send_chain` call may carry (nginx's own IOV_MAX-ish
/// batch for writev).
const BATCH: usize = 64;

#[derive(Debug, PartialEq, Eq)]
pub struct Full;

#[derive(Debug, PartialEq, Eq)]
pub struct SendFailed;

#[derive(Debug, PartialEq, Eq)]
pub enum Flushed {
    /// Everything queued has been handed to the kernel (or to TLS).
    All,
    /// The socket would block; wait for the next write event.
    Partly,
}

struct Chunk {
    data: Rc<[u8]>,
    sent: usize,
}

pub struct SendQueue {
    chunks: VecDeque<Chunk>,
    bytes: usize,
    limit: usize,
}

impl SendQueue {
    pub fn new(limit: usize) -> Self {
        SendQueue {
            chunks: VecDeque::new(),
            bytes: 0,
            limit,
        }
    }

    /// Queues a chunk unless that would pass the byte limit.
    pub fn push(&mut self, data: Rc<[u8]>) -> Result<(), Full> {
        if self.bytes + data.len() > self.limit {
            return Err(Full);
        }
        self.bytes += data.len();
        self.chunks.push_back(Chunk { data, sent: 0 });
        Ok(())
    }

    /// Puts a chunk ahead of everything else (connection setup), regardless
    /// of the limit.
    pub fn push_front(&mut self, data: Rc<[u8]>) {
        self.bytes += data.len();
        self.chunks.push_front(Chunk { data, sent: 0 });
    }

    /// Queues a chunk regardless of the limit: for the one close frame that
    /// ends a session.
    pub fn push_unbounded(&mut self, data: Rc<[u8]>) {
        self.bytes += data.len();
        self.chunks.push_back(Chunk { data, sent: 0 });
    }

    /// Whether `data` is next to go (possibly part-way out).
    pub fn front_is(&self, data: &Rc<[u8]>) -> bool {
        self.chunks
            .front()
            .is_some_and(|c| Rc::ptr_eq(&c.data, data))
    }

    /// Removes the first chunk if it is `data` and nothing of it was sent.
    pub fn remove_front_if(&mut self, data: &Rc<[u8]>) {
        if self
            .chunks
            .front()
            .is_some_and(|c| c.sent == 0 && Rc::ptr_eq(&c.data, data))
        {
            self.bytes -= data.len();
            self.chunks.pop_front();
        }
    }

    /// Drops a chunk that was sent in part; returns whether there was one.
    pub fn drop_partial_front(&mut self) -> bool {
        match self.chunks.front() {
            Some(c) if c.sent > 0 => {
                self.bytes -= c.data.len() - c.sent;
                self.chunks.pop_front();
                true
            }
            _ => false,
        }
    }

    /// Keeps only a chunk that is part-way out (cutting it would corrupt the
    /// stream) and drops the rest.
    pub fn truncate_to_partial(&mut self) {
        let keep = usize::from(self.chunks.front().is_some_and(|c| c.sent > 0));
        self.chunks.truncate(keep);
        self.bytes = self.chunks.front().map_or(0, |c| c.data.len() - c.sent);
    }

    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Drops everything, e.g. when the connection is gone.
    pub fn clear(&mut self) {
        self.chunks.clear();
        self.bytes = 0;
    }

    /// Sends as much as the socket takes of the first `max_chunks` chunks;
    /// `All` means those have gone.
    ///
    /// # Safety
    /// `c` must be a live nginx connection whose `send_chain` may be called.
    pub unsafe fn flush(
        &mut self,
        c: *mut ngx_connection_t,
        max_chunks: usize,
    ) -> Result<Flushed, SendFailed> {
        let mut left = max_chunks;
        while !self.chunks.is_empty() && left > 0 {
            // Only the entries in use are initialised: zeroing the whole
            // batch on every flush cost more than the rest of a delivery.
            let mut bufs = [const { MaybeUninit::<ngx_buf_t>::uninit() }; BATCH];
            let mut links = [const { MaybeUninit::<ngx_chain_t>::uninit() }; BATCH];
            let n = self.chunks.len().min(BATCH).min(left);
            for (i, chunk) in self.chunks.iter().take(n).enumerate() {
                let range = chunk.data[chunk.sent..].as_ptr_range();
                // SAFETY: an all-zero ngx_buf_t is a valid empty buffer.
                let mut b: ngx_buf_t = unsafe { mem::zeroed() };
                // nginx's buffers are mutable by type only; send_chain reads them.
                b.start = range.start.cast_mut();
                b.pos = b.start;
                b.last = range.end.cast_mut();
                b.end = b.last;
                b.set_memory(1);
                // TLS buffers output until a buffer asks for a flush.
                b.set_flush(u32::from(i + 1 == n));
                bufs[i].write(b);
            }
            let base = links.as_mut_ptr().cast::<ngx_chain_t>();
            for i in 0..n {
                links[i].write(ngx_chain_t {
                    buf: bufs[i].as_mut_ptr(),
                    // SAFETY: i + 1 <= n <= BATCH stays inside `links`.
                    next: if i + 1 < n {
                        unsafe { base.add(i + 1) }
                    } else {
                        ptr::null_mut()
                    },
                });
            }
            // SAFETY: the caller guarantees `c`; the chain and the memory it
            // points to outlive the call, and nginx keeps no reference to the
            // chain after it returns (TLS copies what it buffers).
            let rest = unsafe { ((*c).send_chain.ok_or(SendFailed)?)(c, base, 0) };
            if rest as isize == ngx::ffi::NGX_ERROR as isize {
                return Err(SendFailed);
            }
            for b in bufs.iter().take(n) {
                // SAFETY: the first n were initialised above; send_chain only
                // advances pos within [start, last].
                let advanced = unsafe {
                    let b = b.assume_init_ref();
                    b.pos.offset_from(b.start)
                } as usize;
                let chunk = self.chunks.front_mut().expect("one chunk per buffer");
                chunk.sent += advanced;
                self.bytes -= advanced;
                if chunk.sent < chunk.data.len() {
                    break;
                }
                self.chunks.pop_front();
                left -= 1;
            }
            // SAFETY: c is live (caller); its write event exists.
            if !self.chunks.is_empty() && unsafe { (*(*c).write).ready() } == 0 {
                return Ok(Flushed::Partly);
            }
        }
        Ok(Flushed::All)
    }
}
