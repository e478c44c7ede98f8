//! One TCP (or unix-socket) connection to Redis, opened with nginx's
//! `ngx_event_connect_peer`, optionally over TLS on nginx's own SSL layer
//! (as `proxy_pass https://` does), and driven by nginx read/write events.
//! This is the thin FFI layer; what the bytes mean is `redis_link`'s
//! business.

use core::cell::Cell;
use core::ffi::{c_int, c_void, CStr};
use core::{mem, ptr};
use std::io;
use std::rc::Rc;

use ngx::ffi::{
    ngx_close_connection, ngx_connection_handler_pt, ngx_connection_t, ngx_create_pool,
    ngx_destroy_pool, ngx_event_connect_peer, ngx_event_get_peer, ngx_event_handler_pt,
    ngx_event_t, ngx_handle_read_event, ngx_handle_write_event, ngx_log_t, ngx_peer_connection_t,
    ngx_ssl_check_host, ngx_ssl_create_connection, ngx_ssl_handshake, ngx_ssl_shutdown, ngx_ssl_t,
    ngx_str_t, sockaddr, NGX_AGAIN, NGX_OK, NGX_SSL_BUFFER, NGX_SSL_CLIENT,
};

use ngx::ffi::{
    ngx_int_t, ngx_resolve_name, ngx_resolve_name_done, ngx_resolve_start, ngx_resolver_ctx_t,
    ngx_resolver_strerror, ngx_resolver_t,
};

use crate::send_queue::{FlushTo, Flushed, Limit, SendFailed, SendQueue};

/// The pool a TLS connection's state is allocated from.
const TLS_POOL: usize = 256;

/// How much to read from Redis per `recv` call.
const READ_CHUNK: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Down,
    Connecting,
    /// Connected; the TLS handshake is under way.
    Handshaking,
    Up,
}

/// Why a TLS connection was not accepted.
#[derive(Debug)]
pub enum TlsError {
    Setup,
    Handshake,
    TimedOut,
    /// The chain did not verify, in OpenSSL's words.
    Certificate(String),
    /// The certificate is not for the name checked.
    Name,
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsError::Setup => f.write_str("TLS setup failed"),
            TlsError::Handshake => f.write_str("TLS handshake failed"),
            TlsError::TimedOut => f.write_str("TLS handshake timed out"),
            TlsError::Certificate(why) => write!(f, "certificate verify error: {why}"),
            TlsError::Name => f.write_str("certificate does not match the server name"),
        }
    }
}

#[derive(Debug)]
pub enum ReadOutcome {
    /// Some bytes were appended; the socket has no more for now.
    Data,
    /// Redis closed the connection or it failed.
    Closed,
}

pub struct PeerConn {
    pc: ngx_peer_connection_t,
    sockaddr: Box<[u8]>,
    name_text: Box<[u8]>,
    name: ngx_str_t,
    log: ngx_log_t,
    pub state: State,
    pub queue: SendQueue,
    pub inbuf: Vec<u8>,
    /// Fires the next reconnect attempt; cancelable so it never holds a
    /// worker that is shutting down.
    pub retry: ngx_event_t,
    /// The handlers given to `connect`, put back after a TLS handshake
    /// (which borrows the connection's events meanwhile).
    handlers: (ngx_event_handler_pt, ngx_event_handler_pt),
    /// Where a name lookup through nginx's resolver reports (shared with
    /// the resolver's callback, hence cells).
    lookup: Rc<Lookup>,
}

/// A name lookup in flight or just ended.
pub struct Lookup {
    ctx: Cell<*mut ngx_resolver_ctx_t>,
    /// The address found (port filled in), or the resolver's error.
    result: Cell<Option<Result<Box<[u8]>, ngx_int_t>>>,
    /// Set while `ngx_resolve_name` runs: an answer from the resolver's
    /// cache comes back inside that call, not as an event.
    in_call: Cell<bool>,
    /// Posted when the answer comes later: the link's reconnect event.
    wake: Cell<*mut ngx_event_t>,
    port: Cell<u16>,
}

impl Default for Lookup {
    fn default() -> Self {
        Lookup {
            ctx: Cell::new(ptr::null_mut()),
            result: Cell::new(None),
            in_call: Cell::new(false),
            wake: Cell::new(ptr::null_mut()),
            port: Cell::new(0),
        }
    }
}

/// How a lookup went.
pub enum Resolved {
    /// The connection will be woken (its reconnect event) once the answer
    /// is in.
    Pending,
    /// The address to connect to is now the one found.
    Found,
    /// The resolver failed, in its words: the old address is kept.
    Failed(String),
}

impl PeerConn {
    pub fn new(sockaddr: &[u8], name: &str, log: *const ngx_log_t, backlog: usize) -> Self {
        PeerConn {
            // SAFETY: all-zero is the initial state nginx expects for these.
            pc: unsafe { mem::zeroed() },
            sockaddr: sockaddr.into(),
            name_text: name.as_bytes().into(),
            name: ngx_str_t::default(),
            // SAFETY: the worker's cycle log outlives every connection; a copy
            // keeps per-connection fields from leaking into the cycle's log.
            log: unsafe { ptr::read(log) },
            state: State::Down,
            // A command longer than the whole backlog (a long message, a
            // small backlog) still goes when the queue is within it.
            queue: SendQueue::new(Limit {
                oversized: true,
                ..Limit::strict(backlog)
            }),
            inbuf: Vec::new(),
            // SAFETY: an all-zero event is an idle, unarmed one; arm_retry
            // fills in what nginx needs before it is used.
            retry: unsafe { mem::zeroed() },
            handlers: (None, None),
            lookup: Rc::default(),
        }
    }

    /// Looks `host` up through nginx's resolver before the next connect
    /// (a managed Redis changes address on failover).
    ///
    /// # Safety
    /// `resolver` must be nginx's, alive as long as the worker; `host` must
    /// stay in place until the lookup ends (the worker's configuration).
    pub unsafe fn resolve(
        &mut self,
        resolver: *mut ngx_resolver_t,
        host: &'static [u8],
        port: u16,
        timeout: ngx::ffi::ngx_msec_t,
    ) -> Resolved {
        let answer = self.take_lookup();
        if !matches!(answer, Resolved::Pending) || !self.lookup.ctx.get().is_null() {
            return answer;
        }
        // SAFETY: as the caller promises; a start of NULL or -1 (no
        // resolver) means none was made.
        unsafe {
            let ctx = ngx_resolve_start(resolver, ptr::null_mut());
            if ctx.is_null() || ctx as isize == -1 {
                return Resolved::Failed("no resolver".into());
            }
            (*ctx).name = ngx_str_t {
                len: host.len(),
                data: host.as_ptr().cast_mut(),
            };
            (*ctx).handler = Some(lookup_done);
            (*ctx).data = Rc::as_ptr(&self.lookup).cast_mut().cast();
            (*ctx).timeout = timeout;
            self.lookup.ctx.set(ctx);
            self.lookup.port.set(port);
            self.lookup.wake.set(&mut self.retry);
            self.lookup.in_call.set(true);
            let rc = ngx_resolve_name(ctx);
            self.lookup.in_call.set(false);
            if rc != NGX_OK as isize {
                // nginx has freed the context.
                self.lookup.ctx.set(ptr::null_mut());
                return Resolved::Failed("resolver error".into());
            }
        }
        self.take_lookup()
    }

    /// What the last lookup found, if it has ended.
    pub fn take_lookup(&mut self) -> Resolved {
        match self.lookup.result.take() {
            None => Resolved::Pending,
            Some(Ok(addr)) => {
                self.sockaddr = addr;
                Resolved::Found
            }
            Some(Err(state)) => {
                // SAFETY: nginx returns a static message for any state.
                let why = unsafe { CStr::from_ptr(ngx_resolver_strerror(state)) };
                Resolved::Failed(why.to_string_lossy().into_owned())
            }
        }
    }

    /// The name nginx's connection lines give the peer.
    pub fn named(mut self, name: &str) -> Self {
        self.rename(name);
        self
    }

    pub fn rename(&mut self, name: &str) {
        self.name_text = name.as_bytes().into();
        if !self.name.data.is_null() {
            // A live connection's pc.name points at this field.
            self.name = ngx_str_t {
                len: self.name_text.len(),
                data: self.name_text.as_mut_ptr(),
            };
        }
    }

    /// Where the next connection goes (a cluster's slot moved to another
    /// node, or a replica took over).
    pub fn set_sockaddr(&mut self, sockaddr: Box<[u8]>) {
        self.sockaddr = sockaddr;
    }

    /// The address connections go to now, as a log shows it.
    pub fn address(&self) -> String {
        let mut text = [0u8; 128];
        // SAFETY: sockaddr holds a socket address of its length; nginx writes
        // at most text.len() bytes.
        let n = unsafe {
            ngx::ffi::ngx_sock_ntop(
                self.sockaddr.as_ptr().cast_mut().cast(),
                self.sockaddr.len() as _,
                text.as_mut_ptr(),
                text.len(),
                1,
            )
        };
        String::from_utf8_lossy(&text[..n]).into_owned()
    }

    fn connection(&self) -> Option<*mut ngx_connection_t> {
        (!self.pc.connection.is_null()).then_some(self.pc.connection)
    }

    /// Starts connecting. `data` is what the event handlers will find in
    /// `c->data`. Returns the new state (`Down` if the attempt failed at once).
    ///
    /// # Safety
    /// `self` must not move while the connection exists, and the handlers must
    /// treat `data` accordingly.
    pub unsafe fn connect(
        &mut self,
        data: *mut c_void,
        read: ngx_event_handler_pt,
        write: ngx_event_handler_pt,
    ) -> State {
        self.name = ngx_str_t {
            len: self.name_text.len(),
            data: self.name_text.as_mut_ptr(),
        };
        self.pc.sockaddr = self.sockaddr.as_mut_ptr().cast::<sockaddr>();
        self.pc.socklen = self.sockaddr.len() as _;
        self.pc.name = &mut self.name;
        self.pc.get = Some(ngx_event_get_peer);
        self.pc.log = &mut self.log;
        self.pc
            .set_log_error(ngx::ffi::ngx_connection_log_error_e_NGX_ERROR_ERR);
        self.pc.tries = 1;

        // SAFETY: pc is fully initialised and points into self, which the
        // caller keeps in place.
        let rc = unsafe { ngx_event_connect_peer(&mut self.pc) };
        if rc != NGX_OK as isize && rc != NGX_AGAIN as isize {
            self.pc.connection = ptr::null_mut();
            self.state = State::Down;
            return self.state;
        }
        let c = self.pc.connection;
        self.handlers = (read, write);
        // SAFETY: on NGX_OK and NGX_AGAIN nginx hands us a live connection.
        unsafe {
            (*c).data = data;
            (*(*c).read).handler = read;
            (*(*c).write).handler = write;
        }
        self.state = if rc == NGX_OK as isize {
            State::Up
        } else {
            State::Connecting
        };
        self.state
    }

    /// Starts TLS on the connected socket, sending `name` as SNI when there
    /// is one. `Handshaking` means `done` is called once it has finished
    /// (or failed, or the connection's timer fired).
    ///
    /// # Safety
    /// `ssl` must be a client context that outlives the connection.
    pub unsafe fn start_tls(
        &mut self,
        ssl: *mut ngx_ssl_t,
        sni: Option<&CStr>,
        done: ngx_connection_handler_pt,
    ) -> Result<State, TlsError> {
        let c = self.connection().ok_or(TlsError::Setup)?;
        // SAFETY: c is a live, connected socket; ssl outlives it (caller).
        unsafe {
            // nginx's TLS state lives in the connection's pool, which a peer
            // connection does not get by itself (close destroys it).
            if (*c).pool.is_null() {
                (*c).pool = ngx_create_pool(TLS_POOL, (*c).log);
                if (*c).pool.is_null() {
                    return Err(TlsError::Setup);
                }
            }
            let flags = (NGX_SSL_BUFFER | NGX_SSL_CLIENT) as ngx::ffi::ngx_uint_t;
            if ngx_ssl_create_connection(ssl, c, flags) != NGX_OK as isize {
                return Err(TlsError::Setup);
            }
            if let Some(name) = sni {
                // SSL_set_tlsext_host_name is a macro over SSL_ctrl.
                ngx::ffi::SSL_ctrl(
                    (*(*c).ssl).connection,
                    ngx::ffi::SSL_CTRL_SET_TLSEXT_HOSTNAME as _,
                    ngx::ffi::TLSEXT_NAMETYPE_host_name as _,
                    name.as_ptr().cast_mut().cast(),
                );
            }
            // Not up until the certificate is checked (`finish_tls`), even
            // when the handshake ends in this call.
            self.state = State::Handshaking;
            match ngx_ssl_handshake(c) {
                rc if rc == NGX_AGAIN as isize => {
                    (*(*c).ssl).handler = done;
                    Ok(State::Handshaking)
                }
                rc if rc == NGX_OK as isize => Ok(State::Up),
                _ => Err(TlsError::Handshake),
            }
        }
    }

    /// After the handshake: checks that it succeeded, and (with `verify`)
    /// that the certificate chains to the trusted ones and is for `name`;
    /// then gives the connection's events back to the link.
    pub fn finish_tls(&mut self, verify: bool, name: &[u8]) -> Result<(), TlsError> {
        let c = self.connection().ok_or(TlsError::Handshake)?;
        // SAFETY: c is live; start_tls gave it an SSL connection.
        unsafe {
            if (*(*c).read).timedout() != 0 {
                return Err(TlsError::TimedOut);
            }
            let ssl = (*c).ssl;
            if ssl.is_null() || (*ssl).handshaked() == 0 {
                return Err(TlsError::Handshake);
            }
            if verify {
                let rc = ngx::ffi::SSL_get_verify_result((*ssl).connection);
                if rc != ngx::ffi::X509_V_OK as _ {
                    let why = CStr::from_ptr(ngx::ffi::X509_verify_cert_error_string(rc));
                    return Err(TlsError::Certificate(why.to_string_lossy().into_owned()));
                }
                let mut name = ngx_str_t {
                    len: name.len(),
                    data: name.as_ptr().cast_mut(),
                };
                if ngx_ssl_check_host(c, &mut name) != NGX_OK as isize {
                    return Err(TlsError::Name);
                }
            }
            (*(*c).read).handler = self.handlers.0;
            (*(*c).write).handler = self.handlers.1;
            if (*(*c).read).timer_set() != 0 {
                ngx::ffi::ngx_del_timer((*c).read);
            }
        }
        self.state = State::Up;
        Ok(())
    }

    /// Appends what the socket has to `inbuf`, at most `budget` bytes. When
    /// the budget runs out first, the read event is posted so that the rest
    /// is read on the next turn: with edge-triggered events nothing else
    /// would say that bytes are still waiting.
    pub fn read(&mut self, budget: usize) -> ReadOutcome {
        let Some(c) = self.connection() else {
            return ReadOutcome::Closed;
        };
        let mut taken = 0;
        loop {
            if taken >= budget {
                // SAFETY: c is live; ngx_posted_events is the worker's queue.
                unsafe {
                    ngx::ffi::ngx_post_event(
                        (*c).read,
                        ptr::addr_of_mut!(ngx::ffi::ngx_posted_events),
                    )
                };
                return ReadOutcome::Data;
            }
            // Read into spare capacity: zero-filling 16 KB per read showed up
            // as the largest cost of a delivery under callgrind.
            self.inbuf.reserve(READ_CHUNK);
            let spare = self.inbuf.spare_capacity_mut();
            let want = spare.len().min(budget - taken);
            // SAFETY: c is live; recv writes at most `want` <= spare.len() bytes.
            let n = unsafe {
                let recv = (*c).recv.expect("connections always have recv");
                recv(c, spare.as_mut_ptr().cast(), want)
            };
            if n > 0 {
                taken += n as usize;
                // SAFETY: recv initialised the first n bytes of the spare room.
                unsafe { self.inbuf.set_len(self.inbuf.len() + n as usize) };
                continue;
            }
            if n == NGX_AGAIN as isize {
                // SAFETY: c is live; re-arms the read event where needed.
                if unsafe { ngx_handle_read_event((*c).read, 0) } != NGX_OK as isize {
                    return ReadOutcome::Closed;
                }
                return ReadOutcome::Data;
            }
            return ReadOutcome::Closed;
        }
    }

    /// Sends the first `max_chunks` queued chunks (as far as the socket
    /// takes them); arms the write event if the socket is full.
    pub fn flush(&mut self, max_chunks: usize) -> Result<Flushed, SendFailed> {
        let Some(c) = self.connection() else {
            return Ok(Flushed::Partly);
        };
        if self.state != State::Up {
            return Ok(Flushed::Partly);
        }
        // SAFETY: c is a live connection owned by this PeerConn.
        let flushed = unsafe { self.queue.flush(c, max_chunks) }?;
        // SAFETY: as above.
        if unsafe { ngx_handle_write_event((*c).write, 0) } != NGX_OK as isize {
            return Err(SendFailed);
        }
        Ok(flushed)
    }

    /// Whether a connect that was in progress has failed (checked when the
    /// write event first fires).
    pub fn connect_error(&self) -> Option<io::Error> {
        let c = self.connection()?;
        let mut err: c_int = 0;
        let mut len = mem::size_of::<c_int>() as ngx::ffi::socklen_t;
        // SAFETY: c->fd is an open socket; err/len are valid out-parameters.
        let rc = unsafe {
            ngx::ffi::getsockopt(
                (*c).fd,
                ngx::ffi::SOL_SOCKET as _,
                ngx::ffi::SO_ERROR as _,
                (&mut err as *mut c_int).cast(),
                &mut len,
            )
        };
        if rc == -1 {
            return Some(io::Error::last_os_error());
        }
        (err != 0).then(|| io::Error::from_raw_os_error(err))
    }

    /// Closes the socket (if any) and forgets unsent bytes that belonged to it.
    pub fn close(&mut self) {
        if let Some(c) = self.connection() {
            // SAFETY: c is live and owned by us; nginx frees the TLS state
            // (sending close_notify without waiting for the peer's), then
            // removes the connection's events and timers from every queue.
            unsafe {
                if !(*c).ssl.is_null() {
                    (*(*c).ssl).set_no_wait_shutdown(1);
                    ngx_ssl_shutdown(c);
                }
                let pool = (*c).pool;
                ngx_close_connection(c);
                if !pool.is_null() {
                    ngx_destroy_pool(pool);
                }
            }
            self.pc.connection = ptr::null_mut();
        }
        self.state = State::Down;
        self.inbuf.clear();
    }

    /// Posts the connection's write event so queued bytes leave at the end
    /// of this event-loop turn, batched with whatever else is queued by then.
    pub fn schedule_flush(&mut self) {
        if let Some(c) = self.connection() {
            if self.state == State::Up {
                // SAFETY: c is live; ngx_posted_events is the worker's queue.
                unsafe {
                    ngx::ffi::ngx_post_event(
                        (*c).write,
                        ptr::addr_of_mut!(ngx::ffi::ngx_posted_events),
                    )
                };
            }
        }
    }

    /// Arms the connection's timer (connect and reply timeouts); it fires
    /// as a timed-out read event.
    pub fn arm_timer(&mut self, ms: ngx::ffi::ngx_msec_t) {
        if let Some(c) = self.connection() {
            // SAFETY: c is live; the timer dies with the connection and must
            // not keep a shutting-down worker alive.
            unsafe {
                (*(*c).read).set_cancelable(1);
                ngx::ffi::ngx_add_timer((*c).read, ms);
            }
        }
    }

    /// Arms the reconnect timer.
    pub fn arm_retry(&mut self, data: *mut c_void, handler: ngx_event_handler_pt, delay_ms: u64) {
        self.retry.data = data;
        self.retry.handler = handler;
        self.retry.log = &mut self.log;
        self.retry.set_cancelable(1);
        // SAFETY: the event lives in self, which stays in place while armed;
        // it is removed in Drop.
        unsafe { ngx::ffi::ngx_add_timer(&mut self.retry, delay_ms as _) };
    }
}

/// A socket address as nginx connects to it, for a node a Redis Cluster
/// named by its address.
pub fn sockaddr_of(addr: std::net::SocketAddr) -> Box<[u8]> {
    use ngx::ffi::{in6_addr, in6_addr__bindgen_ty_1, in_addr, sockaddr_in, sockaddr_in6};
    fn bytes<T>(v: &T) -> Box<[u8]> {
        // SAFETY: a plain C struct of size_of::<T>() bytes, all initialised
        // (the sockaddr types have no padding).
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), mem::size_of::<T>()) }
            .into()
    }
    match addr {
        std::net::SocketAddr::V4(a) => bytes(&sockaddr_in {
            sin_family: ngx::ffi::AF_INET as _,
            sin_port: a.port().to_be(),
            sin_addr: in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            },
            sin_zero: [0; 8],
        }),
        std::net::SocketAddr::V6(a) => bytes(&sockaddr_in6 {
            sin6_family: ngx::ffi::AF_INET6 as _,
            sin6_port: a.port().to_be(),
            sin6_flowinfo: a.flowinfo(),
            sin6_addr: in6_addr {
                __in6_u: in6_addr__bindgen_ty_1 {
                    __u6_addr8: a.ip().octets(),
                },
            },
            sin6_scope_id: a.scope_id(),
        }),
    }
}

/// The resolver's callback: keeps the first address found (or the
/// error), and wakes the connection unless it is still inside the call.
unsafe extern "C" fn lookup_done(ctx: *mut ngx_resolver_ctx_t) {
    // SAFETY: resolve() set data to the Lookup, which the PeerConn keeps
    // alive until the context is done (Drop cancels it).
    unsafe {
        let lookup = &*(*ctx).data.cast::<Lookup>();
        let result = if (*ctx).state == 0 && (*ctx).naddrs > 0 {
            let a = &*(*ctx).addrs;
            let mut addr: Box<[u8]> =
                std::slice::from_raw_parts(a.sockaddr.cast::<u8>(), a.socklen as usize).into();
            ngx::ffi::ngx_inet_set_port(addr.as_mut_ptr().cast(), lookup.port.get());
            Ok(addr)
        } else {
            Err((*ctx).state)
        };
        lookup.result.set(Some(result));
        lookup.ctx.set(ptr::null_mut());
        ngx_resolve_name_done(ctx);
        if !lookup.in_call.get() {
            ngx::ffi::ngx_post_event(
                lookup.wake.get(),
                ptr::addr_of_mut!(ngx::ffi::ngx_posted_events),
            );
        }
    }
}

impl Drop for PeerConn {
    fn drop(&mut self) {
        let ctx = self.lookup.ctx.replace(ptr::null_mut());
        if !ctx.is_null() {
            // SAFETY: a lookup still in flight: nginx forgets it.
            unsafe { ngx_resolve_name_done(ctx) };
        }
        if self.retry.timer_set() != 0 {
            // SAFETY: the timer was armed by arm_retry on this very event.
            unsafe { ngx::ffi::ngx_del_timer(&mut self.retry) };
        }
        self.close();
    }
}
