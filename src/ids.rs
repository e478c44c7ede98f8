//! Event ids and randomness for one worker.

use core::ptr;

use wschat_core::envelope::IdGen;

static mut IDS: Option<IdGen> = None;

pub fn random() -> u32 {
    ngx::ffi::ngx_random() as u32
}

/// Seeds the generator; called once per worker before any request.
pub fn init() {
    // SAFETY: ngx_pid is set before workers start and never changes after.
    let pid = u64::from(unsafe { ngx::ffi::ngx_pid } as u32);
    let seed = (u64::from(random()) << 16) ^ pid ^ (crate::time::now_ms() << 20);
    // SAFETY: nginx runs a worker on one thread; nothing else holds IDS.
    unsafe { *ptr::addr_of_mut!(IDS) = Some(IdGen::new(seed)) };
}

/// This worker's name in presence leases, unique across workers and hosts.
pub fn node() -> String {
    // SAFETY: as in `init`; the reference lives only for this call.
    unsafe { (*ptr::addr_of!(IDS)).as_ref() }
        .map(IdGen::node)
        .unwrap_or_default()
}

/// An id for a new event, unique across workers and hosts.
pub fn next_id() -> String {
    // SAFETY: as in `init`; the reference lives only for this call.
    unsafe { (*ptr::addr_of_mut!(IDS)).as_mut() }
        .map(IdGen::next_id)
        .unwrap_or_default()
}
