//! One upgraded client connection: frames in (through tungstenite), events
//! out (through the send queue), membership in one room, and the close
//! handshake. Driven by the connection's own nginx read/write events.

use core::ffi::c_void;
use core::ptr::{self, NonNull};
use std::rc::Rc;

use ngx::ffi::{
    ngx_connection_t, ngx_current_msec, ngx_event_t, ngx_handle_read_event, ngx_handle_write_event,
    ngx_http_close_connection, ngx_http_connection_t, ngx_http_free_request,
    ngx_http_output_filter, ngx_http_request_t, ngx_msec_t, ngx_pfree, ngx_pool_cleanup_add,
    NGX_ERROR, NGX_LOG_INFO, NGX_OK,
};
use ngx::http::{HttpModuleLocationConf, NgxHttpCoreModule};
use ngx::ngx_log_error;
use tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};

use crate::client_io::{self, ClientIo};
use crate::conf::{LocConf, LogAt};
use crate::redis_link::Link;
use crate::send_queue::{FlushTo, Flushed};
use crate::{module, time, worker};
use wschat_core::envelope::Status;
use wschat_core::frame_guard::Violation;
use wschat_core::rate::Bucket;
use wschat_core::{envelope, frame};

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
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL: u16 = 1002;
    pub const UNSUPPORTED: u16 = 1003;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
}

pub struct Session {
    /// The HTTP request, while the session holds it: until the session ends
    /// (`websocket_chat_access_log close`) or until the 101 is out (`upgrade`).
    request: Option<NonNull<ngx_http_request_t>>,
    c: *mut ngx_connection_t,
    conf: &'static LocConf,
    ws: WebSocket<ClientIo>,
    link: NonNull<Link>,
    room: Box<str>,
    user: Box<str>,
    /// `None` until the room's subscription is live; then everything the
    /// room publishes reaches this client.
    early: Option<Vec<String>>,
    closing: bool,
    /// A close decided while fanning out, carried out on the next write event.
    pending_close: Option<(u16, &'static str)>,
    /// When the client last sent anything (nginx's millisecond clock).
    last_heard: ngx_msec_t,
    rate: Bucket,
    rejected_in_row: u8,
    /// How long a closing client gets to take its last frames: nginx's
    /// `send_timeout`, read while the request was at hand.
    linger: ngx_msec_t,
}

/// What the read handler should do after looking at the socket.
enum After {
    Flush,
    Close(u16, &'static str),
    Finish,
}

impl Session {
    /// Takes over an upgraded request: `preread` holds bytes the client sent
    /// right behind the handshake, already in nginx's header buffer.
    ///
    /// # Safety
    /// `r` must be a main request whose 101 header has been sent, with its
    /// reference count raised for this session.
    pub unsafe fn start(
        r: *mut ngx_http_request_t,
        conf: &'static LocConf,
        link: NonNull<Link>,
        room: String,
        user: String,
        preread: Vec<u8>,
    ) -> Result<(), ()> {
        // SAFETY: r is live (caller); so is its connection.
        let (c, pool) = unsafe { ((*r).connection, (*(*r).connection).pool) };
        // SAFETY: r is live (caller).
        let linger = unsafe { NgxHttpCoreModule::location_conf(&*r) }
            .map_or(60_000, |clcf| clcf.send_timeout);
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            .write_buffer_size(0)
            .max_message_size(Some(conf.max_message()))
            .max_frame_size(Some(conf.max_message()));
        let mut io = ClientIo::new(c, conf.send_buffer(), conf.max_message());
        let preread = io.admit_preread(preread);
        let ws = WebSocket::from_partially_read(io, preread, Role::Server, Some(config));
        let session = Box::into_raw(Box::new(Session {
            request: NonNull::new(r),
            c,
            conf,
            ws,
            link,
            room: room.into(),
            user: user.into(),
            early: Some(Vec::new()),
            closing: false,
            pending_close: None,
            // SAFETY: nginx's clock, read on its own thread.
            last_heard: unsafe { ngx_current_msec },
            rate: Bucket::default(),
            rejected_in_row: 0,
            linger,
        }));

        // SAFETY: the connection pool outlives every use of the session; the
        // cleanup frees it when nginx closes the connection, whatever the path.
        unsafe {
            let cln = ngx_pool_cleanup_add(pool, 0);
            if cln.is_null() {
                drop(Box::from_raw(session));
                return Err(());
            }
            (*cln).handler = Some(free_session);
            (*cln).data = session.cast();
            *(*r).ctx.add(module().ctx_index) = session.cast();

            (*(*c).read).handler = Some(on_read::<ViaRequest>);
            (*(*c).write).handler = Some(on_write::<ViaRequest>);
            // nginx's graceful shutdown visits idle connections with c->close
            // set: that is the hook for the 1001 close.
            (*c).set_idle(1);
            // The heartbeat timer must not keep a shutting-down worker alive.
            (*(*c).read).set_cancelable(1);
            ngx::ffi::ngx_add_timer((*c).read, conf.ping_interval());
        }

        // SAFETY: just allocated; the registry keeps the pointer until Drop.
        let s = unsafe { &mut *session };
        // SAFETY: links live as long as the worker.
        unsafe { (*link.as_ptr()).join(NonNull::from(&mut *s), &s.room) };
        // SAFETY: the session is fully set up; bytes may already be waiting.
        unsafe { handle_read(session) };
        if conf.access_log() == LogAt::Upgrade {
            // The request can only go once nginx is done with it, after this
            // content handler: the write handler frees it.
            s.wake_writer();
        }
        Ok(())
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    /// Whether the room hears of this member's joining and leaving.
    pub fn announces_presence(&self) -> bool {
        self.conf.presence()
    }

    /// Marks the session as live in its room and sends it `welcome`. Returns
    /// what it typed meanwhile (for the link to publish), or `None` if it was
    /// welcomed already.
    pub fn welcome(&mut self) -> Option<Vec<String>> {
        let early = self.early.take()?;
        let event = envelope::welcome(&self.room, &self.user, time::now_ms());
        self.send(frame::text_frame(event.as_bytes()));
        Some(early)
    }

    /// Queues a frame shared with the rest of the room.
    pub fn deliver(&mut self, frame: &Rc<[u8]>) {
        self.send(frame.clone());
    }

    pub fn notify_backlog_full(&mut self) {
        self.notify_error(
            "backlog_full",
            "message not sent: the server's queue to Redis is full",
        );
    }

    fn notify_error(&mut self, code: &str, message: &str) {
        self.notify(Status::Error, code, message);
    }

    /// Sends this client alone an `error` or `notice` event.
    pub fn notify(&mut self, kind: Status, code: &str, message: &str) {
        let event = envelope::status(kind, &self.room, code, message, time::now_ms());
        self.send(frame::text_frame(event.as_bytes()));
    }

    /// Queues a frame and schedules one write for everything queued in this
    /// event-loop turn.
    fn send(&mut self, frame: Rc<[u8]>) {
        if self.closing {
            return;
        }
        if self.ws.get_mut().queue.push(frame).is_err() {
            self.pending_close = Some((close::POLICY, "slow consumer"));
        }
        self.wake_writer();
    }

    /// Schedules the write handler for after the current handler returns.
    fn wake_writer(&self) {
        // SAFETY: c is live while the session is.
        unsafe {
            ngx::ffi::ngx_post_event(
                (*self.c).write,
                ptr::addr_of_mut!(ngx::ffi::ngx_posted_events),
            )
        };
    }

    /// Publishes one chat message, unless the sender is over its rate.
    fn on_text(&mut self, text: &str) -> Result<(), (u16, &'static str)> {
        if let Some(limit) = self.conf.rate() {
            if !self.rate.allow(limit, time::now_ms()) {
                self.rejected_in_row += 1;
                if self.rejected_in_row >= FLOOD_REJECTIONS {
                    return Err((close::POLICY, "rate limit exceeded"));
                }
                self.notify_error(
                    "rate_limited",
                    "message not sent: too many messages, slow down",
                );
                return Ok(());
            }
            self.rejected_in_row = 0;
        }
        let id = worker::next_id();
        let event = envelope::message(&self.room, &self.user, text, time::now_ms(), &id);
        if let Some(early) = &mut self.early {
            if early.len() < EARLY_LIMIT {
                early.push(event);
            } else {
                self.notify_error("not_joined", "message not sent: still joining the room");
            }
            return Ok(());
        }
        // SAFETY: links live as long as the worker.
        let link = unsafe { &mut *self.link.as_ptr() };
        if link.publish(&self.room, &event).is_err() {
            self.notify_backlog_full();
        }
        Ok(())
    }

    /// The heartbeat: pings a quiet client, closes one that stays silent.
    fn on_heartbeat(&mut self) {
        // SAFETY: nginx's clock, read on its own thread.
        let silent = unsafe { ngx_current_msec }.wrapping_sub(self.last_heard);
        let (ping, idle) = (self.conf.ping_interval(), self.conf.idle_timeout());
        if silent >= idle {
            self.begin_close(close::GOING_AWAY, "idle timeout");
            return;
        }
        let next = if silent >= ping {
            self.send(frame::ping_frame(b""));
            ping.min(idle - silent)
        } else {
            ping - silent
        };
        // SAFETY: c is live while the session is.
        unsafe { ngx::ffi::ngx_add_timer((*self.c).read, next) };
    }

    /// Reads and handles every complete frame the socket has.
    fn read_frames(&mut self) -> After {
        loop {
            match self.ws.read() {
                Ok(Message::Text(text)) => {
                    if let Err((code, reason)) = self.on_text(text.as_str()) {
                        return After::Close(code, reason);
                    }
                }
                Ok(Message::Binary(_)) => {
                    return After::Close(close::UNSUPPORTED, "binary messages are not supported")
                }
                Ok(Message::Close(_)) => {
                    // tungstenite has queued the echo of the client's close.
                    let _ = self.ws.flush();
                    self.closing = true;
                    return After::Flush;
                }
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
                Err(WsError::Io(e)) => {
                    if e.kind() == std::io::ErrorKind::WouldBlock {
                        // Pongs owed to the client go out with the next flush.
                        let _ = self.ws.flush();
                        return After::Flush;
                    }
                    return after_io_error(&e);
                }
                Err(WsError::Capacity(CapacityError::MessageTooLong { .. })) => {
                    return After::Close(close::TOO_BIG, "message too big")
                }
                Err(WsError::Utf8(_)) => return After::Close(close::INVALID_DATA, "invalid UTF-8"),
                // The peer went away without a close handshake.
                Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => {
                    return After::Finish
                }
                Err(WsError::Protocol(_)) => {
                    return After::Close(close::PROTOCOL, "protocol error")
                }
                Err(_) => return After::Finish,
            }
        }
    }

    /// Starts the closing handshake from our side: the close frame goes out
    /// after anything already part-way out, and then the connection ends.
    fn begin_close(&mut self, code: u16, reason: &str) {
        if self.closing {
            return;
        }
        let log = self.log();
        ngx_log_error!(
            NGX_LOG_INFO,
            log,
            "websocket_chat: closing session of \"{}\" in \"{}\": {} {}",
            self.user,
            self.room,
            code,
            reason
        );
        let queue = &mut self.ws.get_mut().queue;
        if code == close::POLICY {
            queue.truncate_to_partial();
        }
        queue.push_unbounded(frame::close_frame(code, reason));
        self.closing = true;
        // A closing session takes no further part in its room.
        self.leave_room();
    }

    /// Takes the session out of its room and tells the room, once.
    fn leave_room(&mut self) {
        // SAFETY: links live as long as the worker.
        let link = unsafe { &mut *self.link.as_ptr() };
        let was_member = link.leave(NonNull::from(&mut *self), &self.room);
        if !was_member || self.early.is_some() || !self.conf.presence() {
            return;
        }
        let id = worker::next_id();
        let event = envelope::presence(
            envelope::Presence::Leave,
            &self.room,
            &self.user,
            time::now_ms(),
            &id,
        );
        // Nobody is left to tell if this fails; the link has logged why.
        let _ = link.publish(&self.room, &event);
    }

    fn log(&self) -> *mut ngx::ffi::ngx_log_t {
        // SAFETY: c is live while the session is.
        unsafe { (*self.c).log }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.leave_room();
    }
}

unsafe extern "C" fn free_session(data: *mut c_void) {
    // SAFETY: `data` is the Box leaked in `start`, freed exactly once here.
    drop(unsafe { Box::from_raw(data.cast::<Session>()) });
}

/// Where an event handler finds its session. nginx itself reads `c->data` as
/// the request while the request lives, so the session moves there only
/// once the request is freed.
trait Locate {
    /// Whether the session may still hold its request: only then is there
    /// a request to free on a write event.
    const HOLDS_REQUEST: bool;

    /// # Safety
    /// `c` must be a connection taken over by `Session::start`.
    unsafe fn session(c: *mut ngx_connection_t) -> *mut Session;
}

/// `c->data` is the request; its ctx slot holds the session.
struct ViaRequest;
/// `c->data` is the session.
struct ViaConnection;

impl Locate for ViaRequest {
    const HOLDS_REQUEST: bool = true;

    unsafe fn session(c: *mut ngx_connection_t) -> *mut Session {
        // SAFETY: while the session holds the request, c->data is it.
        unsafe {
            let r = (*c).data.cast::<ngx_http_request_t>();
            (*(*r).ctx.add(module().ctx_index)).cast::<Session>()
        }
    }
}

impl Locate for ViaConnection {
    const HOLDS_REQUEST: bool = false;

    unsafe fn session(c: *mut ngx_connection_t) -> *mut Session {
        // SAFETY: `release_request` stored the session in c->data.
        unsafe { (*c).data.cast::<Session>() }
    }
}

/// The session behind one of its connection's events.
///
/// # Safety
/// `ev` must be a read or write event of a connection taken over by `start`,
/// and `L` the way its handlers are set to find the session.
unsafe fn session_of<L: Locate>(ev: *mut ngx_event_t) -> *mut Session {
    // SAFETY: ev->data of a connection event is the connection.
    unsafe { L::session((*ev).data.cast::<ngx_connection_t>()) }
}

unsafe extern "C" fn on_read<L: Locate>(ev: *mut ngx_event_t) {
    // SAFETY: nginx calls this for the connection `start` took over.
    let s = unsafe { session_of::<L>(ev) };
    // SAFETY: the session is live until `finish`.
    unsafe {
        let c = (*s).c;
        if (*c).close() != 0 && (*c).error() != 0 {
            // worker_shutdown_timeout has passed: no more waiting.
            finish(s);
            return;
        }
        if (*c).close() != 0 {
            (*s).begin_close(close::GOING_AWAY, "server shutting down");
            flush(s);
            return;
        }
        if (*ev).timedout() != 0 {
            (*ev).set_timedout(0);
            (*s).on_heartbeat();
            flush(s);
            return;
        }
        (*s).last_heard = ngx_current_msec;
        handle_read(s);
    }
}

unsafe extern "C" fn on_write<L: Locate>(ev: *mut ngx_event_t) {
    // SAFETY: as in on_read.
    let s = unsafe { session_of::<L>(ev) };
    // SAFETY: the session is live until `finish`.
    unsafe {
        if L::HOLDS_REQUEST && (*s).conf.access_log() == LogAt::Upgrade {
            release_request(s);
        }
        if (*ev).timedout() != 0 {
            finish(s);
            return;
        }
        if let Some((code, reason)) = (*s).pending_close.take() {
            (*s).begin_close(code, reason);
        }
        flush(s);
    }
}

/// Our own I/O errors carry a close code; any other means the connection is
/// gone.
fn after_io_error(e: &std::io::Error) -> After {
    let inner = e.get_ref();
    if let Some(v) = inner.and_then(|e| e.downcast_ref::<Violation>()) {
        return After::Close(v.close_code(), v.reason());
    }
    if inner.is_some_and(|e| e.is::<client_io::SlowConsumer>()) {
        return After::Close(close::POLICY, "slow consumer");
    }
    After::Finish
}

/// # Safety
/// `s` must be a live session.
unsafe fn handle_read(s: *mut Session) {
    // SAFETY: live session (caller).
    let session = unsafe { &mut *s };
    if session.closing {
        // Nothing more is read once the close frame is queued; the client's
        // own close or EOF just ends the connection sooner.
        // SAFETY: c is live.
        unsafe { drain_input(s) };
        return;
    }
    match session.read_frames() {
        After::Flush => {}
        After::Close(code, reason) => session.begin_close(code, reason),
        After::Finish => {
            // SAFETY: live session.
            unsafe { finish(s) };
            return;
        }
    }
    // SAFETY: c is live.
    if unsafe { ngx_handle_read_event((*session.c).read, 0) } != NGX_OK as isize {
        // SAFETY: live session.
        unsafe { finish(s) };
        return;
    }
    // SAFETY: live session.
    unsafe { flush(s) };
}

/// Reads and discards until EOF after our close frame; EOF ends the session.
///
/// # Safety
/// `s` must be a live session.
unsafe fn drain_input(s: *mut Session) {
    // SAFETY: live session (caller).
    let session = unsafe { &mut *s };
    let c = session.c;
    // SAFETY: c is live while the session is.
    if session.ws.get_mut().discard_input().is_err()
        || unsafe { ngx_handle_read_event((*c).read, 0) } != NGX_OK as isize
    {
        // SAFETY: live session.
        unsafe { finish(s) };
    }
}

/// Sends what is queued; ends the session once a close has drained.
///
/// # Safety
/// `s` must be a live session.
unsafe fn flush(s: *mut Session) {
    // SAFETY: live session (caller).
    let session = unsafe { &mut *s };
    let c = session.c;
    if let Some(r) = session.request.map(NonNull::as_ptr) {
        // SAFETY: a held request is live; the 101 header may still sit in its
        // output chain if the socket was full when it was sent, and must go
        // first.
        unsafe {
            if !(*r).out.is_null()
                && ngx_http_output_filter(r, ptr::null_mut()) == NGX_ERROR as isize
            {
                finish(s);
                return;
            }
            if !(*r).out.is_null() {
                arm_write(s);
                return;
            }
        }
    }
    // SAFETY: c is live.
    match unsafe { session.ws.get_mut().queue.flush(c, usize::MAX) } {
        Err(_) => {
            // SAFETY: live session.
            unsafe { finish(s) };
        }
        Ok(Flushed::All) if session.closing => {
            // SAFETY: live session.
            unsafe { finish(s) };
        }
        Ok(Flushed::All) => {
            // SAFETY: c is live.
            unsafe {
                if (*(*c).write).timer_set() != 0 {
                    ngx::ffi::ngx_del_timer((*c).write);
                }
            }
        }
        Ok(Flushed::Partly) => {
            // SAFETY: live session.
            unsafe { arm_write(s) };
        }
    }
}

/// Waits for the socket to take more; a closing session waits only so long.
///
/// # Safety
/// `s` must be a live session.
unsafe fn arm_write(s: *mut Session) {
    // SAFETY: live session (caller).
    unsafe {
        let c = (*s).c;
        if ngx_handle_write_event((*c).write, 0) != NGX_OK as isize {
            finish(s);
            return;
        }
        if (*s).closing {
            // A closing client gets nginx's `send_timeout` to take its last
            // frames, the close frame among them.
            ngx::ffi::ngx_add_timer((*c).write, (*s).linger);
        }
    }
}

/// Frees the HTTP request once the 101 has left: nginx writes the
/// access-log line now, and the request's pool and header buffers (8 KB or
/// more per connection) go back while the session goes on.
///
/// # Safety
/// `s` must be a live session, called from an event handler (never inside
/// nginx's processing of the request).
unsafe fn release_request(s: *mut Session) {
    // SAFETY: live session (caller); a held request is live.
    unsafe {
        let session = &mut *s;
        let Some(r) = session.request.map(NonNull::as_ptr) else {
            return;
        };
        let c = session.c;
        if !(*r).out.is_null() || (*c).buffered() != 0 || (*r).count() != 1 || (*r).blocked() != 0 {
            return;
        }
        let hc = (*r).http_connection;
        (*r).set_count(0);
        session.request = None;
        ngx_http_free_request(r, 0);
        // Set by nginx for a closing connection; this one stays open, and
        // its error-log lines should not say "while closing request".
        (*c).set_destroyed(0);
        (*(*c).log).action = ptr::null_mut();
        (*c).data = s.cast();
        (*(*c).read).handler = Some(on_read::<ViaConnection>);
        (*(*c).write).handler = Some(on_write::<ViaConnection>);
        free_header_buffers(c, hc);
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

/// Ends the session: nginx writes the access-log line if the request is
/// still held and frees it, then closes the connection (and with its pool
/// frees the session).
///
/// # Safety
/// `s` must be a live session; it is freed on return.
unsafe fn finish(s: *mut Session) {
    // SAFETY: the session is live until its connection is closed, which is
    // the last thing done here. With a request, this is
    // ngx_http_close_request for an HTTP/1.x request, spelled out because
    // older nginx (1.22) does not export it.
    unsafe {
        let c = (*s).c;
        if let Some(r) = (*s).request.map(NonNull::as_ptr) {
            let r = (*r).main;
            let count = (*r).count();
            (*r).set_count(count.saturating_sub(1));
            if count > 1 || (*r).blocked() != 0 {
                return;
            }
            ngx_http_free_request(r, 0);
        }
        ngx_http_close_connection(c);
    }
}
