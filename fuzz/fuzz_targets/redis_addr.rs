//! `redis_addr::parse` on arbitrary directive text.
//!
//! Properties of every accepted address:
//! * `endpoint()` (what the module hands to nginx's `ngx_parse_url`) parses
//!   back to the same target, and nginx would read it as the same kind of
//!   address: nginx takes any endpoint starting with "unix:", in any case,
//!   as a unix-domain socket path.
//! * `Display` (used in logs) does not depend on the password at all, and
//!   masks it as "***".
//! * The target is well-formed (host charset or IPv6 literal, port != 0,
//!   absolute unix path without NUL).
//! * `setup_commands()` is exactly `setup_reply_count()` RESP arrays: AUTH
//!   with the decoded credentials, then SELECT with the database.
#![no_main]

use std::net::Ipv6Addr;

use libfuzzer_sys::fuzz_target;
use redis::Value;
use wschat_core::redis_addr::{parse, RedisAddr, Target};
use wschat_core::resp::{frame_len, Limits};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let addr = match parse(&text) {
        Ok(addr) => addr,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };

    match &addr.target {
        Target::Tcp { host, port } => {
            assert_ne!(*port, 0);
            assert!(!host.is_empty());
            if host.contains(':') {
                host.parse::<Ipv6Addr>().expect("IPv6 literal");
            } else {
                assert!(
                    host.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)),
                    "host {host:?}"
                );
            }
        }
        Target::Unix(path) => {
            assert!(path.starts_with('/') && !path.contains('\0'), "{path:?}");
            assert!(addr.username.is_none() && addr.password.is_none() && addr.db.is_none());
        }
    }

    // endpoint() round-trips, and means the same thing to nginx.
    let endpoint = addr.endpoint();
    let again = parse(&endpoint)
        .unwrap_or_else(|e| panic!("endpoint {endpoint:?} of {text:?} does not re-parse: {e}"));
    assert_eq!(again.target, addr.target, "endpoint {endpoint:?} of {text:?}");
    assert!(again.username.is_none() && again.password.is_none() && again.db.is_none());
    let nginx_sees_unix = endpoint.len() >= 5 && endpoint[..5].eq_ignore_ascii_case("unix:");
    assert_eq!(
        nginx_sees_unix,
        matches!(addr.target, Target::Unix(_)),
        "nginx's ngx_parse_url reads endpoint {endpoint:?} (from {text:?}) as the wrong kind"
    );

    // Display is for logs: it must not depend on the password at all, so
    // it equals the Display of the same address with other passwords.
    let shown = addr.to_string();
    if addr.password.is_some() {
        assert!(shown.contains(":***@"), "{shown:?}");
        for substitute in ["x", "y"] {
            let mut other = addr.clone();
            other.password = Some(substitute.to_owned());
            assert_eq!(shown, other.to_string(), "Display depends on the password");
        }
    }

    check_setup(&addr);
});

fn check_setup(addr: &RedisAddr) {
    let bytes = addr.setup_commands();
    let limits = Limits {
        max_bulk: bytes.len(),
        max_elements: 8,
        max_depth: 1,
    };
    let mut commands = Vec::new();
    let mut rest = bytes.as_slice();
    while !rest.is_empty() {
        let n = frame_len(rest, &limits)
            .expect("well-formed")
            .expect("complete");
        let Value::Array(items) = redis::parse_redis_value(&rest[..n]).expect("parses") else {
            panic!("command is not an array");
        };
        let args: Vec<Vec<u8>> = items
            .into_iter()
            .map(|v| match v {
                Value::BulkString(b) => b,
                other => panic!("argument {other:?}"),
            })
            .collect();
        commands.push(args);
        rest = &rest[n..];
    }
    assert_eq!(commands.len(), addr.setup_reply_count());

    let mut want: Vec<Vec<Vec<u8>>> = Vec::new();
    if let Some(pw) = &addr.password {
        let mut auth = vec![b"AUTH".to_vec()];
        if let Some(u) = &addr.username {
            auth.push(u.clone().into_bytes());
        }
        auth.push(pw.clone().into_bytes());
        want.push(auth);
    }
    if let Some(db) = addr.db {
        want.push(vec![b"SELECT".to_vec(), db.to_string().into_bytes()]);
    }
    assert_eq!(commands, want);
}
