//! A room's newest messages as one worker saw them go by, so that a member
//! joining a room the worker already follows gets its history without a
//! Redis round trip. The copy is only as good as the worker's subscription:
//! it starts from a fetch that went out while the room was live, takes
//! every live message after it, and the rooms layer throws it away whenever
//! the subscription may have missed one (an outage, a resubscription, the
//! last member leaving).

use std::collections::VecDeque;

use crate::history::{Position, Request};

/// Most bytes (events plus one per event, as `history::within_budget`
/// counts them) one room's copy holds; older messages past it are dropped,
/// and a member allowed more history than is left is sent Redis's.
pub const ROOM_BYTES: usize = 256 * 1024;

/// Most bytes one worker's copies hold in all; past it, rooms ask Redis.
pub const WORKER_BYTES: usize = 32 << 20;

/// The history a copy stands for: members asking for another count or
/// keep time ask Redis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub count: usize,
    pub keep_ms: u64,
}

impl Shape {
    /// The shape of a request whose history a copy can answer: the newest
    /// messages, not those since a given one. (Members live in Redis alone.)
    pub fn of(req: &Request) -> Option<Shape> {
        (req.since.is_none() && req.count > 0).then_some(Shape {
            count: req.count,
            keep_ms: req.keep_ms,
        })
    }
}

#[derive(Default)]
pub struct Recent {
    state: State,
}

#[derive(Default)]
enum State {
    #[default]
    Cold,
    /// A fetch by `primer` is out; live messages since it went are kept to
    /// lay over its reply.
    Priming {
        shape: Shape,
        primer: u64,
        live: Messages,
    },
    Warm {
        shape: Shape,
        messages: Messages,
        /// When Redis drops the room's history if nothing more is said
        /// (its key's expiry), by the worker's clock; `None`: never.
        expires_ms: Option<u64>,
    },
}

/// Messages oldest first, with their size as `within_budget` counts it.
#[derive(Default)]
struct Messages {
    list: VecDeque<(Position, String)>,
    bytes: usize,
    /// Some were dropped for size rather than count.
    short: bool,
}

impl Messages {
    fn push(&mut self, pos: Position, event: String, count: usize) {
        if self.list.back().is_some_and(|(newest, _)| *newest >= pos) {
            return;
        }
        self.bytes += event.len() + 1;
        self.list.push_back((pos, event));
        while self.list.len() > count {
            self.pop();
        }
        while self.bytes > ROOM_BYTES {
            self.pop();
            self.short = true;
        }
    }

    fn pop(&mut self) {
        if let Some((_, event)) = self.list.pop_front() {
            self.bytes -= event.len() + 1;
        }
    }
}

impl Recent {
    /// Bytes held, for the worker's total.
    pub fn bytes(&self) -> usize {
        match &self.state {
            State::Cold => 0,
            State::Priming { live, .. } => live.bytes,
            State::Warm { messages, .. } => messages.bytes,
        }
    }

    /// Forgets everything: the subscription may have missed a message.
    pub fn reset(&mut self) {
        self.state = State::Cold;
    }

    /// A fetch for `shape` by `primer` has just gone out for a live room:
    /// unless a copy is made or being made, its reply starts one.
    pub fn begin(&mut self, shape: Shape, primer: u64) {
        if let State::Cold = self.state {
            self.state = State::Priming {
                shape,
                primer,
                live: Messages::default(),
            };
        }
    }

    /// `primer` will not see its fetch answered (it left).
    pub fn abandon(&mut self, primer: u64) {
        if matches!(self.state, State::Priming { primer: p, .. } if p == primer) {
            self.state = State::Cold;
        }
    }

    /// The fetch begun by `primer` came back with `messages` (oldest
    /// first) and the history's time to live (`None`: no expiry, or no
    /// history). `now_ms` is the worker's clock.
    pub fn prime(
        &mut self,
        primer: u64,
        messages: &[(Position, String)],
        ttl_ms: Option<u64>,
        now_ms: u64,
    ) {
        let State::Priming {
            shape,
            primer: p,
            live,
        } = &mut self.state
        else {
            return;
        };
        if *p != primer {
            return;
        }
        let (shape, live) = (*shape, std::mem::take(live));
        let mut all = Messages::default();
        for (pos, event) in messages {
            all.push(*pos, event.clone(), shape.count);
        }
        let live_expiry = live.list.back().map(|_| now_ms + shape.keep_ms);
        for (pos, event) in live.list {
            all.push(pos, event, shape.count);
        }
        all.short |= live.short;
        self.state = State::Warm {
            shape,
            messages: all,
            expires_ms: live_expiry.or(ttl_ms.map(|ttl| now_ms + ttl)),
        };
    }

    /// A live message of the room (already delivered to its members).
    pub fn seen(&mut self, pos: Position, event: &str, now_ms: u64) {
        match &mut self.state {
            State::Cold => {}
            State::Priming { shape, live, .. } => {
                live.push(pos, event.to_owned(), shape.count);
            }
            State::Warm {
                shape,
                messages,
                expires_ms,
            } => {
                // Redis let the history go; this message starts a new one.
                if expires_ms.is_some_and(|at| at <= now_ms) {
                    *messages = Messages::default();
                }
                messages.push(pos, event.to_owned(), shape.count);
                *expires_ms = Some(now_ms + shape.keep_ms);
            }
        }
    }

    /// The history for a member asking `shape` and allowed `budget` bytes
    /// of it (oldest first), if this copy is that history.
    pub fn serve(
        &mut self,
        shape: Shape,
        budget: usize,
        now_ms: u64,
    ) -> Option<&[(Position, String)]> {
        let State::Warm {
            shape: have,
            messages,
            expires_ms,
        } = &mut self.state
        else {
            return None;
        };
        if *have != shape {
            return None;
        }
        if expires_ms.is_some_and(|at| at <= now_ms) {
            return Some(&[]);
        }
        // A member allowed more than is left here needs what was dropped.
        if messages.short && budget >= messages.bytes {
            return None;
        }
        Some(messages.list.make_contiguous())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: Shape = Shape {
        count: 3,
        keep_ms: 1000,
    };

    fn pos(ms: u64) -> Position {
        Position { ms, seq: 0 }
    }

    fn msg(ms: u64) -> (Position, String) {
        (pos(ms), format!("m{ms}"))
    }

    fn ids(served: Option<&[(Position, String)]>) -> Option<Vec<u64>> {
        served.map(|m| m.iter().map(|(p, _)| p.ms).collect())
    }

    #[test]
    fn shape_is_only_for_the_newest_messages() {
        let req = |since, members| Request {
            since,
            count: 3,
            keep_ms: 1000,
            members,
        };
        assert_eq!(Shape::of(&req(None, 0)), Some(SHAPE));
        assert_eq!(Shape::of(&req(Some(pos(1)), 0)), None);
        assert_eq!(Shape::of(&req(None, 50)), Some(SHAPE));
    }

    #[test]
    fn cold_and_priming_copies_serve_nothing() {
        let mut r = Recent::default();
        assert_eq!(ids(r.serve(SHAPE, 1 << 20, 0)), None);
        r.begin(SHAPE, 7);
        r.seen(pos(5), "m5", 0);
        assert_eq!(ids(r.serve(SHAPE, 1 << 20, 0)), None);
    }

    #[test]
    fn reply_and_live_messages_meet_without_duplicates() {
        let mut r = Recent::default();
        r.begin(SHAPE, 7);
        // Live messages that went by while the fetch was out; 2 is in the
        // reply too.
        r.seen(pos(2), "m2", 0);
        r.seen(pos(3), "m3", 0);
        r.prime(7, &[msg(1), msg(2)], None, 0);
        assert_eq!(ids(r.serve(SHAPE, 1 << 20, 0)), Some(vec![1, 2, 3]));
        r.seen(pos(4), "m4", 0);
        r.seen(pos(4), "m4", 0);
        assert_eq!(ids(r.serve(SHAPE, 1 << 20, 0)), Some(vec![2, 3, 4]));
    }

    #[test]
    fn only_the_primers_reply_makes_the_copy() {
        let mut r = Recent::default();
        r.begin(SHAPE, 7);
        r.begin(SHAPE, 8);
        r.prime(8, &[msg(1)], None, 0);
        assert_eq!(ids(r.serve(SHAPE, 1 << 20, 0)), None);
        r.abandon(8);
        r.prime(7, &[msg(1)], None, 0);
        assert_eq!(ids(r.serve(SHAPE, 1 << 20, 0)), Some(vec![1]));
        // A reply after a reset belongs to a subscription that may have
        // missed messages.
        r.reset();
        r.prime(7, &[msg(1)], None, 0);
        assert_eq!(ids(r.serve(SHAPE, 1 << 20, 0)), None);
        r.begin(SHAPE, 9);
        r.abandon(9);
        r.begin(SHAPE, 10);
        r.prime(10, &[], None, 0);
        assert_eq!(ids(r.serve(SHAPE, 1 << 20, 0)), Some(vec![]));
    }

    #[test]
    fn another_shape_asks_redis() {
        let mut r = Recent::default();
        r.begin(SHAPE, 7);
        r.prime(7, &[msg(1)], None, 0);
        let other = Shape { count: 50, ..SHAPE };
        assert_eq!(ids(r.serve(other, 1 << 20, 0)), None);
        let other = Shape {
            keep_ms: 5,
            ..SHAPE
        };
        assert_eq!(ids(r.serve(other, 1 << 20, 0)), None);
    }

    #[test]
    fn history_expires_as_redis_expires_it() {
        let mut r = Recent::default();
        r.begin(SHAPE, 7);
        // Redis said the history has 300 ms to live.
        r.prime(7, &[msg(1)], Some(300), 1000);
        assert_eq!(ids(r.serve(SHAPE, 1 << 20, 1299)), Some(vec![1]));
        assert_eq!(ids(r.serve(SHAPE, 1 << 20, 1300)), Some(vec![]));
        // A new message starts the keep time again.
        r.seen(pos(2000), "m2000", 2000);
        assert_eq!(ids(r.serve(SHAPE, 1 << 20, 2999)), Some(vec![2000]));
        r.seen(pos(2999), "m2999", 2999);
        assert_eq!(ids(r.serve(SHAPE, 1 << 20, 3998)), Some(vec![2000, 2999]));
        r.seen(pos(5000), "m5000", 5000);
        assert_eq!(ids(r.serve(SHAPE, 1 << 20, 5000)), Some(vec![5000]));
        assert_eq!(ids(r.serve(SHAPE, 1 << 20, 6000)), Some(vec![]));
    }

    #[test]
    fn live_messages_while_priming_restart_the_keep_time() {
        let mut r = Recent::default();
        r.begin(SHAPE, 7);
        r.seen(pos(2), "m2", 500);
        r.prime(7, &[msg(1)], Some(10), 600);
        assert_eq!(ids(r.serve(SHAPE, 1 << 20, 1599)), Some(vec![1, 2]));
    }

    #[test]
    fn a_copy_short_of_bytes_serves_only_smaller_budgets() {
        let mut r = Recent::default();
        let shape = Shape {
            count: 10,
            keep_ms: 1000,
        };
        r.begin(shape, 7);
        let big = "x".repeat(ROOM_BYTES / 3);
        let reply: Vec<_> = (1..=4).map(|ms| (pos(ms), big.clone())).collect();
        r.prime(7, &reply, None, 0);
        assert_eq!(ids(r.serve(shape, 1 << 20, 0)), None);
        assert_eq!(ids(r.serve(shape, 1024, 0)), Some(vec![3, 4]));
        assert!(r.bytes() <= ROOM_BYTES);
        r.reset();
        assert_eq!(r.bytes(), 0);
    }
}
