//! Sending a connection's queued chunks: one `writev` straight from the
//! shared buffers on plain sockets (coalescing whatever is queued into one
//! syscall), nginx's `send_chain` on TLS connections.

use core::mem::{self, MaybeUninit};
use core::ptr;

use ngx::ffi::{
    iovec, ngx_buf_t, ngx_chain_t, ngx_connection_t, ngx_iovec_t, ngx_ssl_free_buffer, ngx_writev,
    NGX_ERROR, NGX_SSL_BUFFERED,
};
pub use wschat_core::send_queue::{Limit, SendQueue};

/// How many chunks one send may carry (nginx's own IOV_MAX-ish batch).
const BATCH: usize = 64;

#[derive(Debug, PartialEq, Eq)]
pub struct SendFailed;

#[derive(Debug, PartialEq, Eq)]
pub enum Flushed {
    /// Everything asked for has been handed to the kernel (or to TLS).
    All,
    /// The socket would block; wait for the next write event.
    Partly,
}

/// Sending a [`SendQueue`] on an nginx connection.
pub trait FlushTo {
    /// Sends as much as the socket takes of the first `max_chunks` chunks;
    /// `All` means those have gone.
    ///
    /// # Safety
    /// `c` must be a live nginx connection whose `send_chain` may be called.
    unsafe fn flush(
        &mut self,
        c: *mut ngx_connection_t,
        max_chunks: usize,
    ) -> Result<Flushed, SendFailed>;
}

impl FlushTo for SendQueue {
    unsafe fn flush(
        &mut self,
        c: *mut ngx_connection_t,
        max_chunks: usize,
    ) -> Result<Flushed, SendFailed> {
        let mut left = max_chunks;
        while !self.is_empty() && left > 0 {
            let n = self.chunk_count().min(BATCH).min(left);
            // SAFETY: c is live (caller).
            let sent = if unsafe { (*c).ssl.is_null() } {
                // SAFETY: as above.
                unsafe { writev(self, c, n) }?
            } else {
                // SAFETY: as above.
                unsafe { send_chain(self, c, n) }?
            };
            left = left.saturating_sub(self.advance(sent));
            // SAFETY: c is live (caller); its write event exists.
            if !self.is_empty() && unsafe { (*(*c).write).ready() } == 0 {
                return Ok(Flushed::Partly);
            }
        }
        // SAFETY: c is live (caller).
        if unsafe { !(*c).ssl.is_null() } {
            // SAFETY: as above.
            return unsafe { drain_tls(c) };
        }
        Ok(Flushed::All)
    }
}

/// nginx's TLS layer keeps what the socket did not take in a buffer of its
/// own (`ssl_buffer_size`), out of the queue's sight: push it out, and once
/// it is empty give its memory back, as nginx does for an idle keepalive
/// connection.
///
/// # Safety
/// `c` must be a live TLS connection whose `send_chain` may be called.
unsafe fn drain_tls(c: *mut ngx_connection_t) -> Result<Flushed, SendFailed> {
    // SAFETY: c is live (caller); an empty chain asks TLS to flush.
    unsafe {
        if (*c).buffered() & NGX_SSL_BUFFERED != 0 {
            if (*(*c).write).ready() == 0 {
                return Ok(Flushed::Partly);
            }
            let rest = ((*c).send_chain.ok_or(SendFailed)?)(c, ptr::null_mut(), 0);
            if rest as isize == NGX_ERROR as isize {
                return Err(SendFailed);
            }
            if (*c).buffered() & NGX_SSL_BUFFERED != 0 {
                return Ok(Flushed::Partly);
            }
        }
        ngx_ssl_free_buffer(c);
    }
    Ok(Flushed::All)
}

/// Plain sockets: the first `n` chunks in one `writev`, straight from
/// their shared buffers. Returns the bytes sent.
///
/// # Safety
/// `c` must be a live, non-TLS nginx connection.
unsafe fn writev(
    queue: &SendQueue,
    c: *mut ngx_connection_t,
    n: usize,
) -> Result<usize, SendFailed> {
    let mut iovs = [const { MaybeUninit::<iovec>::uninit() }; BATCH];
    let mut size = 0;
    for (iov, rest) in iovs.iter_mut().zip(queue.pending(n)) {
        size += rest.len();
        iov.write(iovec {
            // writev only reads the buffers.
            iov_base: rest.as_ptr().cast_mut().cast(),
            iov_len: rest.len(),
        });
    }
    let mut vec = ngx_iovec_t {
        iovs: iovs.as_mut_ptr().cast(),
        count: n as _,
        size,
        nalloc: BATCH as _,
    };
    // SAFETY: the first n iovecs are initialised and point into chunks
    // that outlive the call; c is live (caller).
    let rc = unsafe { ngx_writev(c, &mut vec) };
    if rc == NGX_ERROR as isize {
        return Err(SendFailed);
    }
    let sent = rc.max(0) as usize;
    // SAFETY: c is live (caller). As nginx's own writev chain does:
    // count the bytes, and a short write means the socket is full.
    unsafe {
        (*c).sent += sent as ngx::ffi::off_t;
        if sent < size {
            (*(*c).write).set_ready(0);
        }
    }
    Ok(sent)
}

/// TLS: the first `n` chunks through nginx's `send_chain`, which encrypts
/// (and buffers) them. Returns the bytes taken.
///
/// # Safety
/// `c` must be a live nginx connection whose `send_chain` may be called.
unsafe fn send_chain(
    queue: &SendQueue,
    c: *mut ngx_connection_t,
    n: usize,
) -> Result<usize, SendFailed> {
    // Only the entries in use are initialised: zeroing the whole batch
    // on every flush cost more than the rest of a delivery.
    let mut bufs = [const { MaybeUninit::<ngx_buf_t>::uninit() }; BATCH];
    let mut links = [const { MaybeUninit::<ngx_chain_t>::uninit() }; BATCH];
    for (i, rest) in queue.pending(n).enumerate() {
        let range = rest.as_ptr_range();
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
    if rest as isize == NGX_ERROR as isize {
        return Err(SendFailed);
    }
    let sent = bufs
        .iter()
        .take(n)
        // SAFETY: the first n were initialised above; send_chain only
        // advances pos within [start, last].
        .map(|b| unsafe {
            let b = b.assume_init_ref();
            b.pos.offset_from(b.start) as usize
        })
        .sum();
    Ok(sent)
}
