//! `names::percent_decode`, `names::room` and `names::user` on raw query
//! bytes, against their documented rules.
//!
//! Input layout: bytes 0..4 are the guest number (little-endian), the rest
//! is the raw (still URL-encoded) value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wschat_core::names::{percent_decode, room, user, BadRoom, MAX_ROOM_CHARS, MAX_USER_CHARS};

fuzz_target!(|data: &[u8]| {
    let (random, raw) = if data.len() >= 4 {
        let (r, raw) = data.split_at(4);
        (u32::from_le_bytes(r.try_into().unwrap()), raw)
    } else {
        (0, data)
    };

    // percent_decode: equal to a plain re-statement, never longer, the
    // identity on text without '%' or '+', and undoes full escaping.
    let decoded = percent_decode(raw);
    assert_eq!(decoded, reference_decode(raw));
    assert!(decoded.len() <= raw.len());
    if !raw.contains(&b'%') && !raw.contains(&b'+') {
        assert_eq!(decoded, raw);
    }
    assert_eq!(percent_decode(&escape_all(raw, false)), raw);
    assert_eq!(percent_decode(&escape_all(raw, true)), raw);

    // room: the documented rules, and the reason for a refusal.
    match room(raw) {
        Ok(name) => {
            if decoded.is_empty() {
                assert_eq!(name, "lobby");
            } else {
                assert_eq!(name.as_bytes(), decoded.as_slice());
            }
            let chars = name.chars().count();
            assert!((1..=MAX_ROOM_CHARS).contains(&chars), "{chars} chars");
            assert!(!name.chars().any(char::is_control), "{name:?}");
            assert_eq!(name.trim(), name, "untrimmed {name:?}");
        }
        Err(why) => {
            assert!(!decoded.is_empty());
            let expected = match std::str::from_utf8(&decoded) {
                Err(_) => BadRoom::NotUtf8,
                Ok(s) if s.chars().count() > MAX_ROOM_CHARS => BadRoom::TooLong,
                Ok(s) if s.chars().any(char::is_control) => BadRoom::ControlCharacter,
                Ok(s) if s.trim() != s => BadRoom::SurroundingWhitespace,
                Ok(s) => panic!("room {s:?} refused as {why:?}"),
            };
            assert_eq!(why, expected);
            assert!(!why.to_string().is_empty());
        }
    }

    // user: always presentable.
    let name = user(raw, random);
    assert!(!name.is_empty());
    assert!(!name.chars().any(char::is_control), "{name:?}");
    assert_eq!(name.trim(), name, "untrimmed {name:?}");
    let lossy = String::from_utf8_lossy(&decoded);
    let cleaned: String = lossy.chars().filter(|c| !c.is_control()).collect();
    let cleaned = cleaned.trim();
    let guest = format!("guest-{:04}", random % 10000);
    if cleaned.is_empty() {
        assert_eq!(name, guest);
    } else {
        // What the client typed, cut at the cap (and never mid-character).
        assert!(name.chars().count() <= MAX_USER_CHARS, "{name:?}");
        assert!(cleaned.starts_with(&name), "{name:?} is not a prefix of {cleaned:?}");
        if cleaned.chars().count() <= MAX_USER_CHARS {
            assert_eq!(name, cleaned);
        }
    }
});

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn reference_decode(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = raw;
    while let Some((&b, tail)) = rest.split_first() {
        match (b, tail) {
            (b'%', [h, l, more @ ..]) if hex(*h).is_some() && hex(*l).is_some() => {
                out.push(hex(*h).unwrap() * 16 + hex(*l).unwrap());
                rest = more;
                continue;
            }
            (b'+', _) => out.push(b' '),
            (b, _) => out.push(b),
        }
        rest = tail;
    }
    out
}

fn escape_all(raw: &[u8], upper: bool) -> Vec<u8> {
    raw.iter()
        .flat_map(|b| {
            let s = if upper {
                format!("%{b:02X}")
            } else {
                format!("%{b:02x}")
            };
            s.into_bytes()
        })
        .collect()
}
