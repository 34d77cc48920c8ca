//! End-to-end tests of the `dask-ctl` binary: a real scheduler process,
//! real TCP, simulated (Rust) workers and the Rust client core.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use cluster::client::{ClientCore, KeyStatus};
use cluster::comm::{FrameReader, FrameWriter};
use cluster::protocol::{Envelope, FromClient, Handshake, Role, TaskSpec, MAGIC};
use cluster::security::Security;

mod common;
use common::{hostport, BIN};

fn start_scheduler() -> (common::Proc, String) {
    common::start_scheduler_with(&[])
}

fn start_sim_worker(addr: &str, name: &str) -> common::Proc {
    common::start_sim_worker_with(addr, name, &[])
}

fn client(addr: &str) -> ClientCore {
    ClientCore::connect(addr, "test", Duration::from_secs(5), &Security::open()).expect("connect")
}

fn wait_workers(c: &ClientCore, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(cluster::protocol::ClusterInfo { workers, .. }) = c.info() {
            if workers.len() >= n {
                return;
            }
        }
        assert!(Instant::now() < deadline, "workers did not join");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn task(key: &str, deps: &[&str]) -> TaskSpec {
    TaskSpec::new(key, deps.iter().map(|d| d.to_string()).collect())
}

#[test]
fn graph_runs_on_sim_workers_and_results_fetch_directly() {
    let (_s, addr) = start_scheduler();
    let _w1 = start_sim_worker(&addr, "a");
    let _w2 = start_sim_worker(&addr, "b");
    let c = client(&addr);
    wait_workers(&c, 2);
    let mut tasks: Vec<TaskSpec> = (0..500).map(|i| task(&format!("leaf-{i}"), &[])).collect();
    let leaves: Vec<String> = (0..500).map(|i| format!("leaf-{i}")).collect();
    let leaf_refs: Vec<&str> = leaves.iter().map(|s| s.as_str()).collect();
    tasks.push(task("total", &leaf_refs));
    c.submit(tasks, vec![], vec![], vec!["total".into()]).unwrap();
    assert!(c.wait(&["total".into()], Some(Duration::from_secs(20)), false).unwrap());
    let Some(KeyStatus::Finished { workers, nbytes }) = c.status("total") else { panic!("not finished") };
    assert_eq!(nbytes, 8);
    let (items, missing) = c.get_data(&workers[0], vec!["total".into()]).unwrap();
    assert!(missing.is_empty());
    assert_eq!(items[0].1.concat().len(), 8);
    // Leaves were released once the merge finished: only `total` remains.
    c.release(vec!["total".into()]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(cluster::protocol::ClusterInfo { ntasks, workers, .. }) = c.info() {
            if ntasks == 0 && workers.iter().all(|w| w.processing == 0) {
                break;
            }
        }
        assert!(Instant::now() < deadline, "tasks not released");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn garbage_and_wrong_version_are_rejected_and_scheduler_keeps_serving() {
    let (_s, addr) = start_scheduler();
    // Random bytes: the connection is dropped.
    let mut junk = TcpStream::connect(hostport(&addr)).unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    junk.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut buf = Vec::new();
    let _ = junk.read_to_end(&mut buf);
    assert!(buf.is_empty(), "no reply to garbage");

    // Valid magic, then a malformed frame count.
    let mut bad = TcpStream::connect(hostport(&addr)).unwrap();
    bad.write_all(&MAGIC).unwrap();
    bad.write_all(&u32::MAX.to_le_bytes()).unwrap();

    // A peer that speaks another protocol version gets a clear error.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reason = rt.block_on(async {
        let s = tokio::net::TcpStream::connect(hostport(&addr)).await.unwrap();
        let (r, w) = s.into_split();
        let mut w = FrameWriter::new(w);
        let mut r = FrameReader::new(r);
        w.write_magic().await.unwrap();
        w.write_one(Handshake::Hello { protocol: 99, role: Role::Client, name: "old".into(), nonce: vec![] })
            .await
            .unwrap();
        let reply: Vec<Envelope<Handshake>> = r.read_batch().await.unwrap();
        match &reply[0].msg {
            Handshake::Refused { reason } => reason.clone(),
            other => panic!("expected an error, got {other:?}"),
        }
    });
    assert!(reason.contains("protocol version mismatch"), "{reason}");
    assert!(reason.contains("99"), "{reason}");

    // The scheduler still serves a well-behaved client.
    let c = client(&addr);
    assert!(c.info().is_ok());
}

#[test]
fn connecting_to_a_dead_address_fails_fast_with_a_clear_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let t = Instant::now();
    let err = ClientCore::connect(&format!("tcp://127.0.0.1:{port}"), "x", Duration::from_secs(3), &Security::open())
        .err()
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(4));
    let msg = err.to_string();
    assert!(msg.contains("cannot connect to scheduler"), "{msg}");
}

#[test]
fn sigterm_stops_the_scheduler_cleanly() {
    let (mut s, addr) = start_scheduler();
    let c = client(&addr);
    let pid = s.0.id();
    Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(st) = s.0.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "scheduler did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status:?}");
    // The client notices the closed connection.
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.closed_reason().is_none() {
        assert!(Instant::now() < deadline, "client did not notice");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn port_in_use_is_a_clear_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let out = Command::new(BIN).args(["scheduler", "--port", &port]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot listen on 127.0.0.1"), "{err}");
    assert!(err.to_lowercase().contains("address already in use") || err.contains("in use"), "{err}");
}

#[test]
fn unknown_flags_are_rejected() {
    let out = Command::new(BIN).args(["scheduler", "--bogus"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bogus"));
}

#[test]
fn events_subscription_gives_snapshot_then_deltas() {
    let (_s, addr) = start_scheduler();
    let _w = start_sim_worker(&addr, "a");
    let c = client(&addr);
    wait_workers(&c, 1);
    c.subscribe(Duration::from_millis(20)).unwrap();
    let first = c.take_events(Duration::from_secs(5));
    assert!(!first.is_empty());
    assert_eq!(first[0].workers.len(), 1);
    let tasks: Vec<TaskSpec> = (0..50).map(|i| task(&format!("inc-{i}"), &[])).collect();
    let keys: Vec<String> = (0..50).map(|i| format!("inc-{i}")).collect();
    c.submit(tasks, vec![], vec![], keys.clone()).unwrap();
    assert!(c.wait(&keys, Some(Duration::from_secs(10)), false).unwrap());
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut stream = 0;
    let mut memory = 0;
    while Instant::now() < deadline && (stream < 50 || memory < 50) {
        for u in c.take_events(Duration::from_millis(200)) {
            stream += u.stream.len();
            if let Some(g) = u.groups.iter().find(|g| g.name == "inc") {
                memory = g.memory;
            }
        }
    }
    assert_eq!(stream, 50, "every finished task appears once in the task stream");
    assert_eq!(memory, 50, "group counts report the tasks in memory");
}

#[test]
fn a_stopped_worker_cannot_hang_a_data_exchange() {
    let (_s, addr) = start_scheduler();
    let w = start_sim_worker(&addr, "a");
    let c = client(&addr);
    wait_workers(&c, 1);
    c.submit(vec![task("x", &[])], vec![], vec![], vec!["x".into()]).unwrap();
    assert!(c.wait(&["x".into()], Some(Duration::from_secs(20)), false).unwrap());
    let Some(KeyStatus::Finished { workers, .. }) = c.status("x") else { panic!("not finished") };
    let worker = workers[0].clone();
    let pid = w.0.id().to_string();
    let pool = cluster::comm::ConnectionPool::new(Role::Client, "t", Duration::from_secs(5), Security::open())
        .with_idle_timeout(Duration::from_secs(1));
    let rt = tokio::runtime::Runtime::new().unwrap();
    // A first exchange opens the connection the next one reuses.
    let first = rt.block_on(async {
        let req = Envelope::new(cluster::protocol::DataRequest::GetData { id: 0, keys: vec!["x".into()] });
        pool.request(&worker, req).await
    });
    assert!(first.is_ok(), "{:?}", first.err());
    Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    let stopped = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('T'))
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !stopped() {
        assert!(Instant::now() < deadline, "the worker did not stop");
        std::thread::sleep(Duration::from_millis(10));
    }
    let t = Instant::now();
    let got = rt.block_on(async {
        let req = Envelope::new(cluster::protocol::DataRequest::GetData { id: 1, keys: vec!["x".into()] });
        tokio::time::timeout(Duration::from_secs(20), pool.request(&worker, req)).await
    });
    Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    let err = got.expect("the exchange gave up by itself").expect_err("a stopped worker cannot answer");
    assert!(matches!(err, cluster::comm::CommError::Idle(_)), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5), "gave up after {:?}", t.elapsed());
    // Once it runs again, the same exchange succeeds.
    let ok = rt.block_on(async {
        let req = Envelope::new(cluster::protocol::DataRequest::GetData { id: 2, keys: vec!["x".into()] });
        pool.request(&worker, req).await
    });
    assert!(ok.is_ok(), "{:?}", ok.err());
}

/// Seconds of CPU process `pid` has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit(')').next().unwrap();
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[test]
fn out_of_file_descriptors_the_scheduler_pauses_instead_of_spinning_and_recovers() {
    // A scheduler whose hard limit is 64 open files.
    let mut child = Command::new("sh")
        .args(["-c", &format!("ulimit -n 64 && exec {BIN} scheduler --port 0 --no-dashboard")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let addr = line.trim().strip_prefix("Scheduler at ").unwrap().to_string();
    let sched = common::Proc(child);
    let pid = sched.0.id();
    // Strangers hold more connections than it can accept.
    let hogs: Vec<TcpStream> = (0..100).filter_map(|_| TcpStream::connect(hostport(&addr)).ok()).collect();
    assert!(hogs.len() >= 64, "only {} connections", hogs.len());
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_seconds(pid) - before;
    assert!(used < 0.5, "the scheduler used {used:.2} s of CPU in 2 s while out of file descriptors");
    drop(hogs);
    // Once they are gone, it serves again.
    let c = client(&addr);
    assert!(c.info().is_ok());
}

#[test]
fn a_subscriber_that_stops_reading_cannot_grow_the_scheduler() {
    let (_s, addr) = start_scheduler();
    let _w = start_sim_worker(&addr, "a");
    let c = client(&addr);
    wait_workers(&c, 1);
    // A monitor that subscribes to updates every 10 ms and never reads them.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let stalled = rt.block_on(async {
        let open = Security::open();
        let mut conn = cluster::comm::connect(&addr, Role::Monitor, "stalled", Duration::from_secs(5), &open)
            .await
            .expect("connect");
        conn.writer.write_one(FromClient::Subscribe { interval_ms: 10 }).await.unwrap();
        conn
    });
    // Long keys make every update large: the socket buffers fill within the
    // first rounds, and everything after would wait in the scheduler.
    let pad = "x".repeat(400);
    for round in 0..20 {
        let keys: Vec<String> = (0..5_000).map(|i| format!("work-{pad}-{round}-{i}")).collect();
        let tasks = keys.iter().map(|k| task(k, &[])).collect();
        c.submit(tasks, vec![], vec![], keys.clone()).unwrap();
        assert!(c.wait(&keys, Some(Duration::from_secs(30)), false).unwrap(), "a reading client is served");
        c.release(keys).unwrap();
        std::thread::sleep(Duration::from_millis(30));
    }
    let queued = c.info().unwrap().queued;
    assert!(queued <= 4, "{queued} messages wait for a subscriber that does not read");
    drop(stalled);
}
