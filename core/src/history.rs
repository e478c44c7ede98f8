//! A room's history in Redis: a stream under the room's channel name, where
//! each message is appended and published in one atomic step, so that the
//! entry id Redis assigns is the message's id and its position. "What did I
//! miss since X" and "is this a duplicate at the seam" are then comparisons.

use std::fmt;

use redis::Value;

/// A message's place in its room: a Redis stream entry id `<ms>-<seq>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub ms: u64,
    pub seq: u64,
}

impl Position {
    /// Parses `<ms>-<seq>` (both decimal, at most 20 digits each).
    pub fn parse(s: &str) -> Option<Position> {
        let (ms, seq) = s.split_once('-')?;
        let digits = |p: &str| {
            (!p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit()))
                .then(|| p.parse::<u64>().ok())
                .flatten()
        };
        Some(Position {
            ms: digits(ms)?,
            seq: digits(seq)?,
        })
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Appends a message to the stream KEYS[1], trims it to about ARGV[1]
/// entries, keeps it for ARGV[2] ms, and publishes the whole event
/// (head ARGV[3] .. id .. tail ARGV[4]) on the channel of the same name.
pub const APPEND_SCRIPT: &str = "\
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'h', ARGV[3], 't', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PUBLISH', KEYS[1], ARGV[3] .. id .. ARGV[4])
return id";

/// Returns, for stream KEYS[1]: the newest ARGV[2] entries after ARGV[1]
/// (all if ARGV[1] is empty; none if ARGV[2] is 0), newest first; the
/// oldest entry id kept; whether ARGV[1] itself is still kept (1/0); how
/// many entries the stream ever had and has now (Redis 7+, else false),
/// which tells a trimmed stream from one made anew; unless ARGV[3] is 0, up
/// to ARGV[3] members of the room's members hash KEYS[2], their count, and
/// the room's presence counter KEYS[3]; and the stream's time to live in
/// ms (negative: none), for a worker's copy of it (`recent`).
pub const FETCH_SCRIPT: &str = "\
local entries, oldest, kept, added, length, ttl = {}, false, 0, false, false, -2
if ARGV[2] ~= '0' then
  local start = '-'
  if ARGV[1] ~= '' then
    start = '(' .. ARGV[1]
    kept = #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
  end
  entries = redis.call('XREVRANGE', KEYS[1], '+', start, 'COUNT', ARGV[2])
  local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
  if first[1] then oldest = first[1][1] end
  local info = redis.pcall('XINFO', 'STREAM', KEYS[1])
  if type(info) == 'table' and not info.err then
    for i = 1, #info - 1, 2 do
      if info[i] == 'entries-added' then added = info[i + 1] end
      if info[i] == 'length' then length = info[i + 1] end
    end
  end
  ttl = redis.call('PTTL', KEYS[1])
end
local members, count, seq = false, false, false
local cap = tonumber(ARGV[3])
if cap > 0 then
  count = redis.call('HLEN', KEYS[2])
  seq = tonumber(redis.call('GET', KEYS[3]) or '0')
  members = {}
  local cursor = '0'
  repeat
    local scan = redis.call('HSCAN', KEYS[2], cursor, 'COUNT', cap)
    cursor = scan[1]
    for i = 2, #scan[2], 2 do
      if #members < cap then members[#members + 1] = scan[2][i] end
    end
  until cursor == '0' or #members >= cap
end
return {entries, oldest, kept, added, length, members, count, seq, ttl}";

/// The position in a message event: its last field, `"id":"<ms>-<seq>"`.
/// Other events (presence, notices) have none.
pub fn position_of(event: &[u8]) -> Option<Position> {
    const KEY: &[u8] = br#""id":""#;
    let body = event.strip_suffix(br#""}"#)?;
    let start = body.windows(KEY.len()).rposition(|w| w == KEY)? + KEY.len();
    Position::parse(std::str::from_utf8(&body[start..]).ok()?)
}

/// What a fetch found.
#[derive(Debug, PartialEq, Eq)]
pub struct Fetched {
    /// Message events, oldest first.
    pub messages: Vec<(Position, String)>,
    /// Messages after `since` are missing: trimmed, expired, or more than
    /// were asked for.
    pub gap: bool,
    /// Some of the room's members (JSON objects) and how many there are.
    pub roster: Option<(Vec<String>, usize)>,
    /// The presence counter the roster reflects (see `presence`).
    pub presence_seq: u64,
    /// How long Redis keeps the history if nothing more is said; `None`:
    /// no history, or no expiry.
    pub ttl_ms: Option<u64>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct BadReply;

/// What a fetch asks for.
#[derive(Clone, Copy, Debug)]
pub struct Request {
    /// Only messages after this one; `None` for the newest ones.
    pub since: Option<Position>,
    /// At most this many messages (0: no history).
    pub count: usize,
    /// How long Redis keeps a quiet room's history, in ms.
    pub keep_ms: u64,
    /// At most this many members (0: no member list).
    pub members: usize,
}

impl Request {
    /// COUNT for the script: one more than wanted when resuming, so that
    /// "more were missed than are returned" shows.
    pub fn script_count(&self) -> usize {
        if self.count == 0 {
            return 0;
        }
        self.count + usize::from(self.since.is_some())
    }
}

fn bulk(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn position(v: &Value) -> Option<Position> {
    Position::parse(std::str::from_utf8(bulk(v)?).ok()?)
}

/// One stream entry `[id, [h, head, t, tail]]` as its whole event.
fn entry(v: &Value) -> Option<(Position, String)> {
    let Value::Array(parts) = v else { return None };
    let [id, Value::Array(fields)] = parts.as_slice() else {
        return None;
    };
    let pos = position(id)?;
    let (mut head, mut tail) = (None, None);
    for pair in fields.chunks_exact(2) {
        match bulk(&pair[0])? {
            b"h" => head = Some(std::str::from_utf8(bulk(&pair[1])?).ok()?),
            b"t" => tail = Some(std::str::from_utf8(bulk(&pair[1])?).ok()?),
            _ => {}
        }
    }
    let mut event = String::from(head?);
    event.push_str(&pos.to_string());
    event.push_str(tail?);
    Some((pos, event))
}

/// Reads the reply of `FETCH_SCRIPT`; `now_ms` is the worker's clock.
pub fn decode(reply: &Value, req: &Request, now_ms: u64) -> Result<Fetched, BadReply> {
    let Value::Array(parts) = reply else {
        return Err(BadReply);
    };
    let [Value::Array(entries), oldest, kept, added, length, members, count, seq, ttl] =
        parts.as_slice()
    else {
        return Err(BadReply);
    };
    let ttl_ms = match ttl {
        Value::Int(n) => u64::try_from(*n).ok(),
        _ => None,
    };
    let presence_seq = match seq {
        Value::Int(n) => u64::try_from(*n).map_err(|_| BadReply)?,
        _ => 0,
    };
    let mut messages = Vec::with_capacity(entries.len());
    for e in entries.iter().rev() {
        messages.push(entry(e).ok_or(BadReply)?);
    }
    let roster = match (members, count) {
        (Value::Array(members), Value::Int(count)) => {
            let members = (members.iter())
                .map(|m| {
                    bulk(m)
                        .and_then(|b| std::str::from_utf8(b).ok())
                        .map(str::to_owned)
                })
                .collect::<Option<Vec<_>>>()
                .ok_or(BadReply)?;
            Some((members, usize::try_from(*count).map_err(|_| BadReply)?))
        }
        _ => None,
    };
    let Some(since) = req.since.filter(|_| req.count > 0) else {
        return Ok(Fetched {
            messages,
            gap: false,
            roster,
            presence_seq,
            ttl_ms,
        });
    };
    let mut gap = messages.len() > req.count;
    if gap {
        messages.remove(0);
    }
    let since_kept = matches!(kept, Value::Int(n) if *n > 0);
    // Redis 7 counts what a stream ever had: more than it has means trimmed.
    let trimmed = match (added, length) {
        (Value::Int(added), Value::Int(length)) => added > length,
        _ => true,
    };
    gap |= match position(oldest) {
        // Trimming drops the oldest first: with `since` kept, all after it is.
        _ if since_kept => false,
        Some(oldest) if oldest > since => {
            // Trimmed past `since`; or a stream made anew (the room's
            // history expired, or Redis restarted empty): only an expiry
            // loses messages, and it needs the keep time of quiet first.
            trimmed || since.ms.saturating_add(req.keep_ms) < oldest.ms
        }
        // `since` is not (or no longer) a message of this stream, and
        // nothing older than it is kept either: nothing to tell.
        Some(_) => false,
        // No history at all: anything published after `since` would still
        // be there, unless `since` is older than the room's keep time.
        None => since.ms.saturating_add(req.keep_ms) < now_ms,
    };
    Ok(Fetched {
        messages,
        gap,
        roster,
        presence_seq,
        ttl_ms,
    })
}

/// The newest messages whose events fit in `budget` bytes, oldest first,
/// and whether any had to be left out.
pub fn within_budget(
    messages: &[(Position, String)],
    budget: usize,
) -> (&[(Position, String)], bool) {
    let mut used = 0;
    let mut first = messages.len();
    for (i, (_, event)) in messages.iter().enumerate().rev() {
        used += event.len() + 1;
        if used > budget {
            break;
        }
        first = i;
    }
    (&messages[first..], first > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn pos(s: &str) -> Position {
        Position::parse(s).unwrap()
    }

    fn stream_entry(id: &str, head: &str) -> Value {
        Value::Array(vec![
            b(id),
            Value::Array(vec![b("h"), b(head), b("t"), b("\"}")]),
        ])
    }

    /// A fetch reply; `stream` is `(kept, added, length)` where Redis 7
    /// says so.
    fn reply(
        ids_newest_first: &[&str],
        oldest: Option<&str>,
        kept: bool,
        stream: Option<(i64, i64)>,
    ) -> Value {
        let entries = ids_newest_first
            .iter()
            .map(|id| stream_entry(id, r#"{"id":""#))
            .collect();
        let (added, length) = stream.map_or((Value::Nil, Value::Nil), |(a, l)| {
            (Value::Int(a), Value::Int(l))
        });
        Value::Array(vec![
            Value::Array(entries),
            oldest.map_or(Value::Nil, b),
            Value::Int(i64::from(kept)),
            added,
            length,
            Value::Nil,
            Value::Nil,
            Value::Nil,
            Value::Int(-2),
        ])
    }

    fn req(since: Option<&str>, count: usize) -> Request {
        Request {
            since: since.map(pos),
            count,
            keep_ms: 60_000,
            members: 0,
        }
    }

    #[test]
    fn positions_parse_and_order() {
        assert_eq!(
            pos("1700000000000-0"),
            Position {
                ms: 1_700_000_000_000,
                seq: 0
            }
        );
        assert!(pos("5-10") > pos("5-9"));
        assert!(pos("6-0") > pos("5-99"));
        for bad in [
            "",
            "5",
            "5-",
            "-5",
            "a-1",
            "1-b",
            "1-2-3",
            " 1-2",
            "1-2 ",
            "+1-2",
            "99999999999999999999999-1",
        ] {
            assert_eq!(Position::parse(bad), None, "{bad:?}");
        }
        assert_eq!(pos("12-34").to_string(), "12-34");
    }

    #[test]
    fn the_position_is_the_events_last_field() {
        let e = br#"{"type":"message","text":"\"id\":\"9-9\"","ts":1,"id":"17-3"}"#;
        assert_eq!(position_of(e), Some(pos("17-3")));
        assert_eq!(
            position_of(br#"{"type":"join","id":"000000000abc-1"}"#),
            None
        );
        assert_eq!(position_of(br#"{"type":"notice","ts":1}"#), None);
        assert_eq!(position_of(b""), None);
    }

    #[test]
    fn a_fresh_join_gets_the_newest_oldest_first() {
        let got = decode(
            &reply(&["3-0", "2-0"], Some("1-0"), false, None),
            &req(None, 2),
            0,
        )
        .unwrap();
        let ids: Vec<String> = got.messages.iter().map(|(p, _)| p.to_string()).collect();
        assert_eq!(ids, ["2-0", "3-0"]);
        assert_eq!(got.messages[0].1, r#"{"id":"2-0"}"#);
        assert!(!got.gap);
    }

    #[test]
    fn a_resume_sees_a_gap_only_where_messages_are_missing() {
        let gap = |r: Value, since: &str, count: usize, now: u64| {
            decode(&r, &req(Some(since), count), now).unwrap().gap
        };
        // `since` is still kept: all after it is there.
        assert!(!gap(
            reply(&["3-0", "2-0"], Some("1-0"), true, Some((3, 3))),
            "1-0",
            5,
            0
        ));
        assert!(!gap(
            reply(&["3-0"], Some("1-0"), true, Some((900, 3))),
            "2-0",
            5,
            0
        ));
        // More were missed than asked for: the extra one is dropped.
        let r = decode(
            &reply(&["4-0", "3-0", "2-0"], Some("1-0"), true, Some((4, 4))),
            &req(Some("1-0"), 2),
            0,
        )
        .unwrap();
        assert!(r.gap);
        assert_eq!(r.messages.len(), 2);
        assert_eq!(r.messages[0].0, pos("3-0"));
        // Trimmed past `since` (Redis 7 counts it; older Redis cannot say).
        assert!(gap(
            reply(&["9-0"], Some("9-0"), false, Some((300, 12))),
            "5-0",
            5,
            0
        ));
        assert!(gap(reply(&["9-0"], Some("9-0"), false, None), "5-0", 5, 0));
        // A stream made anew soon after `since` (Redis restarted empty):
        // nothing expired, nothing lost...
        assert!(!gap(
            reply(&["70000-0"], Some("70000-0"), false, Some((1, 1))),
            "10000-0",
            5,
            0
        ));
        // ...but made anew after the keep time of quiet: expired.
        assert!(gap(
            reply(&["90000-0"], Some("90000-0"), false, Some((1, 1))),
            "10000-0",
            5,
            0
        ));
        // `since` is no message of this stream and nothing older is kept.
        assert!(!gap(
            reply(&["9-0"], Some("4-0"), false, Some((9, 9))),
            "5-0",
            5,
            0
        ));
        // An empty, expired history: a gap only if `since` is older than
        // the keep time.
        let empty = || reply(&[], None, false, None);
        assert!(!gap(empty(), "100000-0", 5, 130_000));
        assert!(gap(empty(), "100000-0", 5, 170_000));
    }

    #[test]
    fn the_roster_comes_with_its_count() {
        let reply = Value::Array(vec![
            Value::Array(vec![]),
            Value::Nil,
            Value::Int(0),
            Value::Nil,
            Value::Nil,
            Value::Array(vec![b(r#"{"user":"a","session":"s"}"#)]),
            Value::Int(7),
            Value::Int(12),
            Value::Int(-1),
        ]);
        let got = decode(&reply, &req(None, 0), 0).unwrap();
        assert_eq!(
            got.roster,
            Some((vec![r#"{"user":"a","session":"s"}"#.to_owned()], 7))
        );
        assert!(got.messages.is_empty());
    }

    #[test]
    fn the_time_to_live_is_read_when_there_is_one() {
        let with_ttl = |ttl| {
            let Value::Array(mut parts) = reply(&["5-0"], Some("5-0"), false, None) else {
                unreachable!()
            };
            parts[8] = Value::Int(ttl);
            decode(&Value::Array(parts), &req(None, 5), 0)
                .unwrap()
                .ttl_ms
        };
        assert_eq!(with_ttl(1500), Some(1500));
        assert_eq!(with_ttl(-1), None);
        assert_eq!(with_ttl(-2), None);
    }

    #[test]
    fn malformed_replies_are_refused() {
        for bad in [
            Value::Nil,
            Value::Array(vec![]),
            Value::Array(vec![
                b("x"),
                Value::Nil,
                Value::Nil,
                Value::Nil,
                Value::Nil,
                Value::Nil,
                Value::Nil,
                Value::Nil,
                Value::Nil,
            ]),
            Value::Array(vec![
                Value::Array(vec![b("junk")]),
                Value::Nil,
                Value::Nil,
                Value::Nil,
                Value::Nil,
                Value::Nil,
                Value::Nil,
                Value::Nil,
                Value::Nil,
            ]),
            Value::Array(vec![
                Value::Array(vec![stream_entry("not-an-id", "{")]),
                Value::Nil,
                Value::Nil,
                Value::Nil,
                Value::Nil,
                Value::Nil,
                Value::Nil,
                Value::Nil,
                Value::Nil,
            ]),
            Value::Array(vec![
                Value::Array(vec![]),
                Value::Nil,
                Value::Nil,
                Value::Nil,
                Value::Nil,
                Value::Array(vec![Value::Int(3)]),
                Value::Int(1),
                Value::Nil,
                Value::Nil,
            ]),
        ] {
            assert_eq!(decode(&bad, &req(None, 5), 0), Err(BadReply), "{bad:?}");
        }
    }

    #[test]
    fn the_budget_keeps_the_newest() {
        let m: Vec<(Position, String)> = (1..=4)
            .map(|i| (Position { ms: i, seq: 0 }, "x".repeat(9)))
            .collect();
        let (kept, cut) = within_budget(&m, 25);
        assert_eq!(kept.len(), 2);
        assert_eq!(kept[0].0.ms, 3);
        assert!(cut);
        let (kept, cut) = within_budget(&m, 1000);
        assert_eq!(kept.len(), 4);
        assert!(!cut);
        assert_eq!(within_budget(&m, 5).0.len(), 0);
    }

    #[test]
    fn request_count_asks_one_more_when_resuming() {
        assert_eq!(req(None, 10).script_count(), 10);
        assert_eq!(req(Some("1-0"), 10).script_count(), 11);
        assert_eq!(req(Some("1-0"), 0).script_count(), 0);
    }
}
