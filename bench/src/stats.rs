//! Histograms, their JSON form, and samples of other processes' memory and CPU from /proc.

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock microseconds since the Unix epoch. Every process of a run (and
/// every shard) stamps and reads message times with this clock, so latencies
/// measured in different processes add up.
pub fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A histogram of microseconds: 1 µs to one hour, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds")
}

pub fn record(h: &mut Histogram<u64>, us: u64) {
    h.saturating_record(us.max(1));
}

/// The histogram as `[[value_us, count], ...]`, so shards can be merged exactly.
pub fn hist_to_json(h: &Histogram<u64>) -> Value {
    let pairs: Vec<Value> = h
        .iter_recorded()
        .map(|v| json!([v.value_iterated_to(), v.count_at_value()]))
        .collect();
    Value::Array(pairs)
}

pub fn hist_add_json(h: &mut Histogram<u64>, v: &Value) {
    if let Some(arr) = v.as_array() {
        for p in arr {
            let value = p.get(0).and_then(Value::as_u64).unwrap_or(0);
            let count = p.get(1).and_then(Value::as_u64).unwrap_or(0);
            if count > 0 {
                let _ = h.record_n(value.max(1), count);
            }
        }
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Percentiles in milliseconds (null when nothing was recorded).
pub fn summary_ms(h: &Histogram<u64>, quantiles: &[(&str, f64)]) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("count".into(), json!(h.len()));
    for (name, q) in quantiles {
        let v = if h.is_empty() {
            Value::Null
        } else {
            json!(ms(h.value_at_quantile(*q)))
        };
        m.insert((*name).into(), v);
    }
    m.insert(
        "max".into(),
        if h.is_empty() {
            Value::Null
        } else {
            json!(ms(h.max()))
        },
    );
    Value::Object(m)
}

pub const LATENCY_QUANTILES: &[(&str, f64)] =
    &[("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)];
pub const CONNECT_QUANTILES: &[(&str, f64)] = &[("p50", 0.5), ("p99", 0.99)];

/// Memory of a set of processes, summed: VmRSS (from /proc/PID/status) and
/// Pss (from /proc/PID/smaps_rollup), in kB. None for a process that is gone.
#[derive(Clone, Copy, Debug, Default)]
pub struct Mem {
    pub rss_kb: u64,
    pub pss_kb: u64,
    pub missing: u32,
}

fn field_kb(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l[key.len()..].split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

pub fn sample_mem(pids: &[u32]) -> Mem {
    let mut m = Mem::default();
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok();
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok();
        match (
            status.as_deref().and_then(|s| field_kb(s, "VmRSS:")),
            rollup.as_deref().and_then(|s| field_kb(s, "Pss:")),
        ) {
            (Some(r), Some(p)) => {
                m.rss_kb += r;
                m.pss_kb += p;
            }
            _ => m.missing += 1,
        }
    }
    m
}

pub fn mem_json(m: &Mem) -> Value {
    json!({"rss_kb": m.rss_kb, "pss_kb": m.pss_kb, "missing_pids": m.missing})
}

/// CPU time (user + system) of a set of processes, in seconds.
pub fn sample_cpu_s(pids: &[u32]) -> f64 {
    let (user, system) = sample_cpu_split_s(pids);
    user + system
}

/// User and system CPU time of a set of processes, in seconds.
pub fn sample_cpu_split_s(pids: &[u32]) -> (f64, f64) {
    // utime and stime are fields 14 and 15 of /proc/PID/stat, counted after
    // the parenthesised command name (which may hold spaces).
    let tick = 100.0; // USER_HZ on Linux
    let (mut user, mut system) = (0u64, 0u64);
    for pid in pids {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            if let Some(close) = s.rfind(')') {
                let rest: Vec<&str> = s[close + 1..].split_whitespace().collect();
                // rest[0] is field 3 (state); utime = field 14 -> rest[11].
                user += rest
                    .get(11)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
                system += rest
                    .get(12)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    (user as f64 / tick, system as f64 / tick)
}

/// Busy CPU time of the whole machine (all cores), in seconds, from /proc/stat.
pub fn sample_machine_busy_s() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = s.lines().next() else {
        return 0.0;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: u64 = [0usize, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| v.get(i))
        .sum();
    busy as f64 / 100.0
}

/// The 1-minute load average.
pub fn loadavg1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}
