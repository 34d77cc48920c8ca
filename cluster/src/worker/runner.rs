//! What a worker runs tasks with: the [`Runner`] trait, implemented by the
//! Python extension (live Python objects) and by the simulator (plain
//! bytes), and the helper thread that does a runner's store work in order.

use std::sync::Arc;

use bytes::Bytes;

use super::state::{ExecOutcome, Recipe};
use crate::protocol::Key;

/// Owns a worker's data and runs its tasks. Methods are called from
/// blocking threads, never from the async runtime's threads.
pub trait Runner: Send + Sync + 'static {
    /// Run a task whose dependencies `deps` are in the store; on success the
    /// result is stored under `key`.
    fn execute(&self, key: &str, recipe: &Recipe, deps: &[Key], thread: u32) -> ExecOutcome;
    /// Serialize stored values into frames; `None` for keys not held.
    fn serialize(&self, keys: &[Key]) -> Vec<(Key, Option<Vec<Bytes>>)>;
    /// Deserialize frames and store the value; returns its size in bytes.
    fn store(&self, key: &str, frames: Vec<Bytes>) -> Result<u64, String>;
    /// Drop values.
    fn free(&self, keys: &[Key]);
    /// A mark of the store's state now: [`free_older`](Self::free_older)
    /// with it spares values stored after this call.
    fn mark(&self) -> u64 {
        0
    }
    /// Drop values stored before `mark` (a free is carried out after other
    /// threads may have stored the same key again: those stay).
    fn free_older(&self, keys: &[Key], _mark: u64) {
        self.free(keys)
    }
    /// Write stored values to disk and drop them from memory; they stay
    /// readable (by `execute` and `serialize`) until freed. Returns for each
    /// key whether it was spilled. The default cannot spill.
    fn spill(&self, keys: &[Key]) -> Vec<(Key, bool)> {
        keys.iter().map(|k| (k.clone(), false)).collect()
    }
    /// Run a serialized function call in the worker process (`Client.run`):
    /// `Ok` with the serialized result, or `Err` with the serialized exception.
    fn run_function(&self, _call: Bytes) -> Result<Bytes, Bytes> {
        Err(Bytes::from_static(b"this worker cannot run functions"))
    }
    /// Run `body`, the whole life of one of the worker's threads that call
    /// the methods above, so per-thread context (a Python thread state) is
    /// set up once per thread rather than once per call.
    fn thread_main(&self, body: &mut (dyn FnMut() + Send)) {
        body()
    }
}

/// One thread that runs the runner's data-store work (free, serialize,
/// store) in order, off the async runtime.
#[derive(Clone)]
pub(super) struct Helper {
    tx: std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>,
}

impl Helper {
    pub(super) fn spawn<R: Runner>(runner: Arc<R>) -> std::io::Result<Helper> {
        let (tx, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        std::thread::Builder::new().name("dask-rs-store".into()).spawn(move || {
            let mut body = move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            };
            runner.thread_main(&mut body)
        })?;
        Ok(Helper { tx })
    }

    /// Queue `f` and do not wait for it.
    pub(super) fn submit(&self, f: impl FnOnce() + Send + 'static) {
        let _ = self.tx.send(Box::new(f));
    }

    /// Run `f` on the helper thread and wait for its result (None if the
    /// helper is gone).
    pub(super) async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(move || {
            let _ = tx.send(f());
        });
        rx.await.ok()
    }
}
