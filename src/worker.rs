//! Per-worker state and the one door into it. nginx calls the handlers
//! below for every event of a client or Redis connection; each enters the
//! state exactly once through `with`, so there is one mutable path to each
//! piece at a time: sessions live in a slab and are reached by key, rooms
//! and their Redis link by endpoint index. What must happen outside the
//! state (closing a connection, which runs nginx's pool cleanups and with
//! them `session_cleanup`) is carried out after `with` returns.

use core::ffi::c_void;
use core::ptr;

use ngx::ffi::{ngx_connection_t, ngx_event_t, ngx_http_request_t, NGX_LOG_ALERT, NGX_LOG_WARN};
use ngx::ngx_log_error;
use wschat_core::slab::{Key, Slab};

use crate::conf::{self, LocConf, MainConf};
use crate::metrics::{self, Counter, Gauge, PublishStatus};
use crate::publish::{self, Outgoing, Refused};
use crate::redis_link::{Handlers, Role, Wake};
use crate::request_ctx::RequestCtx;
use crate::rooms::Rooms;
use crate::session::{self, close, Finish, Session, Step, Upgrade};
use crate::transport::{self, Transport};

struct Worker {
    sessions: Slab<Session>,
    /// One per configured Redis endpoint, made on first use, so workers
    /// that never see a chat client hold no Redis connection.
    rooms: Vec<Option<Rooms>>,
}

static mut WORKER: Option<Worker> = None;
/// Set while `with` lends the state out.
static mut BUSY: bool = false;

fn cycle_log() -> *mut ngx::ffi::ngx_log_t {
    // SAFETY: ngx_cycle is the worker's cycle; its log lives as long.
    unsafe { (*ngx::ffi::ngx_cycle).log }
}

fn with<T>(f: impl FnOnce(&mut Worker) -> T) -> Option<T> {
    // SAFETY: nginx runs a worker's handlers one at a time on one thread;
    // BUSY refuses a second borrow while one is lent out.
    unsafe {
        if *ptr::addr_of!(BUSY) {
            ngx_log_error!(
                NGX_LOG_ALERT,
                cycle_log(),
                "websocket_chat: worker state entered twice"
            );
            return None;
        }
        let worker = (*ptr::addr_of_mut!(WORKER)).as_mut()?;
        *ptr::addr_of_mut!(BUSY) = true;
        let out = f(worker);
        *ptr::addr_of_mut!(BUSY) = false;
        Some(out)
    }
}

pub fn init() {
    crate::ids::init();
    // SAFETY: nginx's process globals, read on its own thread.
    let (process, pid) = unsafe { (ngx::ffi::ngx_process, ngx::ffi::ngx_pid) };
    let counted = matches!(
        process as u32,
        ngx::ffi::NGX_PROCESS_WORKER | ngx::ffi::NGX_PROCESS_SINGLE
    );
    if counted && !metrics::claim(pid as u32) {
        ngx_log_error!(
            NGX_LOG_WARN,
            cycle_log(),
            "websocket_chat: no free slot in the status zone; this worker is not counted"
        );
    }
    // SAFETY: called once per worker before any request is served.
    unsafe {
        *ptr::addr_of_mut!(WORKER) = Some(Worker {
            sessions: Slab::new(),
            rooms: Vec::new(),
        })
    };
}

/// Closes every session (1001) before the Redis links go, so the worker
/// exits with no socket open and no session pointing at a freed link.
pub fn shutdown() {
    for finish in with(Worker::close_all).unwrap_or_default() {
        // SAFETY: the state is not borrowed; each connection is live.
        unsafe { finish.run() };
    }
    // Only a fast shutdown leaves publishes waiting (a graceful one waits
    // for them): they are answered 503 rather than left as open sockets.
    let waiting = with(|w| {
        (w.rooms.iter_mut().flatten())
            .flat_map(Rooms::abandon_publishes)
            .collect::<Vec<_>>()
    });
    for r in waiting.unwrap_or_default() {
        // SAFETY: a waiting request is live until finalized; the state is
        // not borrowed, and its cleanup finds nothing left to forget.
        unsafe { publish::abandon(r.as_ptr()) };
    }
    // SAFETY: as in `init`; nothing refers to the state any more.
    unsafe { *ptr::addr_of_mut!(WORKER) = None };
    metrics::release();
}

/// Takes over an upgraded request as a session.
///
/// # Safety
/// `r` must be a main request whose 101 header has been sent, with its
/// reference count raised for the session.
pub unsafe fn start_session(
    r: *mut ngx_http_request_t,
    main: &'static MainConf,
    conf: &'static LocConf,
    upgrade: Upgrade,
) -> Result<(), ()> {
    // SAFETY: as the caller promises.
    let started = with(|w| unsafe { w.start_session(r, main, conf, upgrade) });
    match started {
        Some(Ok(finish)) => {
            if let Some(finish) = finish {
                // SAFETY: the state is not borrowed; the connection is live.
                unsafe { finish.run() };
            }
            Ok(())
        }
        _ => Err(()),
    }
}

/// Hands a checked message from `websocket_chat_publish` to its room
/// layer; the request waits there for Redis.
pub fn publish(
    r: *mut ngx_http_request_t,
    conf: &'static LocConf,
    outgoing: &Outgoing,
    sid: &str,
) -> Result<(), Refused> {
    let unavailable = || {
        Refused::new(
            PublishStatus::Unavailable,
            "redis_unavailable",
            "Redis is unreachable and the queue to it is full",
        )
    };
    // SAFETY: r is live (the caller's body handler).
    let main = conf::main_conf(unsafe { &*r }).ok_or_else(unavailable)?;
    let key = with(|w| {
        let rooms = w.rooms(main, conf.redis()).ok_or_else(unavailable)?;
        rooms
            .publish(r, conf, outgoing, sid)
            .map_err(|_| unavailable())
    })
    .unwrap_or_else(|| Err(unavailable()))?;
    // SAFETY: r is live; its context was made before the message was sent.
    if let Some(ctx) = unsafe { RequestCtx::of(r) } {
        ctx.endpoint = conf.redis();
        ctx.pending = key.to_raw();
    }
    Ok(())
}

/// A waiting publish's request is gone before Redis answered.
pub fn forget_publish(endpoint: usize, key: u64) {
    with(|w| {
        if let (Some(rooms), Some(key)) = (
            w.rooms.get_mut(endpoint).and_then(Option::as_mut),
            Key::from_raw(key),
        ) {
            rooms.forget_publish(key);
        }
    });
}

static LINK_HANDLERS: Handlers = Handlers {
    read: [Some(link_read::<true>), Some(link_read::<false>)],
    write: [Some(link_write::<true>), Some(link_write::<false>)],
    retry: [Some(link_retry::<true>), Some(link_retry::<false>)],
    tls: [Some(link_tls::<true>), Some(link_tls::<false>)],
    tick: Some(link_tick),
};

impl Worker {
    fn rooms(&mut self, main: &'static MainConf, index: usize) -> Option<&mut Rooms> {
        let endpoint = main.endpoints.get(index)?;
        if self.rooms.len() <= index {
            self.rooms
                .resize_with(main.endpoints.len().max(index + 1), || None);
        }
        let rooms = self.rooms[index].get_or_insert_with(|| {
            let transport = Transport::new(endpoint, main, index, cycle_log(), &LINK_HANDLERS);
            Rooms::new(transport, (Some(rooms_flush), index))
        });
        Some(rooms)
    }

    /// # Safety
    /// As for the free function `start_session`.
    unsafe fn start_session(
        &mut self,
        r: *mut ngx_http_request_t,
        main: &'static MainConf,
        conf: &'static LocConf,
        upgrade: Upgrade,
    ) -> Result<Option<Finish>, ()> {
        self.rooms(main, conf.redis()).ok_or(())?;
        let key = self.sessions.next_key();
        // SAFETY: as the caller promises.
        let session = unsafe { Session::new(key, r, conf, upgrade) };
        self.sessions.insert(session);
        metrics::count(Counter::SessionsOpened, 1);
        metrics::adjust(Gauge::Connections, 1);
        let s = self.sessions.get_mut(key).ok_or(())?;
        let read = Some(session_read::<true> as unsafe extern "C" fn(*mut ngx_event_t));
        let write = Some(session_write::<true> as unsafe extern "C" fn(*mut ngx_event_t));
        // SAFETY: as the caller promises; the slab keeps the session under
        // `key` until session_cleanup removes it.
        if unsafe { s.attach(read, write, Some(session_cleanup)) }.is_err() {
            if let Some(s) = self.sessions.remove(key) {
                s.count_end();
            }
            return Err(());
        }
        let rooms = (self.rooms.get_mut(s.endpoint))
            .and_then(Option::as_mut)
            .ok_or(())?;
        rooms.join(s);
        if s.frees_request_early() {
            // The request can only go once nginx is done with it, after this
            // content handler: the write handler frees it.
            s.wake_writer();
        }
        // Bytes may already be waiting behind the handshake.
        let step = s.on_read(&mut rooms.transport, false);
        Ok(self.conclude(key, step))
    }

    /// Carries out a session's step, flushes it, and hands the link's
    /// events to the rooms. Returns the connection to end, if it is over.
    fn conclude(&mut self, key: Key, step: Step) -> Option<Finish> {
        let s = self.sessions.get_mut(key)?;
        let rooms = self.rooms.get_mut(s.endpoint)?.as_mut()?;
        let step = match step {
            Step::Close(code, reason) => {
                rooms.close(s, code, reason);
                s.flush()
            }
            Step::Flush => s.flush(),
            Step::Finish => Step::Finish,
        };
        let finish = (step == Step::Finish).then(|| s.finish());
        rooms.handle_events(&mut self.sessions);
        finish
    }

    fn session_read(&mut self, key: Key, timedout: bool) -> Option<Finish> {
        let s = self.sessions.get_mut(key)?;
        let rooms = self.rooms.get_mut(s.endpoint)?.as_mut()?;
        let step = s.on_read(&mut rooms.transport, timedout);
        self.conclude(key, step)
    }

    fn session_write(&mut self, key: Key, timedout: bool, holds_request: bool) -> Option<Finish> {
        let s = self.sessions.get_mut(key)?;
        if holds_request && s.frees_request_early() {
            let read = Some(session_read::<false> as unsafe extern "C" fn(*mut ngx_event_t));
            let write = Some(session_write::<false> as unsafe extern "C" fn(*mut ngx_event_t));
            // SAFETY: called from the write event handler, outside nginx's
            // processing of the request.
            unsafe { s.release_request(read, write) };
        }
        let step = s.on_write(timedout);
        self.conclude(key, step)
    }

    fn remove_session(&mut self, key: Key) {
        let Some(mut s) = self.sessions.remove(key) else {
            return;
        };
        s.count_end();
        if let Some(rooms) = self.rooms.get_mut(s.endpoint).and_then(Option::as_mut) {
            rooms.leave(&mut s);
            rooms.handle_events(&mut self.sessions);
        }
    }

    fn link_wake(&mut self, token: usize, role: Role, wake: Wake) {
        let (index, shard) = transport::untoken(token);
        if let Some(rooms) = self.rooms.get_mut(index).and_then(Option::as_mut) {
            rooms.transport.on_wake(shard, role, wake);
            rooms.handle_events(&mut self.sessions);
        }
    }

    fn close_all(&mut self) -> Vec<Finish> {
        let mut finishes = Vec::new();
        for key in self.sessions.keys() {
            let Some(s) = self.sessions.get_mut(key) else {
                continue;
            };
            if let Some(rooms) = self.rooms.get_mut(s.endpoint).and_then(Option::as_mut) {
                rooms.close(s, close::GOING_AWAY, close::SHUTDOWN);
            }
            // The close frame goes if the socket takes it; the worker exits
            // either way.
            let _ = s.flush();
            finishes.push(s.finish());
        }
        finishes
    }
}

/// Runs a session handler's work on the state, then ends its connection if
/// that is what came of it.
fn session_event(work: impl FnOnce(&mut Worker) -> Option<Finish>) {
    if let Some(Some(finish)) = with(work) {
        // SAFETY: the state is not borrowed; the connection is live.
        unsafe { finish.run() };
    }
}

/// The session key behind a client connection's event, and whether the
/// event timed out (the flag is cleared).
///
/// # Safety
/// `ev` must be a live event of a connection a session attached to, and
/// `holds_request` say where its key is (see `session::key_of_connection`).
unsafe fn session_event_of(ev: *mut ngx_event_t, holds_request: bool) -> (Option<Key>, bool) {
    // SAFETY: as the caller promises.
    unsafe {
        let c = (*ev).data.cast::<ngx_connection_t>();
        let timedout = (*ev).timedout() != 0;
        (*ev).set_timedout(0);
        (session::key_of_connection(c, holds_request), timedout)
    }
}

/// The read handler of a session's connection; `HOLDS_REQUEST` says where
/// it finds the session's key.
unsafe extern "C" fn session_read<const HOLDS_REQUEST: bool>(ev: *mut ngx_event_t) {
    // SAFETY: nginx calls this for a connection a session attached to.
    if let (Some(key), timedout) = unsafe { session_event_of(ev, HOLDS_REQUEST) } {
        session_event(|w| w.session_read(key, timedout));
    }
}

unsafe extern "C" fn session_write<const HOLDS_REQUEST: bool>(ev: *mut ngx_event_t) {
    // SAFETY: as in session_read.
    if let (Some(key), timedout) = unsafe { session_event_of(ev, HOLDS_REQUEST) } {
        session_event(|w| w.session_write(key, timedout, HOLDS_REQUEST));
    }
}

/// The connection pool's cleanup: the session goes with its connection.
unsafe extern "C" fn session_cleanup(data: *mut c_void) {
    if let Some(key) = session::key_of(data) {
        with(|w| w.remove_session(key));
    }
}

fn role(sub: bool) -> Role {
    if sub {
        Role::Sub
    } else {
        Role::Cmd
    }
}

/// The link token a Redis connection's handlers find in `c->data`.
///
/// # Safety
/// `ev` must be an event of a connection opened by a `Link`.
unsafe fn token_of(ev: *mut ngx_event_t) -> usize {
    // SAFETY: the Link stored its token in c->data when connecting.
    unsafe { (*(*ev).data.cast::<ngx_connection_t>()).data as usize }
}

unsafe extern "C" fn link_read<const SUB: bool>(ev: *mut ngx_event_t) {
    // SAFETY: nginx calls this for the read event set up by a Link.
    let (token, wake) = unsafe {
        let wake = if (*ev).timedout() != 0 {
            (*ev).set_timedout(0);
            Wake::Timer
        } else {
            Wake::Read
        };
        (token_of(ev), wake)
    };
    with(|w| w.link_wake(token, role(SUB), wake));
}

unsafe extern "C" fn link_write<const SUB: bool>(ev: *mut ngx_event_t) {
    // SAFETY: as for link_read.
    let token = unsafe { token_of(ev) };
    with(|w| w.link_wake(token, role(SUB), Wake::Write));
}

unsafe extern "C" fn link_retry<const SUB: bool>(ev: *mut ngx_event_t) {
    // SAFETY: arm_retry stored the link's token in the timer's data.
    let token = unsafe { (*ev).data as usize };
    with(|w| w.link_wake(token, role(SUB), Wake::Retry));
}

unsafe extern "C" fn link_tls<const SUB: bool>(c: *mut ngx_connection_t) {
    // SAFETY: the Link stored its token in c->data when connecting.
    let token = unsafe { (*c).data as usize };
    with(|w| w.link_wake(token, role(SUB), Wake::Tls));
}

unsafe extern "C" fn link_tick(ev: *mut ngx_event_t) {
    // SAFETY: start_tick stored the link's token in the timer's data.
    let token = unsafe { (*ev).data as usize };
    with(|w| w.link_wake(token, Role::Cmd, Wake::Tick));
}

unsafe extern "C" fn rooms_flush(ev: *mut ngx_event_t) {
    // SAFETY: Rooms::new stored its endpoint index in the clock's data.
    let index = unsafe { (*ev).data as usize };
    with(|w| {
        if let Some(rooms) = w.rooms.get_mut(index).and_then(Option::as_mut) {
            rooms.flush_due(&mut w.sessions);
        }
    });
}
