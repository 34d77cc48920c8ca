//! Published datasets: named objects whose futures the scheduler holds
//! until they are unpublished.

use super::holders::Holder;
use super::state::{PeerId, SchedulerState};
use crate::protocol::{Blob, Envelope, Key, Msg};
use bytes::Bytes;

impl SchedulerState {
    pub(super) fn dataset_reply(
        &mut self,
        client: PeerId,
        id: u64,
        error: String,
        data: Option<Bytes>,
        names: Vec<String>,
    ) {
        let mut frames = Vec::new();
        let data = data.map(|d| Blob::new(d, &mut frames));
        self.out.push((client, Envelope { msg: Msg::DatasetReply { id, error, data, names }, frames }));
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
            let err = format!("Dataset {name:?} already exists");
            return self.dataset_reply(client, id, err, None, Vec::new());
        }
        if let Some(k) = keys.iter().find(|k| !self.keys.contains_key(k.as_str())) {
            let err = format!("cannot publish {name:?}: key {k:?} is not known to the scheduler");
            return self.dataset_reply(client, id, err, None, Vec::new());
        }
        if let Some((old, _)) = self.datasets.remove(&name) {
            self.unhold_keys(&old, Holder::Datasets);
        }
        self.hold_keys(&keys, Holder::Datasets);
        self.datasets.insert(name, (keys, data));
        self.dataset_reply(client, id, String::new(), None, Vec::new());
    }

    /// Remove a published dataset.
    pub fn unpublish_dataset(&mut self, client: PeerId, id: u64, name: &str) {
        match self.datasets.remove(name) {
            Some((keys, _)) => {
                self.unhold_keys(&keys, Holder::Datasets);
                self.dataset_reply(client, id, String::new(), None, Vec::new());
            }
            None => self.dataset_reply(client, id, format!("Dataset {name:?} not found"), None, Vec::new()),
        }
    }

    /// Send a published dataset's pickled object.
    pub fn get_dataset(&mut self, client: PeerId, id: u64, name: &str) {
        match self.datasets.get(name) {
            Some((_, data)) => {
                let data = data.clone();
                self.dataset_reply(client, id, String::new(), Some(data), Vec::new());
            }
            None => self.dataset_reply(client, id, format!("Dataset {name:?} not found"), None, Vec::new()),
        }
    }

    /// Names of the published datasets.
    pub fn list_datasets(&mut self, client: PeerId, id: u64) {
        let mut names: Vec<String> = self.datasets.keys().cloned().collect();
        names.sort();
        self.dataset_reply(client, id, String::new(), None, names);
    }
}
