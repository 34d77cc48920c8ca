//! Decoding what peers send into the scheduler's handlers: the one place a
//! wire message becomes an event, shared by the server and the simulator.
//!
//! Payloads that travel as extra frames (run specs, datasets, coordination
//! values, exceptions) are resolved here; a message that refers to a frame
//! it did not bring is a protocol error, and the caller closes the
//! connection that sent it.

use super::state::{PeerId, SchedulerState};
use crate::protocol::{CoordOp, Envelope, FromClient, FromWorker};

impl SchedulerState {
    /// Handle one message from worker `peer`. `Err` means the worker broke
    /// the protocol (or its registration was refused).
    pub fn handle_worker(&mut self, peer: PeerId, env: Envelope<FromWorker>) -> Result<(), String> {
        let Envelope { msg, frames } = env;
        match msg {
            FromWorker::RegisterWorker(reg) => self.add_worker(peer, reg)?,
            FromWorker::TaskFinished(report) => self.task_finished(peer, &report),
            FromWorker::TaskErred(report) => self.task_erred(peer, report, &frames),
            FromWorker::AddKeys { keys } => self.add_keys(peer, &keys),
            FromWorker::TaskSeceded { key } => self.task_seceded(peer, &key),
            FromWorker::StealResponse { key, stolen } => self.steal_response(peer, &key, stolen),
            FromWorker::MissingData { key, workers } => self.missing_data(peer, &key, &workers),
            FromWorker::Heartbeat(beat) => self.worker_metrics(peer, &beat),
            FromWorker::Spilled { keys, start, stop } => self.worker_spilled(peer, keys, start, stop),
        }
        Ok(())
    }

    /// Handle one message from client `peer` at time `now`. `GetInfo`,
    /// `Subscribe` and `Shutdown` concern the connection and the process,
    /// not the state: the IO shell answers them, and they are an error here.
    pub fn handle_client(&mut self, peer: PeerId, env: Envelope<FromClient>, now: f64) -> Result<(), String> {
        let Envelope { msg, frames } = env;
        match msg {
            FromClient::UpdateGraph { tasks, wanted, shared } => {
                let mut with_specs = Vec::with_capacity(tasks.len());
                for t in tasks {
                    let spec = t.run_spec.resolve(&frames).ok_or("run_spec refers to a missing frame")?;
                    with_specs.push((t, Some(spec)));
                }
                let shared = shared
                    .into_iter()
                    .map(|(id, b)| b.resolve(&frames).map(|b| (id, b)).ok_or("shared blob refers to a missing frame"))
                    .collect::<Result<Vec<_>, _>>()?;
                self.update_graph_shared(peer, with_specs, wanted, shared)
            }
            FromClient::WantKeys { keys } => self.want_keys(peer, keys),
            FromClient::ReleaseKeys { keys } => self.release_keys(peer, &keys),
            FromClient::CancelKeys { keys } => self.cancel_keys(peer, keys),
            FromClient::ScatterDone { keys, worker } => self.scatter_done(peer, &worker, keys),
            FromClient::WhoHas { id, keys } => self.who_has_reply(peer, id, keys),
            FromClient::GetTaskStream { id, start, stop, count } => {
                self.task_stream_reply(peer, id, start, stop, count)
            }
            FromClient::RetryKeys { keys } => self.retry_keys(&keys),
            FromClient::FireAndForget { keys } => self.fire_and_forget(&keys),
            FromClient::Replicate { keys, n, workers } => self.replicate(&keys, n as usize, &workers),
            FromClient::Restart => self.restart(),
            FromClient::RegisterPlugin { name, call } => {
                let call = call.resolve(&frames).ok_or("plugin refers to a missing frame")?;
                self.register_plugin(name, call)
            }
            FromClient::UnregisterPlugin { name } => self.unregister_plugin(&name),
            FromClient::Rebalance { id, keys, workers } => self.rebalance(peer, id, keys, workers),
            FromClient::PublishDataset { id, name, keys, data, overwrite } => {
                let data = data.resolve(&frames).ok_or("dataset refers to a missing frame")?;
                self.publish_dataset(peer, id, name, keys, data, overwrite)
            }
            FromClient::UnpublishDataset { id, name } => self.unpublish_dataset(peer, id, &name),
            FromClient::GetDataset { id, name } => self.get_dataset(peer, id, &name),
            FromClient::ListDatasets { id } => self.list_datasets(peer, id),
            FromClient::RetireWorkers { id, workers } => self.retire_workers(peer, id, workers),
            FromClient::Coord { id, op } => {
                let value = match &op {
                    CoordOp::VariableSet { value, .. } | CoordOp::QueuePut { value, .. } => {
                        Some(value.resolve(&frames).ok_or("coordination value refers to a missing frame")?)
                    }
                    _ => None,
                };
                self.coordinate(peer, id, op, value, now)
            }
            FromClient::GetInfo { .. } | FromClient::Subscribe { .. } | FromClient::Shutdown => {
                return Err("GetInfo, Subscribe and Shutdown are served by the scheduler's IO shell".into())
            }
        }
        Ok(())
    }
}
