//! Room and nickname from the configured request values (usually query
//! arguments, which nginx hands over still URL-encoded).

use std::fmt;

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

/// Longest room name, in characters.
pub const MAX_ROOM_CHARS: usize = 64;
/// Longest nickname, in characters; longer ones are cut.
pub const MAX_USER_CHARS: usize = 32;

/// Why a room name is refused at the handshake (HTTP 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadRoom {
    NotUtf8,
    TooLong,
    ControlCharacter,
    SurroundingWhitespace,
}

impl fmt::Display for BadRoom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BadRoom::NotUtf8 => "room name is not valid UTF-8",
            BadRoom::TooLong => "room name is longer than 64 characters",
            BadRoom::ControlCharacter => "room name contains a control character",
            BadRoom::SurroundingWhitespace => "room name starts or ends with whitespace",
        })
    }
}

impl std::error::Error for BadRoom {}

/// The room a client asked for. A room is shared by everyone who names it,
/// so a name that would display ambiguously is refused rather than altered.
pub fn room(raw: &[u8]) -> Result<String, BadRoom> {
    let decoded = percent_decode(raw);
    if decoded.is_empty() {
        return Ok("lobby".to_owned());
    }
    let name = String::from_utf8(decoded).map_err(|_| BadRoom::NotUtf8)?;
    if name.chars().count() > MAX_ROOM_CHARS {
        return Err(BadRoom::TooLong);
    }
    if name.chars().any(char::is_control) {
        return Err(BadRoom::ControlCharacter);
    }
    if name.trim() != name {
        return Err(BadRoom::SurroundingWhitespace);
    }
    Ok(name)
}

/// The nickname a client asked for, made presentable rather than refused:
/// control characters dropped, whitespace trimmed, length capped. `random`
/// picks the guest number for clients without a usable name.
pub fn user(raw: &[u8], random: u32) -> String {
    let decoded = percent_decode(raw);
    let lossy = String::from_utf8_lossy(&decoded);
    let cleaned: String = lossy.chars().filter(|c| !c.is_control()).collect();
    let name: String = cleaned.trim().chars().take(MAX_USER_CHARS).collect();
    let name = name.trim_end();
    if name.is_empty() {
        format!("guest-{:04}", random % 10000)
    } else {
        name.to_owned()
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
        assert_eq!(room(b"").unwrap(), "lobby");
        assert_eq!(room(b"dev%20ops").unwrap(), "dev ops");
        assert_eq!(room("caf%C3%A9%20%E2%98%95".as_bytes()).unwrap(), "café ☕");
    }

    #[test]
    fn room_limits() {
        let ok = "é".repeat(MAX_ROOM_CHARS);
        assert_eq!(room(ok.as_bytes()).unwrap(), ok);
        let long = "a".repeat(MAX_ROOM_CHARS + 1);
        assert_eq!(room(long.as_bytes()), Err(BadRoom::TooLong));
        assert_eq!(room(b"a%FFb"), Err(BadRoom::NotUtf8));
        assert_eq!(room(b"a%01b"), Err(BadRoom::ControlCharacter));
        assert_eq!(room(b"a%0Ab"), Err(BadRoom::ControlCharacter));
        assert_eq!(room(b"+a"), Err(BadRoom::SurroundingWhitespace));
        assert_eq!(room(b"a%09"), Err(BadRoom::ControlCharacter));
        assert_eq!(room(b"a+"), Err(BadRoom::SurroundingWhitespace));
    }

    #[test]
    fn user_is_sanitised() {
        assert_eq!(user(b"%C3", 1), "\u{fffd}");
        assert_eq!(user(b"+a%01b%0A+", 1), "ab");
        assert_eq!(user(b"+++", 42), "guest-0042");
        let long = "x".repeat(40);
        assert_eq!(user(long.as_bytes(), 1), "x".repeat(MAX_USER_CHARS));
        // Cutting at the cap must not leave trailing whitespace behind.
        let spaced = format!("{}+{}", "y".repeat(MAX_USER_CHARS - 1), "z".repeat(5));
        assert_eq!(user(spaced.as_bytes(), 1), "y".repeat(MAX_USER_CHARS - 1));
        assert_eq!(user("Zo%C3%AB+%F0%9F%8C%B8".as_bytes(), 1), "Zoë 🌸");
    }

    #[test]
    fn user_defaults_to_guest_number() {
        assert_eq!(user(b"", 7), "guest-0007");
        assert_eq!(user(b"", 123_456), "guest-3456");
        assert_eq!(user(b"", u32::MAX), "guest-7295");
        assert_eq!(user(b"ann", 7), "ann");
    }
}
