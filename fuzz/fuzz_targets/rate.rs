//! `rate::Limit::parse` and `Bucket::allow` on fuzz-chosen directive
//! arguments and message timestamps.
//!
//! Input layout: the first line is the directive's arguments, split on
//! spaces. Then one mode byte, 8 bytes of start time (little-endian), and
//! 2-byte steps. When the arguments do not parse, a limit is built from the
//! mode byte so the bucket is still exercised.
//!
//! Properties:
//! * parse agrees with a re-statement of its grammar (rate "Nr/s" or "Nr/m",
//!   then any number of "burst=N", the last one winning).
//! * With a clock that never goes back, over every window [t_i, t_j] of
//!   allowed messages: count <= rate * (t_j - t_i) + burst + 1.
//! * The limiter is not stricter than its rate: a message one full period
//!   after the last allowed one is always allowed, and so is the first.
//! * A refused message leaves the bucket unchanged.
//! * Any clock (jumps back and forth, near u64::MAX) never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wschat_core::rate::{BadLimit, Bucket, Limit};

const MAX_EVENTS: usize = 512;

fuzz_target!(|data: &[u8]| {
    let nl = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let text = String::from_utf8_lossy(&data[..nl]);
    let args: Vec<&str> = if text.is_empty() {
        Vec::new()
    } else {
        text.split(' ').collect()
    };
    let rest = data.get(nl + 1..).unwrap_or(&[]);

    let parsed = Limit::parse(&args);
    let want = reference_parse(&args);
    match (&parsed, &want) {
        (Ok(l), Ok((rate, burst))) => assert_eq!(
            format!("{l:?}"),
            format!("Limit {{ per_sec_milli: {rate}, burst_milli: {burst} }}"),
            "{args:?}"
        ),
        (Err(a), Err(b)) => {
            assert_eq!(a, b, "{args:?}");
            assert!(!a.to_string().is_empty());
        }
        _ => panic!("parse({args:?}) = {parsed:?}, grammar says {want:?}"),
    }

    let Some((&mode, rest)) = rest.split_first() else {
        return;
    };
    let (limit, (rate, burst)) = match (parsed, want) {
        (Ok(l), Ok(nums)) => (l, nums),
        _ => {
            let count = u64::from(mode % 50) + 1;
            let unit = if mode & 0x40 != 0 { "m" } else { "s" };
            let rate_arg = format!("{count}r/{unit}");
            let burst_arg = format!("burst={}", (mode >> 3) % 8);
            let a = [rate_arg.as_str(), burst_arg.as_str()];
            (Limit::parse(&a).unwrap(), reference_parse(&a).unwrap())
        }
    };
    let (start, steps) = if rest.len() >= 8 {
        let (s, r) = rest.split_at(8);
        (u64::from_le_bytes(s.try_into().unwrap()), r)
    } else {
        (0, rest)
    };
    // Mode bit 7: arbitrary clock (absolute times, may go backwards).
    // Otherwise a monotone clock; bits 0..3 of each step's high byte pick a
    // scale so that both bursts and long idle gaps are reachable.
    let monotone = mode & 0x80 == 0;
    let mut now = if monotone { start >> (mode & 0x3f) } else { start };
    let mut bucket = Bucket::default();
    let mut allowed_at: Vec<u64> = Vec::new();
    let period = 1_000_000u64.div_ceil(rate);

    for step in steps.chunks_exact(2).take(MAX_EVENTS) {
        let v = u16::from_le_bytes([step[0], step[1]]);
        if monotone {
            let delta = u64::from(v & 0x0fff) << (4 * u64::from(v >> 12)).min(60);
            now = now.saturating_add(delta);
        } else {
            now = start.wrapping_add(u64::from(v).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        }
        let before = bucket.clone();
        let ok = bucket.allow(&limit, now);
        if !ok {
            assert_eq!(format!("{before:?}"), format!("{bucket:?}"), "refusal changed state");
        }
        if monotone {
            match allowed_at.last() {
                None => assert!(ok, "first message refused"),
                Some(&last) if now - last >= period => {
                    assert!(ok, "refused {}ms after the last allowed one (period {period}ms)", now - last)
                }
                _ => {}
            }
            if ok {
                allowed_at.push(now);
            }
        }
    }

    // count - 1 <= rate * window + burst, in thousandths of messages and ms.
    for i in 0..allowed_at.len() {
        for j in i..allowed_at.len() {
            let count = (j - i + 1) as u128;
            let window_ms = u128::from(allowed_at[j] - allowed_at[i]);
            let lhs = (count - 1) * 1_000_000;
            let rhs = u128::from(rate) * window_ms + u128::from(burst) * 1000;
            assert!(
                lhs <= rhs,
                "{count} messages allowed within {window_ms}ms at {rate}/1000 per s, burst {burst}/1000"
            );
        }
    }
});

fn reference_parse(args: &[&str]) -> Result<(u64, u64), BadLimit> {
    let Some((first, rest)) = args.split_first() else {
        return Err(BadLimit::Rate);
    };
    let Some(i) = first.find("r/") else {
        return Err(BadLimit::Rate);
    };
    let count: u64 = first[..i].parse().map_err(|_| BadLimit::Rate)?;
    let per_sec = match &first[i + 2..] {
        "s" => count.checked_mul(1000),
        "m" => count.checked_mul(1000).map(|c| c / 60),
        _ => None,
    };
    let per_sec = match per_sec {
        Some(r) if r > 0 => r,
        _ => return Err(BadLimit::Rate),
    };
    let mut burst = 0;
    for arg in rest {
        let Some(n) = arg.strip_prefix("burst=") else {
            return Err(BadLimit::Argument);
        };
        burst = n
            .parse::<u64>()
            .map_err(|_| BadLimit::Burst)?
            .checked_mul(1000)
            .ok_or(BadLimit::Burst)?;
    }
    Ok((per_sec, burst))
}
