//! The executor threads that run tasks, and `secede`/`rejoin`: a task may
//! leave the pool (another thread starts in its place) and take a place
//! again later. Results go back to the runtime loop as events.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::runner::Runner;
use super::runtime::Event;
use super::state::Recipe;
use crate::now;
use crate::protocol::{key_split, Key};

/// An executor thread holds the results of short tasks of one group while it
/// has the next task of that group to run, and reports them together: one
/// wake-up of the runtime loop per run instead of one per task. At most this
/// many results, for at most `HOLD_FOR` between tasks; the runtime loop
/// collects results held longer while a task runs.
const HOLD_RESULTS: usize = 16;
const HOLD_FOR: Duration = Duration::from_millis(1);

pub(super) enum Job {
    /// Run a task.
    Task { key: Key, recipe: Recipe, deps: Vec<Key> },
    /// Leave the pool, handing this thread's place (and number) to a
    /// seceded task that rejoins.
    Yield(std::sync::mpsc::SyncSender<u32>),
}

/// The executor threads: each takes one job at a time from the shared queue.
pub(super) struct Executors<R: Runner> {
    pub(super) jobs: Mutex<std::sync::mpsc::Receiver<Job>>,
    pub(super) events: mpsc::UnboundedSender<Event>,
    pub(super) runner: Arc<R>,
    /// Results held back, and since when (see `HOLD_RESULTS`).
    pub(super) held: Mutex<(Vec<Event>, Option<Instant>)>,
}

impl<R: Runner> Executors<R> {
    pub(super) fn new(
        jobs: std::sync::mpsc::Receiver<Job>,
        events: mpsc::UnboundedSender<Event>,
        runner: Arc<R>,
    ) -> Self {
        Executors { jobs: Mutex::new(jobs), events, runner, held: Mutex::new((Vec::new(), None)) }
    }

    /// Send the held results to the runtime loop.
    fn report(&self) {
        let mut held = self.held.lock().expect("held results");
        held.1 = None;
        for ev in held.0.drain(..) {
            let _ = self.events.send(ev);
        }
    }

    /// Send the held results if they were held for `age` or longer: the
    /// runtime loop calls this while tasks run, so a long task that follows
    /// short ones on a thread does not keep their results back.
    pub(super) fn report_older_than(&self, age: Duration) {
        let old = self.held.lock().expect("held results").1.is_some_and(|t| t.elapsed() >= age);
        if old {
            self.report();
        }
    }

    /// Hold a task's result, or (`now`) send it with the rest held.
    fn hold(&self, ev: Event, now: bool) {
        {
            let mut held = self.held.lock().expect("held results");
            held.1.get_or_insert_with(Instant::now);
            held.0.push(ev);
        }
        if now {
            self.report();
        }
    }

    /// Whether held results must go before the next task runs: it is of
    /// another group than `last`, or enough are held, or long enough.
    fn must_report(&self, next: &Job, last: &str) -> bool {
        let held = self.held.lock().expect("held results");
        if held.0.is_empty() {
            return false;
        }
        let same_group = matches!(next, Job::Task { key, .. } if key_split(key) == last);
        !same_group || held.0.len() >= HOLD_RESULTS || held.1.is_some_and(|t| t.elapsed() >= HOLD_FOR)
    }
}

impl<R: Runner> Executors<R> {
    pub(super) fn spawn(self: &Arc<Self>, thread: u32) -> std::io::Result<()> {
        let me = self.clone();
        std::thread::Builder::new().name(format!("dask-rs-exec-{thread}")).spawn(move || {
            let runner = me.runner.clone();
            runner.thread_main(&mut || me.run(thread))
        })?;
        Ok(())
    }

    fn run(self: &Arc<Self>, mut thread: u32) {
        // The secede/rejoin hooks are made once per thread; a task only sets its key.
        let me = self.clone();
        let on_secede: SecedeHook = Arc::new(move |key: &Key, replace: Option<u32>| {
            // Another thread takes this one's place; this one leaves the
            // pool with its task unless the task rejoins.
            if let Some(number) = replace {
                if let Err(e) = me.spawn(number) {
                    tracing::error!("cannot start an executor thread in place of a seceded task: {e}");
                }
            }
            let _ = me.events.send(Event::Seceded(key.clone()));
        });
        let events = self.events.clone();
        let on_rejoin: RejoinHook = Arc::new(move |key: &Key| {
            // Wait for a pool thread to give its place up (at once when one
            // is idle, else when one finishes its task), as Dask's rejoin.
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            if events.send(Event::Rejoined(key.clone(), tx)).is_err() {
                return None;
            }
            rx.recv().ok()
        });
        // The group of the task this thread ran last, for `must_report`
        // (copied only when it changes).
        let mut last = String::new();
        loop {
            let next = self.jobs.lock().expect("job queue").try_recv();
            let job = match next {
                Ok(j) => {
                    if self.must_report(&j, &last) {
                        self.report();
                    }
                    j
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => {
                    self.report();
                    match self.jobs.lock().expect("job queue").recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    }
                }
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    self.report();
                    return;
                }
            };
            let (key, recipe, deps) = match job {
                Job::Task { key, recipe, deps } => (key, recipe, deps),
                Job::Yield(to) => {
                    let _ = to.send(thread);
                    return;
                }
            };
            let ctx = TaskContext {
                key: key.clone(),
                thread,
                replaced: false,
                detached: false,
                on_secede: on_secede.clone(),
                on_rejoin: on_rejoin.clone(),
            };
            TASK.with(|t| *t.borrow_mut() = Some(ctx));
            let start = now();
            let outcome = self.runner.execute(&key, &recipe, &deps, thread);
            let stop = now();
            let ctx = TASK.with(|t| t.borrow_mut().take());
            let seceded = ctx.as_ref().is_some_and(|c| c.replaced);
            let group = key_split(&key);
            if group != last.as_str() {
                last = group.into_owned();
            }
            self.hold(Event::Executed { key, outcome, start, stop, thread }, seceded);
            if seceded || self.events.is_closed() {
                return;
            }
            // A task that rejoined took another thread's place and number.
            if let Some(c) = ctx {
                thread = c.thread;
            }
        }
    }
}

/// Called when a task secedes, with the number for the thread to start in
/// its place (none when it already left the pool once and rejoined not).
type SecedeHook = Arc<dyn Fn(&Key, Option<u32>) + Send + Sync>;
/// Called when a seceded task rejoins; blocks until a pool thread gives its
/// place up and returns that thread's number (none when the worker is closing).
type RejoinHook = Arc<dyn Fn(&Key) -> Option<u32> + Send + Sync>;

/// The task running on this executor thread.
struct TaskContext {
    key: Key,
    /// The number this thread shows in the task stream.
    thread: u32,
    /// Another thread was started in this one's place: this one ends with
    /// the task (unless it rejoins and takes a pool thread's place).
    replaced: bool,
    /// Seceded and not rejoined: the task does not count as running.
    detached: bool,
    on_secede: SecedeHook,
    on_rejoin: RejoinHook,
}

thread_local! {
    static TASK: std::cell::RefCell<Option<TaskContext>> = const { std::cell::RefCell::new(None) };
}

/// Leave the worker's thread pool for the rest of the calling task (Dask's
/// `secede`): another thread starts in its place and the scheduler stops
/// counting the task against the worker, so tasks it launches and waits for
/// can run. Returns false when not called from a task.
pub fn secede() -> bool {
    let ctx = TASK.with(|t| {
        let mut t = t.borrow_mut();
        let c = t.as_mut()?;
        if c.detached {
            return Some(None);
        }
        c.detached = true;
        let replace = (!std::mem::replace(&mut c.replaced, true)).then_some(c.thread);
        Some(Some((c.key.clone(), replace, c.on_secede.clone())))
    });
    match ctx {
        Some(Some((key, replace, f))) => {
            f(&key, replace);
            true
        }
        Some(None) => true,
        None => false,
    }
}

/// Take a place in the worker's thread pool again after [`secede`] (Dask's
/// `rejoin`): blocks until a pool thread is free, which then leaves the pool,
/// so the worker never runs more tasks at once than it has threads. The
/// task counts as running from the call on. Returns false when not called
/// from a task.
pub fn rejoin() -> bool {
    let ctx = TASK.with(|t| {
        let mut t = t.borrow_mut();
        let c = t.as_mut()?;
        Some(std::mem::replace(&mut c.detached, false).then(|| (c.key.clone(), c.on_rejoin.clone())))
    });
    match ctx {
        Some(Some((key, f))) => {
            // Not under the borrow: the hook blocks.
            if let Some(number) = f(&key) {
                TASK.with(|t| {
                    if let Some(c) = t.borrow_mut().as_mut() {
                        c.replaced = false;
                        c.thread = number;
                    }
                });
            }
            true
        }
        Some(None) => true,
        None => false,
    }
}
