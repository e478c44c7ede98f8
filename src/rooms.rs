//! A worker's rooms on one Redis transport: which local sessions are in
//! which room (by key, never by reference), and what the transport's events
//! mean for them: one shared frame per message for every member, `welcome`
//! once a room is live, error events and closes when Redis refuses a room,
//! notices when delivery stops and resumes.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use redis::Value;
use wschat_core::envelope::{self, Status};
use wschat_core::frame;
use wschat_core::history::{self, Position, Request};
use wschat_core::presence::{self, Changes};
use wschat_core::recent::{self, Recent};
use wschat_core::room::Registry;
use wschat_core::slab::{Key, Slab};

use core::ptr::NonNull;

use ngx::ffi::{
    ngx_event_handler_pt, ngx_event_t, ngx_http_request_t, ngx_msec_t, NGX_LOG_ERR, NGX_LOG_WARN,
};
use ngx::ngx_log_error;

use crate::conf::LocConf;
use crate::metrics::{self, Gauge, PublishStatus};
use crate::publish::{self, Outgoing, Refused};
use crate::redis_link::{self, BacklogFull, Call, Event, Op, Script};
use crate::send_queue::Limit;
use crate::session::{close, Admission, Held, Mark, Session};
use crate::transport::Transport;
use crate::{ids, time};

/// Live messages a recovering room holds at most; past it, recovery is
/// given up (and logged) rather than memory spent.
const RECOVERY_HOLD: Limit = Limit::strict(8 << 20);

/// Ticks a room stays subscribed after its last member here left: a
/// member back within it (a page reload, a reconnect) finds it live, and
/// its history at hand (`recent`), with no round trip to Redis.
const LINGER_TICKS: u64 = 2;

/// What a worker knows of one room beyond its members.
struct Room {
    /// The room's name (its channel without the prefix).
    name: Box<str>,
    /// The newest message delivered here: after an outage, what came later
    /// is fetched from the room's history.
    last: Option<Position>,
    /// The channel has been live: a later `Subscribed` follows an outage.
    was_live: bool,
    /// Set while messages missed during an outage are fetched; live ones
    /// wait so that the missed ones go first.
    recovering: Option<(Request, Held)>,
    /// Presence changes sent to Redis and not yet answered, in order:
    /// (joined, member JSON).
    awaiting: VecDeque<(bool, String)>,
    /// Changes Redis left unannounced (a busy room), for the next summary.
    changes: Changes,
    /// The room's newest messages, for joins that need nothing else.
    recent: Recent,
    /// The tick its last member here left; it is unsubscribed
    /// `LINGER_TICKS` later unless one joins meanwhile.
    empty_since: Option<u64>,
}

impl Room {
    fn new(name: &str) -> Self {
        Room {
            name: name.into(),
            last: None,
            was_live: false,
            recovering: None,
            awaiting: VecDeque::new(),
            changes: Changes::default(),
            recent: Recent::default(),
            empty_since: None,
        }
    }

    /// Runs `f` on the room's copy of its history, keeping `total` (the
    /// worker's bytes in such copies) up to date.
    fn recent<R>(&mut self, total: &mut usize, f: impl FnOnce(&mut Recent) -> R) -> R {
        let before = self.recent.bytes();
        let r = f(&mut self.recent);
        *total = *total + self.recent.bytes() - before;
        r
    }
}

pub struct Rooms {
    pub transport: Transport,
    /// Channel → keys of the local sessions in that room.
    members: Registry<Key>,
    rooms: HashMap<Box<str>, Room>,
    /// Lease scopes (see `Transport::lease_scope`) with members present in
    /// Redis, and how many: this worker renews its lease under each.
    scopes: HashMap<Box<str>, usize>,
    ticks: u64,
    /// The event buffer handed back to the link between turns.
    spare: Vec<Event>,
    /// `websocket_chat_publish` requests waiting for Redis.
    publishes: Slab<Waiting>,
    /// Members whose writes wait for the flush clock (see
    /// `Session::deliver`), and the clock: boxed, as nginx keeps a pointer
    /// to it while it is armed.
    flush_later: Vec<Key>,
    flush_clock: Box<ngx_event_t>,
    /// Bytes in all rooms' copies of their history, within
    /// `recent::WORKER_BYTES`.
    recent_bytes: usize,
}

/// A publish request waiting for Redis's answer.
struct Waiting {
    r: NonNull<ngx_http_request_t>,
    room: Box<str>,
    /// The id given here (history off); with history Redis gives it.
    id: Option<Box<str>>,
}

/// Tag of a command whose failure nobody is left to hear of.
const NOBODY: u64 = 0;

impl Rooms {
    /// `clock` is the flush clock's handler, and what it finds in its
    /// event's `data`.
    pub fn new(transport: Transport, clock: (ngx_event_handler_pt, usize)) -> Self {
        // SAFETY: an all-zero event is an idle, unarmed one.
        let mut flush_clock: Box<ngx_event_t> = Box::new(unsafe { core::mem::zeroed() });
        flush_clock.handler = clock.0;
        flush_clock.data = clock.1 as *mut core::ffi::c_void;
        flush_clock.log = transport.log();
        // It must not hold a worker that is shutting down.
        flush_clock.set_cancelable(1);
        Rooms {
            flush_later: Vec::new(),
            flush_clock,
            transport,
            members: Registry::new(),
            rooms: HashMap::new(),
            scopes: HashMap::new(),
            ticks: 0,
            spare: Vec::new(),
            publishes: Slab::new(),
            recent_bytes: 0,
        }
    }

    /// Sends a message from `websocket_chat_publish` the way members' go:
    /// into the history (which gives its id) or, with history off, with an
    /// id of our own. The request waits under the returned key.
    pub fn publish(
        &mut self,
        r: *mut ngx_http_request_t,
        conf: &LocConf,
        out: &Outgoing,
        sid: &str,
    ) -> Result<Key, BacklogFull> {
        let r = NonNull::new(r).ok_or(BacklogFull)?;
        let channel = conf.channel(&out.room);
        let head = envelope::message_head(&out.room, &out.user, sid, &out.text, time::now_ms());
        let id = conf.history().is_none().then(ids::next_id);
        let key = self.publishes.insert(Waiting {
            r,
            room: out.room.as_str().into(),
            id: id.as_deref().map(Into::into),
        });
        let call = |op| Call {
            op,
            tag: key.to_raw(),
            channel: channel.as_str().into(),
        };
        let sent = match (conf.history(), id) {
            (Some(h), _) => self.transport.append(
                &channel,
                &head,
                (h.count, h.keep_ms),
                NOBODY,
                Some(call(Op::Run(Script::Append))),
            ),
            (None, id) => {
                let mut event = head;
                event.push_str(id.as_deref().unwrap_or_default());
                event.push_str(envelope::ID_TAIL);
                (self.transport).publish(&channel, &event, NOBODY, Some(call(Op::Publish)))
            }
        };
        if sent.is_err() {
            self.publishes.remove(key);
            return Err(BacklogFull);
        }
        self.transport.hold_worker(true);
        Ok(key)
    }

    /// Takes a waiting publish out; the worker no longer waits for the
    /// last one.
    fn end_publish(&mut self, key: Key) -> Option<Waiting> {
        let w = self.publishes.remove(key);
        if self.publishes.is_empty() {
            self.transport.hold_worker(false);
        }
        w
    }

    /// The request of a waiting publish is gone.
    pub fn forget_publish(&mut self, key: Key) {
        self.end_publish(key);
    }

    /// The requests still waiting as the worker exits.
    pub fn abandon_publishes(&mut self) -> Vec<NonNull<ngx_http_request_t>> {
        (self.publishes.keys().into_iter())
            .filter_map(|k| self.end_publish(k))
            .map(|w| w.r)
            .collect()
    }

    /// Redis has answered a publish (or the command was lost): the request
    /// gets its answer.
    fn answer_publish(&mut self, key: Key, reply: Option<&Value>) {
        let Some(w) = self.end_publish(key) else {
            return;
        };
        let failed = |code, message: &str| {
            let refused = Refused::new(PublishStatus::BadGateway, code, message);
            (PublishStatus::BadGateway, refused.body())
        };
        let (status, body) = match (reply, &w.id) {
            (Some(Value::BulkString(id)), None) => (
                PublishStatus::Created,
                publish::created(&String::from_utf8_lossy(id), &w.room),
            ),
            (Some(Value::Int(_)), Some(id)) => {
                (PublishStatus::Created, publish::created(id, &w.room))
            }
            (Some(Value::ServerError(err)), _) => {
                let text = redis_link::error_text(err);
                ngx_log_error!(
                    NGX_LOG_ERR,
                    self.transport.log(),
                    "websocket_chat: Redis refused a published message for \"{}\": {}",
                    w.room,
                    text
                );
                failed("redis_refused", &text)
            }
            (None, _) => failed(
                "in_doubt",
                "the connection to Redis dropped with the message in flight: it may or may not have been published",
            ),
            (Some(other), _) => failed("redis_error", &format!("unexpected reply {other:?}")),
        };
        // SAFETY: the request waits here until answered (its cleanup
        // removes it otherwise), so it is live.
        unsafe { publish::answer_later(w.r.as_ptr(), status, &body) };
    }

    /// Adds a session to its room. It is welcomed once the room's channel
    /// is live (at once if it already is).
    pub fn join(&mut self, s: &mut Session) {
        if self.members.join(s.channel(), s.key()) {
            metrics::adjust(Gauge::Rooms, 1);
        }
        let room = (self.rooms.entry(s.channel().into())).or_insert_with(|| Room::new(s.room()));
        room.empty_since = None;
        s.in_room = true;
        if self.transport.in_outage(s.channel()) {
            s.notify(
                Status::Error,
                "redis_unavailable",
                "chat delivery is interrupted; you will join when it is back",
            );
        }
        if self.transport.subscribe(s.channel()) {
            self.admit(s);
        }
    }

    /// Takes a session out of its room and tells the room, once.
    pub fn leave(&mut self, s: &mut Session) {
        if !s.in_room {
            return;
        }
        s.in_room = false;
        let last = self.members.leave(s.channel(), s.key());
        if let Some(room) = self.rooms.get_mut(s.channel()) {
            let key = s.key().to_raw();
            room.recent(&mut self.recent_bytes, |r| r.abandon(key));
            if last {
                room.empty_since = Some(self.ticks);
            }
        }
        if last {
            metrics::adjust(Gauge::Rooms, -1);
        }
        if !s.present {
            return;
        }
        s.present = false;
        let scope = self.transport.lease_scope(s.prefix(), s.channel());
        if let Some(n) = self.scopes.get_mut(scope.as_str()) {
            *n = n.saturating_sub(1);
        }
        let event = envelope::presence_id_head(
            envelope::Presence::Leave,
            s.room(),
            s.user(),
            s.sid(),
            time::now_ms(),
        );
        let busy = presence::BUSY_ROOM.to_string();
        let args: [&[u8]; 4] = [
            s.sid().as_bytes(),
            s.channel().as_bytes(),
            event.as_bytes(),
            busy.as_bytes(),
        ];
        self.presence_call(s, Script::Leave, &args, false);
    }

    /// Runs a presence script for a member; the reply says whether Redis
    /// announced the change or left it to this worker's next summary.
    fn presence_call(&mut self, s: &Session, script: Script, args: &[&[u8]], joined: bool) {
        // A join's reply names the member, for its own `join` (see
        // Session::deliver); a leave's member may be gone by then.
        let tag = if joined { s.key().to_raw() } else { NOBODY };
        let members = presence::members_key(s.channel());
        let scope = self.transport.lease_scope(s.prefix(), s.channel());
        let node = presence::node_key(&scope, &ids::node());
        let seq = presence::seq_key(s.channel());
        let call = Call {
            op: Op::Run(script),
            tag,
            channel: s.channel().into(),
        };
        let keys = [members.as_str(), node.as_str(), seq.as_str()];
        let sent = self.transport.eval(script, &keys, args, NOBODY, Some(call));
        if sent.is_ok() {
            if let Some(room) = self.rooms.get_mut(s.channel()) {
                room.awaiting
                    .push_back((joined, presence::member_json(s.user(), s.sid())));
            }
        }
    }

    /// Puts a member in the room's list in Redis, under this worker's
    /// lease; `announce` publishes its `join` (a small room) too.
    fn register(&mut self, s: &mut Session, announce: bool) {
        let member = presence::member_json(s.user(), s.sid());
        let room = presence::room_json(s.room());
        let leave = envelope::presence_head(envelope::Presence::Leave, s.room(), s.user(), s.sid());
        let join = if announce {
            envelope::presence_id_head(
                envelope::Presence::Join,
                s.room(),
                s.user(),
                s.sid(),
                time::now_ms(),
            )
        } else {
            String::new()
        };
        let busy = presence::BUSY_ROOM.to_string();
        let args: [&[u8]; 7] = [
            s.sid().as_bytes(),
            member.as_bytes(),
            s.channel().as_bytes(),
            room.as_bytes(),
            leave.as_bytes(),
            join.as_bytes(),
            busy.as_bytes(),
        ];
        self.presence_call(s, Script::Join, &args, true);
    }

    /// Starts a session's close: it takes no further part in its room.
    pub fn close(&mut self, s: &mut Session, code: u16, reason: &'static str) {
        if s.begin_close(code, reason) {
            self.leave(s);
        }
    }

    /// Admits a member whose room is live: puts it in the room's list (and
    /// tells the room), then welcomes it with the history and who is there.
    fn admit(&mut self, s: &mut Session) {
        if s.welcomed() || s.present {
            return;
        }
        if s.announces_presence() {
            s.present = true;
            let scope = self.transport.lease_scope(s.prefix(), s.channel());
            let n = self.scopes.entry(scope.as_str().into()).or_insert(0);
            *n += 1;
            if *n == 1 {
                // A lease from the start: a worker that dies before its
                // first renewal is swept like any other.
                self.renew(&scope);
            }
            self.register(s, true);
        }
        // A recovering room's copy is being made good again; a worker over
        // its total asks Redis.
        let recent = (self.rooms.get_mut(s.channel()))
            .filter(|room| room.recovering.is_none() && self.recent_bytes < recent::WORKER_BYTES)
            .map(|room| &mut room.recent);
        // Asked for after the registration, so that the list includes the
        // member, and before anything it typed is published.
        if let Admission::Welcomed(early) = s.admit(&mut self.transport, recent) {
            self.publish_early(s, early);
        }
    }

    /// Publishes what a member typed before its welcome.
    fn publish_early(&mut self, s: &mut Session, early: Option<Vec<String>>) {
        for head in early.into_iter().flatten() {
            if s.send_message(&mut self.transport, head).is_err() {
                s.notify_backlog_full();
            }
        }
    }

    /// Renews this worker's lease under `scope`, and sweeps dead nodes.
    fn renew(&mut self, scope: &str) {
        let nodes = presence::nodes_key(scope);
        let (lease, sweep, busy) = (
            presence::LEASE_MS.to_string(),
            presence::SWEEP_NODES.to_string(),
            presence::BUSY_ROOM.to_string(),
        );
        let node = ids::node();
        let args: [&[u8]; 5] = [
            node.as_bytes(),
            lease.as_bytes(),
            scope.as_bytes(),
            sweep.as_bytes(),
            busy.as_bytes(),
        ];
        let call = Call {
            op: Op::Run(Script::Renew),
            tag: NOBODY,
            channel: scope.into(),
        };
        // A full backlog means Redis is away; the next tick renews.
        let _ = self
            .transport
            .eval(Script::Renew, &[&nodes], &args, NOBODY, Some(call));
    }

    /// The clock: busy rooms' summaries, lease renewals, and forgetting
    /// rooms with nobody left here.
    fn on_tick(&mut self) {
        self.ticks += 1;
        for (channel, room) in &mut self.rooms {
            if room.changes.is_empty() {
                continue;
            }
            let changes = std::mem::take(&mut room.changes);
            let (head, tail) = presence::summary_parts(&room.name, &changes, time::now_ms());
            let (members, seq) = (presence::members_key(channel), presence::seq_key(channel));
            let args: [&[u8]; 3] = [channel.as_bytes(), head.as_bytes(), tail.as_bytes()];
            // Dropped with a full backlog: Redis is away, and the members
            // are told so; the count is right again in the next summary.
            let _ = (self.transport).eval(Script::Summary, &[&members, &seq], &args, NOBODY, None);
        }
        let (members, ticks) = (&self.members, self.ticks);
        for (channel, room) in &mut self.rooms {
            if room.empty_since.is_some_and(|t| ticks - t >= LINGER_TICKS) {
                room.empty_since = None;
                room.was_live = false;
                room.recent(&mut self.recent_bytes, Recent::reset);
                self.transport.unsubscribe(channel);
            }
        }
        // Forgotten once nothing is owed to it.
        self.rooms.retain(|channel, room| {
            !members.members(channel).is_empty()
                || room.empty_since.is_some()
                || !room.awaiting.is_empty()
                || !room.changes.is_empty()
        });
        let every = presence::RENEW_MS / crate::redis_link::TICK_MS as u64;
        if self.ticks.is_multiple_of(every) {
            let scopes: Vec<Box<str>> = (self.scopes.iter())
                .filter(|(_, n)| **n > 0)
                .map(|(p, _)| p.clone())
                .collect();
            for scope in scopes {
                self.renew(&scope);
            }
        }
    }

    /// Carries out what the link reported, until it reports nothing more.
    pub fn handle_events(&mut self, sessions: &mut Slab<Session>) {
        loop {
            let mut events = self.transport.take_events(std::mem::take(&mut self.spare));
            if events.is_empty() {
                self.spare = events;
                return;
            }
            for event in events.drain(..) {
                self.handle(sessions, event);
            }
            self.spare = events;
        }
    }

    fn handle(&mut self, sessions: &mut Slab<Session>, event: Event) {
        match event {
            Event::Message { channel, payload } => self.deliver(sessions, &channel, &payload),
            Event::Subscribed(channel) => {
                let was_live = (self.rooms.get_mut(&*channel))
                    .is_some_and(|room| std::mem::replace(&mut room.was_live, true));
                // Subscribed anew: messages may have gone by unseen.
                if let Some(room) = self.rooms.get_mut(&*channel) {
                    room.recent(&mut self.recent_bytes, Recent::reset);
                }
                if was_live {
                    self.start_recovery(sessions, &channel);
                }
                for key in self.members.members(&channel).to_vec() {
                    if let Some(s) = sessions.get_mut(key) {
                        self.admit(s);
                    }
                }
            }
            Event::SubscribeRefused(channel) => {
                for key in self.members.members(&channel).to_vec() {
                    if let Some(s) = sessions.get_mut(key) {
                        s.notify(
                            Status::Error,
                            "room_refused",
                            "Redis refused this room; ask the operator",
                        );
                        self.close(s, close::POLICY, close::ROOM_REFUSED);
                    }
                }
            }
            Event::PublishRefused { tag, error } => {
                match Key::from_raw(tag).and_then(|k| sessions.get_mut(k)) {
                    Some(s) => {
                        ngx_log_error!(
                            NGX_LOG_ERR,
                            s.log(),
                            "websocket_chat: Redis {} refused the message of \"{}\" in \"{}\" (channel {}): {}",
                            self.transport.display(s.channel()),
                            s.user(),
                            s.room(),
                            s.channel(),
                            error
                        );
                        s.notify(
                            Status::Error,
                            "publish_refused",
                            "message not sent: Redis refused it",
                        );
                    }
                    None => {
                        ngx_log_error!(
                            NGX_LOG_ERR,
                            self.transport.log(),
                            "websocket_chat: Redis refused a command: {}",
                            error
                        );
                    }
                }
            }
            Event::Replied { call, reply } => self.replied(sessions, call, reply.as_ref()),
            Event::Tick => self.on_tick(),
            Event::Outage(shard) => {
                for (channel, room) in &mut self.rooms {
                    if self.transport.shard_of(channel) == shard {
                        room.recent(&mut self.recent_bytes, Recent::reset);
                    }
                }
                self.notify_shard(
                    sessions,
                    Some(shard),
                    Status::Error,
                    "redis_unavailable",
                    "chat delivery is interrupted; messages you send are kept and delivered when it is back",
                );
            }
            Event::Recovered(shard) => {
                self.reregister(sessions, shard);
                self.notify_shard(
                    sessions,
                    Some(shard),
                    Status::Notice,
                    "redis_available",
                    "chat delivery resumed",
                );
            }
            Event::InDoubt(tag) => {
                if let Some(s) = Key::from_raw(tag).and_then(|k| sessions.get_mut(k)) {
                    s.notify(
                        Status::Error,
                        "message_in_doubt",
                        "the connection to Redis dropped with your message in flight: it may not have been delivered",
                    );
                }
            }
            Event::Stalled(channel) => {
                for &key in self.members.members(&channel) {
                    if let Some(s) = sessions.get_mut(key) {
                        s.notify(
                            Status::Error,
                            "redis_unavailable",
                            "the Redis cluster does not say where this room lives; retrying",
                        );
                    }
                }
            }
            // The transport keeps these to itself.
            Event::Cluster(_) => {}
        }
    }

    fn replied(&mut self, sessions: &mut Slab<Session>, call: Call, reply: Option<&Value>) {
        let Op::Run(script) = call.op else {
            if let Some(key) = Key::from_raw(call.tag) {
                self.answer_publish(key, reply);
            }
            return;
        };
        match (script, Key::from_raw(call.tag)) {
            (Script::Append, Some(key)) => self.answer_publish(key, reply),
            (Script::Fetch, Some(key)) => {
                let Some(s) = sessions.get_mut(key) else {
                    return;
                };
                let transport = &mut self.transport;
                let mut end = |recent: &mut Recent| {
                    let done = s.end_fetch(reply, transport, recent);
                    if !s.fetching() {
                        // Answered, or given up: no copy comes of it now.
                        recent.abandon(key.to_raw());
                    }
                    done
                };
                let (_, early) = match self.rooms.get_mut(&*call.channel) {
                    Some(room) => {
                        let done = room.recent(&mut self.recent_bytes, end);
                        room.last = room.last.max(done.0);
                        done
                    }
                    None => end(&mut Recent::default()),
                };
                self.publish_early(s, early);
            }
            (Script::Fetch, None) => self.end_recovery(sessions, &call.channel, reply),
            (Script::Join | Script::Leave | Script::Renew, _)
                if matches!(reply, Some(Value::ServerError(_))) =>
            {
                if let Some(Value::ServerError(err)) = reply {
                    ngx_log_error!(
                        NGX_LOG_ERR,
                        self.transport.log(),
                        "websocket_chat: Redis {} refused the member list update of {}: {}",
                        self.transport.display(&call.channel),
                        call.channel,
                        redis_link::error_text(err)
                    );
                }
                if script != Script::Renew {
                    if let Some(room) = self.rooms.get_mut(&*call.channel) {
                        room.awaiting.pop_front();
                    }
                }
            }
            (Script::Join | Script::Leave, key) => {
                let Some(room) = self.rooms.get_mut(&*call.channel) else {
                    return;
                };
                let Some((joined, member)) = room.awaiting.pop_front() else {
                    return;
                };
                // `{count, announced[, n]}`; 0: left to this worker's summary.
                let Some(Value::Array(r)) = reply else {
                    return;
                };
                match r.as_slice() {
                    [_, Value::Int(0)] => room.changes.add(joined, member),
                    [_, Value::Int(1), Value::Int(n)] => {
                        if let Some(s) = key.and_then(|k| sessions.get_mut(k)) {
                            s.own_join = u64::try_from(*n).ok();
                        }
                    }
                    _ => {}
                }
            }
            (Script::Renew | Script::Append | Script::Summary, _) => {}
        }
    }

    /// After an outage Redis may have lost the member lists (a restart
    /// without persistence): put this worker's members on that shard back,
    /// silently.
    fn reregister(&mut self, sessions: &mut Slab<Session>, shard: usize) {
        let transport = &self.transport;
        let present: Vec<Key> = (self.members.rooms())
            .filter(|room| transport.shard_of(room) == shard)
            .flat_map(|room| self.members.members(room).iter().copied())
            .filter(|&k| sessions.get(k).is_some_and(|s| s.present))
            .collect();
        let scopes: Vec<Box<str>> = (self.scopes.keys())
            .filter(|scope| transport.shard_of(&presence::nodes_key(scope)) == shard)
            .cloned()
            .collect();
        for scope in scopes {
            self.renew(&scope);
        }
        for key in present {
            if let Some(s) = sessions.get_mut(key) {
                s.forget_presence_cursor();
                self.register(s, false);
            }
        }
    }

    /// Hands one published event to every local member of its room: one
    /// frame, encoded once, shared by all.
    fn deliver(&mut self, sessions: &mut Slab<Session>, channel: &[u8], payload: &[u8]) {
        let (Ok(channel), Ok(event)) = (std::str::from_utf8(channel), std::str::from_utf8(payload))
        else {
            ngx_log_error!(
                NGX_LOG_WARN,
                self.transport.log(),
                "websocket_chat: ignored a non-UTF-8 event on channel {}",
                String::from_utf8_lossy(channel)
            );
            return;
        };
        let mark = Mark::of(payload);
        let frame = frame::text_frame(payload);
        if let Some(room) = self.rooms.get_mut(channel) {
            // A recovering room has no copy (reset when it was subscribed
            // anew), so this is a no-op while it holds live messages.
            if let Some(pos) = mark.pos {
                let total = &mut self.recent_bytes;
                room.recent(total, |r| r.seen(pos, event, time::now_ms()));
                if *total > recent::WORKER_BYTES {
                    room.recent(total, Recent::reset);
                }
            }
            if let Some((_, held)) = &mut room.recovering {
                if held.hold(mark, &frame, &RECOVERY_HOLD) {
                    return;
                }
                ngx_log_error!(
                    NGX_LOG_WARN,
                    self.transport.log(),
                    "websocket_chat: gave up recovering channel {}: too much arrived meanwhile",
                    channel
                );
                self.release_recovery(sessions, channel);
            }
        }
        self.fan_out(sessions, channel, mark, &frame);
    }

    fn fan_out(
        &mut self,
        sessions: &mut Slab<Session>,
        channel: &str,
        mark: Mark,
        frame: &Rc<[u8]>,
    ) {
        if let Some(room) = self.rooms.get_mut(channel) {
            room.last = room.last.max(mark.pos);
        }
        let mut wait: Option<ngx_msec_t> = None;
        for &key in self.members.members(channel) {
            if let Some(s) = sessions.get_mut(key) {
                if let Some(w) = s.deliver(mark, frame) {
                    self.flush_later.push(key);
                    wait = Some(wait.map_or(w, |x| x.min(w)));
                }
            }
        }
        if let (Some(wait), 0) = (wait, self.flush_clock.timer_set()) {
            // SAFETY: the event is boxed and lives as long as the rooms;
            // Drop removes it.
            unsafe { ngx::ffi::ngx_add_timer(&mut *self.flush_clock, wait) };
        }
    }

    /// The flush clock: the writes put off since it was armed go now (some
    /// a little early: one clock serves every member).
    pub fn flush_due(&mut self, sessions: &mut Slab<Session>) {
        for key in self.flush_later.drain(..) {
            if let Some(s) = sessions.get_mut(key) {
                s.flush_later_due();
            }
        }
    }

    /// After an outage the channel is live again: fetch what was published
    /// since the last message delivered here, and hold live ones meanwhile.
    fn start_recovery(&mut self, sessions: &mut Slab<Session>, channel: &str) {
        let history = (self.members.members(channel).iter())
            .filter_map(|&k| sessions.get(k))
            .find_map(|s| s.history().filter(|_| s.welcomed()));
        let (Some(h), Some(room)) = (history, self.rooms.get_mut(channel)) else {
            return;
        };
        let req = Request {
            since: room.last,
            count: h.count,
            keep_ms: h.keep_ms,
            members: 0,
        };
        if self.transport.fetch(channel, &req, NOBODY).is_ok() {
            room.recovering = Some((req, Held::default()));
        }
    }

    fn end_recovery(&mut self, sessions: &mut Slab<Session>, channel: &str, reply: Option<&Value>) {
        let Some(req) = (self.rooms.get(channel))
            .and_then(|room| room.recovering.as_ref())
            .map(|(req, _)| *req)
        else {
            return;
        };
        let Some(reply) = reply else {
            // Lost with its connection: ask again.
            if self.transport.fetch(channel, &req, NOBODY).is_err() {
                self.release_recovery(sessions, channel);
            }
            return;
        };
        match history::decode(reply, &req, time::now_ms()) {
            Ok(fetched) => {
                if let (true, Some(since)) = (fetched.gap, req.since) {
                    let since = since.to_string();
                    for &key in self.members.members(channel) {
                        if let Some(s) = sessions.get_mut(key) {
                            s.notify_gap(&since);
                        }
                    }
                }
                for (pos, event) in fetched.messages {
                    let frame = frame::text_frame(event.as_bytes());
                    let mark = Mark {
                        pos: Some(pos),
                        presence: None,
                        message: true,
                        origin: 0,
                    };
                    self.fan_out(sessions, channel, mark, &frame);
                }
            }
            Err(_) => {
                ngx_log_error!(
                    NGX_LOG_WARN,
                    self.transport.log(),
                    "websocket_chat: could not fetch what channel {} missed: {:?}",
                    channel,
                    reply
                );
            }
        }
        self.release_recovery(sessions, channel);
    }

    /// Delivers what a recovering room held, in order.
    fn release_recovery(&mut self, sessions: &mut Slab<Session>, channel: &str) {
        let held = (self.rooms.get_mut(channel)).and_then(|room| room.recovering.take());
        if let Some((_, held)) = held {
            for (mark, frame) in held.frames {
                self.fan_out(sessions, channel, mark, &frame);
            }
        }
    }

    /// Tells the members of every room on `shard` (or of all rooms).
    fn notify_shard(
        &self,
        sessions: &mut Slab<Session>,
        shard: Option<usize>,
        kind: Status,
        code: &str,
        message: &str,
    ) {
        let on_shard = |room: &&str| shard.is_none_or(|n| self.transport.shard_of(room) == n);
        for room in self.members.rooms().filter(on_shard) {
            for &key in self.members.members(room) {
                if let Some(s) = sessions.get_mut(key) {
                    s.notify(kind, code, message);
                }
            }
        }
    }
}

impl Drop for Rooms {
    fn drop(&mut self) {
        if self.flush_clock.timer_set() != 0 {
            // SAFETY: armed by fan_out on this very event.
            unsafe { ngx::ffi::ngx_del_timer(&mut *self.flush_clock) };
        }
    }
}
