//! The readers of what Redis answers, past RESP framing: the history fetch
//! script's reply (`history::decode`), `CLUSTER SLOTS` (`slots::
//! parse_cluster_slots`), `MOVED`/`ASK` errors (`slots::parse_redirect`) and
//! the ids read back out of events (`history::position_of`,
//! `presence::seq_of`).
//!
//! Input layout: byte 0 chooses the fetch request (bit 0: `since` given;
//! bits 1-7: its count), byte 1 the members wanted, the rest is one RESP
//! value as the `redis` crate parses it (inputs it refuses are skipped).
//!
//! Properties:
//! * Nothing panics, whatever the value's shape.
//! * `decode` accepts exactly the replies a re-statement of the script's
//!   reply accepts (an array of 9, the first an array of well-formed
//!   entries, a counter that is not negative, a member list of UTF-8
//!   strings), and then yields those entries newest last, each as head +
//!   id + tail; without `since` all of them and no gap, with `since` at most
//!   `count` and a gap whenever more came.
//! * A slot map that is accepted has ranges inside 0..16384 that never
//!   overlap, no unknown (`?`) or empty host, and is not empty.
//! * A redirect that is accepted has a slot below 16384, says `ASK` exactly
//!   when the code was `ASK`, and reads back the same from its own
//!   `<slot> <node>` text.
//! * Every id read out of an event writes back as an id that reads the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use redis::Value;
use wschat_core::history::{self, Position, Request};
use wschat_core::presence;
use wschat_core::slots::{self, Node};

const SLOTS: i64 = 16384;

fuzz_target!(|data: &[u8]| {
    let [r0, r1, resp @ ..] = data else {
        return;
    };
    let Ok(value) = redis::parse_redis_value(resp) else {
        return;
    };
    let req = Request {
        since: (r0 & 1 == 1).then_some(Position { ms: 1000, seq: 0 }),
        count: usize::from(r0 >> 1),
        keep_ms: 60_000,
        members: usize::from(*r1),
    };
    check_decode(&value, &req);
    let asked = Node {
        host: "127.0.0.1".into(),
        port: 7000,
    };
    check_slot_map(&value, &asked);
    for_each_text(&value, &mut |text| check_text(text, &asked));
});

fn text(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// An entry `[id, [field, value, …]]` as the append script writes it: the
/// event is the last `h`, the id, and the last `t`; an odd last field is
/// ignored; any field name that is not a string refuses the entry.
fn expected_entry(v: &Value) -> Option<(Position, String)> {
    let Value::Array(parts) = v else { return None };
    if parts.len() != 2 {
        return None;
    }
    let Value::Array(fields) = &parts[1] else {
        return None;
    };
    let id = Position::parse(std::str::from_utf8(text(&parts[0])?).ok()?)?;
    let (mut head, mut tail) = (None, None);
    let mut i = 0;
    while i + 1 < fields.len() {
        let name = text(&fields[i])?;
        if name == b"h" || name == b"t" {
            let value = std::str::from_utf8(text(&fields[i + 1])?).ok()?;
            if name == b"h" {
                head = Some(value);
            } else {
                tail = Some(value);
            }
        }
        i += 2;
    }
    Some((id, format!("{}{}{}", head?, id, tail?)))
}

fn check_decode(value: &Value, req: &Request) {
    let got = history::decode(value, req, 2_000_000);
    let parts = match value {
        Value::Array(parts) if parts.len() == 9 => Some(parts),
        _ => None,
    };
    let entries = parts.and_then(|p| match &p[0] {
        Value::Array(e) => Some(e),
        _ => None,
    });
    let messages: Option<Vec<_>> =
        entries.and_then(|e| e.iter().rev().map(expected_entry).collect());
    let seq_ok = parts.is_some_and(|p| !matches!(p[7], Value::Int(n) if n < 0));
    let roster_ok = parts.is_some_and(|p| match (&p[5], &p[6]) {
        (Value::Array(members), Value::Int(count)) => {
            *count >= 0
                && (members.iter()).all(|m| text(m).is_some_and(|t| std::str::from_utf8(t).is_ok()))
        }
        _ => true,
    });
    let accepted = messages.is_some() && seq_ok && roster_ok;
    assert_eq!(got.is_ok(), accepted, "decode accepted {value:?}: {got:?}");
    let (Ok(got), Some(mut want)) = (got, messages) else {
        return;
    };
    match req.since.filter(|_| req.count > 0) {
        None => {
            assert!(!got.gap);
        }
        Some(_) => {
            if want.len() > req.count {
                assert!(got.gap, "more than asked for is a gap");
                want.remove(0);
            }
            assert!(got.messages.len() <= req.count);
        }
    }
    assert_eq!(got.messages, want);
}

fn check_slot_map(value: &Value, asked: &Node) {
    let Ok(map) = slots::parse_cluster_slots(value, asked) else {
        return;
    };
    assert!(!map.ranges.is_empty());
    let mut claimed = vec![false; SLOTS as usize];
    for (first, last, node) in &map.ranges {
        assert!(first <= last && i64::from(*last) < SLOTS);
        assert!(node.host != "?" && !node.host.is_empty());
        for c in &mut claimed[usize::from(*first)..=usize::from(*last)] {
            assert!(!std::mem::replace(c, true), "two ranges claim a slot");
        }
    }
}

fn for_each_text(v: &Value, f: &mut impl FnMut(&[u8])) {
    match v {
        Value::Array(items) | Value::Set(items) => items.iter().for_each(|i| for_each_text(i, f)),
        Value::ServerError(e) => {
            let mut line = e.code().as_bytes().to_vec();
            line.push(b' ');
            line.extend_from_slice(e.details().unwrap_or("").as_bytes());
            f(&line);
        }
        _ => {
            if let Some(t) = text(v) {
                f(t);
            }
        }
    }
}

fn check_text(text: &[u8], asked: &Node) {
    if let Some(pos) = history::position_of(text) {
        assert_eq!(Position::parse(&pos.to_string()), Some(pos));
    }
    if let Some(seq) = presence::seq_of(text) {
        let event = format!(r#"{{"type":"join","id":"p{seq}"}}"#);
        assert_eq!(presence::seq_of(event.as_bytes()), Some(seq));
    }
    let Ok(line) = std::str::from_utf8(text) else {
        return;
    };
    let (code, details) = line.split_once(' ').unwrap_or((line, ""));
    let Some(redirect) = slots::parse_redirect(code, details, asked) else {
        return;
    };
    assert!(i64::from(redirect.slot) < SLOTS);
    assert_eq!(redirect.ask, code == "ASK");
    let again = slots::parse_redirect(code, &format!("{} {}", redirect.slot, redirect.to), asked);
    assert_eq!(
        again.as_ref(),
        Some(&redirect),
        "{line:?} reads back differently"
    );
}
