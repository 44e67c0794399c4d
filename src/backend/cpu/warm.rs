//! Keeping the pool's other threads awake for the length of one forward pass.
//!
//! A decode step is some 120 small products, each split over the threads. Between products
//! an idle rayon worker soon parks on a futex, and each product then starts with a wake-up
//! system call and its latency (perf on two-thread F16 decode: ~12% of samples in
//! `try_to_wake_up`, `futex_wait` and `sched_yield`). While a pass runs, each other worker
//! instead runs a job that keeps taking pool work with `rayon::yield_now` and spins between
//! finds, as llama.cpp's threads spin at its barriers; the job ends with the pass, so threads
//! still sleep between passes. Unlike a pure spin it yields to the OS every few looks, so an
//! oversubscribed machine degrades gently instead of starving the working threads.

use std::sync::atomic::{AtomicBool, Ordering};

/// Runs `work` on the current pool with its other threads kept awake until `work` returns.
/// Call from inside the pool (`ThreadPool::install`).
pub fn with_threads_awake<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    let threads = rayon::current_num_threads();
    if threads <= 1 {
        return work();
    }
    let done = AtomicBool::new(false);
    let home = rayon::current_thread_index();
    rayon::scope(|scope| {
        for _ in 1..threads {
            scope.spawn(|_| keep_awake(&done, home));
        }
        // Set on every exit, a panic included: the scope waits for the spinners.
        let _finish = Finish(&done);
        work()
    })
}

/// Takes pool work until `done`. A spinner that lands on the pass's own thread (popped there
/// while it waited on a join) returns at once: spinning there would wait on itself.
fn keep_awake(done: &AtomicBool, home: Option<usize>) {
    if rayon::current_thread_index() == home {
        return;
    }
    let mut idle_looks = 0u32;
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            idle_looks = 0;
            continue;
        }
        idle_looks += 1;
        if idle_looks % 8 == 0 {
            // Every few microseconds of idling, offer the core to the OS: with more threads
            // than free cores (a loaded machine, a pipeline running beside engram) a spinner
            // that never yields would take time from the threads doing the work.
            std::thread::yield_now();
        } else {
            // Pause between looks, so the spinner does not hammer the deques' cache lines.
            for _ in 0..16 {
                std::hint::spin_loop();
            }
        }
    }
}

struct Finish<'a>(&'a AtomicBool);

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn work_runs_with_every_thread_and_returns_its_value() {
        for threads in [1usize, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for _ in 0..20 {
                let sum = pool.install(|| with_threads_awake(|| (0..10_000u64).into_par_iter().map(|v| v * v).sum::<u64>()));
                assert_eq!(sum, (0..10_000u64).map(|v| v * v).sum::<u64>(), "threads={threads}");
            }
        }
    }

    #[test]
    fn a_panicking_pass_still_ends_its_spinners() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pool.install(|| with_threads_awake(|| panic!("inside the pass")))));
        assert!(result.is_err(), "the panic reaches the caller");
        // The pool is usable afterwards (a spinner left running would hang this).
        assert_eq!(pool.install(|| with_threads_awake(|| 7)), 7);
    }
}
