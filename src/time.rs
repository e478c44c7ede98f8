//! Wall-clock time as nginx caches it once per event-loop turn.

/// Milliseconds since the Unix epoch, for event timestamps.
pub fn now_ms() -> u64 {
    let tp = ngx::ffi::ngx_timeofday();
    (tp.sec as u64) * 1000 + tp.msec as u64
}
