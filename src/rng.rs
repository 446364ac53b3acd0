//! Seeded draws from libtorch's global CPU generator.
//!
//! tch has no per-call `torch.Generator`, so a draw "with seed s" is `manual_seed(s)` followed
//! by the draw on the global generator. [`seeded`] holds a process-wide lock across both, so
//! that another thread's draws (a second job in a library user's process, or parallel tests)
//! cannot interleave and change the numbers. Building a network draws too (tch initialises
//! every variable at random before the weights are loaded over it), so the networks'
//! constructors hold the same lock ([`exclusive`]): a model loaded on one thread no longer
//! shifts another thread's seeded draw. The lock is re-entrant on its thread (a network built
//! inside [`seeded`], as `init-random` does, keeps the seeded stream).

use std::cell::Cell;
use std::sync::{Mutex, MutexGuard};

static GLOBAL_GENERATOR: Mutex<()> = Mutex::new(());

thread_local! {
    static HELD: Cell<bool> = const { Cell::new(false) };
}

/// The lock, unless this thread already holds it.
struct Held(Option<MutexGuard<'static, ()>>);

impl Held {
    fn take() -> Self {
        if HELD.with(Cell::get) {
            return Self(None);
        }
        let g = GLOBAL_GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
        HELD.with(|h| h.set(true));
        Self(Some(g))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.0.is_some() {
            HELD.with(|h| h.set(false));
        }
    }
}

/// Runs `draw` with the global CPU generator seeded to `seed`, exclusively.
pub fn seeded<T>(seed: i64, draw: impl FnOnce() -> T) -> T {
    let _held = Held::take();
    tch::manual_seed(seed);
    draw()
}

/// Runs `f` (which draws from the global generator without caring about the numbers, e.g. a
/// network's random initialisation) while no other thread draws.
pub fn exclusive<T>(f: impl FnOnce() -> T) -> T {
    let _held = Held::take();
    f()
}
