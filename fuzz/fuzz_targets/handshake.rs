//! `handshake::accept` and `handshake::check_origin` against an independent
//! re-statement of the rules in RFC 6455 §4.2.1 as the module applies them.
//!
//! Input layout (text-like so seeds are easy to write), lines split on '\n':
//!   line 1: the method, raw bytes
//!   line 2: the HTTP version as nginx encodes it (decimal; anything that is
//!           not decimal digits is folded into a number from its bytes)
//!   then:   header lines `name:value` (no ':' means an empty value)
//!   after the first empty line: the allowed origins, one a line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sha1::{Digest, Sha1};
use wschat_core::handshake::{accept, check_origin, Rejection, Request};

const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|&b| b == b'\n');
    let method = lines.next().unwrap_or(b"");
    let version = version_of(lines.next().unwrap_or(b""));
    let mut headers: Vec<(&[u8], &[u8])> = Vec::new();
    for line in lines.by_ref() {
        if line.is_empty() {
            break;
        }
        match line.iter().position(|&b| b == b':') {
            Some(i) => headers.push((&line[..i], &line[i + 1..])),
            None => headers.push((line, b"")),
        }
    }
    let allowed: Vec<String> = lines
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();

    let req = Request {
        method,
        http_version: version,
        headers: &headers,
    };

    let got = accept(&req);
    let want = reference_accept(method, version, &headers);
    match (&got, &want) {
        (Ok(value), Ok(key)) => {
            assert_eq!(value, &expected_accept_value(key), "accept value");
            assert_eq!(value.len(), 28);
        }
        (Err(g), Err(w)) => assert_eq!(g, w, "rejection reason"),
        _ => panic!("accept disagrees with the rules: got {got:?}, rules say {want:?}"),
    }
    // Independent of the oracle: Ok really implies the headline rules.
    if got.is_ok() {
        assert_eq!(method, b"GET");
        assert!((1001..2000).contains(&version), "only HTTP/1.1 and later 1.x upgrade");
    }
    if let Err(r) = got {
        assert!(matches!(r.status(), 400 | 403 | 405 | 426));
        assert!(!r.to_string().is_empty());
    }

    let got = check_origin(&req, &allowed);
    let want = reference_origin(&headers, &allowed);
    assert_eq!(got, want, "check_origin, allowed = {allowed:?}");
    if got.is_ok() {
        assert!(!allowed.is_empty());
    }
});

fn version_of(line: &[u8]) -> u32 {
    if !line.is_empty() && line.len() <= 9 && line.iter().all(u8::is_ascii_digit) {
        return std::str::from_utf8(line).unwrap().parse().unwrap();
    }
    line.iter()
        .fold(0u32, |acc, &b| acc.wrapping_mul(31).wrapping_add(u32::from(b)))
}

fn ows_trim(s: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = s.iter().position(|b| !is_ows(b)).unwrap_or(s.len());
    let end = s.iter().rposition(|b| !is_ows(b)).map_or(start, |i| i + 1);
    &s[start..end]
}

fn lower(s: &[u8]) -> Vec<u8> {
    s.to_ascii_lowercase()
}

fn named<'a>(headers: &'a [(&'a [u8], &'a [u8])], name: &str) -> Vec<&'a [u8]> {
    headers
        .iter()
        .filter(|(n, _)| lower(n) == name.as_bytes())
        .map(|(_, v)| *v)
        .collect()
}

fn has_token(headers: &[(&[u8], &[u8])], name: &str, token: &str) -> bool {
    named(headers, name).iter().any(|v| {
        v.split(|&b| b == b',')
            .any(|t| lower(ows_trim(t)) == token.as_bytes())
    })
}

/// Decodes standard base64 with padding, strictly; None on anything else.
fn b64_decode(s: &[u8]) -> Option<Vec<u8>> {
    if s.len() % 4 != 0 {
        return None;
    }
    let pad = s.iter().rev().take_while(|&&b| b == b'=').count();
    if pad > 2 {
        return None;
    }
    let mut bits: u64 = 0;
    let mut nbits = 0;
    let mut out = Vec::new();
    for &c in &s[..s.len() - pad] {
        let v = B64.iter().position(|&x| x == c)? as u64;
        bits = bits << 6 | v;
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            out.push((bits >> nbits) as u8);
            bits &= (1 << nbits) - 1;
        }
    }
    Some(out)
}

fn b64_encode(data: &[u8]) -> String {
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk.len();
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let v = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= n {
                out.push(char::from(B64[(v >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A key is acceptable iff it is the canonical base64 spelling of 16 bytes.
fn key_is_valid(key: &[u8]) -> bool {
    match b64_decode(key) {
        Some(raw) => raw.len() == 16 && b64_encode(&raw).as_bytes() == key,
        None => false,
    }
}

fn reference_accept<'a>(
    method: &[u8],
    version: u32,
    headers: &'a [(&'a [u8], &'a [u8])],
) -> Result<&'a [u8], Rejection> {
    if method != b"GET" {
        return Err(Rejection::Method);
    }
    // HTTP/1.1 (or a later 1.x); HTTP/2 and HTTP/3 have no Upgrade.
    if !(1001..2000).contains(&version) {
        return Err(Rejection::HttpVersion);
    }
    if !has_token(headers, "upgrade", "websocket") {
        return Err(Rejection::Upgrade);
    }
    if !has_token(headers, "connection", "upgrade") {
        return Err(Rejection::Connection);
    }
    let keys = named(headers, "sec-websocket-key");
    let key = match keys.as_slice() {
        [k] if key_is_valid(ows_trim(k)) => ows_trim(k),
        _ => return Err(Rejection::Key),
    };
    let versions = named(headers, "sec-websocket-version");
    if versions.is_empty() || versions.iter().any(|v| ows_trim(v) != b"13") {
        return Err(Rejection::Version);
    }
    Ok(key)
}

fn expected_accept_value(key: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(key);
    h.update(GUID);
    b64_encode(&h.finalize())
}

fn reference_origin(headers: &[(&[u8], &[u8])], allowed: &[String]) -> Result<(), Rejection> {
    match named(headers, "origin").as_slice() {
        [o] if allowed
            .iter()
            .any(|a| lower(ows_trim(o)) == lower(a.as_bytes())) =>
        {
            Ok(())
        }
        _ => Err(Rejection::Origin),
    }
}
