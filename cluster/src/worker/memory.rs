//! The worker's memory policy (after distributed's worker memory manager):
//! which results to spill to disk, when to pause, and when to give up.
//!
//! Pure: results coming and going, uses, and the process's resident memory
//! come in; keys to spill and a verdict come out. Fractions are of the
//! worker's `memory_limit`; a limit of 0 turns the policy off.
//!
//! - *target* (0.6): results in memory above this are spilled, least
//!   recently used first;
//! - *spill* (0.7): when the process's RSS passes this, results are spilled
//!   until the estimate is back under *target*;
//! - *pause* (0.8): the worker starts no task until RSS falls below it;
//! - *terminate* (0.95): the process exits (its supervisor restarts it);
//! - a worker paused for `stuck_after` seconds with nothing left to spill
//!   (unmanaged memory: leaks, big temporaries) exits too, instead of
//!   staying paused forever.

use rustc_hash::{FxHashMap, FxHashSet};

use crate::protocol::Key;

/// Thresholds of the memory policy.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryConfig {
    /// Bytes; 0 disables every threshold.
    pub limit: u64,
    pub target: f64,
    pub spill: f64,
    pub pause: f64,
    pub terminate: f64,
    /// Seconds paused with nothing to spill before the worker exits.
    pub stuck_after: f64,
}

impl MemoryConfig {
    /// Dask's default thresholds for a worker with `limit` bytes.
    pub fn new(limit: u64) -> Self {
        MemoryConfig { limit, target: 0.6, spill: 0.7, pause: 0.8, terminate: 0.95, stuck_after: 10.0 }
    }

    /// Process memory above which results are spilled (None without a limit).
    pub fn spill_bytes(&self) -> Option<u64> {
        self.bytes(self.spill)
    }

    /// Managed memory above which results are spilled (None without a limit).
    pub fn target_bytes(&self) -> Option<u64> {
        self.bytes(self.target)
    }

    fn bytes(&self, fraction: f64) -> Option<u64> {
        (self.limit > 0 && fraction > 0.0).then_some((self.limit as f64 * fraction) as u64)
    }
}

/// What the worker should do about its memory now.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Run,
    Pause,
    /// Exit the process (the supervisor restarts it), for this reason.
    Terminate(String),
}

/// Where every stored result is (memory or disk), and the policy.
#[derive(Debug)]
pub struct MemoryManager {
    config: MemoryConfig,
    in_memory: FxHashMap<Key, (u64, u64)>,
    on_disk: FxHashMap<Key, u64>,
    spilling: FxHashSet<Key>,
    clock: u64,
    memory: u64,
    spilled: u64,
    paused_since: Option<f64>,
}

impl MemoryManager {
    pub fn new(config: MemoryConfig) -> Self {
        MemoryManager {
            config,
            in_memory: FxHashMap::default(),
            on_disk: FxHashMap::default(),
            spilling: FxHashSet::default(),
            clock: 0,
            memory: 0,
            spilled: 0,
            paused_since: None,
        }
    }

    /// Bytes of results held in memory.
    pub fn memory(&self) -> u64 {
        self.memory
    }

    /// Bytes of results spilled to disk (their in-memory sizes).
    pub fn spilled(&self) -> u64 {
        self.spilled
    }

    /// Whether the worker is paused.
    pub fn paused(&self) -> bool {
        self.paused_since.is_some()
    }

    /// Whether results in memory (those still being written to disk
    /// included) passed the *spill* threshold: the worker starts no task
    /// until the disk catches up, so a stream of large results cannot outrun
    /// spilling.
    pub fn throttled(&self) -> bool {
        self.config.bytes(self.config.spill).is_some_and(|s| self.memory > s)
    }

    /// A result of `nbytes` is now in memory.
    pub fn add(&mut self, key: &Key, nbytes: u64) {
        self.remove(key);
        self.clock += 1;
        self.in_memory.insert(key.clone(), (nbytes, self.clock));
        self.memory += nbytes;
    }

    /// A result was dropped.
    pub fn remove(&mut self, key: &str) {
        if let Some((n, _)) = self.in_memory.remove(key) {
            self.memory -= n;
        }
        if let Some(n) = self.on_disk.remove(key) {
            self.spilled -= n;
        }
        self.spilling.remove(key);
    }

    /// A result was used (input of a task): it is spilled last.
    pub fn touch(&mut self, key: &str) {
        self.clock += 1;
        if let Some(e) = self.in_memory.get_mut(key) {
            e.1 = self.clock;
        }
    }

    /// The store wrote `key` to disk (`ok`) or could not (it stays in memory).
    pub fn spill_done(&mut self, key: &str, ok: bool) {
        if !self.spilling.remove(key) || !ok {
            return;
        }
        if let Some((n, _)) = self.in_memory.remove(key) {
            self.memory -= n;
            self.spilled += n;
            self.on_disk.insert(key.to_string(), n);
        }
    }

    /// Least recently used results to spill so that results in memory fall
    /// to `goal` bytes (those already being spilled count as gone).
    fn pick(&mut self, goal: u64) -> Vec<Key> {
        let pending: u64 = self.spilling.iter().filter_map(|k| self.in_memory.get(k)).map(|e| e.0).sum();
        let mut excess = self.memory.saturating_sub(pending).saturating_sub(goal);
        if excess == 0 {
            return Vec::new();
        }
        let mut cands: Vec<(u64, &Key, u64)> = self
            .in_memory
            .iter()
            .filter(|(k, _)| !self.spilling.contains(*k))
            .map(|(k, &(n, used))| (used, k, n))
            .collect();
        cands.sort_unstable();
        let mut out = Vec::new();
        for (_, k, n) in cands {
            if excess == 0 {
                break;
            }
            excess = excess.saturating_sub(n.max(1));
            out.push(k.clone());
        }
        for k in &out {
            self.spilling.insert(k.clone());
        }
        out
    }

    /// Results to spill because results in memory passed *target*.
    pub fn spill_for_target(&mut self) -> Vec<Key> {
        match self.config.bytes(self.config.target) {
            Some(goal) if self.memory > goal => self.pick(goal),
            _ => Vec::new(),
        }
    }

    /// Check the process's resident memory `rss` at time `now` (seconds):
    /// the keys to spill and what the worker should do.
    pub fn check(&mut self, rss: u64, now: f64) -> (Vec<Key>, Verdict) {
        let c = self.config.clone();
        if c.limit == 0 {
            return (Vec::new(), Verdict::Run);
        }
        if let Some(t) = c.bytes(c.terminate) {
            if rss > t {
                let why = format!(
                    "process memory {} MiB passed {:.0}% of the {} MiB memory limit",
                    rss >> 20,
                    c.terminate * 100.0,
                    c.limit >> 20
                );
                return (Vec::new(), Verdict::Terminate(why));
            }
        }
        let mut keys = self.spill_for_target();
        if let (Some(spill), Some(target)) = (c.bytes(c.spill), c.bytes(c.target)) {
            if rss > spill {
                // Spill results until the process would be back under target.
                let unmanaged = rss.saturating_sub(self.memory);
                let goal = target.saturating_sub(unmanaged);
                keys.extend(self.pick(goal));
            }
        }
        let pause_at = c.bytes(c.pause);
        let verdict = match pause_at {
            Some(p) if rss > p => {
                let since = *self.paused_since.get_or_insert(now);
                let nothing_left = self.in_memory.len() == self.spilling.len();
                if nothing_left && now - since >= self.config.stuck_after {
                    Verdict::Terminate(format!(
                        "paused for {:.0} s at {} MiB of a {} MiB limit with no results left to spill \
                         (unmanaged memory)",
                        now - since,
                        rss >> 20,
                        self.config.limit >> 20
                    ))
                } else {
                    Verdict::Pause
                }
            }
            _ => {
                self.paused_since = None;
                Verdict::Run
            }
        };
        (keys, verdict)
    }
}

/// Make the C allocator give freed memory back to the system readily (as
/// Dask's nanny does with `MALLOC_TRIM_THRESHOLD_=65536`): large results
/// (numpy buffers) otherwise stay in the process's heap after they are
/// spilled or released, and count as unmanaged memory. It costs: glibc then
/// maps and unmaps every large buffer (a fixed mmap threshold), about a
/// fifth of the time of an array sum, so the worker turns it on only once
/// its memory nears the target.
pub fn configure_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts glibc's allocator parameters.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 65536);
        // Large buffers are mapped on their own again (glibc had raised
        // this threshold as buffers were freed), so freeing one unmaps it.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::malloc_trim(0);
    }
}

/// Return the C heap's free pages to the system now.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn mm() -> MemoryManager {
        MemoryManager::new(MemoryConfig::new(100 * MB))
    }

    #[test]
    fn spills_least_recently_used_results_above_target() {
        let mut m = mm();
        for i in 0..7 {
            m.add(&format!("k{i}"), 10 * MB);
        }
        m.touch("k0");
        // 70 MB in memory, target 60 MB: one result goes, the least recently used.
        assert_eq!(m.spill_for_target(), ["k1"]);
        assert!(!m.throttled());
        m.add(&"big".to_string(), 30 * MB);
        assert!(m.throttled(), "100 MB in memory, spill threshold 70 MB");
        m.remove("big");
        assert!(m.spill_for_target().is_empty(), "already on its way");
        m.spill_done("k1", true);
        assert_eq!((m.memory(), m.spilled()), (60 * MB, 10 * MB));
        m.remove("k1");
        assert_eq!(m.spilled(), 0);
    }

    #[test]
    fn process_memory_spills_then_pauses_then_terminates() {
        let mut m = mm();
        for i in 0..4 {
            m.add(&format!("k{i}"), 10 * MB);
        }
        // 40 MB managed, RSS 75 MB: 35 MB unmanaged, so results must fall to 25 MB.
        let (keys, v) = m.check(75 * MB, 0.0);
        assert_eq!((keys.len(), v), (2, Verdict::Run));
        let (_, v) = m.check(85 * MB, 1.0);
        assert_eq!(v, Verdict::Pause);
        assert!(m.paused());
        let (_, v) = m.check(50 * MB, 2.0);
        assert_eq!(v, Verdict::Run);
        assert!(!m.paused());
        assert!(matches!(m.check(96 * MB, 3.0).1, Verdict::Terminate(why) if why.contains("95%")));
    }

    #[test]
    fn paused_with_nothing_to_spill_terminates_after_a_while() {
        let mut m = mm();
        assert_eq!(m.check(85 * MB, 0.0).1, Verdict::Pause);
        assert_eq!(m.check(85 * MB, 5.0).1, Verdict::Pause);
        assert!(matches!(m.check(85 * MB, 10.0).1, Verdict::Terminate(why) if why.contains("unmanaged")));
    }

    #[test]
    fn no_limit_no_policy() {
        let mut m = MemoryManager::new(MemoryConfig::new(0));
        m.add(&"k".to_string(), u64::MAX / 2);
        assert_eq!(m.check(u64::MAX / 2, 0.0), (Vec::new(), Verdict::Run));
        assert!(m.spill_for_target().is_empty());
    }
}
