//! Who is in a room, across every worker and host: a Redis hash per room
//! (`<channel>:members`, session id → member), kept honest by leases. Each
//! worker ("node") renews its lease on a timer and records, per node, the
//! sessions it holds; a node whose lease runs out is swept by whichever
//! worker notices first, and its members leave with `leave` events. Nothing
//! depends on a dying process saying goodbye.
//!
//! Every presence event's id is `p<n>`, from a per-room counter
//! (`<channel>:presence`) that Redis increments as it publishes the event;
//! a member's welcome says which `n` its member list reflects, so that a
//! `join` or `leave` the list already shows is dropped, whichever Redis
//! connection brings it first. A counter made anew (the room emptied, or
//! Redis restarted without its data) starts from Redis's clock in
//! microseconds, so ids never repeat and stay ordered: a client that
//! remembers the ids it has shown must not take a new event for an old one.
//!
//! Big rooms must not cost O(N²): past `BUSY_ROOM` members, joins and
//! leaves are no longer announced one by one but summed up in at most one
//! `presence` event per worker per tick.

/// Lua for the scripts: `seq(key)` is the room's next presence counter as
/// a string of digits (a Lua number that large would print as `1.7e+15`),
/// started from Redis's clock (µs) when the key does not exist.
macro_rules! seq_fn {
    () => {
        "local function seq(key)
  if redis.call('EXISTS', key) == 0 then
    local t = redis.call('TIME')
    redis.call('SET', key, t[1] .. string.format('%06d', tonumber(t[2])))
  end
  return string.format('%d', redis.call('INCR', key))
end
"
    };
}

/// Rooms with more members than this get `presence` summaries instead of
/// one `join`/`leave` event per change, and `welcome` lists this many.
pub const BUSY_ROOM: usize = 100;
/// Members named in one `presence` summary (the count is always exact).
pub const SUMMARY_NAMES: usize = 20;
/// How long a node's lease lasts without renewal, and how often it is
/// renewed: a dead node's members are gone within about their sum.
pub const LEASE_MS: u64 = 15_000;
pub const RENEW_MS: u64 = 5_000;
/// Dead nodes one sweep handles at most; the next renewal takes the rest.
pub const SWEEP_NODES: usize = 8;

/// KEYS: members hash, node hash, presence counter. ARGV: session id,
/// member JSON, channel, room JSON, leave-event head (up to `"ts":`), join
/// event head (up to `"id":"`; empty: a silent re-registration),
/// BUSY_ROOM. Returns `{count, announced, n}`, announced being 1 (as
/// `p<n>`), 0 (left to a summary) or -1 (silent).
pub const JOIN_SCRIPT: &str = concat!(
    seq_fn!(),
    "\
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3] .. '\\n' .. ARGV[4] .. '\\n' .. ARGV[5])
local n = redis.call('HLEN', KEYS[1])
if ARGV[6] == '' then return {n, -1} end
if n <= tonumber(ARGV[7]) then
  local n_seq = seq(KEYS[3])
  redis.call('PUBLISH', ARGV[3], ARGV[6] .. 'p' .. n_seq .. '\"}')
  return {n, 1, tonumber(n_seq)}
end
return {n, 0}"
);

/// KEYS: members hash, node hash, presence counter. ARGV: session id,
/// channel, leave event head (up to `"id":"`), BUSY_ROOM. Returns
/// `{count, announced}`; a member already swept is not announced twice.
pub const LEAVE_SCRIPT: &str = concat!(
    seq_fn!(),
    "\
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
local n = redis.call('HLEN', KEYS[1])
if n == 0 then
  redis.call('DEL', KEYS[3])
  return {0, -1}
end
if removed == 1 and n < tonumber(ARGV[4]) then
  redis.call('PUBLISH', ARGV[2], ARGV[3] .. 'p' .. seq(KEYS[3]) .. '\"}')
  return {n, 1}
end
return {n, removed == 1 and 0 or -1}"
);

/// KEYS: the nodes sorted set. ARGV: this node, lease ms, the prefix,
/// SWEEP_NODES, BUSY_ROOM. Renews this node's lease, then removes the
/// members of nodes whose lease ran out and tells their rooms: a `leave`
/// each in small rooms, one `presence` summary in busy ones. Returns the
/// number of members removed.
pub const RENEW_SCRIPT: &str = concat!(
    seq_fn!(),
    "\
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[4]))
local removed = 0
local busy = {}
for _, node in ipairs(dead) do
  if redis.call('ZREM', KEYS[1], node) == 1 then
    local key = ARGV[3] .. 'node:' .. node
    local sessions = redis.call('HGETALL', key)
    for i = 1, #sessions, 2 do
      local v = sessions[i + 1]
      local a = string.find(v, '\\n', 1, true)
      local b = string.find(v, '\\n', a + 1, true)
      local channel = string.sub(v, 1, a - 1)
      local room = string.sub(v, a + 1, b - 1)
      if redis.call('HDEL', channel .. ':members', sessions[i]) == 1 then
        removed = removed + 1
        local n = redis.call('HLEN', channel .. ':members')
        if n == 0 then
          redis.call('DEL', channel .. ':presence')
        elseif n < tonumber(ARGV[5]) then
          redis.call('PUBLISH', channel, string.sub(v, b + 1) .. now .. ',\"id\":\"p' .. seq(channel .. ':presence') .. '\"}')
        else
          busy[channel] = {room, (busy[channel] and busy[channel][2] or 0) + 1}
        end
      end
    end
    redis.call('DEL', key)
  end
end
for channel, r in pairs(busy) do
  local n = redis.call('HLEN', channel .. ':members')
  redis.call('PUBLISH', channel, '{\"type\":\"presence\",\"room\":' .. r[1] .. ',\"count\":' .. n .. ',\"joined\":[],\"left\":[],\"gone\":' .. r[2] .. ',\"ts\":' .. now .. ',\"id\":\"p' .. seq(channel .. ':presence') .. '\"}')
end
return removed"
);

/// KEYS: members hash, presence counter. ARGV: channel, summary head (up
/// to `"count":`), summary tail (up to `"id":"`). Publishes a busy room's
/// summary with the count as it is now, so that the last summary a member
/// gets has the latest count.
pub const SUMMARY_SCRIPT: &str = concat!(
    seq_fn!(),
    "\
local n = redis.call('HLEN', KEYS[1])
redis.call('PUBLISH', ARGV[1], ARGV[2] .. n .. ARGV[3] .. 'p' .. seq(KEYS[2]) .. '\"}')
return n"
);

/// The hash of a room's members: session id → `member_json`.
pub fn members_key(channel: &str) -> String {
    format!("{channel}:members")
}

/// The room's presence counter: the `n` of the last `p<n>` event id.
pub fn seq_key(channel: &str) -> String {
    format!("{channel}:presence")
}

/// The `n` of a presence event's id (`"id":"p<n>"`, its last field).
pub fn seq_of(event: &[u8]) -> Option<u64> {
    const KEY: &[u8] = br#""id":"p"#;
    let body = event.strip_suffix(br#""}"#)?;
    let start = body.windows(KEY.len()).rposition(|w| w == KEY)? + KEY.len();
    let digits = &body[start..];
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The hash of the sessions one node holds, for sweeping them if it dies.
pub fn node_key(prefix: &str, node: &str) -> String {
    format!("{prefix}node:{node}")
}

/// The sorted set of nodes by lease expiry.
pub fn nodes_key(prefix: &str) -> String {
    format!("{prefix}nodes")
}

/// One member as it appears in lists: `{"user":…,"session":…}`.
pub fn member_json(user: &str, session: &str) -> String {
    let mut out = String::with_capacity(32 + user.len() + session.len());
    out.push_str(r#"{"user":"#);
    crate::envelope::push_json_string(&mut out, user);
    out.push_str(r#","session":"#);
    crate::envelope::push_json_string(&mut out, session);
    out.push('}');
    out
}

/// The room name as a JSON string, for events Redis builds.
pub fn room_json(room: &str) -> String {
    let mut out = String::with_capacity(room.len() + 2);
    crate::envelope::push_json_string(&mut out, room);
    out
}

/// Changes to announce in a busy room's next summary.
#[derive(Default, Debug)]
pub struct Changes {
    pub joined: Vec<String>,
    pub left: Vec<String>,
    /// Changes beyond the names kept.
    pub more: usize,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.joined.is_empty() && self.left.is_empty() && self.more == 0
    }

    /// Records a member (as `member_json`) that joined or left.
    pub fn add(&mut self, joined: bool, member: String) {
        let list = if joined {
            &mut self.joined
        } else {
            &mut self.left
        };
        if list.len() < SUMMARY_NAMES {
            list.push(member);
        } else {
            self.more += 1;
        }
    }
}

/// A busy room's `presence` summary, around the count that Redis fills in
/// (`SUMMARY_SCRIPT`): some of who came and went.
pub fn summary_parts(room: &str, changes: &Changes, ts_ms: u64) -> (String, String) {
    let mut head = String::with_capacity(48 + room.len());
    head.push_str(r#"{"type":"presence","room":"#);
    crate::envelope::push_json_string(&mut head, room);
    head.push_str(r#","count":"#);
    let tail = format!(
        r#","joined":[{}],"left":[{}],"more":{},"ts":{ts_ms},"id":""#,
        changes.joined.join(","),
        changes.left.join(","),
        changes.more
    );
    (head, tail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_and_rooms_are_json() {
        assert_eq!(
            member_json("a\"b", "s-1"),
            r#"{"user":"a\"b","session":"s-1"}"#
        );
        assert_eq!(room_json("x\\y"), r#""x\\y""#);
    }

    #[test]
    fn a_summary_names_some_and_counts_all() {
        let mut c = Changes::default();
        assert!(c.is_empty());
        for i in 0..SUMMARY_NAMES + 3 {
            c.add(true, member_json(&format!("u{i}"), "s"));
        }
        c.add(false, member_json("gone", "s"));
        assert_eq!(c.joined.len(), SUMMARY_NAMES);
        assert_eq!(c.more, 3);
        let (head, tail) = summary_parts("r", &c, 9);
        let s = format!("{head}150{tail}p4\"}}");
        assert!(
            s.starts_with(r#"{"type":"presence","room":"r","count":150,"joined":[{"user":"u0","#)
        );
        assert!(s.ends_with(r#""left":[{"user":"gone","session":"s"}],"more":3,"ts":9,"id":"p4"}"#));
        assert_eq!(seq_of(s.as_bytes()), Some(4));
    }

    #[test]
    fn presence_ids_are_counted_and_others_are_not() {
        assert_eq!(seq_of(br#"{"type":"join","ts":1,"id":"p17"}"#), Some(17));
        assert_eq!(seq_of(br#"{"type":"message","ts":1,"id":"17-0"}"#), None);
        assert_eq!(seq_of(br#"{"type":"join","id":"p"}"#), None);
        assert_eq!(seq_of(br#"{"type":"join","id":"p1x"}"#), None);
    }
}
