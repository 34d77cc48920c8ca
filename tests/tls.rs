//! TLS clusters with real processes: a scheduler and a simulated worker
//! given a cluster CA and certificate, clients with the right certificate,
//! another cluster's, none, or a plain address; and what crosses the wire.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cluster::client::{ClientCore, KeyStatus};
use cluster::security::Security;
use cluster::sim::{graphs, sim_count};
use cluster::tls::{Tls, TlsFiles, CA_ENV, CERT_ENV, KEY_ENV};

#[allow(dead_code)]
mod common;
#[allow(dead_code)]
#[path = "common/fuzz.rs"]
mod fuzz;
use common::{Proc, BIN};

fn files(tag: &str) -> TlsFiles {
    let dir = std::env::temp_dir().join(format!("dask-rs-tls-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TlsFiles::generate(&dir).unwrap()
}

fn tls(f: &TlsFiles) -> Security {
    Security::open().with_tls(Tls::load(f.clone()).unwrap())
}

fn start_scheduler(args: &[&str]) -> (Proc, String) {
    let mut child = Command::new(BIN)
        .args(["scheduler", "--port", "0", "--no-dashboard"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let addr =
        line.trim().strip_prefix("Scheduler at ").unwrap_or_else(|| panic!("address line: {line:?}")).to_string();
    (Proc(child), addr)
}

fn connect(addr: &str, security: &Security) -> Result<ClientCore, String> {
    ClientCore::connect(addr, "test", Duration::from_secs(5), security).map_err(|e| e.to_string())
}

fn merge(c: &ClientCore, prefix: &str, n: usize) -> u64 {
    let (mut tasks, _) = graphs::merge(n);
    for t in &mut tasks {
        t.key = format!("{prefix}-{}", t.key);
        t.deps.iter_mut().for_each(|d| *d = format!("{prefix}-{d}"));
    }
    let total = tasks.last().unwrap().key.clone();
    c.submit(tasks, vec![], vec![], vec![total.clone()]).unwrap();
    assert!(c.wait(std::slice::from_ref(&total), Some(Duration::from_secs(20)), false).unwrap());
    let Some(KeyStatus::Finished { workers, .. }) = c.status(&total) else { panic!("no status") };
    let (items, _) = c.get_data(&workers[0], vec![total]).unwrap();
    sim_count(&items[0].1[0])
}

#[test]
fn a_tls_cluster_serves_its_own_certificates_only_and_encrypts_everything() {
    let a = files("a");
    let b = files("b");
    let s = |p: &std::path::PathBuf| p.to_str().unwrap().to_string();
    let (ca, cert, key) = (s(&a.ca), s(&a.cert), s(&a.key));
    let (_sched, addr) = start_scheduler(&["--tls-ca-file", &ca, "--tls-cert", &cert, "--tls-key", &key]);
    assert!(addr.starts_with("tls://"), "{addr}");
    // The worker takes its files from the environment (paths only).
    let _worker = Proc(
        Command::new(BIN)
            .args(["sim-worker", &addr, "--name", "w", "--nthreads", "2"])
            .envs([(CA_ENV, &ca), (CERT_ENV, &cert), (KEY_ENV, &key)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let c = connect(&addr, &tls(&a)).expect("a client with the cluster's certificate");
    let deadline = Instant::now() + Duration::from_secs(10);
    let worker = loop {
        if let Some(w) = c.info().unwrap().workers.into_iter().next() {
            break w.address;
        }
        assert!(Instant::now() < deadline, "the worker did not join");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(worker.starts_with("tls://"), "{worker}");
    assert_eq!(merge(&c, "m", 30), 31, "computed, and the result fetched from the worker over TLS");

    // Another cluster's certificate: the handshake fails, for the scheduler and the worker.
    let err = connect(&addr, &tls(&b)).err().expect("another CA is refused");
    assert!(err.contains("TLS handshake") || err.contains("closed"), "{err}");
    let other = ClientCore::connect(&addr, "x", Duration::from_secs(5), &tls(&b));
    assert!(other.is_err());
    // No certificates at all, or the plain scheme on a TLS port.
    let err = connect(&addr, &Security::open()).err().unwrap();
    assert!(err.contains("speaks TLS and no certificates were given"), "{err}");
    let plain = addr.replace("tls://", "tcp://");
    let err = connect(&plain, &Security::open()).err().unwrap();
    assert!(err.contains("use its tls:// address"), "{err}");
    // A TLS process refuses to talk in the clear.
    let (_open, open_addr) = start_scheduler(&[]);
    let err = connect(&open_addr, &tls(&a)).err().unwrap();
    assert!(err.contains("not encrypted") && err.contains("requires encryption"), "{err}");

    // What crosses the wire is ciphertext: neither the protocol's magic
    // bytes nor a key name appear in what a client sends.
    let (proxy, recorded) = fuzz::recording_proxy(&addr);
    let through = connect(&proxy.replace("tcp://", "tls://"), &tls(&a)).unwrap();
    assert_eq!(merge(&through, "secret-key-name", 5), 6);
    drop(through);
    std::thread::sleep(Duration::from_millis(200));
    let bytes = recorded.lock().unwrap().clone();
    assert!(bytes.len() > 500, "{} bytes recorded", bytes.len());
    assert!(!bytes.windows(4).any(|w| w == cluster::protocol::MAGIC), "magic bytes in the clear");
    assert!(!bytes.windows(15).any(|w| w == b"secret-key-name"), "a key name in the clear");
    // The scheduler still serves its own clients after all that.
    assert_eq!(merge(&c, "after", 3), 4);
}
