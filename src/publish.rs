//! `websocket_chat_publish`: a backend POSTs a message; it goes the way a
//! member's message goes (history, every worker and host) and the answer
//! waits for Redis: `201` with the message's id once Redis has it.
//!
//! The request waits in its room layer (`Rooms::publish`) under a key of
//! its own; Redis's reply is written into the request's context and the
//! answer is sent from the request's own write event, outside the worker's
//! state, because finishing a request runs its pool cleanups.

use core::ffi::c_void;
use core::ptr;

use ngx::ffi::{
    ngx_http_finalize_request, ngx_http_read_client_request_body, ngx_http_request_empty_handler,
    ngx_http_request_t, ngx_int_t, ngx_pool_cleanup_add, NGX_DECLINED, NGX_DONE, NGX_ERROR,
    NGX_HTTP_POST, NGX_HTTP_SPECIAL_RESPONSE, NGX_LOG_ERR, NGX_LOG_INFO,
};
use ngx::ngx_log_error;
use wschat_core::envelope::push_json_string;
use wschat_core::names;

use crate::conf::{self, LocConf};
use crate::metrics::{self, Counter, PublishStatus};
use crate::request_ctx::{pool_str, RequestCtx};
use crate::{handler, ids, response, worker};

/// A message ready to go: where, from whom, what.
pub struct Outgoing {
    pub room: String,
    pub user: String,
    pub text: String,
}

/// Why a publish is answered with an error.
pub struct Refused {
    pub status: PublishStatus,
    pub code: &'static str,
    pub message: String,
}

impl Refused {
    pub fn new(status: PublishStatus, code: &'static str, message: impl Into<String>) -> Self {
        Refused {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn body(&self) -> String {
        let mut out = String::from(r#"{"error":"#);
        push_json_string(&mut out, self.code);
        out.push_str(r#","message":"#);
        push_json_string(&mut out, &self.message);
        out.push_str("}\n");
        out
    }
}

pub extern "C" fn websocket_chat_publish_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx calls content handlers with a live request.
    let req = unsafe { &mut *r };
    if !ptr::eq(req.main, r) {
        return NGX_DECLINED as ngx_int_t;
    }
    if req.method != NGX_HTTP_POST as usize {
        let refused = Refused::new(
            PublishStatus::NotAllowed,
            "method_not_allowed",
            "send the message with POST",
        );
        return respond(r, &refused, &[("Allow", "POST")]);
    }
    let Some(lc) = conf::loc_conf(req) else {
        return NGX_ERROR as ngx_int_t;
    };
    if req.headers_in.content_length_n > lc.max_message() as i64 {
        return respond(r, &too_big(lc), &[]);
    }
    // The location's body buffer holds a whole message (see conf).
    req.set_request_body_in_single_buf(1);
    // SAFETY: r is live; nginx calls body_read once the body is in.
    let rc = unsafe { ngx_http_read_client_request_body(r, Some(body_read)) };
    if rc >= NGX_HTTP_SPECIAL_RESPONSE as isize {
        return rc;
    }
    NGX_DONE as ngx_int_t
}

fn too_big(lc: &LocConf) -> Refused {
    Refused::new(
        PublishStatus::TooLarge,
        "too_big",
        format!(
            "the message is longer than {} bytes (websocket_chat_max_message)",
            lc.max_message()
        ),
    )
}

/// Sends an error answer and counts it; for the content handler to return.
fn respond(r: *mut ngx_http_request_t, refused: &Refused, extra: &[(&str, &str)]) -> ngx_int_t {
    metrics::count(Counter::Publish(refused.status), 1);
    let body = refused.body();
    response::send(
        r,
        refused.status.status(),
        "application/json",
        body.as_bytes(),
        extra,
    )
}

/// The body is in: check it, then hand it to the room layer.
unsafe extern "C" fn body_read(r: *mut ngx_http_request_t) {
    let outcome = take_message(r).and_then(|(lc, outgoing)| {
        // SAFETY: r is live; its context outlives every use of it below.
        let ctx = unsafe { RequestCtx::create(r, &outgoing.room, &outgoing.user) }
            .ok_or_else(|| Refused::new(PublishStatus::BadGateway, "internal", "out of memory"))?;
        // SAFETY: as above.
        if unsafe { !add_cleanup(r, ctx) } {
            return Err(Refused::new(
                PublishStatus::BadGateway,
                "internal",
                "out of memory",
            ));
        }
        let sid = ids::next_id();
        // SAFETY: as above.
        ctx.session_id = pool_str(unsafe { (*r).pool }, &sid);
        worker::publish(r, lc, &outgoing, &sid)
    });
    if let Err(refused) = outcome {
        // SAFETY: r is live; this ends the request nginx kept for us.
        unsafe {
            // A full queue to Redis is trouble; the rest are the client's.
            let level = match refused.status {
                PublishStatus::Unavailable | PublishStatus::BadGateway => NGX_LOG_ERR,
                _ => NGX_LOG_INFO,
            };
            ngx_log_error!(
                level,
                (*(*r).connection).log,
                "websocket_chat: publish refused: {} {}",
                refused.status.status(),
                refused.message
            );
            ngx_http_finalize_request(r, respond(r, &refused, &[]));
        }
    }
}

/// The message in the body, with its room and sender.
fn take_message(r: *mut ngx_http_request_t) -> Result<(&'static LocConf, Outgoing), Refused> {
    // SAFETY: r is live (body_read's caller).
    let req = unsafe { &mut *r };
    let lc = conf::loc_conf(req)
        .ok_or_else(|| Refused::new(PublishStatus::BadGateway, "internal", "no configuration"))?;
    let body = body_bytes(req, lc.max_message()).ok_or_else(|| too_big(lc))?;
    if body.is_empty() {
        return Err(Refused::new(
            PublishStatus::BadRequest,
            "bad_request",
            "the body is empty: it is the message",
        ));
    }
    let text = String::from_utf8(body).map_err(|_| {
        Refused::new(
            PublishStatus::BadRequest,
            "bad_request",
            "the message is not valid UTF-8",
        )
    })?;
    let room = names::room(&handler::evaluate(req, lc.room()))
        .map_err(|bad| Refused::new(PublishStatus::BadRequest, "bad_request", bad.to_string()))?;
    let user = names::user(&handler::evaluate(req, lc.user()), ids::random());
    Ok((lc, Outgoing { room, user, text }))
}

/// The body's bytes; `None` if there are more than `limit`, or nginx had
/// to spill them to a file (only a body over the limit does: see conf).
fn body_bytes(req: &ngx_http_request_t, limit: usize) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    if req.request_body.is_null() {
        return Some(out);
    }
    // SAFETY: nginx has read the body: its chain is complete and live.
    unsafe {
        let mut cl = (*req.request_body).bufs;
        while !cl.is_null() {
            let b = (*cl).buf;
            let in_memory = (*b).temporary() != 0 || (*b).memory() != 0 || (*b).mmap() != 0;
            if (*b).in_file() != 0 && !in_memory {
                return None;
            }
            let len = (*b).last.offset_from((*b).pos) as usize;
            if out.len() + len > limit {
                return None;
            }
            out.extend_from_slice(std::slice::from_raw_parts((*b).pos, len));
            cl = (*cl).next;
        }
    }
    Some(out)
}

/// Forgets the waiting publish if the request goes first (the client
/// went, or the worker is made to stop).
///
/// # Safety
/// `r` must be live and `ctx` its context.
unsafe fn add_cleanup(r: *mut ngx_http_request_t, ctx: &mut RequestCtx) -> bool {
    // SAFETY: as the caller promises; the context lives in the same pool and
    // is freed after its cleanups run.
    unsafe {
        let cln = ngx_pool_cleanup_add((*r).pool, 0);
        if cln.is_null() {
            return false;
        }
        (*cln).handler = Some(cleanup);
        (*cln).data = ptr::from_mut(ctx).cast();
    }
    true
}

unsafe extern "C" fn cleanup(data: *mut c_void) {
    // SAFETY: add_cleanup registered the request's context.
    let ctx = unsafe { &*data.cast::<RequestCtx>() };
    if ctx.pending != 0 {
        worker::forget_publish(ctx.endpoint, ctx.pending);
    }
}

/// Redis has answered: the answer goes from the request's write event.
///
/// # Safety
/// `r` must be a live request waiting in `Rooms::publish`.
pub unsafe fn answer_later(r: *mut ngx_http_request_t, status: PublishStatus, body: &str) {
    // SAFETY: as the caller promises.
    unsafe {
        let Some(ctx) = RequestCtx::of(r) else {
            return;
        };
        ctx.pending = 0;
        ctx.answer_status = status.status();
        ctx.answer_body = pool_str((*r).pool, body);
        (*r).write_event_handler = Some(answer_now);
        ngx::ffi::ngx_post_event(
            (*(*r).connection).write,
            ptr::addr_of_mut!(ngx::ffi::ngx_posted_events),
        );
    }
}

unsafe extern "C" fn answer_now(r: *mut ngx_http_request_t) {
    // SAFETY: nginx calls this for the live request answer_later set up.
    unsafe {
        (*r).write_event_handler = Some(ngx_http_request_empty_handler);
        let Some(ctx) = RequestCtx::of(r) else {
            ngx_http_finalize_request(r, NGX_ERROR as ngx_int_t);
            return;
        };
        let status = PublishStatus::ALL
            .into_iter()
            .find(|s| s.status() == ctx.answer_status)
            .unwrap_or(PublishStatus::BadGateway);
        metrics::count(Counter::Publish(status), 1);
        let body = ctx.answer_body;
        let rc = response::send(r, status.status(), "application/json", body.as_bytes(), &[]);
        ngx_http_finalize_request(r, rc);
    }
}

/// Ends a request still waiting as the worker exits.
///
/// # Safety
/// `r` must be a live request the room layer no longer holds.
pub unsafe fn abandon(r: *mut ngx_http_request_t) {
    let refused = Refused::new(
        PublishStatus::Unavailable,
        "shutting_down",
        "the server stopped before Redis answered: the message may or may not have been published",
    );
    // SAFETY: as the caller promises.
    unsafe { ngx_http_finalize_request(r, respond(r, &refused, &[])) };
}

/// The 201's body.
pub fn created(id: &str, room: &str) -> String {
    let mut out = String::from(r#"{"id":"#);
    push_json_string(&mut out, id);
    out.push_str(r#","room":"#);
    push_json_string(&mut out, room);
    out.push_str("}\n");
    out
}
