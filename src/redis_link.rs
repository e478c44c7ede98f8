//! One worker's bridge to one Redis server: a subscriber connection that
//! follows the rooms with local members, and a command connection that
//! carries pipelined PUBLISHes. Messages come back through the subscription
//! and are handed, as one shared frame, to every local member.

use core::ffi::c_void;
use core::ptr::NonNull;
use std::collections::HashMap;
use std::rc::Rc;

use ngx::ffi::{ngx_connection_t, ngx_event_t, ngx_log_t, NGX_LOG_ERR, NGX_LOG_INFO, NGX_LOG_WARN};
use ngx::ngx_log_error;
use redis::Value;

use crate::conf::Endpoint;
use crate::peer::{PeerConn, ReadOutcome, State};
use crate::session::Session;
use crate::{time, worker};
use wschat_core::backoff::Backoff;
use wschat_core::envelope;
use wschat_core::frame;
use wschat_core::resp::{self, Limits};
use wschat_core::room::Registry;

/// Room `r` travels on channel `wschat:r`.
const CHANNEL_PREFIX: &str = "wschat:";

/// Publishes that may wait per worker while the command connection is down
/// or slow; past it the sender is told.
const BACKLOG_BYTES: usize = 1 << 20;

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
    Live,
    Unsubscribing,
}

/// What a reply asks of the reader.
enum Next {
    Continue,
    Reset,
}

pub type Member = NonNull<Session>;

pub struct Link {
    endpoint: &'static Endpoint,
    log: *mut ngx_log_t,
    display: String,
    started: bool,
    sub: PeerConn,
    cmd: PeerConn,
    sub_backoff: Backoff,
    cmd_backoff: Backoff,
    /// AUTH / SELECT replies still expected at the head of each connection.
    sub_setup_pending: usize,
    cmd_setup_pending: usize,
    /// PUBLISHes queued or sent whose replies have not arrived.
    cmd_unacked: usize,
    /// The AUTH/SELECT chunk put ahead of the backlog, so a connection that
    /// drops before sending it does not leave it behind for the next one.
    cmd_setup: Option<Rc<[u8]>>,
    rooms: Registry<Member>,
    channels: HashMap<Box<str>, Channel>,
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
    pub fn new(endpoint: &'static Endpoint, log: *const ngx_log_t) -> Box<Link> {
        let display = endpoint.addr.to_string();
        Box::new(Link {
            endpoint,
            log: log.cast_mut(),
            sub: PeerConn::new(&endpoint.sockaddr, &display, log, usize::MAX),
            cmd: PeerConn::new(&endpoint.sockaddr, &display, log, BACKLOG_BYTES),
            display,
            started: false,
            sub_backoff: Backoff::default(),
            cmd_backoff: Backoff::default(),
            sub_setup_pending: 0,
            cmd_setup_pending: 0,
            cmd_unacked: 0,
            cmd_setup: None,
            rooms: Registry::new(),
            channels: HashMap::new(),
        })
    }

    fn conn(&mut self, role: Role) -> &mut PeerConn {
        match role {
            Role::Sub => &mut self.sub,
            Role::Cmd => &mut self.cmd,
        }
    }

    fn log(&self) -> *mut ngx_log_t {
        self.log
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
        // SAFETY: a Link is boxed by the worker and never moves; handlers
        // find it again through c->data.
        let state = unsafe { self.conn(role).connect(data, Some(read), Some(write)) };
        match state {
            State::Up => self.on_up(role),
            State::Connecting => {}
            State::Down => self.on_down(role, "connect failed"),
        }
    }

    fn on_up(&mut self, role: Role) {
        let log = self.log();
        ngx_log_error!(
            NGX_LOG_INFO,
            log,
            "websocket_chat: connected to Redis {}",
            self.display
        );
        let setup = self.endpoint.addr.setup_commands();
        let setup_replies = self.endpoint.addr.setup_reply_count();
        match role {
            Role::Sub => {
                self.sub_backoff.reset();
                self.sub_setup_pending = setup_replies;
                if !setup.is_empty() {
                    self.sub.queue.push_front(Rc::from(setup));
                }
                self.channels.clear();
                let rooms: Vec<Box<str>> = self.rooms.rooms().map(Box::from).collect();
                for room in rooms {
                    self.send_sub(&room, Channel::Subscribing);
                }
            }
            Role::Cmd => {
                self.cmd_backoff.reset();
                self.cmd_setup_pending = setup_replies;
                if !setup.is_empty() {
                    let chunk: Rc<[u8]> = Rc::from(setup);
                    self.cmd.queue.push_front(chunk.clone());
                    self.cmd_setup = Some(chunk);
                }
            }
        }
        self.flush(role);
    }

    fn on_down(&mut self, role: Role, why: &str) {
        let log = self.log();
        let was_up = self.conn(role).state == State::Up;
        self.conn(role).close();
        match role {
            Role::Sub => {
                self.sub.queue.clear();
                self.channels.clear();
            }
            Role::Cmd => {
                if let Some(setup) = self.cmd_setup.take() {
                    self.cmd.queue.remove_front_if(&setup);
                }
                // A command cut in half cannot be resumed on a new connection;
                // commands sent whole but not answered may or may not have run.
                let partial = self.cmd.queue.drop_partial_front();
                let waiting = self.cmd.queue.chunk_count();
                let in_doubt = self.cmd_unacked.saturating_sub(waiting) + usize::from(partial);
                self.cmd_unacked = waiting;
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
        if was_up {
            ngx_log_error!(
                NGX_LOG_ERR,
                log,
                "websocket_chat: connection to Redis {} lost: {}",
                self.display,
                why
            );
        }
        let random = worker::random();
        let delay = match role {
            Role::Sub => self.sub_backoff.next_delay_ms(random),
            Role::Cmd => self.cmd_backoff.next_delay_ms(random),
        };
        let data = (self as *mut Link).cast::<c_void>();
        let handler: unsafe extern "C" fn(*mut ngx_event_t) = match role {
            Role::Sub => on_retry::<true>,
            Role::Cmd => on_retry::<false>,
        };
        self.conn(role).arm_retry(data, Some(handler), delay);
    }

    fn flush(&mut self, role: Role) {
        if self.conn(role).flush().is_err() {
            self.on_down(role, "send failed");
        }
    }

    fn send_sub(&mut self, room: &str, next: Channel) {
        let verb: &[u8] = match next {
            Channel::Unsubscribing => b"UNSUBSCRIBE",
            _ => b"SUBSCRIBE",
        };
        let channel = channel_of(room);
        // The subscriber queue is unbounded: it only ever holds one command
        // per room with local members.
        let _ = self.sub.queue.push(packed(&[verb, channel.as_bytes()]));
        self.channels.insert(room.into(), next);
        self.sub.schedule_flush();
    }

    /// Adds a session to its room. The session is welcomed once the room's
    /// subscription is live (at once if it already is).
    pub fn join(&mut self, member: Member, room: &str) {
        self.ensure_started();
        self.rooms.join(room, member);
        if self.sub.state != State::Up {
            // on_up subscribes every room with members.
            return;
        }
        match self.channels.get(room) {
            None => self.send_sub(room, Channel::Subscribing),
            Some(Channel::Live) => self.welcome(room, &[member]),
            // The reply to the command in flight decides (on_sub_reply).
            Some(Channel::Subscribing | Channel::Unsubscribing) => {}
        }
    }

    pub fn leave(&mut self, member: Member, room: &str) {
        if !self.rooms.leave(room, member) {
            return;
        }
        if self.sub.state == State::Up && self.channels.get(room) == Some(&Channel::Live) {
            self.send_sub(room, Channel::Unsubscribing);
        }
    }

    /// Queues a PUBLISH of an event (already encoded as JSON) to a room.
    pub fn publish(&mut self, room: &str, event: &str) -> Result<(), BacklogFull> {
        self.ensure_started();
        let channel = channel_of(room);
        let cmd = packed(&[b"PUBLISH", channel.as_bytes(), event.as_bytes()]);
        self.cmd.queue.push(cmd).map_err(|_| BacklogFull)?;
        self.cmd_unacked += 1;
        self.cmd.schedule_flush();
        Ok(())
    }

    /// Sends `welcome` to members whose room just went live, and tells the
    /// room they joined.
    fn welcome(&mut self, room: &str, members: &[Member]) {
        for &m in members {
            // SAFETY: members are live sessions: each removes itself from the
            // registry before it is freed.
            let session = unsafe { &mut *m.as_ptr() };
            let Some(early) = session.welcome() else {
                continue;
            };
            let id = worker::next_id();
            let join = envelope::presence(
                envelope::Presence::Join,
                room,
                session.user(),
                time::now_ms(),
                &id,
            );
            // The join goes first so that the room sees the member before
            // anything the member typed while the subscription was pending.
            for event in std::iter::once(join).chain(early) {
                if self.publish(room, &event).is_err() {
                    session.notify_backlog_full();
                }
            }
        }
    }

    fn on_sub_reply(&mut self, value: Value) -> Next {
        let log = self.log();
        if self.sub_setup_pending > 0 {
            self.sub_setup_pending -= 1;
            return self.check_setup(value);
        }
        let Value::Array(items) = value else {
            if let Value::ServerError(err) = value {
                ngx_log_error!(
                    NGX_LOG_ERR,
                    log,
                    "websocket_chat: Redis {}: {:?}",
                    self.display,
                    err
                );
            }
            return Next::Continue;
        };
        let mut items = items.into_iter();
        let (Some(Value::BulkString(kind)), Some(Value::BulkString(channel))) =
            (items.next(), items.next())
        else {
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
            b"subscribe" => {
                let members = self.rooms.members(room).to_vec();
                if members.is_empty() {
                    self.send_sub(room, Channel::Unsubscribing);
                } else {
                    self.channels.insert(room.into(), Channel::Live);
                    self.welcome(room, &members);
                }
            }
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

    fn on_cmd_reply(&mut self, value: Value) -> Next {
        if self.cmd_setup_pending > 0 {
            self.cmd_setup_pending -= 1;
            return self.check_setup(value);
        }
        self.cmd_unacked = self.cmd_unacked.saturating_sub(1);
        if let Value::ServerError(err) = value {
            let log = self.log();
            ngx_log_error!(
                NGX_LOG_ERR,
                log,
                "websocket_chat: PUBLISH to Redis {} failed: {:?}",
                self.display,
                err
            );
        }
        Next::Continue
    }

    fn check_setup(&mut self, value: Value) -> Next {
        match value {
            Value::ServerError(err) => {
                let log = self.log();
                ngx_log_error!(
                    NGX_LOG_ERR,
                    log,
                    "websocket_chat: Redis {} refused AUTH/SELECT: {:?}",
                    self.display,
                    err
                );
                Next::Reset
            }
            _ => Next::Continue,
        }
    }

    /// Hands one published event to every local member of its room: one
    /// frame, encoded once, shared by all.
    fn deliver(&mut self, room: &str, payload: &[u8]) {
        if std::str::from_utf8(payload).is_err() {
            let log = self.log();
            ngx_log_error!(
                NGX_LOG_WARN,
                log,
                "websocket_chat: ignored a non-UTF-8 event on channel {}{}",
                CHANNEL_PREFIX,
                room
            );
            return;
        }
        let frame = frame::text_frame(payload);
        for &m in self.rooms.members(room) {
            // SAFETY: as in `welcome`.
            unsafe { (*m.as_ptr()).deliver(&frame) };
        }
    }

    fn on_readable(&mut self, role: Role) {
        let outcome = self.conn(role).read(REPLY_LIMITS.max_bulk + 64 * 1024);
        let mut consumed = 0;
        let mut failure = None;
        loop {
            let buf = &self.conn(role).inbuf[consumed..];
            let n = match resp::frame_len(buf, &REPLY_LIMITS) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(err) => {
                    failure = Some(format!("malformed reply: {err}"));
                    break;
                }
            };
            let value = match redis::parse_redis_value(&buf[..n]) {
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
                failure = Some("setup rejected".to_owned());
                break;
            }
        }
        if let Some(why) = failure {
            self.on_down(role, &why);
            return;
        }
        self.conn(role).inbuf.drain(..consumed);
        if matches!(outcome, ReadOutcome::Closed) {
            self.on_down(role, "closed by Redis");
        }
    }

    fn on_writable(&mut self, role: Role) {
        if self.conn(role).state == State::Connecting {
            if let Some(err) = self.conn(role).connect_error() {
                self.on_down(role, &err.to_string());
                return;
            }
            self.conn(role).state = State::Up;
            self.on_up(role);
            return;
        }
        self.flush(role);
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
    if link.conn(role).state == State::Connecting {
        link.on_writable(role);
    }
    if link.conn(role).state == State::Up {
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
