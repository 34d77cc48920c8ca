//! The worker's data port: serves `GetData`, `PutData` and `RunFunction`
//! to peers and clients, each connection in its own task, store work on
//! the runner's helper thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::runner::{Helper, Runner};
use super::runtime::Event;
use crate::comm;
use crate::protocol::{Blob, DataReply, DataRequest, Envelope, Key, Role};
use crate::security::Security;

/// Bytes this worker's data port received and sent.
#[derive(Default)]
pub(super) struct Traffic {
    pub(super) bytes_in: AtomicU64,
    pub(super) bytes_out: AtomicU64,
}

/// Deserialize and store received items; returns stored sizes and failures.
pub(super) fn store_items<R: Runner + ?Sized>(
    runner: &R,
    items: Vec<(Key, Vec<Blob>)>,
    mut frames: Vec<Bytes>,
) -> (Vec<(Key, u64)>, Vec<Key>) {
    let mut stored = Vec::with_capacity(items.len());
    let mut failed = Vec::new();
    for (key, blobs) in items {
        let parts: Option<Vec<Bytes>> = blobs.iter().map(|b| b.take(&mut frames)).collect();
        match parts.ok_or_else(|| "missing frame".to_string()).and_then(|p| runner.store(&key, p)) {
            Ok(n) => stored.push((key, n)),
            Err(e) => {
                tracing::warn!("could not store {key}: {e}");
                failed.push(key);
            }
        }
    }
    (stored, failed)
}

/// Serve `GetData` and `PutData` to peers and clients.
pub(super) fn spawn_data_server<R: Runner>(
    listener: TcpListener,
    address: String,
    runner: Arc<R>,
    helper: Helper,
    events: mpsc::UnboundedSender<Event>,
    traffic: Arc<Traffic>,
    security: Security,
) {
    tokio::spawn(async move {
        let mut acceptor = comm::Acceptor::new(listener);
        loop {
            let (stream, from) = acceptor.next().await;
            let security = security.clone();
            let runner = runner.clone();
            let helper = helper.clone();
            let events = events.clone();
            let address = address.clone();
            let traffic = traffic.clone();
            tokio::spawn(async move {
                let wrong_role = |_| format!("{address} is a dask-rs worker's data port, not a scheduler");
                let serves = [Role::Peer, Role::Client];
                let conn = match comm::accept(stream, &address, &serves, wrong_role, &security).await {
                    Ok((c, _)) => c,
                    Err(e) => {
                        tracing::warn!("data connection from {from} rejected: {e}");
                        return;
                    }
                };
                let comm::Connection { mut reader, mut writer, .. } = conn;
                let mut last_in = 0;
                while let Ok(batch) = reader.read_batch::<DataRequest>().await {
                    traffic.bytes_in.fetch_add(reader.bytes_read - last_in, Ordering::Relaxed);
                    last_in = reader.bytes_read;
                    for env in batch {
                        let reply = serve(&runner, &helper, env, &events).await;
                        let before = writer.bytes_written;
                        if writer.write_batch(std::slice::from_ref(&reply)).await.is_err() {
                            return;
                        }
                        traffic.bytes_out.fetch_add(writer.bytes_written - before, Ordering::Relaxed);
                    }
                }
            });
        }
    });
}

async fn serve<R: Runner>(
    runner: &Arc<R>,
    helper: &Helper,
    env: Envelope<DataRequest>,
    events: &mpsc::UnboundedSender<Event>,
) -> Envelope<DataReply> {
    let Envelope { msg, frames } = env;
    match msg {
        DataRequest::GetData { id, keys } => {
            let r = runner.clone();
            let values = helper.run(move || r.serialize(&keys)).await.unwrap_or_default();
            let mut out_frames = Vec::new();
            let mut items = Vec::with_capacity(values.len());
            let mut missing = Vec::new();
            for (key, v) in values {
                match v {
                    Some(parts) => {
                        let blobs = parts.into_iter().map(|p| Blob::new(p, &mut out_frames)).collect();
                        items.push((key, blobs));
                    }
                    None => missing.push(key),
                }
            }
            Envelope { msg: DataReply::Data { id, items, missing }, frames: out_frames }
        }
        DataRequest::PutData { id, items } => {
            let r = runner.clone();
            let (stored, failed) = helper.run(move || store_items(&*r, items, frames)).await.unwrap_or_default();
            if !failed.is_empty() {
                return Envelope::new(DataReply::Error { reason: format!("could not store keys {failed:?}") });
            }
            let nbytes = stored.iter().map(|(_, n)| *n).collect();
            let _ = events.send(Event::DataPut(stored));
            Envelope::new(DataReply::PutDataOk { id, nbytes })
        }
        DataRequest::RunFunction { id, function } => {
            let Some(call) = function.resolve(&frames) else {
                return Envelope::new(DataReply::Error { reason: "function refers to a missing frame".into() });
            };
            let r = runner.clone();
            let outcome = tokio::task::spawn_blocking(move || r.run_function(call))
                .await
                .unwrap_or_else(|e| Err(Bytes::from(format!("the function panicked: {e}"))));
            let mut out_frames = Vec::new();
            let result = match outcome {
                Ok(b) => Ok(Blob::new(b, &mut out_frames)),
                Err(b) => Err(Blob::new(b, &mut out_frames)),
            };
            Envelope { msg: DataReply::RunResult { id, result }, frames: out_frames }
        }
    }
}
