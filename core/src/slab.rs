//! A worker's sessions, addressed by handle. nginx hands back a handle (in
//! `c->data` or a request's context slot) on every event, so a handle must
//! stay a plain integer; the generation makes a handle of a freed session
//! find nothing instead of its slot's next tenant.

/// A handle to one slot's one tenant. Never zero, so it fits where nginx
/// expects a non-null pointer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    index: u32,
    generation: u32,
}

impl Key {
    /// The handle as one integer (generation in the high half).
    pub fn to_raw(self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.index)
    }

    /// The inverse of `to_raw`; `None` for a value no `Key` produces.
    pub fn from_raw(raw: u64) -> Option<Key> {
        let generation = (raw >> 32) as u32;
        (generation != 0).then_some(Key {
            index: raw as u32,
            generation,
        })
    }
}

struct Slot<T> {
    /// Odd while occupied; bumped on every insert and remove.
    generation: u32,
    value: Option<T>,
}

pub struct Slab<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Slab<T> {
    pub fn new() -> Self {
        Slab {
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }

    /// The key the next `insert` will return, for a value that must know
    /// its own key.
    pub fn next_key(&self) -> Key {
        match self.free.last() {
            Some(&index) => Key {
                index,
                generation: self.slots[index as usize].generation.wrapping_add(1) | 1,
            },
            None => Key {
                index: self.slots.len() as u32,
                generation: 1,
            },
        }
    }

    pub fn insert(&mut self, value: T) -> Key {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    value: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.generation = slot.generation.wrapping_add(1) | 1;
        slot.value = Some(value);
        self.len += 1;
        Key {
            index,
            generation: slot.generation,
        }
    }

    pub fn get(&self, key: Key) -> Option<&T> {
        let slot = self.slots.get(key.index as usize)?;
        (slot.generation == key.generation)
            .then_some(slot.value.as_ref())
            .flatten()
    }

    pub fn get_mut(&mut self, key: Key) -> Option<&mut T> {
        let slot = self.slots.get_mut(key.index as usize)?;
        (slot.generation == key.generation)
            .then_some(slot.value.as_mut())
            .flatten()
    }

    pub fn remove(&mut self, key: Key) -> Option<T> {
        let slot = self.slots.get_mut(key.index as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        let value = slot.value.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(key.index);
        self.len -= 1;
        Some(value)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The handles of every tenant, for a pass that may remove some.
    pub fn keys(&self) -> Vec<Key> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.value.is_some())
            .map(|(i, s)| Key {
                index: i as u32,
                generation: s.generation,
            })
            .collect()
    }
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_handle_finds_nothing_even_after_reuse() {
        let mut s = Slab::new();
        let a = s.insert("a");
        assert_eq!(s.remove(a), Some("a"));
        let b = s.insert("b");
        assert_eq!(
            s.get(a),
            None,
            "the old handle must not reach the new tenant"
        );
        assert_eq!(s.get(b), Some(&"b"));
        assert_eq!(s.remove(a), None);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn next_key_is_what_insert_returns() {
        let mut s = Slab::new();
        for round in 0..3 {
            let k = s.next_key();
            assert_eq!(s.insert(round), k);
        }
        let first = s.keys()[0];
        s.remove(first);
        let k = s.next_key();
        assert_eq!(s.insert(9), k);
        assert_ne!(k, first);
    }

    #[test]
    fn raw_round_trip_and_never_zero() {
        let mut s = Slab::new();
        for i in 0..5 {
            let k = s.insert(i);
            assert_ne!(k.to_raw(), 0);
            assert_eq!(Key::from_raw(k.to_raw()), Some(k));
        }
        assert_eq!(Key::from_raw(0), None);
        assert_eq!(Key::from_raw(7), None);
    }

    #[test]
    fn keys_lists_the_live_ones() {
        let mut s = Slab::new();
        let a = s.insert(1);
        let b = s.insert(2);
        let c = s.insert(3);
        s.remove(b);
        assert_eq!(s.keys(), vec![a, c]);
        for k in s.keys() {
            s.remove(k);
        }
        assert!(s.is_empty());
    }
}
