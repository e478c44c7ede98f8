//! One worker's transport to one Redis server: a subscriber connection that
//! follows the channels it is asked to follow, and a command connection that
//! carries pipelined PUBLISHes. It knows channels and replies, not sessions:
//! what happens on the wire (a message, a subscription confirmed or refused,
//! an outage) is queued as an [`Event`] for the rooms layer to take after
//! each call, so nothing here calls back into its callers.
//!
//! When Redis goes away the link keeps what it was asked for: PUBLISHes wait
//! in a bounded backlog, both connections come back with capped exponential
//! backoff, and every wanted channel is subscribed again. The backlog is held
//! until then, so that local members see what was sent during the outage.

use core::ffi::c_void;
use core::ptr;
use std::collections::{HashMap, VecDeque};
use std::ffi::CString;
use std::rc::Rc;

use ngx::ffi::{
    ngx_connection_handler_pt, ngx_current_msec, ngx_event_handler_pt, ngx_event_t, ngx_log_t,
    ngx_msec_t, ngx_resolver_t, ngx_ssl_t, NGX_LOG_ERR, NGX_LOG_INFO, NGX_LOG_NOTICE, NGX_LOG_WARN,
};
use ngx::ngx_log_error;
use redis::Value;
use wschat_core::backoff::Backoff;
use wschat_core::history::Request;
use wschat_core::redis_addr::Target;
use wschat_core::resp::{self, Limits};
use wschat_core::slots::{self, Node, Redirect};
use wschat_core::{envelope, presence};

use crate::conf::{Endpoint, MainConf};
use crate::ids;
use crate::metrics::{self, Counter, Gauge};
use crate::peer::{PeerConn, ReadOutcome, Resolved, State};

/// What the link accepts from Redis: nothing larger than a chat message can
/// legitimately arrive, and no array longer than a history fetch (at most
/// 10,000 entries, plus one) or deeper than its entries' fields, so
/// anything beyond is a broken or hostile server.
const REPLY_LIMITS: Limits = Limits {
    max_bulk: 4 << 20,
    max_elements: 10_001,
    max_depth: 4,
};

/// Bytes read from one connection per event-loop turn: enough for many
/// messages, small enough that one busy link cannot starve the worker's
/// clients. What is left is read on the next turn.
const READ_BUDGET: usize = 256 * 1024;

/// The rooms layer's clock: presence summaries go out at most this often.
pub const TICK_MS: ngx_msec_t = 1_000;

/// Redirections one command or subscription follows at most before it is
/// given up as a loop.
pub const MAX_HOPS: u8 = 5;

#[derive(Debug)]
pub struct BacklogFull;

/// Who asked for a command, opaque to the link and handed back with the
/// command's failure.
pub type Tag = u64;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    Sub,
    Cmd,
}

/// Why nginx called: the connection's read or write event, its timer, or
/// the reconnect timer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Wake {
    Read,
    Write,
    Timer,
    Retry,
    Tick,
    /// A TLS handshake has ended (done, failed or timed out).
    Tls,
}

/// The event handlers nginx is to call for a link's connections, indexed by
/// `Role as usize`. The link's `token` is what they find in `c->data`.
pub struct Handlers {
    pub read: [ngx_event_handler_pt; 2],
    pub write: [ngx_event_handler_pt; 2],
    pub retry: [ngx_event_handler_pt; 2],
    /// Called when a TLS handshake ends; `c->data` is the token.
    pub tls: [ngx_connection_handler_pt; 2],
    /// The rooms layer's clock; its `data` is the token.
    pub tick: ngx_event_handler_pt,
}

/// What happened on the wire, for the rooms layer.
pub enum Event {
    /// A message published to a followed channel.
    Message { channel: Vec<u8>, payload: Vec<u8> },
    /// The channel is live: from now on every message on it arrives.
    Subscribed(Box<str>),
    /// Redis refused to subscribe the channel (e.g. an ACL); the link has
    /// logged why and forgotten the channel.
    SubscribeRefused(Box<str>),
    /// Redis refused a PUBLISH or a script run for `tag`, in these words
    /// (for the rooms layer to log, with whose message it was).
    PublishRefused { tag: Tag, error: String },
    /// The reply to a script `call`; `None` if the connection dropped
    /// before it came.
    Replied { call: Call, reply: Option<Value> },
    /// A message sent for `tag` was in flight when the connection dropped:
    /// it may or may not have been published.
    InDoubt(Tag),
    /// Delivery stopped on the link with this shard number: a connection
    /// is down or not yet following every channel.
    Outage(usize),
    /// Delivery resumed after an `Outage`.
    Recovered(usize),
    /// `TICK_MS` have passed.
    Tick,
    /// A cluster kept redirecting the channel (a loop, or to a node with
    /// no address): its members wait, and are told so.
    Stalled(Box<str>),
    /// What only the cluster router acts on.
    Cluster(ClusterEvent),
}

/// What a cluster node said about where things live, for the router.
pub enum ClusterEvent {
    /// A subscription was answered MOVED or ASK: the link has forgotten
    /// the channel, to be followed where Redis says.
    SubscribeRedirected {
        channel: Box<str>,
        to: Option<Redirect>,
    },
    /// A command was answered MOVED or ASK: it is to be sent again there.
    CommandRedirected(Resend),
    /// The node stopped serving a followed channel (its slot moved away):
    /// the link has forgotten it.
    Unfollowed(Box<str>),
    /// The answer to `CLUSTER SLOTS` (`None`: lost with its connection).
    Slots(Option<Value>),
}

/// A command a node redirected, with what its sender is owed.
pub struct Resend {
    pub redirect: Redirect,
    cmd: Rc<[u8]>,
    pending: Pending,
    hops: u8,
}

impl Resend {
    /// How many redirections it has followed.
    pub fn hops(&self) -> u8 {
        self.hops
    }
}

/// Where a channel's subscription stands on the subscriber connection. Only
/// one SUBSCRIBE or UNSUBSCRIBE per channel is in flight at a time.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wire {
    Subscribing,
    /// Subscribing again after a reconnect: the backlog waits for these.
    Resubscribing,
    Live,
    Unsubscribing,
}

struct Channel {
    /// The rooms layer wants it followed (it has local members).
    wanted: bool,
    /// `None`: not subscribed, nothing in flight.
    wire: Option<Wire>,
}

/// A command sent (or queued) that Redis owes a reply for, in order.
enum Pending {
    Subscribe(Box<str>),
    Unsubscribe(Box<str>),
    Ping,
    /// The bytes are kept for a cluster node's redirection, and so are the
    /// redirections followed so far.
    Publish(Tag, Rc<[u8]>, u8),
    Call(Call, Rc<[u8]>, u8),
    /// SCRIPT LOAD again, after Redis forgot the scripts.
    Load,
    /// Precedes a command sent on an ASK redirection.
    Asking,
    /// `CLUSTER SLOTS`.
    Slots,
}

/// The Lua scripts the module runs (see `history` and `presence`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Script {
    Append,
    Fetch,
    Join,
    Leave,
    Renew,
    Summary,
}

/// In `Script` order.
const SCRIPT_CODE: [&str; 6] = wschat_core::SCRIPTS;

/// What a command whose reply is wanted back was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Run(Script),
    Publish,
}

/// A command whose reply the caller wants back, with what it needs to know
/// which is which.
#[derive(Debug)]
pub struct Call {
    pub op: Op,
    pub tag: Tag,
    pub channel: Box<str>,
}

/// The scripts by hash, sent as EVALSHA once the command connection has
/// loaded them.
struct Scripts {
    code: Vec<String>,
    hashes: Vec<redis::Script>,
}

impl Scripts {
    /// On a Redis Cluster the scripts publish to shard channels, which
    /// live in the slot of the keys they touch.
    fn new(sharded: bool) -> Self {
        let code: Vec<String> = (SCRIPT_CODE.iter())
            .map(|code| match sharded {
                true => slots::sharded_script(code),
                false => (*code).to_owned(),
            })
            .collect();
        Scripts {
            hashes: code.iter().map(|c| redis::Script::new(c)).collect(),
            code,
        }
    }

    fn hash(&self, script: Script) -> &str {
        self.hashes[script as usize].get_hash()
    }

    fn load_commands(&self) -> Vec<Vec<u8>> {
        (self.code.iter())
            .map(|code| {
                redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(code)
                    .get_packed_command()
            })
            .collect()
    }
}

fn now() -> ngx_msec_t {
    // SAFETY: nginx's cached clock, read on its own thread.
    unsafe { ngx_current_msec }
}

/// Bookkeeping for one of the link's two connections.
struct Conn {
    peer: PeerConn,
    backoff: Backoff,
    /// Setup replies (AUTH, SELECT, SCRIPT LOAD) expected before anything
    /// else, and how many there were.
    setup_pending: usize,
    setup_total: usize,
    /// The AUTH / SELECT chunk put ahead of a backlog, so that a connection
    /// dropping before sending it does not leave it behind for the next one.
    setup_chunk: Option<Rc<[u8]>>,
    /// Replies owed for commands queued or sent (setup aside), in order.
    pending: VecDeque<Pending>,
    /// Since when Redis has owed a reply for something already sent and
    /// said nothing.
    waiting_since: Option<ngx_msec_t>,
    /// Whether the instance's numbers count it as up or down (neither
    /// before its first attempt ends).
    reported: Option<bool>,
    /// With a cluster's seeds to go through: the next one, and how many
    /// have failed in a row.
    next_seed: usize,
    failed_seeds: usize,
}

impl Conn {
    fn new(peer: PeerConn) -> Self {
        Conn {
            peer,
            backoff: Backoff::default(),
            setup_pending: 0,
            setup_total: 0,
            setup_chunk: None,
            pending: VecDeque::new(),
            waiting_since: None,
            reported: None,
            next_seed: 1,
            failed_seeds: 0,
        }
    }

    /// Moves the connection between the up and down gauges; coming up
    /// after being down is a reconnect.
    fn report(&mut self, up: bool) {
        if self.reported == Some(up) {
            return;
        }
        let gauge = |up| if up { Gauge::RedisUp } else { Gauge::RedisDown };
        if let Some(was) = self.reported {
            metrics::adjust(gauge(was), -1);
            if up {
                metrics::count(Counter::RedisReconnects, 1);
            }
        }
        metrics::adjust(gauge(up), 1);
        self.reported = Some(up);
    }

    /// Replies owed for commands that have left (queued ones owe nothing yet).
    fn in_flight(&self) -> usize {
        (self.pending.len() + self.setup_pending).saturating_sub(self.peer.queue.chunk_count())
    }

    /// Something arrived from Redis: the wait for replies starts over.
    fn heard(&mut self) {
        self.waiting_since = (self.in_flight() > 0).then(now);
    }

    fn queue_command(&mut self, cmd: Rc<[u8]>, pending: Pending) -> Result<(), BacklogFull> {
        self.peer.queue.push(cmd, || 0).map_err(|_| BacklogFull)?;
        self.pending.push_back(pending);
        self.peer.schedule_flush();
        Ok(())
    }

    /// Leaves the up and down gauges: closed on purpose.
    fn unreport(&mut self) {
        if let Some(was) = self.reported.take() {
            let gauge = if was {
                Gauge::RedisUp
            } else {
                Gauge::RedisDown
            };
            metrics::adjust(gauge, -1);
        }
    }

    /// Drops the AUTH / SELECT chunk if it is still queued, whole or in part.
    fn drop_setup(&mut self) {
        if let Some(setup) = self.setup_chunk.take() {
            if self.peer.queue.front_is(&setup) && !self.peer.queue.drop_partial_front() {
                self.peer.queue.remove_front_if(&setup);
            }
        }
    }
}

pub struct Link {
    endpoint: &'static Endpoint,
    log: *mut ngx_log_t,
    display: String,
    timeout: ngx_msec_t,
    /// What the event handlers find in `c->data`: the link's index.
    token: usize,
    handlers: &'static Handlers,
    started: bool,
    sub: Conn,
    cmd: Conn,
    /// An `Outage` has been reported and no `Recovered` since.
    outage: bool,
    /// Channels being subscribed again after a reconnect.
    resubscribing: usize,
    channels: HashMap<Box<str>, Channel>,
    /// Reused for every reply: a fresh parser allocates and clears a buffer.
    parser: redis::Parser,
    /// What happened since the rooms layer last looked.
    events: Vec<Event>,
    /// Loaded on the command connection when some location keeps history
    /// or presence.
    scripts: Option<Scripts>,
    /// Fires every `TICK_MS` for the rooms layer (presence summaries and
    /// leases); cancelable, so it never holds a worker that is exiting.
    tick: ngx_event_t,
    /// The backlog as last reported to the instance's numbers.
    reported_backlog: i64,
    /// For `rediss://`: how connections are secured.
    tls: Option<Tls>,
    /// nginx's resolver, for a host name looked up again on reconnects.
    resolver: Option<(ptr::NonNull<ngx_resolver_t>, ngx_msec_t)>,
    /// Its place among the links of a cluster (0 for a single Redis).
    shard: usize,
    /// A Redis Cluster node: shard channels (SSUBSCRIBE, SPUBLISH).
    sharded: bool,
    /// While set, a connection that fails moves on to the next of these
    /// addresses (a cluster's seeds, until the slot map is known).
    seeds: Vec<Box<[u8]>>,
    /// The subscriber connection was closed for having nothing to follow.
    sub_idle: bool,
    /// The node has answered as a cluster node on the current command
    /// connection (always, for a single Redis): until then nothing is sent
    /// to it beyond the connections' setup.
    verified: bool,
}

/// A `rediss://` endpoint's TLS settings, as its connections use them.
struct Tls {
    ssl: ptr::NonNull<ngx_ssl_t>,
    verify: bool,
    /// The name the certificate must be for.
    name: Box<[u8]>,
    /// Sent as SNI: the name, unless it is an address (RFC 6066 allows
    /// host names only).
    sni: Option<CString>,
}

impl Tls {
    fn new(endpoint: &Endpoint, main: &MainConf) -> Option<Tls> {
        if !endpoint.addr.tls {
            return None;
        }
        let name = main.tls.name_for(&endpoint.addr);
        Some(Tls {
            ssl: main.tls.ssl?,
            verify: main.tls.verify(),
            name: name.as_bytes().into(),
            sni: (name.parse::<std::net::IpAddr>().is_err())
                .then(|| CString::new(name).ok())
                .flatten(),
        })
    }
}

fn packed(args: &[&[u8]]) -> Rc<[u8]> {
    let mut cmd = redis::cmd(std::str::from_utf8(args[0]).expect("command names are ASCII"));
    for a in &args[1..] {
        cmd.arg(*a);
    }
    Rc::from(cmd.get_packed_command())
}

/// A Redis error as Redis wrote it (`NOPERM this user has no ...`).
pub fn error_text(err: &redis::ServerError) -> String {
    match err.details() {
        Some(details) => format!("{} {}", err.code(), details),
        None => err.code().to_owned(),
    }
}

/// The bulk string at the front of a reply's items, if that is what it is.
fn next_bulk(items: &mut std::vec::IntoIter<Value>) -> Option<Vec<u8>> {
    match items.next()? {
        Value::BulkString(b) => Some(b),
        _ => None,
    }
}

impl Link {
    /// A link to `endpoint`, or with `node`, to that node of its cluster.
    pub fn new(
        endpoint: &'static Endpoint,
        main: &MainConf,
        log: *const ngx_log_t,
        token: usize,
        handlers: &'static Handlers,
        (shard, node): (usize, Option<Box<[u8]>>),
    ) -> Box<Link> {
        let sockaddr = node.unwrap_or_else(|| endpoint.sockaddr.clone());
        // The subscriber queue holds at most one command per channel, so
        // only the command connection's backlog needs a bound.
        let sub = PeerConn::new(&sockaddr, "", log, usize::MAX);
        let cmd = PeerConn::new(&sockaddr, "", log, main.redis_backlog());
        let sharded = endpoint.is_cluster();
        // A cluster's nodes are named by address, as its slot map names them.
        let display = match sharded {
            true => cmd.address(),
            false => endpoint.addr.to_string(),
        };
        let (sub, cmd) = (sub.named(&display), cmd.named(&display));
        Box::new(Link {
            endpoint,
            log: log.cast_mut(),
            display,
            timeout: main.redis_timeout(),
            token,
            handlers,
            started: false,
            sub: Conn::new(sub),
            cmd: Conn::new(cmd),
            outage: false,
            resubscribing: 0,
            channels: HashMap::new(),
            parser: redis::Parser::new(),
            events: Vec::new(),
            scripts: main.uses_scripts.then(|| Scripts::new(sharded)),
            // SAFETY: an all-zero event is an idle, unarmed one; `start_tick`
            // fills in what nginx needs.
            tick: unsafe { core::mem::zeroed() },
            reported_backlog: 0,
            tls: Tls::new(endpoint, main),
            resolver: main.resolver.map(|r| (r, main.resolver_timeout)),
            shard,
            sharded,
            seeds: Vec::new(),
            sub_idle: false,
            verified: !sharded,
        })
    }

    /// Until `stop_rotating`, a failed connection moves on to the next of
    /// `seeds` (its own address being the first).
    pub fn rotate_seeds(&mut self, seeds: &[Box<[u8]>]) {
        self.seeds = seeds.to_vec();
    }

    pub fn stop_rotating(&mut self) {
        self.seeds.clear();
    }

    /// The address its connections go to, as a cluster's slot map names
    /// nodes (`127.0.0.1:7000`).
    pub fn address(&self) -> String {
        self.cmd.peer.address()
    }

    /// The node this link speaks for has moved (a replica took over its
    /// slots): the connections go to `sockaddr` from now on, at once.
    pub fn retarget(&mut self, sockaddr: Box<[u8]>) {
        self.set_address(sockaddr);
        for role in [Role::Sub, Role::Cmd] {
            let conn = self.conn(role);
            conn.backoff.reset();
            if conn.peer.state != State::Down {
                self.on_down(role, "the node was replaced");
            }
            let conn = self.conn(role);
            if conn.peer.retry.timer_set() != 0 {
                // SAFETY: the timer was armed by arm_retry on this event.
                unsafe { ngx::ffi::ngx_del_timer(&mut conn.peer.retry) };
            }
            if self.started && !(role == Role::Sub && self.sub_idle) {
                self.connect(role);
            }
        }
    }

    fn set_address(&mut self, sockaddr: Box<[u8]>) {
        self.sub.peer.set_sockaddr(sockaddr.clone());
        self.cmd.peer.set_sockaddr(sockaddr);
        if self.sharded {
            self.display = self.cmd.peer.address();
            self.sub.peer.rename(&self.display);
            self.cmd.peer.rename(&self.display);
        }
    }

    /// The node the link speaks to, as redirections and slot maps name it.
    pub fn node(&self) -> Node {
        let address = self.address();
        let (host, port) = address.rsplit_once(':').unwrap_or((&address, "0"));
        Node {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port: port.parse().unwrap_or(0),
        }
    }

    /// The channels it follows or is about to.
    pub fn wanted(&self) -> Vec<Box<str>> {
        (self.channels.iter())
            .filter(|(_, c)| c.wanted)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Whether it has been asked for anything yet.
    pub fn started(&self) -> bool {
        self.started
    }

    /// Takes what happened since the last call; `spare` (empty) keeps the
    /// allocation for next time.
    pub fn take_events(&mut self, spare: Vec<Event>) -> Vec<Event> {
        std::mem::replace(&mut self.events, spare)
    }

    /// The worker's log, for lines about what the link carries.
    /// The address as logs show it (password masked).
    pub fn display(&self) -> &str {
        &self.display
    }

    pub fn log(&self) -> *mut ngx_log_t {
        self.log
    }

    /// Whether delivery is interrupted (an `Outage` not yet `Recovered`).
    pub fn in_outage(&self) -> bool {
        self.outage
    }

    fn conn(&mut self, role: Role) -> &mut Conn {
        match role {
            Role::Sub => &mut self.sub,
            Role::Cmd => &mut self.cmd,
        }
    }

    fn name(role: Role) -> &'static str {
        match role {
            Role::Sub => "subscriber",
            Role::Cmd => "command",
        }
    }

    fn data(&self) -> *mut c_void {
        // The token is an index; c->data only carries it.
        self.token as *mut c_void
    }

    /// Connections open on first use, so workers that never see a chat
    /// client hold none.
    fn ensure_started(&mut self) {
        if !self.started {
            self.started = true;
            self.start_tick();
            self.connect(Role::Sub);
            self.connect(Role::Cmd);
        }
    }

    /// Before a reconnect to a host name with nginx's `resolver` set: the
    /// name's address now (a managed Redis moves on failover). False while
    /// the answer is awaited (the reconnect event comes again with it).
    fn lookup(&mut self, role: Role) -> bool {
        let (Some((resolver, timeout)), Target::Tcp { host, port }) =
            (self.resolver, &self.endpoint.addr.target)
        else {
            return true;
        };
        if self.sharded
            || host.parse::<std::net::IpAddr>().is_ok()
            || self.conn(role).reported.is_none()
        {
            return true;
        }
        let before = self.conn(role).peer.address();
        // SAFETY: nginx's resolver lives as long as the worker; the host is
        // in the configuration.
        let found = unsafe {
            (self.conn(role).peer).resolve(resolver.as_ptr(), host.as_bytes(), *port, timeout)
        };
        match found {
            Resolved::Pending => return false,
            Resolved::Found => {
                let now = self.conn(role).peer.address();
                if now != before {
                    ngx_log_error!(
                        NGX_LOG_NOTICE,
                        self.log,
                        "websocket_chat: Redis {} is now at {} (was {})",
                        self.display,
                        now,
                        before
                    );
                }
            }
            Resolved::Failed(why) => {
                ngx_log_error!(
                    NGX_LOG_WARN,
                    self.log,
                    "websocket_chat: could not resolve Redis {} ({}); trying {} again",
                    self.display,
                    why,
                    before
                );
            }
        }
        true
    }

    fn connect(&mut self, role: Role) {
        if !self.lookup(role) {
            return;
        }
        let (data, timeout) = (self.data(), self.timeout);
        let (read, write) = (
            self.handlers.read[role as usize],
            self.handlers.write[role as usize],
        );
        // SAFETY: a Link is boxed by the worker and never moves while its
        // connections exist; the handlers find it again by token.
        match unsafe { self.conn(role).peer.connect(data, read, write) } {
            State::Up => self.connected(role),
            State::Connecting | State::Handshaking => self.conn(role).peer.arm_timer(timeout),
            State::Down => self.on_down(role, "connect failed"),
        }
    }

    /// The socket is connected: up, once TLS (if any) is.
    fn connected(&mut self, role: Role) {
        let Some(tls) = &self.tls else {
            return self.on_up(role);
        };
        let (ssl, sni) = (tls.ssl, tls.sni.clone());
        let (done, timeout) = (self.handlers.tls[role as usize], self.timeout);
        // SAFETY: the context lives in the configuration's pool, which
        // outlives the worker's connections.
        match unsafe {
            self.conn(role)
                .peer
                .start_tls(ssl.as_ptr(), sni.as_deref(), done)
        } {
            Ok(State::Handshaking) => self.conn(role).peer.arm_timer(timeout),
            Ok(_) => self.tls_done(role),
            Err(e) => self.on_down(role, &e.to_string()),
        }
    }

    fn tls_done(&mut self, role: Role) {
        let Some(tls) = &self.tls else {
            return;
        };
        let (verify, name) = (tls.verify, tls.name.clone());
        match self.conn(role).peer.finish_tls(verify, &name) {
            Ok(()) => self.on_up(role),
            Err(e) => self.on_down(role, &e.to_string()),
        }
    }

    fn on_up(&mut self, role: Role) {
        self.conn(role).report(true);
        self.conn(role).failed_seeds = 0;
        ngx_log_error!(
            NGX_LOG_INFO,
            self.log,
            "websocket_chat: {} connection to Redis {} established",
            Self::name(role),
            self.display
        );
        let mut setup = self.endpoint.addr.setup_commands();
        let mut setup_replies = self.endpoint.addr.setup_reply_count();
        if let (Role::Cmd, Some(scripts)) = (role, &self.scripts) {
            for load in scripts.load_commands() {
                setup.extend(load);
                setup_replies += 1;
            }
        }
        if role == Role::Cmd && self.sharded {
            // Every connection to a cluster node starts with the slot map:
            // a node that is not one fails here, and a node that took over
            // says so at once.
            setup.extend_from_slice(&packed(&[b"CLUSTER", b"SLOTS"]));
            setup_replies += 1;
        }
        let timeout = self.timeout;
        let conn = self.conn(role);
        conn.setup_pending = setup_replies;
        conn.setup_total = setup_replies;
        conn.waiting_since = None;
        if !setup.is_empty() {
            let chunk: Rc<[u8]> = Rc::from(setup);
            conn.peer.queue.push_front(chunk.clone());
            conn.setup_chunk = Some(chunk);
        }
        conn.peer.arm_timer(timeout);
        if role == Role::Sub {
            self.resubscribing = 0;
            self.resubscribe();
        } else {
            self.check_recovered();
        }
        self.flush(role);
    }

    /// Subscribes every wanted channel not on the wire (all of them after a
    /// reconnect); a cluster node only once it has shown it is one.
    fn resubscribe(&mut self) {
        if self.verified {
            let wanted: Vec<Box<str>> = (self.channels.iter())
                .filter(|(_, c)| c.wanted && c.wire.is_none())
                .map(|(name, _)| name.clone())
                .collect();
            self.resubscribing += wanted.len();
            for channel in wanted {
                self.send_sub(&channel, Wire::Resubscribing);
            }
        }
        if self.resubscribing == 0 {
            self.on_resubscribed();
        }
    }

    fn on_down(&mut self, role: Role, why: &str) {
        let log = self.log;
        if role == Role::Cmd && self.sharded {
            self.verified = false;
        }
        let conn = self.conn(role);
        let was_up = conn.peer.state == State::Up;
        conn.report(false);
        conn.drop_setup();
        conn.peer.close();
        conn.setup_pending = 0;
        conn.waiting_since = None;
        match role {
            Role::Sub => {
                conn.peer.queue.clear();
                conn.pending.clear();
                self.channels.retain(|_, c| c.wanted);
                for c in self.channels.values_mut() {
                    c.wire = None;
                }
                self.resubscribing = 0;
            }
            Role::Cmd => {
                // A command cut in half cannot be resumed on a new connection;
                // commands sent whole but not answered may or may not have run.
                conn.peer.queue.drop_partial_front();
                let waiting = conn.peer.queue.chunk_count();
                let in_doubt = conn.pending.len().saturating_sub(waiting);
                let mut messages = 0;
                for lost in self.cmd.pending.drain(..in_doubt) {
                    match lost {
                        Pending::Call(call, ..) => {
                            self.events.push(Event::Replied { call, reply: None })
                        }
                        Pending::Publish(tag, ..) => {
                            messages += 1;
                            self.events.push(Event::InDoubt(tag));
                        }
                        Pending::Slots => {
                            (self.events).push(Event::Cluster(ClusterEvent::Slots(None)))
                        }
                        _ => {}
                    }
                }
                if messages > 0 {
                    ngx_log_error!(
                        NGX_LOG_WARN,
                        log,
                        "websocket_chat: {} message(s) in flight to Redis {} may be lost",
                        messages,
                        self.display
                    );
                }
            }
        }
        if !was_up && self.next_seed(role, why) {
            return;
        }
        let level = if was_up { NGX_LOG_ERR } else { NGX_LOG_WARN };
        let delay = self.conn(role).backoff.next_delay_ms(ids::random());
        ngx_log_error!(
            level,
            log,
            "websocket_chat: {} connection to Redis {} {}: {}; retrying in {} ms",
            Self::name(role),
            self.display,
            if was_up { "lost" } else { "failed" },
            why,
            delay
        );
        let (data, retry) = (self.data(), self.handlers.retry[role as usize]);
        self.conn(role).peer.arm_retry(data, retry, delay);
        self.set_outage();
    }

    /// A cluster's seed failed: the connection tries the next one at once,
    /// until each has failed once in a row; true if it did.
    fn next_seed(&mut self, role: Role, why: &str) -> bool {
        let n = self.seeds.len();
        if n < 2 {
            return false;
        }
        let index = self.conn(role).next_seed % n;
        let next = self.seeds[index].clone();
        let conn = self.conn(role);
        let failed = conn.peer.address();
        conn.next_seed += 1;
        conn.failed_seeds += 1;
        conn.peer.set_sockaddr(next);
        if conn.failed_seeds >= n {
            conn.failed_seeds = 0;
            return false;
        }
        let trying = conn.peer.address();
        if role == Role::Cmd {
            self.display = trying.clone();
        }
        ngx_log_error!(
            NGX_LOG_INFO,
            self.log,
            "websocket_chat: {} connection to Redis cluster seed {} failed: {}; trying seed {}",
            Self::name(role),
            failed,
            why,
            trying
        );
        self.connect(role);
        true
    }

    /// PUBLISHes wait while the subscriber is not following every channel,
    /// so that local members receive what their own room sends.
    fn may_publish(&self) -> bool {
        self.verified
            && (self.sub_idle
                || (self.sub.peer.state == State::Up
                    && self.sub.setup_pending == 0
                    && self.resubscribing == 0))
    }

    fn flush(&mut self, role: Role) {
        // While PUBLISHes wait, the command connection still sends its
        // AUTH/SELECT, so that it is ready (or its refusal is logged).
        let max_chunks = if role == Role::Cmd && !self.may_publish() {
            let setup_next = (self.cmd.setup_chunk.as_ref())
                .is_some_and(|setup| self.cmd.peer.queue.front_is(setup));
            usize::from(setup_next)
        } else {
            usize::MAX
        };
        if max_chunks == 0 {
            return;
        }
        let conn = self.conn(role);
        let before = conn.peer.queue.chunk_count();
        if conn.peer.flush(max_chunks).is_err() {
            self.on_down(role, "send failed");
            return;
        }
        if conn.peer.queue.chunk_count() < before && conn.waiting_since.is_none() {
            conn.waiting_since = Some(now());
        }
    }

    fn on_resubscribed(&mut self) {
        self.cmd.peer.schedule_flush();
        self.check_recovered();
    }

    fn set_outage(&mut self) {
        if !self.outage {
            self.outage = true;
            self.events.push(Event::Outage(self.shard));
        }
    }

    fn check_recovered(&mut self) {
        if self.outage && self.cmd.peer.state == State::Up && self.may_publish() {
            self.outage = false;
            ngx_log_error!(
                NGX_LOG_INFO,
                self.log,
                "websocket_chat: Redis {} is available again",
                self.display
            );
            self.events.push(Event::Recovered(self.shard));
        }
    }

    fn send_sub(&mut self, channel: &str, next: Wire) {
        let (verb, pending): (&[u8], _) = match (next, self.sharded) {
            (Wire::Unsubscribing, false) => (b"UNSUBSCRIBE", Pending::Unsubscribe(channel.into())),
            (Wire::Unsubscribing, true) => (b"SUNSUBSCRIBE", Pending::Unsubscribe(channel.into())),
            (_, false) => (b"SUBSCRIBE", Pending::Subscribe(channel.into())),
            (_, true) => (b"SSUBSCRIBE", Pending::Subscribe(channel.into())),
        };
        // The subscriber queue is unbounded (see `new`).
        let _ = self
            .sub
            .queue_command(packed(&[verb, channel.as_bytes()]), pending);
        let wanted = next != Wire::Unsubscribing;
        self.channels.insert(
            channel.into(),
            Channel {
                wanted,
                wire: Some(next),
            },
        );
    }

    /// Follows a channel; true if it is live already (an `Event::Subscribed`
    /// follows otherwise, or `SubscribeRefused`).
    pub fn subscribe(&mut self, channel: &str) -> bool {
        self.ensure_started();
        if std::mem::take(&mut self.sub_idle) {
            self.connect(Role::Sub);
        }
        let sub_up = self.sub.peer.state == State::Up;
        let entry = (self.channels.entry(channel.into())).or_insert(Channel {
            wanted: true,
            wire: None,
        });
        entry.wanted = true;
        match entry.wire {
            Some(Wire::Live) => true,
            // on_up subscribes every wanted channel.
            None if sub_up && self.verified => {
                self.send_sub(channel, Wire::Subscribing);
                false
            }
            // The reply to the command in flight decides (on_sub_reply).
            _ => false,
        }
    }

    /// Stops following a channel (its last local member left).
    pub fn unsubscribe(&mut self, channel: &str) {
        let sub_up = self.sub.peer.state == State::Up;
        let Some(entry) = self.channels.get_mut(channel) else {
            return;
        };
        entry.wanted = false;
        match entry.wire {
            None => {
                self.channels.remove(channel);
            }
            Some(Wire::Live) if sub_up => self.send_sub(channel, Wire::Unsubscribing),
            _ => {}
        }
    }

    /// Queues a PUBLISH of an event (already encoded as JSON) to a channel;
    /// `tag` comes back with `Event::PublishRefused` if Redis refuses it.
    /// With `call`, Redis's reply (or `None`, lost) comes back as
    /// `Event::Replied` instead.
    pub fn publish(
        &mut self,
        channel: &str,
        event: &str,
        tag: Tag,
        call: Option<Call>,
    ) -> Result<(), BacklogFull> {
        self.ensure_started();
        let verb: &[u8] = if self.sharded {
            b"SPUBLISH"
        } else {
            b"PUBLISH"
        };
        let cmd = packed(&[verb, channel.as_bytes(), event.as_bytes()]);
        let pending = match call {
            Some(call) => Pending::Call(call, cmd.clone(), 0),
            None => Pending::Publish(tag, cmd.clone(), 0),
        };
        self.cmd.queue_command(cmd, pending)
    }

    /// Asks the node for the cluster's slot map; the answer comes back as
    /// `ClusterEvent::Slots`.
    pub fn ask_slots(&mut self) -> Result<(), BacklogFull> {
        self.ensure_started();
        let cmd = packed(&[b"CLUSTER", b"SLOTS"]);
        self.cmd.queue_command(cmd, Pending::Slots)
    }

    /// Sends a command another node redirected here: after `ASKING` for an
    /// ASK, which lets this node serve a slot it is still importing.
    pub fn resend(&mut self, resend: Resend) -> Result<(), Resend> {
        self.ensure_started();
        if resend.redirect.ask {
            let asking = packed(&[b"ASKING"]);
            if self.cmd.queue_command(asking, Pending::Asking).is_err() {
                return Err(resend);
            }
        }
        let Resend {
            redirect,
            cmd,
            pending,
            hops,
        } = resend;
        let pending = match pending {
            Pending::Publish(tag, cmd, _) => Pending::Publish(tag, cmd, hops),
            Pending::Call(call, cmd, _) => Pending::Call(call, cmd, hops),
            other => other,
        };
        if self.cmd.peer.queue.push(cmd.clone(), || 0).is_err() {
            return Err(Resend {
                redirect,
                cmd,
                pending,
                hops,
            });
        }
        self.cmd.pending.push_back(pending);
        self.cmd.peer.schedule_flush();
        Ok(())
    }

    /// Gives a redirected command up (a redirection loop, or nowhere to
    /// send it): its sender is told, in `why`'s words.
    pub fn give_up(&mut self, resend: Resend, why: &str) {
        match resend.pending {
            Pending::Publish(tag, ..) => self.events.push(Event::PublishRefused {
                tag,
                error: why.to_owned(),
            }),
            Pending::Call(call, ..) => {
                let text = format!("-ERR {why}\r\n");
                let reply = self.parser.parse_value(text.as_bytes()).ok();
                self.events.push(Event::Replied { call, reply });
            }
            _ => {}
        }
    }

    /// Runs one of the module's scripts; with `call`, its reply comes back
    /// as `Event::Replied`, otherwise a refusal is `Event::PublishRefused`
    /// for `tag`.
    pub fn eval(
        &mut self,
        script: Script,
        keys: &[&str],
        args: &[&[u8]],
        tag: Tag,
        call: Option<Call>,
    ) -> Result<(), BacklogFull> {
        self.ensure_started();
        let Some(scripts) = &self.scripts else {
            return Err(BacklogFull);
        };
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(scripts.hash(script)).arg(keys.len()).arg(keys);
        for a in args {
            cmd.arg(*a);
        }
        let packed: Rc<[u8]> = Rc::from(cmd.get_packed_command());
        let pending = match call {
            Some(call) => Pending::Call(call, packed.clone(), 0),
            None => Pending::Publish(tag, packed.clone(), 0),
        };
        self.cmd.queue_command(packed, pending)
    }

    /// Appends a message to its room's history and publishes it, in one
    /// step in Redis: the stream entry id becomes the event's id. `head` is
    /// the event up to its id (see `envelope::message_head`); `keep` is the
    /// history's (entries, ms).
    pub fn append(
        &mut self,
        channel: &str,
        head: &str,
        keep: (usize, u64),
        tag: Tag,
        call: Option<Call>,
    ) -> Result<(), BacklogFull> {
        let (count, ms) = (keep.0.to_string(), keep.1.to_string());
        let args: [&[u8]; 4] = [
            count.as_bytes(),
            ms.as_bytes(),
            head.as_bytes(),
            envelope::ID_TAIL.as_bytes(),
        ];
        self.eval(Script::Append, &[channel], &args, tag, call)
    }

    /// Asks for a room's history and members as `req` says; the answer
    /// comes as `Event::Replied` with `tag`.
    pub fn fetch(&mut self, channel: &str, req: &Request, tag: Tag) -> Result<(), BacklogFull> {
        let since = req.since.map(|p| p.to_string()).unwrap_or_default();
        let (members, seq) = (presence::members_key(channel), presence::seq_key(channel));
        let call = Call {
            op: Op::Run(Script::Fetch),
            tag,
            channel: channel.into(),
        };
        metrics::count(Counter::HistoryFetches, 1);
        self.eval(
            Script::Fetch,
            &[channel, &members, &seq],
            &[
                since.as_bytes(),
                req.script_count().to_string().as_bytes(),
                req.members.to_string().as_bytes(),
            ],
            tag,
            Some(call),
        )
    }

    /// While `hold` (requests wait for Redis's answer) the clock keeps a
    /// worker that is shutting down alive, as any request in progress
    /// does; nginx's `worker_shutdown_timeout` still ends it.
    pub fn hold_worker(&mut self, hold: bool) {
        self.tick.set_cancelable(u32::from(!hold));
    }

    /// Starts the rooms layer's clock.
    fn start_tick(&mut self) {
        self.tick.data = self.data();
        self.tick.handler = self.handlers.tick;
        self.tick.log = self.log;
        self.tick.set_cancelable(1);
        // SAFETY: the event lives in the boxed Link, which stays in place
        // while it is armed; Drop removes it.
        unsafe { ngx::ffi::ngx_add_timer(&mut self.tick, TICK_MS) };
    }

    /// Carries out what nginx woke the link for.
    pub fn on_wake(&mut self, role: Role, wake: Wake) {
        match wake {
            Wake::Tick => {
                let backlog = self.cmd.peer.queue.bytes() as i64;
                metrics::adjust(Gauge::BacklogBytes, backlog - self.reported_backlog);
                self.reported_backlog = backlog;
                self.events.push(Event::Tick);
                // SAFETY: as in start_tick.
                unsafe { ngx::ffi::ngx_add_timer(&mut self.tick, TICK_MS) };
            }
            Wake::Retry => self.connect(role),
            Wake::Tls => {
                if self.conn(role).peer.state == State::Handshaking {
                    self.tls_done(role);
                }
            }
            Wake::Timer => self.on_timer(role),
            Wake::Write => self.on_writable(role),
            Wake::Read => {
                if self.conn(role).peer.state == State::Connecting {
                    self.on_writable(role);
                }
                if self.conn(role).peer.state == State::Up {
                    self.on_readable(role);
                }
            }
        }
    }

    fn log_refusal(&self, what: &str, err: &redis::ServerError) {
        ngx_log_error!(
            NGX_LOG_ERR,
            self.log,
            "websocket_chat: Redis {} refused {}: {}",
            self.display,
            what,
            error_text(err)
        );
    }

    fn on_sub_reply(&mut self, value: Value) -> Result<(), &'static str> {
        if self.sub.setup_pending > 0 {
            self.sub.setup_pending -= 1;
            return self.check_setup(Role::Sub, value);
        }
        let items = match value {
            Value::Array(items) => items,
            // PING outside subscribed mode.
            Value::SimpleString(_) => {
                self.sub.pending.pop_front();
                return Ok(());
            }
            Value::ServerError(err) => {
                match self.sub.pending.pop_front() {
                    Some(Pending::Subscribe(channel)) => match self.redirect_of(&err) {
                        Some(to) => self.on_subscribe_redirected(channel, Some(to)),
                        None if self.sharded && err.code() == "CLUSTERDOWN" => {
                            self.log_refusal(&format!("SSUBSCRIBE {channel}"), &err);
                            self.on_subscribe_redirected(channel, None)
                        }
                        None => self.on_refused(channel, &err),
                    },
                    Some(Pending::Unsubscribe(channel)) if self.redirect_of(&err).is_some() => {
                        // The slot left this node, and the channel with it.
                        self.on_unsubscribed(channel)
                    }
                    _ => self.log_refusal("a subscriber command", &err),
                }
                return Ok(());
            }
            _ => return Err("unexpected reply"),
        };
        let mut items = items.into_iter();
        let Some(kind) = next_bulk(&mut items) else {
            return Err("unexpected reply");
        };
        if kind == b"message" || kind == b"smessage" {
            let (Some(channel), Some(payload)) = (next_bulk(&mut items), next_bulk(&mut items))
            else {
                return Err("malformed message");
            };
            self.events.push(Event::Message { channel, payload });
            return Ok(());
        }
        if kind == b"sunsubscribe" && !self.answers_unsubscribe(items.as_slice()) {
            // Not ours: the node gave the channel's slot away.
            let Some(channel) = next_bulk(&mut items) else {
                return Err("malformed sunsubscribe");
            };
            let channel = String::from_utf8_lossy(&channel);
            self.on_unfollowed(&channel);
            return Ok(());
        }
        // subscribe, unsubscribe and pong answer a command of ours, in order.
        let answered = self.sub.pending.pop_front();
        match (kind.as_slice(), answered) {
            (b"subscribe" | b"ssubscribe", Some(Pending::Subscribe(channel))) => {
                self.on_subscribed(channel)
            }
            (b"unsubscribe" | b"sunsubscribe", Some(Pending::Unsubscribe(channel))) => {
                self.on_unsubscribed(channel)
            }
            (b"pong", Some(Pending::Ping)) => {}
            _ => return Err("reply out of order"),
        }
        Ok(())
    }

    /// Whether a `sunsubscribe` (its items after the kind) answers the
    /// SUNSUBSCRIBE at the front of what is owed.
    fn answers_unsubscribe(&self, items: &[Value]) -> bool {
        match (self.sub.pending.front(), items.first()) {
            (Some(Pending::Unsubscribe(ours)), Some(Value::BulkString(channel))) => {
                ours.as_bytes() == channel.as_slice()
            }
            _ => false,
        }
    }

    /// A MOVED or ASK error from a cluster node.
    fn redirect_of(&self, err: &redis::ServerError) -> Option<Redirect> {
        if !self.sharded {
            return None;
        }
        slots::parse_redirect(err.code(), err.details().unwrap_or(""), &self.node())
    }

    /// `to` is where the node sent the channel; `None`: nowhere (the
    /// cluster does not serve its slot right now).
    fn on_subscribe_redirected(&mut self, channel: Box<str>, to: Option<Redirect>) {
        let was = self.channels.remove(&channel);
        if was.as_ref().is_some_and(|c| c.wanted) {
            (self.events).push(Event::Cluster(ClusterEvent::SubscribeRedirected {
                channel,
                to,
            }));
        }
        self.end_resubscribe(was.and_then(|c| c.wire));
    }

    /// The node no longer serves a channel that was live here.
    fn on_unfollowed(&mut self, channel: &str) {
        let Some(entry) = self.channels.get(channel) else {
            return;
        };
        // A subscription in flight is settled by its own reply.
        if entry.wire != Some(Wire::Live) {
            return;
        }
        let wanted = entry.wanted;
        self.channels.remove(channel);
        if wanted {
            (self.events).push(Event::Cluster(ClusterEvent::Unfollowed(channel.into())));
        }
    }

    fn end_resubscribe(&mut self, wire: Option<Wire>) {
        if wire == Some(Wire::Resubscribing) {
            self.resubscribing = self.resubscribing.saturating_sub(1);
            if self.resubscribing == 0 {
                self.on_resubscribed();
            }
        }
    }

    fn on_subscribed(&mut self, channel: Box<str>) {
        let Some(entry) = self.channels.get_mut(&channel) else {
            return;
        };
        let was = entry.wire;
        if entry.wanted {
            entry.wire = Some(Wire::Live);
            self.events.push(Event::Subscribed(channel.clone()));
        } else {
            self.send_sub(&channel, Wire::Unsubscribing);
        }
        self.end_resubscribe(was);
    }

    fn on_unsubscribed(&mut self, channel: Box<str>) {
        match self.channels.get(&channel) {
            Some(c) if c.wanted => self.send_sub(&channel, Wire::Subscribing),
            _ => {
                self.channels.remove(&channel);
            }
        }
    }

    /// A cluster node that serves none of this worker's rooms any more
    /// (their slots moved) keeps no subscriber connection open for them;
    /// the next channel opens it again. Not an outage: nothing waits on it.
    /// Called once the replies read have been handled.
    fn idle_subscriber(&mut self) {
        let quiet = self.channels.is_empty()
            && self.sub.pending.is_empty()
            && self.sub.peer.queue.chunk_count() == 0;
        if !self.sharded || !quiet || self.sub.peer.state != State::Up {
            return;
        }
        self.sub.drop_setup();
        self.sub.peer.close();
        self.sub.unreport();
        self.sub_idle = true;
    }

    /// One channel refused: only its rooms are told; every other channel
    /// and the connection itself carry on.
    fn on_refused(&mut self, channel: Box<str>, err: &redis::ServerError) {
        self.log_refusal(&format!("SUBSCRIBE {channel}"), err);
        let was = self.channels.remove(&channel).and_then(|c| c.wire);
        self.events.push(Event::SubscribeRefused(channel));
        self.end_resubscribe(was);
    }

    fn on_cmd_reply(&mut self, value: Value) -> Result<(), &'static str> {
        if self.cmd.setup_pending > 0 {
            self.cmd.setup_pending -= 1;
            return self.check_setup(Role::Cmd, value);
        }
        let answered = self.cmd.pending.pop_front();
        if let Value::ServerError(err) = &value {
            if err.code() == "NOSCRIPT" && !matches!(answered, Some(Pending::Load)) {
                self.reload_scripts();
            }
            if let (
                Some(redirect),
                Some(Pending::Publish(_, cmd, hops) | Pending::Call(_, cmd, hops)),
            ) = (self.redirect_of(err), &answered)
            {
                let (cmd, hops) = (cmd.clone(), hops + 1);
                let pending = answered.expect("matched above");
                (self.events).push(Event::Cluster(ClusterEvent::CommandRedirected(Resend {
                    redirect,
                    cmd,
                    pending,
                    hops,
                })));
                return Ok(());
            }
        }
        match (answered, value) {
            (Some(Pending::Slots), reply) => {
                (self.events).push(Event::Cluster(ClusterEvent::Slots(Some(reply))))
            }
            (Some(Pending::Call(call, ..)), reply) => self.events.push(Event::Replied {
                call,
                reply: Some(reply),
            }),
            (Some(Pending::Publish(tag, ..)), Value::ServerError(err)) => {
                self.events.push(Event::PublishRefused {
                    tag,
                    error: error_text(&err),
                });
            }
            (_, Value::ServerError(err)) => self.log_refusal("a command", &err),
            _ => {}
        }
        Ok(())
    }

    /// Redis lost the scripts (SCRIPT FLUSH, a restart behind a proxy):
    /// load them again, once, ahead of whatever is still queued.
    fn reload_scripts(&mut self) {
        if self.cmd.pending.iter().any(|p| matches!(p, Pending::Load)) {
            return;
        }
        let Some(scripts) = &self.scripts else {
            return;
        };
        for load in scripts.load_commands() {
            // The queue is the backlog, but these must go.
            self.cmd.peer.queue.push_unbounded(Rc::from(load));
            self.cmd.pending.push_back(Pending::Load);
        }
        self.cmd.peer.schedule_flush();
    }

    /// Which setup command the reply at `index` answers: AUTH and SELECT
    /// as the address asks, then the script loads.
    fn setup_name(&self, role: Role, index: usize) -> &'static str {
        if self.is_slots_setup(role, index) {
            return "CLUSTER SLOTS (is it a cluster node?)";
        }
        let addr = &self.endpoint.addr;
        let auth_select = [
            addr.password.as_ref().map(|_| "AUTH"),
            addr.db.map(|_| "SELECT"),
        ];
        (auth_select.into_iter().flatten())
            .nth(index)
            .unwrap_or("SCRIPT LOAD")
    }

    /// Whether the setup reply at `index` is the cluster's slot map (the
    /// last of a cluster command connection's).
    fn is_slots_setup(&self, role: Role, index: usize) -> bool {
        self.sharded && role == Role::Cmd && index + 1 == self.cmd.setup_total
    }

    fn check_setup(&mut self, role: Role, value: Value) -> Result<(), &'static str> {
        let conn = self.conn(role);
        let index = conn.setup_total - conn.setup_pending - 1;
        if let Value::ServerError(err) = value {
            ngx_log_error!(
                NGX_LOG_ERR,
                self.log,
                "websocket_chat: Redis {} refused the {} connection's {}: {}",
                self.display,
                Self::name(role),
                self.setup_name(role, index),
                error_text(&err)
            );
            return Err("command refused");
        }
        if self.is_slots_setup(role, index) {
            (self.events).push(Event::Cluster(ClusterEvent::Slots(Some(value))));
            self.verified = true;
            if self.sub.peer.state == State::Up {
                self.resubscribe();
            }
            self.cmd.peer.schedule_flush();
        }
        if role == Role::Sub && self.sub.setup_pending == 0 && self.resubscribing == 0 {
            self.on_resubscribed();
        }
        Ok(())
    }

    fn on_readable(&mut self, role: Role) {
        let outcome = self.conn(role).peer.read(READ_BUDGET);
        let mut consumed = 0;
        let mut failure = None;
        loop {
            let conn = match role {
                Role::Sub => &self.sub,
                Role::Cmd => &self.cmd,
            };
            let buf = &conn.peer.inbuf[consumed..];
            let n = match resp::frame_len(buf, &REPLY_LIMITS) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(err) => {
                    failure = Some(format!("malformed reply: {err}"));
                    break;
                }
            };
            let value = match self.parser.parse_value(&buf[..n]) {
                Ok(v) => v,
                Err(err) => {
                    failure = Some(format!("malformed reply: {err}"));
                    break;
                }
            };
            consumed += n;
            let handled = match role {
                Role::Sub => self.on_sub_reply(value),
                Role::Cmd => self.on_cmd_reply(value),
            };
            if let Err(why) = handled {
                failure = Some(why.to_owned());
                break;
            }
        }
        if let Some(why) = failure {
            self.on_down(role, &why);
            return;
        }
        let conn = self.conn(role);
        conn.peer.inbuf.drain(..consumed);
        if consumed > 0 {
            conn.heard();
            // Only a connection that got past AUTH/SELECT and answered
            // counts as working: one refused at once must keep backing off.
            if conn.setup_pending == 0 {
                conn.backoff.reset();
            }
        }
        if matches!(outcome, ReadOutcome::Closed) {
            self.on_down(role, "connection closed");
        } else if role == Role::Sub {
            self.idle_subscriber();
        }
    }

    fn on_writable(&mut self, role: Role) {
        let conn = self.conn(role);
        if conn.peer.state == State::Connecting {
            if let Some(err) = conn.peer.connect_error() {
                self.on_down(role, &err.to_string());
                return;
            }
            conn.peer.state = State::Up;
            self.connected(role);
            return;
        }
        self.flush(role);
    }

    /// Connect timeout, reply timeout, and the subscriber's keepalive PING
    /// (a quiet subscriber connection is otherwise indistinguishable from a
    /// dead one).
    fn on_timer(&mut self, role: Role) {
        let timeout = self.timeout;
        let conn = self.conn(role);
        match conn.peer.state {
            State::Connecting => return self.on_down(role, "connect timed out"),
            State::Handshaking => return self.on_down(role, "TLS handshake timed out"),
            State::Down => return,
            State::Up => {}
        }
        if let Some(since) = conn.waiting_since {
            if conn.in_flight() > 0 && now().wrapping_sub(since) >= timeout {
                let why = format!("no reply within {timeout} ms");
                return self.on_down(role, &why);
            }
        }
        if role == Role::Sub && conn.in_flight() == 0 && conn.peer.queue.chunk_count() == 0 {
            let _ = conn.queue_command(packed(&[b"PING"]), Pending::Ping);
        }
        conn.peer.arm_timer(timeout);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if self.tick.timer_set() != 0 {
            // SAFETY: the timer was armed by start_tick on this very event.
            unsafe { ngx::ffi::ngx_del_timer(&mut self.tick) };
        }
    }
}
