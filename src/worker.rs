//! Per-worker state: the Redis links (one per configured endpoint, opened on
//! first use) and the event-id generator. nginx workers are single-threaded;
//! this state is created in `init_process` and torn down in `exit_process`.

use core::ptr::{self, NonNull};

use crate::conf::MainConf;
use crate::redis_link::Link;
use wschat_core::envelope::IdGen;

struct Worker {
    links: Vec<Option<Box<Link>>>,
    ids: IdGen,
}

static mut WORKER: Option<Worker> = None;

fn with<T>(f: impl FnOnce(&mut Worker) -> T) -> Option<T> {
    // SAFETY: nginx runs a worker's handlers one at a time on one thread, and
    // no caller keeps the reference beyond `f`.
    unsafe { (*ptr::addr_of_mut!(WORKER)).as_mut().map(f) }
}

pub fn random() -> u32 {
    ngx::ffi::ngx_random() as u32
}

pub fn init() {
    // SAFETY: ngx_pid is set before workers start and never changes after.
    let pid = u64::from(unsafe { ngx::ffi::ngx_pid } as u32);
    let seed = (u64::from(random()) << 16) ^ pid ^ (crate::time::now_ms() << 20);
    // SAFETY: called once per worker before any request is served.
    unsafe {
        *ptr::addr_of_mut!(WORKER) = Some(Worker {
            links: Vec::new(),
            ids: IdGen::new(seed),
        })
    };
}

/// Closes every Redis connection, so the worker exits with no socket open.
pub fn shutdown() {
    // SAFETY: as in `init`; sessions are gone by the time nginx calls this.
    unsafe { *ptr::addr_of_mut!(WORKER) = None };
}

/// The link to endpoint `index`, opened on first use.
pub fn link(main: &'static MainConf, index: usize) -> Option<NonNull<Link>> {
    let endpoint = main.endpoints.get(index)?;
    with(|w| {
        if w.links.len() <= index {
            w.links
                .resize_with(main.endpoints.len().max(index + 1), || None);
        }
        let link = w.links[index].get_or_insert_with(|| {
            // SAFETY: ngx_cycle is the worker's cycle; its log lives as long.
            let log = unsafe { (*ngx::ffi::ngx_cycle).log };
            Link::new(endpoint, main, log)
        });
        NonNull::from(&mut **link)
    })
}

/// An id for a new event, unique across workers and hosts.
pub fn next_id() -> String {
    with(|w| w.ids.next_id()).unwrap_or_default()
}
