//! What the module keeps in a request's context slot: the session (or
//! publish) that holds the request, and what its variables report. It lives
//! in the request's pool and is plain data, so nginx can read it while
//! writing the access-log line (from inside the worker's own handlers, where
//! the worker's state is lent out) and frees it with the request.

use core::ptr::{self, NonNull};

use ngx::ffi::{ngx_http_request_t, ngx_pcalloc, ngx_pnalloc, ngx_pool_t, ngx_str_t};

use crate::module;

#[derive(Clone, Copy)]
pub struct RequestCtx {
    /// The raw key of the session holding the request; 0 for none.
    pub session: u64,
    pub room: ngx_str_t,
    pub user: ngx_str_t,
    pub session_id: ngx_str_t,
    pub messages_in: u64,
    pub messages_out: u64,
    /// The session's close code once it has one; 0 before.
    pub close_code: u16,
    /// A publish request's answer, once Redis has given it (status 0
    /// before).
    pub answer_status: u16,
    pub answer_body: ngx_str_t,
    /// Where a publish request waits: its Redis endpoint and its raw key
    /// there (0 once answered).
    pub endpoint: usize,
    pub pending: u64,
}

/// Copies `s` into `pool`; an empty string if that fails.
pub fn pool_str(pool: *mut ngx_pool_t, s: &str) -> ngx_str_t {
    // SAFETY: the pool is live; nginx returns null when out of memory.
    let data = unsafe { ngx_pnalloc(pool, s.len().max(1)) }.cast::<u8>();
    if data.is_null() {
        return ngx_str_t::default();
    }
    // SAFETY: data has room for s.len() bytes.
    unsafe { ptr::copy_nonoverlapping(s.as_ptr(), data, s.len()) };
    ngx_str_t { len: s.len(), data }
}

impl RequestCtx {
    /// Makes the context of main request `r`, with its room and user.
    ///
    /// # Safety
    /// `r` must be a live main request.
    pub unsafe fn create<'a>(
        r: *mut ngx_http_request_t,
        room: &str,
        user: &str,
    ) -> Option<&'a mut RequestCtx> {
        // SAFETY: r is live (caller); zeroed memory is a valid RequestCtx
        // (null strings of length 0, zero numbers).
        unsafe {
            let pool = (*r).pool;
            let ctx = ngx_pcalloc(pool, size_of::<RequestCtx>()).cast::<RequestCtx>();
            let ctx = ctx.as_mut()?;
            ctx.room = pool_str(pool, room);
            ctx.user = pool_str(pool, user);
            *(*r).ctx.add(module().ctx_index) = ptr::from_mut(ctx).cast();
            Some(ctx)
        }
    }

    /// The context of `r`'s main request, if the module made one.
    ///
    /// # Safety
    /// `r` must be a live request.
    pub unsafe fn of<'a>(r: *mut ngx_http_request_t) -> Option<&'a mut RequestCtx> {
        // SAFETY: r is live (caller); the slot holds null or a RequestCtx
        // made by `create` in the main request's pool.
        unsafe {
            let main = (*r).main;
            let slot = *(*main).ctx.add(module().ctx_index);
            NonNull::new(slot.cast::<RequestCtx>()).map(|mut p| p.as_mut())
        }
    }
}
