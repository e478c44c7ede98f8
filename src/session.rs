//! One upgraded client connection: frames in (through tungstenite), events
//! out (through the send queue), and the close handshake. A session only
//! decides; its room membership belongs to `rooms`, and what it cannot do
//! itself (leave its room, end the connection) it returns as a [`Step`] for
//! the worker to carry out.

use core::ffi::c_void;
use core::ptr::{self, NonNull};
use std::rc::Rc;

use ngx::ffi::{
    ngx_connection_t, ngx_current_msec, ngx_handle_read_event, ngx_handle_write_event,
    ngx_http_close_connection, ngx_http_connection_t, ngx_http_free_request, ngx_http_request_t,
    ngx_msec_t, ngx_pfree, ngx_pool_cleanup_add, ngx_pool_cleanup_pt, NGX_LOG_ERR, NGX_LOG_INFO,
    NGX_LOG_WARN, NGX_OK,
};
use ngx::http::{HttpModuleLocationConf, NgxHttpCoreModule};
use ngx::ngx_log_error;
use redis::Value;
use tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};
use wschat_core::envelope::{self, Roster, Status};
use wschat_core::frame;
use wschat_core::frame_guard::Violation;
use wschat_core::history::{self, Position, Request};
use wschat_core::presence;
use wschat_core::rate::Bucket;
use wschat_core::recent::{Recent, Shape};
use wschat_core::slab::Key;

use crate::client_io::{self, ClientIo};
use crate::conf::{History, LocConf, LogAt};
use crate::metrics::{self, CloseKind, Counter, Gauge};
use crate::redis_link::BacklogFull;
use crate::request_ctx::{pool_str, RequestCtx};
use crate::send_queue::{FlushTo, Flushed, Limit};
use crate::transport::Transport;
use crate::{ids, time, zlib};

/// tungstenite's read buffer is allocated (and zero-filled on the first
/// read) per client and never shrinks: chat messages are small, so 512 bytes
/// keeps idle clients cheap (measured: 4k cost 3.6 KB more per idle
/// connection) at the price of more reads for the rare large message.
const READ_BUFFER: usize = 512;
/// Messages a client may send before its room's subscription is live.
const EARLY_LIMIT: usize = 32;
/// Rate-limited messages in a row after which a client counts as flooding.
const FLOOD_REJECTIONS: u8 = 10;

pub mod close {
    use crate::metrics::CloseKind;

    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL: u16 = 1002;
    pub const UNSUPPORTED: u16 = 1003;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;

    /// The reason of the 1008 for a client that does not take what it is
    /// sent: what waits for it is dropped, the close frame goes first.
    pub const SLOW_CONSUMER: &str = "slow consumer";
    pub const RATE_LIMITED: &str = "rate limit exceeded";
    pub const ROOM_REFUSED: &str = "room refused by Redis";
    pub const IDLE: &str = "idle timeout";
    pub const SHUTDOWN: &str = "server shutting down";

    /// What a close the server starts is counted as.
    pub fn kind_of(code: u16, reason: &str) -> CloseKind {
        match (code, reason) {
            (GOING_AWAY, IDLE) => CloseKind::IdleTimeout,
            (GOING_AWAY, _) => CloseKind::Shutdown,
            (POLICY, SLOW_CONSUMER) => CloseKind::SlowConsumer,
            (POLICY, RATE_LIMITED) => CloseKind::RateLimit,
            (POLICY, ROOM_REFUSED) => CloseKind::RoomRefused,
            (code, _) => CloseKind::of_client(code),
        }
    }
}

/// What the worker is to do after a session has looked at an event.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send what is queued.
    Flush,
    /// Close with this code: leave the room, send the close frame.
    Close(u16, &'static str),
    /// The connection is over.
    Finish,
}

/// The times a session takes from nginx's `http` core settings, read while
/// the request is at hand.
struct CoreTimes {
    /// How long a closing client gets to take its last frames.
    send_timeout: ngx_msec_t,
    lingering_time: ngx_msec_t,
    lingering_timeout: ngx_msec_t,
}

/// How `Session::admit` went.
pub enum Admission {
    /// The welcome waits for Redis's answer (`end_fetch`).
    Waiting,
    /// Welcomed now; what the member typed meanwhile, for the room to
    /// publish (`None` if it had been welcomed before).
    Welcomed(Option<Vec<String>>),
}

/// What the handshake established, for the session it becomes.
pub struct Upgrade {
    /// The 101 response, to go out first.
    pub head: Vec<u8>,
    pub room: String,
    pub user: String,
    /// The `since` the client sent, as it sent it.
    pub since: Option<String>,
    /// Bytes the client sent right behind the handshake, already in nginx's
    /// header buffer.
    pub preread: Vec<u8>,
    /// permessage-deflate was agreed, with this window for what we send.
    pub deflate: Option<u8>,
}

/// Where an event stands in its room: a message's history position, or a
/// presence event's count (neither for other events).
#[derive(Clone, Copy, Debug, Default)]
pub struct Mark {
    pub pos: Option<Position>,
    pub presence: Option<u64>,
    /// A chat message (what `messages_sent` counts).
    pub message: bool,
    /// The sending session's id, hashed (`sid_hash`), for a live message;
    /// 0 otherwise.
    pub origin: u64,
}

impl Mark {
    pub fn of(event: &[u8]) -> Mark {
        let message = event.starts_with(br#"{"type":"message""#);
        let origin = if message { origin_of(event) } else { 0 };
        match history::position_of(event) {
            Some(pos) => Mark {
                pos: Some(pos),
                presence: None,
                message,
                origin,
            },
            None => Mark {
                pos: None,
                presence: presence::seq_of(event),
                message,
                origin,
            },
        }
    }
}

/// FNV-1a of a session id: cheap to compare once per member.
pub fn sid_hash(sid: &[u8]) -> u64 {
    sid.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The hashed session id of a message event. Its first `"session":"` is
/// the field itself: inside a JSON string a quote is escaped.
fn origin_of(event: &[u8]) -> u64 {
    const KEY: &[u8] = br#""session":""#;
    let Some(at) = event.windows(KEY.len()).position(|w| w == KEY) else {
        return 0;
    };
    let rest = &event[at + KEY.len()..];
    let end = rest.iter().position(|&b| b == b'"').unwrap_or(rest.len());
    sid_hash(&rest[..end])
}

/// Live frames held back while missed messages are fetched, so that the
/// older ones go first; bounded like a send queue.
#[derive(Default)]
pub struct Held {
    pub frames: Vec<(Mark, Rc<[u8]>)>,
    bytes: usize,
}

impl Held {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Holds a frame; false once the limit refuses it.
    pub fn hold(&mut self, mark: Mark, frame: &Rc<[u8]>, limit: &Limit) -> bool {
        if !limit.admits(self.bytes, frame.len()) {
            return false;
        }
        self.bytes += frame.len();
        self.frames.push((mark, frame.clone()));
        true
    }
}

/// A welcome waiting for Redis.
struct Fetch {
    /// What the welcome needs.
    req: Request,
    /// Live events meanwhile.
    held: Held,
    /// Only the members were asked for: the history is the room's copy's.
    members_only: bool,
}

impl Fetch {
    /// What Redis is asked.
    fn asked(&self) -> Request {
        match self.members_only {
            true => Request {
                count: 0,
                ..self.req
            },
            false => self.req,
        }
    }
}

pub struct Session {
    key: Key,
    /// The session's id in events, unique across workers and hosts.
    sid: Box<str>,
    sid_hash: u64,
    /// The HTTP request, while the session holds it: until the session ends
    /// (`websocket_chat_access_log close`) or until the 101 is out (`upgrade`).
    request: Option<NonNull<ngx_http_request_t>>,
    c: *mut ngx_connection_t,
    conf: &'static LocConf,
    ws: WebSocket<ClientIo>,
    /// The index of the session's Redis endpoint.
    pub endpoint: usize,
    channel: Box<str>,
    room: Box<str>,
    user: Box<str>,
    /// Whether the session is in its room's member list.
    pub in_room: bool,
    /// Whether the session is in the room's member list in Redis.
    pub present: bool,
    /// `None` once welcomed: then everything the room publishes reaches
    /// this client; until then what it types waits here (message heads).
    early: Option<Vec<String>>,
    /// The last message the client says it saw (`since`), and whether what
    /// it sent could not be read as one.
    since: Option<Position>,
    bad_since: bool,
    /// The newest message this client has been sent: anything at or before
    /// it is a duplicate.
    cursor: Option<Position>,
    /// The presence counter its member list reflects: presence events up to
    /// it are in the list already; but the member's own `join` is sent as
    /// promised.
    presence_cursor: u64,
    pub own_join: Option<u64>,
    /// Set while this member's welcome waits for Redis.
    /// Boxed: idle sessions, the many, need only the pointer.
    fetching: Option<Box<Fetch>>,
    closing: bool,
    /// The client may still be sending (it caused the close, or sent more
    /// since): once the close frame is out, linger rather than close.
    linger_wanted: bool,
    /// Set once the close frame is out and the session lingers, as nginx's
    /// lingering close does: the client's bytes still in flight are read
    /// and dropped, so that closing the socket does not reset the
    /// connection and destroy the close frame. Lingering ends then,
    /// whatever the client does.
    lingering_until: Option<ngx_msec_t>,
    /// A close decided while fanning out, carried out on the next write event.
    pending_close: Option<(u16, &'static str)>,
    /// When the client last sent anything (nginx's millisecond clock).
    last_heard: ngx_msec_t,
    /// When room events last left for the client without waiting (see
    /// `deliver`).
    last_prompt: ngx_msec_t,
    /// A write put off by `deliver` waits for the rooms' flush clock.
    flush_waiting: bool,
    rate: Bucket,
    rejected_in_row: u8,
    times: CoreTimes,
    /// Chat messages the client sent, and those it was sent.
    messages_in: u32,
    messages_out: u32,
    /// How the session closed: the code and what it is counted as.
    closed: Option<(u16, CloseKind)>,
    /// permessage-deflate's window for what the client is sent.
    deflate: Option<u8>,
    /// Bytes of the 101 still in the queue: they are not WebSocket traffic,
    /// and no truncation may cut them.
    head_unsent: usize,
}

/// A connection to end once the worker's state is no longer borrowed:
/// closing it runs the pool cleanup that removes the session.
pub struct Finish {
    c: *mut ngx_connection_t,
    request: Option<NonNull<ngx_http_request_t>>,
}

fn now() -> ngx_msec_t {
    // SAFETY: nginx's clock, read on its own thread.
    unsafe { ngx_current_msec }
}

impl Session {
    /// A session for an upgraded request.
    ///
    /// `key` is the one the worker will keep it under.
    ///
    /// # Safety
    /// `r` must be a main request whose 101 header is `upgrade.head`.
    pub unsafe fn new(
        key: Key,
        r: *mut ngx_http_request_t,
        conf: &'static LocConf,
        upgrade: Upgrade,
    ) -> Session {
        let Upgrade {
            head,
            room,
            user,
            since,
            preread,
            deflate,
        } = upgrade;
        // SAFETY: r is live (caller); so is its connection.
        let c = unsafe { (*r).connection };
        // SAFETY: r is live (caller).
        let times = match unsafe { NgxHttpCoreModule::location_conf(&*r) } {
            Some(clcf) => CoreTimes {
                send_timeout: clcf.send_timeout,
                lingering_time: clcf.lingering_time,
                lingering_timeout: clcf.lingering_timeout,
            },
            None => CoreTimes {
                send_timeout: 60_000,
                lingering_time: 30_000,
                lingering_timeout: 5_000,
            },
        };
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            .write_buffer_size(0)
            .max_message_size(Some(conf.max_message()))
            .max_frame_size(Some(conf.max_message()));
        let mut io = ClientIo::new(c, conf.send_limit(), conf.max_message(), deflate.is_some());
        let head_unsent = head.len();
        io.queue.push_unbounded(head.into());
        let preread = io.admit_preread(preread);
        let ws = WebSocket::from_partially_read(io, preread, Role::Server, Some(config));
        let channel = conf.channel(&room);
        let since_pos = since.as_deref().and_then(Position::parse);
        let sid: Box<str> = ids::next_id().into();
        // SAFETY: r is live (caller).
        if let Some(ctx) = unsafe { RequestCtx::of(r) } {
            // SAFETY: as above; the copy lives in the request's pool.
            ctx.session_id = pool_str(unsafe { (*r).pool }, &sid);
        }
        Session {
            key,
            sid_hash: sid_hash(sid.as_bytes()),
            sid,
            request: NonNull::new(r),
            c,
            conf,
            ws,
            endpoint: conf.redis(),
            channel: channel.into(),
            room: room.into(),
            user: user.into(),
            in_room: false,
            present: false,
            early: Some(Vec::new()),
            since: since_pos,
            bad_since: since.is_some() && since_pos.is_none(),
            cursor: None,
            presence_cursor: 0,
            own_join: None,
            fetching: None,
            closing: false,
            linger_wanted: false,
            lingering_until: None,
            pending_close: None,
            last_heard: now(),
            last_prompt: 0,
            flush_waiting: false,
            rate: Bucket::default(),
            rejected_in_row: 0,
            times,
            messages_in: 0,
            messages_out: 0,
            closed: None,
            deflate,
            head_unsent,
        }
    }

    /// Hands the connection's events to the session; `cleanup` runs when
    /// nginx frees the connection.
    ///
    /// # Safety
    /// The session's request must be live, with its reference count raised
    /// for this session; the worker must keep the session under its key
    /// until `cleanup` runs.
    pub unsafe fn attach(
        &mut self,
        read: ngx::ffi::ngx_event_handler_pt,
        write: ngx::ffi::ngx_event_handler_pt,
        cleanup: ngx_pool_cleanup_pt,
    ) -> Result<(), ()> {
        let key = self.key;
        let r = self.request.ok_or(())?.as_ptr();
        let c = self.c;
        // SAFETY: r and c are live (caller); the connection pool outlives
        // every use of the session, and its cleanup tells the worker.
        unsafe {
            let cln = ngx_pool_cleanup_add((*c).pool, 0);
            if cln.is_null() {
                return Err(());
            }
            let ctx = RequestCtx::of(r).ok_or(())?;
            (*cln).handler = cleanup;
            (*cln).data = key_ptr(key);
            ctx.session = key.to_raw();
            (*(*c).read).handler = read;
            (*(*c).write).handler = write;
            // nginx's graceful shutdown visits idle connections with c->close
            // set: that is the hook for the 1001 close.
            (*c).set_idle(1);
            // The heartbeat timer must not keep a shutting-down worker alive.
            (*(*c).read).set_cancelable(1);
            ngx::ffi::ngx_add_timer((*c).read, self.conf.ping_interval());
        }
        Ok(())
    }

    pub fn key(&self) -> Key {
        self.key
    }

    pub fn channel(&self) -> &str {
        &self.channel
    }

    pub fn room(&self) -> &str {
        &self.room
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn prefix(&self) -> &str {
        self.conf.channel_prefix()
    }

    pub fn sid(&self) -> &str {
        &self.sid
    }

    pub fn history(&self) -> Option<History> {
        self.conf.history()
    }

    pub fn welcomed(&self) -> bool {
        self.early.is_none()
    }

    /// Whether the room hears of this member's joining and leaving.
    pub fn announces_presence(&self) -> bool {
        self.conf.presence()
    }

    /// Whether the access-log line is written at the upgrade, so that the
    /// request is freed on the first write event.
    pub fn frees_request_early(&self) -> bool {
        self.conf.access_log() == LogAt::Upgrade
    }

    /// Marks the session as live in its room and sends it `welcome`, with
    /// who is there when presence is on. Returns what it typed meanwhile
    /// (for the room to publish), or `None` if it was welcomed already.
    pub fn welcome(&mut self, roster: Option<Roster<'_>>) -> Option<Vec<String>> {
        let early = self.early.take()?;
        let event = envelope::welcome(&self.room, &self.user, &self.sid, roster, time::now_ms());
        self.send(frame::text_frame(event.as_bytes()));
        Some(early)
    }

    /// Queues a frame shared with the rest of the room, unless the client
    /// has had its message already (the seam between history and live) or
    /// must first get its history. `Some(wait)`: its write is put off for
    /// that long, and the caller is to call `flush_later_due` then.
    pub fn deliver(&mut self, mark: Mark, frame: &Rc<[u8]>) -> Option<ngx_msec_t> {
        if let Some(fetch) = &mut self.fetching {
            let held = &mut fetch.held;
            if !held.hold(mark, frame, &self.conf.send_limit()) {
                self.pending_close = Some((close::POLICY, close::SLOW_CONSUMER));
                self.wake_writer();
            }
            return None;
        }
        if mark.pos.is_some() {
            if mark.pos <= self.cursor {
                return None;
            }
            self.cursor = mark.pos;
        }
        if let Some(n) = mark.presence {
            if n <= self.presence_cursor && Some(n) != self.own_join {
                return None;
            }
            self.presence_cursor = self.presence_cursor.max(n);
        }
        if mark.message {
            self.messages_out = self.messages_out.wrapping_add(1);
            metrics::count(Counter::MessagesSent, 1);
        }
        if !self.enqueue(frame.clone()) {
            return None;
        }
        // A queue that makes a large write goes now, in the middle of the
        // fan-out: waiting would save little, and what waits counts against
        // the slow-consumer limit, which a client that keeps up must never
        // reach because one turn brought it many messages.
        if self.ws.get_ref().queue.is_large() && self.pending_close.is_none() {
            self.last_prompt = now();
            self.write_now();
            return None;
        }
        // A member sent room events a moment ago gets what follows in one
        // write a little later, rather than one write per event: the
        // kernel's cost is per write, and busy rooms send many small events.
        // Other writes (welcome, history, notices) do not count: the first
        // event after them is not held.
        // A sender's own message is its receipt: never held.
        let own = mark.origin != 0 && mark.origin == self.sid_hash;
        let since = now().wrapping_sub(self.last_prompt);
        match self.conf.flush_delay().checked_sub(since) {
            Some(wait) if wait > 0 && !own && self.pending_close.is_none() => {
                (!std::mem::replace(&mut self.flush_waiting, true)).then_some(wait)
            }
            _ => {
                self.last_prompt = now();
                self.wake_writer();
                None
            }
        }
    }

    /// Flushes outside the write event; a socket that is full already has
    /// its write event armed, and is not tried again before it fires.
    fn write_now(&mut self) {
        // SAFETY: c is live while the session is.
        if unsafe { (*(*self.c).write).ready() } == 0 {
            return;
        }
        if self.flush() == Step::Finish {
            // The write event finds the failure again and ends the session.
            self.wake_writer();
        }
    }

    /// The rooms' flush clock came for a member whose write was put off.
    pub fn flush_later_due(&mut self) {
        if std::mem::take(&mut self.flush_waiting) {
            self.last_prompt = now();
            self.wake_writer();
        }
    }

    /// Redis may have started over (an outage): its presence counter too.
    pub fn forget_presence_cursor(&mut self) {
        self.presence_cursor = 0;
    }

    /// Publishes a message event given up to its id: stored in the room's
    /// history (which assigns the id) or, with history off, with an id of
    /// our own.
    pub fn send_message(&mut self, link: &mut Transport, head: String) -> Result<(), BacklogFull> {
        match self.conf.history() {
            Some(h) => link.append(
                &self.channel,
                &head,
                (h.count, h.keep_ms),
                self.key.to_raw(),
                None,
            ),
            None => {
                let mut event = head;
                event.push_str(&ids::next_id());
                event.push_str(envelope::ID_TAIL);
                link.publish(&self.channel, &event, self.key.to_raw(), None)
            }
        }
    }

    /// What this member needs from Redis before its welcome: the room's
    /// recent messages (or what it missed since `since`) and who is there.
    fn admission(&self) -> Option<Request> {
        let history = self.conf.history();
        let members = if self.conf.presence() {
            presence::BUSY_ROOM
        } else {
            0
        };
        if history.is_none() && members == 0 {
            return None;
        }
        Some(Request {
            since: self.since,
            count: history.map_or(0, |h| h.count),
            keep_ms: history.map_or(0, |h| h.keep_ms),
            members,
        })
    }

    /// Admits the member to its live room: asks Redis for what the welcome
    /// needs (live messages wait meanwhile), but not for the history when
    /// the worker has a copy of it (`recent`; `None` while the room is not
    /// live): without presence the member is then welcomed at once, as it
    /// is when there is nothing to ask or it cannot be asked now.
    pub fn admit(&mut self, link: &mut Transport, mut recent: Option<&mut Recent>) -> Admission {
        let Some(req) = self.admission() else {
            return Admission::Welcomed(self.welcome(None));
        };
        let shape = Shape::of(&req);
        let budget = self.history_budget(&req);
        let mut members_only = false;
        if let (Some(shape), Some(recent)) = (shape, recent.as_deref_mut()) {
            if let Some(messages) = recent.serve(shape, budget, time::now_ms()) {
                if req.members == 0 {
                    metrics::count(Counter::HistoryCached, 1);
                    let early = self.welcome_once(None);
                    self.send_history(&req, messages, false);
                    return Admission::Welcomed(early);
                }
                members_only = true;
            }
        }
        let fetch = Fetch {
            req,
            held: Held::default(),
            members_only,
        };
        if link
            .fetch(&self.channel, &fetch.asked(), self.key.to_raw())
            .is_err()
        {
            let early = self.welcome(None);
            self.history_unavailable();
            return Admission::Welcomed(early);
        }
        if let (Some(shape), Some(recent), false) = (shape, recent, members_only) {
            recent.begin(shape, self.key.to_raw());
        }
        self.fetching = Some(Box::new(fetch));
        Admission::Waiting
    }

    /// The fetch `admit` asked for has come back (`None`: lost with its
    /// connection; it is asked for again). Sends `welcome`, `gap` if
    /// messages are missing, `history` (from the room's copy, `recent`, if
    /// only the members were asked for), then what was held; starts the
    /// copy if this fetch was to. Returns the newest position sent (for the
    /// room) and what the member typed meanwhile (for the room to publish).
    pub fn end_fetch(
        &mut self,
        reply: Option<&Value>,
        link: &mut Transport,
        recent: &mut Recent,
    ) -> (Option<Position>, Option<Vec<String>>) {
        let Some((req, asked, members_only)) =
            (self.fetching.as_ref()).map(|f| (f.req, f.asked(), f.members_only))
        else {
            return (None, None);
        };
        let Some(reply) = reply else {
            return self.fetch_again(&asked, link);
        };
        let now = time::now_ms();
        let fetched = match history::decode(reply, &asked, now) {
            Ok(mut fetched) => {
                if let Some((members, _)) = &mut fetched.roster {
                    self.list_self(members, req.members);
                    self.presence_cursor = fetched.presence_seq;
                }
                if !members_only && Shape::of(&req).is_some() {
                    recent.prime(self.key.to_raw(), &fetched.messages, fetched.ttl_ms, now);
                }
                Some(fetched)
            }
            Err(_) => {
                ngx_log_error!(
                    NGX_LOG_WARN,
                    self.log(),
                    "websocket_chat: history and members of \"{}\" unavailable: {:?}",
                    self.room,
                    reply
                );
                None
            }
        };
        let roster = (fetched.as_ref())
            .and_then(|f| f.roster.as_ref())
            .map(|(members, count)| Roster {
                members,
                count: *count,
            });
        if let (Some(shape), true, Some(_)) = (Shape::of(&req), members_only, &fetched) {
            let budget = self.history_budget(&req);
            let Some(messages) = recent.serve(shape, budget, now) else {
                // The copy went (an outage) while the members were asked
                // for: ask for the history too.
                if let Some(f) = &mut self.fetching {
                    f.members_only = false;
                }
                return self.fetch_again(&req, link);
            };
            metrics::count(Counter::HistoryCached, 1);
            let early = self.welcome_once(roster);
            let newest = self.send_history(&req, messages, false);
            self.release_held();
            return (newest, early);
        }
        let early = self.welcome_once(roster);
        let mut newest = None;
        match fetched {
            Some(_) if req.count == 0 => {}
            Some(fetched) => newest = self.send_history(&req, &fetched.messages, fetched.gap),
            None => self.history_unavailable(),
        }
        self.release_held();
        (newest, early)
    }

    /// Asks Redis (again) for what the welcome waits for; if it cannot be
    /// asked, welcomes the member without history.
    fn fetch_again(
        &mut self,
        asked: &Request,
        link: &mut Transport,
    ) -> (Option<Position>, Option<Vec<String>>) {
        if link.fetch(&self.channel, asked, self.key.to_raw()).is_ok() {
            return (None, None);
        }
        let early = self.welcome(None);
        self.history_unavailable();
        self.release_held();
        (None, early)
    }

    /// `welcome`, then `bad_since` if the client's `since` was not an id.
    fn welcome_once(&mut self, roster: Option<Roster<'_>>) -> Option<Vec<String>> {
        let early = self.welcome(roster);
        if self.bad_since {
            self.notify(
                Status::Error,
                "bad_since",
                "since is not a message id; sending recent history instead",
            );
        }
        early
    }

    /// Sends `history` (and `gap` before it if messages since the client's
    /// `since` are missing): as much of `messages` as the send buffer
    /// takes. Returns the newest position sent.
    fn send_history(
        &mut self,
        req: &Request,
        messages: &[(Position, String)],
        gap: bool,
    ) -> Option<Position> {
        let (kept, cut) = history::within_budget(messages, self.history_budget(req));
        if let (Some(since), true) = (req.since, gap || cut) {
            self.notify_gap(&since.to_string());
        }
        let event = envelope::history(
            &self.room,
            time::now_ms(),
            kept.iter().map(|(_, e)| e.as_str()),
        );
        self.send(frame::text_frame(event.as_bytes()));
        let newest = kept.last().map(|(p, _)| *p);
        self.cursor = self.cursor.max(newest);
        newest
    }

    /// Whether the welcome still waits for a fetch.
    pub fn fetching(&self) -> bool {
        self.fetching.is_some()
    }

    /// A busy room's list is a sample; the joiner is always in it.
    fn list_self(&self, members: &mut Vec<String>, cap: usize) {
        let me = presence::member_json(&self.user, &self.sid);
        if members.contains(&me) {
            return;
        }
        if members.len() >= cap {
            members.pop();
        }
        members.push(me);
    }

    /// Tells the client that not everything since `since` reaches it.
    pub fn notify_gap(&mut self, since: &str) {
        let event = self.gap_event(since);
        self.send(frame::text_frame(event.as_bytes()));
    }

    fn gap_event(&self, since: &str) -> String {
        envelope::gap(
            &self.room,
            since,
            "some messages since then are no longer in the history",
            time::now_ms(),
        )
    }

    /// How many bytes of message events the history may carry: the send
    /// buffer's `size`, but never more than the queue still takes past
    /// what is queued (the 101 and the welcome among it) and held, and the
    /// history's own frame and a `gap` before it. With `burst=0` a full
    /// history would otherwise close a member as a slow consumer as it joins.
    fn history_budget(&self, req: &Request) -> usize {
        let limit = self.conf.send_limit();
        let held = self.fetching.as_ref().map_or(0, |f| f.held.bytes());
        let wrapper = envelope::history(&self.room, time::now_ms(), std::iter::empty()).len();
        let gap = req.since.map_or(0, |since| {
            self.gap_event(&since.to_string()).len() + frame::MAX_SERVER_HEAD
        });
        let taken = self.ws.get_ref().queue.bytes() + held + wrapper + frame::MAX_SERVER_HEAD + gap;
        limit
            .soft
            .min((limit.soft + limit.burst).saturating_sub(taken))
    }

    fn release_held(&mut self) {
        if let Some(fetch) = self.fetching.take() {
            for (mark, frame) in fetch.held.frames {
                self.deliver(mark, &frame);
            }
        }
    }

    fn history_unavailable(&mut self) {
        self.notify(
            Status::Error,
            "history_unavailable",
            "the room's history could not be read; live messages follow",
        );
    }

    pub fn notify_backlog_full(&mut self) {
        ngx_log_error!(
            NGX_LOG_ERR,
            self.log(),
            "websocket_chat: message of \"{}\" in \"{}\" not sent: the queue to Redis is full",
            self.user,
            self.room
        );
        self.notify(
            Status::Error,
            "backlog_full",
            "message not sent: the server's queue to Redis is full",
        );
    }

    /// Sends this client alone an `error` or `notice` event.
    pub fn notify(&mut self, kind: Status, code: &str, message: &str) {
        let event = envelope::status(kind, &self.room, code, message, time::now_ms());
        self.send(frame::text_frame(event.as_bytes()));
    }

    /// Queues a frame and schedules one write for everything queued in this
    /// event-loop turn.
    fn send(&mut self, frame: Rc<[u8]>) {
        if self.enqueue(frame) {
            self.wake_writer();
        }
    }

    /// Queues a frame; false if the session is closing and takes none.
    fn enqueue(&mut self, frame: Rc<[u8]>) -> bool {
        if self.closing {
            return false;
        }
        let frame = match self.deflate {
            Some(bits) => zlib::for_deflate(&frame, bits),
            None => frame,
        };
        if self.ws.get_mut().queue.push(frame, time::now_ms).is_err() {
            self.pending_close = Some((close::POLICY, close::SLOW_CONSUMER));
        }
        true
    }

    /// Schedules the write handler for after the current handler returns.
    pub fn wake_writer(&self) {
        // SAFETY: c is live while the session is.
        unsafe {
            ngx::ffi::ngx_post_event(
                (*self.c).write,
                ptr::addr_of_mut!(ngx::ffi::ngx_posted_events),
            )
        };
    }

    /// Publishes a chat message event (or holds it until the welcome).
    fn publish(&mut self, link: &mut Transport, head: String) -> Result<(), BacklogFull> {
        if let Some(early) = &mut self.early {
            if early.len() < EARLY_LIMIT {
                early.push(head);
            } else {
                self.notify(
                    Status::Error,
                    "not_joined",
                    "message not sent: still joining the room",
                );
            }
            return Ok(());
        }
        self.send_message(link, head)
    }

    /// Publishes one chat message, unless the sender is over its rate.
    fn on_text(&mut self, link: &mut Transport, text: &str) -> Result<(), (u16, &'static str)> {
        self.messages_in = self.messages_in.wrapping_add(1);
        metrics::count(Counter::MessagesReceived, 1);
        if let Some(limit) = self.conf.rate() {
            if !self.rate.allow(limit, time::now_ms()) {
                self.rejected_in_row += 1;
                if self.rejected_in_row >= FLOOD_REJECTIONS {
                    return Err((close::POLICY, close::RATE_LIMITED));
                }
                self.notify(
                    Status::Error,
                    "rate_limited",
                    "message not sent: too many messages, slow down",
                );
                return Ok(());
            }
            self.rejected_in_row = 0;
        }
        let head = envelope::message_head(&self.room, &self.user, &self.sid, text, time::now_ms());
        if self.publish(link, head).is_err() {
            self.notify_backlog_full();
        }
        Ok(())
    }

    /// What a read event asks for: the heartbeat timer, nginx's shutdown,
    /// the lingering close, or frames.
    pub fn on_read(&mut self, link: &mut Transport, timedout: bool) -> Step {
        let c = self.c;
        // SAFETY: c is live while the session is.
        let (close, error) = unsafe { ((*c).close() != 0, (*c).error() != 0) };
        if close && error {
            // worker_shutdown_timeout has passed: no more waiting.
            return Step::Finish;
        }
        if let Some(until) = self.lingering_until {
            return self.linger_read(until, timedout);
        }
        if close {
            return Step::Close(close::GOING_AWAY, close::SHUTDOWN);
        }
        if timedout {
            return self.on_heartbeat();
        }
        self.last_heard = now();
        if self.closing {
            // Nothing more is read once the close frame is queued; the
            // client's own close or EOF just ends the connection sooner.
            return self.discard_input();
        }
        let step = self.read_frames(link);
        if matches!(step, Step::Close(..)) {
            self.linger_wanted = true;
        }
        // SAFETY: c is live.
        if step != Step::Finish && unsafe { ngx_handle_read_event((*c).read, 0) } != NGX_OK as isize
        {
            return Step::Finish;
        }
        step
    }

    /// What a write event asks for, before the flush.
    pub fn on_write(&mut self, timedout: bool) -> Step {
        if timedout {
            return Step::Finish;
        }
        match self.pending_close.take() {
            Some((code, reason)) => Step::Close(code, reason),
            None => Step::Flush,
        }
    }

    /// The heartbeat: pings a quiet client, closes one that stays silent.
    fn on_heartbeat(&mut self) -> Step {
        let silent = now().wrapping_sub(self.last_heard);
        let (ping, idle) = (self.conf.ping_interval(), self.conf.idle_timeout());
        if silent >= idle {
            return Step::Close(close::GOING_AWAY, close::IDLE);
        }
        let next = if silent >= ping {
            self.send(frame::ping_frame(b""));
            ping.min(idle - silent)
        } else {
            ping - silent
        };
        // SAFETY: c is live while the session is.
        unsafe { ngx::ffi::ngx_add_timer((*self.c).read, next) };
        Step::Flush
    }

    /// Reads and handles every complete frame the socket has.
    fn read_frames(&mut self, link: &mut Transport) -> Step {
        loop {
            match self.ws.read() {
                Ok(Message::Text(text)) => {
                    if let Err((code, reason)) = self.on_text(link, text.as_str()) {
                        return Step::Close(code, reason);
                    }
                }
                Ok(Message::Binary(_)) => {
                    return Step::Close(close::UNSUPPORTED, "binary messages are not supported")
                }
                Ok(Message::Close(frame)) => {
                    let code = frame.map_or(1005, |f| u16::from(f.code));
                    self.closed
                        .get_or_insert((code, CloseKind::of_client(code)));
                    // tungstenite has queued the echo of the client's close.
                    let _ = self.ws.flush();
                    self.closing = true;
                    return Step::Flush;
                }
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
                Err(WsError::Io(e)) => {
                    if e.kind() == std::io::ErrorKind::WouldBlock {
                        // Pongs owed to the client go out with the next flush.
                        let _ = self.ws.flush();
                        return Step::Flush;
                    }
                    return after_io_error(&e);
                }
                Err(WsError::Capacity(CapacityError::MessageTooLong { .. })) => {
                    return Step::Close(close::TOO_BIG, "message too big")
                }
                Err(WsError::Utf8(_)) => return Step::Close(close::INVALID_DATA, "invalid UTF-8"),
                // The peer went away without a close handshake.
                Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => {
                    return Step::Finish
                }
                Err(WsError::Protocol(_)) => return Step::Close(close::PROTOCOL, "protocol error"),
                Err(_) => return Step::Finish,
            }
        }
    }

    /// Starts the closing handshake from our side: the close frame goes out
    /// after anything already part-way out. Returns false if the session
    /// was closing already.
    pub fn begin_close(&mut self, code: u16, reason: &str) -> bool {
        if self.closing {
            return false;
        }
        let (_, kind) = *self
            .closed
            .get_or_insert((code, close::kind_of(code, reason)));
        // Like nginx's limit_req and limit_conn refusals, cutting a client
        // off for what it does is an error-level line; the rest is routine.
        let level = match kind {
            CloseKind::SlowConsumer | CloseKind::RateLimit => NGX_LOG_ERR,
            _ => NGX_LOG_INFO,
        };
        ngx_log_error!(
            level,
            self.log(),
            "websocket_chat: closing session of \"{}\" in \"{}\": {} {}",
            self.user,
            self.room,
            code,
            reason
        );
        let queue = &mut self.ws.get_mut().queue;
        if reason == close::SLOW_CONSUMER {
            queue.truncate_to(usize::from(self.head_unsent > 0));
        }
        queue.push_unbounded(frame::close_frame(code, reason));
        self.closing = true;
        true
    }

    /// Reads and discards what the client sends after our close frame;
    /// EOF ends the session.
    fn discard_input(&mut self) -> Step {
        let c = self.c;
        match self.ws.get_mut().discard_input() {
            Ok(dropped) => self.linger_wanted |= dropped > 0,
            Err(_) => return Step::Finish,
        }
        // SAFETY: c is live while the session is.
        if unsafe { ngx_handle_read_event((*c).read, 0) } != NGX_OK as isize {
            return Step::Finish;
        }
        Step::Flush
    }

    /// Our close frame is out. A client that is not sending is done with;
    /// one that may be (as nginx's `lingering_close on` decides for HTTP)
    /// is told so (FIN, on plain sockets) and what it still sends is read
    /// and dropped until it closes too, or nginx's `lingering_timeout` /
    /// `lingering_time` pass.
    fn after_close_frame(&mut self) -> Step {
        if self.discard_input() == Step::Finish || !self.linger_wanted {
            return Step::Finish;
        }
        let c = self.c;
        self.lingering_until = Some(now().wrapping_add(self.times.lingering_time));
        // SAFETY: c is live while the session is. The lingering timer must
        // hold a shutting-down worker: it is bounded, and ends the session.
        unsafe {
            if (*c).ssl.is_null() {
                ngx::ffi::shutdown((*c).fd, ngx::ffi::SHUT_WR as _);
            }
            if (*(*c).write).timer_set() != 0 {
                ngx::ffi::ngx_del_timer((*c).write);
            }
            (*(*c).read).set_cancelable(0);
            ngx::ffi::ngx_add_timer((*c).read, self.times.lingering_timeout);
        }
        Step::Flush
    }

    fn linger_read(&mut self, until: ngx_msec_t, timedout: bool) -> Step {
        let left = until.wrapping_sub(now()) as isize;
        if timedout || left <= 0 {
            return Step::Finish;
        }
        let step = self.discard_input();
        if step == Step::Flush {
            let wait = self.times.lingering_timeout.min(left as ngx_msec_t);
            // SAFETY: c is live while the session is.
            unsafe { ngx::ffi::ngx_add_timer((*self.c).read, wait) };
        }
        step
    }

    /// Sends what is queued; once a close has drained, lingers.
    pub fn flush(&mut self) -> Step {
        let c = self.c;
        if self.lingering_until.is_some() {
            return Step::Flush;
        }
        let queue = &mut self.ws.get_mut().queue;
        let before = queue.bytes();
        // SAFETY: c is live.
        let flushed = unsafe { queue.flush(c, usize::MAX) };
        let sent = before.saturating_sub(queue.bytes());
        let head = sent.min(self.head_unsent);
        self.head_unsent -= head;
        metrics::count(Counter::BytesSent, (sent - head) as u64);
        match flushed {
            Err(_) => Step::Finish,
            Ok(Flushed::All) if self.closing => self.after_close_frame(),
            Ok(Flushed::All) => {
                // SAFETY: c is live.
                unsafe {
                    if (*(*c).write).timer_set() != 0 {
                        ngx::ffi::ngx_del_timer((*c).write);
                    }
                }
                Step::Flush
            }
            Ok(Flushed::Partly) => self.arm_write(),
        }
    }

    /// Waits for the socket to take more; a closing session waits only so long.
    fn arm_write(&mut self) -> Step {
        let c = self.c;
        // SAFETY: c is live while the session is.
        unsafe {
            if ngx_handle_write_event((*c).write, 0) != NGX_OK as isize {
                return Step::Finish;
            }
            if self.closing {
                // A closing client gets nginx's `send_timeout` to take its last
                // frames, the close frame among them.
                ngx::ffi::ngx_add_timer((*c).write, self.times.send_timeout);
            }
        }
        Step::Flush
    }

    /// What ends the connection, for the worker to carry out.
    pub fn finish(&self) -> Finish {
        self.record_for_log(true);
        Finish {
            c: self.c,
            request: self.request,
        }
    }

    /// The close code, and what the session is counted as: none sent or
    /// received means the connection just ended (1006).
    fn close_status(&self) -> (u16, CloseKind) {
        self.closed.unwrap_or((1006, CloseKind::Abnormal))
    }

    /// Puts the numbers the variables report where the access-log line
    /// finds them (the request is about to go); the close code only once
    /// there is one, or the session has `ended`.
    fn record_for_log(&self, ended: bool) {
        let Some(r) = self.request else {
            return;
        };
        // SAFETY: a held request is live.
        if let Some(ctx) = unsafe { RequestCtx::of(r.as_ptr()) } {
            ctx.messages_in = self.messages_in.into();
            ctx.messages_out = self.messages_out.into();
            ctx.close_code = match self.closed {
                _ if ended => self.close_status().0,
                Some((code, _)) => code,
                None => 0,
            };
        }
    }

    /// Counts the session's end in the instance's numbers.
    pub fn count_end(&self) {
        metrics::count(Counter::Close(self.close_status().1), 1);
        metrics::adjust(Gauge::Connections, -1);
    }

    /// The connection's log: its lines carry the client's address.
    pub fn log(&self) -> *mut ngx::ffi::ngx_log_t {
        // SAFETY: c is live while the session is.
        unsafe { (*self.c).log }
    }
}

/// A key as the pointer nginx keeps for us (never null: see `Key`).
fn key_ptr(key: Key) -> *mut c_void {
    key.to_raw() as usize as *mut c_void
}

/// The key behind a pointer made by `key_ptr`.
pub fn key_of(data: *mut c_void) -> Option<Key> {
    Key::from_raw(data as usize as u64)
}

/// The session key behind a connection taken over by a session. nginx itself
/// reads `c->data` as the request while the request lives, so the key moves
/// there only once the request is freed.
///
/// # Safety
/// `c` must be a connection attached to a session; `holds_request` must say
/// whether its request is still held.
pub unsafe fn key_of_connection(c: *mut ngx_connection_t, holds_request: bool) -> Option<Key> {
    // SAFETY: while the request is held c->data is it and its ctx slot
    // holds the key; afterwards `release_request` put the key in c->data.
    unsafe {
        if holds_request {
            let r = (*c).data.cast::<ngx_http_request_t>();
            RequestCtx::of(r).and_then(|ctx| Key::from_raw(ctx.session))
        } else {
            key_of((*c).data)
        }
    }
}

/// Our own I/O errors carry a close code; any other means the connection is
/// gone.
fn after_io_error(e: &std::io::Error) -> Step {
    let inner = e.get_ref();
    if let Some(v) = inner.and_then(|e| e.downcast_ref::<Violation>()) {
        return Step::Close(v.close_code(), v.reason());
    }
    if inner.is_some_and(|e| e.is::<client_io::SlowConsumer>()) {
        return Step::Close(close::POLICY, close::SLOW_CONSUMER);
    }
    Step::Finish
}

impl Session {
    /// Frees the HTTP request once the 101 has left: nginx writes the
    /// access-log line now, and the request's pool and header buffers (8 KB or
    /// more per connection) go back while the session goes on.
    ///
    /// `read` and `write` are the handlers that find the session through
    /// `c->data` from then on.
    ///
    /// # Safety
    /// Called from an event handler, never inside nginx's processing of the
    /// request.
    pub unsafe fn release_request(
        &mut self,
        read: ngx::ffi::ngx_event_handler_pt,
        write: ngx::ffi::ngx_event_handler_pt,
    ) {
        let Some(r) = self.request.map(NonNull::as_ptr) else {
            return;
        };
        let c = self.c;
        // SAFETY: a held request is live, and so is its connection.
        unsafe {
            if self.head_unsent != 0
                || !(*r).out.is_null()
                || (*c).buffered() != 0
                || (*r).count() != 1
                || (*r).blocked() != 0
                || others_hold(r)
            {
                return;
            }
            self.record_for_log(false);
            let hc = (*r).http_connection;
            (*r).set_count(0);
            self.request = None;
            ngx_http_free_request(r, 0);
            // Set by nginx for a closing connection; this one stays open, and
            // its error-log lines should not say "while closing request".
            (*c).set_destroyed(0);
            (*(*c).log).action = ptr::null_mut();
            (*c).data = key_ptr(self.key);
            (*(*c).read).handler = read;
            (*(*c).write).handler = write;
            free_header_buffers(c, hc);
        }
    }
}

/// Whether another module has tied something to the request's end:
/// `limit_conn` frees its slot and `realip` restores the client address
/// when the request goes, so such a request is kept until the session
/// ends, for them to keep working.
///
/// # Safety
/// `r` must be a live main request.
unsafe fn others_hold(r: *mut ngx_http_request_t) -> bool {
    // SAFETY: r is live (caller); both lists are nginx's own.
    unsafe {
        if !(*(*r).pool).cleanup.is_null() {
            return true;
        }
        let mut cln = (*r).cleanup;
        while !cln.is_null() {
            if (*cln).handler.is_some() {
                return true;
            }
            cln = (*cln).next;
        }
        false
    }
}

/// Returns the request's header buffers to the system, as nginx does for an
/// idle keepalive connection; the bytes past the headers were taken in
/// `start`.
///
/// # Safety
/// `c` must be the connection of the freed request `hc` belonged to.
unsafe fn free_header_buffers(c: *mut ngx_connection_t, hc: *mut ngx_http_connection_t) {
    // SAFETY: the buffers were allocated from c->pool; ngx_pfree frees only
    // those allocated outside its blocks, and nothing reads them any more.
    unsafe {
        let b = (*c).buffer;
        if !b.is_null() && ngx_pfree((*c).pool, (*b).start.cast()) == NGX_OK as isize {
            (*c).buffer = ptr::null_mut();
        }
        for chain in [&mut (*hc).free, &mut (*hc).busy] {
            let mut cl = *chain;
            while !cl.is_null() {
                ngx_pfree((*c).pool, (*(*cl).buf).start.cast());
                cl = (*cl).next;
            }
            *chain = ptr::null_mut();
        }
        (*hc).nbusy = 0;
    }
}

impl Finish {
    /// Ends the connection: nginx writes the access-log line if the request
    /// is still held and frees it, then closes the connection (whose pool
    /// cleanup removes the session).
    ///
    /// # Safety
    /// Called with the worker's state not borrowed, for a live connection.
    pub unsafe fn run(self) {
        // SAFETY: the connection is live until it is closed, the last thing
        // done here. With a request, this is ngx_http_close_request for an
        // HTTP/1.x request, spelled out because older nginx (1.22) does not
        // export it.
        unsafe {
            if let Some(r) = self.request.map(NonNull::as_ptr) {
                let r = (*r).main;
                let count = (*r).count();
                (*r).set_count(count.saturating_sub(1));
                if count > 1 || (*r).blocked() != 0 {
                    return;
                }
                ngx_http_free_request(r, 0);
            }
            ngx_http_close_connection(self.c);
        }
    }
}
