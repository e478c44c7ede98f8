//! Everything the `websocket_chat` nginx module decides without touching
//! nginx: plain Rust, unit-tested with `cargo test`.

pub mod backoff;
pub mod deflate;
pub mod envelope;
pub mod frame;
pub mod frame_guard;
pub mod handshake;
pub mod history;
pub mod names;
pub mod presence;
pub mod rate;
pub mod recent;
pub mod redis_addr;
pub mod resp;
pub mod room;
pub mod send_queue;
pub mod slab;
pub mod slots;

/// Every Lua script the module loads into Redis.
pub const SCRIPTS: [&str; 6] = [
    history::APPEND_SCRIPT,
    history::FETCH_SCRIPT,
    presence::JOIN_SCRIPT,
    presence::LEAVE_SCRIPT,
    presence::RENEW_SCRIPT,
    presence::SUMMARY_SCRIPT,
];
