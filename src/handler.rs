//! The content handler of a `websocket_chat` location: checks the opening
//! handshake, answers 101 and hands the connection to a `Session`.

use core::ptr;

use ngx::ffi::{
    ngx_exiting, ngx_http_arg, ngx_http_complex_value, ngx_http_complex_value_t,
    ngx_http_request_t, ngx_http_send_header, ngx_int_t, ngx_str_t, ngx_tcp_nodelay, NGX_DECLINED,
    NGX_DONE, NGX_ERROR, NGX_HTTP_BAD_REQUEST, NGX_HTTP_INTERNAL_SERVER_ERROR,
    NGX_HTTP_SERVICE_UNAVAILABLE, NGX_HTTP_SWITCHING_PROTOCOLS, NGX_HTTP_WRITE_BUFFERED,
    NGX_LOG_INFO, NGX_OK,
};
use ngx::http::{HttpModuleLocationConf, NgxHttpCoreModule, Request};
use ngx::ngx_log_error;

use crate::conf::{self, LocConf, Origins};
use crate::metrics::{self, Counter, Refusal};
use crate::request_ctx::RequestCtx;
use crate::session::Upgrade;
use crate::{ids, worker};
use wschat_core::deflate::{self, Agreement};
use wschat_core::handshake::{self, Rejection};
use wschat_core::names;

pub extern "C" fn websocket_chat_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx calls content handlers with a live request.
    let req = unsafe { &mut *r };
    if !ptr::eq(req.main, r) {
        return NGX_DECLINED as ngx_int_t;
    }
    let log = req.connection_log();

    let Some(lc) = conf::loc_conf(req) else {
        return refuse(NGX_HTTP_INTERNAL_SERVER_ERROR);
    };
    let accept = match check_handshake(req, lc) {
        Ok(accept) => accept,
        Err(rejection) => {
            ngx_log_error!(
                NGX_LOG_INFO,
                log,
                "websocket_chat: handshake rejected: {}",
                rejection
            );
            return reject(req, rejection);
        }
    };
    // A body would sit where the first frames are expected.
    if req.headers_in.content_length_n > 0 || req.headers_in.chunked() != 0 {
        ngx_log_error!(
            NGX_LOG_INFO,
            log,
            "websocket_chat: handshake rejected: request has a body"
        );
        return refuse(NGX_HTTP_BAD_REQUEST);
    }

    let Some(main) = conf::main_conf(req) else {
        return refuse(NGX_HTTP_INTERNAL_SERVER_ERROR);
    };
    let room = match names::room(&evaluate(req, lc.room())) {
        Ok(room) => room,
        Err(bad) => {
            ngx_log_error!(
                NGX_LOG_INFO,
                log,
                "websocket_chat: handshake rejected: {}",
                bad
            );
            return refuse(NGX_HTTP_BAD_REQUEST);
        }
    };
    let user = names::user(&evaluate(req, lc.user()), ids::random());
    // SAFETY: nginx's flag, read on its own thread.
    if unsafe { ngx_exiting } != 0 {
        // A session started now would outlive the shutdown's visit of idle
        // connections: the client is better off trying a new worker.
        ngx_log_error!(
            NGX_LOG_INFO,
            log,
            "websocket_chat: handshake refused: worker is shutting down"
        );
        return refuse(NGX_HTTP_SERVICE_UNAVAILABLE);
    }
    // SAFETY: r is the live main request.
    if unsafe { RequestCtx::create(r, &room, &user) }.is_none() {
        return refuse(NGX_HTTP_INTERNAL_SERVER_ERROR);
    }

    let deflate = lc.deflate().then(|| extensions(req)).flatten();
    let head = match switching_protocols(req, &accept, deflate.as_ref()) {
        Ok(head) => head,
        Err(rc) => return rc,
    };

    // The client may have sent its first frames in the same packet as the
    // handshake; they already sit in the header buffer.
    let preread = take_preread(req);
    // SAFETY: the count keeps the request (and its connection) alive after
    // the handler returns NGX_DONE; the session gives it back when it ends,
    // or once the 101 is out with `websocket_chat_access_log upgrade`.
    unsafe {
        let main_req = &mut *req.main;
        main_req.set_count(main_req.count() + 1);
        let upgrade = Upgrade {
            head,
            room,
            user,
            since: since(req).map(|s| String::from_utf8_lossy(&s).into_owned()),
            preread,
            deflate: deflate.map(|d| d.window_bits),
        };
        if worker::start_session(r, main, lc, upgrade).is_err() {
            // No session took the reference: give it back so that nginx's
            // finalization frees the request.
            main_req.set_count(main_req.count() - 1);
            return NGX_ERROR as ngx_int_t;
        }
    }
    NGX_DONE as ngx_int_t
}

trait ConnectionLog {
    fn connection_log(&self) -> *mut ngx::ffi::ngx_log_t;
}

impl ConnectionLog for ngx_http_request_t {
    fn connection_log(&self) -> *mut ngx::ffi::ngx_log_t {
        // SAFETY: a live request has a live connection; its log carries the
        // client address in every line.
        unsafe { (*self.connection).log }
    }
}

fn check_handshake(req: &mut ngx_http_request_t, lc: &LocConf) -> Result<String, Rejection> {
    // SAFETY: the request is live; Request is a transparent wrapper.
    let request = unsafe { Request::from_ngx_http_request(req) };
    let headers: Vec<(&[u8], &[u8])> = request
        .headers_in_iterator()
        .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
        .collect();
    let request = handshake::Request {
        method: req.method_name.as_bytes(),
        http_version: req.http_version as u32,
        headers: &headers,
    };
    let accept = handshake::accept(&request)?;
    if let Origins::Only(allowed) = lc.origins() {
        handshake::check_origin(&request, allowed)?;
    }
    Ok(accept)
}

/// Counts a handshake answered with `status` instead of 101.
fn refuse(status: u32) -> ngx_int_t {
    metrics::count(Counter::Refusal(Refusal::of_status(status as u16)), 1);
    status as ngx_int_t
}

/// Answers a failed handshake. 426 must name the version we speak.
fn reject(req: &mut ngx_http_request_t, rejection: Rejection) -> ngx_int_t {
    if rejection == Rejection::Version {
        // SAFETY: the request is live.
        let request = unsafe { Request::from_ngx_http_request(req) };
        if request
            .add_header_out("Sec-WebSocket-Version", "13")
            .is_none()
        {
            return refuse(NGX_HTTP_INTERNAL_SERVER_ERROR);
        }
        // nginx has no reason phrase of its own for 426.
        req.headers_out.status_line = static_str(b"426 Upgrade Required");
    }
    refuse(u32::from(rejection.status()))
}

fn static_str(s: &'static [u8]) -> ngx_str_t {
    ngx_str_t {
        len: s.len(),
        data: s.as_ptr().cast_mut(),
    }
}

pub fn evaluate(req: &mut ngx_http_request_t, cv: Option<&ngx_http_complex_value_t>) -> Vec<u8> {
    let Some(cv) = cv else {
        return Vec::new();
    };
    let mut value = ngx_str_t::default();
    // SAFETY: cv was compiled at configuration time for this location; the
    // result lives in the request pool, and is copied out at once.
    let rc = unsafe { ngx_http_complex_value(req, ptr::from_ref(cv).cast_mut(), &mut value) };
    if rc != NGX_OK as isize {
        return Vec::new();
    }
    value.as_bytes().to_vec()
}

/// permessage-deflate, if the client offers it in a form we can honour.
fn extensions(req: &mut ngx_http_request_t) -> Option<Agreement> {
    // SAFETY: the request is live; Request is a transparent wrapper.
    let request = unsafe { Request::from_ngx_http_request(req) };
    deflate::negotiate(
        request
            .headers_in_iterator()
            .filter(|(k, _)| {
                k.as_bytes()
                    .eq_ignore_ascii_case(b"sec-websocket-extensions")
            })
            .map(|(_, v)| v.as_bytes()),
    )
}

/// Makes the 101 header and takes it back out of nginx's output: it leaves
/// in the session's first write, with the welcome when that is ready in the
/// same turn (one packet and one syscall for a join instead of two).
fn switching_protocols(
    req: &mut ngx_http_request_t,
    accept: &str,
    deflate: Option<&Agreement>,
) -> Result<Vec<u8>, ngx_int_t> {
    req.headers_out.status = NGX_HTTP_SWITCHING_PROTOCOLS as usize;
    req.headers_out.status_line = static_str(b"101 Switching Protocols");
    req.set_keepalive(0);
    {
        // SAFETY: the request is live.
        let request = unsafe { Request::from_ngx_http_request(req) };
        // nginx's header filter adds "Connection: upgrade" for a 101.
        request
            .add_header_out("Upgrade", "websocket")
            .ok_or(NGX_ERROR as ngx_int_t)?;
        request
            .add_header_out("Sec-WebSocket-Accept", accept)
            .ok_or(NGX_ERROR as ngx_int_t)?;
        if let Some(agreed) = deflate {
            request
                .add_header_out("Sec-WebSocket-Extensions", &agreed.response)
                .ok_or(NGX_ERROR as ngx_int_t)?;
        }
    }
    // SAFETY: the request is live.
    let rc = unsafe { ngx_http_send_header(req) };
    if rc == NGX_ERROR as isize || rc > NGX_OK as isize {
        return Err(rc);
    }
    let head = take_output(req).ok_or(NGX_ERROR as ngx_int_t)?;
    // SAFETY: the request and its location configuration are live.
    unsafe {
        if let Some(clcf) = NgxHttpCoreModule::location_conf(&*req) {
            if clcf.tcp_nodelay != 0 {
                ngx_tcp_nodelay(req.connection);
            }
        }
    }
    Ok(head)
}

/// The bytes waiting in the request's output chain, which is left empty. A
/// header smaller than `postpone_output` waits there for more output; a
/// larger one waits only for what the socket did not take.
fn take_output(req: &mut ngx_http_request_t) -> Option<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut cl = req.out;
    // SAFETY: the chain is the write filter's, made of live links from the
    // request's pool; header buffers are in memory, between pos and last.
    unsafe {
        while !cl.is_null() {
            let b = &*(*cl).buf;
            if b.temporary() != 0 || b.memory() != 0 || b.mmap() != 0 {
                let len = b.last.offset_from(b.pos) as usize;
                bytes.extend_from_slice(std::slice::from_raw_parts(b.pos, len));
            } else if b.in_file() != 0 {
                return None;
            }
            cl = (*cl).next;
        }
    }
    req.out = ptr::null_mut();
    let unbuffered = !NGX_HTTP_WRITE_BUFFERED;
    req.set_buffered(req.buffered() & unbuffered);
    // SAFETY: a live request has a live connection.
    let c = unsafe { &mut *req.connection };
    c.set_buffered(c.buffered() & unbuffered);
    Some(bytes)
}

/// The id of the last message a reconnecting client saw: the `since` query
/// argument, or a `Last-Event-ID` header (as EventSource sends) for clients
/// that cannot change the URL.
fn since(req: &mut ngx_http_request_t) -> Option<Vec<u8>> {
    let mut value = ngx_str_t::default();
    let name = b"since";
    // SAFETY: the request is live; nginx points `value` into its arguments.
    let rc = unsafe { ngx_http_arg(req, name.as_ptr().cast_mut(), name.len(), &mut value) };
    if rc == NGX_OK as isize {
        return Some(value.as_bytes().to_vec());
    }
    // SAFETY: the request is live; Request is a transparent wrapper.
    let request = unsafe { Request::from_ngx_http_request(req) };
    request
        .headers_in_iterator()
        .find(|(k, _)| k.as_bytes().eq_ignore_ascii_case(b"last-event-id"))
        .map(|(_, v)| v.as_bytes().to_vec())
}

fn take_preread(req: &mut ngx_http_request_t) -> Vec<u8> {
    let b = req.header_in;
    if b.is_null() {
        return Vec::new();
    }
    // SAFETY: header_in is the request's live header buffer; pos..last are
    // the bytes read past the end of the request headers.
    unsafe {
        let len = (*b).last.offset_from((*b).pos) as usize;
        let bytes = std::slice::from_raw_parts((*b).pos, len).to_vec();
        (*b).pos = (*b).last;
        bytes
    }
}
