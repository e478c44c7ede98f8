//! Framing of RESP2/RESP3 replies: finds where one complete value ends so
//! the caller can hand exactly that slice to `redis::parse_redis_value`.
//! Every length comes from the network, so all of them are bounded before
//! they are believed; otherwise a hostile or broken server could make the
//! worker buffer without end.

use std::fmt;

/// Upper bounds applied while scanning.
pub struct Limits {
    /// Largest bulk payload, and longest simple line, in bytes.
    pub max_bulk: usize,
    /// Most child values one aggregate may announce.
    pub max_elements: usize,
    /// Deepest aggregate nesting; 0 allows no aggregate at all.
    pub max_depth: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub enum RespError {
    BadType(u8),
    BadLength,
    TooLarge,
    TooDeep,
    BadLine,
}

impl fmt::Display for RespError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RespError::BadType(b) => write!(f, "unknown RESP type byte 0x{b:02x}"),
            RespError::BadLength => f.write_str("invalid RESP length"),
            RespError::TooLarge => f.write_str("RESP value exceeds the configured limits"),
            RespError::TooDeep => f.write_str("RESP value nested too deeply"),
            RespError::BadLine => f.write_str("RESP line not terminated by CRLF"),
        }
    }
}

impl std::error::Error for RespError {}

/// Returns the length of the first complete value in `buf`, or `Ok(None)`
/// when more bytes are needed.
pub fn frame_len(buf: &[u8], limits: &Limits) -> Result<Option<usize>, RespError> {
    let mut pos = 0;
    // Children still expected by each open aggregate, innermost last.
    // Iterative so that nesting depth cannot exhaust the native stack.
    let mut pending: Vec<usize> = Vec::new();
    loop {
        let Some(&kind) = buf.get(pos) else {
            return Ok(None);
        };
        let Some((line, after_line)) = line_at(buf, pos + 1, limits.max_bulk)? else {
            return Ok(None);
        };
        pos = after_line;
        match kind {
            b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => {}
            b'$' | b'!' | b'=' => {
                // Only RESP2's `$-1` may be null; RESP3 blobs have `_`.
                if let Some(n) = length(line, kind == b'$', limits.max_bulk)? {
                    // Slicing instead of adding keeps a huge `n` from overflowing.
                    match buf[pos..].get(n..) {
                        Some([b'\r', b'\n', ..]) => pos += n + 2,
                        None | Some([] | [b'\r']) => return Ok(None),
                        Some(_) => return Err(RespError::BadLine),
                    }
                }
            }
            b'*' | b'~' | b'>' | b'%' | b'|' => {
                if pending.len() >= limits.max_depth {
                    return Err(RespError::TooDeep);
                }
                if let Some(n) = length(line, kind == b'*', limits.max_elements)? {
                    let children = match kind {
                        b'%' => n.checked_mul(2),
                        // An attribute is followed by the value it annotates,
                        // which belongs to the same frame.
                        b'|' => n.checked_mul(2).and_then(|c| c.checked_add(1)),
                        _ => Some(n),
                    }
                    .filter(|&c| c <= limits.max_elements)
                    .ok_or(RespError::TooLarge)?;
                    if children > 0 {
                        pending.push(children);
                        continue;
                    }
                }
            }
            other => return Err(RespError::BadType(other)),
        }
        // One value is complete; it may complete its parents in turn.
        loop {
            let Some(left) = pending.last_mut() else {
                return Ok(Some(pos));
            };
            *left -= 1;
            if *left > 0 {
                break;
            }
            pending.pop();
        }
    }
}

/// Finds the CRLF-terminated line starting at `start`; returns its content
/// and the offset just past the CRLF.
fn line_at(buf: &[u8], start: usize, max: usize) -> Result<Option<(&[u8], usize)>, RespError> {
    let rest = buf.get(start..).unwrap_or(&[]);
    let Some(i) = rest.iter().position(|&b| b == b'\r' || b == b'\n') else {
        return if rest.len() > max {
            Err(RespError::TooLarge)
        } else {
            Ok(None)
        };
    };
    if i > max {
        return Err(RespError::TooLarge);
    }
    match rest.get(i..i + 2) {
        Some(b"\r\n") => Ok(Some((&rest[..i], start + i + 2))),
        None if rest[i] == b'\r' => Ok(None),
        _ => Err(RespError::BadLine),
    }
}

/// Parses a length line. `Ok(None)` is the RESP2 null (`-1`), accepted only
/// when `nullable`.
fn length(line: &[u8], nullable: bool, max: usize) -> Result<Option<usize>, RespError> {
    if line == b"-1" && nullable {
        return Ok(None);
    }
    if line.is_empty() {
        return Err(RespError::BadLength);
    }
    let mut n: usize = 0;
    for &b in line {
        if !b.is_ascii_digit() {
            return Err(RespError::BadLength);
        }
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(usize::from(b - b'0')))
            .filter(|&n| n <= max)
            .ok_or(RespError::TooLarge)?;
    }
    Ok(Some(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_bulk: 64,
        max_elements: 8,
        max_depth: 4,
    };

    const RESP2: &[&[u8]] = &[
        b"+OK\r\n",
        b"+\r\n",
        b"-ERR unknown command\r\n",
        b":0\r\n",
        b":-42\r\n",
        b"$0\r\n\r\n",
        b"$5\r\nhello\r\n",
        b"$4\r\na\r\nb\r\n",
        b"$-1\r\n",
        b"*-1\r\n",
        b"*0\r\n",
        b"*3\r\n$7\r\nmessage\r\n$10\r\nwschat:abc\r\n$2\r\nhi\r\n",
        b"*2\r\n*1\r\n:1\r\n*2\r\n$-1\r\n+x\r\n",
    ];

    const RESP3: &[&[u8]] = &[
        b"_\r\n",
        b",3.14\r\n",
        b"#t\r\n",
        b"!10\r\nERR broken\r\n",
        b"=8\r\ntxt:abcd\r\n",
        b"(12345678901234567890\r\n",
        b"%1\r\n+k\r\n:1\r\n",
        b"%0\r\n",
        b"~2\r\n+a\r\n+b\r\n",
        b">3\r\n+message\r\n+ch\r\n+hi\r\n",
        b"|1\r\n+ttl\r\n:3\r\n+value\r\n",
        b"|0\r\n:7\r\n",
    ];

    fn len(buf: &[u8]) -> Result<Option<usize>, RespError> {
        frame_len(buf, &LIMITS)
    }

    #[test]
    fn every_type_complete() {
        for v in RESP2.iter().chain(RESP3) {
            assert_eq!(
                len(v),
                Ok(Some(v.len())),
                "{:?}",
                String::from_utf8_lossy(v)
            );
        }
    }

    #[test]
    fn every_strict_prefix_is_incomplete() {
        for v in RESP2.iter().chain(RESP3) {
            for cut in 0..v.len() {
                assert_eq!(
                    len(&v[..cut]),
                    Ok(None),
                    "{:?} cut at {cut}",
                    String::from_utf8_lossy(v)
                );
            }
        }
    }

    #[test]
    fn back_to_back_returns_first() {
        for a in RESP2.iter().chain(RESP3) {
            for b in RESP2.iter().chain(RESP3) {
                let joined = [*a, *b].concat();
                assert_eq!(len(&joined), Ok(Some(a.len())));
            }
        }
    }

    #[test]
    fn parser_accepts_exactly_the_framed_slice() {
        for v in RESP2.iter().chain(RESP3) {
            let mut buf = v.to_vec();
            buf.extend_from_slice(b"+trailing\r\n");
            let n = len(&buf).unwrap().unwrap();
            assert!(
                redis::parse_redis_value(&buf[..n]).is_ok(),
                "{:?}",
                String::from_utf8_lossy(v)
            );
        }
    }

    #[test]
    fn bulk_limit() {
        let at_limit = [b"$64\r\n".as_slice(), &[b'x'; 64], b"\r\n"].concat();
        assert_eq!(len(&at_limit), Ok(Some(at_limit.len())));
        assert_eq!(len(b"$65\r\n"), Err(RespError::TooLarge));
        assert_eq!(len(b"!65\r\n"), Err(RespError::TooLarge));
        // A length that would overflow usize is refused, not wrapped.
        assert_eq!(
            len(b"$99999999999999999999999999\r\n"),
            Err(RespError::TooLarge)
        );
    }

    #[test]
    fn unterminated_line_cannot_grow_forever() {
        let long = [b"+".as_slice(), &[b'a'; 64]].concat();
        assert_eq!(len(&long), Ok(None));
        let longer = [b"+".as_slice(), &[b'a'; 65]].concat();
        assert_eq!(len(&longer), Err(RespError::TooLarge));
        let digits = [b"*".as_slice(), &[b'1'; 65]].concat();
        assert_eq!(len(&digits), Err(RespError::TooLarge));
    }

    #[test]
    fn element_limit() {
        assert_eq!(len(b"*9\r\n"), Err(RespError::TooLarge));
        assert_eq!(len(b"~9\r\n"), Err(RespError::TooLarge));
        // Maps count keys and values.
        assert_eq!(len(b"%4\r\n"), Ok(None));
        assert_eq!(len(b"%5\r\n"), Err(RespError::TooLarge));
        assert_eq!(len(b"|4\r\n"), Err(RespError::TooLarge));
    }

    #[test]
    fn depth_limit() {
        assert_eq!(len(b"*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n"), Ok(Some(20)));
        assert_eq!(
            len(b"*1\r\n*1\r\n*1\r\n*1\r\n*0\r\n"),
            Err(RespError::TooDeep)
        );
        let flat = Limits {
            max_depth: 0,
            ..LIMITS
        };
        assert_eq!(frame_len(b"*0\r\n", &flat), Err(RespError::TooDeep));
        assert_eq!(frame_len(b":1\r\n", &flat), Ok(Some(4)));
    }

    #[test]
    fn bad_types() {
        assert_eq!(len(b"x\r\n"), Err(RespError::BadType(b'x')));
        assert_eq!(len(b"*1\r\n?\r\n"), Err(RespError::BadType(b'?')));
    }

    #[test]
    fn bad_lengths() {
        for v in [
            b"$\r\n".as_slice(),
            b"$-2\r\n",
            b"$+3\r\n",
            b"$ 3\r\n",
            b"$?\r\n",
            b"!-1\r\n",
            b"~-1\r\n",
            b"%-1\r\n",
            b"*1x\r\n",
        ] {
            assert_eq!(
                len(v),
                Err(RespError::BadLength),
                "{:?}",
                String::from_utf8_lossy(v)
            );
        }
    }

    #[test]
    fn bad_line_endings() {
        assert_eq!(len(b"$3\r\nabcXY"), Err(RespError::BadLine));
        assert_eq!(len(b"$3\r\nabc\rX"), Err(RespError::BadLine));
        // Detected before the whole terminator has arrived.
        assert_eq!(len(b"$3\r\nabcX"), Err(RespError::BadLine));
        assert_eq!(len(b"+a\rb\r\n"), Err(RespError::BadLine));
        assert_eq!(len(b"+a\nb\r\n"), Err(RespError::BadLine));
        assert_eq!(len(b":1\n"), Err(RespError::BadLine));
    }
}
