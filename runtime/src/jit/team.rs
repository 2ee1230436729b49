//! A persistent team of worker threads, owned by one compiled model.
//!
//! A run hands the team a job — a function of the part index — and takes part 0 itself;
//! workers take parts `1..parts`, and [`Team::run`] returns when every part is done. Between
//! jobs a worker spins for a short while (so the next kernel of the same run starts within
//! a fraction of a microsecond), then sleeps on a condition variable until the next job.
//!
//! This is not a general thread pool: one job at a time (the model keeps the team behind a
//! mutex), parts are statically assigned (part `i` always runs on worker `i`, so per-thread
//! scratch buffers stay warm), and jobs never fail — a kernel cannot, and the caller's own
//! part reports errors from Rust code before any native code runs.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps.
const SPIN: Duration = Duration::from_micros(200);

/// A job: a borrowed `Fn(part)` whose lifetime [`Team::run`] guarantees.
#[derive(Clone, Copy)]
struct Job {
    data: *const (),
    call: unsafe fn(*const (), usize),
}

// SAFETY: a `Job` is only created from a `&F` with `F: Fn(usize) + Sync`, so calling it from
// another thread is sound while the borrow lives, which `Team::run` ensures.
unsafe impl Send for Job {}

struct Shared {
    /// Incremented for every job; workers wait for it to change.
    epoch: AtomicU64,
    /// The current job and its part count (written before `epoch` is bumped).
    job: Mutex<Option<(Job, usize)>>,
    /// Workers that finished the current job.
    done: AtomicUsize,
    /// Workers asleep (or about to sleep) on `wake`.
    sleepers: AtomicUsize,
    wake: Condvar,
    /// Guards the sleep/wake handshake.
    lock: Mutex<()>,
    stop: AtomicBool,
}

/// `threads − 1` workers plus the caller.
pub(super) struct Team {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Team {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Team").field("threads", &self.threads()).finish()
    }
}

impl Team {
    /// A team of `threads` (≥ 1; the caller counts as one). Spawning can fail when the
    /// system is out of threads: the team is then smaller.
    pub fn new(threads: usize) -> Team {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: Mutex::new(None),
            done: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            wake: Condvar::new(),
            lock: Mutex::new(()),
            stop: AtomicBool::new(false),
        });
        let mut workers = Vec::new();
        for index in 1..threads.max(1) {
            let s = Arc::clone(&shared);
            match std::thread::Builder::new().name(format!("cnnc-worker-{index}")).spawn(move || worker(&s, index)) {
                Ok(h) => workers.push(h),
                Err(_) => break,
            }
        }
        Team { shared, workers }
    }

    /// Threads a job can use (workers plus the caller).
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(0) … f(parts − 1)`, part 0 on the calling thread, part `i` on worker `i`;
    /// returns when all are done. `parts` is clamped to [`Team::threads`].
    pub fn run<F: Fn(usize) + Sync>(&self, parts: usize, f: &F) {
        let parts = parts.clamp(1, self.threads());
        if parts == 1 {
            return f(0);
        }
        unsafe fn call<F: Fn(usize)>(data: *const (), part: usize) {
            // SAFETY: `data` is the `&F` given to `run`, alive until `run` returns.
            unsafe { (*data.cast::<F>())(part) }
        }
        let job = Job { data: std::ptr::from_ref(f).cast(), call: call::<F> };
        let s = &*self.shared;
        s.done.store(0, Ordering::Relaxed);
        *s.job.lock().unwrap_or_else(|p| p.into_inner()) = Some((job, parts));
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|p| p.into_inner());
            s.wake.notify_all();
        }
        f(0);
        // Every worker acknowledges every job (those with no part just count), so the next
        // job cannot start while one is still reading this one.
        let want = self.workers.len();
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) < want {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

fn worker(s: &Shared, index: usize) {
    let mut seen = 0u64;
    loop {
        // Wait for a new epoch: spin, then sleep.
        let start = Instant::now();
        let mut n = 0u32;
        loop {
            if s.stop.load(Ordering::Acquire) {
                return;
            }
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            n = n.wrapping_add(1);
            if n.is_multiple_of(256) && start.elapsed() > SPIN {
                let g = s.lock.lock().unwrap_or_else(|p| p.into_inner());
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                // Re-check under the lock: `run` notifies under it after bumping the epoch.
                let g = if s.epoch.load(Ordering::SeqCst) == seen && !s.stop.load(Ordering::SeqCst) {
                    s.wake.wait(g).unwrap_or_else(|p| p.into_inner())
                } else {
                    g
                };
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
                drop(g);
            } else {
                std::hint::spin_loop();
            }
        }
        let job = *s.job.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((job, parts)) = job
            && index < parts
        {
            // SAFETY: `run` keeps the closure alive until every worker has counted itself
            // done below.
            unsafe { (job.call)(job.data, index) };
        }
        s.done.fetch_add(1, Ordering::Release);
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once_per_job() {
        let team = Team::new(3);
        assert_eq!(team.threads(), 3);
        let hits: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
        for round in 0..200 {
            team.run(3, &|p: usize| {
                hits[p].fetch_add(1, Ordering::Relaxed);
            });
            if round == 100 {
                // Let the workers fall asleep once.
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        for h in &hits {
            assert_eq!(h.load(Ordering::Relaxed), 200);
        }
        // Fewer parts than threads: the extra worker runs nothing.
        let n = AtomicUsize::new(0);
        team.run(2, &|p: usize| {
            n.fetch_add(p + 1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 3);
    }
}
