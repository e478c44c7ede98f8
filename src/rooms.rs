//! A worker's rooms on one Redis transport: which local sessions are in
//! which room (by key, never by reference), and what the transport's events
//! mean for them: one shared frame per message for every member, `welcome`
//! once a room is live, error events and closes when Redis refuses a room,
//! notices when delivery stops and resumes.

use wschat_core::envelope::{self, Status};
use wschat_core::frame;
use wschat_core::room::Registry;
use wschat_core::slab::{Key, Slab};

use ngx::ffi::NGX_LOG_WARN;
use ngx::ngx_log_error;

use crate::redis_link::{Event, Link};
use crate::session::{close, Session};
use crate::{ids, time};

pub struct Rooms {
    pub link: Box<Link>,
    /// Channel → keys of the local sessions in that room.
    members: Registry<Key>,
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
            spare: Vec::new(),
        }
    }

    /// Adds a session to its room. It is welcomed once the room's channel
    /// is live (at once if it already is).
    pub fn join(&mut self, s: &mut Session) {
        self.members.join(s.channel(), s.key());
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

    /// Sends `welcome` to a member whose room is live, and tells the room
    /// it joined.
    fn welcome(&mut self, s: &mut Session) {
        let Some(early) = s.welcome() else {
            return;
        };
        let join = s.announces_presence().then(|| {
            let id = ids::next_id();
            envelope::presence(
                envelope::Presence::Join,
                s.room(),
                s.user(),
                time::now_ms(),
                &id,
            )
        });
        // The join goes first so that the room sees the member before
        // anything the member typed while the subscription was pending.
        for event in join.into_iter().chain(early) {
            if self
                .link
                .publish(s.channel(), &event, s.key().to_raw())
                .is_err()
            {
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
    fn deliver(&self, sessions: &mut Slab<Session>, channel: &[u8], payload: &[u8]) {
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
        let frame = frame::text_frame(payload);
        for &key in self.members.members(channel) {
            if let Some(s) = sessions.get_mut(key) {
                s.deliver(&frame);
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
