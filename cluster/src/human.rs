//! Figures for people, the same in every console: sizes, ages, and a
//! stable hash (so a task group keeps its colour across pages and runs).

/// Bytes with binary units: `512 B`, `1.5 GiB`.
pub fn bytes(n: u64) -> String {
    let (v, u) = scale(n);
    match u {
        0 => format!("{n} B"),
        _ => format!("{v:.1} {}", ["B", "KiB", "MiB", "GiB", "TiB"][u]),
    }
}

/// Bytes compactly, for narrow columns: `512B`, `1.5G`, `47G`.
pub fn bytes_short(n: u64) -> String {
    let (v, u) = scale(n);
    let unit = ["B", "K", "M", "G", "T"][u];
    match u {
        0 => format!("{n}B"),
        _ if v < 10.0 => format!("{v:.1}{unit}"),
        _ => format!("{v:.0}{unit}"),
    }
}

fn scale(n: u64) -> (f64, usize) {
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < 4 {
        v /= 1024.0;
        u += 1;
    }
    (v, u)
}

/// An age: `42s`, `12m`, `3h5m`, `2d4h`.
pub fn age(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86399 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

/// FNV-1a of `s`: the same on every run and platform.
pub fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ages() {
        assert_eq!((bytes(512), bytes(1536), bytes(3 << 30)), ("512 B".into(), "1.5 KiB".into(), "3.0 GiB".into()));
        assert_eq!(
            (bytes_short(512), bytes_short(1536), bytes_short(47 << 30)),
            ("512B".into(), "1.5K".into(), "47G".into())
        );
        assert_eq!(
            (age(5.0), age(754.0), age(3700.0), age(90_000.0)),
            ("5s".into(), "12m".into(), "1h1m".into(), "1d1h".into())
        );
        assert_eq!(stable_hash("inc"), stable_hash("inc"));
        assert_ne!(stable_hash("inc"), stable_hash("dec"));
    }
}
