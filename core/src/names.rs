//! Room and nickname from the configured request values (usually query
//! arguments, which nginx hands over still URL-encoded).

/// Decodes `%XX` and `+`. Malformed escapes are kept as typed rather than
/// rejected: a chat name is not worth refusing a connection over.
pub fn percent_decode(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'%' => {
                let hi = raw.get(i + 1).and_then(|&b| hex(b));
                let lo = raw.get(i + 2).and_then(|&b| hex(b));
                if let (Some(hi), Some(lo)) = (hi, lo) {
                    out.push(hi << 4 | lo);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

pub fn room(raw: &[u8]) -> String {
    or_default(raw, || "lobby".to_owned())
}

/// `random` picks the guest number so that anonymous users are told apart.
pub fn user(raw: &[u8], random: u32) -> String {
    or_default(raw, || format!("guest-{:04}", random % 10000))
}

fn or_default(raw: &[u8], default: impl FnOnce() -> String) -> String {
    let decoded = percent_decode(raw);
    if decoded.is_empty() {
        default()
    } else {
        String::from_utf8_lossy(&decoded).into_owned()
    }
}

fn hex(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_escapes_and_plus() {
        assert_eq!(percent_decode(b"a%20b+c%2Bd%2b"), b"a b c+d+");
        assert_eq!(percent_decode(b"%E4%B8%96"), "世".as_bytes());
        assert_eq!(percent_decode(b"%00"), b"\0");
    }

    #[test]
    fn keeps_malformed_escapes() {
        assert_eq!(percent_decode(b"100%"), b"100%");
        assert_eq!(percent_decode(b"%4"), b"%4");
        assert_eq!(percent_decode(b"%zz%41"), b"%zzA");
        // The byte after a bad '%' is still examined on its own.
        assert_eq!(percent_decode(b"%%41"), b"%A");
        assert_eq!(percent_decode(b"%+"), b"% ");
    }

    #[test]
    fn room_defaults_to_lobby() {
        assert_eq!(room(b""), "lobby");
        assert_eq!(room(b"dev%20ops"), "dev ops");
        // Only an empty value falls back; a decoded space is a real name.
        assert_eq!(room(b"+"), " ");
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        assert_eq!(room(b"a%FFb"), "a\u{fffd}b");
        assert_eq!(user(b"%C3", 1), "\u{fffd}");
    }

    #[test]
    fn user_defaults_to_guest_number() {
        assert_eq!(user(b"", 7), "guest-0007");
        assert_eq!(user(b"", 123_456), "guest-3456");
        assert_eq!(user(b"", u32::MAX), "guest-7295");
        assert_eq!(user(b"ann", 7), "ann");
    }
}
