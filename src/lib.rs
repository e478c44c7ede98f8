//! `ngx_http_websocket_chat_module`: WebSocket chat rooms served from nginx's
//! own event loop and shared across workers and hosts through Redis pub/sub.
//!
//! Where a message goes, file by file:
//! `handler` (handshake, 101) → `session` (frames in and out, over `client_io`)
//! → `redis_link` (PUBLISH on the command connection) → Redis → `redis_link`
//! (subscriber connection, reported as an event) → `rooms` (the room's
//! members, one shared frame) → every local `session` → `send_queue`.
//! `worker` holds all of it and is where nginx's event handlers come in.

use core::ffi::{c_char, c_void};
use core::ptr;

use ngx::ffi::{
    ngx_command_t, ngx_cycle_t, ngx_http_module_t, ngx_int_t, ngx_module_t, ngx_uint_t,
    NGX_HTTP_MODULE, NGX_OK,
};

mod client_io;
mod conf;
mod handler;
mod ids;
mod metrics;
mod peer;
mod publish;
mod redis_link;
mod request_ctx;
mod response;
mod rooms;
mod send_queue;
mod session;
mod status;
mod time;
mod transport;
mod variables;
mod worker;
mod zlib;

static MODULE_CTX: ngx_http_module_t = ngx_http_module_t {
    preconfiguration: Some(variables::add_variables),
    postconfiguration: Some(conf::postconfiguration),
    create_main_conf: Some(conf::create_main_conf),
    init_main_conf: None,
    create_srv_conf: None,
    merge_srv_conf: None,
    create_loc_conf: Some(conf::create_loc_conf),
    merge_loc_conf: Some(conf::merge_loc_conf),
};

// nginx's own build generates the module list for a dynamic module; a plain
// `cargo build` has to export it itself.
#[cfg(feature = "export-modules")]
ngx::ngx_modules!(ngx_http_websocket_chat_module);

#[used]
#[allow(non_upper_case_globals)]
#[no_mangle]
pub static mut ngx_http_websocket_chat_module: ngx_module_t = ngx_module_t {
    ctx: ptr::addr_of!(MODULE_CTX) as *mut c_void,
    // nginx reads the command table during configuration only; it is never
    // written.
    commands: ptr::addr_of_mut!(conf::COMMANDS) as *mut ngx_command_t,
    type_: NGX_HTTP_MODULE as ngx_uint_t,
    init_process: Some(init_process),
    exit_process: Some(exit_process),
    ..ngx_module_t::default()
};

/// The module's `ngx_module_t`, for looking up its configuration and request
/// context.
pub(crate) fn module() -> &'static ngx_module_t {
    // SAFETY: nginx writes `ctx_index`/`index` into the module while loading
    // the configuration, before any worker code runs; afterwards it is only read.
    unsafe { &*ptr::addr_of!(ngx_http_websocket_chat_module) }
}

extern "C" fn init_process(_cycle: *mut ngx_cycle_t) -> ngx_int_t {
    worker::init();
    NGX_OK as ngx_int_t
}

extern "C" fn exit_process(_cycle: *mut ngx_cycle_t) {
    worker::shutdown();
}

/// nginx reports configuration errors as this sentinel pointer.
pub(crate) fn conf_error() -> *mut c_char {
    ngx::core::NGX_CONF_ERROR
}
