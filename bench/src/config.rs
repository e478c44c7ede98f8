//! Command-line flags.

use std::net::IpAddr;

pub const USAGE: &str = "\
wschat-bench: load generator for the websocket_chat nginx module (and nchan, for comparison)

USAGE: wschat-bench --url ws://127.0.0.1:PORT/ws [flags]

Target
  --url URL              WebSocket URL base. module: the chat location (room and nick are
                         added as ?room=..&nick=..); nchan: a prefix, the room is appended as /<room>
  --target module|nchan  message format and endpoint style (default module)

Load (default mode)
  --clients N            connections (default 100); clients i lives in room i % R
  --rooms R              rooms (default 1)
  --publishers P         publishing clients (default 1): clients 0..P-1, so publisher p is in room p % R
  --rate MSGS            aggregate messages per second over all publishers, open loop (default 10)
  --payload BYTES        message text length (default 64; at least the 40-byte header)
  --duration SECS        measured window (default 10)
  --warmup SECS          publishing before the window, not counted (default 2)
  --drain SECS           wait after the window for late deliveries (default 3)

Modes
  --idle                 open the connections, hold them for --duration (memory per connection)
  --deflate              members that only receive offer permessage-deflate (and inflate)
  --storm                --clients concurrent loops of connect / welcome / send one message /
                         receive it back / close, for --duration; reports sessions per second

Client side
  --source-addrs A,B,..  local addresses to bind, round-robin (default 127.0.0.1)
  --procs N              receiving client processes (default: one per 9000 connections); in
                         load mode the publishers get one more process of their own
  --connect-concurrency N  handshakes in flight per process (default 200)
  --connect-timeout SECS (default 20)
  --room-prefix STR      room name prefix (default: unique per run)

Report
  --server-pids P,..     server worker pids: RSS/PSS before and after connecting, CPU in the window
  --redis-pid P          Redis server pid: its CPU in the window (the rest of the machine's
                         busy time is reported as \"others\", a noise indicator)
  --json                 print the JSON report on stdout (the table goes to stderr)
  --label STR            copied into the JSON report

Latency = receive time - scheduled send time, both wall-clock; the scheduled time, sequence
number and publisher id travel in the message text, for both targets.
";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Module,
    Nchan,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Load,
    Idle,
    Storm,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shard {
    Publishers,
    Receivers(usize, usize),
}

#[derive(Clone, Debug)]
pub struct Config {
    pub url: String,
    pub target: Target,
    pub mode: Mode,
    pub clients: usize,
    pub rooms: usize,
    pub publishers: usize,
    pub rate: f64,
    pub payload: usize,
    pub duration: f64,
    pub warmup: f64,
    pub drain: f64,
    pub source_addrs: Vec<IpAddr>,
    pub procs: usize,
    pub connect_concurrency: usize,
    pub connect_timeout: f64,
    pub room_prefix: String,
    pub server_pids: Vec<u32>,
    pub redis_pids: Vec<u32>,
    pub json: bool,
    /// Members that only receive offer permessage-deflate.
    pub deflate: bool,
    pub label: String,
    /// Set in child processes.
    pub shard: Option<Shard>,
}

fn num<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("{flag}: not a valid number: {v:?}"))
}

impl Config {
    pub fn parse(args: &[String]) -> Result<Config, String> {
        let mut c = Config {
            url: String::new(),
            target: Target::Module,
            mode: Mode::Load,
            clients: 100,
            rooms: 1,
            publishers: 1,
            rate: 10.0,
            payload: 64,
            duration: 10.0,
            warmup: 2.0,
            drain: 3.0,
            source_addrs: vec!["127.0.0.1".parse().unwrap()],
            procs: 0,
            connect_concurrency: 200,
            connect_timeout: 20.0,
            room_prefix: String::new(),
            server_pids: Vec::new(),
            redis_pids: Vec::new(),
            json: false,
            deflate: false,
            label: String::new(),
            shard: None,
        };
        let mut warmup_set = false;
        let mut i = 0;
        while i < args.len() {
            let flag = args[i].as_str();
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
                _ => (flag, None),
            };
            let takes_value = !matches!(
                name,
                "--idle" | "--storm" | "--json" | "--deflate" | "--help" | "-h"
            );
            let value = if takes_value {
                match inline {
                    Some(v) => v,
                    None => {
                        i += 1;
                        args.get(i)
                            .cloned()
                            .ok_or_else(|| format!("{name} needs a value"))?
                    }
                }
            } else {
                String::new()
            };
            match name {
                "--help" | "-h" => return Err(String::new()),
                "--url" => c.url = value,
                "--target" => {
                    c.target = match value.as_str() {
                        "module" => Target::Module,
                        "nchan" => Target::Nchan,
                        _ => return Err(format!("--target: module or nchan, not {value:?}")),
                    }
                }
                "--idle" => c.mode = Mode::Idle,
                "--deflate" => c.deflate = true,
                "--storm" => c.mode = Mode::Storm,
                "--json" => c.json = true,
                "--clients" => c.clients = num(name, &value)?,
                "--rooms" => c.rooms = num(name, &value)?,
                "--publishers" => c.publishers = num(name, &value)?,
                "--rate" => c.rate = num(name, &value)?,
                "--payload" => c.payload = num(name, &value)?,
                "--duration" => c.duration = num(name, &value)?,
                "--warmup" => {
                    c.warmup = num(name, &value)?;
                    warmup_set = true;
                }
                "--drain" => c.drain = num(name, &value)?,
                "--procs" => c.procs = num(name, &value)?,
                "--connect-concurrency" => c.connect_concurrency = num(name, &value)?,
                "--connect-timeout" => c.connect_timeout = num(name, &value)?,
                "--room-prefix" => c.room_prefix = value,
                "--label" => c.label = value,
                "--source-addrs" => {
                    c.source_addrs = value
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(|s| {
                            s.trim()
                                .parse::<IpAddr>()
                                .map_err(|_| format!("--source-addrs: bad address {s:?}"))
                        })
                        .collect::<Result<_, _>>()?;
                }
                "--redis-pid" => {
                    c.redis_pids = value
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(|s| num::<u32>(name, s.trim()))
                        .collect::<Result<_, _>>()?;
                }
                "--server-pids" => {
                    c.server_pids = value
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(|s| num::<u32>(name, s.trim()))
                        .collect::<Result<_, _>>()?;
                }
                "--shard" => {
                    let (a, b) = value
                        .split_once('/')
                        .ok_or_else(|| "--shard: i/n or p/n".to_string())?;
                    let n: usize = num(name, b)?;
                    if a == "p" {
                        c.shard = Some(Shard::Publishers);
                    } else {
                        let i: usize = num(name, a)?;
                        if n == 0 || i >= n {
                            return Err("--shard: need i < n".into());
                        }
                        c.shard = Some(Shard::Receivers(i, n));
                    }
                }
                _ => return Err(format!("unknown flag {flag:?}")),
            }
            i += 1;
        }
        if c.url.is_empty() {
            return Err("--url is required".into());
        }
        if !c.url.starts_with("ws://") {
            return Err("--url: only ws:// URLs".into());
        }
        if c.source_addrs.is_empty() {
            return Err("--source-addrs: empty".into());
        }
        if c.clients == 0 || c.rooms == 0 {
            return Err("--clients and --rooms must be > 0".into());
        }
        if c.mode == Mode::Load {
            if c.publishers == 0 || c.publishers > c.clients {
                return Err("--publishers must be between 1 and --clients".into());
            }
            if c.rate <= 0.0 {
                return Err("--rate must be > 0".into());
            }
        }
        if c.mode == Mode::Storm && !warmup_set {
            c.warmup = 0.0;
        }
        if !(c.duration > 0.0 && c.duration <= 3600.0) {
            return Err("--duration: 0 < secs <= 3600".into());
        }
        if c.warmup < 0.0 || c.drain < 0.0 || c.warmup > 600.0 || c.drain > 600.0 {
            return Err("--warmup/--drain: 0..600".into());
        }
        if c.clients > 200_000 {
            return Err("--clients: at most 200000".into());
        }
        if c.procs == 0 {
            c.procs = c.clients.div_ceil(9000).max(1);
        }
        c.procs = c.procs.clamp(1, 64);
        if c.connect_concurrency == 0 {
            c.connect_concurrency = 1;
        }
        c.payload = c.payload.max(crate::client::HEADER_LEN);
        Ok(c)
    }

    /// The client indices one child process opens. In load mode the
    /// publishers (clients 0..P) get a process of their own, so their send
    /// timing does not suffer from the receivers' work; the other clients are
    /// spread over the receiver processes.
    pub fn indices(&self, shard: Shard) -> Vec<usize> {
        let first = if self.mode == Mode::Load {
            self.publishers
        } else {
            0
        };
        match shard {
            Shard::Publishers => (0..self.publishers).collect(),
            Shard::Receivers(i, n) => (first + i..self.clients).step_by(n).collect(),
        }
    }

    /// The child processes of a run.
    pub fn shards(&self) -> Vec<Shard> {
        let mut v = Vec::new();
        if self.mode == Mode::Load {
            v.push(Shard::Publishers);
        }
        for i in 0..self.procs {
            v.push(Shard::Receivers(i, self.procs));
        }
        v
    }

    /// The arguments that recreate this configuration in a child process.
    pub fn child_args(&self, shard: Shard) -> Vec<String> {
        let mut a = vec![
            "--url".into(),
            self.url.clone(),
            "--target".into(),
            match self.target {
                Target::Module => "module".into(),
                Target::Nchan => "nchan".into(),
            },
        ];
        match self.mode {
            Mode::Idle => a.push("--idle".into()),
            Mode::Storm => a.push("--storm".into()),
            Mode::Load => {}
        }
        if self.deflate {
            a.push("--deflate".into());
        }
        let kv = [
            ("--clients", self.clients.to_string()),
            ("--rooms", self.rooms.to_string()),
            ("--publishers", self.publishers.to_string()),
            ("--rate", self.rate.to_string()),
            ("--payload", self.payload.to_string()),
            ("--duration", self.duration.to_string()),
            ("--warmup", self.warmup.to_string()),
            ("--drain", self.drain.to_string()),
            (
                "--source-addrs",
                self.source_addrs
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            (
                "--connect-concurrency",
                self.connect_concurrency.to_string(),
            ),
            ("--connect-timeout", self.connect_timeout.to_string()),
            ("--room-prefix", self.room_prefix.clone()),
            ("--procs", self.procs.to_string()),
            (
                "--shard",
                match shard {
                    Shard::Publishers => format!("p/{}", self.procs),
                    Shard::Receivers(i, n) => format!("{i}/{n}"),
                },
            ),
        ];
        for (k, v) in kv {
            a.push(k.into());
            a.push(v);
        }
        a
    }
}
