//! Reconnect delays: capped exponential backoff with jitter, so a Redis
//! restart is not met by every worker of every host at the same instant, and
//! an unreachable Redis is never retried in a busy loop.

const BASE_MS: u64 = 100;
const CAP_MS: u64 = 5_000;

#[derive(Debug, Default)]
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    /// The delay before the next attempt: drawn from [d/2, d] where d doubles
    /// from 100 ms per failed attempt up to 5 s. `random` is any random number.
    pub fn next_delay_ms(&mut self, random: u32) -> u64 {
        let ceiling = (BASE_MS << self.attempt.min(16)).min(CAP_MS);
        self.attempt = self.attempt.saturating_add(1);
        let floor = ceiling / 2;
        floor + u64::from(random) % (ceiling - floor + 1)
    }

    /// A connection succeeded: the next failure starts from the base delay.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_within_jitter_and_stop_at_the_cap() {
        let mut b = Backoff::default();
        let ceilings = [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000];
        for (i, ceiling) in ceilings.iter().enumerate() {
            let d = b.next_delay_ms(u32::MAX - i as u32);
            assert!(
                d >= ceiling / 2 && d <= *ceiling,
                "attempt {i}: {d} not in [{}, {ceiling}]",
                ceiling / 2
            );
        }
    }

    #[test]
    fn extremes_of_random_reach_both_ends() {
        assert_eq!(Backoff::default().next_delay_ms(0), 50);
        assert_eq!(Backoff::default().next_delay_ms(50), 100);
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::default();
        for _ in 0..20 {
            b.next_delay_ms(7);
        }
        assert!(b.next_delay_ms(0) >= 2_500);
        b.reset();
        assert!(b.next_delay_ms(0) <= 100);
    }

    #[test]
    fn many_failures_do_not_overflow() {
        let mut b = Backoff::default();
        for _ in 0..10_000 {
            assert!(b.next_delay_ms(u32::MAX) <= CAP_MS);
        }
    }
}
