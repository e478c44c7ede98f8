//! Per-connection message rate limiting: a leaky bucket in the manner of
//! nginx's `limit_req`, counted in thousandths of a message so that slow
//! rates (e.g. `30r/m`) stay exact with integer arithmetic.

use std::fmt;

/// A rate and the burst allowed on top of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Messages per second × 1000.
    per_sec_milli: u64,
    /// Messages allowed beyond the rate × 1000.
    burst_milli: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadLimit {
    Rate,
    Burst,
    Argument,
}

impl fmt::Display for BadLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BadLimit::Rate => "invalid rate (expected e.g. \"10r/s\" or \"60r/m\")",
            BadLimit::Burst => "invalid burst (expected \"burst=N\")",
            BadLimit::Argument => "invalid parameter",
        })
    }
}

impl std::error::Error for BadLimit {}

impl Limit {
    /// Parses `rate [burst=n]`, e.g. `["10r/s", "burst=20"]`.
    pub fn parse(args: &[&str]) -> Result<Limit, BadLimit> {
        let (rate, rest) = args.split_first().ok_or(BadLimit::Rate)?;
        let (count, unit) = rate.split_once("r/").ok_or(BadLimit::Rate)?;
        let count: u64 = count.parse().map_err(|_| BadLimit::Rate)?;
        let per_sec_milli = match unit {
            "s" => count.checked_mul(1000),
            "m" => count.checked_mul(1000).map(|c| c / 60),
            _ => None,
        }
        .filter(|&r| r > 0)
        .ok_or(BadLimit::Rate)?;
        let mut burst_milli = 0;
        for arg in rest {
            let n = arg.strip_prefix("burst=").ok_or(BadLimit::Argument)?;
            let n: u64 = n.parse().map_err(|_| BadLimit::Burst)?;
            burst_milli = n.checked_mul(1000).ok_or(BadLimit::Burst)?;
        }
        Ok(Limit {
            per_sec_milli,
            burst_milli,
        })
    }
}

/// One connection's state against a [`Limit`].
#[derive(Debug, Default, Clone)]
pub struct Bucket {
    excess_milli: u64,
    last_ms: Option<u64>,
}

impl Bucket {
    /// Counts one message at `now_ms`; false if it is over the limit (and is
    /// then not counted).
    pub fn allow(&mut self, limit: &Limit, now_ms: u64) -> bool {
        let Some(last) = self.last_ms else {
            // The first message of a connection is always allowed.
            self.last_ms = Some(now_ms);
            return true;
        };
        let elapsed = now_ms.saturating_sub(last);
        let drained = elapsed.saturating_mul(limit.per_sec_milli) / 1000;
        // What the bucket would hold with this message in it, beyond the
        // rate: a message that arrives on schedule adds nothing.
        let excess = (self.excess_milli + 1000).saturating_sub(drained);
        if excess > limit.burst_milli {
            return false;
        }
        self.excess_milli = excess;
        self.last_ms = Some(now_ms);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(args: &[&str]) -> Limit {
        Limit::parse(args).unwrap()
    }

    #[test]
    fn parses_rates_and_bursts() {
        assert_eq!(
            limit(&["10r/s"]),
            Limit {
                per_sec_milli: 10_000,
                burst_milli: 0
            }
        );
        assert_eq!(
            limit(&["60r/m", "burst=5"]),
            Limit {
                per_sec_milli: 1_000,
                burst_milli: 5_000
            }
        );
        assert_eq!(limit(&["1r/m"]).per_sec_milli, 16);
        for bad in [
            &["fast"][..],
            &["0r/s"],
            &["10r/h"],
            &["r/s"],
            &["-1r/s"],
            &[],
        ] {
            assert_eq!(Limit::parse(bad), Err(BadLimit::Rate), "{bad:?}");
        }
        assert_eq!(Limit::parse(&["1r/s", "burst=x"]), Err(BadLimit::Burst));
        assert_eq!(Limit::parse(&["1r/s", "nodelay"]), Err(BadLimit::Argument));
    }

    #[test]
    fn without_burst_one_message_per_period() {
        let l = limit(&["2r/s"]);
        let mut b = Bucket::default();
        assert!(b.allow(&l, 1_000));
        assert!(!b.allow(&l, 1_100));
        assert!(b.allow(&l, 1_500));
        assert!(!b.allow(&l, 1_600));
        assert!(b.allow(&l, 2_000));
    }

    #[test]
    fn burst_allows_that_many_extra_at_once() {
        let l = limit(&["5r/s", "burst=5"]);
        let mut b = Bucket::default();
        let allowed = (0..10).filter(|_| b.allow(&l, 0)).count();
        assert_eq!(allowed, 6);
        // After a second the bucket has drained by five messages.
        assert_eq!((0..10).filter(|_| b.allow(&l, 1_000)).count(), 5);
    }

    #[test]
    fn steady_rate_under_the_limit_is_never_refused() {
        let l = limit(&["5r/s"]);
        let mut b = Bucket::default();
        assert!((0..100).all(|i| b.allow(&l, i * 500)));
    }

    #[test]
    fn refused_messages_do_not_count() {
        let l = limit(&["1r/s"]);
        let mut b = Bucket::default();
        assert!(b.allow(&l, 0));
        for t in 1..10 {
            assert!(!b.allow(&l, t * 10));
        }
        assert!(b.allow(&l, 1_000));
    }

    #[test]
    fn clock_going_backwards_is_harmless() {
        let l = limit(&["1r/s"]);
        let mut b = Bucket::default();
        assert!(b.allow(&l, 5_000));
        assert!(!b.allow(&l, 4_000));
    }
}
