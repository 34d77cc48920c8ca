//! The cluster token with real processes: a scheduler and a simulated worker
//! started with `DASK_RS_TOKEN`, and peers that hold it, hold another one,
//! hold none, or speak raw bytes.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cluster::client::ClientCore;
use cluster::comm::{FrameReader, FrameWriter};
use cluster::protocol::{DataRequest, Envelope, FromClient, Handshake, Role, MAGIC, PROTOCOL_VERSION};
use cluster::security::{Security, TOKEN_ENV};

mod common;
use common::{hostport, Proc, BIN};

fn start_scheduler(token: &Security) -> (Proc, String) {
    common::start_scheduler_with(&[(TOKEN_ENV, token.token().unwrap())])
}

fn start_sim_worker(addr: &str, token: &Security) -> Proc {
    common::start_sim_worker_with(addr, "w1", &[(TOKEN_ENV, token.token().unwrap())])
}

fn connect(addr: &str, security: &Security) -> Result<ClientCore, String> {
    ClientCore::connect(addr, "test", Duration::from_secs(5), security).map_err(|e| e.to_string())
}

fn worker_address(c: &ClientCore) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(w) = c.info().ok().and_then(|i| i.workers.into_iter().next()) {
            return w.address;
        }
        assert!(Instant::now() < deadline, "the worker did not join");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Open a raw connection, send `Hello` as `role` and read the server's
/// first answer; the socket halves come back for more.
async fn raw_hello(
    addr: &str,
    role: Role,
) -> (Handshake, FrameReader<tokio::net::tcp::OwnedReadHalf>, FrameWriter<tokio::net::tcp::OwnedWriteHalf>) {
    let s = tokio::net::TcpStream::connect(hostport(addr)).await.unwrap();
    let (r, w) = s.into_split();
    let (mut r, mut w) = (FrameReader::new(r), FrameWriter::new(w));
    w.write_magic().await.unwrap();
    let hello = Handshake::Hello { protocol: PROTOCOL_VERSION, role, name: "intruder".into(), nonce: vec![7; 16] };
    w.write_one(hello).await.unwrap();
    let first: Vec<Envelope<Handshake>> = r.read_batch().await.unwrap();
    (first.into_iter().next().unwrap().msg, r, w)
}

/// After sending `what` in place of a proof, the server closes the
/// connection without acting on it.
async fn refused_after<M: serde::Serialize>(
    mut r: FrameReader<tokio::net::tcp::OwnedReadHalf>,
    mut w: FrameWriter<tokio::net::tcp::OwnedWriteHalf>,
    what: M,
) {
    w.write_one(what).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), r.read_batch::<Handshake>()).await.expect("an answer");
    match answer {
        Ok(batch) => assert!(
            matches!(&batch[0].msg, Handshake::Refused { reason } if reason.contains("credential")),
            "{:?}",
            batch[0].msg
        ),
        Err(e) => panic!("expected a refusal, got {e}"),
    }
    assert!(r.read_batch::<Handshake>().await.is_err(), "the connection stays open");
}

#[test]
fn only_holders_of_the_cluster_token_get_in() {
    let token = Security::generate().unwrap();
    let (mut sched, addr) = start_scheduler(&token);
    let _w = start_sim_worker(&addr, &token);

    // The token holder computes.
    let good = connect(&addr, &token).expect("the token holder connects");
    let worker = worker_address(&good);

    // No token, another cluster's token: refused with errors that say so.
    let none = connect(&addr, &Security::open()).err().expect("refused without a token");
    assert!(none.contains("requires this cluster's credential"), "{none}");
    let other = Security::generate().unwrap();
    let wrong = connect(&addr, &other).err().expect("refused with another cluster's token");
    assert!(wrong.contains("another cluster"), "{wrong}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // A raw client that skips the proof and asks the scheduler to shut down.
        let (first, r, w) = raw_hello(&addr, Role::Client).await;
        assert!(matches!(first, Handshake::Challenge { .. }), "{first:?}");
        refused_after(r, w, FromClient::Shutdown).await;
        // A raw client that answers with a made-up proof.
        let (_, r, w) = raw_hello(&addr, Role::Client).await;
        refused_after(r, w, Handshake::Proof { proof: vec![0; 32] }).await;
        // A raw peer at the worker's data port that asks it to run a function.
        let (first, r, w) = raw_hello(&worker, Role::Peer).await;
        assert!(matches!(first, Handshake::Challenge { .. }), "{first:?}");
        let run = DataRequest::RunFunction { id: 1, function: cluster::protocol::Blob::Inline(Default::default()) };
        refused_after(r, w, run).await;
    });

    // A worker without the token cannot join; the cluster keeps its one worker.
    let mut intruder = Command::new(BIN)
        .args(["sim-worker", &addr, "--name", "intruder"])
        .env_remove(TOKEN_ENV)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = intruder.wait().unwrap();
    let mut err = String::new();
    intruder.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(!status.success(), "a worker without the token must fail");
    assert!(err.contains("credential"), "{err}");

    // Nothing above stopped or changed the cluster.
    assert!(sched.0.try_wait().unwrap().is_none(), "the scheduler is still running");
    let info = good.info().unwrap();
    assert_eq!(info.workers.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(), ["w1"]);
    let c2 = connect(&addr, &token).expect("still serving token holders");
    assert!(c2.info().is_ok());
}

#[test]
fn a_peer_cannot_make_the_server_wait_for_a_large_frame_before_the_handshake() {
    let token = Security::generate().unwrap();
    let (_sched, addr) = start_scheduler(&token);
    let mut s = TcpStream::connect(hostport(&addr)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&MAGIC).unwrap();
    // One frame declared at 1 GiB; its bytes never come.
    s.write_all(&1u32.to_le_bytes()).unwrap();
    s.write_all(&(1u64 << 30).to_le_bytes()).unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 64];
    // The server closes at once instead of waiting (or reserving) for it.
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "expected the connection to close");
    assert!(t.elapsed() < Duration::from_secs(3), "closed after {:?}", t.elapsed());
    assert!(connect(&addr, &token).is_ok());
}
