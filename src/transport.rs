//! A worker's way to one configured Redis: a single link, or for a Redis
//! Cluster one link per primary behind a router. The router sends each
//! channel and each command to the link of the primary that owns its slot,
//! as the last slot map said; follows `MOVED` and `ASK`; follows a channel
//! to its new node when the old one stops serving it; and, while a link is
//! down, reads the map again every tick, so that when a replica takes over
//! the link is pointed at it and picks up where it was (channels, backlog).
//! Rooms see one transport either way: events, and which link ("shard") a
//! channel is on, so that an outage is told only to the rooms it stops.

use std::collections::HashMap;

use ngx::ffi::{ngx_log_t, ngx_msec_t, NGX_LOG_ERR, NGX_LOG_NOTICE};
use ngx::ngx_log_error;
use redis::Value;
use wschat_core::history::Request;
use wschat_core::slots::{self, Node, SlotMap, SLOTS};

use crate::conf::{Endpoint, MainConf};
use crate::peer;
use crate::redis_link::{
    BacklogFull, Call, ClusterEvent, Event, Handlers, Link, Resend, Role, Script, Tag, Wake,
    MAX_HOPS,
};

/// A slot no map has named an owner for (yet): its names go to the first
/// link, whose node redirects them.
const UNMAPPED: u16 = u16::MAX;

/// The slot map is read again at most this often, whatever asks for it.
const REFRESH_MIN_MS: ngx_msec_t = 1_000;

/// Links per transport: a shard number must fit the token beside the
/// endpoint index.
const MAX_LINKS: usize = 1 << 12;

fn now() -> ngx_msec_t {
    // SAFETY: nginx's cached clock, read on its own thread.
    unsafe { ngx::ffi::ngx_current_msec }
}

/// What `c->data` carries for a link: its endpoint and its shard.
pub fn token(endpoint: usize, shard: usize) -> usize {
    (shard << 16) | (endpoint + 1)
}

/// The endpoint index and shard a token names.
pub fn untoken(token: usize) -> (usize, usize) {
    ((token & 0xffff).wrapping_sub(1), token >> 16)
}

pub struct Transport {
    endpoint: &'static Endpoint,
    main: &'static MainConf,
    index: usize,
    log: *const ngx_log_t,
    handlers: &'static Handlers,
    // Boxed: nginx holds pointers into each link (its timers, its
    // connections' events), which a growing Vec must not move.
    #[allow(clippy::vec_box)]
    links: Vec<Box<Link>>,
    cluster: Option<Router>,
    /// Events for the rooms layer, gathered from every link.
    events: Vec<Event>,
}

/// What the router knows of a cluster.
struct Router {
    /// Slot → link.
    owner: Vec<u16>,
    have_map: bool,
    /// The link `CLUSTER SLOTS` was asked on, until it answers.
    asking: Option<usize>,
    /// A fresh map is wanted.
    due: bool,
    last_ask: Option<ngx_msec_t>,
    /// Subscription redirections followed per channel since the last map.
    hops: HashMap<Box<str>, u8>,
    /// Channels whose redirections looped: followed again after the next
    /// map.
    parked: Vec<Box<str>>,
}

impl Router {
    fn new() -> Self {
        Router {
            owner: vec![UNMAPPED; SLOTS],
            have_map: false,
            asking: None,
            // Each command connection to a node asks for the map first.
            due: false,
            last_ask: None,
            hops: HashMap::new(),
            parked: Vec::new(),
        }
    }
}

impl Transport {
    pub fn new(
        endpoint: &'static Endpoint,
        main: &'static MainConf,
        index: usize,
        log: *const ngx_log_t,
        handlers: &'static Handlers,
    ) -> Self {
        let mut first = Link::new(endpoint, main, log, token(index, 0), handlers, (0, None));
        if let Some(seeds) = &endpoint.seeds {
            first.rotate_seeds(seeds);
        }
        Transport {
            endpoint,
            main,
            index,
            log,
            handlers,
            links: vec![first],
            cluster: endpoint.is_cluster().then(Router::new),
            events: Vec::new(),
        }
    }

    pub fn log(&self) -> *mut ngx_log_t {
        self.links[0].log()
    }

    /// The link (shard) a channel or key is on.
    pub fn shard_of(&self, name: &str) -> usize {
        match &self.cluster {
            None => 0,
            Some(router) => match router.owner[usize::from(slots::slot_of(name.as_bytes()))] {
                UNMAPPED => 0,
                link => usize::from(link),
            },
        }
    }

    /// Where the name's link is, as logs show it.
    pub fn display(&self, name: &str) -> &str {
        self.links[self.shard_of(name)].display()
    }

    /// Whether delivery on the name's link is interrupted.
    pub fn in_outage(&self, name: &str) -> bool {
        self.links[self.shard_of(name)].in_outage()
    }

    /// The prefix of the presence lease keys a room's members are held
    /// under: one set of leases per prefix, and on a cluster per slot, so
    /// that the scripts touch one slot only.
    pub fn lease_scope(&self, prefix: &str, channel: &str) -> String {
        match self.cluster {
            None => prefix.to_owned(),
            Some(_) => {
                let tag = slots::tag_for_slot(slots::slot_of(channel.as_bytes()));
                format!("{prefix}{{{tag}}}")
            }
        }
    }

    fn route(&mut self, name: &str) -> &mut Link {
        self.touch();
        let shard = self.shard_of(name);
        &mut self.links[shard]
    }

    /// A cluster's map is asked for on first use.
    fn touch(&mut self) {
        if self.cluster.as_ref().is_some_and(|r| r.due) {
            self.refresh();
        }
    }

    pub fn subscribe(&mut self, channel: &str) -> bool {
        self.route(channel).subscribe(channel)
    }

    pub fn unsubscribe(&mut self, channel: &str) {
        if let Some(router) = &mut self.cluster {
            router.parked.retain(|c| &**c != channel);
        }
        // A channel followed where an ASK sent it is not on its slot's link.
        for link in &mut self.links {
            link.unsubscribe(channel);
        }
    }

    pub fn publish(
        &mut self,
        channel: &str,
        event: &str,
        tag: Tag,
        call: Option<Call>,
    ) -> Result<(), BacklogFull> {
        self.route(channel).publish(channel, event, tag, call)
    }

    pub fn eval(
        &mut self,
        script: Script,
        keys: &[&str],
        args: &[&[u8]],
        tag: Tag,
        call: Option<Call>,
    ) -> Result<(), BacklogFull> {
        let first = keys.first().copied().unwrap_or("");
        self.route(first).eval(script, keys, args, tag, call)
    }

    pub fn append(
        &mut self,
        channel: &str,
        head: &str,
        keep: (usize, u64),
        tag: Tag,
        call: Option<Call>,
    ) -> Result<(), BacklogFull> {
        self.route(channel).append(channel, head, keep, tag, call)
    }

    pub fn fetch(&mut self, channel: &str, req: &Request, tag: Tag) -> Result<(), BacklogFull> {
        self.route(channel).fetch(channel, req, tag)
    }

    pub fn hold_worker(&mut self, hold: bool) {
        for link in &mut self.links {
            link.hold_worker(hold);
        }
    }

    pub fn on_wake(&mut self, shard: usize, role: Role, wake: Wake) {
        if let Some(link) = self.links.get_mut(shard) {
            link.on_wake(role, wake);
        }
    }

    /// Takes what happened on every link since the last call, after the
    /// router has taken what is its own; `spare` keeps the allocation.
    pub fn take_events(&mut self, spare: Vec<Event>) -> Vec<Event> {
        let mut buf = Vec::new();
        let mut shard = 0;
        while shard < self.links.len() {
            buf = self.links[shard].take_events(buf);
            for event in buf.drain(..) {
                match event {
                    Event::Cluster(event) => self.on_cluster(shard, event),
                    Event::Tick => {
                        // Every link keeps time (its backlog gauge); the
                        // rooms take the first one's.
                        if shard == 0 {
                            self.on_tick();
                            self.events.push(Event::Tick);
                        }
                    }
                    Event::Outage(n) => {
                        if let Some(router) = &mut self.cluster {
                            router.due = true;
                        }
                        self.events.push(Event::Outage(n));
                    }
                    other => self.events.push(other),
                }
            }
            shard += 1;
        }
        std::mem::replace(&mut self.events, spare)
    }

    fn on_tick(&mut self) {
        let Some(router) = &mut self.cluster else {
            return;
        };
        // A link that is down may be waiting for a replica to take over.
        if self.links.iter().any(|l| l.started() && l.in_outage()) {
            router.due = true;
        }
        if router.due {
            self.refresh();
        }
    }

    /// Asks for the slot map, on a link that is up if there is one.
    fn refresh(&mut self) {
        let Some(router) = &mut self.cluster else {
            return;
        };
        router.due = true;
        let recent = (router.last_ask).is_some_and(|t| now().wrapping_sub(t) < REFRESH_MIN_MS);
        if router.asking.is_some() || recent {
            return;
        }
        let up = (self.links.iter())
            .position(|l| l.started() && !l.in_outage())
            .unwrap_or(0);
        if self.links[up].ask_slots().is_ok() {
            router.asking = Some(up);
            router.last_ask = Some(now());
            router.due = false;
        }
    }

    fn on_cluster(&mut self, shard: usize, event: ClusterEvent) {
        match event {
            ClusterEvent::SubscribeRedirected { channel, to } => {
                self.follow_redirect(shard, channel, to)
            }
            ClusterEvent::CommandRedirected(resend) => self.resend(shard, resend),
            ClusterEvent::Unfollowed(channel) => {
                ngx_log_error!(
                    NGX_LOG_NOTICE,
                    self.log(),
                    "websocket_chat: Redis {} no longer serves channel {}; following it where its slot went",
                    self.links[shard].display(),
                    channel
                );
                self.refresh();
                if self.route(&channel).subscribe(&channel) {
                    self.events.push(Event::Subscribed(channel));
                }
            }
            ClusterEvent::Slots(reply) => self.on_slots(shard, reply),
        }
    }

    /// The link for a node, made if there is none.
    fn link_for(&mut self, node: &Node) -> Option<usize> {
        let name = node.to_string();
        if let Some(i) = self.links.iter().position(|l| l.address() == name) {
            return Some(i);
        }
        let Ok(ip) = node.host.parse::<std::net::IpAddr>() else {
            ngx_log_error!(
                NGX_LOG_ERR,
                self.log(),
                "websocket_chat: Redis cluster node {} is not named by an address",
                name
            );
            return None;
        };
        if self.links.len() >= MAX_LINKS {
            return None;
        }
        let shard = self.links.len();
        let sockaddr = peer::sockaddr_of(std::net::SocketAddr::new(ip, node.port));
        let token = token(self.index, shard);
        let link = Link::new(
            self.endpoint,
            self.main,
            self.log,
            token,
            self.handlers,
            (shard, Some(sockaddr)),
        );
        self.links.push(link);
        Some(shard)
    }

    fn follow_redirect(&mut self, shard: usize, channel: Box<str>, to: Option<slots::Redirect>) {
        let log = self.log();
        let Some(router) = &mut self.cluster else {
            return;
        };
        let Some(to) = to else {
            return self.park(channel);
        };
        let hops = router.hops.entry(channel.clone()).or_insert(0);
        *hops += 1;
        if *hops > MAX_HOPS {
            ngx_log_error!(
                NGX_LOG_ERR,
                log,
                "websocket_chat: Redis {} sent channel {} to {} again: a redirection loop; trying once the slot map is read again",
                self.links[shard].display(),
                channel,
                to.to
            );
            return self.park(channel);
        }
        let Some(target) = self.link_for(&to.to) else {
            return self.park(channel);
        };
        if !to.ask {
            self.set_owner(to.slot, target);
            self.refresh();
        }
        if self.links[target].subscribe(&channel) {
            self.events.push(Event::Subscribed(channel));
        }
    }

    /// A channel with nowhere to go for now: its members are told, and it
    /// is followed again once the slot map has been read anew.
    fn park(&mut self, channel: Box<str>) {
        if let Some(router) = &mut self.cluster {
            router.parked.push(channel.clone());
        }
        self.events.push(Event::Stalled(channel));
        self.refresh();
    }

    fn set_owner(&mut self, slot: u16, link: usize) {
        if let Some(router) = &mut self.cluster {
            router.owner[usize::from(slot)] = link as u16;
        }
    }

    fn resend(&mut self, shard: usize, resend: Resend) {
        let from = self.links[shard].display().to_owned();
        let to = resend.redirect.to.clone();
        if resend.hops() > MAX_HOPS {
            ngx_log_error!(
                NGX_LOG_ERR,
                self.log(),
                "websocket_chat: Redis {} sent a command to {} again: a redirection loop; the command is given up",
                from,
                to
            );
            self.refresh();
            return self.links[shard].give_up(resend, "redirection loop in the Redis cluster");
        }
        let Some(target) = self.link_for(&to) else {
            return (self.links[shard]).give_up(resend, "redirected to a node with no address");
        };
        if !resend.redirect.ask {
            self.set_owner(resend.redirect.slot, target);
            self.refresh();
        }
        if let Err(resend) = self.links[target].resend(resend) {
            (self.links[target]).give_up(resend, "the queue to the Redis node is full");
        }
    }

    fn on_slots(&mut self, shard: usize, reply: Option<Value>) {
        let Some(router) = &mut self.cluster else {
            return;
        };
        router.asking = None;
        let Some(reply) = reply else {
            router.due = true;
            return;
        };
        match slots::parse_cluster_slots(&reply, &self.links[shard].node()) {
            Ok(map) => self.apply_map(&map),
            Err(err) => {
                let said = match &reply {
                    Value::ServerError(e) => crate::redis_link::error_text(e),
                    _ => err.to_string(),
                };
                ngx_log_error!(
                    NGX_LOG_ERR,
                    self.log(),
                    "websocket_chat: Redis {} gave no usable cluster slot map (is it a cluster node?): {}",
                    self.links[shard].display(),
                    said
                );
                if let Some(router) = &mut self.cluster {
                    router.due = true;
                }
            }
        }
    }

    fn apply_map(&mut self, map: &SlotMap) {
        let Some(router) = &self.cluster else {
            return;
        };
        let old = router.owner.clone();
        let primaries: Vec<String> = map.ranges.iter().map(|(_, _, n)| n.to_string()).collect();
        let mut owner = vec![UNMAPPED; SLOTS];
        for (first, last, node) in &map.ranges {
            let name = node.to_string();
            let existing = self.links.iter().position(|l| l.address() == name);
            let previous = usize::from(old[usize::from(*first)]);
            let replaced = (existing.is_none() && previous != usize::from(UNMAPPED))
                .then_some(previous)
                .filter(|&p| {
                    self.links[p].in_outage() && !primaries.contains(&self.links[p].address())
                });
            let link = match (existing, replaced, node.host.parse::<std::net::IpAddr>()) {
                (Some(i), ..) => i,
                (None, Some(p), Ok(ip)) => {
                    ngx_log_error!(
                        NGX_LOG_NOTICE,
                        self.log(),
                        "websocket_chat: Redis cluster slots {}-{} moved from {} to {}",
                        first,
                        last,
                        self.links[p].display(),
                        name
                    );
                    let to = std::net::SocketAddr::new(ip, node.port);
                    self.links[p].retarget(peer::sockaddr_of(to));
                    p
                }
                _ => match self.link_for(node) {
                    Some(i) => i,
                    None => continue,
                },
            };
            owner[usize::from(*first)..=usize::from(*last)].fill(link as u16);
        }
        if let Some(router) = &mut self.cluster {
            router.owner = owner;
            router.have_map = true;
            router.hops.clear();
        }
        self.links[0].stop_rotating();
        self.move_channels();
    }

    /// Channels whose slot is now another link's follow it there.
    fn move_channels(&mut self) {
        let mut moving = Vec::new();
        for (i, link) in self.links.iter().enumerate() {
            for channel in link.wanted() {
                if self.shard_of(&channel) != i {
                    moving.push((i, channel));
                }
            }
        }
        let parked =
            (self.cluster.as_mut()).map_or_else(Vec::new, |r| std::mem::take(&mut r.parked));
        for (from, channel) in &moving {
            ngx_log_error!(
                NGX_LOG_NOTICE,
                self.log(),
                "websocket_chat: channel {} moves from Redis {} to {}",
                channel,
                self.links[*from].display(),
                self.display(channel)
            );
            self.links[*from].unsubscribe(channel);
        }
        let channels = moving.into_iter().map(|(_, c)| c).chain(parked);
        for channel in channels {
            let shard = self.shard_of(&channel);
            if self.links[shard].subscribe(&channel) {
                self.events.push(Event::Subscribed(channel));
            }
        }
    }
}
