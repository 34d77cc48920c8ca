//! What the fuzz tests share: a small seeded generator, mutations of byte
//! streams (valid traffic turned into plausible garbage), and a proxy that
//! records what a real peer sends.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// splitmix64: deterministic per seed, so a failing run can be replayed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// The seed: `DASK_RS_FUZZ_SEED` when set (`make fuzz` sets a fresh one; a
/// failure prints it to replay), else a fixed one, so that `make test`
/// explores the same inputs on every run.
pub fn seed() -> u64 {
    std::env::var("DASK_RS_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_da5c_2026)
}

/// How long a fuzz test runs: `DASK_RS_FUZZ_SECS`, else `default`.
pub fn duration(default: u64) -> std::time::Duration {
    let secs = std::env::var("DASK_RS_FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(default);
    std::time::Duration::from_secs(secs)
}

/// Byte values that mean something to msgpack or to a length field.
const INTERESTING: [u8; 16] =
    [0x00, 0x01, 0x7f, 0x80, 0xff, 0xc0, 0xc4, 0xc6, 0xcc, 0xcf, 0xd9, 0xdb, 0xdc, 0xdd, 0xde, 0xdf];

/// One to four mutations of `base` (bytes after `keep` stay untouched with
/// some luck; the first `keep` bytes are kept most of the time so that the
/// mutated stream gets past the handshake), sometimes spliced with `other`.
pub fn mutate(rng: &mut Rng, base: &[u8], keep: usize, other: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    let lo = if rng.chance(80) { keep.min(v.len()) } else { 0 };
    for _ in 0..1 + rng.below(4) {
        if v.len() <= lo + 1 {
            v.extend((0..1 + rng.below(64)).map(|_| rng.next() as u8));
            continue;
        }
        let at = lo + rng.below(v.len() - lo);
        match rng.below(9) {
            0 => v[at] ^= 1 << rng.below(8),
            1 => v[at] = INTERESTING[rng.below(INTERESTING.len())],
            2 => {
                // A length or count field turned huge.
                let big: [u64; 5] = [u32::MAX as u64, u64::MAX, 1 << 31, 1 << 40, 0x7fff_ffff_ffff_ffff];
                let b = big[rng.below(big.len())].to_le_bytes();
                let n = if rng.chance(50) { 4 } else { 8 };
                for (i, byte) in b.iter().take(n).enumerate() {
                    if at + i < v.len() {
                        v[at + i] = *byte;
                    }
                }
            }
            3 => {
                let end = (at + 1 + rng.below(32)).min(v.len());
                v.drain(at..end);
            }
            4 => {
                let end = (at + 1 + rng.below(64)).min(v.len());
                let copy = v[at..end].to_vec();
                let to = lo + rng.below(v.len() - lo);
                v.splice(to..to, copy);
            }
            5 => {
                let junk: Vec<u8> = (0..1 + rng.below(32)).map(|_| rng.next() as u8).collect();
                v.splice(at..at, junk);
            }
            6 => v.truncate(at),
            7 if !other.is_empty() => {
                let from = rng.below(other.len());
                let end = (from + 1 + rng.below(256)).min(other.len());
                v.splice(at..at, other[from..end].iter().copied());
            }
            _ => v[at] = v[at].wrapping_add(1 + rng.below(3) as u8),
        }
    }
    v
}

/// A one-connection TCP proxy to `upstream` that records every byte the
/// client side sends. Returns the address to connect to and the record.
pub fn recording_proxy(upstream: &str) -> (String, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp://{}", listener.local_addr().unwrap());
    let record = Arc::new(Mutex::new(Vec::new()));
    let rec = record.clone();
    let upstream = cluster::comm::strip_scheme(upstream).to_string();
    std::thread::spawn(move || {
        let Ok((mut down, _)) = listener.accept() else { return };
        let Ok(mut up) = TcpStream::connect(&upstream) else { return };
        let (mut down2, mut up2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut up2, &mut down2);
            let _ = down2.shutdown(std::net::Shutdown::Both);
        });
        let mut buf = [0u8; 64 * 1024];
        loop {
            match down.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    rec.lock().unwrap().extend_from_slice(&buf[..n]);
                    if up.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = up.shutdown(std::net::Shutdown::Both);
    });
    (addr, record)
}
