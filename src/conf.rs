//! Configuration: the directives, their per-location values, and the list of
//! Redis endpoints the workers will connect to.

use core::ffi::{c_char, c_void, CStr};
use core::{mem, ptr, slice};

use ngx::core::{Pool, NGX_CONF_OK};
use ngx::ffi::{
    ngx_command_t, ngx_conf_t, ngx_http_compile_complex_value, ngx_http_compile_complex_value_t,
    ngx_http_complex_value_t, ngx_http_core_loc_conf_t, ngx_parse_url, ngx_str_t, ngx_url_t,
    NGX_LOG_EMERG, NGX_OK,
};
use ngx::http::{HttpModuleLocationConf, HttpModuleMainConf, NgxHttpCoreModule};
use ngx::ngx_conf_log_error;

use crate::{conf_error, handler, module};
use wschat_core::redis_addr::{self, RedisAddr};

/// Used when a chat location names no Redis: where redis-server listens by default.
const DEFAULT_REDIS: &str = "127.0.0.1:6379";

/// One Redis server as nginx will dial it.
pub struct Endpoint {
    pub addr: RedisAddr,
    /// The resolved socket address, copied out of nginx's URL parser.
    pub sockaddr: Box<[u8]>,
}

/// http-level configuration: every distinct Redis endpoint named anywhere.
/// Each worker keeps one link per endpoint, whatever the number of locations.
#[derive(Default)]
pub struct MainConf {
    pub endpoints: Vec<Endpoint>,
}

#[derive(Default)]
pub struct LocConf {
    enabled: bool,
    redis: Option<usize>,
    room: Option<ptr::NonNull<ngx_http_complex_value_t>>,
    user: Option<ptr::NonNull<ngx_http_complex_value_t>>,
}

impl LocConf {
    /// Index of this location's Redis endpoint in [`MainConf::endpoints`].
    pub fn redis(&self) -> usize {
        // merge_loc_conf gives every enabled location an endpoint.
        self.redis.unwrap_or(0)
    }

    pub fn room(&self) -> Option<&ngx_http_complex_value_t> {
        // SAFETY: compiled into the configuration pool, which outlives requests.
        self.room.map(|p| unsafe { p.as_ref() })
    }

    pub fn user(&self) -> Option<&ngx_http_complex_value_t> {
        // SAFETY: as for `room`.
        self.user.map(|p| unsafe { p.as_ref() })
    }
}

pub struct Module;

impl ngx::http::HttpModule for Module {
    fn module() -> &'static ngx::ffi::ngx_module_t {
        module()
    }
}

// SAFETY: MainConf and LocConf are the types create_main_conf and
// create_loc_conf allocate for this module.
unsafe impl HttpModuleMainConf for Module {
    type MainConf = MainConf;
}

// SAFETY: as above.
unsafe impl HttpModuleLocationConf for Module {
    type LocationConf = LocConf;
}

pub extern "C" fn create_main_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    // SAFETY: nginx passes a valid configuration context with a live pool.
    let pool = unsafe { Pool::from_ngx_pool((*cf).pool) };
    pool.allocate(MainConf::default()).cast()
}

pub extern "C" fn create_loc_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    // SAFETY: as in create_main_conf.
    let pool = unsafe { Pool::from_ngx_pool((*cf).pool) };
    pool.allocate(LocConf::default()).cast()
}

pub extern "C" fn merge_loc_conf(
    cf: *mut ngx_conf_t,
    prev: *mut c_void,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes the two LocConf objects create_loc_conf made.
    let (prev, conf) = unsafe { (&*(prev as *const LocConf), &mut *(conf as *mut LocConf)) };
    conf.redis = conf.redis.or(prev.redis);
    conf.room = conf.room.or(prev.room);
    conf.user = conf.user.or(prev.user);
    if conf.enabled && conf.redis.is_none() {
        match add_endpoint(cf, DEFAULT_REDIS) {
            Ok(index) => conf.redis = Some(index),
            Err(()) => return conf_error(),
        }
    }
    ptr::null_mut()
}

/// The directive's arguments, name first.
fn args<'a>(cf: *mut ngx_conf_t) -> &'a [ngx_str_t] {
    // SAFETY: while a directive handler runs, cf->args holds its words.
    unsafe { (*(*cf).args).as_slice() }
}

fn duplicate(cf: *mut ngx_conf_t) -> *mut c_char {
    ngx_conf_log_error!(
        NGX_LOG_EMERG,
        cf,
        "\"{}\" directive is duplicate",
        args(cf)[0]
    );
    conf_error()
}

fn loc_conf<'a>(conf: *mut c_void) -> &'a mut LocConf {
    // SAFETY: every directive of this module stores into its LocConf
    // (NGX_HTTP_LOC_CONF_OFFSET), which nginx passes as `conf`.
    unsafe { &mut *(conf as *mut LocConf) }
}

pub extern "C" fn set_websocket_chat(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let lc = loc_conf(conf);
    if lc.enabled {
        return duplicate(cf);
    }
    lc.enabled = true;
    // SAFETY: cf is a valid http configuration context inside a location.
    let clcf: &mut ngx_http_core_loc_conf_t =
        match NgxHttpCoreModule::location_conf_mut(unsafe { &*cf }) {
            Some(clcf) => clcf,
            None => return conf_error(),
        };
    clcf.handler = Some(handler::websocket_chat_handler);
    NGX_CONF_OK
}

pub extern "C" fn set_redis(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let lc = loc_conf(conf);
    if lc.redis.is_some() {
        return duplicate(cf);
    }
    let value = args(cf)[1];
    let Ok(text) = value.to_str() else {
        ngx_conf_log_error!(NGX_LOG_EMERG, cf, "invalid Redis address \"{}\"", value);
        return conf_error();
    };
    match add_endpoint(cf, text) {
        Ok(index) => {
            lc.redis = Some(index);
            NGX_CONF_OK
        }
        Err(()) => conf_error(),
    }
}

pub extern "C" fn set_room(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let lc = loc_conf(conf);
    if lc.room.is_some() {
        return duplicate(cf);
    }
    match compile_complex_value(cf) {
        Some(cv) => {
            lc.room = Some(cv);
            NGX_CONF_OK
        }
        None => conf_error(),
    }
}

pub extern "C" fn set_user(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let lc = loc_conf(conf);
    if lc.user.is_some() {
        return duplicate(cf);
    }
    match compile_complex_value(cf) {
        Some(cv) => {
            lc.user = Some(cv);
            NGX_CONF_OK
        }
        None => conf_error(),
    }
}

/// Compiles the directive's argument (variables allowed) into the
/// configuration pool.
fn compile_complex_value(cf: *mut ngx_conf_t) -> Option<ptr::NonNull<ngx_http_complex_value_t>> {
    // SAFETY: cf is valid during the directive; the pool outlives the
    // configuration that keeps the pointer.
    let pool = unsafe { Pool::from_ngx_pool((*cf).pool) };
    let cv = ptr::NonNull::new(pool.calloc_type::<ngx_http_complex_value_t>())?;
    let mut value = args(cf)[1];
    // SAFETY: an all-zero ngx_http_compile_complex_value_t is its documented
    // initial state (nginx itself ngx_memzero()s it).
    let mut ccv: ngx_http_compile_complex_value_t = unsafe { mem::zeroed() };
    ccv.cf = cf;
    ccv.value = &mut value;
    ccv.complex_value = cv.as_ptr();
    // SAFETY: ccv is fully initialised; nginx logs its own error on failure.
    (unsafe { ngx_http_compile_complex_value(&mut ccv) } == NGX_OK as isize).then_some(cv)
}

/// Parses and resolves a Redis address and records it in the main
/// configuration, reusing an existing entry for the same server and
/// credentials. Errors are logged against the directive's file and line.
fn add_endpoint(cf: *mut ngx_conf_t, text: &str) -> Result<usize, ()> {
    let addr = match redis_addr::parse(text) {
        Ok(addr) => addr,
        Err(err) => {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "{} \"{}\"", err, text);
            return Err(());
        }
    };
    let sockaddr = resolve(cf, &addr)?;
    // SAFETY: inside the http block the main configuration exists.
    let main = Module::main_conf_mut(unsafe { &*cf }).ok_or(())?;
    if let Some(index) = main.endpoints.iter().position(|e| e.addr == addr) {
        return Ok(index);
    }
    main.endpoints.push(Endpoint { addr, sockaddr });
    Ok(main.endpoints.len() - 1)
}

/// Turns the address into a socket address with nginx's own URL parser, so
/// host names resolve the way they do for `proxy_pass` (once, at start-up).
fn resolve(cf: *mut ngx_conf_t, addr: &RedisAddr) -> Result<Box<[u8]>, ()> {
    let mut endpoint = addr.endpoint().into_bytes();
    // SAFETY: an all-zero ngx_url_t is the documented initial state.
    let mut url: ngx_url_t = unsafe { mem::zeroed() };
    url.url = ngx_str_t {
        len: endpoint.len(),
        data: endpoint.as_mut_ptr(),
    };
    url.default_port = 6379;
    // SAFETY: url points at `endpoint`, alive for the call; results are
    // allocated from the configuration pool.
    let rc = unsafe { ngx_parse_url((*cf).pool, &mut url) };
    if rc != NGX_OK as isize || url.naddrs == 0 {
        let reason = if url.err.is_null() {
            "host not found"
        } else {
            // SAFETY: nginx sets err to a static NUL-terminated message.
            unsafe { CStr::from_ptr(url.err) }
                .to_str()
                .unwrap_or("error")
        };
        ngx_conf_log_error!(
            NGX_LOG_EMERG,
            cf,
            "{} in Redis address \"{}\"",
            reason,
            addr
        );
        return Err(());
    }
    // SAFETY: naddrs > 0, so addrs[0] is a valid address of socklen bytes.
    let first = unsafe { &*url.addrs };
    let bytes =
        unsafe { slice::from_raw_parts(first.sockaddr.cast::<u8>(), first.socklen as usize) };
    Ok(bytes.into())
}

/// Looks up this module's http-level configuration from a request.
pub fn main_conf(r: &ngx::ffi::ngx_http_request_t) -> Option<&'static MainConf> {
    Module::main_conf(r)
}

pub fn loc_conf_of(r: &ngx::ffi::ngx_http_request_t) -> Option<&'static LocConf> {
    Module::location_conf(r)
}
