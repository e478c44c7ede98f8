//! The module's live numbers, shared by every process of the instance.
//!
//! One shared memory zone holds a slot per worker process. A worker writes
//! only its own slot, so the hot path is a plain load and store on memory
//! no other process writes: no lock, no shared cache line. Totals of all
//! slots are what `websocket_chat_status` reports. Counters stay in their
//! slot when the worker exits, so they add up over the instance's life;
//! gauges (connections now…) count only for slots whose process is alive,
//! so a worker that crashed stops counting at once. The zone is reused on
//! reload (same name, size and tag) and made anew on restart.

use core::ffi::c_void;
use core::mem::size_of;
use core::ptr;
use core::sync::atomic::{AtomicI64, AtomicPtr, AtomicU32, AtomicU64, Ordering::Relaxed};

use ngx::ffi::{
    ngx_conf_t, ngx_int_t, ngx_pagesize, ngx_shared_memory_add, ngx_shm_zone_t, ngx_slab_alloc,
    ngx_slab_pool_t, ngx_str_t, NGX_ERROR, NGX_OK,
};

use crate::module;

/// Worker processes an instance may have alive at once, across reloads
/// whose old workers are still closing; a process beyond that is not
/// counted (and says so in the error log).
const SLOTS: usize = 128;

/// What only grows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    SessionsOpened,
    MessagesReceived,
    MessagesSent,
    BytesReceived,
    BytesSent,
    HistoryFetches,
    RedisReconnects,
    /// Joins whose history came from the worker's copy (`recent`).
    HistoryCached,
    Close(CloseKind),
    Refusal(Refusal),
    Publish(PublishStatus),
}

/// What goes up and down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gauge {
    Connections,
    Rooms,
    RedisUp,
    RedisDown,
    BacklogBytes,
}

const GAUGES: usize = 5;

/// How a session ended, as counted in `closes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseKind {
    Normal,
    GoingAway,
    IdleTimeout,
    Shutdown,
    Protocol,
    Unsupported,
    NoStatus,
    Abnormal,
    InvalidData,
    SlowConsumer,
    RateLimit,
    RoomRefused,
    TooBig,
    Other,
}

impl CloseKind {
    pub const ALL: [CloseKind; 14] = [
        CloseKind::Normal,
        CloseKind::GoingAway,
        CloseKind::IdleTimeout,
        CloseKind::Shutdown,
        CloseKind::Protocol,
        CloseKind::Unsupported,
        CloseKind::NoStatus,
        CloseKind::Abnormal,
        CloseKind::InvalidData,
        CloseKind::SlowConsumer,
        CloseKind::RateLimit,
        CloseKind::RoomRefused,
        CloseKind::TooBig,
        CloseKind::Other,
    ];

    /// The close code it is counted under; 0 for codes of the client's own.
    pub fn code(self) -> u16 {
        match self {
            CloseKind::Normal => 1000,
            CloseKind::GoingAway | CloseKind::IdleTimeout | CloseKind::Shutdown => 1001,
            CloseKind::Protocol => 1002,
            CloseKind::Unsupported => 1003,
            CloseKind::NoStatus => 1005,
            CloseKind::Abnormal => 1006,
            CloseKind::InvalidData => 1007,
            CloseKind::SlowConsumer | CloseKind::RateLimit | CloseKind::RoomRefused => 1008,
            CloseKind::TooBig => 1009,
            CloseKind::Other => 0,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            CloseKind::Normal => "normal",
            CloseKind::GoingAway => "going_away",
            CloseKind::IdleTimeout => "idle_timeout",
            CloseKind::Shutdown => "shutdown",
            CloseKind::Protocol => "protocol_error",
            CloseKind::Unsupported => "unsupported_data",
            CloseKind::NoStatus => "no_status",
            CloseKind::Abnormal => "abnormal",
            CloseKind::InvalidData => "invalid_data",
            CloseKind::SlowConsumer => "slow_consumer",
            CloseKind::RateLimit => "rate_limit",
            CloseKind::RoomRefused => "room_refused",
            CloseKind::TooBig => "too_big",
            CloseKind::Other => "other",
        }
    }

    /// A code the client sent in its close frame.
    pub fn of_client(code: u16) -> CloseKind {
        match code {
            1000 => CloseKind::Normal,
            1001 => CloseKind::GoingAway,
            1002 => CloseKind::Protocol,
            1003 => CloseKind::Unsupported,
            1005 => CloseKind::NoStatus,
            1007 => CloseKind::InvalidData,
            1009 => CloseKind::TooBig,
            _ => CloseKind::Other,
        }
    }
}

/// Handshake answers other than 101, by status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    BadRequest,
    Forbidden,
    NotAllowed,
    UpgradeRequired,
    ServerError,
    Unavailable,
}

impl Refusal {
    pub const ALL: [Refusal; 6] = [
        Refusal::BadRequest,
        Refusal::Forbidden,
        Refusal::NotAllowed,
        Refusal::UpgradeRequired,
        Refusal::ServerError,
        Refusal::Unavailable,
    ];

    pub fn status(self) -> u16 {
        match self {
            Refusal::BadRequest => 400,
            Refusal::Forbidden => 403,
            Refusal::NotAllowed => 405,
            Refusal::UpgradeRequired => 426,
            Refusal::ServerError => 500,
            Refusal::Unavailable => 503,
        }
    }

    pub fn of_status(status: u16) -> Refusal {
        match status {
            400 => Refusal::BadRequest,
            403 => Refusal::Forbidden,
            405 => Refusal::NotAllowed,
            426 => Refusal::UpgradeRequired,
            503 => Refusal::Unavailable,
            _ => Refusal::ServerError,
        }
    }
}

/// Answers of `websocket_chat_publish`, by status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublishStatus {
    Created,
    BadRequest,
    NotAllowed,
    TooLarge,
    BadGateway,
    Unavailable,
}

impl PublishStatus {
    pub const ALL: [PublishStatus; 6] = [
        PublishStatus::Created,
        PublishStatus::BadRequest,
        PublishStatus::NotAllowed,
        PublishStatus::TooLarge,
        PublishStatus::BadGateway,
        PublishStatus::Unavailable,
    ];

    pub fn status(self) -> u16 {
        match self {
            PublishStatus::Created => 201,
            PublishStatus::BadRequest => 400,
            PublishStatus::NotAllowed => 405,
            PublishStatus::TooLarge => 413,
            PublishStatus::BadGateway => 502,
            PublishStatus::Unavailable => 503,
        }
    }
}

const SIMPLE_COUNTERS: usize = 8;
const COUNTERS: usize =
    SIMPLE_COUNTERS + CloseKind::ALL.len() + Refusal::ALL.len() + PublishStatus::ALL.len();

impl Counter {
    fn index(self) -> usize {
        let closes = SIMPLE_COUNTERS;
        let refusals = closes + CloseKind::ALL.len();
        let publishes = refusals + Refusal::ALL.len();
        match self {
            Counter::SessionsOpened => 0,
            Counter::MessagesReceived => 1,
            Counter::MessagesSent => 2,
            Counter::BytesReceived => 3,
            Counter::BytesSent => 4,
            Counter::HistoryFetches => 5,
            Counter::RedisReconnects => 6,
            Counter::HistoryCached => 7,
            Counter::Close(k) => closes + k as usize,
            Counter::Refusal(r) => refusals + r as usize,
            Counter::Publish(p) => publishes + p as usize,
        }
    }
}

/// One process's numbers. Aligned so that no two processes write the same
/// cache line.
#[repr(C, align(64))]
struct Slot {
    /// The process using the slot; 0 when free.
    pid: AtomicU32,
    gauges: [AtomicI64; GAUGES],
    counters: [AtomicU64; COUNTERS],
}

#[repr(C)]
struct Zone {
    slots: [Slot; SLOTS],
}

/// The zone as this process maps it (set in the master at configuration,
/// inherited by the workers).
static ZONE: AtomicPtr<Zone> = AtomicPtr::new(ptr::null_mut());
/// This process's slot, once it has claimed one.
static SLOT: AtomicPtr<Slot> = AtomicPtr::new(ptr::null_mut());

fn slot() -> Option<&'static Slot> {
    // SAFETY: a claimed slot lies in the zone, which stays mapped for the
    // life of the process.
    unsafe { SLOT.load(Relaxed).as_ref() }
}

/// Adds to one of this process's counters (nothing before a slot is
/// claimed, as in the master).
pub fn count(counter: Counter, n: u64) {
    if let Some(s) = slot() {
        // Only this process writes its slot: no read-modify-write needed.
        let c = &s.counters[counter.index()];
        c.store(c.load(Relaxed).wrapping_add(n), Relaxed);
    }
}

pub fn adjust(gauge: Gauge, delta: i64) {
    if let Some(s) = slot() {
        let g = &s.gauges[gauge as usize];
        g.store(g.load(Relaxed) + delta, Relaxed);
    }
}

/// Declares the zone while the configuration is read (once, however many
/// directives ask for it).
pub fn declare(cf: *mut ngx_conf_t) -> Result<(), ()> {
    let mut name = ngx_str_t {
        len: ZONE_NAME.len(),
        data: ZONE_NAME.as_ptr().cast_mut(),
    };
    // SAFETY: the page size is set before any configuration is read.
    let pages = 8 * unsafe { ngx_pagesize };
    let size = size_of::<Zone>() + pages;
    // SAFETY: cf is the configuration being read; the tag is this module,
    // which outlives the cycle.
    let zone = unsafe {
        ngx_shared_memory_add(
            cf,
            &mut name,
            size,
            ptr::from_ref(module()).cast_mut().cast(),
        )
    };
    if zone.is_null() {
        return Err(());
    }
    // SAFETY: nginx made the zone entry for us and has not mapped it yet.
    unsafe { (*zone).init = Some(init_zone) };
    Ok(())
}

const ZONE_NAME: &[u8] = b"websocket_chat";

/// nginx maps the zone; `data` is the previous cycle's numbers on reload.
extern "C" fn init_zone(shm_zone: *mut ngx_shm_zone_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: nginx calls this in the master with the zone mapped; its start
    // is the slab pool nginx initialised.
    unsafe {
        let zone = if data.is_null() {
            let pool = (*shm_zone).shm.addr.cast::<ngx_slab_pool_t>();
            // The slab allocator zero-fills nothing: clear it ourselves.
            let z = ngx_slab_alloc(pool, size_of::<Zone>()).cast::<Zone>();
            if z.is_null() {
                return NGX_ERROR as ngx_int_t;
            }
            ptr::write_bytes(z.cast::<u8>(), 0, size_of::<Zone>());
            z
        } else {
            data.cast::<Zone>()
        };
        (*shm_zone).data = zone.cast();
        ZONE.store(zone, Relaxed);
    }
    NGX_OK as ngx_int_t
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { ngx::ffi::kill(pid as _, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(ngx::ffi::EPERM as i32)
}

fn zone() -> Option<&'static Zone> {
    // SAFETY: the zone stays mapped for the life of the process.
    unsafe { ZONE.load(Relaxed).as_ref() }
}

/// Claims a slot for this worker: a free one, or one whose process is gone
/// (its counters stay; its gauges start from zero). False if none is left.
pub fn claim(pid: u32) -> bool {
    let Some(zone) = zone() else {
        return true;
    };
    for s in &zone.slots {
        let held = s.pid.load(Relaxed);
        if (held == 0 || !alive(held))
            && s.pid.compare_exchange(held, pid, Relaxed, Relaxed).is_ok()
        {
            for g in &s.gauges {
                g.store(0, Relaxed);
            }
            SLOT.store(ptr::from_ref(s).cast_mut(), Relaxed);
            return true;
        }
    }
    false
}

/// Gives the slot back as the worker exits: its gauges are zero, its
/// counters stay in the totals.
pub fn release() {
    if let Some(s) = slot() {
        for g in &s.gauges {
            g.store(0, Relaxed);
        }
        s.pid.store(0, Relaxed);
        SLOT.store(ptr::null_mut(), Relaxed);
    }
}

/// The instance's numbers, summed over the slots.
pub struct Totals {
    pub workers: u64,
    gauges: [i64; GAUGES],
    counters: [u64; COUNTERS],
}

impl Totals {
    pub fn gauge(&self, g: Gauge) -> u64 {
        self.gauges[g as usize].max(0) as u64
    }

    pub fn counter(&self, c: Counter) -> u64 {
        self.counters[c.index()]
    }
}

pub fn totals() -> Totals {
    let mut t = Totals {
        workers: 0,
        gauges: [0; GAUGES],
        counters: [0; COUNTERS],
    };
    let Some(zone) = zone() else {
        return t;
    };
    for s in &zone.slots {
        for (sum, c) in t.counters.iter_mut().zip(&s.counters) {
            *sum = sum.wrapping_add(c.load(Relaxed));
        }
        let pid = s.pid.load(Relaxed);
        if pid != 0 && alive(pid) {
            t.workers += 1;
            for (sum, g) in t.gauges.iter_mut().zip(&s.gauges) {
                *sum += g.load(Relaxed);
            }
        }
    }
    t
}
