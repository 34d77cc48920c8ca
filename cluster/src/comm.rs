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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::protocol::{brief, DataReply, DataRequest, Envelope, Handshake, Role, MAGIC, PROTOCOL_VERSION};
use crate::security::{Security, Side, TOKEN_ENV};

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
    /// A peer that did not prove it holds the cluster's credential.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    #[error("protocol version mismatch: peer speaks version {theirs}, we speak version {ours}")]
    Version { ours: u32, theirs: u32 },
    /// A peer that sent nothing for this long in the middle of an exchange
    /// (a stopped process, a host gone without closing).
    #[error("no data from the peer for {0:?}: it is stopped, overloaded or unreachable")]
    Idle(Duration),
    #[error("timed out after {0:?} connecting to {1}")]
    Timeout(Duration, String),
    #[error("invalid address {0:?}: expected tcp://HOST:PORT or tls://HOST:PORT")]
    Address(String),
}

/// Strip the `tcp://` scheme from an address.
pub fn parse_address(addr: &str) -> Result<String, CommError> {
    let rest = strip_scheme(addr);
    if rest.is_empty() || !rest.contains(':') || rest.contains('/') {
        return Err(CommError::Address(addr.to_string()));
    }
    Ok(rest.to_string())
}

/// `HOST:PORT` of `tcp://HOST:PORT`, `tls://HOST:PORT` or `HOST:PORT`.
pub fn strip_scheme(addr: &str) -> &str {
    addr.strip_prefix("tcp://").or_else(|| addr.strip_prefix("tls://")).unwrap_or(addr)
}

/// Whether `addr` names a TLS endpoint (`tls://`).
pub fn is_tls_address(addr: &str) -> bool {
    addr.starts_with("tls://")
}

/// Whether listening on `host` means every interface (`0.0.0.0`, `::`,
/// `[::]`, or empty): then the listening address is no address to connect
/// to, and whoever advertises it must pick one.
pub fn is_wildcard_host(host: &str) -> bool {
    matches!(host, "" | "0.0.0.0" | "::" | "[::]")
}

/// Whether `tcp://HOST:PORT` has a wildcard host (see [`is_wildcard_host`]).
pub fn is_wildcard_address(address: &str) -> bool {
    let hostport = strip_scheme(address);
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
    /// Give up on a batch when nothing arrives for this long.
    idle: Option<Duration>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(r: R) -> Self {
        FrameReader { inner: BufReader::with_capacity(64 * 1024, r), bytes_read: 0, idle: None }
    }

    /// Fail a read with [`CommError::Idle`] when no byte arrives for
    /// `idle` (`None`: wait as long as it takes, for long-lived links whose
    /// peer may rightly stay quiet).
    pub fn set_idle_timeout(&mut self, idle: Option<Duration>) {
        self.idle = idle;
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
        self.read_batch_within(Limits::CONNECTED).await
    }

    /// Read one batch that must stay within `limits`. Memory is reserved as
    /// bytes arrive, never up front for what the peer merely declares.
    pub async fn read_batch_within<M: DeserializeOwned>(
        &mut self,
        limits: Limits,
    ) -> Result<Vec<Envelope<M>>, CommError> {
        let idle = self.idle;
        let mut n = [0u8; 4];
        within(idle, read_exact_or_closed(&mut self.inner, &mut n)).await?;
        let nframes = u32::from_le_bytes(n);
        if nframes == 0 || nframes > limits.frames {
            return Err(CommError::Malformed(format!("frame count {nframes} (at most {} here)", limits.frames)));
        }
        let mut lens = Vec::with_capacity((nframes as usize).min(64));
        let mut total: u64 = 0;
        for i in 0..nframes {
            let mut l = [0u8; 8];
            within(idle, async { Ok(self.inner.read_exact(&mut l).await?) }).await?;
            let len = u64::from_le_bytes(l);
            let cap = if i == 0 { limits.header_bytes } else { limits.frame_bytes };
            if len > cap {
                return Err(CommError::Malformed(format!("frame {i} of {len} bytes exceeds {cap}")));
            }
            total = total.saturating_add(len);
            if total > limits.batch_bytes {
                return Err(CommError::Malformed(format!("batch of more than {} bytes", limits.batch_bytes)));
            }
            lens.push(len);
        }
        let small: u64 = lens.iter().filter(|&&l| l < OWN_ALLOCATION).sum();
        let mut small_buf = BytesMut::with_capacity(small.min(UPFRONT) as usize);
        let mut frames = Vec::with_capacity(lens.len());
        for &len in &lens {
            let frame = if len < OWN_ALLOCATION {
                read_into(&mut self.inner, &mut small_buf, len as usize, idle).await?;
                small_buf.split_to(len as usize).freeze()
            } else {
                let mut own = BytesMut::new();
                read_into(&mut self.inner, &mut own, len as usize, idle).await?;
                own.freeze()
            };
            frames.push(frame);
        }
        self.bytes_read += 4 + 8 * nframes as u64 + total;
        split_batch(frames)
    }
}

/// Bounds on one batch read from a peer.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub frames: u32,
    pub header_bytes: u64,
    pub frame_bytes: u64,
    pub batch_bytes: u64,
}

impl Limits {
    /// Before the handshake is done: a peer that has not proved anything
    /// may send a few small frames and nothing else.
    pub const HANDSHAKE: Limits = Limits { frames: 4, header_bytes: 4096, frame_bytes: 4096, batch_bytes: 16384 };
    /// On an accepted connection.
    pub const CONNECTED: Limits = Limits {
        frames: MAX_FRAMES,
        header_bytes: MAX_HEADER_FRAME_BYTES,
        frame_bytes: MAX_FRAME_BYTES,
        batch_bytes: MAX_FRAME_BYTES,
    };
}

/// The most memory reserved for a frame before any of its bytes arrived;
/// beyond it, buffers grow with what arrives (doubling), until a frame has sent
/// that much; then the rest is reserved at once ([`reserve_rest`]).
const UPFRONT: u64 = 1 << 20;

async fn read_exact_or_closed<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), CommError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(CommError::Closed),
        Err(e) => Err(e.into()),
    }
}

/// `fut`, failing with [`CommError::Idle`] if it takes longer than `idle`.
async fn within<T>(
    idle: Option<Duration>,
    fut: impl std::future::Future<Output = Result<T, CommError>>,
) -> Result<T, CommError> {
    match idle {
        None => fut.await,
        Some(d) => tokio::time::timeout(d, fut).await.unwrap_or(Err(CommError::Idle(d))),
    }
}

async fn read_into<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    len: usize,
    idle: Option<Duration>,
) -> Result<(), CommError> {
    let start = buf.len();
    let target = start + len;
    while buf.len() < target {
        let want = target - buf.len();
        if buf.capacity() == buf.len() {
            let got = buf.len() - start;
            if got < UPFRONT as usize || !reserve_rest(buf, want) {
                // Reserve what already arrived again (at least UPFRONT), not
                // what the peer declared.
                buf.reserve(want.min(got.max(UPFRONT as usize)));
            }
        }
        let mut limited = (&mut *r).take(want as u64);
        let got = within(idle, async { Ok(limited.read_buf(buf).await?) }).await?;
        if got == 0 {
            return Err(CommError::Closed);
        }
    }
    Ok(())
}

/// Once a frame's first [`UPFRONT`] bytes arrived, make room for the rest
/// at once rather than by doubling (each doubling copies what arrived and
/// touches fresh pages). This reserves address space only: the pages are
/// touched, and count in the process's memory, as bytes arrive. When the
/// allocator refuses (a huge declared length), `false`, and the buffer
/// grows as before.
fn reserve_rest(buf: &mut BytesMut, want: usize) -> bool {
    let mut v: Vec<u8> = Vec::new();
    if v.try_reserve_exact(buf.len() + want).is_err() {
        return false;
    }
    v.extend_from_slice(buf);
    // Unique, so the conversion keeps the allocation (and its capacity).
    *buf = BytesMut::from(Bytes::from(v));
    buf.capacity() >= buf.len() + want
}

/// Split a batch's frames into envelopes.
fn split_batch<M: DeserializeOwned>(frames: Vec<Bytes>) -> Result<Vec<Envelope<M>>, CommError> {
    let mut it = frames.into_iter();
    let head = it.next().ok_or_else(|| CommError::Malformed("empty batch".into()))?;
    let msgs: Vec<(M, u32)> = rmp_serde::from_slice(&head)?;
    let mut out = Vec::with_capacity(msgs.len());
    for (msg, n) in msgs {
        // The count is the peer's word: check it against the frames that
        // arrived before reserving anything for it.
        if n as usize > it.len() {
            return Err(CommError::Malformed("message refers to missing frames".into()));
        }
        out.push(Envelope { msg, frames: it.by_ref().take(n as usize).collect() });
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

/// The reading half of a connection, plain or TLS.
pub type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
/// The writing half of a connection, plain or TLS.
pub type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

fn plain_halves(stream: TcpStream) -> (ReadHalf, WriteHalf) {
    let (r, w) = stream.into_split();
    (Box::new(r), Box::new(w))
}

/// The socket under a TLS session: rustls reads records 4 KiB at a time,
/// so a buffer beneath it turns those reads into a few large ones.
fn tls_io(stream: TcpStream) -> BufReader<TcpStream> {
    BufReader::with_capacity(256 * 1024, stream)
}

fn tls_halves<S: AsyncRead + AsyncWrite + Send + 'static>(stream: S) -> (ReadHalf, WriteHalf) {
    let (r, w) = tokio::io::split(stream);
    (Box::new(r), Box::new(w))
}

/// A connected, handshaken peer: reader and writer halves.
pub struct Connection {
    pub reader: FrameReader<ReadHalf>,
    pub writer: FrameWriter<WriteHalf>,
    /// The name the other side gave in the handshake.
    pub peer_name: String,
}

/// TCP gives up on a connection whose sent data stays unacknowledged this
/// long, and keepalive probes find a silent dead host in about as long.
pub const TCP_TIMEOUT: Duration = Duration::from_secs(30);

/// Data exchanges (fetching results, storing data) fail when the peer sends
/// nothing for this long (distributed's `comm.timeouts.tcp`).
pub const EXCHANGE_IDLE: Duration = Duration::from_secs(30);

fn prepare(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let sock = socket2::SockRef::from(stream);
    let probes = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(2))
        .with_retries(5);
    let _ = sock.set_tcp_keepalive(&probes);
    let _ = sock.set_tcp_user_timeout(Some(TCP_TIMEOUT));
}

/// How long a peer that opened a connection has to complete the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Open a connection to `addr`, speak the handshake as `role` (proving
/// `security`'s token and checking the server's proof when there is one),
/// and wait for the peer's welcome. Fails within `timeout` if nothing answers.
pub async fn connect(
    addr: &str,
    role: Role,
    name: &str,
    timeout: Duration,
    security: &Security,
) -> Result<Connection, CommError> {
    let target = parse_address(addr)?;
    let tls = match (is_tls_address(addr), security.tls()) {
        (true, Some(tls)) => Some(tls.connector()),
        (true, None) => {
            return Err(CommError::Refused(format!(
                "{addr} speaks TLS and no certificates were given (--tls-ca-file, --tls-cert and --tls-key, \
                 Security(tls_ca_file=..., tls_client_cert=..., tls_client_key=...), or ${})",
                crate::tls::CA_ENV
            )))
        }
        (false, _) if security.requires_encryption() => {
            return Err(CommError::Refused(format!(
                "{addr} is not encrypted and this process requires encryption (use the tls:// address)"
            )))
        }
        (false, _) => None,
    };
    let fut = async {
        let stream = TcpStream::connect(&target).await?;
        prepare(&stream);
        let (r, w) = match tls {
            Some(connector) => {
                let stream = connector.connect(crate::tls::Tls::server_name(), tls_io(stream)).await.map_err(|e| {
                    CommError::Refused(format!("TLS handshake with {addr} failed: {e} (is it this cluster's?)"))
                })?;
                tls_halves(stream)
            }
            None => plain_halves(stream),
        };
        let mut reader = FrameReader::new(r);
        let mut writer = FrameWriter::new(w);
        let nonce = Security::nonce();
        let hello = Handshake::Hello { protocol: PROTOCOL_VERSION, role, name: name.to_string(), nonce: nonce.clone() };
        let handshake = async {
            writer.write_magic().await?;
            writer.write_one(hello).await?;
            let mut reply = first_message(reader.read_batch_within::<Handshake>(Limits::HANDSHAKE).await?);
            if let Some(Handshake::Challenge { nonce: server_nonce, proof }) = &reply {
                if !security.requires_token() {
                    return Err(CommError::Refused(format!(
                        "{addr} requires this cluster's credential and none was given (connect with \
                         Client(\"NAME\") to a cluster started by dask-ctl up, Client(cluster) to a \
                         LocalCluster, or set ${TOKEN_ENV})"
                    )));
                }
                if !security.verify(Side::Server, &nonce, server_nonce, proof) {
                    return Err(CommError::Refused(format!(
                        "{addr} belongs to another cluster: it does not hold this cluster's token"
                    )));
                }
                let proof = security.prove(Side::Client, &nonce, server_nonce).expect("a token");
                writer.write_one(Handshake::Proof { proof }).await?;
                reply = first_message(reader.read_batch_within::<Handshake>(Limits::HANDSHAKE).await?);
            } else if security.requires_token() && matches!(reply, Some(Handshake::Welcome { .. })) {
                return Err(CommError::Refused(format!(
                    "{addr} did not prove it holds this cluster's token: it is not this cluster's \
                     scheduler or worker (another process may have taken the port)"
                )));
            }
            Ok(reply)
        };
        let reply = handshake.await.map_err(|e| match e {
            CommError::Refused(_) | CommError::Version { .. } => e,
            other if !is_tls_address(addr) => CommError::Handshake(format!(
                "not a dask-rs server, or it closed the connection during the handshake ({other}); \
                 if it speaks TLS, use its tls:// address"
            )),
            other => CommError::Handshake(format!(
                "not a dask-rs server, or it closed the connection during the handshake ({other})"
            )),
        })?;
        match reply {
            Some(Handshake::Welcome { server, .. }) => Ok(Connection { reader, writer, peer_name: server }),
            Some(Handshake::Refused { reason }) => Err(CommError::Refused(reason)),
            other => Err(CommError::Refused(format!("not a dask-rs server (unexpected reply {})", brief(&other)))),
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(CommError::Timeout(timeout, addr.to_string())),
    }
}

fn first_message(batch: Vec<Envelope<Handshake>>) -> Option<Handshake> {
    batch.into_iter().next().map(|e| e.msg)
}

/// Server side of the handshake on an accepted stream: checks magic,
/// protocol version, that the peer's role is one of `serves` (else refuses
/// with `wrong_role`'s text) and that it proves `security`'s token; answers,
/// and returns the peer's role. A peer gets [`HANDSHAKE_TIMEOUT`] and a few
/// small frames to do all that.
pub async fn accept(
    stream: TcpStream,
    server_name: &str,
    serves: &[Role],
    wrong_role: impl Fn(Role) -> String,
    security: &Security,
) -> Result<(Connection, Role), CommError> {
    prepare(&stream);
    let (r, w) = match security.tls() {
        Some(tls) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.acceptor().accept(tls_io(stream))).await {
            Ok(Ok(stream)) => tls_halves(stream),
            Ok(Err(e)) => return Err(CommError::Unauthenticated(format!("TLS handshake failed: {e}"))),
            Err(_) => return Err(CommError::Malformed(format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}"))),
        },
        None => plain_halves(stream),
    };
    let mut reader = FrameReader::new(r);
    let mut writer = FrameWriter::new(w);
    let handshake = async {
        reader.read_magic().await?;
        let (protocol, role, name, client_nonce) =
            match first_message(reader.read_batch_within::<Handshake>(Limits::HANDSHAKE).await?) {
                Some(Handshake::Hello { protocol, role, name, nonce }) => (protocol, role, name, nonce),
                other => return Err(CommError::Malformed(format!("expected Hello, got {}", brief(&other)))),
            };
        if protocol != PROTOCOL_VERSION {
            return Err(CommError::Version { ours: PROTOCOL_VERSION, theirs: protocol });
        }
        if !serves.contains(&role) {
            return Err(CommError::Refused(wrong_role(role)));
        }
        if security.requires_token() {
            let nonce = Security::nonce();
            let proof = security.prove(Side::Server, &client_nonce, &nonce).expect("a token");
            writer.write_one(Handshake::Challenge { nonce: nonce.clone(), proof }).await?;
            // Anything but a proof (another message, bytes that do not
            // decode) counts as a failed proof and is answered as one.
            let answer = match reader.read_batch_within::<Handshake>(Limits::HANDSHAKE).await {
                Ok(batch) => first_message(batch),
                Err(CommError::Decode(_) | CommError::Malformed(_)) => None,
                Err(e) => return Err(e),
            };
            let proved = matches!(&answer, Some(Handshake::Proof { proof })
                if security.verify(Side::Client, &client_nonce, &nonce, proof));
            if !proved {
                return Err(CommError::Unauthenticated(format!(
                    "{role:?} {name:?} did not prove it holds this cluster's token"
                )));
            }
        }
        Ok((role, name))
    };
    let outcome = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(r) => r,
        Err(_) => Err(CommError::Malformed(format!("no handshake within {HANDSHAKE_TIMEOUT:?}"))),
    };
    let (role, name) = match outcome {
        Ok(ok) => ok,
        Err(err) => {
            let reason = match &err {
                CommError::Refused(r) => Some(r.clone()),
                CommError::Version { .. } => Some(err.to_string()),
                CommError::Unauthenticated(_) => Some("wrong or missing cluster credential".to_string()),
                _ => None,
            };
            if let Some(reason) = reason {
                let _ = writer.write_one(Handshake::Refused { reason }).await;
            }
            writer.shutdown().await;
            return Err(err);
        }
    };
    writer.write_one(Handshake::Welcome { protocol: PROTOCOL_VERSION, server: server_name.to_string() }).await?;
    Ok((Connection { reader, writer, peer_name: name }, role))
}

/// Connect like [`connect`], retrying while nothing listens at `addr` (a
/// scheduler restarting) until `patience` has passed. A peer that answers
/// and refuses is not retried.
pub async fn connect_retrying(
    addr: &str,
    role: Role,
    name: &str,
    patience: Duration,
    security: &Security,
) -> Result<Connection, CommError> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match connect(addr, role, name, left.clamp(Duration::from_millis(100), Duration::from_secs(5)), security).await
        {
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

/// A listener whose `accept` errors (out of file descriptors, most often)
/// pause the loop instead of spinning it: 10 ms, doubling to 1 s while they
/// go on, logged once per run of failures.
pub struct Acceptor {
    listener: tokio::net::TcpListener,
    failures: u32,
}

impl Acceptor {
    pub fn new(listener: tokio::net::TcpListener) -> Self {
        Acceptor { listener, failures: 0 }
    }

    /// The next connection, waiting out accept errors. Cancel-safe.
    pub async fn next(&mut self) -> (TcpStream, std::net::SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(ok) => {
                    if self.failures > 0 {
                        tracing::warn!("accepting connections again after {} failed attempts", self.failures);
                        self.failures = 0;
                    }
                    return ok;
                }
                Err(e) => {
                    if self.failures == 0 {
                        tracing::warn!("cannot accept connections ({e}); pausing until it passes");
                    }
                    self.failures = self.failures.saturating_add(1);
                    let pause = Duration::from_millis(10u64 << self.failures.min(7).saturating_sub(1));
                    tokio::time::sleep(pause.min(Duration::from_secs(1))).await;
                }
            }
        }
    }
}

/// Raise this process's soft limit on open files to its hard limit (a
/// scheduler holds one socket per worker and client; the default soft limit
/// of 1024 is too low for large clusters). Errors are ignored: the limit
/// stays as it was.
pub fn raise_open_file_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max.min(1 << 20) {
            let want = libc::rlimit { rlim_cur: lim.rlim_max.min(1 << 20), rlim_max: lim.rlim_max };
            libc::setrlimit(libc::RLIMIT_NOFILE, &want);
        }
    }
}

/// Sender half of a writer task (see [`spawn_writer`]); cloning is cheap.
/// It counts the messages handed over and not yet written, so that whoever
/// feeds a peer that stopped reading can notice ([`Outbox::backlog`]) instead
/// of queueing without bound.
pub struct Outbox<M> {
    tx: mpsc::UnboundedSender<Envelope<M>>,
    queued: Arc<AtomicUsize>,
}

impl<M> Clone for Outbox<M> {
    fn clone(&self) -> Self {
        Outbox { tx: self.tx.clone(), queued: self.queued.clone() }
    }
}

impl<M> Outbox<M> {
    /// Queue `env` for writing; fails only when the writer has stopped.
    pub fn send(&self, env: Envelope<M>) -> Result<(), mpsc::error::SendError<Envelope<M>>> {
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.tx.send(env).inspect_err(|_| {
            self.queued.fetch_sub(1, Ordering::Relaxed);
        })
    }

    /// Messages queued and not yet written to the socket (a writer blocked
    /// on a peer that does not read holds them).
    pub fn backlog(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

/// Spawn a task that writes everything sent to the returned [`Outbox`],
/// batching whatever has queued up while the previous write was in flight.
/// An idle connection writes each message at once: no timers, no latency.
pub fn spawn_writer<M: Serialize + Send + Sync + 'static>(
    writer: FrameWriter<WriteHalf>,
) -> (Outbox<M>, tokio::task::JoinHandle<u64>) {
    spawn_counting_writer(writer, None)
}

/// As [`spawn_writer`], adding every byte written to `counter` as it goes.
pub fn spawn_counting_writer<M: Serialize + Send + Sync + 'static>(
    mut writer: FrameWriter<WriteHalf>,
    counter: Option<Arc<AtomicU64>>,
) -> (Outbox<M>, tokio::task::JoinHandle<u64>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Envelope<M>>();
    let queued = Arc::new(AtomicUsize::new(0));
    let outbox = Outbox { tx, queued: queued.clone() };
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
            queued.fetch_sub(batch.len(), Ordering::Relaxed);
            if let Some(c) = &counter {
                c.fetch_add(writer.bytes_written - before, Ordering::Relaxed);
            }
            batch.clear();
        }
        writer.shutdown().await;
        writer.bytes_written
    });
    (outbox, handle)
}

/// Reusable request/response connections to data servers (workers), keyed
/// by address. One request is in flight per connection at a time.
pub struct ConnectionPool {
    role: Role,
    security: Security,
    /// Longest silence of a peer during an exchange.
    silence: Duration,
    name: String,
    timeout: Duration,
    idle: std::sync::Mutex<rustc_hash::FxHashMap<String, Vec<Connection>>>,
    /// Bytes received in replies.
    pub bytes_in: std::sync::atomic::AtomicU64,
    /// Bytes sent in requests.
    pub bytes_out: std::sync::atomic::AtomicU64,
}

impl ConnectionPool {
    pub fn new(role: Role, name: &str, timeout: Duration, security: Security) -> Self {
        ConnectionPool {
            role,
            security,
            silence: EXCHANGE_IDLE,
            name: name.to_string(),
            timeout,
            idle: Default::default(),
            bytes_in: Default::default(),
            bytes_out: Default::default(),
        }
    }

    /// Fail a data exchange whose peer sends nothing for `idle` (default
    /// [`EXCHANGE_IDLE`]); `run` requests wait as long as the function runs.
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.silence = idle;
        self
    }

    /// Send `request` to `addr` and return the reply.
    pub async fn request(&self, addr: &str, request: Envelope<DataRequest>) -> Result<Envelope<DataReply>, CommError> {
        let pooled = self.idle.lock().expect("pool lock").get_mut(addr).and_then(|v| v.pop());
        let mut conn = match pooled {
            Some(c) => c,
            None => connect(addr, self.role, &self.name, self.timeout, &self.security).await?,
        };
        let quiet_ok = matches!(request.msg, DataRequest::RunFunction { .. });
        conn.reader.set_idle_timeout(if quiet_ok { None } else { Some(self.silence) });
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

    #[tokio::test]
    async fn declared_lengths_reserve_nothing_until_bytes_arrive() {
        // A batch that declares one 8 GiB frame, then sends 32 bytes of it.
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut head = Vec::new();
        head.extend_from_slice(&2u32.to_le_bytes());
        head.extend_from_slice(&4u64.to_le_bytes());
        head.extend_from_slice(&(8u64 << 30).to_le_bytes());
        a.write_all(&head).await.unwrap();
        a.write_all(&[0x90, 0, 0, 0]).await.unwrap();
        a.write_all(&[1u8; 32]).await.unwrap();
        drop(a);
        let mut r = FrameReader::new(b);
        assert!(matches!(r.read_batch::<DataRequest>().await, Err(CommError::Closed)));
        // The same through `read_into`, where the buffer can be inspected.
        let (mut a, b) = tokio::io::duplex(1 << 16);
        a.write_all(&[1u8; 32]).await.unwrap();
        drop(a);
        let mut buf = BytesMut::new();
        assert!(matches!(read_into(&mut BufReader::new(b), &mut buf, 8 << 30, None).await, Err(CommError::Closed)));
        assert!(buf.capacity() <= UPFRONT as usize, "reserved {} bytes", buf.capacity());
    }

    #[tokio::test]
    async fn a_large_frame_grows_once_after_its_first_megabyte() {
        let len = 5 * UPFRONT as usize + 123;
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut buf = BytesMut::new();
        read_into(&mut BufReader::new(&data[..]), &mut buf, len, None).await.unwrap();
        assert_eq!(&buf[..], &data[..]);
        assert_eq!(buf.capacity(), len, "one exact reservation for the rest, no doubling");
    }

    #[tokio::test]
    async fn a_declared_frame_count_reserves_nothing() {
        // One message claiming u32::MAX frames of its own, in a one-frame batch.
        let head = rmp_serde::to_vec(&vec![(DataRequest::GetData { id: 1, keys: vec![] }, u32::MAX)]).unwrap();
        let mut bytes = 1u32.to_le_bytes().to_vec();
        bytes.extend_from_slice(&(head.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&head);
        let mut r = FrameReader::new(&bytes[..]);
        match r.read_batch::<DataRequest>().await {
            Err(CommError::Malformed(m)) => assert!(m.contains("missing frames"), "{m}"),
            other => panic!("expected a malformed batch, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn handshake_limits_refuse_large_frames() {
        let (mut a, b) = tokio::io::duplex(1024);
        a.write_all(&1u32.to_le_bytes()).await.unwrap();
        a.write_all(&(1u64 << 20).to_le_bytes()).await.unwrap();
        let mut r = FrameReader::new(b);
        assert!(matches!(r.read_batch_within::<Handshake>(Limits::HANDSHAKE).await, Err(CommError::Malformed(_))));
    }

    #[tokio::test]
    async fn sockets_get_keepalive_and_a_user_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        prepare(&stream);
        let sock = socket2::SockRef::from(&stream);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(10));
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(TCP_TIMEOUT));
        assert!(sock.tcp_nodelay().unwrap());
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
