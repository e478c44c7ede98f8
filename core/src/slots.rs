//! Redis Cluster's view of names: which of the 16384 hash slots a key or
//! shard channel belongs to (CRC16 of its hash tag, as Redis computes it),
//! a short hash tag for every slot (so that keys made for a slot land in
//! it), the slot map a node gives in answer to `CLUSTER SLOTS`, and the
//! `MOVED` / `ASK` redirections it answers with.

use std::sync::OnceLock;

use redis::Value;

pub const SLOTS: usize = 16384;

/// CRC16-CCITT (XMODEM: polynomial 0x1021, initial value 0), the checksum
/// Redis Cluster hashes names with.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The part of a name Redis hashes: what lies between the first `{` and
/// the first `}` after it, if that is not empty; otherwise the whole name.
pub fn hash_tag(name: &[u8]) -> &[u8] {
    if let Some(open) = name.iter().position(|&b| b == b'{') {
        let rest = &name[open + 1..];
        if let Some(close) = rest.iter().position(|&b| b == b'}') {
            if close > 0 {
                return &rest[..close];
            }
        }
    }
    name
}

pub fn slot_of(name: &[u8]) -> u16 {
    crc16(hash_tag(name)) % SLOTS as u16
}

/// A tag of a few letters for each slot: `{<tag>}` in a key puts the key in
/// that slot. Found once, by trying short names in order.
pub fn tag_for_slot(slot: u16) -> &'static str {
    static TAGS: OnceLock<Vec<Box<str>>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let mut tags: Vec<Option<Box<str>>> = vec![None; SLOTS];
        let mut missing = SLOTS;
        let mut n: usize = 0;
        while missing > 0 {
            let mut name = Vec::with_capacity(4);
            let mut k = n;
            loop {
                name.push(LETTERS[k % LETTERS.len()]);
                k /= LETTERS.len();
                if k == 0 {
                    break;
                }
            }
            let slot = usize::from(crc16(&name) % SLOTS as u16);
            if tags[slot].is_none() {
                tags[slot] = Some(String::from_utf8(name).expect("ASCII").into());
                missing -= 1;
            }
            n += 1;
        }
        tags.into_iter().map(|t| t.expect("filled")).collect()
    });
    &tags[usize::from(slot) % SLOTS]
}

/// A script as it runs on a cluster: it publishes to shard channels
/// (`SPUBLISH`), which Redis requires to be in the slot of the keys the
/// script touches (the module's are: `<prefix>{room}` and its keys).
pub fn sharded_script(code: &str) -> String {
    code.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")
}

/// A node as a slot map names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Node {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Which primary serves each slot range.
#[derive(Debug, PartialEq, Eq)]
pub struct SlotMap {
    /// (first slot, last slot, primary), in the order the node gave them.
    pub ranges: Vec<(u16, u16, Node)>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum MapError {
    /// Not an array of slot ranges (e.g. an error: not a cluster node).
    NotAMap,
    /// A range whose bounds are out of order or beyond the last slot.
    BadRange,
    /// Two ranges claim the same slot.
    Overlap,
    /// No range at all: the cluster has no slots assigned yet.
    Empty,
}

impl std::fmt::Display for MapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MapError::NotAMap => "not a slot map",
            MapError::BadRange => "a slot range out of bounds",
            MapError::Overlap => "two nodes claim the same slot",
            MapError::Empty => "no slot assigned to any node",
        })
    }
}

fn int_of(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        _ => None,
    }
}

fn text_of(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// Reads a `CLUSTER SLOTS` reply. A primary with an empty address is the
/// node that answered (`asked`); one announced as `?` (address unknown) is
/// left out, and its slots stay unmapped.
pub fn parse_cluster_slots(reply: &Value, asked: &Node) -> Result<SlotMap, MapError> {
    let Value::Array(entries) = reply else {
        return Err(MapError::NotAMap);
    };
    let mut ranges = Vec::with_capacity(entries.len());
    let mut claimed = vec![false; SLOTS];
    for entry in entries {
        let Value::Array(fields) = entry else {
            return Err(MapError::NotAMap);
        };
        let (Some(first), Some(last), Some(Value::Array(primary))) = (
            fields.first().and_then(int_of),
            fields.get(1).and_then(int_of),
            fields.get(2),
        ) else {
            return Err(MapError::NotAMap);
        };
        if !(0..SLOTS as i64).contains(&first) || !(first..SLOTS as i64).contains(&last) {
            return Err(MapError::BadRange);
        }
        let (Some(host), Some(port)) = (
            primary.first().and_then(text_of),
            primary.get(1).and_then(int_of),
        ) else {
            return Err(MapError::NotAMap);
        };
        let port = u16::try_from(port).map_err(|_| MapError::NotAMap)?;
        for c in &mut claimed[first as usize..=last as usize] {
            if std::mem::replace(c, true) {
                return Err(MapError::Overlap);
            }
        }
        let host = match host.as_str() {
            "?" => continue,
            "" => asked.host.clone(),
            _ => host,
        };
        ranges.push((first as u16, last as u16, Node { host, port }));
    }
    if ranges.is_empty() {
        return Err(MapError::Empty);
    }
    Ok(SlotMap { ranges })
}

/// Where a node sent a command it does not serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    pub slot: u16,
    pub to: Node,
    /// `ASK`: this one command only, preceded by `ASKING`; `MOVED`: the
    /// slot lives there now.
    pub ask: bool,
}

/// Reads a `MOVED <slot> <host>:<port>` or `ASK …` error (code and details
/// as Redis wrote them). An empty host is the node that answered.
pub fn parse_redirect(code: &str, details: &str, asked: &Node) -> Option<Redirect> {
    let ask = match code {
        "MOVED" => false,
        "ASK" => true,
        _ => return None,
    };
    let (slot, addr) = details.trim().split_once(' ')?;
    let slot: u16 = slot.parse().ok().filter(|s| usize::from(*s) < SLOTS)?;
    let (host, port) = addr.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = if host.is_empty() {
        asked.host.clone()
    } else {
        host.to_owned()
    };
    Some(Redirect {
        slot,
        to: Node {
            host,
            port: port.parse().ok()?,
        },
        ask,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(port: u16) -> Node {
        Node {
            host: "127.0.0.1".into(),
            port,
        }
    }

    #[test]
    fn crc16_is_the_xmodem_checksum() {
        // The check value of CRC-16/XMODEM, and the examples in the
        // Redis Cluster specification's reference implementation.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(crc16(b""), 0);
    }

    #[test]
    fn slots_follow_hash_tags() {
        // Values as `CLUSTER KEYSLOT` gives them.
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"bar"), 5061);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"foo{}{bar}"), slot_of(b"foo{}{bar}"));
        assert_ne!(slot_of(b"foo{}{bar}"), slot_of(b"bar"));
        assert_eq!(slot_of(b"foo{{bar}}zap"), slot_of(b"{bar"));
        assert_eq!(slot_of(b"foo{bar}{zap}"), slot_of(b"bar"));
        assert_eq!(
            slot_of(b"wschat:{lobby}:members"),
            slot_of(b"wschat:{lobby}")
        );
    }

    #[test]
    fn cluster_scripts_publish_only_to_shard_channels() {
        for code in crate::SCRIPTS {
            let sharded = sharded_script(code);
            let publishes = code.matches("PUBLISH").count();
            assert_eq!(sharded.matches("SPUBLISH").count(), publishes);
            assert_eq!(sharded.matches("PUBLISH").count(), publishes);
        }
    }

    #[test]
    fn every_slot_has_a_tag_that_hashes_to_it() {
        for slot in 0..SLOTS as u16 {
            let tag = tag_for_slot(slot);
            assert!(tag.len() <= 4, "{tag}");
            assert_eq!(slot_of(format!("wschat:{{{tag}}}nodes").as_bytes()), slot);
        }
    }

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn range(first: i64, last: i64, host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::Int(first),
            Value::Int(last),
            Value::Array(vec![bulk(host), Value::Int(port), bulk("id")]),
            Value::Array(vec![bulk("127.0.0.1"), Value::Int(9999), bulk("replica")]),
        ])
    }

    #[test]
    fn reads_a_slot_map() {
        let reply = Value::Array(vec![
            range(0, 5460, "127.0.0.1", 7000),
            range(5461, 10922, "", 7001),
            range(10923, 16383, "?", 7002),
        ]);
        let map = parse_cluster_slots(&reply, &node(7001)).unwrap();
        assert_eq!(
            map.ranges,
            vec![(0, 5460, node(7000)), (5461, 10922, node(7001))]
        );
    }

    #[test]
    fn refuses_broken_maps() {
        let asked = node(7000);
        let overlap = Value::Array(vec![range(0, 100, "a", 1), range(100, 200, "b", 2)]);
        assert_eq!(
            parse_cluster_slots(&overlap, &asked),
            Err(MapError::Overlap)
        );
        let reversed = Value::Array(vec![range(10, 5, "a", 1)]);
        assert_eq!(
            parse_cluster_slots(&reversed, &asked),
            Err(MapError::BadRange)
        );
        let beyond = Value::Array(vec![range(0, 16384, "a", 1)]);
        assert_eq!(
            parse_cluster_slots(&beyond, &asked),
            Err(MapError::BadRange)
        );
        assert_eq!(
            parse_cluster_slots(&Value::Array(vec![]), &asked),
            Err(MapError::Empty)
        );
        assert_eq!(
            parse_cluster_slots(&Value::Okay, &asked),
            Err(MapError::NotAMap)
        );
        let bad_port = Value::Array(vec![range(0, 1, "a", 70000)]);
        assert_eq!(
            parse_cluster_slots(&bad_port, &asked),
            Err(MapError::NotAMap)
        );
    }

    #[test]
    fn reads_redirects() {
        let asked = node(7000);
        assert_eq!(
            parse_redirect("MOVED", "3999 127.0.0.1:6381", &asked),
            Some(Redirect {
                slot: 3999,
                to: node(6381),
                ask: false
            })
        );
        assert_eq!(
            parse_redirect("ASK", "3999 :6381", &asked).map(|r| (r.ask, r.to)),
            Some((true, node(6381)))
        );
        assert_eq!(
            parse_redirect("MOVED", "1 [::1]:7000", &asked).map(|r| r.to.host),
            Some("::1".to_owned())
        );
        assert_eq!(parse_redirect("ERR", "3999 127.0.0.1:6381", &asked), None);
        assert_eq!(parse_redirect("MOVED", "16384 a:1", &asked), None);
        assert_eq!(parse_redirect("MOVED", "12 a:port", &asked), None);
    }
}
