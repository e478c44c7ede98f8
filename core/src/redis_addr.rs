//! The `websocket_chat_redis` directive value: where Redis lives and what
//! to send right after connecting (AUTH, SELECT).

use std::fmt;
use std::net::Ipv6Addr;

const DEFAULT_PORT: u16 = 6379;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `host` is stored without IPv6 brackets.
    Tcp {
        host: String,
        port: u16,
    },
    Unix(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisAddr {
    pub target: Target,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: Option<u32>,
    /// `rediss://`: the connection is TLS.
    pub tls: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum AddrError {
    Empty,
    BadPort,
    BadDb,
    BadUnixPath,
    BadScheme,
    BadHost,
    BadEscape,
    /// `cluster=` with no seed, or an empty one between commas.
    EmptySeed,
    /// A cluster seed that is a unix socket or names a database.
    BadSeed,
}

impl fmt::Display for AddrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddrError::Empty => "empty Redis address",
            AddrError::BadPort => "invalid port in Redis address",
            AddrError::BadDb => "invalid database number in Redis address",
            AddrError::BadUnixPath => "Redis unix socket path must be absolute",
            AddrError::BadScheme => {
                "unsupported scheme in Redis address (only redis:// and rediss:// are accepted)"
            }
            AddrError::BadHost => "invalid host in Redis address",
            AddrError::BadEscape => "invalid percent-escape in Redis address credentials",
            AddrError::EmptySeed => "empty seed in Redis cluster address",
            AddrError::BadSeed => {
                "a Redis cluster seed must be host:port (Redis Cluster has no unix sockets and only database 0)"
            }
        })
    }
}

impl std::error::Error for AddrError {}

pub fn parse(s: &str) -> Result<RedisAddr, AddrError> {
    if s.is_empty() {
        return Err(AddrError::Empty);
    }
    if let Some((scheme, rest)) = s.split_once("://") {
        return if scheme.eq_ignore_ascii_case("redis") {
            parse_url(rest, false)
        } else if scheme.eq_ignore_ascii_case("rediss") {
            parse_url(rest, true)
        } else {
            Err(AddrError::BadScheme)
        };
    }
    let target = match s.strip_prefix("unix:") {
        Some(path) => unix_target(path)?,
        None => tcp_target(s)?,
    };
    Ok(RedisAddr {
        target,
        username: None,
        password: None,
        db: None,
        tls: false,
    })
}

/// `cluster=` followed by this: seed nodes of a Redis Cluster, separated
/// by commas. The first may carry a scheme and credentials; the others
/// are `host[:port]` and share them.
pub fn parse_cluster(list: &str) -> Result<Vec<RedisAddr>, AddrError> {
    let mut seeds: Vec<RedisAddr> = Vec::new();
    for text in list.split(',') {
        if text.is_empty() {
            return Err(AddrError::EmptySeed);
        }
        let seed = match seeds.first() {
            None => parse(text)?,
            Some(_) if text.starts_with("unix:") => return Err(AddrError::BadSeed),
            Some(first) if !text.contains("://") => RedisAddr {
                target: tcp_target(text)?,
                ..first.clone()
            },
            Some(_) => parse(text)?,
        };
        if matches!(seed.target, Target::Unix(_)) || seed.db.is_some() {
            return Err(AddrError::BadSeed);
        }
        seeds.push(seed);
    }
    Ok(seeds)
}

impl RedisAddr {
    /// The address in the form nginx's `ngx_parse_url` accepts.
    pub fn endpoint(&self) -> String {
        match &self.target {
            Target::Tcp { host, port } if host.contains(':') => format!("[{host}]:{port}"),
            Target::Tcp { host, port } => format!("{host}:{port}"),
            Target::Unix(path) => format!("unix:{path}"),
        }
    }

    /// The host name a TLS connection checks the certificate against (and
    /// sends as SNI).
    pub fn host(&self) -> Option<&str> {
        match &self.target {
            Target::Tcp { host, .. } => Some(host),
            Target::Unix(_) => None,
        }
    }

    /// RESP commands to send before anything else on a fresh connection.
    pub fn setup_commands(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(password) = &self.password {
            let mut auth = redis::cmd("AUTH");
            if let Some(user) = &self.username {
                auth.arg(user);
            }
            auth.arg(password);
            out.extend_from_slice(&auth.get_packed_command());
        }
        if let Some(db) = self.db {
            out.extend_from_slice(&redis::cmd("SELECT").arg(db).get_packed_command());
        }
        out
    }

    /// How many replies `setup_commands` will draw from the server.
    pub fn setup_reply_count(&self) -> usize {
        usize::from(self.password.is_some()) + usize::from(self.db.is_some())
    }
}

/// Meant for logs, so the password is masked.
impl fmt::Display for RedisAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.username.is_none() && self.password.is_none() && self.db.is_none() && !self.tls {
            return f.write_str(&self.endpoint());
        }
        f.write_str(if self.tls { "rediss://" } else { "redis://" })?;
        if let Some(user) = &self.username {
            f.write_str(user)?;
        }
        if self.password.is_some() {
            f.write_str(":***")?;
        }
        if self.username.is_some() || self.password.is_some() {
            f.write_str("@")?;
        }
        f.write_str(&self.endpoint())?;
        if let Some(db) = self.db {
            write!(f, "/{db}")?;
        }
        Ok(())
    }
}

fn parse_url(rest: &str, tls: bool) -> Result<RedisAddr, AddrError> {
    let (authority, path) = match rest.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (rest, None),
    };
    // The last '@' separates credentials, so an unescaped '@' in a
    // password still works.
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (username, password) = match userinfo {
        Some(info) => match info.split_once(':') {
            Some((u, p)) => (decode_credential(u)?, decode_credential(p)?),
            None => (decode_credential(info)?, None),
        },
        None => (None, None),
    };
    let db = match path {
        None | Some("") => None,
        Some(p) => Some(parse_db(p)?),
    };
    Ok(RedisAddr {
        target: tcp_target(hostport)?,
        username,
        password,
        db,
        tls,
    })
}

fn parse_db(s: &str) -> Result<u32, AddrError> {
    // `u32::from_str` would also take a leading '+'.
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AddrError::BadDb);
    }
    s.parse().map_err(|_| AddrError::BadDb)
}

fn unix_target(path: &str) -> Result<Target, AddrError> {
    if !path.starts_with('/') || path.contains('\0') {
        return Err(AddrError::BadUnixPath);
    }
    Ok(Target::Unix(path.to_owned()))
}

fn tcp_target(s: &str) -> Result<Target, AddrError> {
    let (host, port) = if let Some(bracketed) = s.strip_prefix('[') {
        let (inner, after) = bracketed.split_once(']').ok_or(AddrError::BadHost)?;
        inner.parse::<Ipv6Addr>().map_err(|_| AddrError::BadHost)?;
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':').ok_or(AddrError::BadHost)?),
        };
        (inner, port)
    } else {
        let (host, port) = match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        };
        // nginx reads any address starting with "unix:" as a socket path, so
        // a host of that name could never be reached over TCP.
        if !is_host_name(host) || host.eq_ignore_ascii_case("unix") {
            return Err(AddrError::BadHost);
        }
        (host, port)
    };
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => parse_port(p)?,
    };
    Ok(Target::Tcp {
        host: host.to_owned(),
        port,
    })
}

/// Names and IPv4 literals only; anything else would be misread by
/// `ngx_parse_url` or is a typo.
fn is_host_name(host: &str) -> bool {
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

fn parse_port(s: &str) -> Result<u16, AddrError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AddrError::BadPort);
    }
    match s.parse::<u16>() {
        Ok(0) | Err(_) => Err(AddrError::BadPort),
        Ok(port) => Ok(port),
    }
}

/// Percent-decodes a URL credential; empty means absent.
fn decode_credential(s: &str) -> Result<Option<String>, AddrError> {
    if s.is_empty() {
        return Ok(None);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hi = bytes.get(i + 1).and_then(|&b| hex(b));
            let lo = bytes.get(i + 2).and_then(|&b| hex(b));
            let (Some(hi), Some(lo)) = (hi, lo) else {
                return Err(AddrError::BadEscape);
            };
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map(Some)
        .map_err(|_| AddrError::BadEscape)
}

fn hex(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_seeds_share_the_first_ones_credentials() {
        let seeds = parse_cluster("rediss://u:p@10.0.0.1:7000,10.0.0.2:7001,[::1]").unwrap();
        assert_eq!(seeds.len(), 3);
        assert!(seeds
            .iter()
            .all(|s| s.tls && s.password.as_deref() == Some("p")));
        assert_eq!(seeds[1].endpoint(), "10.0.0.2:7001");
        assert_eq!(seeds[2].endpoint(), "[::1]:6379");
        assert_eq!(parse_cluster(""), Err(AddrError::EmptySeed));
        assert_eq!(parse_cluster("a:1,,b:2"), Err(AddrError::EmptySeed));
        assert_eq!(parse_cluster("unix:/tmp/r.sock"), Err(AddrError::BadSeed));
        assert_eq!(
            parse_cluster("a:1,unix:/tmp/r.sock"),
            Err(AddrError::BadSeed)
        );
        assert_eq!(parse_cluster("redis://a:7000/2"), Err(AddrError::BadSeed));
        assert_eq!(parse_cluster("a:1,b:port"), Err(AddrError::BadPort));
    }

    fn tcp(host: &str, port: u16) -> Target {
        Target::Tcp {
            host: host.into(),
            port,
        }
    }

    fn plain(target: Target) -> RedisAddr {
        RedisAddr {
            target,
            username: None,
            password: None,
            db: None,
            tls: false,
        }
    }

    #[test]
    fn plain_forms() {
        assert_eq!(parse("127.0.0.1:6379"), Ok(plain(tcp("127.0.0.1", 6379))));
        assert_eq!(parse("redis.local"), Ok(plain(tcp("redis.local", 6379))));
        assert_eq!(parse("h:1"), Ok(plain(tcp("h", 1))));
        assert_eq!(parse("h:65535"), Ok(plain(tcp("h", 65535))));
        assert_eq!(parse("[::1]:7000"), Ok(plain(tcp("::1", 7000))));
        assert_eq!(parse("[::1]"), Ok(plain(tcp("::1", 6379))));
        assert_eq!(
            parse("unix:/run/redis.sock"),
            Ok(plain(Target::Unix("/run/redis.sock".into())))
        );
    }

    #[test]
    fn url_forms() {
        assert_eq!(parse("redis://h"), Ok(plain(tcp("h", 6379))));
        assert_eq!(parse("REDIS://h:7/"), Ok(plain(tcp("h", 7))));
        assert_eq!(
            parse("redis://u%40x:p%3Aw@[2001:db8::1]:6380/15"),
            Ok(RedisAddr {
                target: tcp("2001:db8::1", 6380),
                username: Some("u@x".into()),
                password: Some("p:w".into()),
                db: Some(15),
                tls: false,
            })
        );
        let a = parse("redis://:s3cret@h").unwrap();
        assert_eq!(a.username, None);
        assert_eq!(a.password.as_deref(), Some("s3cret"));
        // Raw '@' inside the password: the last '@' ends the credentials.
        let a = parse("redis://:a@b@h:1").unwrap();
        assert_eq!(a.password.as_deref(), Some("a@b"));
        assert_eq!(a.target, tcp("h", 1));
    }

    #[test]
    fn tls_urls() {
        let a = parse("rediss://:pw@redis.example.com:6380/2").unwrap();
        assert!(a.tls);
        assert_eq!(a.target, tcp("redis.example.com", 6380));
        assert_eq!(a.host(), Some("redis.example.com"));
        assert_eq!(a.to_string(), "rediss://:***@redis.example.com:6380/2");
        assert_eq!(parse("REDISS://h").unwrap().to_string(), "rediss://h:6379");
        assert!(!parse("redis://h").unwrap().tls);
        assert_ne!(parse("rediss://h"), parse("redis://h"));
    }

    #[test]
    fn errors() {
        let cases = [
            ("", AddrError::Empty),
            ("h:0", AddrError::BadPort),
            ("h:65536", AddrError::BadPort),
            ("h:", AddrError::BadPort),
            ("h:+1", AddrError::BadPort),
            ("h:1:2", AddrError::BadPort),
            ("redis://h:x", AddrError::BadPort),
            ("redis://h/x", AddrError::BadDb),
            ("redis://h/+1", AddrError::BadDb),
            ("redis://h/4294967296", AddrError::BadDb),
            ("redis://h/1/2", AddrError::BadDb),
            ("unix:", AddrError::BadUnixPath),
            ("unix:run/redis.sock", AddrError::BadUnixPath),
            ("redis+unix:///tmp/r.sock", AddrError::BadScheme),
            ("http://h", AddrError::BadScheme),
            (":6379", AddrError::BadHost),
            ("redis://", AddrError::BadHost),
            ("redis://u:p@", AddrError::BadHost),
            ("my host:1", AddrError::BadHost),
            ("a\\b", AddrError::BadHost),
            ("::1", AddrError::BadHost),
            ("[::1", AddrError::BadHost),
            ("[::1]x", AddrError::BadHost),
            ("[nothex]:1", AddrError::BadHost),
            ("redis://u:%zz@h", AddrError::BadEscape),
            ("redis://u:%4@h", AddrError::BadEscape),
            ("redis://%ff:p@h", AddrError::BadEscape),
        ];
        for (input, err) in cases {
            assert_eq!(parse(input), Err(err), "{input:?}");
        }
    }

    #[test]
    fn endpoint_forms() {
        assert_eq!(parse("h").unwrap().endpoint(), "h:6379");
        assert_eq!(parse("redis://[::1]").unwrap().endpoint(), "[::1]:6379");
        assert_eq!(parse("unix:/r.sock").unwrap().endpoint(), "unix:/r.sock");
    }

    #[test]
    fn display_masks_password() {
        let a = parse("redis://user:hunter2@h:1/2").unwrap();
        assert_eq!(a.to_string(), "redis://user:***@h:1/2");
        assert!(!a.to_string().contains("hunter2"));
        assert_eq!(
            parse("redis://:pw@h").unwrap().to_string(),
            "redis://:***@h:6379"
        );
        assert_eq!(
            parse("redis://h/0").unwrap().to_string(),
            "redis://h:6379/0"
        );
        assert_eq!(parse("[::1]:5").unwrap().to_string(), "[::1]:5");
    }

    #[test]
    fn setup_commands() {
        assert!(parse("h").unwrap().setup_commands().is_empty());
        assert_eq!(parse("h").unwrap().setup_reply_count(), 0);
        assert_eq!(parse("redis://:pw@h").unwrap().setup_reply_count(), 1);
        assert_eq!(parse("redis://u:pw@h/3").unwrap().setup_reply_count(), 2);
        assert_eq!(parse("redis://h/3").unwrap().setup_reply_count(), 1);
        assert_eq!(
            parse("redis://:pw@h").unwrap().setup_commands(),
            b"*2\r\n$4\r\nAUTH\r\n$2\r\npw\r\n"
        );
        assert_eq!(
            parse("redis://al:pw@h/3").unwrap().setup_commands(),
            b"*3\r\n$4\r\nAUTH\r\n$2\r\nal\r\n$2\r\npw\r\n*2\r\n$6\r\nSELECT\r\n$1\r\n3\r\n"
        );
        // A user name without a password cannot authenticate.
        assert!(parse("redis://al@h").unwrap().setup_commands().is_empty());
    }

    #[test]
    fn a_host_named_unix_is_refused() {
        // It would reach nginx as "unix:6379", a socket path.
        for bad in ["unix", "Unix:6380", "redis://UNIX:7"] {
            assert_eq!(parse(bad), Err(AddrError::BadHost), "{bad}");
        }
        assert!(parse("unixhost:6379").is_ok());
    }
}
