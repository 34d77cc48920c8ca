//! A runner's store of results: each value in memory or spilled to a file,
//! and the spill file format. Generic over how a value lives in memory (a
//! Python object in the extension, plain bytes in the simulator), so every
//! runner spills the same way.
//!
//! Spill file format: a little-endian `u64` frame count, then for each frame
//! its `u64` length and its bytes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use rustc_hash::FxHashMap;

use crate::protocol::Key;

/// Where a stored result lives.
enum Slot<V> {
    Memory(V),
    /// Spilled: its serialized frames are in this file.
    Disk(PathBuf),
}

/// A stored value looked up under the store's lock: what the caller took
/// from the in-memory value, or the file it was spilled to.
pub enum Held<T> {
    Memory(T),
    Disk(PathBuf),
}

/// The results a worker holds. Each carries the sequence number of its
/// insertion, so a free issued before a result was stored again never
/// removes it (see [`Store::mark`]). Spill files live in one directory,
/// removed with the store.
pub struct Store<V> {
    slots: Mutex<FxHashMap<Key, (u64, Slot<V>)>>,
    seq: AtomicU64,
    dir: PathBuf,
    files: AtomicU64,
}

impl<V> Store<V> {
    /// An empty store spilling into `dir` (created at the first spill).
    pub fn new(dir: PathBuf) -> Self {
        Store { slots: Mutex::default(), seq: AtomicU64::new(0), dir, files: AtomicU64::new(0) }
    }

    /// The spill directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Store `value` under `key`, replacing what was there (a replaced
    /// spill file is removed).
    pub fn insert(&self, key: Key, value: V) {
        let n = self.seq.fetch_add(1, Ordering::SeqCst);
        let old = self.slots.lock().expect("store").insert(key, (n, Slot::Memory(value)));
        if let Some((_, Slot::Disk(p))) = old {
            let _ = std::fs::remove_file(p);
        }
    }

    /// The store's state now: [`free_older`](Self::free_older) with it
    /// spares values stored after this call.
    pub fn mark(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }

    /// Drop `keys` stored before `mark` (`u64::MAX`: all of them), with
    /// their spill files.
    pub fn free_older(&self, keys: &[Key], mark: u64) {
        let mut slots = self.slots.lock().expect("store");
        for k in keys {
            if matches!(slots.get(k), Some((n, _)) if *n < mark) {
                if let Some((_, Slot::Disk(p))) = slots.remove(k) {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
    }

    /// Where each of `keys` is, under one lock: `take` applied to values in
    /// memory, or the spill file (`None`: not held).
    pub fn lookup<T>(&self, keys: &[Key], take: impl Fn(&V) -> T) -> Vec<Option<Held<T>>> {
        let slots = self.slots.lock().expect("store");
        keys.iter()
            .map(|k| match slots.get(k) {
                Some((_, Slot::Memory(v))) => Some(Held::Memory(take(v))),
                Some((_, Slot::Disk(p))) => Some(Held::Disk(p.clone())),
                None => None,
            })
            .collect()
    }

    /// Spill `key`: `serialize` gets what `take` took from its value (with
    /// the lock released, so it may be slow) and returns its frames, which
    /// go to a new file; the value is then dropped from memory unless it
    /// changed meanwhile. Returns whether `key` is now on disk. (The three
    /// steps are public for runners that must release a lock of their own
    /// around the write.)
    pub fn spill<T>(
        &self,
        key: &Key,
        take: impl FnOnce(&V) -> T,
        serialize: impl FnOnce(T) -> Result<Vec<Bytes>, String>,
    ) -> bool {
        let Some(taken) = self.in_memory(key, take) else { return false };
        match serialize(taken) {
            Ok(frames) => self.write_spill(key, &frames).is_some_and(|path| self.commit_spill(key, path)),
            Err(e) => {
                tracing::warn!("cannot spill {key}: {e}");
                false
            }
        }
    }

    /// `take` applied to `key`'s value if it is in memory.
    pub fn in_memory<T>(&self, key: &Key, take: impl FnOnce(&V) -> T) -> Option<T> {
        match self.slots.lock().expect("store").get(key) {
            Some((_, Slot::Memory(v))) => Some(take(v)),
            _ => None,
        }
    }

    /// Write `key`'s frames to a new spill file (not yet used: see
    /// [`commit_spill`](Self::commit_spill)); `None` if writing failed.
    pub fn write_spill(&self, key: &Key, frames: &[Bytes]) -> Option<PathBuf> {
        let n = self.files.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{n}.spill"));
        match private_dir(&self.dir).and_then(|_| write_frames(&path, frames)) {
            Ok(()) => Some(path),
            Err(e) => {
                tracing::warn!("cannot spill {key} to {path:?}: {e}");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Replace `key`'s value in memory by the spill file at `path`; if the
    /// value is gone or already on disk, the file is removed instead.
    pub fn commit_spill(&self, key: &Key, path: PathBuf) -> bool {
        match self.slots.lock().expect("store").get_mut(key) {
            Some((_, slot @ Slot::Memory(_))) => {
                *slot = Slot::Disk(path);
                true
            }
            _ => {
                let _ = std::fs::remove_file(&path);
                false
            }
        }
    }

    /// The keys held (in memory and on disk), in no particular order.
    pub fn keys(&self) -> Vec<Key> {
        self.slots.lock().expect("store").keys().cloned().collect()
    }

    /// Number of values held (in memory and on disk).
    pub fn len(&self) -> usize {
        self.slots.lock().expect("store").len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<V> Drop for Store<V> {
    fn drop(&mut self) {
        // Spilled results die with the worker: leave nothing on disk.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Write frames to `path` in the spill file format.
pub fn write_frames(path: &Path, frames: &[Bytes]) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    f.write_all(&(frames.len() as u64).to_le_bytes())?;
    for fr in frames {
        f.write_all(&(fr.len() as u64).to_le_bytes())?;
        f.write_all(fr)?;
    }
    f.flush()
}

/// Read frames written by [`write_frames`]; a truncated or corrupt file is
/// an `InvalidData` error.
/// Make `dir` (its parents as needed) a directory only this user can
/// enter, or accept it if it already is one; refuse anything else (another
/// user's directory, one others can write to, a symbolic link), since spill
/// files are pickles read back into the worker.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let meta = std::fs::symlink_metadata(dir)?;
            if meta.is_dir() && crate::security::is_mine(&meta) && meta.mode() & 0o077 == 0 {
                Ok(())
            } else {
                Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("{} exists and is not a private directory of this user", dir.display()),
                ))
            }
        }
        Err(e) => Err(e),
    }
}

pub fn read_frames(path: &Path) -> std::io::Result<Vec<Bytes>> {
    let data = Bytes::from(std::fs::read(path)?);
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, format!("corrupt spill file {path:?}"));
    let word = |at: usize| -> std::io::Result<usize> {
        let b = data.get(at..at.checked_add(8).ok_or_else(bad)?).ok_or_else(bad)?;
        usize::try_from(u64::from_le_bytes(b.try_into().expect("8 bytes"))).map_err(|_| bad())
    };
    let n = word(0)?;
    let mut at = 8;
    let mut out = Vec::with_capacity(n.min(data.len() / 8));
    for _ in 0..n {
        let len = word(at)?;
        at += 8;
        let end = at.checked_add(len).filter(|e| *e <= data.len()).ok_or_else(bad)?;
        out.push(data.slice(at..end));
        at = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("dask-rs-store-{name}-{}", std::process::id()))
    }

    #[test]
    fn spilled_values_read_back_and_files_go_with_the_values() {
        let d = dir("spill");
        let store: Store<Bytes> = Store::new(d.clone());
        store.insert("a".into(), Bytes::from_static(b"alpha"));
        store.insert("b".into(), Bytes::from_static(b"beta"));
        assert!(store.spill(&"a".to_string(), Bytes::clone, |v| Ok(vec![v, Bytes::from_static(b"!")])));
        assert!(!store.spill(&"a".to_string(), Bytes::clone, |v| Ok(vec![v])), "already on disk");
        assert!(!store.spill(&"zz".to_string(), Bytes::clone, |v| Ok(vec![v])), "not held");
        let got = store.lookup(&["a".into(), "b".into(), "c".into()], Bytes::clone);
        let Some(Held::Disk(path)) = &got[0] else { panic!("a is on disk") };
        assert_eq!(read_frames(path).unwrap(), vec![Bytes::from_static(b"alpha"), Bytes::from_static(b"!")]);
        assert!(matches!(&got[1], Some(Held::Memory(v)) if &v[..] == b"beta"));
        assert!(got[2].is_none());
        // A free issued before a value was stored again spares it.
        let mark = store.mark();
        store.insert("b".into(), Bytes::from_static(b"beta2"));
        store.free_older(&["a".into(), "b".into()], mark);
        assert!(!path.exists(), "the spill file went with its value");
        assert_eq!(store.len(), 1);
        drop(store);
        assert!(!d.exists(), "the spill directory goes with the store");
    }

    #[test]
    fn spill_directories_are_private_and_planted_ones_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = dir("private");
        let store: Store<Bytes> = Store::new(d.clone());
        store.insert("a".into(), Bytes::from_static(b"alpha"));
        assert!(store.spill(&"a".to_string(), Bytes::clone, |v| Ok(vec![v])));
        assert_eq!(std::fs::metadata(&d).unwrap().permissions().mode() & 0o777, 0o700);
        drop(store);
        // Someone else made the directory first, open to all: no spilling there.
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let store: Store<Bytes> = Store::new(d.clone());
        store.insert("a".into(), Bytes::from_static(b"alpha"));
        assert!(!store.spill(&"a".to_string(), Bytes::clone, |v| Ok(vec![v])), "refused");
        assert!(store.in_memory(&"a".to_string(), |v| v.clone()).is_some(), "the value stays in memory");
        drop(store);
        // A symbolic link in its place.
        let target = dir("private-target");
        std::fs::create_dir_all(&target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink(&target, &d).unwrap();
        assert!(private_dir(&d).is_err(), "a link is not accepted");
        std::fs::remove_file(&d).unwrap();
        std::fs::remove_dir_all(&target).unwrap();
    }

    #[test]
    fn a_corrupt_spill_file_is_an_error_not_a_panic() {
        let d = dir("corrupt");
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("x.spill");
        write_frames(&p, &[Bytes::from_static(b"hello")]).unwrap();
        let full = std::fs::read(&p).unwrap();
        for cut in [0, 4, 12, full.len() - 1] {
            std::fs::write(&p, &full[..cut]).unwrap();
            assert_eq!(read_frames(&p).unwrap_err().kind(), std::io::ErrorKind::InvalidData, "cut at {cut}");
        }
        std::fs::write(&p, u64::MAX.to_le_bytes()).unwrap();
        assert!(read_frames(&p).is_err(), "a huge count with no frames");
        let _ = std::fs::remove_dir_all(&d);
    }
}
