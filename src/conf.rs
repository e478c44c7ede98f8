//! Configuration: the directives, their per-location values, and the list of
//! Redis endpoints the workers will connect to.

use core::ffi::{c_char, c_void, CStr};
use core::ops::RangeInclusive;
use core::{fmt, mem, ptr, slice};

use ngx::core::{Pool, NGX_CONF_OK};
use ngx::ffi::{
    ngx_command_t, ngx_conf_t, ngx_http_compile_complex_value, ngx_http_compile_complex_value_t,
    ngx_http_complex_value_t, ngx_http_core_loc_conf_t, ngx_http_request_t, ngx_msec_t,
    ngx_parse_size, ngx_parse_time, ngx_parse_url, ngx_pool_cleanup_add, ngx_ssl_certificate,
    ngx_ssl_cleanup_ctx, ngx_ssl_create, ngx_ssl_t, ngx_ssl_trusted_certificate, ngx_str_t,
    ngx_uint_t, ngx_url_t, NGX_SSL_TLSv1_2, NGX_SSL_TLSv1_3, NGX_CONF_1MORE, NGX_CONF_FLAG,
    NGX_CONF_NOARGS, NGX_CONF_TAKE1, NGX_CONF_TAKE12, NGX_ERROR, NGX_HTTP_LOC_CONF,
    NGX_HTTP_LOC_CONF_OFFSET, NGX_HTTP_MAIN_CONF, NGX_HTTP_MAIN_CONF_OFFSET, NGX_HTTP_SRV_CONF,
    NGX_LOG_EMERG, NGX_LOG_WARN, NGX_OK,
};
use ngx::http::{HttpModuleLocationConf, HttpModuleMainConf, NgxHttpCoreModule};
use ngx::{ngx_conf_log_error, ngx_log_error, ngx_string};
use wschat_core::rate::Limit;
use wschat_core::redis_addr::{self, RedisAddr};
use wschat_core::send_queue::Limit as QueueLimit;

use crate::{conf_error, handler, metrics, module, publish, status};

/// Used when a chat location names no Redis: where redis-server listens by default.
const DEFAULT_REDIS: &str = "127.0.0.1:6379";
const DEFAULT_MAX_MESSAGE: usize = 64 * 1024;
const DEFAULT_SEND_BUFFER: usize = 256 * 1024;
/// Bytes over `websocket_chat_send_buffer` a client may hold for a while.
const DEFAULT_SEND_BURST: usize = 1024 * 1024;
/// How long a client may stay over `websocket_chat_send_buffer`.
const SEND_GRACE_MS: u64 = 5_000;
const DEFAULT_CHANNEL_PREFIX: &str = "wschat:";
/// Enough for a joiner to see the conversation and for a member whose
/// connection blips (or who is moved by a reload) to resume without a gap in
/// a busy room; at most this many times `websocket_chat_max_message` per
/// room in Redis.
const DEFAULT_HISTORY: History = History {
    count: 100,
    keep_ms: 3_600_000,
};
/// Larger histories make one `history` event too large to send.
const MAX_HISTORY: usize = 10_000;
const DEFAULT_PING_INTERVAL: ngx_msec_t = 30_000;
const DEFAULT_FLUSH_DELAY: ngx_msec_t = 20;
/// Longer would be felt as lag in a conversation.
const MAX_FLUSH_DELAY: ngx_msec_t = 1_000;
const DEFAULT_IDLE_TIMEOUT: ngx_msec_t = 60_000;
const DEFAULT_REDIS_TIMEOUT: ngx_msec_t = 5_000;
const DEFAULT_REDIS_BACKLOG: usize = 1024 * 1024;
/// tungstenite refuses larger frames anyway; a chat message has no business
/// being bigger.
const MAX_MESSAGE_CEILING: usize = 16 * 1024 * 1024;

/// One Redis server as nginx will dial it.
pub struct Endpoint {
    pub addr: RedisAddr,
    /// The resolved socket address, copied out of nginx's URL parser.
    pub sockaddr: Box<[u8]>,
    /// `cluster=`: the seed nodes of a Redis Cluster, the first being
    /// `addr` (whose credentials and scheme every node shares).
    pub seeds: Option<Vec<Box<[u8]>>>,
}

impl Endpoint {
    pub fn is_cluster(&self) -> bool {
        self.seeds.is_some()
    }
}

/// http-level configuration: every distinct Redis endpoint named anywhere.
/// Each worker keeps one link per endpoint, whatever the number of locations.
#[derive(Default)]
pub struct MainConf {
    pub endpoints: Vec<Endpoint>,
    redis_timeout: Option<ngx_msec_t>,
    redis_backlog: Option<usize>,
    /// Some chat location keeps history or presence: the command
    /// connections load the scripts.
    pub uses_scripts: bool,
    pub tls: TlsConf,
    /// nginx's `resolver` at http level, if one is configured: Redis host
    /// names are looked up again through it before each reconnect.
    pub resolver: Option<ptr::NonNull<ngx::ffi::ngx_resolver_t>>,
    pub resolver_timeout: ngx_msec_t,
    /// Each set of rooms chat locations name, with the history of the first.
    room_spaces: Vec<RoomSpace>,
}

/// The rooms of one Redis endpoint and channel prefix.
struct RoomSpace {
    endpoint: usize,
    prefix: Box<str>,
    history: Option<History>,
    at: Option<ConfPlace>,
}

/// `websocket_chat_redis_ssl_*`: how `rediss://` endpoints are spoken to.
#[derive(Default)]
pub struct TlsConf {
    verify: Option<bool>,
    trusted_certificate: Option<ngx_str_t>,
    name: Option<Box<str>>,
    certificate: Option<ngx_str_t>,
    certificate_key: Option<ngx_str_t>,
    /// The client context, made once the configuration is read if some
    /// endpoint is `rediss://`; it lives in the configuration's pool.
    pub ssl: Option<ptr::NonNull<ngx_ssl_t>>,
}

impl TlsConf {
    /// Whether the server's certificate is checked (chain and name).
    pub fn verify(&self) -> bool {
        self.verify.unwrap_or(true)
    }

    /// The name checked in the certificate and sent as SNI: the one
    /// configured, else the host of the address.
    pub fn name_for<'a>(&'a self, addr: &'a RedisAddr) -> &'a str {
        self.name.as_deref().or(addr.host()).unwrap_or("")
    }
}

impl MainConf {
    /// Connect timeout, and how long Redis may take to answer.
    pub fn redis_timeout(&self) -> ngx_msec_t {
        self.redis_timeout.unwrap_or(DEFAULT_REDIS_TIMEOUT)
    }

    /// Bytes of PUBLISHes a worker holds per Redis while it is unreachable.
    pub fn redis_backlog(&self) -> usize {
        self.redis_backlog.unwrap_or(DEFAULT_REDIS_BACKLOG)
    }
}

/// Which `Origin`s may open a session.
#[derive(Clone)]
pub enum Origins {
    Any,
    Only(Vec<String>),
}

/// A configuration file and line.
#[derive(Clone)]
struct ConfPlace {
    file: String,
    line: usize,
}

impl fmt::Display for ConfPlace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

impl ConfPlace {
    fn of(cf: *mut ngx_conf_t) -> Option<ConfPlace> {
        // SAFETY: while a directive is parsed, conf_file is the file it is in.
        unsafe {
            let file = (*cf).conf_file.as_ref()?;
            Some(ConfPlace {
                file: file.file.name.to_string(),
                line: file.line,
            })
        }
    }
}

/// The per-location settings. `None` means "not set here": merged from the
/// enclosing level, then defaulted.
#[derive(Default)]
pub struct LocConf {
    enabled: bool,
    /// `websocket_chat_publish`: the location takes messages by POST.
    publish: bool,
    redis: Option<usize>,
    /// The endpoint is a Redis Cluster: channels carry a hash tag.
    sharded: bool,
    room: Option<ptr::NonNull<ngx_http_complex_value_t>>,
    user: Option<ptr::NonNull<ngx_http_complex_value_t>>,
    max_message: Option<usize>,
    send_buffer: Option<SendLimit>,
    channel_prefix: Option<Box<str>>,
    history: Option<Option<History>>,
    ping_interval: Option<ngx_msec_t>,
    idle_timeout: Option<ngx_msec_t>,
    /// Where `websocket_chat` or `websocket_chat_publish` is.
    chat_at: Option<ConfPlace>,
    /// Where the heartbeat was configured in this block, for errors found
    /// only when the levels are merged.
    heartbeat_at: Option<ConfPlace>,
    rate: Option<Option<Limit>>,
    origins: Option<Origins>,
    presence: Option<bool>,
    access_log: Option<LogAt>,
    deflate: Option<bool>,
    flush_delay: Option<ngx_msec_t>,
}

/// `websocket_chat_history number [time]`: how much of a room Redis keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct History {
    pub count: usize,
    pub keep_ms: u64,
}

/// A history setting as written in the configuration.
struct HistoryText(Option<History>);

impl fmt::Display for HistoryText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("off"),
            Some(h) if h.keep_ms % 1000 == 0 => write!(f, "{} {}s", h.count, h.keep_ms / 1000),
            Some(h) => write!(f, "{} {}ms", h.count, h.keep_ms),
        }
    }
}

/// `websocket_chat_send_buffer size [burst=size]`.
#[derive(Clone, Copy)]
struct SendLimit {
    size: usize,
    burst: usize,
}

/// When nginx writes a session's access-log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogAt {
    /// When the session ends, as for a proxied WebSocket; the HTTP request
    /// is kept for it.
    Close,
    /// Right after the 101; the HTTP request is then freed.
    Upgrade,
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

    pub fn max_message(&self) -> usize {
        self.max_message.unwrap_or(DEFAULT_MAX_MESSAGE)
    }

    /// What may wait for one client before it counts as a slow consumer.
    pub fn send_limit(&self) -> QueueLimit {
        let SendLimit { size, burst } = self.send_buffer.unwrap_or(SendLimit {
            size: DEFAULT_SEND_BUFFER,
            burst: DEFAULT_SEND_BURST,
        });
        QueueLimit {
            soft: size,
            burst,
            grace_ms: SEND_GRACE_MS,
            oversized: true,
        }
    }

    /// What Redis keeps of each room, unless history is off.
    pub fn history(&self) -> Option<History> {
        self.history.unwrap_or(Some(DEFAULT_HISTORY))
    }

    /// The Redis channel of a room: `<prefix>room`, or `<prefix>{room}` on
    /// a Redis Cluster, where the braces keep the room's channel and keys
    /// in one slot.
    pub fn channel(&self, room: &str) -> String {
        let prefix = self.channel_prefix();
        let mut channel = String::with_capacity(prefix.len() + room.len() + 2);
        channel.push_str(prefix);
        if self.sharded {
            channel.push('{');
            channel.push_str(room);
            channel.push('}');
        } else {
            channel.push_str(room);
        }
        channel
    }

    /// Room `r` travels on Redis channel `<prefix>r`.
    pub fn channel_prefix(&self) -> &str {
        self.channel_prefix
            .as_deref()
            .unwrap_or(DEFAULT_CHANNEL_PREFIX)
    }

    pub fn ping_interval(&self) -> ngx_msec_t {
        self.ping_interval.unwrap_or(DEFAULT_PING_INTERVAL)
    }

    pub fn idle_timeout(&self) -> ngx_msec_t {
        self.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT)
    }

    pub fn rate(&self) -> Option<&Limit> {
        self.rate.as_ref().and_then(Option::as_ref)
    }

    /// Whether permessage-deflate is offered to clients that ask for it.
    /// How long after a write to a member its next room events may wait,
    /// to leave together in one write; 0: at the end of each event-loop turn.
    pub fn flush_delay(&self) -> ngx_msec_t {
        self.flush_delay.unwrap_or(DEFAULT_FLUSH_DELAY)
    }

    pub fn deflate(&self) -> bool {
        self.deflate.unwrap_or(false)
    }

    /// Whether members are told of joins and leaves.
    pub fn presence(&self) -> bool {
        self.presence.unwrap_or(true)
    }

    pub fn access_log(&self) -> LogAt {
        self.access_log.unwrap_or(LogAt::Upgrade)
    }

    pub fn origins(&self) -> &Origins {
        self.origins.as_ref().unwrap_or(&Origins::Any)
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

/// Looks up this module's http-level configuration from a request.
pub fn main_conf(r: &ngx_http_request_t) -> Option<&'static MainConf> {
    Module::main_conf(r)
}

pub fn loc_conf(r: &ngx_http_request_t) -> Option<&'static LocConf> {
    Module::location_conf(r)
}

const ANY_LEVEL: u32 = NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF;

type Setter = unsafe extern "C" fn(*mut ngx_conf_t, *mut ngx_command_t, *mut c_void) -> *mut c_char;

const fn directive(name: ngx_str_t, args: u32, set: Setter) -> ngx_command_t {
    ngx_command_t {
        name,
        type_: (ANY_LEVEL | args) as ngx_uint_t,
        set: Some(set),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    }
}

const fn main_directive(name: ngx_str_t, set: Setter) -> ngx_command_t {
    ngx_command_t {
        name,
        type_: (NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1) as ngx_uint_t,
        set: Some(set),
        conf: NGX_HTTP_MAIN_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    }
}

const fn location_directive(name: ngx_str_t, set: Setter) -> ngx_command_t {
    ngx_command_t {
        name,
        type_: (NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS) as ngx_uint_t,
        set: Some(set),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    }
}

pub static mut COMMANDS: [ngx_command_t; 26] = [
    location_directive(ngx_string!("websocket_chat"), set_websocket_chat),
    location_directive(ngx_string!("websocket_chat_publish"), set_publish),
    location_directive(ngx_string!("websocket_chat_status"), set_status),
    directive(
        ngx_string!("websocket_chat_redis"),
        NGX_CONF_TAKE1,
        set_redis,
    ),
    directive(ngx_string!("websocket_chat_room"), NGX_CONF_TAKE1, set_room),
    directive(ngx_string!("websocket_chat_user"), NGX_CONF_TAKE1, set_user),
    directive(
        ngx_string!("websocket_chat_max_message"),
        NGX_CONF_TAKE1,
        set_max_message,
    ),
    directive(
        ngx_string!("websocket_chat_send_buffer"),
        NGX_CONF_TAKE12,
        set_send_buffer,
    ),
    directive(
        ngx_string!("websocket_chat_history"),
        NGX_CONF_TAKE12,
        set_history,
    ),
    directive(
        ngx_string!("websocket_chat_channel_prefix"),
        NGX_CONF_TAKE1,
        set_channel_prefix,
    ),
    directive(
        ngx_string!("websocket_chat_ping_interval"),
        NGX_CONF_TAKE1,
        set_ping_interval,
    ),
    directive(
        ngx_string!("websocket_chat_idle_timeout"),
        NGX_CONF_TAKE1,
        set_idle_timeout,
    ),
    directive(
        ngx_string!("websocket_chat_rate"),
        NGX_CONF_TAKE12,
        set_rate,
    ),
    directive(
        ngx_string!("websocket_chat_origin"),
        NGX_CONF_1MORE,
        set_origin,
    ),
    directive(
        ngx_string!("websocket_chat_presence"),
        NGX_CONF_FLAG,
        set_presence,
    ),
    directive(
        ngx_string!("websocket_chat_deflate"),
        NGX_CONF_FLAG,
        set_deflate,
    ),
    directive(
        ngx_string!("websocket_chat_flush_delay"),
        NGX_CONF_TAKE1,
        set_flush_delay,
    ),
    directive(
        ngx_string!("websocket_chat_access_log"),
        NGX_CONF_TAKE1,
        set_access_log,
    ),
    main_directive(
        ngx_string!("websocket_chat_redis_timeout"),
        set_redis_timeout,
    ),
    main_directive(
        ngx_string!("websocket_chat_redis_backlog"),
        set_redis_backlog,
    ),
    main_directive(
        ngx_string!("websocket_chat_redis_ssl_verify"),
        set_ssl_verify,
    ),
    main_directive(
        ngx_string!("websocket_chat_redis_ssl_trusted_certificate"),
        set_ssl_trusted_certificate,
    ),
    main_directive(ngx_string!("websocket_chat_redis_ssl_name"), set_ssl_name),
    main_directive(
        ngx_string!("websocket_chat_redis_ssl_certificate"),
        set_ssl_certificate,
    ),
    main_directive(
        ngx_string!("websocket_chat_redis_ssl_certificate_key"),
        set_ssl_certificate_key,
    ),
    ngx_command_t::empty(),
];

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
    conf.max_message = conf.max_message.or(prev.max_message);
    conf.send_buffer = conf.send_buffer.or(prev.send_buffer);
    if conf.channel_prefix.is_none() {
        conf.channel_prefix = prev.channel_prefix.clone();
    }
    conf.history = conf.history.or(prev.history);
    conf.presence = conf.presence.or(prev.presence);
    conf.deflate = conf.deflate.or(prev.deflate);
    conf.flush_delay = conf.flush_delay.or(prev.flush_delay);
    let chat = conf.enabled || conf.publish;
    if (conf.enabled && conf.presence()) || (chat && conf.history().is_some()) {
        // SAFETY: merging happens inside the http block, whose main
        // configuration exists.
        if let Some(main) = Module::main_conf_mut(unsafe { &*cf }) {
            main.uses_scripts = true;
        }
    }
    conf.ping_interval = conf.ping_interval.or(prev.ping_interval);
    conf.idle_timeout = conf.idle_timeout.or(prev.idle_timeout);
    conf.rate = conf.rate.or(prev.rate);
    if conf.origins.is_none() {
        conf.origins = prev.origins.clone();
    }
    conf.access_log = conf.access_log.or(prev.access_log);
    if conf.idle_timeout() <= conf.ping_interval() {
        let place = conf.heartbeat_at.as_ref().or(prev.heartbeat_at.as_ref());
        let (file, line) = place.map_or(("", 0), |p| (p.file.as_str(), p.line));
        // SAFETY: cf->log is the configuration's log during merging.
        let log = unsafe { (*cf).log };
        ngx_log_error!(
            NGX_LOG_EMERG,
            log,
            "\"websocket_chat_idle_timeout\" ({} ms) must be longer than \"websocket_chat_ping_interval\" ({} ms) in {}:{}",
            conf.idle_timeout(),
            conf.ping_interval(),
            file,
            line
        );
        return conf_error();
    }
    if conf.heartbeat_at.is_none() {
        conf.heartbeat_at = prev.heartbeat_at.clone();
    }
    if chat && conf.redis.is_none() {
        match add_endpoint(cf, DEFAULT_REDIS) {
            Ok(index) => conf.redis = Some(index),
            Err(()) => return conf_error(),
        }
    }
    // SAFETY: as above.
    if let (Some(index), Some(main)) = (conf.redis, Module::main_conf_mut(unsafe { &*cf })) {
        conf.sharded = main.endpoints.get(index).is_some_and(Endpoint::is_cluster);
        if conf.sharded && conf.channel_prefix().contains(['{', '}']) {
            ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "\"websocket_chat_channel_prefix\" \"{}\" cannot hold braces with a Redis Cluster: they would move the hash tag",
                conf.channel_prefix()
            );
            return conf_error();
        }
    }
    if chat {
        warn_shared_history(cf, conf);
    }
    if conf.enabled {
        warn_small_send_buffer(cf, conf);
    }
    if conf.publish {
        // A message is read whole into memory, never into a temporary file.
        // SAFETY: merging runs with cf->ctx set to this location's.
        if let Some(clcf) = NgxHttpCoreModule::location_conf_mut(unsafe { &*cf }) {
            let want = conf.max_message() + 1;
            clcf.client_body_buffer_size = clcf.client_body_buffer_size.max(want);
        }
    }
    ptr::null_mut()
}

/// `file:line`, or nothing where the place is unknown.
fn place_text(at: Option<&ConfPlace>) -> String {
    at.map_or(String::new(), ConfPlace::to_string)
}

/// Locations with the same Redis and channel prefix share their rooms, and
/// so each room's history: Redis trims it to the setting of the last writer,
/// and it lacks what was published with history off. Only a warning, since
/// a location may mean it (a backend's notices kept out of the history).
fn warn_shared_history(cf: *mut ngx_conf_t, conf: &LocConf) {
    // SAFETY: merging happens inside the http block, whose main
    // configuration exists.
    let Some(main) = Module::main_conf_mut(unsafe { &*cf }) else {
        return;
    };
    let (endpoint, prefix, history) = (conf.redis(), conf.channel_prefix(), conf.history());
    let first = (main.room_spaces.iter()).find(|r| r.endpoint == endpoint && &*r.prefix == prefix);
    match first {
        None => main.room_spaces.push(RoomSpace {
            endpoint,
            prefix: prefix.into(),
            history,
            at: conf.chat_at.clone(),
        }),
        Some(first) if first.history != history => {
            // SAFETY: cf->log is the configuration's log during merging.
            let log = unsafe { (*cf).log };
            ngx_log_error!(
                NGX_LOG_WARN,
                log,
                "\"websocket_chat_history\" is {} in the location at {} and {} in the one at {}, which share rooms (the same Redis and channel prefix \"{}\"): each room's history is kept as the location that last wrote to it says, and misses what is sent where it is off",
                HistoryText(first.history),
                place_text(first.at.as_ref()),
                HistoryText(history),
                place_text(conf.chat_at.as_ref()),
                prefix
            );
        }
        Some(_) => {}
    }
}

/// A send buffer that cannot hold one long message lets such messages reach
/// a member only one at a time (see `send_queue`): allowed, since a room of
/// short messages may want it, but worth saying.
fn warn_small_send_buffer(cf: *mut ngx_conf_t, conf: &LocConf) {
    let limit = conf.send_limit();
    if limit.soft + limit.burst >= conf.max_message() {
        return;
    }
    // SAFETY: cf->log is the configuration's log during merging.
    let log = unsafe { (*cf).log };
    ngx_log_error!(
        NGX_LOG_WARN,
        log,
        "\"websocket_chat_send_buffer\" ({} bytes with its burst) is smaller than \"websocket_chat_max_message\" ({} bytes) in the location at {}: members get such long messages one at a time, and one still holding much of one when the next comes is closed as a slow consumer",
        limit.soft + limit.burst,
        conf.max_message(),
        place_text(conf.chat_at.as_ref())
    );
}

/// The directive's arguments, name first.
fn args<'a>(cf: *mut ngx_conf_t) -> &'a [ngx_str_t] {
    // SAFETY: while a directive handler runs, cf->args holds its words.
    unsafe { (*(*cf).args).as_slice() }
}

fn loc_conf_mut<'a>(conf: *mut c_void) -> &'a mut LocConf {
    // SAFETY: every directive of this module stores into its LocConf
    // (NGX_HTTP_LOC_CONF_OFFSET), which nginx passes as `conf`.
    unsafe { &mut *(conf as *mut LocConf) }
}

/// Why a directive's value was refused; logged with the file and line.
enum ConfError {
    Invalid(&'static str),
    Other(String),
    /// nginx has logged the reason already.
    Logged,
}

/// Stores a directive's value once: a second occurrence in the same block is
/// an error, as for nginx's own directives.
fn set_once<T>(
    cf: *mut ngx_conf_t,
    slot: &mut Option<T>,
    parse: impl FnOnce(&[ngx_str_t]) -> Result<T, ConfError>,
) -> *mut c_char {
    let args = args(cf);
    if slot.is_some() {
        ngx_conf_log_error!(NGX_LOG_EMERG, cf, "\"{}\" directive is duplicate", args[0]);
        return conf_error();
    }
    match parse(&args[1..]) {
        Ok(value) => {
            *slot = Some(value);
            NGX_CONF_OK
        }
        Err(ConfError::Invalid(what)) => {
            let value = args[1..]
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(" ");
            ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "{} \"{}\" in \"{}\" directive",
                what,
                value,
                args[0]
            );
            conf_error()
        }
        Err(ConfError::Other(message)) => {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "{}", message);
            conf_error()
        }
        Err(ConfError::Logged) => conf_error(),
    }
}

extern "C" fn set_websocket_chat(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let lc = loc_conf_mut(conf);
    let mut enabled = lc.enabled.then_some(());
    let rv = set_once(cf, &mut enabled, |_| Ok(()));
    lc.enabled = enabled.is_some();
    if rv != NGX_CONF_OK {
        return rv;
    }
    lc.chat_at = ConfPlace::of(cf);
    set_location_handler(cf, Some(handler::websocket_chat_handler))
}

/// A location that is not a session endpoint: only the content handler
/// and the status zone.
fn set_location_handler(
    cf: *mut ngx_conf_t,
    handler: ngx::ffi::ngx_http_handler_pt,
) -> *mut c_char {
    if metrics::declare(cf).is_err() {
        return conf_error();
    }
    // SAFETY: cf is a valid http configuration context inside a location.
    let clcf: Option<&mut ngx_http_core_loc_conf_t> =
        NgxHttpCoreModule::location_conf_mut(unsafe { &*cf });
    match clcf {
        Some(clcf) if clcf.handler.is_none() => {
            clcf.handler = handler;
            NGX_CONF_OK
        }
        Some(_) => {
            ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "\"{}\" directive conflicts with another content handler in this location",
                args(cf)[0]
            );
            conf_error()
        }
        None => conf_error(),
    }
}

extern "C" fn set_publish(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let lc = loc_conf_mut(conf);
    let mut publish = lc.publish.then_some(());
    let rv = set_once(cf, &mut publish, |_| Ok(()));
    lc.publish = publish.is_some();
    if rv != NGX_CONF_OK {
        return rv;
    }
    lc.chat_at = ConfPlace::of(cf);
    set_location_handler(cf, Some(publish::websocket_chat_publish_handler))
}

extern "C" fn set_status(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    _conf: *mut c_void,
) -> *mut c_char {
    set_location_handler(cf, Some(status::websocket_chat_status_handler))
}

extern "C" fn set_redis(
    cf: *mut ngx_conf_t,
    _: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    set_once(cf, &mut loc_conf_mut(conf).redis, |args| {
        let text = args[0]
            .to_str()
            .map_err(|_| ConfError::Invalid("invalid Redis address"))?;
        add_endpoint(cf, text).map_err(|()| ConfError::Logged)
    })
}

extern "C" fn set_room(
    cf: *mut ngx_conf_t,
    _: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    set_once(cf, &mut loc_conf_mut(conf).room, |_| {
        compile_complex_value(cf)
    })
}

extern "C" fn set_user(
    cf: *mut ngx_conf_t,
    _: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    set_once(cf, &mut loc_conf_mut(conf).user, |_| {
        compile_complex_value(cf)
    })
}

extern "C" fn set_max_message(
    cf: *mut ngx_conf_t,
    _: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    set_once(cf, &mut loc_conf_mut(conf).max_message, |args| {
        size_in(&args[0], 1..=MAX_MESSAGE_CEILING, "invalid size (1 to 16m)")
    })
}

extern "C" fn set_send_buffer(
    cf: *mut ngx_conf_t,
    _: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    set_once(cf, &mut loc_conf_mut(conf).send_buffer, |args| {
        let size = size_in(&args[0], 1024..=usize::MAX, "invalid size (at least 1k)")?;
        let burst = match args.get(1) {
            None => DEFAULT_SEND_BURST,
            Some(arg) => {
                let value = arg
                    .as_bytes()
                    .strip_prefix(b"burst=")
                    .ok_or(ConfError::Invalid("invalid parameter"))?;
                let value = ngx_str_t {
                    len: value.len(),
                    data: value.as_ptr().cast_mut(),
                };
                size_in(&value, 0..=usize::MAX, "invalid burst size")?
            }
        };
        Ok(SendLimit { size, burst })
    })
}

extern "C" fn set_history(
    cf: *mut ngx_conf_t,
    _: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    set_once(cf, &mut loc_conf_mut(conf).history, |args| {
        if args[0].as_bytes() == b"off" && args.len() == 1 {
            return Ok(None);
        }
        let count = args[0]
            .to_str()
            .ok()
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| (1..=MAX_HISTORY).contains(n))
            .ok_or(ConfError::Invalid("invalid number (1 to 10000, or off)"))?;
        let keep_ms = match args.get(1) {
            Some(time) => parse_time(time)?,
            None => DEFAULT_HISTORY.keep_ms as ngx_msec_t,
        };
        Ok(Some(History {
            count,
            keep_ms: keep_ms as u64,
        }))
    })
}

extern "C" fn set_channel_prefix(
    cf: *mut ngx_conf_t,
    _: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    set_once(cf, &mut loc_conf_mut(conf).channel_prefix, |args| {
        // Channel names go into Redis commands and log lines as they are.
        match args[0].to_str() {
            Ok(p) if !p.is_empty() && !p.chars().any(|c| c.is_whitespace() || c.is_control()) => {
                Ok(p.into())
            }
            _ => Err(ConfError::Invalid("invalid channel prefix")),
        }
    })
}

extern "C" fn set_ping_interval(
    cf: *mut ngx_conf_t,
    _: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    set_heartbeat(cf, conf, |lc| &mut lc.ping_interval)
}

extern "C" fn set_idle_timeout(
    cf: *mut ngx_conf_t,
    _: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    set_heartbeat(cf, conf, |lc| &mut lc.idle_timeout)
}

/// The two heartbeat times, remembering where they were set: their
/// consistency can only be checked once the levels are merged.
fn set_heartbeat(
    cf: *mut ngx_conf_t,
    conf: *mut c_void,
    slot: impl FnOnce(&mut LocConf) -> &mut Option<ngx_msec_t>,
) -> *mut c_char {
    let lc = loc_conf_mut(conf);
    lc.heartbeat_at = ConfPlace::of(cf);
    set_once(cf, slot(lc), |args| parse_time(&args[0]))
}

extern "C" fn set_rate(
    cf: *mut ngx_conf_t,
    _: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    set_once(cf, &mut loc_conf_mut(conf).rate, |args| {
        let words: Vec<&str> = args.iter().filter_map(|a| a.to_str().ok()).collect();
        if words.len() != args.len() {
            return Err(ConfError::Invalid("invalid value"));
        }
        if words == ["off"] {
            return Ok(None);
        }
        Limit::parse(&words)
            .map(Some)
            .map_err(|e| ConfError::Other(format!("{e} in \"websocket_chat_rate\" directive")))
    })
}

extern "C" fn set_presence(
    cf: *mut ngx_conf_t,
    _: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    set_once(cf, &mut loc_conf_mut(conf).presence, on_off)
}

extern "C" fn set_deflate(
    cf: *mut ngx_conf_t,
    _: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    set_once(cf, &mut loc_conf_mut(conf).deflate, on_off)
}

extern "C" fn set_flush_delay(
    cf: *mut ngx_conf_t,
    _: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    set_once(cf, &mut loc_conf_mut(conf).flush_delay, |args| {
        match args[0].as_bytes() {
            b"off" | b"0" => Ok(0),
            _ => parse_time(&args[0])
                .ok()
                .filter(|&t| t <= MAX_FLUSH_DELAY)
                .ok_or(ConfError::Invalid("invalid time (off, or up to 1s)")),
        }
    })
}

extern "C" fn set_access_log(
    cf: *mut ngx_conf_t,
    _: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    set_once(cf, &mut loc_conf_mut(conf).access_log, |args| {
        match args[0].as_bytes() {
            b"close" => Ok(LogAt::Close),
            b"upgrade" => Ok(LogAt::Upgrade),
            _ => Err(ConfError::Invalid("invalid value (close or upgrade)")),
        }
    })
}

extern "C" fn set_origin(
    cf: *mut ngx_conf_t,
    _: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    set_once(cf, &mut loc_conf_mut(conf).origins, |args| {
        let words: Option<Vec<String>> = args
            .iter()
            .map(|a| a.to_str().ok().map(str::to_owned))
            .collect();
        match words {
            Some(words) if words == ["any"] => Ok(Origins::Any),
            Some(words) if !words.iter().any(|w| w == "any" || w.is_empty()) => {
                Ok(Origins::Only(words))
            }
            _ => Err(ConfError::Invalid("invalid origin list")),
        }
    })
}

fn main_conf_mut<'a>(conf: *mut c_void) -> &'a mut MainConf {
    // SAFETY: main-level directives store into this module's MainConf
    // (NGX_HTTP_MAIN_CONF_OFFSET), which nginx passes as `conf`.
    unsafe { &mut *(conf as *mut MainConf) }
}

extern "C" fn set_redis_timeout(
    cf: *mut ngx_conf_t,
    _: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    set_once(cf, &mut main_conf_mut(conf).redis_timeout, |args| {
        parse_time(&args[0])
    })
}

extern "C" fn set_redis_backlog(
    cf: *mut ngx_conf_t,
    _: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    set_once(cf, &mut main_conf_mut(conf).redis_backlog, |args| {
        size_in(&args[0], 1024..=usize::MAX, "invalid size (at least 1k)")
    })
}

extern "C" fn set_ssl_verify(
    cf: *mut ngx_conf_t,
    _: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    set_once(cf, &mut main_conf_mut(conf).tls.verify, on_off)
}

/// `on` or `off`, for the flags that `set_once` stores.
fn on_off(args: &[ngx_str_t]) -> Result<bool, ConfError> {
    match args[0].as_bytes() {
        b"on" => Ok(true),
        b"off" => Ok(false),
        _ => Err(ConfError::Invalid("invalid value (on or off)")),
    }
}

/// A file name, kept as nginx read it (the configuration pool holds it).
fn file_name(args: &[ngx_str_t]) -> Result<ngx_str_t, ConfError> {
    match args[0].len {
        0 => Err(ConfError::Invalid("empty file name")),
        _ => Ok(args[0]),
    }
}

extern "C" fn set_ssl_trusted_certificate(
    cf: *mut ngx_conf_t,
    _: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    set_once(
        cf,
        &mut main_conf_mut(conf).tls.trusted_certificate,
        file_name,
    )
}

extern "C" fn set_ssl_certificate(
    cf: *mut ngx_conf_t,
    _: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    set_once(cf, &mut main_conf_mut(conf).tls.certificate, file_name)
}

extern "C" fn set_ssl_certificate_key(
    cf: *mut ngx_conf_t,
    _: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    set_once(cf, &mut main_conf_mut(conf).tls.certificate_key, file_name)
}

extern "C" fn set_ssl_name(
    cf: *mut ngx_conf_t,
    _: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    set_once(cf, &mut main_conf_mut(conf).tls.name, |args| {
        match args[0].to_str() {
            Ok(name) if !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic()) => {
                Ok(name.into())
            }
            _ => Err(ConfError::Invalid("invalid server name")),
        }
    })
}

/// How deep a Redis server's certificate chain may be.
const SSL_VERIFY_DEPTH: isize = 4;

/// The module's postconfiguration: the TLS client context, if some Redis
/// is `rediss://`, made and checked while `nginx -t` can still say what is
/// wrong.
pub extern "C" fn postconfiguration(cf: *mut ngx_conf_t) -> ngx::ffi::ngx_int_t {
    // SAFETY: inside the http block the main configuration exists.
    let Some(main) = Module::main_conf_mut(unsafe { &*cf }) else {
        return NGX_OK as ngx::ffi::ngx_int_t;
    };
    // SAFETY: at postconfiguration cf->ctx is the http block's, merged.
    if let Some(clcf) = NgxHttpCoreModule::location_conf(unsafe { &*cf }) {
        // nginx gives every level a resolver; one without servers is none.
        main.resolver = ptr::NonNull::new(clcf.resolver)
            // SAFETY: a resolver nginx made for the configuration.
            .filter(|r| unsafe { r.as_ref() }.connections.nelts > 0);
        main.resolver_timeout = clcf.resolver_timeout;
    }
    if !main.endpoints.iter().any(|e| e.addr.tls) {
        return NGX_OK as ngx::ffi::ngx_int_t;
    }
    match client_tls(cf, &main.tls) {
        Ok(ssl) => {
            main.tls.ssl = Some(ssl);
            NGX_OK as ngx::ffi::ngx_int_t
        }
        Err(why) => {
            if let Some(why) = why {
                // SAFETY: cf->log is the configuration's log.
                ngx_log_error!(NGX_LOG_EMERG, unsafe { (*cf).log }, "{}", why);
            }
            NGX_ERROR as ngx::ffi::ngx_int_t
        }
    }
}

/// `Err(None)`: nginx has logged why.
fn client_tls(
    cf: *mut ngx_conf_t,
    tls: &TlsConf,
) -> Result<ptr::NonNull<ngx_ssl_t>, Option<String>> {
    // SAFETY: cf is valid; the context lives in its pool, which a cleanup
    // frees it with.
    unsafe {
        let pool = Pool::from_ngx_pool((*cf).pool);
        let ssl = ptr::NonNull::new(pool.calloc_type::<ngx_ssl_t>()).ok_or(None)?;
        (*ssl.as_ptr()).log = (*cf).log;
        let protocols = (NGX_SSL_TLSv1_2 | NGX_SSL_TLSv1_3) as ngx_uint_t;
        if ngx_ssl_create(ssl.as_ptr(), protocols, ptr::null_mut()) != NGX_OK as isize {
            return Err(None);
        }
        let cln = ngx_pool_cleanup_add((*cf).pool, 0);
        if cln.is_null() {
            return Err(None);
        }
        (*cln).handler = Some(ngx_ssl_cleanup_ctx);
        (*cln).data = ssl.as_ptr().cast();
        match (tls.certificate, tls.certificate_key) {
            (Some(mut cert), Some(mut key)) => {
                let rc = ngx_ssl_certificate(cf, ssl.as_ptr(), &mut cert, &mut key, ptr::null_mut());
                if rc != NGX_OK as isize {
                    return Err(None);
                }
            }
            (None, None) => {}
            _ => {
                return Err(Some(
                    "\"websocket_chat_redis_ssl_certificate\" and \"websocket_chat_redis_ssl_certificate_key\" go together".into(),
                ))
            }
        }
        if tls.verify() {
            let Some(mut trusted) = tls.trusted_certificate else {
                return Err(Some(
                    "no \"websocket_chat_redis_ssl_trusted_certificate\" for rediss:// with \"websocket_chat_redis_ssl_verify on\" (the default)".into(),
                ));
            };
            if ngx_ssl_trusted_certificate(cf, ssl.as_ptr(), &mut trusted, SSL_VERIFY_DEPTH)
                != NGX_OK as isize
            {
                return Err(None);
            }
        }
        Ok(ssl)
    }
}

/// An nginx size (`64k`, `1m`) within `range`.
fn size_in(
    value: &ngx_str_t,
    range: RangeInclusive<usize>,
    invalid: &'static str,
) -> Result<usize, ConfError> {
    let mut v = *value;
    // SAFETY: v is a valid ngx_str_t; nginx only reads it.
    let n = unsafe { ngx_parse_size(&mut v) };
    if n == NGX_ERROR as isize || !range.contains(&(n as usize)) {
        return Err(ConfError::Invalid(invalid));
    }
    Ok(n as usize)
}

fn parse_time(value: &ngx_str_t) -> Result<ngx_msec_t, ConfError> {
    let mut v = *value;
    // SAFETY: v is a valid ngx_str_t; nginx only reads it.
    let n = unsafe { ngx_parse_time(&mut v, 0) };
    if n == NGX_ERROR as isize || n <= 0 {
        return Err(ConfError::Invalid("invalid time"));
    }
    Ok(n as ngx_msec_t)
}

/// Compiles the directive's argument (variables allowed) into the
/// configuration pool.
fn compile_complex_value(
    cf: *mut ngx_conf_t,
) -> Result<ptr::NonNull<ngx_http_complex_value_t>, ConfError> {
    // SAFETY: cf is valid during the directive; the pool outlives the
    // configuration that keeps the pointer.
    let pool = unsafe { Pool::from_ngx_pool((*cf).pool) };
    let cv = ptr::NonNull::new(pool.calloc_type::<ngx_http_complex_value_t>())
        .ok_or(ConfError::Logged)?;
    let mut value = args(cf)[1];
    // SAFETY: an all-zero ngx_http_compile_complex_value_t is its documented
    // initial state (nginx itself ngx_memzero()s it).
    let mut ccv: ngx_http_compile_complex_value_t = unsafe { mem::zeroed() };
    ccv.cf = cf;
    ccv.value = &mut value;
    ccv.complex_value = cv.as_ptr();
    // SAFETY: ccv is fully initialised; nginx logs its own error on failure.
    if unsafe { ngx_http_compile_complex_value(&mut ccv) } != NGX_OK as isize {
        return Err(ConfError::Logged);
    }
    Ok(cv)
}

/// Parses and resolves a Redis address and records it in the main
/// configuration, reusing an existing entry for the same server and
/// credentials. Errors are logged against the directive's file and line.
fn add_endpoint(cf: *mut ngx_conf_t, text: &str) -> Result<usize, ()> {
    let parsed = match text.strip_prefix("cluster=") {
        Some(list) => redis_addr::parse_cluster(list).map(|seeds| (seeds, true)),
        None => redis_addr::parse(text).map(|addr| (vec![addr], false)),
    };
    let (addrs, cluster) = match parsed {
        Ok(parsed) => parsed,
        Err(err) => {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "{} \"{}\"", err, text);
            return Err(());
        }
    };
    let mut sockaddrs = Vec::with_capacity(addrs.len());
    for addr in &addrs {
        sockaddrs.push(resolve(cf, addr)?);
    }
    let addr = addrs.into_iter().next().ok_or(())?;
    let endpoint = Endpoint {
        addr,
        sockaddr: sockaddrs[0].clone(),
        seeds: cluster.then_some(sockaddrs),
    };
    // SAFETY: inside the http block the main configuration exists.
    let main = Module::main_conf_mut(unsafe { &*cf }).ok_or(())?;
    if let Some(index) =
        (main.endpoints.iter()).position(|e| e.addr == endpoint.addr && e.seeds == endpoint.seeds)
    {
        return Ok(index);
    }
    main.endpoints.push(endpoint);
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
