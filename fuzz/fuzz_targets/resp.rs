//! `resp::frame_len` on arbitrary bytes under small limits, checked against
//! an independent recursive framer and against the `redis` crate's parser,
//! which the module hands exactly `&buf[..n]` to.
//!
//! Input layout: byte 0 and byte 1 choose the limits (byte 0 == 0xff means
//! the module's own REPLY_LIMITS), the rest is what Redis sent.
//!
//! Properties:
//! * frame_len never panics; Ok(Some(n)) has n <= buf.len().
//! * It agrees with the reference framer about which prefix, if any, is one
//!   complete value within the limits (both directions).
//! * Every strict prefix of an accepted frame is Ok(None): a reply split
//!   across reads must not be refused.
//! * Bounded buffering: Ok(None) only while buf is shorter than the largest
//!   frame the limits allow, and no accepted frame is longer than that.
//! * The redis parser accepts &buf[..n] exactly when the frame's contents
//!   are valid for their types (redis-rs checks e.g. that `:` holds an
//!   integer, which a framer need not); when it does, it yields the same
//!   value as parsing the whole buffer, and it rejects &buf[..n - 1].
//!   With WSCHAT_FUZZ_STRICT set, any frame the parser rejects is a
//!   crash, to list what frame_len lets through.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wschat_core::resp::{frame_len, Limits};

fuzz_target!(|data: &[u8]| {
    let Some((&l0, rest)) = data.split_first() else {
        return;
    };
    let Some((&l1, buf)) = rest.split_first() else {
        return;
    };
    let limits = if l0 == 0xff {
        // The module's REPLY_LIMITS (src/redis_link.rs).
        Limits {
            max_bulk: 4 << 20,
            max_elements: 1024,
            max_depth: 4,
        }
    } else {
        Limits {
            max_bulk: usize::from(l0 % 33),
            max_elements: usize::from(l1 & 0x07),
            max_depth: usize::from((l1 >> 3) % 5),
        }
    };

    let got = frame_len(buf, &limits);
    let reference = Framer { buf, limits: &limits }.value(0, 0);
    let bound = max_frame_len(&limits);

    match (&got, &reference) {
        (Ok(Some(n)), Ref::Complete(node)) => assert_eq!(*n, node.end, "frame length"),
        (Ok(Some(n)), _) => panic!("frame_len accepted {n} bytes, reference says {reference:?}"),
        (_, Ref::Complete(node)) => {
            panic!("reference frames {} bytes, frame_len says {got:?}", node.end)
        }
        _ => {}
    }

    match got {
        Ok(None) => assert!(
            (buf.len() as u128) < bound,
            "waiting for more with {} bytes buffered, but no frame can exceed {bound}",
            buf.len()
        ),
        Ok(Some(n)) => {
            assert!(n <= buf.len());
            assert!(n > 0);
            assert!((n as u128) <= bound);
            for cut in 0..n {
                assert_eq!(
                    frame_len(&buf[..cut], &limits),
                    Ok(None),
                    "strict prefix of {cut} bytes of a {n}-byte frame"
                );
            }
            let Ref::Complete(node) = reference else {
                unreachable!()
            };
            check_parser(buf, n, node.redis_ok);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});

fn check_parser(buf: &[u8], n: usize, contents_valid: bool) {
    let parsed = redis::parse_redis_value(&buf[..n]);
    if std::env::var_os("WSCHAT_FUZZ_STRICT").is_some() {
        if let Err(e) = &parsed {
            panic!("frame_len framed {n} bytes that redis rejects: {e}");
        }
    }
    assert_eq!(
        parsed.is_ok(),
        contents_valid,
        "redis parser vs content rules on {:?}: {:?}",
        String::from_utf8_lossy(&buf[..n]),
        parsed.as_ref().map(|_| ()).map_err(|e| e.to_string())
    );
    let Ok(value) = parsed else {
        return;
    };
    // The parser stops where frame_len does: trailing bytes change nothing
    // and one byte less is not enough.
    let whole = redis::parse_redis_value(buf).expect("value then more bytes");
    assert_eq!(format!("{value:?}"), format!("{whole:?}"));
    assert!(
        redis::parse_redis_value(&buf[..n - 1]).is_err(),
        "redis parsed a value from one byte less than the frame"
    );
}

/// The longest complete frame the limits allow: every line (length lines
/// included, which may carry leading zeros) is at most max_bulk bytes.
fn max_frame_len(l: &Limits) -> u128 {
    let line = 1 + l.max_bulk as u128 + 2;
    let leaf = line + l.max_bulk as u128 + 2;
    let mut s = leaf;
    for _ in 0..l.max_depth {
        s = s.max(line.saturating_add((l.max_elements as u128).saturating_mul(s)));
    }
    s
}

#[derive(Debug)]
struct Node {
    end: usize,
    /// What redis-rs would make of it, as far as validity goes.
    redis_ok: bool,
    /// Usable as the kind of a push (`>`): a simple string other than "OK"
    /// (which redis-rs turns into Value::Okay) or a UTF-8 bulk string.
    push_kind: bool,
}

#[derive(Debug)]
enum Ref {
    Complete(Node),
    Incomplete,
    Invalid,
}

enum Len {
    Null,
    N(usize),
}

struct Framer<'a> {
    buf: &'a [u8],
    limits: &'a Limits,
}

impl Framer<'_> {
    /// The CRLF-terminated line from `start`: (content range, next offset).
    fn line(&self, start: usize) -> Result<(usize, usize, usize), Ref> {
        let rest = self.buf.get(start..).unwrap_or(&[]);
        let max = self.limits.max_bulk;
        match rest.iter().position(|&b| b == b'\r' || b == b'\n') {
            None if rest.len() > max => Err(Ref::Invalid),
            None => Err(Ref::Incomplete),
            Some(i) if i > max => Err(Ref::Invalid),
            Some(i) if rest[i] == b'\r' && i + 1 == rest.len() => Err(Ref::Incomplete),
            Some(i) if rest[i] == b'\r' && rest[i + 1] == b'\n' => {
                Ok((start, start + i, start + i + 2))
            }
            Some(_) => Err(Ref::Invalid),
        }
    }

    fn length(line: &[u8], nullable: bool, max: usize) -> Result<Len, Ref> {
        if nullable && line == b"-1" {
            return Ok(Len::Null);
        }
        if line.is_empty() || !line.iter().all(u8::is_ascii_digit) {
            return Err(Ref::Invalid);
        }
        let digits: &[u8] = {
            let z = line.iter().take_while(|&&b| b == b'0').count();
            &line[z..]
        };
        if digits.len() > 20 {
            return Err(Ref::Invalid);
        }
        let n: u128 = if digits.is_empty() {
            0
        } else {
            std::str::from_utf8(digits).unwrap().parse().unwrap()
        };
        if n > max as u128 {
            return Err(Ref::Invalid);
        }
        Ok(Len::N(n as usize))
    }

    /// One value at `pos`, inside `depth` open aggregates.
    fn value(&self, pos: usize, depth: usize) -> Ref {
        let Some(&kind) = self.buf.get(pos) else {
            return Ref::Incomplete;
        };
        let (ls, le, after) = match self.line(pos + 1) {
            Ok(x) => x,
            Err(r) => return r,
        };
        let line = &self.buf[ls..le];
        let utf8 = std::str::from_utf8(line).ok();
        let l = self.limits;
        let leaf = |end, redis_ok| {
            Ref::Complete(Node {
                end,
                redis_ok,
                push_kind: false,
            })
        };
        match kind {
            b'+' => Ref::Complete(Node {
                end: after,
                redis_ok: utf8.is_some(),
                push_kind: utf8.is_some_and(|s| s != "OK"),
            }),
            b'-' | b'_' | b'(' => leaf(after, utf8.is_some()),
            b':' => leaf(
                after,
                utf8.is_some_and(|s| s.trim().parse::<i64>().is_ok()),
            ),
            b',' => leaf(
                after,
                utf8.is_some_and(|s| s.trim().parse::<f64>().is_ok()),
            ),
            b'#' => leaf(after, line == b"t" || line == b"f"),
            b'$' | b'!' | b'=' => match Self::length(line, kind == b'$', l.max_bulk) {
                Err(r) => r,
                Ok(Len::Null) => leaf(after, true),
                Ok(Len::N(n)) => {
                    let payload_end = after + n;
                    if self.buf.len() < payload_end + 2 {
                        // Wrong bytes where the CRLF must go are already fatal.
                        let tail = self.buf.get(payload_end..).unwrap_or(&[]);
                        return match tail {
                            [] | [b'\r'] => Ref::Incomplete,
                            _ => Ref::Invalid,
                        };
                    }
                    if &self.buf[payload_end..payload_end + 2] != b"\r\n" {
                        return Ref::Invalid;
                    }
                    let payload = &self.buf[after..payload_end];
                    let redis_ok = match kind {
                        b'=' => String::from_utf8_lossy(payload).contains(':'),
                        _ => true,
                    };
                    Ref::Complete(Node {
                        end: payload_end + 2,
                        redis_ok,
                        push_kind: kind == b'$' && std::str::from_utf8(payload).is_ok(),
                    })
                }
            },
            b'*' | b'~' | b'>' | b'%' | b'|' => {
                if depth >= l.max_depth {
                    return Ref::Invalid;
                }
                let n = match Self::length(line, kind == b'*', l.max_elements) {
                    Err(r) => return r,
                    Ok(Len::Null) => return leaf(after, true),
                    Ok(Len::N(n)) => n,
                };
                let children = match kind {
                    b'%' => 2 * n,
                    b'|' => 2 * n + 1,
                    _ => n,
                };
                if children > l.max_elements {
                    return Ref::Invalid;
                }
                let mut at = after;
                let mut redis_ok = true;
                for i in 0..children {
                    match self.value(at, depth + 1) {
                        Ref::Complete(child) => {
                            redis_ok &= child.redis_ok;
                            if kind == b'>' && i == 0 {
                                redis_ok &= child.push_kind;
                            }
                            at = child.end;
                        }
                        other => return other,
                    }
                }
                leaf(at, redis_ok)
            }
            _ => Ref::Invalid,
        }
    }
}
