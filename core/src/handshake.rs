//! RFC 6455 opening-handshake validation, independent of nginx types so the
//! rules can be unit tested without a running server.

use std::fmt;

/// The parts of an HTTP request the handshake depends on.
pub struct Request<'a> {
    pub method: &'a [u8],
    /// nginx style: `major * 1000 + minor`, so HTTP/1.1 is 1001.
    pub http_version: u32,
    pub headers: &'a [(&'a [u8], &'a [u8])],
}

/// Why a handshake was refused; the variant order mirrors the check order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Method,
    HttpVersion,
    Upgrade,
    Connection,
    Key,
    Version,
    Origin,
}

impl Rejection {
    /// HTTP status to answer with.
    pub fn status(self) -> u16 {
        match self {
            Rejection::Method => 405,
            // 426 tells the client to retry with the version we advertise
            // in `Sec-WebSocket-Version`; everything else is a plain bad request.
            Rejection::Version => 426,
            Rejection::Origin => 403,
            Rejection::HttpVersion
            | Rejection::Upgrade
            | Rejection::Connection
            | Rejection::Key => 400,
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rejection::Method => "WebSocket handshake method is not GET",
            Rejection::HttpVersion => "WebSocket handshake requires HTTP/1.1",
            Rejection::Upgrade => "missing \"Upgrade: websocket\" header",
            Rejection::Connection => "missing \"Connection: upgrade\" header",
            Rejection::Key => "missing, duplicated or invalid \"Sec-WebSocket-Key\" header",
            Rejection::Version => "unsupported \"Sec-WebSocket-Version\" (only 13 is supported)",
            Rejection::Origin => "\"Origin\" missing or not allowed",
        })
    }
}

impl std::error::Error for Rejection {}

const HTTP_1_1: u32 = 1001;
const HTTP_2_0: u32 = 2000;
const KEY_LEN: usize = 24;

/// Validates the request and returns the `Sec-WebSocket-Accept` value.
pub fn accept(req: &Request<'_>) -> Result<String, Rejection> {
    if req.method != b"GET" {
        return Err(Rejection::Method);
    }
    // HTTP/2 and HTTP/3 have no Upgrade: their requests share one
    // connection with other streams, which a WebSocket cannot take over.
    if !(HTTP_1_1..HTTP_2_0).contains(&req.http_version) {
        return Err(Rejection::HttpVersion);
    }
    if !any_header_has_token(req, b"upgrade", b"websocket") {
        return Err(Rejection::Upgrade);
    }
    if !any_header_has_token(req, b"connection", b"upgrade") {
        return Err(Rejection::Connection);
    }
    let key = single_key(req)?;
    check_version(req)?;
    Ok(tungstenite::handshake::derive_accept_key(key))
}

/// With a list of allowed origins, a handshake must come from one of them:
/// browsers always send `Origin`, so this stops other sites' pages from
/// opening chat sessions with the user's cookies (cross-site WebSocket
/// hijacking). Origins compare ASCII case-insensitively.
pub fn check_origin(req: &Request<'_>, allowed: &[String]) -> Result<(), Rejection> {
    let mut origins = header_values(req, b"origin");
    match (origins.next(), origins.next()) {
        (Some(origin), None)
            if allowed
                .iter()
                .any(|a| trim_ows(origin).eq_ignore_ascii_case(a.as_bytes())) =>
        {
            Ok(())
        }
        _ => Err(Rejection::Origin),
    }
}

fn header_values<'r>(req: &'r Request<'_>, name: &'r [u8]) -> impl Iterator<Item = &'r [u8]> {
    req.headers
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| *v)
}

/// HTTP lists may be split across several headers of the same name, so the
/// token may be in any of them.
fn any_header_has_token(req: &Request<'_>, name: &[u8], token: &[u8]) -> bool {
    header_values(req, name).any(|value| {
        value
            .split(|&b| b == b',')
            .any(|t| trim_ows(t).eq_ignore_ascii_case(token))
    })
}

fn single_key<'a>(req: &Request<'a>) -> Result<&'a [u8], Rejection> {
    let mut found = None;
    for (name, value) in req.headers {
        if name.eq_ignore_ascii_case(b"sec-websocket-key") {
            // Two keys make the expected accept value ambiguous.
            if found.is_some() {
                return Err(Rejection::Key);
            }
            found = Some(trim_ows(value));
        }
    }
    match found {
        Some(key) if is_canonical_nonce(key) => Ok(key),
        _ => Err(Rejection::Key),
    }
}

fn check_version(req: &Request<'_>) -> Result<(), Rejection> {
    let mut seen = false;
    for value in header_values(req, b"sec-websocket-version") {
        if trim_ows(value) != b"13" {
            return Err(Rejection::Version);
        }
        seen = true;
    }
    if seen {
        Ok(())
    } else {
        Err(Rejection::Version)
    }
}

/// A base64-encoded 16-byte nonce is always 22 data characters plus `==`.
/// The 22nd character carries only 2 significant bits, so its low 4 bits
/// must be zero; anything else would decode to the same bytes under a
/// non-canonical spelling.
fn is_canonical_nonce(key: &[u8]) -> bool {
    if key.len() != KEY_LEN || &key[22..] != b"==" {
        return false;
    }
    let data = &key[..22];
    data.iter().all(|&b| base64_value(b).is_some())
        && base64_value(data[21]).is_some_and(|v| v & 0x0f == 0)
}

fn base64_value(b: u8) -> Option<u8> {
    match b {
        b'A'..=b'Z' => Some(b - b'A'),
        b'a'..=b'z' => Some(b - b'a' + 26),
        b'0'..=b'9' => Some(b - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"dGhlIHNhbXBsZSBub25jZQ==";
    const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    fn base() -> Vec<(&'static [u8], &'static [u8])> {
        vec![
            (b"Host", b"example.com"),
            (b"Upgrade", b"websocket"),
            (b"Connection", b"Upgrade"),
            (b"Sec-WebSocket-Key", KEY),
            (b"Sec-WebSocket-Version", b"13"),
        ]
    }

    fn run(method: &[u8], version: u32, headers: &[(&[u8], &[u8])]) -> Result<String, Rejection> {
        accept(&Request {
            method,
            http_version: version,
            headers,
        })
    }

    fn with(headers: &[(&'static [u8], &'static [u8])]) -> Result<String, Rejection> {
        run(b"GET", 1001, headers)
    }

    fn replace(name: &[u8], value: Option<&'static [u8]>) -> Vec<(&'static [u8], &'static [u8])> {
        let mut h: Vec<_> = base()
            .into_iter()
            .filter(|(n, _)| !n.eq_ignore_ascii_case(name))
            .collect();
        if let Some(v) = value {
            let n = base()
                .into_iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .unwrap()
                .0;
            h.push((n, v));
        }
        h
    }

    #[test]
    fn rfc_example_accept_value() {
        assert_eq!(with(&base()).unwrap(), ACCEPT);
    }

    #[test]
    fn method_checked_first() {
        // Even with no headers at all, a POST is refused for its method.
        assert_eq!(run(b"POST", 1000, &[]), Err(Rejection::Method));
        assert_eq!(run(b"get", 1001, &base()), Err(Rejection::Method));
    }

    #[test]
    fn http_version() {
        assert_eq!(run(b"GET", 1000, &base()), Err(Rejection::HttpVersion));
        assert_eq!(run(b"GET", 9, &base()), Err(Rejection::HttpVersion));
        assert!(run(b"GET", 1009, &base()).is_ok());
        assert_eq!(run(b"GET", 2000, &base()), Err(Rejection::HttpVersion));
        assert_eq!(run(b"GET", 3000, &base()), Err(Rejection::HttpVersion));
    }

    #[test]
    fn upgrade_header() {
        assert_eq!(with(&replace(b"upgrade", None)), Err(Rejection::Upgrade));
        assert_eq!(
            with(&replace(b"upgrade", Some(b"websockets"))),
            Err(Rejection::Upgrade)
        );
        assert!(with(&replace(b"upgrade", Some(b"h2c, WebSocket "))).is_ok());
        let mut h = replace(b"upgrade", Some(b"h2c"));
        h.push((b"UPGRADE", b"websocket"));
        assert!(with(&h).is_ok());
    }

    #[test]
    fn connection_header() {
        assert_eq!(
            with(&replace(b"connection", None)),
            Err(Rejection::Connection)
        );
        assert_eq!(
            with(&replace(b"connection", Some(b"keep-alive"))),
            Err(Rejection::Connection)
        );
        // "upgraded" contains "upgrade" but is a different token.
        assert_eq!(
            with(&replace(b"connection", Some(b"upgraded"))),
            Err(Rejection::Connection)
        );
        assert!(with(&replace(b"connection", Some(b"keep-alive,\tUPGRADE"))).is_ok());
        let mut h = replace(b"connection", Some(b"keep-alive"));
        h.push((b"connection", b"upgrade"));
        assert!(with(&h).is_ok());
    }

    #[test]
    fn key_missing_or_duplicated() {
        assert_eq!(
            with(&replace(b"sec-websocket-key", None)),
            Err(Rejection::Key)
        );
        let mut h = base();
        h.push((b"sec-websocket-key", KEY));
        assert_eq!(with(&h), Err(Rejection::Key));
    }

    #[test]
    fn key_trimmed() {
        let h = replace(b"sec-websocket-key", Some(b" \tdGhlIHNhbXBsZSBub25jZQ== "));
        assert_eq!(with(&h).unwrap(), ACCEPT);
    }

    #[test]
    fn key_must_be_canonical_16_bytes() {
        let bad: &[&'static [u8]] = &[
            b"",
            b"dGhlIHNhbXBsZSBub25jZQ=",      // too short
            b"dGhlIHNhbXBsZSBub25jZQ===",    // too long
            b"dGhlIHNhbXBsZSBub25jZQAA",     // no padding
            b"dGhlIHNhbXBsZSBub25jZR==",     // non-zero trailing bits
            b"dGhlIHNhbXBsZSBub25j*Q==",     // outside the alphabet
            b"dGhlIHNhbXBsZSBub25jZ-==",     // url-safe alphabet
            b"dGhlIHNhbXBs ZSBub25jZQ==",    // inner space
            b"dGhlIHNhbXBsZSBub25jZQ==dGhl", // trailing data
        ];
        for key in bad {
            assert_eq!(
                with(&replace(b"sec-websocket-key", Some(key))),
                Err(Rejection::Key),
                "{:?}",
                String::from_utf8_lossy(key)
            );
        }
        for key in [
            b"AAAAAAAAAAAAAAAAAAAAAA==",
            b"/////////////////////w==",
            b"+++++++++++++++++++++g==",
        ] {
            assert!(with(&replace(b"sec-websocket-key", Some(key))).is_ok());
        }
    }

    #[test]
    fn version_header() {
        assert_eq!(
            with(&replace(b"sec-websocket-version", None)),
            Err(Rejection::Version)
        );
        assert_eq!(
            with(&replace(b"sec-websocket-version", Some(b"8"))),
            Err(Rejection::Version)
        );
        assert_eq!(
            with(&replace(b"sec-websocket-version", Some(b"13, 8"))),
            Err(Rejection::Version)
        );
        assert!(with(&replace(b"sec-websocket-version", Some(b" 13 "))).is_ok());
        let mut h = base();
        h.push((b"sec-websocket-version", b"12"));
        assert_eq!(with(&h), Err(Rejection::Version));
    }

    #[test]
    fn key_checked_before_version() {
        let mut h = replace(b"sec-websocket-version", None);
        h.retain(|(n, _)| !n.eq_ignore_ascii_case(b"sec-websocket-key"));
        assert_eq!(with(&h), Err(Rejection::Key));
    }

    #[test]
    fn statuses_and_messages() {
        assert_eq!(Rejection::Method.status(), 405);
        assert_eq!(Rejection::HttpVersion.status(), 400);
        assert_eq!(Rejection::Upgrade.status(), 400);
        assert_eq!(Rejection::Connection.status(), 400);
        assert_eq!(Rejection::Key.status(), 400);
        assert_eq!(Rejection::Version.status(), 426);
        assert_eq!(
            Rejection::Upgrade.to_string(),
            "missing \"Upgrade: websocket\" header"
        );
    }

    #[test]
    fn origin_must_be_listed() {
        let allowed = vec![
            "https://a.example".to_owned(),
            "http://localhost:8080".to_owned(),
        ];
        let check = |headers: &[(&[u8], &[u8])]| {
            let req = Request {
                method: b"GET",
                http_version: 1001,
                headers,
            };
            check_origin(&req, &allowed)
        };
        assert_eq!(check(&[(b"Origin", b"https://a.example")]), Ok(()));
        assert_eq!(check(&[(b"origin", b"HTTPS://A.EXAMPLE")]), Ok(()));
        assert_eq!(check(&[(b"Origin", b"http://localhost:8080")]), Ok(()));
        assert_eq!(
            check(&[(b"Origin", b"https://a.example.evil")]),
            Err(Rejection::Origin)
        );
        assert_eq!(check(&[(b"Origin", b"null")]), Err(Rejection::Origin));
        assert_eq!(check(&[]), Err(Rejection::Origin));
        let two: &[(&[u8], &[u8])] =
            &[(b"Origin", b"https://a.example"), (b"Origin", b"https://b")];
        assert_eq!(check(two), Err(Rejection::Origin));
        assert_eq!(Rejection::Origin.status(), 403);
    }
}
