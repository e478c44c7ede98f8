//! One worker's bridge to one Redis server: a subscriber connection that
//! follows the rooms with local members, and a command connection that
//! carries pipelined PUBLISHes. Messages come back through the subscription
//! and are handed, as one shared frame, to every local member.
//!
//! When Redis goes away the sessions stay open: members are told, PUBLISHes
//! wait in a bounded backlog, and both connections come back with capped
//! exponential backoff. The backlog is held until every room is subscribed
//! again, so that members see what was sent during the outage.

use core::ffi::c_void;
use core::ptr::NonNull;
use std::collections::HashMap;
use std::rc::Rc;

use ngx::ffi::{
    ngx_connection_t, ngx_current_msec, ngx_event_t, ngx_log_t, ngx_msec_t, NGX_LOG_ERR,
    NGX_LOG_INFO, NGX_LOG_WARN,
};
use ngx::ngx_log_error;
use redis::Value;
use wschat_core::backoff::Backoff;
use wschat_core::envelope::{self, Status};
use wschat_core::frame;
use wschat_core::resp::{self, Limits};
use wschat_core::room::Registry;

use crate::conf::{Endpoint, MainConf};
use crate::peer::{PeerConn, ReadOutcome, State};
use crate::session::Session;
use crate::{time, worker};

/// Room `r` travels on channel `wschat:r`.
const CHANNEL_PREFIX: &str = "wschat:";

/// What the link accepts from Redis: nothing larger than a chat message can
/// legitimately arrive, so anything much larger is a broken or hostile server.
const REPLY_LIMITS: Limits = Limits {
    max_bulk: 4 << 20,
    max_elements: 1024,
    max_depth: 4,
};

#[derive(Debug)]
pub struct BacklogFull;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Sub,
    Cmd,
}

/// Where a room's subscription stands on the subscriber connection. Only one
/// SUBSCRIBE or UNSUBSCRIBE per room is in flight at a time, so every reply
/// names the command it answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Channel {
    Subscribing,
    /// Subscribing again after a reconnect: the backlog waits for these.
    Resubscribing,
    Live,
    Unsubscribing,
}

/// What a reply asks of the reader.
enum Next {
    Continue,
    Reset,
}

pub type Member = NonNull<Session>;

fn now() -> ngx_msec_t {
    // SAFETY: nginx's cached clock, read on its own thread.
    unsafe { ngx_current_msec }
}

/// Bookkeeping for one of the link's two connections.
struct Conn {
    peer: PeerConn,
    backoff: Backoff,
    /// AUTH / SELECT replies expected before anything else.
    setup_pending: usize,
    /// The AUTH / SELECT chunk put ahead of a backlog, so that a connection
    /// dropping before sending it does not leave it behind for the next one.
    setup_chunk: Option<Rc<[u8]>>,
    /// Replies owed for commands queued or sent (setup aside).
    owed: usize,
    /// Since when Redis has owed a reply for something already sent and
    /// said nothing.
    waiting_since: Option<ngx_msec_t>,
}

impl Conn {
    fn new(peer: PeerConn) -> Self {
        Conn {
            peer,
            backoff: Backoff::default(),
            setup_pending: 0,
            setup_chunk: None,
            owed: 0,
            waiting_since: None,
        }
    }

    /// Replies owed for commands that have left (queued ones owe nothing yet).
    fn in_flight(&self) -> usize {
        (self.owed + self.setup_pending).saturating_sub(self.peer.queue.chunk_count())
    }

    /// Something arrived from Redis: the wait for replies starts over.
    fn heard(&mut self) {
        self.waiting_since = (self.in_flight() > 0).then(now);
    }

    fn queue_command(&mut self, cmd: Rc<[u8]>) -> Result<(), BacklogFull> {
        self.peer.queue.push(cmd).map_err(|_| BacklogFull)?;
        self.owed += 1;
        self.peer.schedule_flush();
        Ok(())
    }
}

pub struct Link {
    endpoint: &'static Endpoint,
    log: *mut ngx_log_t,
    display: String,
    timeout: ngx_msec_t,
    started: bool,
    sub: Conn,
    cmd: Conn,
    /// Members have been told Redis is unavailable and not yet that it is back.
    outage: bool,
    /// Rooms being subscribed again after a reconnect.
    resubscribing: usize,
    rooms: Registry<Member>,
    channels: HashMap<Box<str>, Channel>,
    /// Reused for every reply: a fresh parser allocates and clears a buffer.
    parser: redis::Parser,
}

fn channel_of(room: &str) -> String {
    let mut ch = String::with_capacity(CHANNEL_PREFIX.len() + room.len());
    ch.push_str(CHANNEL_PREFIX);
    ch.push_str(room);
    ch
}

fn packed(args: &[&[u8]]) -> Rc<[u8]> {
    let mut cmd = redis::cmd(std::str::from_utf8(args[0]).expect("command names are ASCII"));
    for a in &args[1..] {
        cmd.arg(*a);
    }
    Rc::from(cmd.get_packed_command())
}

impl Link {
    pub fn new(endpoint: &'static Endpoint, main: &MainConf, log: *const ngx_log_t) -> Box<Link> {
        let display = endpoint.addr.to_string();
        // The subscriber queue holds at most one command per room with local
        // members, so only the command connection's backlog needs a bound.
        let sub = PeerConn::new(&endpoint.sockaddr, &display, log, usize::MAX);
        let cmd = PeerConn::new(&endpoint.sockaddr, &display, log, main.redis_backlog());
        Box::new(Link {
            endpoint,
            log: log.cast_mut(),
            display,
            timeout: main.redis_timeout(),
            started: false,
            sub: Conn::new(sub),
            cmd: Conn::new(cmd),
            outage: false,
            resubscribing: 0,
            rooms: Registry::new(),
            channels: HashMap::new(),
            parser: redis::Parser::new(),
        })
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

    /// Connections open on first use, so workers that never see a chat
    /// client hold none.
    fn ensure_started(&mut self) {
        if !self.started {
            self.started = true;
            self.connect(Role::Sub);
            self.connect(Role::Cmd);
        }
    }

    fn connect(&mut self, role: Role) {
        let data = (self as *mut Link).cast::<c_void>();
        type Handler = unsafe extern "C" fn(*mut ngx_event_t);
        let (read, write): (Handler, Handler) = match role {
            Role::Sub => (on_read::<true>, on_write::<true>),
            Role::Cmd => (on_read::<false>, on_write::<false>),
        };
        let timeout = self.timeout;
        // SAFETY: a Link is boxed by the worker and never moves; handlers
        // find it again through c->data.
        match unsafe { self.conn(role).peer.connect(data, Some(read), Some(write)) } {
            State::Up => self.on_up(role),
            State::Connecting => self.conn(role).peer.arm_timer(timeout),
            State::Down => self.on_down(role, "connect failed"),
        }
    }

    fn on_up(&mut self, role: Role) {
        ngx_log_error!(
            NGX_LOG_INFO,
            self.log,
            "websocket_chat: {} connection to Redis {} established",
            Self::name(role),
            self.display
        );
        let setup = self.endpoint.addr.setup_commands();
        let setup_replies = self.endpoint.addr.setup_reply_count();
        let timeout = self.timeout;
        let conn = self.conn(role);
        conn.setup_pending = setup_replies;
        conn.waiting_since = None;
        if !setup.is_empty() {
            let chunk: Rc<[u8]> = Rc::from(setup);
            conn.peer.queue.push_front(chunk.clone());
            conn.setup_chunk = Some(chunk);
        }
        conn.peer.arm_timer(timeout);
        if role == Role::Sub {
            self.channels.clear();
            let rooms: Vec<Box<str>> = self.rooms.rooms().map(Box::from).collect();
            self.resubscribing = rooms.len();
            for room in rooms {
                self.send_sub(&room, Channel::Resubscribing);
            }
            if self.resubscribing == 0 {
                self.on_resubscribed();
            }
        } else {
            self.check_recovered();
        }
        self.flush(role);
    }

    fn on_down(&mut self, role: Role, why: &str) {
        let log = self.log;
        let conn = self.conn(role);
        let was_up = conn.peer.state == State::Up;
        conn.peer.close();
        if let Some(setup) = conn.setup_chunk.take() {
            conn.peer.queue.remove_front_if(&setup);
        }
        conn.setup_pending = 0;
        conn.waiting_since = None;
        match role {
            Role::Sub => {
                conn.peer.queue.clear();
                conn.owed = 0;
                self.channels.clear();
                self.resubscribing = 0;
            }
            Role::Cmd => {
                // A command cut in half cannot be resumed on a new connection;
                // commands sent whole but not answered may or may not have run.
                let partial = conn.peer.queue.drop_partial_front();
                let waiting = conn.peer.queue.chunk_count();
                let in_doubt = conn.owed.saturating_sub(waiting) + usize::from(partial);
                conn.owed = waiting;
                if in_doubt > 0 {
                    ngx_log_error!(
                        NGX_LOG_WARN,
                        log,
                        "websocket_chat: {} message(s) in flight to Redis {} may be lost",
                        in_doubt,
                        self.display
                    );
                }
            }
        }
        let level = if was_up { NGX_LOG_ERR } else { NGX_LOG_WARN };
        let delay = self.conn(role).backoff.next_delay_ms(worker::random());
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
        let data = (self as *mut Link).cast::<c_void>();
        let handler: unsafe extern "C" fn(*mut ngx_event_t) = match role {
            Role::Sub => on_retry::<true>,
            Role::Cmd => on_retry::<false>,
        };
        self.conn(role).peer.arm_retry(data, Some(handler), delay);
        self.set_outage();
    }

    /// PUBLISHes wait while the subscriber is not following every room, so
    /// that local members receive what their own room sends.
    fn may_publish(&self) -> bool {
        self.sub.peer.state == State::Up && self.sub.setup_pending == 0 && self.resubscribing == 0
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
            self.notify_all(
                Status::Error,
                "redis_unavailable",
                "chat delivery is interrupted; messages you send are kept and delivered when it is back",
            );
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
            self.notify_all(Status::Notice, "redis_available", "chat delivery resumed");
        }
    }

    fn notify_all(&mut self, kind: Status, code: &str, message: &str) {
        for room in self.rooms.rooms() {
            for &m in self.rooms.members(room) {
                // SAFETY: members are live sessions: each removes itself from
                // the registry before it is freed.
                unsafe { (*m.as_ptr()).notify(kind, code, message) };
            }
        }
    }

    fn send_sub(&mut self, room: &str, next: Channel) {
        let verb: &[u8] = match next {
            Channel::Unsubscribing => b"UNSUBSCRIBE",
            _ => b"SUBSCRIBE",
        };
        let channel = channel_of(room);
        // The subscriber queue is unbounded (see `new`).
        let _ = self.sub.queue_command(packed(&[verb, channel.as_bytes()]));
        self.channels.insert(room.into(), next);
    }

    /// Adds a session to its room. The session is welcomed once the room's
    /// subscription is live (at once if it already is).
    pub fn join(&mut self, member: Member, room: &str) {
        self.ensure_started();
        self.rooms.join(room, member);
        if self.outage {
            // SAFETY: the caller passes a live session.
            unsafe {
                (*member.as_ptr()).notify(
                    Status::Error,
                    "redis_unavailable",
                    "chat delivery is interrupted; you will join when it is back",
                )
            };
        }
        if self.sub.peer.state != State::Up {
            // on_up subscribes every room with members.
            return;
        }
        match self.channels.get(room) {
            None => self.send_sub(room, Channel::Subscribing),
            Some(Channel::Live) => self.welcome(room, &[member]),
            // The reply to the command in flight decides (on_sub_reply).
            Some(_) => {}
        }
    }

    /// Removes a session from its room; false if it was not in it.
    pub fn leave(&mut self, member: Member, room: &str) -> bool {
        if !self.rooms.members(room).contains(&member) {
            return false;
        }
        let emptied = self.rooms.leave(room, member);
        if emptied
            && self.sub.peer.state == State::Up
            && self.channels.get(room) == Some(&Channel::Live)
        {
            self.send_sub(room, Channel::Unsubscribing);
        }
        true
    }

    /// Queues a PUBLISH of an event (already encoded as JSON) to a room.
    pub fn publish(&mut self, room: &str, event: &str) -> Result<(), BacklogFull> {
        self.ensure_started();
        let channel = channel_of(room);
        self.cmd
            .queue_command(packed(&[b"PUBLISH", channel.as_bytes(), event.as_bytes()]))
    }

    /// Sends `welcome` to members whose room just went live, and tells the
    /// room they joined.
    fn welcome(&mut self, room: &str, members: &[Member]) {
        for &m in members {
            // SAFETY: members are live sessions (see notify_all).
            let session = unsafe { &mut *m.as_ptr() };
            let Some(early) = session.welcome() else {
                continue;
            };
            let join = session.announces_presence().then(|| {
                let id = worker::next_id();
                envelope::presence(
                    envelope::Presence::Join,
                    room,
                    session.user(),
                    time::now_ms(),
                    &id,
                )
            });
            // The join goes first so that the room sees the member before
            // anything the member typed while the subscription was pending.
            for event in join.into_iter().chain(early) {
                if self.publish(room, &event).is_err() {
                    session.notify_backlog_full();
                }
            }
        }
    }

    fn on_sub_reply(&mut self, value: Value) -> Next {
        if self.sub.setup_pending > 0 {
            self.sub.setup_pending -= 1;
            return self.check_setup(Role::Sub, value);
        }
        let items = match value {
            Value::Array(items) => items,
            // PING outside subscribed mode.
            Value::SimpleString(_) => {
                self.sub.owed = self.sub.owed.saturating_sub(1);
                return Next::Continue;
            }
            Value::ServerError(err) => {
                ngx_log_error!(
                    NGX_LOG_ERR,
                    self.log,
                    "websocket_chat: Redis {}: {:?}",
                    self.display,
                    err
                );
                return Next::Reset;
            }
            _ => return Next::Continue,
        };
        let mut items = items.into_iter();
        let Some(Value::BulkString(kind)) = items.next() else {
            return Next::Continue;
        };
        if kind != b"message" {
            // subscribe, unsubscribe and pong answer a command of ours.
            self.sub.owed = self.sub.owed.saturating_sub(1);
        }
        let Some(Value::BulkString(channel)) = items.next() else {
            return Next::Continue;
        };
        let Some(room) = std::str::from_utf8(&channel)
            .ok()
            .and_then(|c| c.strip_prefix(CHANNEL_PREFIX))
        else {
            return Next::Continue;
        };
        match kind.as_slice() {
            b"message" => {
                if let Some(Value::BulkString(payload)) = items.next() {
                    self.deliver(room, &payload);
                }
            }
            b"subscribe" => self.on_subscribed(room),
            b"unsubscribe" => {
                if self.rooms.members(room).is_empty() {
                    self.channels.remove(room);
                } else {
                    self.send_sub(room, Channel::Subscribing);
                }
            }
            _ => {}
        }
        Next::Continue
    }

    fn on_subscribed(&mut self, room: &str) {
        if self.channels.get(room) == Some(&Channel::Resubscribing) {
            self.resubscribing = self.resubscribing.saturating_sub(1);
            if self.resubscribing == 0 {
                self.on_resubscribed();
            }
        }
        let members = self.rooms.members(room).to_vec();
        if members.is_empty() {
            self.send_sub(room, Channel::Unsubscribing);
        } else {
            self.channels.insert(room.into(), Channel::Live);
            self.welcome(room, &members);
        }
    }

    fn on_cmd_reply(&mut self, value: Value) -> Next {
        if self.cmd.setup_pending > 0 {
            self.cmd.setup_pending -= 1;
            return self.check_setup(Role::Cmd, value);
        }
        self.cmd.owed = self.cmd.owed.saturating_sub(1);
        if let Value::ServerError(err) = value {
            ngx_log_error!(
                NGX_LOG_ERR,
                self.log,
                "websocket_chat: PUBLISH to Redis {} failed: {:?}",
                self.display,
                err
            );
        }
        Next::Continue
    }

    fn check_setup(&mut self, role: Role, value: Value) -> Next {
        match value {
            Value::ServerError(err) => {
                ngx_log_error!(
                    NGX_LOG_ERR,
                    self.log,
                    "websocket_chat: Redis {} refused the {} connection's AUTH/SELECT: {:?}",
                    self.display,
                    Self::name(role),
                    err
                );
                Next::Reset
            }
            _ => {
                if role == Role::Sub && self.sub.setup_pending == 0 && self.resubscribing == 0 {
                    self.on_resubscribed();
                }
                Next::Continue
            }
        }
    }

    /// Hands one published event to every local member of its room: one
    /// frame, encoded once, shared by all.
    fn deliver(&mut self, room: &str, payload: &[u8]) {
        if std::str::from_utf8(payload).is_err() {
            ngx_log_error!(
                NGX_LOG_WARN,
                self.log,
                "websocket_chat: ignored a non-UTF-8 event on channel {}{}",
                CHANNEL_PREFIX,
                room
            );
            return;
        }
        let frame = frame::text_frame(payload);
        for &m in self.rooms.members(room) {
            // SAFETY: as in `notify_all`.
            unsafe { (*m.as_ptr()).deliver(&frame) };
        }
    }

    fn on_readable(&mut self, role: Role) {
        let outcome = self.conn(role).peer.read(REPLY_LIMITS.max_bulk + 64 * 1024);
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
            let next = match role {
                Role::Sub => self.on_sub_reply(value),
                Role::Cmd => self.on_cmd_reply(value),
            };
            if let Next::Reset = next {
                failure = Some("command refused".to_owned());
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
            self.on_up(role);
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
            let _ = conn.queue_command(packed(&[b"PING"]));
        }
        conn.peer.arm_timer(timeout);
    }
}

/// The Link behind an event of one of its connections.
///
/// # Safety
/// `ev` must be an event of a connection opened by `Link::connect`.
unsafe fn link_of(ev: *mut ngx_event_t) -> &'static mut Link {
    // SAFETY: connect() stored the boxed Link in c->data.
    unsafe {
        let c = (*ev).data.cast::<ngx_connection_t>();
        &mut *(*c).data.cast::<Link>()
    }
}

fn role(sub: bool) -> Role {
    if sub {
        Role::Sub
    } else {
        Role::Cmd
    }
}

unsafe extern "C" fn on_read<const SUB: bool>(ev: *mut ngx_event_t) {
    // SAFETY: nginx calls this for the read event set up in connect().
    let link = unsafe { link_of(ev) };
    let role = role(SUB);
    // SAFETY: ev is live for the duration of the handler.
    if unsafe { (*ev).timedout() } != 0 {
        // SAFETY: as above.
        unsafe { (*ev).set_timedout(0) };
        link.on_timer(role);
        return;
    }
    if link.conn(role).peer.state == State::Connecting {
        link.on_writable(role);
    }
    if link.conn(role).peer.state == State::Up {
        link.on_readable(role);
    }
}

unsafe extern "C" fn on_write<const SUB: bool>(ev: *mut ngx_event_t) {
    // SAFETY: as for on_read.
    let link = unsafe { link_of(ev) };
    link.on_writable(role(SUB));
}

unsafe extern "C" fn on_retry<const SUB: bool>(ev: *mut ngx_event_t) {
    // SAFETY: arm_retry stored the Link in the timer's data.
    let link = unsafe { &mut *(*ev).data.cast::<Link>() };
    link.connect(role(SUB));
}
