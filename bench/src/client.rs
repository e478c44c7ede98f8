//! One client process (a shard): opens its share of the connections, reports
//! READY on stdout, waits for `GO <start_us>` on stdin, runs the scenario on
//! the shared schedule, and prints `RESULT <json>`.
//!
//! Message text, for both targets: `wsb <publisher> <seq> <scheduled_us> <sent_us> <m> xxxx...`
//! where m is 1 inside the measured window and 0 in warmup. Latency counts
//! from the scheduled time (open loop); "service" latency from the actual send.

use crate::config::{Config, Mode, Shard, Target};
use crate::lean::{self, Event};
use crate::stats::{hist_to_json, new_hist, record, wall_us};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::json;
use std::cell::{Cell, RefCell};
use std::io::Write;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, LocalSet};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Longest possible header: "wsb " + 7 + 1 + 10 + 1 + 16 + 1 + 16 + 1 + 1 + 1.
pub const HEADER_LEN: usize = 60;

type Ws = WebSocketStream<TcpStream>;
type Sink = SplitSink<Ws, Message>;
type Receiver = lean::Receiver<TcpStream>;

#[derive(Default)]
struct Shared {
    lat: Option<Histogram<u64>>,
    service: Option<Histogram<u64>>,
    connect: Option<Histogram<u64>>,
    storm: Option<Histogram<u64>>,
    connected: u64,
    connect_failed: u64,
    members: Vec<u64>,
    sent_measured: Vec<u64>,
    sent_total: u64,
    send_errors: u64,
    unsent: u64,
    received: u64,
    warm_received: u64,
    duplicated: u64,
    out_of_order: u64,
    misrouted: u64,
    foreign: u64,
    /// join/leave/presence events, in all and at most on one connection.
    presence_events: u64,
    presence_max: u64,
    server_errors: u64,
    disconnects: u64,
    storm_ok: u64,
    storm_failed: u64,
    errors: Vec<String>,
    error_count: u64,
    /// Per publisher, per sequence number: receivers that got it (measured only).
    recv_count: Vec<Vec<u32>>,
    /// Per publisher: first and last measured sequence number it had due.
    pub_range: Vec<Option<(u64, u64)>>,
}

impl Shared {
    fn note_error(&mut self, what: String) {
        self.error_count += 1;
        if self.errors.len() < 8 && !self.errors.contains(&what) {
            self.errors.push(what);
        }
    }
}

type Sh = Rc<RefCell<Shared>>;

/// Host and port of a ws:// URL, resolved to an IPv4 or IPv6 address.
pub fn url_addr(url: &str) -> Result<SocketAddr, String> {
    let rest = url.strip_prefix("ws://").ok_or("not a ws:// URL")?;
    let hostport = rest.split(['/', '?']).next().unwrap_or("");
    let hp = if hostport.contains(':') && !hostport.ends_with(']') {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    hp.to_socket_addrs()
        .map_err(|e| format!("{hp}: {e}"))?
        .next()
        .ok_or_else(|| format!("{hp}: no address"))
}

fn room_url(cfg: &Config, room: usize, nick: &str) -> String {
    let name = format!("{}{}", cfg.room_prefix, room);
    match cfg.target {
        Target::Module => {
            let sep = if cfg.url.contains('?') { '&' } else { '?' };
            format!("{}{sep}room={name}&nick={nick}", cfg.url)
        }
        Target::Nchan => format!("{}/{name}", cfg.url.trim_end_matches('/')),
    }
}

/// The chat text carried by one received frame (None for other events),
/// from its start to the end of the frame: only the header at its front is
/// read, so the rest of a big message is never scanned.
/// Module frames are JSON events; nchan frames are the raw published text.
enum Frame<'a> {
    Text(&'a [u8]),
    ServerError,
    Other,
}

fn classify(target: Target, t: &[u8]) -> Frame<'_> {
    const TEXT: &[u8] = b"\"text\":\"";
    match target {
        Target::Nchan => Frame::Text(t),
        Target::Module => {
            if t.starts_with(b"{\"type\":\"message\"") {
                match t.windows(TEXT.len()).position(|w| w == TEXT) {
                    Some(i) => Frame::Text(&t[i + TEXT.len()..]),
                    None => Frame::Other,
                }
            } else if t.starts_with(b"{\"type\":\"error\"") {
                Frame::ServerError
            } else {
                Frame::Other
            }
        }
    }
}

struct Header {
    publisher: usize,
    seq: u64,
    sched_us: u64,
    sent_us: u64,
    measured: bool,
}

fn parse_header(text: &[u8]) -> Option<Header> {
    let mut it = text.splitn(7, |&b| b == b' ');
    if it.next()? != b"wsb" {
        return None;
    }
    Some(Header {
        publisher: number(it.next()?)?,
        seq: number(it.next()?)?,
        sched_us: number(it.next()?)?,
        sent_us: number(it.next()?)?,
        measured: it.next()? == b"1",
    })
}

fn number<T: std::str::FromStr>(field: &[u8]) -> Option<T> {
    std::str::from_utf8(field).ok()?.parse().ok()
}

fn make_text(publisher: usize, seq: u64, sched_us: u64, measured: bool, payload: usize) -> String {
    let mut s = format!(
        "wsb {publisher} {seq} {sched_us} {} {} ",
        wall_us(),
        if measured { 1 } else { 0 }
    );
    let pad = payload.saturating_sub(s.len());
    s.push_str(&"x".repeat(pad));
    s
}

/// TCP connection from `src` to `dst`.
async fn tcp_connect(dst: SocketAddr, src: IpAddr) -> Result<TcpStream, String> {
    let sock = if dst.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| format!("socket: {e}"))?;
    sock.bind(SocketAddr::new(src, 0))
        .map_err(|e| format!("bind {src}: {e}"))?;
    let tcp = sock
        .connect(dst)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// TCP connect from `src`, WebSocket handshake, and (module) wait for the
/// welcome event. Returns the stream and the time it took in µs.
async fn open(
    url: &str,
    dst: SocketAddr,
    src: IpAddr,
    target: Target,
) -> Result<(Ws, u64), String> {
    let t0 = wall_us();
    let tcp = tcp_connect(dst, src).await?;
    // tungstenite zero-fills the free part of its read buffer before each
    // read: at the default 128 KB that was a tenth of the load generator's
    // CPU with the ten publishers of a 16 KB-message room.
    let conf = WebSocketConfig::default().read_buffer_size(32 * 1024);
    let (mut ws, _resp) = tokio_tungstenite::client_async_with_config(url, tcp, Some(conf))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    if target == Target::Module {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    if t.starts_with("{\"type\":\"welcome\"") {
                        break;
                    }
                    if t.starts_with("{\"type\":\"error\"") {
                        return Err(format!("error before welcome: {}", t.as_str()));
                    }
                }
                Some(Ok(Message::Close(c))) => return Err(format!("closed before welcome: {c:?}")),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(format!("before welcome: {e}")),
                None => return Err("EOF before welcome".into()),
            }
        }
    }
    Ok((ws, wall_us().saturating_sub(t0)))
}

/// `open` for a connection that only receives: the same steps, and so the
/// same connect time, through the lean receiver instead of tungstenite.
async fn open_receiver(
    url: &str,
    dst: SocketAddr,
    src: IpAddr,
    target: Target,
    deflate: bool,
) -> Result<(Receiver, u64), String> {
    let t0 = wall_us();
    let tcp = tcp_connect(dst, src).await?;
    let mut rx = lean::connect(tcp, url, deflate)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    if target == Target::Module {
        loop {
            match rx.next().await {
                Ok(Event::Text(t, _)) => {
                    if t.starts_with(b"{\"type\":\"welcome\"") {
                        break;
                    }
                    if t.starts_with(b"{\"type\":\"error\"") {
                        return Err(format!(
                            "error before welcome: {}",
                            String::from_utf8_lossy(t)
                        ));
                    }
                }
                Ok(Event::Close(c)) => {
                    return Err(format!(
                        "closed before welcome: {:?}",
                        String::from_utf8_lossy(c)
                    ))
                }
                Ok(Event::Binary) => {}
                Err(e) => return Err(format!("before welcome: {e}")),
            }
        }
    }
    Ok((rx, wall_us().saturating_sub(t0)))
}

/// Per-connection accounting of the chat messages one member receives:
/// unique measured deliveries, duplicates, reordering.
struct Tally {
    target: Target,
    room: usize,
    rooms: usize,
    publishers: usize,
    seen: Vec<Vec<u64>>,
    last: Vec<i64>,
    presence: u64,
    sh: Sh,
}

impl Tally {
    fn new(target: Target, room: usize, rooms: usize, publishers: usize, sh: Sh) -> Self {
        Tally {
            target,
            room,
            rooms,
            publishers,
            seen: vec![Vec::new(); publishers],
            last: vec![-1; publishers],
            presence: 0,
            sh,
        }
    }

    /// One text message, received at wall-clock `now` (µs).
    fn text(&mut self, t: &[u8], now: u64) {
        let text = match classify(self.target, t) {
            Frame::Text(x) => x,
            Frame::ServerError => {
                let mut s = self.sh.borrow_mut();
                s.server_errors += 1;
                s.note_error(format!(
                    "server error event: {}",
                    String::from_utf8_lossy(t)
                ));
                return;
            }
            Frame::Other => {
                const PRESENCE: [&[u8]; 3] = [
                    b"{\"type\":\"join\"",
                    b"{\"type\":\"leave\"",
                    b"{\"type\":\"presence\"",
                ];
                if PRESENCE.iter().any(|k| t.starts_with(k)) {
                    self.presence += 1;
                    let mut s = self.sh.borrow_mut();
                    s.presence_events += 1;
                    s.presence_max = s.presence_max.max(self.presence);
                }
                return;
            }
        };
        let mut s = self.sh.borrow_mut();
        let h = match parse_header(text) {
            Some(h) if h.publisher < self.publishers => h,
            _ => {
                s.foreign += 1;
                return;
            }
        };
        if h.publisher % self.rooms != self.room {
            s.misrouted += 1;
            return;
        }
        let bits = &mut self.seen[h.publisher];
        let word = (h.seq / 64) as usize;
        if bits.len() <= word {
            bits.resize(word + 1, 0);
        }
        let mask = 1u64 << (h.seq % 64);
        if bits[word] & mask != 0 {
            s.duplicated += 1;
            return;
        }
        bits[word] |= mask;
        if (h.seq as i64) < self.last[h.publisher] {
            s.out_of_order += 1;
        } else {
            self.last[h.publisher] = h.seq as i64;
        }
        if h.measured {
            s.received += 1;
            let counts = &mut s.recv_count[h.publisher];
            let i = h.seq as usize;
            if counts.len() <= i {
                counts.resize(i + 1, 0);
            }
            counts[i] += 1;
            if let Some(l) = s.lat.as_mut() {
                record(l, now.saturating_sub(h.sched_us));
            }
            if let Some(l) = s.service.as_mut() {
                record(l, now.saturating_sub(h.sent_us));
            }
        } else {
            s.warm_received += 1;
        }
    }

    /// The connection ended (close, EOF or error). Unless the run is over,
    /// the server dropped a member: note why.
    fn ended(&self, stopping: &Cell<bool>, why: Option<String>) {
        if !stopping.get() {
            let mut s = self.sh.borrow_mut();
            s.disconnects += 1;
            s.note_error(
                why.unwrap_or_else(|| "connection closed by server during the run".into()),
            );
        }
    }
}

/// An open member connection: a publisher's, or one that only receives.
enum Conn {
    Ws(Box<Ws>),
    Lean(Receiver),
}

/// Reads a publisher's connection (tungstenite) until it ends or the task
/// is aborted.
async fn read_ws(mut stream: SplitStream<Ws>, mut tally: Tally, stopping: Rc<Cell<bool>>) {
    while let Some(msg) = stream.next().await {
        match msg {
            Ok(Message::Text(t)) => tally.text(t.as_bytes(), wall_us()),
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    tally.ended(&stopping, None);
}

/// Reads a member's connection until it ends or the task is aborted.
async fn read_lean(mut rx: Receiver, mut tally: Tally, stopping: Rc<Cell<bool>>) {
    let why = loop {
        match rx.next().await {
            Ok(Event::Text(t, at)) => tally.text(t, at),
            Ok(Event::Binary) => {}
            Ok(Event::Close(_)) | Err(lean::Error::Eof | lean::Error::Io(_)) => break None,
            Err(e @ lean::Error::Protocol(_)) => {
                break Some(format!("server broke the protocol: {e}"))
            }
        }
    };
    tally.ended(&stopping, why);
}

struct Schedule {
    start_us: u64,
    win_start_us: u64,
    win_end_us: u64,
    hard_stop_us: u64,
}

async fn sleep_until_wall(t_us: u64) {
    let now = wall_us();
    if t_us > now {
        tokio::time::sleep(Duration::from_micros(t_us - now)).await;
    }
}

/// Open-loop publisher: message k of publisher p is due at
/// start + p/rate + k*P/rate, whether or not earlier sends have completed.
async fn publisher(
    mut sink: Option<Sink>,
    p: usize,
    room: usize,
    cfg: Rc<Config>,
    sc: Rc<Schedule>,
    sh: Sh,
) {
    let interval = cfg.publishers as f64 / cfg.rate * 1e6;
    let offset = p as f64 / cfg.rate * 1e6;
    let mut dead = sink.is_none();
    let mut k: u64 = 0;
    loop {
        let sched = sc.start_us + (offset + k as f64 * interval) as u64;
        if sched >= sc.win_end_us {
            break;
        }
        let measured = sched >= sc.win_start_us;
        if measured {
            let mut s = sh.borrow_mut();
            s.sent_measured[room] += 1;
            let r = s.pub_range[p].get_or_insert((k, k));
            r.1 = k;
        }
        let Some(sk) = sink
            .as_mut()
            .filter(|_| !dead && wall_us() < sc.hard_stop_us)
        else {
            if measured {
                sh.borrow_mut().unsent += 1;
            }
            k += 1;
            continue;
        };
        sleep_until_wall(sched).await;
        let text = make_text(p, k, sched, measured, cfg.payload);
        let left = sc.hard_stop_us.saturating_sub(wall_us()).max(1);
        match tokio::time::timeout(
            Duration::from_micros(left),
            sk.send(Message::Text(text.into())),
        )
        .await
        {
            Ok(Ok(())) => sh.borrow_mut().sent_total += 1,
            Ok(Err(e)) => {
                let mut s = sh.borrow_mut();
                s.send_errors += 1;
                s.note_error(format!("send: {e}"));
                dead = true;
            }
            Err(_) => {
                let mut s = sh.borrow_mut();
                s.send_errors += 1;
                s.note_error("send blocked past the drain deadline".into());
                dead = true;
            }
        }
        k += 1;
    }
    // Keep the connection (and so the publisher's membership) open until the end.
    sleep_until_wall(sc.hard_stop_us).await;
    drop(sink);
}

/// One connect / chat / close session of a storm.
async fn storm_session(
    cfg: &Config,
    dst: SocketAddr,
    src: IpAddr,
    wid: usize,
    seq: u64,
) -> Result<(), String> {
    let room = (wid + seq as usize) % cfg.rooms;
    let url = room_url(cfg, room, &format!("s{wid}"));
    let (ws, _) = open(&url, dst, src, cfg.target).await?;
    let (mut sink, mut stream) = ws.split();
    let text = make_text(wid, seq, wall_us(), true, cfg.payload);
    sink.send(Message::Text(text.clone().into()))
        .await
        .map_err(|e| format!("send: {e}"))?;
    loop {
        match stream.next().await {
            Some(Ok(Message::Text(t))) => {
                // The text's header (writer, sequence, times) is unique.
                if let Frame::Text(x) = classify(cfg.target, t.as_bytes()) {
                    if x.starts_with(text.as_bytes()) {
                        break;
                    }
                }
            }
            Some(Ok(Message::Close(c))) => return Err(format!("closed before echo: {c:?}")),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("before echo: {e}")),
            None => return Err("EOF before echo".into()),
        }
    }
    sink.send(Message::Close(None))
        .await
        .map_err(|e| format!("close: {e}"))?;
    // Wait for the server's close (or EOF); a missing one is not a failure.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(m)) = stream.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
    Ok(())
}

fn shard_result(s: &Shared) -> serde_json::Value {
    json!({
        "connected": s.connected,
        "connect_failed": s.connect_failed,
        "connect_hist": s.connect.as_ref().map(hist_to_json),
        "members": s.members,
        "sent_measured": s.sent_measured,
        "sent_total": s.sent_total,
        "send_errors": s.send_errors,
        "unsent": s.unsent,
        "received": s.received,
        "warm_received": s.warm_received,
        "duplicated": s.duplicated,
        "out_of_order": s.out_of_order,
        "misrouted": s.misrouted,
        "foreign": s.foreign,
        "presence_events": s.presence_events,
        "presence_max": s.presence_max,
        "server_errors": s.server_errors,
        "disconnects": s.disconnects,
        "latency_hist": s.lat.as_ref().map(hist_to_json),
        "service_hist": s.service.as_ref().map(hist_to_json),
        "storm_ok": s.storm_ok,
        "storm_failed": s.storm_failed,
        "storm_hist": s.storm.as_ref().map(hist_to_json),
        "errors": s.errors,
        "recv_count": s.recv_count,
        "pub_range": s.pub_range.iter().map(|r| r.map(|(a, b)| vec![a, b])).collect::<Vec<_>>(),
        "error_count": s.error_count,
    })
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

pub fn run_shard(cfg: Config) -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wschat-bench: runtime: {e}");
            return 1;
        }
    };
    let local = LocalSet::new();
    local.block_on(&rt, shard_main(cfg))
}

async fn shard_main(cfg: Config) -> i32 {
    let cfg = Rc::new(cfg);
    let shard = cfg.shard.unwrap_or(Shard::Receivers(0, 1));
    let tag = match shard {
        Shard::Publishers => "p".to_string(),
        Shard::Receivers(i, _) => i.to_string(),
    };
    let dst = match url_addr(&cfg.url) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("wschat-bench: {e}");
            return 2;
        }
    };
    let sh: Sh = Rc::new(RefCell::new(Shared {
        lat: Some(new_hist()),
        service: Some(new_hist()),
        connect: Some(new_hist()),
        storm: Some(new_hist()),
        members: vec![0; cfg.rooms],
        sent_measured: vec![0; cfg.rooms],
        recv_count: vec![Vec::new(); cfg.publishers],
        pub_range: vec![None; cfg.publishers],
        ..Default::default()
    }));
    let stopping = Rc::new(Cell::new(false));
    let mut readers: Vec<JoinHandle<()>> = Vec::new();
    let sinks: Rc<RefCell<Vec<(usize, usize, Sink)>>> = Rc::new(RefCell::new(Vec::new()));

    if cfg.mode != Mode::Storm {
        let sem = Rc::new(Semaphore::new(cfg.connect_concurrency));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<JoinHandle<()>>();
        let mut connecting = Vec::new();
        for idx in cfg.indices(shard) {
            let room = idx % cfg.rooms;
            let src = cfg.source_addrs[idx % cfg.source_addrs.len()];
            let url = room_url(&cfg, room, &format!("c{idx}"));
            let (sem, sh, cfg, stopping, sinks, tx) = (
                sem.clone(),
                sh.clone(),
                cfg.clone(),
                stopping.clone(),
                sinks.clone(),
                tx.clone(),
            );
            connecting.push(tokio::task::spawn_local(async move {
                let _permit = sem.acquire().await;
                let limit = Duration::from_secs_f64(cfg.connect_timeout);
                // Publishers send through tungstenite; every other member
                // only receives, through the cheaper lean receiver.
                let publishes = cfg.mode == Mode::Load && idx < cfg.publishers;
                let opening = async {
                    if publishes {
                        let (ws, us) = open(&url, dst, src, cfg.target).await?;
                        Ok((Conn::Ws(Box::new(ws)), us))
                    } else {
                        let (rx, us) =
                            open_receiver(&url, dst, src, cfg.target, cfg.deflate).await?;
                        Ok((Conn::Lean(rx), us))
                    }
                };
                let res = match tokio::time::timeout(limit, opening).await {
                    Ok(r) => r,
                    Err(_) => Err("connect timeout".into()),
                };
                match res {
                    Ok((conn, us)) => {
                        {
                            let mut s = sh.borrow_mut();
                            s.connected += 1;
                            s.members[room] += 1;
                            if let Some(h) = s.connect.as_mut() {
                                record(h, us);
                            }
                        }
                        let npub = if cfg.mode == Mode::Load {
                            cfg.publishers
                        } else {
                            0
                        };
                        let tally = Tally::new(cfg.target, room, cfg.rooms, npub, sh.clone());
                        let h = match conn {
                            Conn::Ws(ws) => {
                                let (sink, stream) = (*ws).split();
                                sinks.borrow_mut().push((idx, room, sink));
                                tokio::task::spawn_local(read_ws(stream, tally, stopping))
                            }
                            Conn::Lean(rx) => {
                                tokio::task::spawn_local(read_lean(rx, tally, stopping))
                            }
                        };
                        let _ = tx.send(h);
                    }
                    Err(e) => {
                        let mut s = sh.borrow_mut();
                        s.connect_failed += 1;
                        s.note_error(e);
                    }
                }
            }));
        }
        drop(tx);
        for c in connecting {
            let _ = c.await;
        }
        while let Ok(h) = rx.try_recv() {
            readers.push(h);
        }
    }

    {
        let s = sh.borrow();
        say(&format!("READY {} {}", s.connected, s.connect_failed));
    }

    // Wait for GO <start_us> from the parent.
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let start_us: u64 = match lines.next_line().await {
        Ok(Some(l)) => match l.strip_prefix("GO ").and_then(|v| v.trim().parse().ok()) {
            Some(v) => v,
            None => {
                eprintln!("wschat-bench shard {tag}: expected GO, got {l:?}");
                return 3;
            }
        },
        _ => {
            eprintln!("wschat-bench shard {tag}: parent went away");
            return 3;
        }
    };
    let win_start_us = start_us + (cfg.warmup * 1e6) as u64;
    let win_end_us = win_start_us + (cfg.duration * 1e6) as u64;
    let sc = Rc::new(Schedule {
        start_us,
        win_start_us,
        win_end_us,
        hard_stop_us: win_end_us + (cfg.drain * 1e6) as u64,
    });

    match cfg.mode {
        Mode::Load => {
            let pubs: Vec<(usize, usize, Sink)> = sinks.borrow_mut().drain(..).collect();
            let have: Vec<usize> = pubs.iter().map(|(p, _, _)| *p).collect();
            let mut tasks = Vec::new();
            for (p, room, sink) in pubs {
                tasks.push(tokio::task::spawn_local(publisher(
                    Some(sink),
                    p,
                    room,
                    cfg.clone(),
                    sc.clone(),
                    sh.clone(),
                )));
            }
            // Publishers of this shard whose connection failed still had
            // messages due: count them as expected (and so lost).
            let mine = if shard == Shard::Publishers {
                cfg.publishers
            } else {
                0
            };
            for p in 0..mine {
                if !have.contains(&p) {
                    tasks.push(tokio::task::spawn_local(publisher(
                        None,
                        p,
                        p % cfg.rooms,
                        cfg.clone(),
                        sc.clone(),
                        sh.clone(),
                    )));
                }
            }
            sleep_until_wall(sc.hard_stop_us).await;
            stopping.set(true);
            for t in tasks {
                let _ = t.await;
            }
        }
        Mode::Idle => {
            sleep_until_wall(sc.win_end_us).await;
            stopping.set(true);
        }
        Mode::Storm => {
            let mut loops = Vec::new();
            let counter = Rc::new(Cell::new(0usize));
            for wid in cfg.indices(shard) {
                let (cfg, sh, sc, counter) = (cfg.clone(), sh.clone(), sc.clone(), counter.clone());
                loops.push(tokio::task::spawn_local(async move {
                    sleep_until_wall(sc.start_us).await;
                    let mut seq = 0u64;
                    loop {
                        let t0 = wall_us();
                        if t0 >= sc.win_end_us {
                            break;
                        }
                        let measured = t0 >= sc.win_start_us;
                        let n = counter.get();
                        counter.set(n + 1);
                        let src = cfg.source_addrs[n % cfg.source_addrs.len()];
                        let r = tokio::time::timeout(
                            Duration::from_secs(10),
                            storm_session(&cfg, dst, src, wid, seq),
                        )
                        .await
                        .unwrap_or_else(|_| Err("session timeout (10 s)".into()));
                        let t1 = wall_us();
                        let mut s = sh.borrow_mut();
                        match r {
                            Ok(()) if measured => {
                                s.storm_ok += 1;
                                if let Some(h) = s.storm.as_mut() {
                                    record(h, t1.saturating_sub(t0));
                                }
                            }
                            Ok(()) => {}
                            Err(e) => {
                                if measured {
                                    s.storm_failed += 1;
                                }
                                s.note_error(e);
                            }
                        }
                        drop(s);
                        seq += 1;
                    }
                }));
            }
            for l in loops {
                let _ = l.await;
            }
            stopping.set(true);
        }
    }
    for r in &readers {
        r.abort();
    }
    for r in readers {
        let _ = r.await;
    }
    let result = shard_result(&sh.borrow());
    say(&format!("RESULT {result}"));
    0
}
