//! Published datasets: named objects whose futures the scheduler holds
//! until they are unpublished.

use super::holders::Holder;
use super::state::{PeerId, SchedulerState};
use crate::protocol::{Blob, DatasetValue, Envelope, Key, ToClient};
use bytes::Bytes;

impl SchedulerState {
    fn dataset_reply(&mut self, client: PeerId, id: u64, result: Result<DatasetValue, String>) {
        self.send_client(client, ToClient::DatasetReply { id, result });
    }

    /// Publish `keys` and a pickled object under `name`.
    pub fn publish_dataset(
        &mut self,
        client: PeerId,
        id: u64,
        name: String,
        keys: Vec<Key>,
        data: Bytes,
        overwrite: bool,
    ) {
        if self.datasets.contains_key(&name) && !overwrite {
            return self.dataset_reply(client, id, Err(format!("Dataset {name:?} already exists")));
        }
        if let Some(k) = keys.iter().find(|k| !self.keys.contains_key(k.as_str())) {
            let err = format!("cannot publish {name:?}: key {k:?} is not known to the scheduler");
            return self.dataset_reply(client, id, Err(err));
        }
        if let Some((old, _)) = self.datasets.remove(&name) {
            self.unhold_keys(&old, Holder::Datasets);
        }
        self.hold_keys(&keys, Holder::Datasets);
        self.datasets.insert(name, (keys, data));
        self.dataset_reply(client, id, Ok(DatasetValue::Done));
    }

    /// Remove a published dataset.
    pub fn unpublish_dataset(&mut self, client: PeerId, id: u64, name: &str) {
        match self.datasets.remove(name) {
            Some((keys, _)) => {
                self.unhold_keys(&keys, Holder::Datasets);
                self.dataset_reply(client, id, Ok(DatasetValue::Done));
            }
            None => self.dataset_reply(client, id, Err(format!("Dataset {name:?} not found"))),
        }
    }

    /// Send a published dataset's pickled object.
    pub fn get_dataset(&mut self, client: PeerId, id: u64, name: &str) {
        match self.datasets.get(name) {
            Some((_, data)) => {
                let mut frames = Vec::new();
                let data = Blob::new(data.clone(), &mut frames);
                let msg = ToClient::DatasetReply { id, result: Ok(DatasetValue::Data(data)) };
                self.send_client(client, Envelope { msg, frames });
            }
            None => self.dataset_reply(client, id, Err(format!("Dataset {name:?} not found"))),
        }
    }

    /// Names of the published datasets.
    pub fn list_datasets(&mut self, client: PeerId, id: u64) {
        let mut names: Vec<String> = self.datasets.keys().cloned().collect();
        names.sort();
        self.dataset_reply(client, id, Ok(DatasetValue::Names(names)));
    }
}
