//! JSON text of the events the server sends to clients. Hand-written
//! because the shapes are fixed and this runs once per chat message per
//! worker, where a general serializer would only add allocations.

/// Which presence event to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    Join,
    Leave,
}

/// Room of slack for escapes and the decimal timestamp, so typical events
/// never reallocate.
const SLACK: usize = 32;

/// Who is in the room, for `welcome`: some members (as
/// `presence::member_json`) and how many there are in all.
pub struct Roster<'a> {
    pub members: &'a [String],
    pub count: usize,
}

pub fn welcome(
    room: &str,
    user: &str,
    session: &str,
    roster: Option<Roster<'_>>,
    ts_ms: u64,
) -> String {
    let listed: usize = roster
        .as_ref()
        .map_or(0, |r| r.members.iter().map(|m| m.len() + 1).sum());
    let mut out =
        String::with_capacity(96 + room.len() + user.len() + session.len() + listed + SLACK);
    out.push_str(r#"{"type":"welcome","room":"#);
    push_string(&mut out, room);
    push_user_and_session(&mut out, user, session);
    if let Some(r) = roster {
        out.push_str(r#","members":["#);
        out.push_str(&r.members.join(","));
        out.push_str(r#"],"count":"#);
        push_u64(&mut out, r.count as u64);
    }
    push_ts_and_close(&mut out, ts_ms);
    out
}

/// What follows a message event's id: the id is the last field, so a head
/// plus an id plus this is the whole event.
pub const ID_TAIL: &str = "\"}";

/// A message event up to and including `"id":"`, for an id that Redis
/// assigns when it stores the message (see `history`).
pub fn message_head(room: &str, user: &str, session: &str, text: &str, ts_ms: u64) -> String {
    let mut out =
        String::with_capacity(96 + room.len() + user.len() + session.len() + text.len() + SLACK);
    out.push_str(r#"{"type":"message","room":"#);
    push_string(&mut out, room);
    push_user_and_session(&mut out, user, session);
    out.push_str(r#","text":"#);
    push_string(&mut out, text);
    out.push_str(r#","ts":"#);
    push_u64(&mut out, ts_ms);
    out.push_str(r#","id":""#);
    out
}

/// A whole message event: its head, an id (JSON-safe: generated, never
/// user text) and the tail.
pub fn message(room: &str, user: &str, session: &str, text: &str, ts_ms: u64, id: &str) -> String {
    let mut out = message_head(room, user, session, text, ts_ms);
    out.push_str(id);
    out.push_str(ID_TAIL);
    out
}

/// A `join` or `leave` event up to and including `"ts":`, for a time
/// filled in later (by Redis, when it sweeps a dead node's members).
pub fn presence_head(kind: Presence, room: &str, user: &str, session: &str) -> String {
    let mut out = String::with_capacity(72 + room.len() + user.len() + session.len() + SLACK);
    out.push_str(match kind {
        Presence::Join => r#"{"type":"join","room":"#,
        Presence::Leave => r#"{"type":"leave","room":"#,
    });
    push_string(&mut out, room);
    push_user_and_session(&mut out, user, session);
    out.push_str(r#","ts":"#);
    out
}

/// A `join` or `leave` event up to and including `"id":"`, for an id that
/// Redis assigns as it publishes (the room's presence counter).
pub fn presence_id_head(
    kind: Presence,
    room: &str,
    user: &str,
    session: &str,
    ts_ms: u64,
) -> String {
    let mut out = presence_head(kind, room, user, session);
    push_u64(&mut out, ts_ms);
    out.push_str(r#","id":""#);
    out
}

/// `history`: message events (already JSON), oldest first.
pub fn history<'a>(room: &str, ts_ms: u64, messages: impl Iterator<Item = &'a str>) -> String {
    let mut out = String::with_capacity(64 + room.len() + SLACK);
    out.push_str(r#"{"type":"history","room":"#);
    push_string(&mut out, room);
    out.push_str(r#","messages":["#);
    for (i, m) in messages.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(m);
    }
    out.push(']');
    push_ts_and_close(&mut out, ts_ms);
    out
}

/// `gap`: what the member missed since `since` is no longer all there.
pub fn gap(room: &str, since: &str, message: &str, ts_ms: u64) -> String {
    let mut out = String::with_capacity(64 + room.len() + since.len() + message.len() + SLACK);
    out.push_str(r#"{"type":"gap","room":"#);
    push_string(&mut out, room);
    out.push_str(r#","since":"#);
    push_string(&mut out, since);
    out.push_str(r#","message":"#);
    push_string(&mut out, message);
    push_ts_and_close(&mut out, ts_ms);
    out
}

fn push_user_and_session(out: &mut String, user: &str, session: &str) {
    out.push_str(r#","user":"#);
    push_string(out, user);
    out.push_str(r#","session":"#);
    push_string(out, session);
}

/// Which kind of out-of-band event to build: `error` when something the
/// client did or expects failed, `notice` when service is back to normal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Error,
    Notice,
}

pub fn error(room: &str, code: &str, message: &str, ts_ms: u64) -> String {
    status(Status::Error, room, code, message, ts_ms)
}

pub fn status(kind: Status, room: &str, code: &str, message: &str, ts_ms: u64) -> String {
    let mut out = String::with_capacity(56 + room.len() + code.len() + message.len() + SLACK);
    out.push_str(match kind {
        Status::Error => r#"{"type":"error","room":"#,
        Status::Notice => r#"{"type":"notice","room":"#,
    });
    push_string(&mut out, room);
    out.push_str(r#","code":"#);
    push_string(&mut out, code);
    out.push_str(r#","message":"#);
    push_string(&mut out, message);
    push_ts_and_close(&mut out, ts_ms);
    out
}

/// Event ids: a per-worker random seed makes them unique across workers and
/// hosts without coordination; the counter makes them unique within one.
pub struct IdGen {
    seed: u64,
    counter: u64,
}

/// The seed is printed as exactly 12 hex digits, i.e. 48 bits.
const SEED_MASK: u64 = (1 << 48) - 1;

impl IdGen {
    pub fn new(seed: u64) -> Self {
        IdGen {
            seed: seed & SEED_MASK,
            counter: 0,
        }
    }

    /// This generator's part of every id: the name of its worker ("node")
    /// in presence leases.
    pub fn node(&self) -> String {
        format!("{:012x}", self.seed)
    }

    pub fn next_id(&mut self) -> String {
        self.counter += 1;
        format!("{:012x}-{:x}", self.seed, self.counter)
    }
}

fn push_ts_and_close(out: &mut String, ts_ms: u64) {
    out.push_str(r#","ts":"#);
    push_u64(out, ts_ms);
    out.push('}');
}

/// Avoids `to_string()`'s temporary allocation.
fn push_u64(out: &mut String, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &buf[i..] {
        out.push(char::from(d));
    }
}

/// Appends `s` as a quoted JSON string (RFC 8259). U+2028/U+2029 are also
/// escaped: they are legal in JSON but end a line in older JavaScript, which
/// would break clients that splice the text into script.
pub fn push_json_string(out: &mut String, s: &str) {
    push_string(out, s);
}

/// Whether `b` may start something `push_string` escapes (0xe2 leads
/// U+2028 and U+2029).
fn may_escape(b: u8) -> bool {
    (b < 0x20) | (b == b'"') | (b == b'\\') | (b == 0xe2)
}

fn push_string(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    let bytes = s.as_bytes();
    // Copy unescaped runs in one go; every split point is an ASCII byte or
    // the lead byte of U+2028/9, so slices stay on char boundaries.
    let mut run_start = 0;
    let mut i = 0;
    while i < bytes.len() {
        // Plain text is passed 16 bytes per test (the test has no branches,
        // so it vectorises): a byte at a time was 5% of a worker with 16 KB
        // messages.
        if let Some(chunk) = bytes.get(i..i + 16) {
            if !chunk.iter().fold(false, |any, &b| any | may_escape(b)) {
                i += 16;
                continue;
            }
        }
        let b = bytes[i];
        let (escape, width): (Option<&str>, usize) = match b {
            b'"' => (Some("\\\""), 1),
            b'\\' => (Some("\\\\"), 1),
            b'\n' => (Some("\\n"), 1),
            b'\r' => (Some("\\r"), 1),
            b'\t' => (Some("\\t"), 1),
            0x08 => (Some("\\b"), 1),
            0x0c => (Some("\\f"), 1),
            // Remaining controls have no short form.
            0x00..=0x1f => (None, 1),
            0xe2 if bytes.get(i + 1) == Some(&0x80) && bytes.get(i + 2) == Some(&0xa8) => {
                (Some("\\u2028"), 3)
            }
            0xe2 if bytes.get(i + 1) == Some(&0x80) && bytes.get(i + 2) == Some(&0xa9) => {
                (Some("\\u2029"), 3)
            }
            _ => {
                i += 1;
                continue;
            }
        };
        out.push_str(&s[run_start..i]);
        match escape {
            Some(e) => out.push_str(e),
            None => {
                out.push_str("\\u00");
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0x0f)]));
            }
        }
        i += width;
        run_start = i;
    }
    out.push_str(&s[run_start..]);
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quoted(s: &str) -> String {
        let mut out = String::new();
        push_string(&mut out, s);
        out
    }

    #[test]
    fn escapes_anywhere_in_long_text() {
        // Every position against the 16-byte steps over plain text, with
        // multi-byte characters straddling the steps' edges.
        for special in ["\"", "\\", "\n", "\u{1}", "\u{2028}", "é"] {
            for at in 0..40 {
                let text = format!(
                    "{}{special}{}",
                    "aé".repeat(at / 3) + &"b".repeat(at % 3),
                    "c".repeat(40 - at)
                );
                let want = format!(
                    "\"{}\"",
                    text.replace('\\', "\\\\")
                        .replace('"', "\\\"")
                        .replace('\n', "\\n")
                        .replace('\u{1}', "\\u0001")
                        .replace('\u{2028}', "\\u2028")
                );
                assert_eq!(quoted(&text), want, "{special:?} at {at}");
            }
        }
    }

    #[test]
    fn escapes_quote_and_backslash() {
        assert_eq!(quoted(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(quoted(r"\\"), r#""\\\\""#);
    }

    #[test]
    fn escapes_named_controls() {
        assert_eq!(quoted("\n\r\t\u{8}\u{c}"), r#""\n\r\t\b\f""#);
    }

    #[test]
    fn escapes_other_controls_as_hex() {
        assert_eq!(quoted("\u{0}x\u{1}\u{1f}"), r#""\u0000x\u0001\u001f""#);
        assert_eq!(quoted("\u{b}"), r#""\u000b""#);
    }

    #[test]
    fn leaves_del_and_slash_alone() {
        // Neither needs escaping in JSON.
        assert_eq!(quoted("\u{7f}/ "), "\"\u{7f}/ \"");
    }

    #[test]
    fn escapes_line_and_paragraph_separators() {
        assert_eq!(quoted("a\u{2028}b\u{2029}"), r#""a\u2028b\u2029""#);
        // Same lead bytes, different code point: must stay verbatim.
        assert_eq!(
            quoted("\u{2027}\u{202a}\u{20ac}"),
            "\"\u{2027}\u{202a}\u{20ac}\""
        );
    }

    #[test]
    fn unicode_verbatim() {
        assert_eq!(quoted("héllo 世界 🎉"), "\"héllo 世界 🎉\"");
        assert_eq!(quoted("🎉\n世"), "\"🎉\\n世\"");
        assert_eq!(quoted(""), "\"\"");
    }

    #[test]
    fn numbers() {
        let mut s = String::new();
        push_u64(&mut s, 0);
        s.push(' ');
        push_u64(&mut s, 1_700_000_000_123);
        s.push(' ');
        push_u64(&mut s, u64::MAX);
        assert_eq!(s, "0 1700000000123 18446744073709551615");
    }

    #[test]
    fn welcome_shape() {
        assert_eq!(
            welcome("lobby", "ann", "s-1", None, 1_700_000_000_000),
            r#"{"type":"welcome","room":"lobby","user":"ann","session":"s-1","ts":1700000000000}"#
        );
        let members = [r#"{"user":"ann","session":"s-1"}"#.to_owned()];
        let roster = Roster {
            members: &members,
            count: 3,
        };
        assert_eq!(
            welcome("r", "ann", "s-1", Some(roster), 5),
            r#"{"type":"welcome","room":"r","user":"ann","session":"s-1","members":[{"user":"ann","session":"s-1"}],"count":3,"ts":5}"#
        );
    }

    #[test]
    fn message_shape() {
        assert_eq!(
            message("r\"1", "bob", "s-2", "hi\nthere", 5, "1700000000000-1"),
            r#"{"type":"message","room":"r\"1","user":"bob","session":"s-2","text":"hi\nthere","ts":5,"id":"1700000000000-1"}"#
        );
    }

    #[test]
    fn a_head_plus_id_plus_tail_is_the_message() {
        let head = message_head("r", "u", "s", "t", 1);
        assert!(head.ends_with(r#""id":""#));
        assert_eq!(
            head + "9-9" + ID_TAIL,
            message("r", "u", "s", "t", 1, "9-9")
        );
    }

    #[test]
    fn presence_shapes() {
        // Redis appends the id (`p<n>`) and the tail when it publishes.
        assert_eq!(
            presence_id_head(Presence::Join, "lobby", "ann", "s-1", 7) + "p1" + ID_TAIL,
            r#"{"type":"join","room":"lobby","user":"ann","session":"s-1","ts":7,"id":"p1"}"#
        );
        assert_eq!(
            presence_head(Presence::Leave, "lobby", "ann", "s-1") + "8" + r#","id":"p2"}"#,
            r#"{"type":"leave","room":"lobby","user":"ann","session":"s-1","ts":8,"id":"p2"}"#
        );
    }

    #[test]
    fn history_and_gap_shapes() {
        assert_eq!(
            history("r", 3, [r#"{"a":1}"#, r#"{"b":2}"#].into_iter()),
            r#"{"type":"history","room":"r","messages":[{"a":1},{"b":2}],"ts":3}"#
        );
        assert_eq!(
            history("r", 3, std::iter::empty()),
            r#"{"type":"history","room":"r","messages":[],"ts":3}"#
        );
        assert_eq!(
            gap("r", "5-0", "lost", 4),
            r#"{"type":"gap","room":"r","since":"5-0","message":"lost","ts":4}"#
        );
    }

    #[test]
    fn error_shape() {
        assert_eq!(
            error("lobby", "backlog_full", "too \"slow\"", 9),
            r#"{"type":"error","room":"lobby","code":"backlog_full","message":"too \"slow\"","ts":9}"#
        );
    }

    #[test]
    fn notice_shape() {
        assert_eq!(
            status(Status::Notice, "r", "redis_available", "back", 1),
            r#"{"type":"notice","room":"r","code":"redis_available","message":"back","ts":1}"#
        );
    }

    #[test]
    fn ids_unique_and_formatted() {
        let mut g = IdGen::new(0xabc);
        assert_eq!(g.next_id(), "000000000abc-1");
        assert_eq!(g.next_id(), "000000000abc-2");
        for _ in 0..13 {
            g.next_id();
        }
        assert_eq!(g.next_id(), "000000000abc-10");
        // Different seeds never collide even with equal counters.
        assert_ne!(IdGen::new(1).next_id(), IdGen::new(2).next_id());
    }

    #[test]
    fn id_seed_is_always_12_digits() {
        let id = IdGen::new(u64::MAX).next_id();
        assert_eq!(id, "ffffffffffff-1");
    }
}
