//! Seeded draws from libtorch's global CPU generator.
//!
//! tch has no per-call `torch.Generator`, so a draw "with seed s" is `manual_seed(s)` followed
//! by the draw on the global generator. [`seeded`] holds a process-wide lock across both, so
//! that another thread's draws (a second job in a library user's process, or parallel tests)
//! cannot interleave and change the numbers.

use std::sync::Mutex;

static GLOBAL_GENERATOR: Mutex<()> = Mutex::new(());

/// Runs `draw` with the global CPU generator seeded to `seed`, exclusively. `draw` must not
/// call `seeded` itself.
pub fn seeded<T>(seed: i64, draw: impl FnOnce() -> T) -> T {
    let _guard = GLOBAL_GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed);
    draw()
}
