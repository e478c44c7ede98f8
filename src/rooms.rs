//! A worker's rooms on one Redis transport: which local sessions are in
//! which room (by key, never by reference), and what the transport's events
//! mean for them: one shared frame per message for every member, `welcome`
//! once a room is live, error events and closes when Redis refuses a room,
//! notices when delivery stops and resumes.

use std::collections::HashMap;
use std::rc::Rc;

use redis::Value;
use wschat_core::envelope::{self, Status};
use wschat_core::frame;
use wschat_core::history::{self, Position, Request};
use wschat_core::room::Registry;
use wschat_core::slab::{Key, Slab};

use ngx::ffi::NGX_LOG_WARN;
use ngx::ngx_log_error;

use crate::redis_link::{Event, Link};
use crate::session::{close, Held, Session};
use crate::{ids, time};

/// Live messages a recovering room holds at most; past it, recovery is
/// given up (and logged) rather than memory spent.
const RECOVERY_HOLD: usize = 8 << 20;

/// What a worker knows of one room beyond its members.
#[derive(Default)]
struct Room {
    /// The newest message delivered here: after an outage, what came later
    /// is fetched from the room's history.
    last: Option<Position>,
    /// The channel has been live: a later `Subscribed` follows an outage.
    was_live: bool,
    /// Set while messages missed during an outage are fetched; live ones
    /// wait so that the missed ones go first.
    recovering: Option<(Request, Held)>,
}

pub struct Rooms {
    pub link: Box<Link>,
    /// Channel → keys of the local sessions in that room.
    members: Registry<Key>,
    rooms: HashMap<Box<str>, Room>,
    /// The event buffer handed back to the link between turns.
    spare: Vec<Event>,
}

/// Tag of a command whose failure nobody is left to hear of.
const NOBODY: u64 = 0;

impl Rooms {
    pub fn new(link: Box<Link>) -> Self {
        Rooms {
            link,
            members: Registry::new(),
            rooms: HashMap::new(),
            spare: Vec::new(),
        }
    }

    /// Adds a session to its room. It is welcomed once the room's channel
    /// is live (at once if it already is).
    pub fn join(&mut self, s: &mut Session) {
        if self.members.join(s.channel(), s.key()) {
            self.rooms.insert(s.channel().into(), Room::default());
        }
        s.in_room = true;
        if self.link.in_outage() {
            s.notify(
                Status::Error,
                "redis_unavailable",
                "chat delivery is interrupted; you will join when it is back",
            );
        }
        if self.link.subscribe(s.channel()) {
            self.welcome(s);
        }
    }

    /// Takes a session out of its room and tells the room, once.
    pub fn leave(&mut self, s: &mut Session) {
        if !s.in_room {
            return;
        }
        s.in_room = false;
        if self.members.leave(s.channel(), s.key()) {
            self.rooms.remove(s.channel());
            self.link.unsubscribe(s.channel());
        }
        if !s.welcomed() || !s.announces_presence() {
            return;
        }
        let id = ids::next_id();
        let event = envelope::presence(
            envelope::Presence::Leave,
            s.room(),
            s.user(),
            s.sid(),
            time::now_ms(),
            &id,
        );
        // Nobody is left to tell if this fails; the link has logged why.
        let _ = self.link.publish(s.channel(), &event, NOBODY);
    }

    /// Starts a session's close: it takes no further part in its room.
    pub fn close(&mut self, s: &mut Session, code: u16, reason: &'static str) {
        if s.begin_close(code, reason) {
            self.leave(s);
        }
    }

    /// Sends `welcome` to a member whose room is live, asks for its
    /// history, and tells the room it joined.
    fn welcome(&mut self, s: &mut Session) {
        let Some(early) = s.welcome() else {
            return;
        };
        // Asked for before anything below is published, so that Redis
        // answers with the history as it was before them.
        s.start_catch_up(&mut self.link);
        if s.announces_presence() {
            let id = ids::next_id();
            let join = envelope::presence(
                envelope::Presence::Join,
                s.room(),
                s.user(),
                s.sid(),
                time::now_ms(),
                &id,
            );
            if self
                .link
                .publish(s.channel(), &join, s.key().to_raw())
                .is_err()
            {
                s.notify_backlog_full();
            }
        }
        // Then what the member typed while the subscription was pending.
        for head in early {
            if s.send_message(&mut self.link, head).is_err() {
                s.notify_backlog_full();
            }
        }
    }

    /// Carries out what the link reported, until it reports nothing more.
    pub fn handle_events(&mut self, sessions: &mut Slab<Session>) {
        loop {
            let mut events = self.link.take_events(std::mem::take(&mut self.spare));
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
                if was_live {
                    self.start_recovery(sessions, &channel);
                }
                for key in self.members.members(&channel).to_vec() {
                    if let Some(s) = sessions.get_mut(key) {
                        self.welcome(s);
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
                        self.close(s, close::POLICY, "room refused by Redis");
                    }
                }
            }
            Event::PublishRefused(tag) => {
                let sender = Key::from_raw(tag).and_then(|k| sessions.get_mut(k));
                if let Some(s) = sender {
                    s.notify(
                        Status::Error,
                        "publish_refused",
                        "message not sent: Redis refused it",
                    );
                }
            }
            Event::Fetched {
                tag,
                channel,
                reply,
            } => match Key::from_raw(tag) {
                Some(key) => {
                    let Some(s) = sessions.get_mut(key) else {
                        return;
                    };
                    let newest = s.end_catch_up(reply.as_ref(), &mut self.link);
                    if let Some(room) = self.rooms.get_mut(&*channel) {
                        room.last = room.last.max(newest);
                    }
                }
                None => self.end_recovery(sessions, &channel, reply.as_ref()),
            },
            Event::Outage => self.notify_all(
                sessions,
                Status::Error,
                "redis_unavailable",
                "chat delivery is interrupted; messages you send are kept and delivered when it is back",
            ),
            Event::Recovered => self.notify_all(
                sessions,
                Status::Notice,
                "redis_available",
                "chat delivery resumed",
            ),
        }
    }

    /// Hands one published event to every local member of its room: one
    /// frame, encoded once, shared by all.
    fn deliver(&mut self, sessions: &mut Slab<Session>, channel: &[u8], payload: &[u8]) {
        let (Ok(channel), Ok(_)) = (std::str::from_utf8(channel), std::str::from_utf8(payload))
        else {
            ngx_log_error!(
                NGX_LOG_WARN,
                self.link.log(),
                "websocket_chat: ignored a non-UTF-8 event on channel {}",
                String::from_utf8_lossy(channel)
            );
            return;
        };
        let pos = history::position_of(payload);
        let frame = frame::text_frame(payload);
        if let Some(room) = self.rooms.get_mut(channel) {
            if let Some((_, held)) = &mut room.recovering {
                if held.hold(pos, &frame, RECOVERY_HOLD) {
                    return;
                }
                ngx_log_error!(
                    NGX_LOG_WARN,
                    self.link.log(),
                    "websocket_chat: gave up recovering channel {}: too much arrived meanwhile",
                    channel
                );
                self.release_recovery(sessions, channel);
            }
        }
        self.fan_out(sessions, channel, pos, &frame);
    }

    fn fan_out(
        &mut self,
        sessions: &mut Slab<Session>,
        channel: &str,
        pos: Option<Position>,
        frame: &Rc<[u8]>,
    ) {
        if let Some(room) = self.rooms.get_mut(channel) {
            room.last = room.last.max(pos);
        }
        for &key in self.members.members(channel) {
            if let Some(s) = sessions.get_mut(key) {
                s.deliver(pos, frame);
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
        };
        if (self.link)
            .fetch(channel, req.since, req.script_count(), NOBODY)
            .is_ok()
        {
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
            if (self.link)
                .fetch(channel, req.since, req.script_count(), NOBODY)
                .is_err()
            {
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
                    self.fan_out(sessions, channel, Some(pos), &frame);
                }
            }
            Err(_) => {
                ngx_log_error!(
                    NGX_LOG_WARN,
                    self.link.log(),
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
            for (pos, frame) in held.frames {
                self.fan_out(sessions, channel, pos, &frame);
            }
        }
    }

    fn notify_all(&self, sessions: &mut Slab<Session>, kind: Status, code: &str, message: &str) {
        for room in self.members.rooms() {
            for &key in self.members.members(room) {
                if let Some(s) = sessions.get_mut(key) {
                    s.notify(kind, code, message);
                }
            }
        }
    }
}
