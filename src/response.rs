//! A whole small HTTP response (status, type, body) from a buffer: the
//! answers of the status and publish locations.

use core::ptr;

use ngx::ffi::{
    ngx_chain_t, ngx_http_discard_request_body, ngx_http_output_filter, ngx_http_request_t,
    ngx_http_send_header, ngx_int_t, ngx_str_t, NGX_ERROR, NGX_HTTP_HEAD, NGX_OK,
};
use ngx::http::Request;

/// Sends `body` with `status` and `content_type`; the result is for the
/// content handler to return (or to finalize the request with).
pub fn send(
    r: *mut ngx_http_request_t,
    status: u16,
    content_type: &'static str,
    body: &[u8],
    extra: &[(&str, &str)],
) -> ngx_int_t {
    // SAFETY: r is a live request (callers are its handlers).
    let req = unsafe { &mut *r };
    if req.request_body.is_null() {
        // A body not read yet is not wanted: no "100 Continue" invites it.
        req.set_expect_tested(1);
        // SAFETY: as above.
        if unsafe { ngx_http_discard_request_body(r) } != NGX_OK as isize {
            return NGX_ERROR as ngx_int_t;
        }
    }
    req.headers_out.status = status.into();
    req.headers_out.content_type = ngx_str_t {
        len: content_type.len(),
        data: content_type.as_ptr().cast_mut(),
    };
    req.headers_out.content_type_len = content_type.len();
    req.headers_out.content_length_n = body.len() as i64;
    {
        // SAFETY: the request is live; Request is a transparent wrapper.
        let request = unsafe { Request::from_ngx_http_request(r) };
        for (name, value) in extra {
            if request.add_header_out(name, value).is_none() {
                return NGX_ERROR as ngx_int_t;
            }
        }
    }
    // SAFETY: the request is live.
    let rc = unsafe { ngx_http_send_header(r) };
    if rc == NGX_ERROR as isize || rc > NGX_OK as isize || req.header_only() != 0 {
        return rc;
    }
    if req.method == NGX_HTTP_HEAD as usize || body.is_empty() {
        return rc;
    }
    // SAFETY: the request is live; the buffer comes from its pool.
    let request = unsafe { Request::from_ngx_http_request(r) };
    let Some(mut buf) = request.pool().create_buffer(body.len()) else {
        return NGX_ERROR as ngx_int_t;
    };
    // SAFETY: the buffer has room for body.len() bytes.
    unsafe {
        let b = ngx::core::Buffer::as_ngx_buf_mut(&mut buf);
        ptr::copy_nonoverlapping(body.as_ptr(), (*b).last, body.len());
        (*b).last = (*b).last.add(body.len());
        (*b).set_last_buf(u32::from(ptr::eq(req.main, r)));
        (*b).set_last_in_chain(1);
        let mut out = ngx_chain_t {
            buf: b,
            next: ptr::null_mut(),
        };
        ngx_http_output_filter(r, &mut out)
    }
}
