//! `$websocket_chat_*`: a session's room, user, id, message counts and
//! close code, for `log_format` and `map`. They read the request's context
//! only (see `request_ctx`): the access-log line may be written while the
//! worker's state is lent out.

use core::ptr;

use ngx::ffi::{
    ngx_conf_t, ngx_http_add_variable, ngx_http_request_t, ngx_http_variable_value_t, ngx_int_t,
    ngx_pnalloc, ngx_str_t, NGX_ERROR, NGX_HTTP_VAR_NOCACHEABLE, NGX_OK,
};

use crate::request_ctx::RequestCtx;

#[derive(Clone, Copy)]
enum Var {
    Room,
    User,
    SessionId,
    MessagesIn,
    MessagesOut,
    CloseCode,
}

const VARS: [(&str, Var); 6] = [
    ("websocket_chat_room", Var::Room),
    ("websocket_chat_user", Var::User),
    ("websocket_chat_session_id", Var::SessionId),
    ("websocket_chat_messages_in", Var::MessagesIn),
    ("websocket_chat_messages_out", Var::MessagesOut),
    ("websocket_chat_close_code", Var::CloseCode),
];

/// The module's preconfiguration: declares the variables.
pub extern "C" fn add_variables(cf: *mut ngx_conf_t) -> ngx_int_t {
    for (name, var) in VARS {
        let mut name = ngx_str_t {
            len: name.len(),
            data: name.as_ptr().cast_mut(),
        };
        // SAFETY: cf is the http block's configuration; nginx copies the name.
        let v = unsafe { ngx_http_add_variable(cf, &mut name, NGX_HTTP_VAR_NOCACHEABLE as _) };
        // SAFETY: v is null or the variable nginx made for us.
        let Some(v) = (unsafe { v.as_mut() }) else {
            return NGX_ERROR as ngx_int_t;
        };
        v.get_handler = Some(get);
        v.data = var as usize;
    }
    NGX_OK as ngx_int_t
}

unsafe extern "C" fn get(
    r: *mut ngx_http_request_t,
    v: *mut ngx_http_variable_value_t,
    data: usize,
) -> ngx_int_t {
    // SAFETY: nginx passes a live request and a value to fill.
    let (ctx, v) = unsafe { (RequestCtx::of(r), &mut *v) };
    let var = VARS.iter().map(|(_, var)| *var).nth(data);
    let value = match (ctx, var) {
        (Some(ctx), Some(var)) if ctx.room.len > 0 => match var {
            Var::Room => Value::Str(ctx.room),
            Var::User => Value::Str(ctx.user),
            Var::SessionId => Value::Str(ctx.session_id),
            Var::MessagesIn => Value::Number(ctx.messages_in),
            Var::MessagesOut => Value::Number(ctx.messages_out),
            Var::CloseCode if ctx.close_code != 0 => Value::Number(ctx.close_code.into()),
            Var::CloseCode => Value::NotFound,
        },
        _ => Value::NotFound,
    };
    let s = match value {
        Value::Str(s) if s.len > 0 => s,
        Value::Number(n) => {
            let text = n.to_string();
            // SAFETY: r is live; its pool holds the text as long as the value.
            let data = unsafe { ngx_pnalloc((*r).pool, text.len()) }.cast::<u8>();
            if data.is_null() {
                return NGX_ERROR as ngx_int_t;
            }
            // SAFETY: data has room for the text.
            unsafe { ptr::copy_nonoverlapping(text.as_ptr(), data, text.len()) };
            ngx_str_t {
                len: text.len(),
                data,
            }
        }
        _ => {
            v.set_not_found(1);
            return NGX_OK as ngx_int_t;
        }
    };
    v.set_len(s.len as _);
    v.set_valid(1);
    v.set_no_cacheable(0);
    v.set_not_found(0);
    v.data = s.data;
    NGX_OK as ngx_int_t
}

enum Value {
    Str(ngx_str_t),
    Number(u64),
    NotFound,
}
