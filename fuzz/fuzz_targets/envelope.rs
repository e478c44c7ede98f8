//! The hand-written JSON of `envelope` against serde_json: every event must
//! parse as one JSON object whose fields round-trip exactly, with nothing
//! left raw that the module promises to escape.
//!
//! Input layout: byte 0 picks the event, bytes 1..9 are the timestamp
//! (little-endian), the rest is split on 0xFF (never part of UTF-8) into the
//! string fields (0 room, 1 user, 2 text, 4 session), each decoded lossily.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use wschat_core::envelope::{self, IdGen, Presence, Status};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let (ts, rest) = if rest.len() >= 8 {
        let (t, r) = rest.split_at(8);
        (u64::from_le_bytes(t.try_into().unwrap()), r)
    } else {
        (0, rest)
    };
    let fields: Vec<String> = rest
        .split(|&b| b == 0xff)
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    let f = |i: usize| fields.get(i).map_or("", String::as_str);
    let (room, user, text, session) = (f(0), f(1), f(2), f(4));
    // A message's id is generated, never user text: a history position, or
    // (every other selector) one from IdGen, whose format is checked too.
    let id = if which & 0x10 != 0 {
        let mut gen = IdGen::new(ts);
        let times = which >> 5;
        let mut id = gen.next_id();
        for _ in 0..times {
            id = gen.next_id();
        }
        let want = format!("{:012x}-{:x}", ts & ((1 << 48) - 1), u64::from(times) + 1);
        assert_eq!(id, want);
        id
    } else {
        format!("{ts}-{which}")
    };

    let (json, want): (String, Vec<(&str, Value)>) = match which % 7 {
        0 => (
            envelope::welcome(room, user, session, None, ts),
            vec![
                ("type", s("welcome")),
                ("room", s(room)),
                ("user", s(user)),
                ("session", s(session)),
            ],
        ),
        1 => (
            envelope::message(room, user, session, text, ts, &id),
            vec![
                ("type", s("message")),
                ("room", s(room)),
                ("user", s(user)),
                ("session", s(session)),
                ("text", s(text)),
                ("id", s(&id)),
            ],
        ),
        2 | 3 => {
            let (kind, name) = if which % 7 == 2 {
                (Presence::Join, "join")
            } else {
                (Presence::Leave, "leave")
            };
            // Redis appends the id (`p<n>`) and the tail when it publishes.
            let id = format!("p{which}");
            (
                envelope::presence_id_head(kind, room, user, session, ts) + &id + envelope::ID_TAIL,
                vec![
                    ("type", s(name)),
                    ("room", s(room)),
                    ("user", s(user)),
                    ("session", s(session)),
                    ("id", s(&id)),
                ],
            )
        }
        k => {
            // user/text double as code/message here.
            let (json, name) = match k {
                4 => (
                    envelope::status(Status::Error, room, user, text, ts),
                    "error",
                ),
                5 => (
                    envelope::status(Status::Notice, room, user, text, ts),
                    "notice",
                ),
                _ => (envelope::error(room, user, text, ts), "error"),
            };
            if k == 6 {
                assert_eq!(json, envelope::status(Status::Error, room, user, text, ts));
            }
            (
                json,
                vec![
                    ("type", s(name)),
                    ("room", s(room)),
                    ("code", s(user)),
                    ("message", s(text)),
                ],
            )
        }
    };

    // Nothing the spec or the module's own promise forbids is left raw:
    // control characters and U+2028/U+2029 (which end a line in older JS).
    assert!(
        !json
            .chars()
            .any(|c| c < '\u{20}' || c == '\u{2028}' || c == '\u{2029}'),
        "raw control or separator in {json:?}"
    );
    assert!(json.starts_with(r#"{"type":""#) && json.ends_with('}'));

    let parsed: Value =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("not JSON ({e}): {json:?}"));
    let obj: &Map<String, Value> = parsed.as_object().expect("an object");
    // Exactly the expected fields, each exactly equal.
    assert_eq!(obj.len(), want.len() + 1, "field count in {json:?}");
    for (k, v) in &want {
        assert_eq!(obj.get(*k), Some(v), "field {k} in {json:?}");
    }
    assert_eq!(
        obj.get("ts").and_then(Value::as_u64),
        Some(ts),
        "ts in {json:?}"
    );
    // Escaping is minimal: ASCII text needing no escape appears verbatim.
    for (k, v) in &want {
        if let Value::String(v) = v {
            if v.chars()
                .all(|c| c.is_ascii() && !c.is_ascii_control() && c != '"' && c != '\\')
            {
                assert!(
                    json.contains(&format!("\"{k}\":\"{v}\"")),
                    "{k} not verbatim"
                );
            }
        }
    }
});

fn s(v: &str) -> Value {
    Value::String(v.to_owned())
}
