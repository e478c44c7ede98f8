//! A bounded queue of byte chunks waiting to leave on one connection: the
//! bookkeeping half of the module's send path (the socket half lives with
//! nginx). Chunks are reference-counted so that one encoded frame can sit in
//! the queues of every recipient without a copy.
//!
//! A client that keeps up still sees bursts: one read from Redis can carry
//! many messages, all queued before the socket is offered any. So the limit
//! has two parts, as Redis's own client output buffers do: bytes over
//! `soft` are allowed for `grace_ms`, and never more than `burst` of them.
//!
//! A chunk larger than the whole allowance (a long message, a small limit)
//! would never fit. Refusing a room's frame, shared by every member, would
//! close every member however promptly it reads; refusing a command to
//! Redis would turn away a message that Redis could take at once. Where the
//! limit says so (`oversized`), such a chunk is let in as long as no more
//! than `soft` waits before it.

use std::collections::VecDeque;
use std::rc::Rc;

#[derive(Debug, PartialEq, Eq)]
pub struct Full;

struct Chunk {
    data: Rc<[u8]>,
    sent: usize,
}

/// How many bytes may wait, and for how long past `soft`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub soft: usize,
    pub burst: usize,
    pub grace_ms: u64,
    /// A chunk larger than `soft` + `burst` is let in when at most `soft`
    /// waits before it.
    pub oversized: bool,
}

impl Limit {
    /// A plain byte limit, with no burst allowance.
    pub const fn strict(bytes: usize) -> Self {
        Limit {
            soft: bytes,
            burst: 0,
            grace_ms: 0,
            oversized: false,
        }
    }

    /// Whether `len` more bytes may join `waiting` ones, grace aside.
    pub fn admits(&self, waiting: usize, len: usize) -> bool {
        let hard = self.soft + self.burst;
        waiting + len <= hard || (self.oversized && len > hard && waiting <= self.soft)
    }
}

pub struct SendQueue {
    chunks: VecDeque<Chunk>,
    bytes: usize,
    limit: Limit,
    /// Since when the queue has held more than `limit.soft` bytes.
    over_since: Option<u64>,
}

impl SendQueue {
    pub fn new(limit: Limit) -> Self {
        SendQueue {
            chunks: VecDeque::new(),
            bytes: 0,
            limit,
            over_since: None,
        }
    }

    /// Queues a chunk unless that would pass the limit; `now_ms` (asked only
    /// past the soft limit) times how long the queue has been over it.
    pub fn push(&mut self, data: Rc<[u8]>, now_ms: impl FnOnce() -> u64) -> Result<(), Full> {
        let after = self.bytes + data.len();
        if after > self.limit.soft {
            if !self.limit.admits(self.bytes, data.len()) {
                return Err(Full);
            }
            let now_ms = now_ms();
            let since = *self.over_since.get_or_insert(now_ms);
            if now_ms.saturating_sub(since) > self.limit.grace_ms {
                return Err(Full);
            }
        }
        self.bytes = after;
        self.chunks.push_back(Chunk { data, sent: 0 });
        Ok(())
    }

    /// Bytes waiting to be sent.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether what waits should be written now rather than held for a
    /// later, bigger write: past a quarter of what may wait (`soft` +
    /// `burst`), holding more would bring a client that keeps up close to
    /// the limit. Not sooner: every write wakes the client, and with big
    /// messages writing at a fixed 64 KB cost both sides far more CPU.
    pub fn is_large(&self) -> bool {
        self.bytes >= (self.limit.soft + self.limit.burst) / 4
    }

    /// The soft limit is measured again whenever bytes leave or are dropped.
    fn recheck(&mut self) {
        if self.bytes <= self.limit.soft {
            self.over_since = None;
        }
    }

    /// Puts a chunk ahead of everything else (connection setup), regardless
    /// of the limit.
    pub fn push_front(&mut self, data: Rc<[u8]>) {
        self.bytes += data.len();
        self.chunks.push_front(Chunk { data, sent: 0 });
    }

    /// Queues a chunk regardless of the limit: for the one close frame that
    /// ends a session.
    pub fn push_unbounded(&mut self, data: Rc<[u8]>) {
        self.bytes += data.len();
        self.chunks.push_back(Chunk { data, sent: 0 });
    }

    /// Whether `data` is next to go (possibly part-way out).
    pub fn front_is(&self, data: &Rc<[u8]>) -> bool {
        self.chunks
            .front()
            .is_some_and(|c| Rc::ptr_eq(&c.data, data))
    }

    /// Removes the first chunk if it is `data` and nothing of it was sent.
    pub fn remove_front_if(&mut self, data: &Rc<[u8]>) {
        if self
            .chunks
            .front()
            .is_some_and(|c| c.sent == 0 && Rc::ptr_eq(&c.data, data))
        {
            self.bytes -= data.len();
            self.chunks.pop_front();
            self.recheck();
        }
    }

    /// Drops a chunk that was sent in part; returns whether there was one.
    pub fn drop_partial_front(&mut self) -> bool {
        match self.chunks.front() {
            Some(c) if c.sent > 0 => {
                self.bytes -= c.data.len() - c.sent;
                self.chunks.pop_front();
                self.recheck();
                true
            }
            _ => false,
        }
    }

    /// Keeps the first `owed` chunks and a chunk that is part-way out
    /// (cutting either would corrupt the stream) and drops the rest.
    pub fn truncate_to(&mut self, owed: usize) {
        let partial = usize::from(self.chunks.front().is_some_and(|c| c.sent > 0));
        self.chunks.truncate(owed.max(partial));
        self.bytes = self.chunks.iter().map(|c| c.data.len() - c.sent).sum();
        self.recheck();
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Drops everything, e.g. when the connection is gone.
    pub fn clear(&mut self) {
        self.chunks.clear();
        self.bytes = 0;
        self.over_since = None;
    }

    /// The unsent bytes of the first `n` chunks, in order: what the next
    /// send should carry.
    pub fn pending(&self, n: usize) -> impl Iterator<Item = &[u8]> {
        self.chunks.iter().take(n).map(|c| &c.data[c.sent..])
    }

    /// Accounts for `sent` bytes gone from the front; returns how many
    /// chunks went whole.
    pub fn advance(&mut self, mut sent: usize) -> usize {
        self.bytes -= sent;
        let mut done = 0;
        while let Some(chunk) = self.chunks.front_mut() {
            let take = sent.min(chunk.data.len() - chunk.sent);
            chunk.sent += take;
            sent -= take;
            if chunk.sent < chunk.data.len() {
                break;
            }
            self.chunks.pop_front();
            done += 1;
        }
        self.recheck();
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(s: &str) -> Rc<[u8]> {
        Rc::from(s.as_bytes())
    }

    fn pending(q: &SendQueue) -> Vec<String> {
        q.pending(usize::MAX)
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect()
    }

    #[test]
    fn push_respects_the_limit_but_the_bypasses_do_not() {
        let mut q = SendQueue::new(Limit::strict(10));
        assert_eq!(q.push(chunk("12345"), || 0), Ok(()));
        assert_eq!(q.push(chunk("123456"), || 0), Err(Full));
        assert_eq!(q.push(chunk("12345"), || 0), Ok(()));
        q.push_unbounded(chunk("close"));
        q.push_front(chunk("auth"));
        assert_eq!(pending(&q), ["auth", "12345", "12345", "close"]);
        assert_eq!(q.chunk_count(), 4);
    }

    #[test]
    fn advance_pops_whole_chunks_and_remembers_a_partial_one() {
        let mut q = SendQueue::new(Limit::strict(100));
        for s in ["abc", "defg", "hi"] {
            q.push(chunk(s), || 0).unwrap();
        }
        assert_eq!(q.advance(5), 1);
        assert_eq!(pending(&q), ["fg", "hi"]);
        assert_eq!(q.advance(0), 0);
        assert_eq!(q.advance(4), 2);
        assert!(q.is_empty());
        // Room is freed as bytes leave.
        assert_eq!(q.push(chunk(&"x".repeat(100)), || 0), Ok(()));
    }

    #[test]
    fn pending_is_limited_to_n_chunks() {
        let mut q = SendQueue::new(Limit::strict(100));
        for s in ["a", "b", "c"] {
            q.push(chunk(s), || 0).unwrap();
        }
        assert_eq!(q.pending(2).count(), 2);
    }

    #[test]
    fn a_partly_sent_chunk_survives_truncation_and_nothing_else_does() {
        let mut q = SendQueue::new(Limit::strict(100));
        for s in ["abcd", "efg"] {
            q.push(chunk(s), || 0).unwrap();
        }
        q.advance(1);
        q.truncate_to(0);
        assert_eq!(pending(&q), ["bcd"]);
        assert!(q.drop_partial_front());
        assert!(q.is_empty());
        assert!(!q.drop_partial_front());
        // Nothing part-way out: truncation empties the queue.
        q.push(chunk("xyz"), || 0).unwrap();
        q.truncate_to(0);
        assert!(q.is_empty());
    }

    #[test]
    fn a_queue_is_large_from_a_quarter_of_soft_plus_burst() {
        let mut q = SendQueue::new(Limit {
            soft: 60,
            burst: 40,
            grace_ms: 0,
            oversized: false,
        });
        q.push(chunk(&"x".repeat(24)), || 0).unwrap();
        assert!(!q.is_large());
        q.push(chunk("y"), || 0).unwrap();
        assert!(q.is_large());
        q.advance(1);
        assert!(!q.is_large());
    }

    #[test]
    fn owed_chunks_survive_truncation_sent_or_not() {
        let mut q = SendQueue::new(Limit::strict(100));
        for s in ["head", "efg", "hi"] {
            q.push(chunk(s), || 0).unwrap();
        }
        q.truncate_to(1);
        assert_eq!(pending(&q), ["head"]);
        assert_eq!(q.bytes(), 4);
        q.advance(2);
        q.truncate_to(1);
        assert_eq!(pending(&q), ["ad"]);
        assert_eq!(q.bytes(), 2);
    }

    #[test]
    fn a_burst_may_pass_the_soft_limit_for_the_grace_time_only() {
        let limit = Limit {
            soft: 10,
            burst: 20,
            grace_ms: 100,
            oversized: false,
        };
        let mut q = SendQueue::new(limit);
        assert_eq!(q.push(chunk("0123456789"), || 1000), Ok(()));
        // Over soft from t=1000: allowed within the grace time...
        assert_eq!(q.push(chunk("0123456789"), || 1000), Ok(()));
        assert_eq!(q.push(chunk("0123456789"), || 1100), Ok(()));
        // ...but never past soft + burst...
        assert_eq!(q.push(chunk("x"), || 1100), Err(Full));
        // ...and not after the grace time while it stays over.
        q.advance(10);
        assert_eq!(q.push(chunk("x"), || 1101), Err(Full));
        // Back under soft: the clock starts over.
        q.advance(11);
        assert_eq!(q.bytes(), 9);
        assert_eq!(q.push(chunk("0123456789"), || 5000), Ok(()));
        assert_eq!(q.push(chunk("x"), || 5100), Ok(()));
    }

    #[test]
    fn a_chunk_larger_than_the_allowance_joins_a_queue_not_behind() {
        let limit = Limit {
            soft: 10,
            burst: 5,
            grace_ms: 100,
            oversized: true,
        };
        let big = || chunk(&"x".repeat(40));
        let mut q = SendQueue::new(limit);
        assert_eq!(q.push(big(), || 1000), Ok(()));
        // Nothing more until it has left: the queue is past everything.
        assert_eq!(q.push(chunk("y"), || 1000), Err(Full));
        q.advance(40);
        // Small events waiting (up to soft) do not keep it out...
        assert_eq!(q.push(chunk(&"s".repeat(10)), || 2000), Ok(()));
        assert_eq!(q.push(big(), || 2000), Ok(()));
        // ...and with it in, the queue is past everything again.
        assert_eq!(q.push(chunk("y"), || 2000), Err(Full));
        let mut q = SendQueue::new(limit);
        // A queue already over soft is behind: it is refused.
        assert_eq!(q.push(chunk(&"s".repeat(11)), || 3000), Ok(()));
        assert_eq!(q.push(big(), || 3000), Err(Full));
        // A chunk within the allowance is judged as ever.
        assert_eq!(q.push(chunk("abcd"), || 3000), Ok(()));
        assert_eq!(q.push(chunk("e"), || 3000), Err(Full));
        // Without `oversized`, such a chunk never fits.
        let mut q = SendQueue::new(Limit::strict(10));
        assert_eq!(q.push(big(), || 0), Err(Full));
    }

    #[test]
    fn a_strict_limit_has_no_burst() {
        let mut q = SendQueue::new(Limit::strict(4));
        assert_eq!(q.push(chunk("abcd"), || 0), Ok(()));
        assert_eq!(q.push(chunk("e"), || 0), Err(Full));
    }

    #[test]
    fn the_setup_chunk_is_recognised_at_the_front_only() {
        let mut q = SendQueue::new(Limit::strict(100));
        let setup = chunk("AUTH");
        q.push(chunk("PUBLISH"), || 0).unwrap();
        q.push_front(setup.clone());
        assert!(q.front_is(&setup));
        assert!(!q.front_is(&chunk("AUTH")), "same bytes, another chunk");
        q.remove_front_if(&setup);
        assert_eq!(pending(&q), ["PUBLISH"]);
        q.remove_front_if(&setup);
        assert_eq!(q.chunk_count(), 1);
    }
}
