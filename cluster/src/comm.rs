//! Framed TCP transport: envelopes on the wire, the handshake, and the
//! batching writer task.
//!
//! Wire format of one batch: `u32 nframes`, then `nframes` x `u64` frame
//! lengths (little endian), then the frames. Frame 0 is msgpack of
//! `[(message, n_extra_frames), ...]`; each message's extra frames follow in
//! order. A connection starts with [`MAGIC`] from the side that opened it,
//! then a [`Handshake::Hello`] batch answered by [`Handshake::Welcome`] or
//! [`Handshake::Refused`]. After that each side writes the message type of
//! its direction (see [`crate::protocol`]); the types are generic here.

use std::io::IoSlice;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::protocol::{DataReply, DataRequest, Envelope, Handshake, Role, MAGIC, PROTOCOL_VERSION};

/// Largest number of frames one batch may carry.
pub const MAX_FRAMES: u32 = 1 << 20;
/// Largest single frame accepted (16 GiB).
pub const MAX_FRAME_BYTES: u64 = 1 << 34;
/// Largest msgpack frame 0 accepted (1 GiB).
pub const MAX_HEADER_FRAME_BYTES: u64 = 1 << 30;
/// Frames at least this large get their own allocation on receipt (so they can
/// be handed to Python as writable buffers).
const OWN_ALLOCATION: u64 = 64 * 1024;
/// A batch the writer builds stops growing at this many messages.
const MAX_BATCH: usize = 4096;

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed by peer")]
    Closed,
    #[error("peer does not speak the dask-rs protocol (bad magic bytes {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("cannot decode message: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    #[error("cannot encode message: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("peer refused the connection: {0}")]
    Refused(String),
    /// The connection broke during the handshake (a stranger, or a server
    /// going down); worth retrying, unlike a refusal.
    #[error("peer refused the connection: {0}")]
    Handshake(String),
    #[error("protocol version mismatch: peer speaks version {theirs}, we speak version {ours}")]
    Version { ours: u32, theirs: u32 },
    #[error("timed out after {0:?} connecting to {1}")]
    Timeout(Duration, String),
    #[error("invalid address {0:?}: expected tcp://HOST:PORT")]
    Address(String),
}

/// Strip the `tcp://` scheme from an address.
pub fn parse_address(addr: &str) -> Result<String, CommError> {
    let rest = addr.strip_prefix("tcp://").unwrap_or(addr);
    if rest.is_empty() || !rest.contains(':') || rest.contains('/') {
        return Err(CommError::Address(addr.to_string()));
    }
    Ok(rest.to_string())
}

/// Whether listening on `host` means every interface (`0.0.0.0`, `::`,
/// `[::]`, or empty): then the listening address is no address to connect
/// to, and whoever advertises it must pick one.
pub fn is_wildcard_host(host: &str) -> bool {
    matches!(host, "" | "0.0.0.0" | "::" | "[::]")
}

/// Whether `tcp://HOST:PORT` has a wildcard host (see [`is_wildcard_host`]).
pub fn is_wildcard_address(address: &str) -> bool {
    let hostport = address.strip_prefix("tcp://").unwrap_or(address);
    let host = match hostport.rfind(':') {
        Some(i) => &hostport[..i],
        None => hostport,
    };
    is_wildcard_host(host)
}

/// Reads batches of messages from a socket.
pub struct FrameReader<R> {
    inner: BufReader<R>,
    /// Bytes read so far (for byte counters).
    pub bytes_read: u64,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(r: R) -> Self {
        FrameReader { inner: BufReader::with_capacity(64 * 1024, r), bytes_read: 0 }
    }

    /// Read the 4 magic bytes a connection starts with.
    pub async fn read_magic(&mut self) -> Result<(), CommError> {
        let mut m = [0u8; 4];
        read_exact_or_closed(&mut self.inner, &mut m).await?;
        if m != MAGIC {
            return Err(CommError::BadMagic(m));
        }
        Ok(())
    }

    /// Read one batch; `Err(Closed)` on a clean end of stream.
    pub async fn read_batch<M: DeserializeOwned>(&mut self) -> Result<Vec<Envelope<M>>, CommError> {
        let mut n = [0u8; 4];
        read_exact_or_closed(&mut self.inner, &mut n).await?;
        let nframes = u32::from_le_bytes(n);
        if nframes == 0 || nframes > MAX_FRAMES {
            return Err(CommError::Malformed(format!("frame count {nframes}")));
        }
        let mut lens = Vec::with_capacity(nframes as usize);
        for i in 0..nframes {
            let mut l = [0u8; 8];
            self.inner.read_exact(&mut l).await?;
            let len = u64::from_le_bytes(l);
            let cap = if i == 0 { MAX_HEADER_FRAME_BYTES } else { MAX_FRAME_BYTES };
            if len > cap {
                return Err(CommError::Malformed(format!("frame {i} of {len} bytes exceeds {cap}")));
            }
            lens.push(len);
        }
        let small: u64 = lens.iter().filter(|&&l| l < OWN_ALLOCATION).sum();
        let mut small_buf = BytesMut::with_capacity(small as usize);
        let mut frames = Vec::with_capacity(lens.len());
        for &len in &lens {
            let frame = if len < OWN_ALLOCATION {
                read_into(&mut self.inner, &mut small_buf, len as usize).await?;
                small_buf.split_to(len as usize).freeze()
            } else {
                let mut own = BytesMut::with_capacity(len as usize);
                read_into(&mut self.inner, &mut own, len as usize).await?;
                own.freeze()
            };
            frames.push(frame);
        }
        self.bytes_read += 4 + 8 * nframes as u64 + lens.iter().sum::<u64>();
        split_batch(frames)
    }
}

async fn read_exact_or_closed<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), CommError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(CommError::Closed),
        Err(e) => Err(e.into()),
    }
}

async fn read_into<R: AsyncRead + Unpin>(r: &mut R, buf: &mut BytesMut, len: usize) -> Result<(), CommError> {
    let target = buf.len() + len;
    buf.reserve(len);
    while buf.len() < target {
        let want = target - buf.len();
        let mut limited = (&mut *r).take(want as u64);
        let got = limited.read_buf(buf).await?;
        if got == 0 {
            return Err(CommError::Closed);
        }
    }
    Ok(())
}

/// Split a batch's frames into envelopes.
fn split_batch<M: DeserializeOwned>(frames: Vec<Bytes>) -> Result<Vec<Envelope<M>>, CommError> {
    let mut it = frames.into_iter();
    let head = it.next().ok_or_else(|| CommError::Malformed("empty batch".into()))?;
    let msgs: Vec<(M, u32)> = rmp_serde::from_slice(&head)?;
    let mut out = Vec::with_capacity(msgs.len());
    for (msg, n) in msgs {
        let mut frames = Vec::with_capacity(n as usize);
        for _ in 0..n {
            frames.push(it.next().ok_or_else(|| CommError::Malformed("message refers to missing frames".into()))?);
        }
        out.push(Envelope { msg, frames });
    }
    if it.next().is_some() {
        return Err(CommError::Malformed("unclaimed frames after messages".into()));
    }
    Ok(out)
}

/// Encode a batch into its header bytes (counts, lengths, frame 0 and small
/// frames) and the large frames to write after it without copying.
pub fn encode_batch<M: Serialize>(batch: &[Envelope<M>]) -> Result<(Vec<u8>, Vec<Bytes>), CommError> {
    let head: Vec<(&M, u32)> = batch.iter().map(|e| (&e.msg, e.frames.len() as u32)).collect();
    let frame0 = rmp_serde::to_vec(&head)?;
    let extra: Vec<&Bytes> = batch.iter().flat_map(|e| e.frames.iter()).collect();
    let nframes = 1 + extra.len();
    let mut buf = Vec::with_capacity(4 + 8 * nframes + frame0.len());
    buf.extend_from_slice(&(nframes as u32).to_le_bytes());
    buf.extend_from_slice(&(frame0.len() as u64).to_le_bytes());
    for f in &extra {
        buf.extend_from_slice(&(f.len() as u64).to_le_bytes());
    }
    buf.extend_from_slice(&frame0);
    // Small frames ride along in the header write; large ones follow as-is.
    let mut large = Vec::new();
    for f in extra {
        if large.is_empty() && (f.len() as u64) < OWN_ALLOCATION {
            buf.extend_from_slice(f);
        } else {
            large.push(f.clone());
        }
    }
    Ok((buf, large))
}

/// Writes batches of messages to a socket.
pub struct FrameWriter<W> {
    inner: W,
    /// Bytes written so far (for byte counters).
    pub bytes_written: u64,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(w: W) -> Self {
        FrameWriter { inner: w, bytes_written: 0 }
    }

    pub async fn write_magic(&mut self) -> Result<(), CommError> {
        self.inner.write_all(&MAGIC).await?;
        Ok(())
    }

    /// Write one batch and flush it.
    pub async fn write_batch<M: Serialize>(&mut self, batch: &[Envelope<M>]) -> Result<(), CommError> {
        let (head, large) = encode_batch(batch)?;
        self.bytes_written += head.len() as u64 + large.iter().map(|b| b.len() as u64).sum::<u64>();
        if large.is_empty() {
            self.inner.write_all(&head).await?;
        } else {
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(1 + large.len());
            slices.push(IoSlice::new(&head));
            slices.extend(large.iter().map(|b| IoSlice::new(b)));
            write_all_vectored(&mut self.inner, &mut slices).await?;
        }
        self.inner.flush().await?;
        Ok(())
    }

    pub async fn write_one<M: Serialize>(&mut self, msg: M) -> Result<(), CommError> {
        self.write_batch(&[Envelope::new(msg)]).await
    }

    pub async fn shutdown(&mut self) {
        let _ = self.inner.shutdown().await;
    }
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(w: &mut W, mut slices: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    while !slices.is_empty() {
        let n = w.write_vectored(slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

/// A connected, handshaken peer: reader and writer halves.
pub struct Connection {
    pub reader: FrameReader<OwnedReadHalf>,
    pub writer: FrameWriter<OwnedWriteHalf>,
    /// The name the other side gave in the handshake.
    pub peer_name: String,
}

fn prepare(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
}

/// Open a connection to `addr`, speak the handshake as `role`, and wait for
/// the peer's welcome. Fails within `timeout` if nothing answers.
pub async fn connect(addr: &str, role: Role, name: &str, timeout: Duration) -> Result<Connection, CommError> {
    let target = parse_address(addr)?;
    let fut = async {
        let stream = TcpStream::connect(&target).await?;
        prepare(&stream);
        let (r, w) = stream.into_split();
        let mut reader = FrameReader::new(r);
        let mut writer = FrameWriter::new(w);
        let handshake = async {
            writer.write_magic().await?;
            writer.write_one(Handshake::Hello { protocol: PROTOCOL_VERSION, role, name: name.to_string() }).await?;
            reader.read_batch::<Handshake>().await
        };
        let reply = handshake.await.map_err(|e| match e {
            CommError::Refused(_) | CommError::Version { .. } => e,
            other => CommError::Handshake(format!(
                "not a dask-rs server, or it closed the connection during the handshake ({other})"
            )),
        })?;
        match reply.into_iter().next().map(|e| e.msg) {
            Some(Handshake::Welcome { server, .. }) => Ok(Connection { reader, writer, peer_name: server }),
            Some(Handshake::Refused { reason }) => Err(CommError::Refused(reason)),
            other => Err(CommError::Refused(format!("not a dask-rs server (unexpected reply {other:?})"))),
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(CommError::Timeout(timeout, addr.to_string())),
    }
}

/// Server side of the handshake on an accepted stream: checks magic,
/// protocol version and that the peer's role is one of `serves` (else
/// refuses with `wrong_role`'s text), answers, and returns the peer's role.
pub async fn accept(
    stream: TcpStream,
    server_name: &str,
    serves: &[Role],
    wrong_role: impl Fn(Role) -> String,
) -> Result<(Connection, Role), CommError> {
    prepare(&stream);
    let (r, w) = stream.into_split();
    let mut reader = FrameReader::new(r);
    let mut writer = FrameWriter::new(w);
    let hello = async {
        reader.read_magic().await?;
        let batch = reader.read_batch::<Handshake>().await?;
        match batch.into_iter().next().map(|e| e.msg) {
            Some(Handshake::Hello { protocol, role, name }) => Ok((protocol, role, name)),
            other => Err(CommError::Malformed(format!("expected Hello, got {other:?}"))),
        }
    };
    let (protocol, role, name) = match tokio::time::timeout(Duration::from_secs(10), hello).await {
        Ok(r) => r?,
        Err(_) => return Err(CommError::Malformed("no handshake within 10 s".into())),
    };
    let refusal = if protocol != PROTOCOL_VERSION {
        Some(CommError::Version { ours: PROTOCOL_VERSION, theirs: protocol })
    } else if !serves.contains(&role) {
        Some(CommError::Refused(wrong_role(role)))
    } else {
        None
    };
    if let Some(err) = refusal {
        let reason = match &err {
            CommError::Refused(r) => r.clone(),
            other => other.to_string(),
        };
        let _ = writer.write_one(Handshake::Refused { reason }).await;
        writer.shutdown().await;
        return Err(err);
    }
    writer.write_one(Handshake::Welcome { protocol: PROTOCOL_VERSION, server: server_name.to_string() }).await?;
    Ok((Connection { reader, writer, peer_name: name }, role))
}

/// Connect like [`connect`], retrying while nothing listens at `addr` (a
/// scheduler restarting) until `patience` has passed. A peer that answers
/// and refuses is not retried.
pub async fn connect_retrying(addr: &str, role: Role, name: &str, patience: Duration) -> Result<Connection, CommError> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match connect(addr, role, name, left.clamp(Duration::from_millis(100), Duration::from_secs(5))).await {
            Ok(c) => return Ok(c),
            Err(e @ (CommError::Refused(_) | CommError::Version { .. } | CommError::Address(_))) => return Err(e),
            Err(e) => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(e);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Sender half of a writer task (see [`spawn_writer`]); cloning is cheap.
pub type Outbox<M> = mpsc::UnboundedSender<Envelope<M>>;

/// Spawn a task that writes everything sent to the returned [`Outbox`],
/// batching whatever has queued up while the previous write was in flight.
/// An idle connection writes each message at once: no timers, no latency.
pub fn spawn_writer<M: Serialize + Send + Sync + 'static>(
    writer: FrameWriter<OwnedWriteHalf>,
) -> (Outbox<M>, tokio::task::JoinHandle<u64>) {
    spawn_counting_writer(writer, None)
}

/// As [`spawn_writer`], adding every byte written to `counter` as it goes.
pub fn spawn_counting_writer<M: Serialize + Send + Sync + 'static>(
    mut writer: FrameWriter<OwnedWriteHalf>,
    counter: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
) -> (Outbox<M>, tokio::task::JoinHandle<u64>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Envelope<M>>();
    let handle = tokio::spawn(async move {
        let mut batch = Vec::with_capacity(64);
        while let Some(first) = rx.recv().await {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let before = writer.bytes_written;
            if let Err(e) = writer.write_batch(&batch).await {
                tracing::debug!("writer stopped: {e}");
                break;
            }
            if let Some(c) = &counter {
                c.fetch_add(writer.bytes_written - before, std::sync::atomic::Ordering::Relaxed);
            }
            batch.clear();
        }
        writer.shutdown().await;
        writer.bytes_written
    });
    (tx, handle)
}

/// Reusable request/response connections to data servers (workers), keyed
/// by address. One request is in flight per connection at a time.
pub struct ConnectionPool {
    role: Role,
    name: String,
    timeout: Duration,
    idle: std::sync::Mutex<rustc_hash::FxHashMap<String, Vec<Connection>>>,
    /// Bytes received in replies.
    pub bytes_in: std::sync::atomic::AtomicU64,
    /// Bytes sent in requests.
    pub bytes_out: std::sync::atomic::AtomicU64,
}

impl ConnectionPool {
    pub fn new(role: Role, name: &str, timeout: Duration) -> Self {
        ConnectionPool {
            role,
            name: name.to_string(),
            timeout,
            idle: Default::default(),
            bytes_in: Default::default(),
            bytes_out: Default::default(),
        }
    }

    /// Send `request` to `addr` and return the reply.
    pub async fn request(&self, addr: &str, request: Envelope<DataRequest>) -> Result<Envelope<DataReply>, CommError> {
        let pooled = self.idle.lock().expect("pool lock").get_mut(addr).and_then(|v| v.pop());
        let mut conn = match pooled {
            Some(c) => c,
            None => connect(addr, self.role, &self.name, self.timeout).await?,
        };
        let (w0, r0) = (conn.writer.bytes_written, conn.reader.bytes_read);
        conn.writer.write_batch(std::slice::from_ref(&request)).await?;
        let mut reply = conn.reader.read_batch().await?;
        use std::sync::atomic::Ordering::Relaxed;
        self.bytes_out.fetch_add(conn.writer.bytes_written - w0, Relaxed);
        self.bytes_in.fetch_add(conn.reader.bytes_read - r0, Relaxed);
        if reply.len() != 1 {
            return Err(CommError::Malformed(format!("expected one reply, got {}", reply.len())));
        }
        self.idle.lock().expect("pool lock").entry(addr.to_string()).or_default().push(conn);
        Ok(reply.pop().expect("one"))
    }

    /// Drop idle connections to `addr` (after it failed).
    pub fn forget(&self, addr: &str) {
        self.idle.lock().expect("pool lock").remove(addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Blob;

    #[tokio::test]
    async fn batch_roundtrip_with_frames() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut w = FrameWriter::new(a);
        let mut r = FrameReader::new(b);
        let mut frames = Vec::new();
        let big = Bytes::from(vec![3u8; 200_000]);
        let blob = Blob::new(big.clone(), &mut frames);
        let e1 = Envelope { msg: DataRequest::PutData { id: 1, items: vec![("x".into(), vec![blob])] }, frames };
        let e2 = Envelope::new(DataRequest::GetData { id: 2, keys: vec!["a".into(), "b".into()] });
        w.write_batch(&[e1.clone(), e2.clone()]).await.unwrap();
        let got = r.read_batch::<DataRequest>().await.unwrap();
        assert_eq!(got, vec![e1, e2]);
        // Large frames get their own allocation, uniquely owned (writable).
        let mut got = got;
        let frame = got.remove(0).frames.remove(0);
        assert!(frame.try_into_mut().is_ok());
    }

    #[tokio::test]
    async fn rejects_garbage() {
        let (mut a, b) = tokio::io::duplex(1024);
        let mut r = FrameReader::new(b);
        a.write_all(&[0xff; 64]).await.unwrap();
        assert!(matches!(r.read_batch::<DataRequest>().await, Err(CommError::Malformed(_))));
    }

    #[test]
    fn wildcard_hosts() {
        for a in ["tcp://0.0.0.0:8786", "tcp://[::]:1", "tcp://:::8786", "tcp://:9"] {
            assert!(is_wildcard_address(a), "{a}");
        }
        for a in ["tcp://127.0.0.1:8786", "tcp://node1:1", "tcp://[::1]:2"] {
            assert!(!is_wildcard_address(a), "{a}");
        }
    }

    #[test]
    fn addresses() {
        assert_eq!(parse_address("tcp://127.0.0.1:8786").unwrap(), "127.0.0.1:8786");
        assert!(parse_address("tcp://").is_err());
        assert!(parse_address("nonsense").is_err());
    }
}
