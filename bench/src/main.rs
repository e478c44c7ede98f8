//! wschat-bench: see config::USAGE.
//!
//! The parent process starts `--procs` copies of itself (`--shard i/n`), each
//! of which opens its share of the connections and says READY; the parent then
//! samples server memory, hands every shard the same start time (GO), samples
//! server CPU over the measured window, and merges the shards' RESULT lines.

mod client;
mod config;
mod frame;
mod lean;
mod stats;

use config::{Config, Mode, Target};
use serde_json::{json, Value};
use stats::{
    hist_add_json, loadavg1, mem_json, new_hist, sample_cpu_s, sample_cpu_split_s,
    sample_machine_busy_s, sample_mem, summary_ms, wall_us,
};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut cfg = match Config::parse(&args) {
        Ok(c) => c,
        Err(e) if e.is_empty() => {
            print!("{}", config::USAGE);
            return;
        }
        Err(e) => {
            eprintln!("wschat-bench: {e}\n(--help for usage)");
            std::process::exit(2);
        }
    };
    if cfg.shard.is_some() {
        std::process::exit(client::run_shard(cfg));
    }
    if cfg.room_prefix.is_empty() {
        cfg.room_prefix = format!(
            "b{}x{}r",
            std::process::id(),
            wall_us() / 1000 % 100_000_000
        );
    }
    if let Err(e) = client::url_addr(&cfg.url) {
        eprintln!("wschat-bench: --url: {e}");
        std::process::exit(2);
    }
    match orchestrate(&cfg) {
        Ok(report) => {
            eprint!("{}", table(&report));
            if cfg.json {
                println!("{report}");
            }
        }
        Err(e) => {
            eprintln!("wschat-bench: {e}");
            std::process::exit(1);
        }
    }
}

struct Shard {
    child: Child,
    stdin: Option<ChildStdin>,
    out: BufReader<std::process::ChildStdout>,
}

fn sleep_until_wall(t_us: u64) {
    let now = wall_us();
    if t_us > now {
        std::thread::sleep(Duration::from_micros(t_us - now));
    }
}

/// Reads lines from a shard until one starting with `prefix`.
fn expect_line(s: &mut Shard, prefix: &str) -> Result<String, String> {
    let mut line = String::new();
    loop {
        line.clear();
        let n = s
            .out
            .read_line(&mut line)
            .map_err(|e| format!("reading a shard: {e}"))?;
        if n == 0 {
            return Err(format!("a shard exited before saying {prefix}"));
        }
        if let Some(rest) = line.strip_prefix(prefix) {
            return Ok(rest.trim().to_string());
        }
    }
}

fn kill_all(shards: &mut [Shard]) {
    for s in shards.iter_mut() {
        let _ = s.child.kill();
        let _ = s.child.wait();
    }
}

fn orchestrate(cfg: &Config) -> Result<Value, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mem_before = sample_mem(&cfg.server_pids);
    let load_start = loadavg1();
    let t_spawn = wall_us();
    let srv_spawn = sample_cpu_s(&cfg.server_pids);
    let mut shards: Vec<Shard> = Vec::new();
    for sh in cfg.shards() {
        let mut child = Command::new(&exe)
            .args(cfg.child_args(sh))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawn shard: {e}"))?;
        let stdin = child.stdin.take();
        let out = BufReader::new(child.stdout.take().expect("piped stdout"));
        shards.push(Shard { child, stdin, out });
    }
    let mut ready = Vec::new();
    for s in shards.iter_mut() {
        match expect_line(s, "READY ") {
            Ok(r) => ready.push(r),
            Err(e) => {
                kill_all(&mut shards);
                return Err(e);
            }
        }
    }
    let connect_phase_s = (wall_us() - t_spawn) as f64 / 1e6;
    let connect_server_cpu_s = sample_cpu_s(&cfg.server_pids) - srv_spawn;
    let connect_client_cpu_s = {
        let pids: Vec<u32> = shards.iter().map(|s| s.child.id()).collect();
        sample_cpu_s(&pids)
    };
    // Let join broadcasts and allocations settle before measuring memory and
    // starting the schedule: a fixed pause, then (given the server's pids)
    // until the workers use under 20% of a core over half a second, at most 60 s.
    let t_settle = wall_us();
    let settle = match cfg.mode {
        Mode::Idle => 2.0,
        Mode::Load => 1.0,
        Mode::Storm => 0.0,
    };
    std::thread::sleep(Duration::from_secs_f64(settle));
    if cfg.mode != Mode::Storm && !cfg.server_pids.is_empty() {
        while wall_us() - t_settle < 60_000_000 {
            let a = sample_cpu_s(&cfg.server_pids);
            std::thread::sleep(Duration::from_millis(500));
            if sample_cpu_s(&cfg.server_pids) - a < 0.1 {
                break;
            }
        }
    }
    let settle_s = (wall_us() - t_settle) as f64 / 1e6;
    let mem_ready = sample_mem(&cfg.server_pids);

    let start_us = wall_us() + 300_000;
    for s in shards.iter_mut() {
        if let Some(w) = s.stdin.as_mut() {
            let _ = writeln!(w, "GO {start_us}");
            let _ = w.flush();
        }
    }
    let shard_pids: Vec<u32> = shards.iter().map(|s| s.child.id()).collect();
    let win_start = start_us + (cfg.warmup * 1e6) as u64;
    let win_end = win_start + (cfg.duration * 1e6) as u64;
    let sample = || {
        (
            sample_cpu_split_s(&cfg.server_pids),
            sample_cpu_s(&shard_pids),
            sample_cpu_s(&cfg.redis_pids),
            sample_machine_busy_s(),
            wall_us(),
        )
    };
    sleep_until_wall(win_start);
    let (srv_a, cli_a, red_a, all_a, t_a) = sample();
    sleep_until_wall(win_end);
    let (srv_b, cli_b, red_b, all_b, t_b) = sample();
    let load_end = loadavg1();
    let mem_end = sample_mem(&cfg.server_pids);

    let mut results = Vec::new();
    for s in shards.iter_mut() {
        match expect_line(s, "RESULT ") {
            Ok(r) => results
                .push(serde_json::from_str::<Value>(&r).map_err(|e| format!("shard JSON: {e}"))?),
            Err(e) => {
                kill_all(&mut shards);
                return Err(e);
            }
        }
    }
    for s in shards.iter_mut() {
        s.stdin.take();
        let _ = s.child.wait();
    }
    let _ = ready;
    Ok(merge(
        cfg,
        &results,
        Extra {
            mem_before,
            mem_ready,
            mem_end,
            server_cpu_s: (srv_b.0 + srv_b.1) - (srv_a.0 + srv_a.1),
            server_user_s: srv_b.0 - srv_a.0,
            server_sys_s: srv_b.1 - srv_a.1,
            client_cpu_s: cli_b - cli_a,
            redis_cpu_s: red_b - red_a,
            machine_busy_s: all_b - all_a,
            loadavg: (load_start, load_end),
            window_s: (t_b - t_a) as f64 / 1e6,
            connect_phase_s,
            settle_s,
            connect_server_cpu_s,
            connect_client_cpu_s,
        },
    ))
}

struct Extra {
    mem_before: stats::Mem,
    mem_ready: stats::Mem,
    mem_end: stats::Mem,
    server_cpu_s: f64,
    server_user_s: f64,
    server_sys_s: f64,
    client_cpu_s: f64,
    redis_cpu_s: f64,
    machine_busy_s: f64,
    loadavg: (f64, f64),
    window_s: f64,
    connect_phase_s: f64,
    settle_s: f64,
    connect_server_cpu_s: f64,
    connect_client_cpu_s: f64,
}

fn sum(results: &[Value], key: &str) -> u64 {
    results.iter().filter_map(|r| r.get(key)?.as_u64()).sum()
}

fn sum_vec(results: &[Value], key: &str, n: usize) -> Vec<u64> {
    let mut v = vec![0u64; n];
    for r in results {
        if let Some(a) = r.get(key).and_then(Value::as_array) {
            for (i, x) in a.iter().enumerate().take(n) {
                v[i] += x.as_u64().unwrap_or(0);
            }
        }
    }
    v
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn merge(cfg: &Config, results: &[Value], x: Extra) -> Value {
    let mut lat = new_hist();
    let mut service = new_hist();
    let mut conn = new_hist();
    let mut storm = new_hist();
    let mut errors: Vec<Value> = Vec::new();
    for r in results {
        hist_add_json(&mut lat, &r["latency_hist"]);
        hist_add_json(&mut service, &r["service_hist"]);
        hist_add_json(&mut conn, &r["connect_hist"]);
        hist_add_json(&mut storm, &r["storm_hist"]);
        if let Some(es) = r["errors"].as_array() {
            for e in es {
                if errors.len() < 12 && !errors.contains(e) {
                    errors.push(e.clone());
                }
            }
        }
    }
    let members = sum_vec(results, "members", cfg.rooms);
    let sent = sum_vec(results, "sent_measured", cfg.rooms);
    let connected = sum(results, "connected");
    let expected: u64 = if cfg.mode == Mode::Load {
        members.iter().zip(&sent).map(|(m, s)| m * s).sum()
    } else {
        0
    };
    let received = sum(results, "received");
    let lost = expected.saturating_sub(received);
    let per_conn = |after: &stats::Mem, f: fn(&stats::Mem) -> u64| -> Value {
        if cfg.server_pids.is_empty() || connected == 0 {
            Value::Null
        } else {
            let d = f(after) as f64 - f(&x.mem_before) as f64;
            json!((d * 1024.0 / connected as f64).round())
        }
    };
    let storm_ok = sum(results, "storm_ok");
    let pct = |v: f64| {
        if x.window_s > 0.0 {
            round3(v / x.window_s * 100.0)
        } else {
            0.0
        }
    };
    let others = (x.machine_busy_s - x.server_cpu_s - x.client_cpu_s - x.redis_cpu_s).max(0.0);
    // Per message: how many of its room's members got it.
    let (mut msg_all, mut msg_partial, mut msg_none) = (0u64, 0u64, 0u64);
    if cfg.mode == Mode::Load {
        for p in 0..cfg.publishers {
            let range = results.iter().find_map(|r| {
                let v = r["pub_range"].get(p)?.as_array()?;
                Some((v.first()?.as_u64()?, v.get(1)?.as_u64()?))
            });
            let Some((a, b)) = range else { continue };
            let mut counts = vec![0u64; (b - a + 1) as usize];
            for r in results {
                if let Some(c) = r["recv_count"].get(p).and_then(Value::as_array) {
                    for (k, slot) in counts.iter_mut().enumerate() {
                        *slot += c.get(a as usize + k).and_then(Value::as_u64).unwrap_or(0);
                    }
                }
            }
            let want = members[p % cfg.rooms];
            for c in counts {
                if c == 0 {
                    msg_none += 1;
                } else if c < want {
                    msg_partial += 1;
                } else {
                    msg_all += 1;
                }
            }
        }
    }
    json!({
        "label": cfg.label,
        "target": match cfg.target { Target::Module => "module", Target::Nchan => "nchan" },
        "mode": match cfg.mode { Mode::Load => "load", Mode::Idle => "idle", Mode::Storm => "storm" },
        "config": {
            "url": cfg.url,
            "clients": cfg.clients,
            "rooms": cfg.rooms,
            "publishers": cfg.publishers,
            "rate": cfg.rate,
            "payload": cfg.payload,
            "duration_s": cfg.duration,
            "warmup_s": cfg.warmup,
            "drain_s": cfg.drain,
            "procs": cfg.procs,
            "source_addrs": cfg.source_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "room_prefix": cfg.room_prefix,
            "server_pids": cfg.server_pids,
        },
        "connections": {
            "ok": connected,
            "failed": sum(results, "connect_failed"),
            "connect_phase_s": round3(x.connect_phase_s),
            "settle_s": round3(x.settle_s),
            "connect_phase_server_cpu_s": round3(x.connect_server_cpu_s),
            "connect_phase_client_cpu_s": round3(x.connect_client_cpu_s),
            "connect_ms": summary_ms(&conn, stats::CONNECT_QUANTILES),
        },
        "deliveries": {
            "messages_due": sent.iter().sum::<u64>(),
            "messages_sent_total": sum(results, "sent_total"),
            "unsent": sum(results, "unsent"),
            "send_errors": sum(results, "send_errors"),
            "expected": expected,
            "received": received,
            "lost": lost,
            "loss_ratio": if expected > 0 { round3(lost as f64 / expected as f64 * 1000.0) / 1000.0 } else { 0.0 },
            "duplicated": sum(results, "duplicated"),
            "out_of_order": sum(results, "out_of_order"),
            "misrouted": sum(results, "misrouted"),
            "foreign": sum(results, "foreign"),
            "presence_events": sum(results, "presence_events"),
            "presence_events_max_per_connection": results
                .iter()
                .filter_map(|r| r["presence_max"].as_u64())
                .max()
                .unwrap_or(0),
            "messages_delivered_to_all": msg_all,
            "messages_delivered_to_some": msg_partial,
            "messages_delivered_to_none": msg_none,
            "warmup_received": sum(results, "warm_received"),
            "rate_per_s": round3(received as f64 / cfg.duration),
            "server_error_events": sum(results, "server_errors"),
            "disconnects": sum(results, "disconnects"),
        },
        "latency_ms": summary_ms(&lat, stats::LATENCY_QUANTILES),
        "service_latency_ms": summary_ms(&service, stats::LATENCY_QUANTILES),
        "memory": {
            "before": mem_json(&x.mem_before),
            "ready": mem_json(&x.mem_ready),
            "end": mem_json(&x.mem_end),
            "per_connection_rss_bytes": per_conn(&x.mem_ready, |m| m.rss_kb),
            "per_connection_pss_bytes": per_conn(&x.mem_ready, |m| m.pss_kb),
        },
        "cpu": {
            "window_s": round3(x.window_s),
            "server_s": round3(x.server_cpu_s),
            "server_user_s": round3(x.server_user_s),
            "server_sys_s": round3(x.server_sys_s),
            "client_s": round3(x.client_cpu_s),
            "redis_s": round3(x.redis_cpu_s),
            "machine_busy_s": round3(x.machine_busy_s),
            "others_s": round3(others),
            "server_pct": pct(x.server_cpu_s),
            "client_pct": pct(x.client_cpu_s),
            "redis_pct": pct(x.redis_cpu_s),
            "others_pct": pct(others),
            "machine_busy_pct": pct(x.machine_busy_s),
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "loadavg_1m_start": x.loadavg.0,
            "loadavg_1m_end": x.loadavg.1,
        },
        "storm": {
            "sessions_ok": storm_ok,
            "sessions_failed": sum(results, "storm_failed"),
            "sessions_per_s": round3(storm_ok as f64 / cfg.duration),
            "session_ms": summary_ms(&storm, stats::CONNECT_QUANTILES),
        },
        "error_count": sum(results, "error_count"),
        "errors": errors,
    })
}

fn f(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::Number(n) => {
            if let Some(i) = n.as_u64() {
                i.to_string()
            } else {
                let x = n.as_f64().unwrap_or(0.0);
                if x.abs() >= 100.0 {
                    format!("{x:.1}")
                } else {
                    format!("{x:.3}")
                }
            }
        }
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn table(r: &Value) -> String {
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut add = |k: &str, v: String| rows.push((k.to_string(), v));
    let c = &r["config"];
    add(
        "run",
        format!(
            "{} {} clients={} rooms={} publishers={} rate={}/s payload={}B duration={}s procs={}",
            f(&r["target"]),
            f(&r["mode"]),
            f(&c["clients"]),
            f(&c["rooms"]),
            f(&c["publishers"]),
            f(&c["rate"]),
            f(&c["payload"]),
            f(&c["duration_s"]),
            f(&c["procs"]),
        ),
    );
    let cn = &r["connections"];
    add(
        "connections",
        format!(
            "ok={} failed={} in {}s (CPU s: server {}, client {}), settled {}s; connect ms p50={} p99={} max={}",
            f(&cn["ok"]),
            f(&cn["failed"]),
            f(&cn["connect_phase_s"]),
            f(&cn["connect_phase_server_cpu_s"]),
            f(&cn["connect_phase_client_cpu_s"]),
            f(&cn["settle_s"]),
            f(&cn["connect_ms"]["p50"]),
            f(&cn["connect_ms"]["p99"]),
            f(&cn["connect_ms"]["max"]),
        ),
    );
    let mode = r["mode"].as_str().unwrap_or("");
    if mode == "load" {
        let d = &r["deliveries"];
        add(
            "deliveries",
            format!(
                "expected={} received={} lost={} duplicated={} out_of_order={} misrouted={}",
                f(&d["expected"]),
                f(&d["received"]),
                f(&d["lost"]),
                f(&d["duplicated"]),
                f(&d["out_of_order"]),
                f(&d["misrouted"]),
            ),
        );
        add(
            "messages",
            format!(
                "reached every member {}, some {}, none {}",
                f(&d["messages_delivered_to_all"]),
                f(&d["messages_delivered_to_some"]),
                f(&d["messages_delivered_to_none"]),
            ),
        );
        add(
            "delivery rate",
            format!(
                "{}/s (messages due {}, unsent {}, send errors {}, server error events {}, disconnects {})",
                f(&d["rate_per_s"]),
                f(&d["messages_due"]),
                f(&d["unsent"]),
                f(&d["send_errors"]),
                f(&d["server_error_events"]),
                f(&d["disconnects"]),
            ),
        );
        let l = &r["latency_ms"];
        add(
            "latency ms (sched)",
            format!(
                "p50={} p90={} p99={} p99.9={} max={}",
                f(&l["p50"]),
                f(&l["p90"]),
                f(&l["p99"]),
                f(&l["p999"]),
                f(&l["max"]),
            ),
        );
        let l = &r["service_latency_ms"];
        add(
            "from actual send",
            format!(
                "p50={} p90={} p99={} p99.9={} max={}",
                f(&l["p50"]),
                f(&l["p90"]),
                f(&l["p99"]),
                f(&l["p999"]),
                f(&l["max"]),
            ),
        );
    }
    if mode == "storm" {
        let s = &r["storm"];
        add(
            "storm",
            format!(
                "{} sessions/s (ok={} failed={}); session ms p50={} p99={} max={}",
                f(&s["sessions_per_s"]),
                f(&s["sessions_ok"]),
                f(&s["sessions_failed"]),
                f(&s["session_ms"]["p50"]),
                f(&s["session_ms"]["p99"]),
                f(&s["session_ms"]["max"]),
            ),
        );
    }
    if mode == "idle" {
        add("disconnects", f(&r["deliveries"]["disconnects"]));
    }
    let m = &r["memory"];
    if !m["per_connection_rss_bytes"].is_null() {
        add(
            "server memory kB",
            format!(
                "RSS {} -> {} (end {}), PSS {} -> {} (end {})",
                f(&m["before"]["rss_kb"]),
                f(&m["ready"]["rss_kb"]),
                f(&m["end"]["rss_kb"]),
                f(&m["before"]["pss_kb"]),
                f(&m["ready"]["pss_kb"]),
                f(&m["end"]["pss_kb"]),
            ),
        );
        add(
            "per connection",
            format!(
                "RSS {} B, PSS {} B",
                f(&m["per_connection_rss_bytes"]),
                f(&m["per_connection_pss_bytes"]),
            ),
        );
    }
    let cpu = &r["cpu"];
    add(
        "cpu in window",
        format!(
            "% of one core over {}s: server {}, client {}, redis {}, other processes {} (load avg {} -> {})",
            f(&cpu["window_s"]),
            f(&cpu["server_pct"]),
            f(&cpu["client_pct"]),
            f(&cpu["redis_pct"]),
            f(&cpu["others_pct"]),
            f(&cpu["loadavg_1m_start"]),
            f(&cpu["loadavg_1m_end"]),
        ),
    );
    if let Some(es) = r["errors"].as_array() {
        if !es.is_empty() {
            add(
                "errors",
                format!("{} (first: {})", f(&r["error_count"]), f(&es[0])),
            );
        }
    }
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&format!("{k:<w$}  {v}\n"));
    }
    out
}
