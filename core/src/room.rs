//! Which local connections are in which room, for one worker. The return
//! values of `join`/`leave` tell the caller when to (un)subscribe the room's
//! Redis channel.

use std::collections::HashMap;

pub struct Registry<K> {
    rooms: HashMap<Box<str>, Vec<K>>,
}

impl<K: Copy + Eq> Registry<K> {
    pub fn new() -> Self {
        Registry {
            rooms: HashMap::new(),
        }
    }

    /// Returns true if `member` is the room's first local member.
    pub fn join(&mut self, room: &str, member: K) -> bool {
        if let Some(members) = self.rooms.get_mut(room) {
            if !members.contains(&member) {
                members.push(member);
            }
            return false;
        }
        self.rooms.insert(room.into(), vec![member]);
        true
    }

    /// Returns true if the room has no local member left and was dropped.
    pub fn leave(&mut self, room: &str, member: K) -> bool {
        let Some(members) = self.rooms.get_mut(room) else {
            return false;
        };
        let Some(pos) = members.iter().position(|m| *m == member) else {
            return false;
        };
        // Order does not matter for broadcasting, so avoid shifting.
        members.swap_remove(pos);
        if members.is_empty() {
            self.rooms.remove(room);
            return true;
        }
        // A crowd that leaves must not pin its peak allocation forever;
        // keeping twice the length avoids shrinking again on the next leave.
        if members.len() < members.capacity() / 4 {
            let target = members.len() * 2;
            members.shrink_to(target);
        }
        false
    }

    pub fn members(&self, room: &str) -> &[K] {
        self.rooms.get(room).map_or(&[], Vec::as_slice)
    }

    /// Empty rooms are removed eagerly, so every listed room has a member.
    pub fn rooms(&self) -> impl Iterator<Item = &str> + '_ {
        self.rooms.keys().map(|k| &**k)
    }

    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }
}

impl<K: Copy + Eq> Default for Registry<K> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_join_and_last_leave_are_reported() {
        let mut r = Registry::new();
        assert!(r.join("a", 1));
        assert!(!r.join("a", 2));
        assert!(!r.leave("a", 1));
        assert!(r.leave("a", 2));
        assert_eq!(r.room_count(), 0);
        assert!(r.members("a").is_empty());
        // The room can be created again afterwards.
        assert!(r.join("a", 3));
    }

    #[test]
    fn double_join_is_a_noop() {
        let mut r = Registry::new();
        assert!(r.join("a", 1));
        assert!(!r.join("a", 1));
        assert_eq!(r.members("a"), &[1]);
        assert!(r.leave("a", 1));
    }

    #[test]
    fn leave_of_stranger_or_unknown_room() {
        let mut r = Registry::new();
        r.join("a", 1);
        assert!(!r.leave("a", 2));
        assert!(!r.leave("b", 1));
        assert_eq!(r.members("a"), &[1]);
        assert_eq!(r.room_count(), 1);
    }

    #[test]
    fn rooms_are_independent() {
        let mut r = Registry::new();
        assert!(r.join("a", 1));
        assert!(r.join("b", 1));
        assert!(!r.join("b", 2));
        let mut names: Vec<&str> = r.rooms().collect();
        names.sort_unstable();
        assert_eq!(names, ["a", "b"]);
        assert!(r.leave("a", 1));
        assert_eq!(r.rooms().collect::<Vec<_>>(), ["b"]);
        let mut b = r.members("b").to_vec();
        b.sort_unstable();
        assert_eq!(b, [1, 2]);
    }

    #[test]
    fn swap_remove_keeps_the_others() {
        let mut r = Registry::new();
        for m in 0..5 {
            r.join("a", m);
        }
        r.leave("a", 1);
        let mut left = r.members("a").to_vec();
        left.sort_unstable();
        assert_eq!(left, [0, 2, 3, 4]);
    }

    #[test]
    fn capacity_shrinks_after_a_crowd_leaves() {
        let mut r = Registry::new();
        for m in 0..1000u32 {
            r.join("a", m);
        }
        for m in 10..1000u32 {
            r.leave("a", m);
        }
        assert_eq!(r.members("a").len(), 10);
        let cap = r.rooms.get("a").unwrap().capacity();
        assert!(cap < 40, "capacity {cap} not shrunk");
    }
}
