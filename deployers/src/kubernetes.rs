//! The Kubernetes backend: one Pod per worker, created through the API
//! server with the `kube` client.
//!
//! Every object of a cluster carries the labels `app.kubernetes.io/name=dask-rs`,
//! `dask-rs/cluster=NAME` and `dask-rs/component`, and an owner reference to
//! the cluster's ConfigMap `dask-rs-NAME`: deleting that one object
//! garbage-collects the rest. The cluster's credentials are a Secret the
//! worker pods read into their environment (`secretKeyRef`), never a command
//! line. Pod state comes from a watch (list, then watch from its
//! resourceVersion with bookmarks; relist on `410 Gone`) running on the
//! backend's own runtime; the [`Backend`] calls read what it saw.
//!
//! The scheduler is not a pod: it runs in the cluster's manager, wherever
//! `dask-ctl up` ran, and pods connect to its contact address (see
//! ARCHITECTURE.md for why).
//!
//! This module owns the manifests ([`Manifests`], also what `dask-ctl
//! job-script --backend kubernetes` prints), the API calls, and the mapping
//! of pod phases and container reasons (`Unschedulable`, `ImagePullBackOff`,
//! `OOMKilled`, `Evicted`...) to pending / running / failed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, PostParams, WatchEvent, WatchParams};
use serde_json::{json, Value};

use crate::WorkerStatus;
use crate::{parse_bytes, Backend, BackendError, Credentials, Deployer, Owned, WorkerOptions, WorkerRecord};

/// The label every object of every dask-rs cluster carries.
pub const APP_LABEL: (&str, &str) = ("app.kubernetes.io/name", "dask-rs");
/// The label naming the cluster.
pub const CLUSTER_LABEL: &str = "dask-rs/cluster";
/// The label naming the part (`worker`, `credentials`, `cluster`).
pub const COMPONENT_LABEL: &str = "dask-rs/component";

/// Where the API server is and which namespace the cluster lives in.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Target {
    pub namespace: Option<String>,
    pub kubeconfig: Option<String>,
    pub context: Option<String>,
}

impl Target {
    /// The target `opts` name.
    pub fn of(opts: &WorkerOptions) -> Self {
        Target { namespace: opts.namespace.clone(), kubeconfig: opts.kubeconfig.clone(), context: opts.context.clone() }
    }

    /// A client and the namespace: the kubeconfig (or in-cluster account)
    /// chosen as kubectl would choose it.
    pub async fn connect(&self) -> Result<(kube::Client, String), String> {
        crate::install_crypto_provider();
        let options = kube::config::KubeConfigOptions { context: self.context.clone(), ..Default::default() };
        let config = match &self.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| format!("kubeconfig {path}: {e}"))?;
                kube::Config::from_custom_kubeconfig(kc, &options)
                    .await
                    .map_err(|e| format!("kubeconfig {path}: {e}"))?
            }
            None if self.context.is_some() => {
                kube::Config::from_kubeconfig(&options).await.map_err(|e| format!("kubeconfig: {e}"))?
            }
            None => kube::Config::infer().await.map_err(|e| format!("no Kubernetes configuration found: {e}"))?,
        };
        let namespace = self.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
        let client = kube::Client::try_from(config).map_err(|e| format!("Kubernetes client: {e}"))?;
        Ok((client, namespace))
    }
}

/// A `kube` error in the API server's words: `namespaces "x" not found (NotFound)`.
pub fn api_error(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) if !s.message.is_empty() => {
            if s.reason.is_empty() {
                s.message.clone()
            } else {
                format!("{} ({})", s.message, s.reason)
            }
        }
        other => {
            let mut text = other.to_string();
            let mut cur = std::error::Error::source(other);
            while let Some(s) = cur {
                let t = s.to_string();
                if !text.contains(&t) {
                    text.push_str(": ");
                    text.push_str(&t);
                }
                cur = s.source();
            }
            text
        }
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// `--cpus` as a Kubernetes quantity: `2`, `500m`.
fn cpu_quantity(cpus: f64) -> String {
    if cpus.fract() == 0.0 {
        format!("{}", cpus as u64)
    } else {
        format!("{}m", (cpus * 1000.0).round() as u64)
    }
}

/// A memory quantity: Kubernetes suffixes (`4Gi`, `512Mi`, `1G`) pass as
/// they are; dask-style ones (`4GiB`, `500MB`) become bytes.
fn memory_quantity(text: &str) -> Result<String, BackendError> {
    let t = text.trim();
    let k8s = t.trim_start_matches(|c: char| c.is_ascii_digit() || c == '.');
    if ["", "Ki", "Mi", "Gi", "Ti", "k", "M", "G", "T"].contains(&k8s) && t != k8s {
        return Ok(t.to_string());
    }
    parse_bytes(t)
        .map(|b| b.to_string())
        .ok_or_else(|| BackendError::ScaleUp(format!("memory {text:?}: expected a size like 4Gi or 4GiB")))
}

/// Kubernetes object names: lowercase letters, digits and `-`, at most 63.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 50
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "cluster name {name:?} cannot name Kubernetes objects: use lowercase letters, digits and '-' \
             (at most 50 characters, not starting or ending with '-')"
        ))
    }
}

/// The objects of one cluster, as JSON manifests.
pub struct Manifests {
    cluster: String,
    namespace: String,
    opts: WorkerOptions,
    scheduler: String,
    template: Option<Value>,
}

impl Manifests {
    /// Manifests for `cluster`'s workers connecting to `scheduler` (its contact address).
    pub fn new(cluster: &str, namespace: &str, opts: &WorkerOptions, scheduler: &str) -> Result<Self, BackendError> {
        check_name(cluster).map_err(BackendError::ScaleUp)?;
        if opts.image.as_deref().unwrap_or("").is_empty() {
            return Err(BackendError::ScaleUp(
                "the kubernetes backend needs --image: an image with Python and dask-rs installed".into(),
            ));
        }
        let template = match &opts.pod_template {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| BackendError::ScaleUp(format!("--pod-template {path}: {e}")))?;
                let v: Value = serde_yaml_ng::from_str(&text)
                    .map_err(|e| BackendError::ScaleUp(format!("--pod-template {path}: {e}")))?;
                // A pod manifest or a bare pod spec.
                let v = if v.get("spec").is_some() { v } else { json!({ "spec": v }) };
                let pod = serde_json::from_value::<Pod>(v.clone())
                    .map_err(|e| BackendError::ScaleUp(format!("--pod-template {path}: not a pod: {e}")))?;
                // A misspelt field would be dropped without a word: refuse it.
                let mut unknown = Vec::new();
                unknown_fields(&v, &serde_json::to_value(&pod).unwrap_or_default(), "", &mut unknown);
                if !unknown.is_empty() {
                    return Err(BackendError::ScaleUp(format!(
                        "--pod-template {path}: unknown field {} (not in Kubernetes' Pod)",
                        unknown.iter().map(|u| format!("{u:?}")).collect::<Vec<_>>().join(", ")
                    )));
                }
                Some(v)
            }
        };
        opts.env_pairs()?;
        for t in &opts.tolerations {
            toleration(t)?;
        }
        for s in &opts.node_selector {
            s.split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| BackendError::ScaleUp(format!("--node-selector {s:?}: expected KEY=VALUE")))?;
        }
        Ok(Manifests {
            cluster: cluster.to_string(),
            namespace: namespace.to_string(),
            opts: opts.clone(),
            scheduler: scheduler.to_string(),
            template,
        })
    }

    /// The name of the cluster's ConfigMap, which owns everything else.
    pub fn owner_name(&self) -> String {
        format!("dask-rs-{}", self.cluster)
    }

    /// The name of the Secret with the cluster's credentials.
    pub fn secret_name(&self) -> String {
        format!("dask-rs-{}-credentials", self.cluster)
    }

    /// The label selector of the cluster's worker pods.
    pub fn selector(&self) -> String {
        format!("{CLUSTER_LABEL}={},{COMPONENT_LABEL}=worker", self.cluster)
    }

    fn labels(&self, component: &str) -> Value {
        json!({
            APP_LABEL.0: APP_LABEL.1,
            "app.kubernetes.io/instance": self.cluster,
            CLUSTER_LABEL: self.cluster,
            COMPONENT_LABEL: component,
        })
    }

    fn owner_reference(owner: &str, uid: &str) -> Value {
        json!([{ "apiVersion": "v1", "kind": "ConfigMap", "name": owner, "uid": uid, "blockOwnerDeletion": true }])
    }

    /// The cluster's ConfigMap: what the cluster is and where its scheduler is.
    pub fn owner(&self) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": { "name": self.owner_name(), "namespace": self.namespace, "labels": self.labels("cluster") },
            "data": { "cluster": self.cluster, "scheduler": self.scheduler },
        })
    }

    /// The credentials Secret; `data` maps keys to their text (None: a
    /// placeholder, for printing).
    pub fn secret(&self, data: Option<&BTreeMap<String, String>>, owner_uid: &str) -> Value {
        let mut meta =
            json!({ "name": self.secret_name(), "namespace": self.namespace, "labels": self.labels("credentials") });
        if !owner_uid.is_empty() {
            meta["ownerReferences"] = Self::owner_reference(&self.owner_name(), owner_uid);
        }
        let body = match data {
            Some(d) => {
                json!({ "data": d.iter().map(|(k, v)| (k.clone(), json!(base64(v.as_bytes())))).collect::<serde_json::Map<_, _>>() })
            }
            None => {
                let made = "(made by dask-ctl up)";
                json!({ "stringData": { "token": made, "ca.pem": made, "cert.pem": made, "key.pem": made } })
            }
        };
        let mut s = json!({ "apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": meta });
        for (k, v) in body.as_object().into_iter().flatten() {
            s[k] = v.clone();
        }
        s
    }

    /// The pod of worker `name`; `credentials` says which secret keys exist.
    pub fn pod(&self, name: &str, credentials: &[&str], owner_uid: &str) -> Result<Value, BackendError> {
        let o = &self.opts;
        let mut argv = o.worker_command(&self.scheduler, name);
        let request_mem = o.memory.as_deref().map(memory_quantity).transpose()?;
        let limit_mem = match &o.pod_memory_limit {
            Some(m) => Some(memory_quantity(m)?),
            None => request_mem.clone(),
        };
        if o.memory_limit.is_none() {
            if let Some(bytes) = limit_mem.as_deref().and_then(parse_bytes) {
                argv.insert(argv.len() - o.worker_extra_args.len(), "--memory-limit".into());
                argv.insert(argv.len() - o.worker_extra_args.len(), bytes.to_string());
            }
        }
        let cpus = o.cpus.or(o.cores.map(f64::from)).unwrap_or(1.0);
        let mut requests = json!({ "cpu": cpu_quantity(cpus) });
        let mut limits = json!({});
        if let Some(m) = &request_mem {
            requests["memory"] = json!(m);
        }
        if let Some(m) = &limit_mem {
            limits["memory"] = json!(m);
        }
        if let Some(c) = &o.cpu_limit {
            limits["cpu"] = json!(c);
        }
        let mut env = vec![json!({ "name": "DASK_RS_CLUSTER", "value": self.cluster })];
        env.extend(o.env_pairs()?.into_iter().map(|(k, v)| json!({ "name": k, "value": v })));
        for (var, key) in secret_env() {
            if credentials.contains(&key) {
                env.push(
                    json!({ "name": var, "valueFrom": { "secretKeyRef": { "name": self.secret_name(), "key": key } } }),
                );
            }
        }
        let container = json!({
            "name": "worker",
            "image": o.image.clone().unwrap_or_default(),
            "command": argv,
            "env": env,
            "resources": { "requests": requests, "limits": limits },
        });
        let mut spec = json!({ "restartPolicy": "Never", "containers": [container] });
        if let Some(sa) = &o.service_account {
            spec["serviceAccountName"] = json!(sa);
        }
        if !o.node_selector.is_empty() {
            let sel: serde_json::Map<String, Value> = o
                .node_selector
                .iter()
                .filter_map(|s| s.split_once('='))
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            spec["nodeSelector"] = Value::Object(sel);
        }
        if !o.tolerations.is_empty() {
            spec["tolerations"] = o.tolerations.iter().map(|t| toleration(t)).collect::<Result<Vec<_>, _>>()?.into();
        }
        if !o.image_pull_secrets.is_empty() {
            spec["imagePullSecrets"] = o.image_pull_secrets.iter().map(|s| json!({ "name": s })).collect();
        }
        let mut meta = json!({ "name": name, "namespace": self.namespace, "labels": self.labels("worker") });
        if !owner_uid.is_empty() {
            meta["ownerReferences"] = Self::owner_reference(&self.owner_name(), owner_uid);
        }
        let ours = json!({ "apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec });
        Ok(match &self.template {
            Some(t) => merge_pod(t.clone(), ours),
            None => ours,
        })
    }
}

/// Paths of the fields of `input` that decoding into a typed object dropped
/// (`typed` is the object decoded and encoded again).
fn unknown_fields(input: &Value, typed: &Value, path: &str, out: &mut Vec<String>) {
    match (input, typed) {
        (Value::Object(i), Value::Object(t)) => {
            for (k, v) in i.iter().filter(|(_, v)| !v.is_null()) {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                match t.get(k) {
                    None => out.push(p),
                    Some(tv) => unknown_fields(v, tv, &p, out),
                }
            }
        }
        (Value::Array(i), Value::Array(t)) => {
            for (n, (iv, tv)) in i.iter().zip(t).enumerate() {
                unknown_fields(iv, tv, &format!("{path}[{n}]"), out);
            }
        }
        _ => {}
    }
}

/// Which variable each credential key of the Secret fills.
fn secret_env() -> [(&'static str, &'static str); 4] {
    use cluster::tls::PEM_ENVS;
    [
        (cluster::security::TOKEN_ENV, "token"),
        (PEM_ENVS[0], "ca.pem"),
        (PEM_ENVS[1], "cert.pem"),
        (PEM_ENVS[2], "key.pem"),
    ]
}

/// `KEY=VALUE:EFFECT`, `KEY:EFFECT` or `KEY` as a toleration.
fn toleration(text: &str) -> Result<Value, BackendError> {
    let (kv, effect) = match text.rsplit_once(':') {
        Some((kv, e)) => (kv, Some(e)),
        None => (text, None),
    };
    if let Some(e) = effect {
        if !["NoSchedule", "PreferNoSchedule", "NoExecute"].contains(&e) {
            return Err(BackendError::ScaleUp(format!(
                "--toleration {text:?}: the effect must be NoSchedule, PreferNoSchedule or NoExecute"
            )));
        }
    }
    let mut t = match kv.split_once('=') {
        Some((k, v)) => json!({ "key": k, "operator": "Equal", "value": v }),
        None => json!({ "key": kv, "operator": "Exists" }),
    };
    if kv.is_empty() || kv.starts_with('=') {
        return Err(BackendError::ScaleUp(format!("--toleration {text:?}: expected KEY[=VALUE][:EFFECT]")));
    }
    if let Some(e) = effect {
        t["effect"] = json!(e);
    }
    Ok(t)
}

/// `ours` over `template`: objects merge key by key, ours wins for other
/// values; containers merge by name (the template's `worker` container, or
/// its first, under ours; its other containers stay).
fn merge_pod(mut template: Value, ours: Value) -> Value {
    let their_containers = template.pointer_mut("/spec/containers").map(Value::take);
    let mut merged = merge_values(template, ours);
    if let Some(Value::Array(theirs)) = their_containers {
        let mine = merged["spec"]["containers"][0].take();
        let at = theirs.iter().position(|c| c["name"] == "worker").unwrap_or(0);
        let mut list = Vec::new();
        for (i, c) in theirs.into_iter().enumerate() {
            if i == at {
                list.push(merge_values(c, mine.clone()));
            } else {
                list.push(c);
            }
        }
        if list.is_empty() {
            list.push(mine);
        }
        merged["spec"]["containers"] = Value::Array(list);
    }
    merged
}

fn merge_values(base: Value, over: Value) -> Value {
    match (base, over) {
        (Value::Object(mut b), Value::Object(o)) => {
            for (k, v) in o {
                let merged = match b.remove(&k) {
                    Some(bv) => merge_values(bv, v),
                    None => v,
                };
                b.insert(k, merged);
            }
            Value::Object(b)
        }
        (_, o) => o,
    }
}

/// Standard base64 (Secret `data`).
fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            out.push(if i <= chunk.len() { A[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

/// The credentials as Secret keys and their text.
fn secret_data(credentials: &Credentials) -> Result<BTreeMap<String, String>, BackendError> {
    let fail = |e: cluster::security::SecurityError| BackendError::ScaleUp(format!("cluster credentials: {e}"));
    let mut data = BTreeMap::new();
    if let Some(f) = &credentials.token_file {
        let s = cluster::security::Security::from_file(f).map_err(fail)?;
        data.insert("token".into(), s.token().unwrap_or_default().to_string());
    }
    if let Some(files) = &credentials.tls {
        let pem = cluster::tls::TlsPem::read(files).map_err(fail)?;
        data.insert("ca.pem".into(), pem.ca);
        data.insert("cert.pem".into(), pem.cert);
        data.insert("key.pem".into(), pem.key);
    }
    Ok(data)
}

/// A pod's state in dask-rs's terms, with Kubernetes' words for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodState {
    Pending(String),
    Running(String),
    /// Ended or cannot start; the reason.
    Failed(String),
}

/// Container reasons that mean the pod will not start without a change.
const STUCK: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "CrashLoopBackOff",
    "RunContainerError",
];

/// Read a pod's status.
pub fn pod_state(pod: &Value) -> PodState {
    let status = &pod["status"];
    let phase = status["phase"].as_str().unwrap_or("Pending");
    let containers = status["containerStatuses"].as_array().cloned().unwrap_or_default();
    let words = |reason: &str, message: &str| {
        if message.is_empty() {
            reason.to_string()
        } else {
            format!("{reason}: {message}")
        }
    };
    for c in &containers {
        let w = &c["state"]["waiting"];
        if let Some(reason) = w["reason"].as_str().filter(|r| STUCK.contains(r)) {
            return PodState::Failed(words(reason, w["message"].as_str().unwrap_or("")));
        }
    }
    match phase {
        "Running" => PodState::Running(format!("Running on {}", pod["spec"]["nodeName"].as_str().unwrap_or("?"))),
        "Succeeded" | "Failed" => {
            if let Some(reason) = status["reason"].as_str() {
                return PodState::Failed(words(reason, status["message"].as_str().unwrap_or("")));
            }
            for c in &containers {
                let t = &c["state"]["terminated"];
                if let Some(reason) = t["reason"].as_str() {
                    let code = t["exitCode"].as_i64().unwrap_or(-1);
                    return PodState::Failed(format!("{phase}: {reason} (exit code {code})"));
                }
            }
            PodState::Failed(phase.to_string())
        }
        _ => {
            let conditions = status["conditions"].as_array().cloned().unwrap_or_default();
            if let Some(c) = conditions.iter().find(|c| c["type"] == "PodScheduled" && c["status"] == "False") {
                let reason = c["reason"].as_str().unwrap_or("Unschedulable");
                return PodState::Pending(words(reason, c["message"].as_str().unwrap_or("")));
            }
            for c in &containers {
                if let Some(reason) = c["state"]["waiting"]["reason"].as_str() {
                    return PodState::Pending(reason.to_string());
                }
            }
            PodState::Pending("Pending".into())
        }
    }
}

/// What the watch saw.
#[derive(Default)]
struct Watched {
    pods: BTreeMap<String, Seen>,
    /// Set once the first list arrived.
    synced: bool,
    /// The last error of the watch loop (it retries).
    error: Option<String>,
}

/// What the watch keeps of a pod: its state, read once per change, and
/// whether it is being deleted.
struct Seen {
    state: PodState,
    deleting: bool,
}

/// A pod's name and what the watch keeps of it.
fn seen(p: &Pod) -> Option<(String, Seen)> {
    let v = serde_json::to_value(p).ok()?;
    Some((p.metadata.name.clone()?, Seen { state: pod_state(&v), deleting: p.metadata.deletion_timestamp.is_some() }))
}

struct Ours {
    created: Instant,
    seen: bool,
}

/// Workers as pods.
pub struct KubernetesBackend {
    rt: tokio::runtime::Runtime,
    client: kube::Client,
    namespace: String,
    target: Target,
    manifests: Manifests,
    credentials: Credentials,
    owner_uid: Option<String>,
    secret_keys: Vec<&'static str>,
    watched: Arc<Mutex<Watched>>,
    pods: BTreeMap<String, Ours>,
    failed: Vec<WorkerRecord>,
    next: u64,
}

impl KubernetesBackend {
    /// Connects to the API server; nothing is created until [`Self::create`].
    pub fn new(
        opts: &WorkerOptions,
        cluster: &str,
        scheduler: &str,
        credentials: Credentials,
    ) -> Result<Self, BackendError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("dask-rs-kube")
            .enable_all()
            .build()
            .map_err(|e| BackendError::ScaleUp(e.to_string()))?;
        let target = Target::of(opts);
        let (client, namespace) = rt.block_on(target.connect()).map_err(BackendError::ScaleUp)?;
        let manifests = Manifests::new(cluster, &namespace, opts, &opts.contact(scheduler))?;
        Ok(KubernetesBackend {
            rt,
            client,
            namespace,
            target,
            manifests,
            credentials,
            owner_uid: None,
            secret_keys: Vec::new(),
            watched: Arc::new(Mutex::new(Watched::default())),
            pods: BTreeMap::new(),
            failed: Vec::new(),
            next: 0,
        })
    }

    /// The namespace the cluster lives in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Create the cluster's ConfigMap and credentials Secret and start
    /// watching its pods. The API server's refusal (no such namespace, no
    /// permission, a cluster of that name exists) comes back in its words.
    pub fn create(&mut self) -> Result<(), BackendError> {
        let refused =
            |what: &str, e: kube::Error| BackendError::ScaleUp(format!("Kubernetes refused {what}: {}", api_error(&e)));
        let owner: ConfigMap =
            serde_json::from_value(self.manifests.owner()).map_err(|e| BackendError::ScaleUp(e.to_string()))?;
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        let owner_name = self.manifests.owner_name();
        let created = self
            .rt
            .block_on(cms.create(&PostParams::default(), &owner))
            .map_err(|e| refused(&format!("configmap {owner_name} in namespace {}", self.namespace), e))?;
        let uid = created.metadata.uid.unwrap_or_default();
        self.owner_uid = Some(uid.clone());
        let data = secret_data(&self.credentials)?;
        if !data.is_empty() {
            let secret: Secret = serde_json::from_value(self.manifests.secret(Some(&data), &uid))
                .map_err(|e| BackendError::ScaleUp(e.to_string()))?;
            let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
            self.rt
                .block_on(secrets.create(&PostParams::default(), &secret))
                .map_err(|e| refused(&format!("secret {}", self.manifests.secret_name()), e))?;
            self.secret_keys = secret_env().into_iter().map(|(_, k)| k).filter(|k| data.contains_key(*k)).collect();
        }
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        self.rt.spawn(watch_pods(pods, self.manifests.selector(), self.watched.clone()));
        tracing::info!("created {owner_name} in namespace {}", self.namespace);
        Ok(())
    }

    /// The manifest of the next worker's pod.
    fn next_pod(&mut self) -> Result<(String, Pod), BackendError> {
        let name = format!("{}-worker-{}", self.manifests.cluster, self.next);
        self.next += 1;
        let uid = self.owner_uid.clone().unwrap_or_default();
        let v = self.manifests.pod(&name, &self.secret_keys, &uid)?;
        let pod = serde_json::from_value(v).map_err(|e| BackendError::ScaleUp(format!("pod manifest: {e}")))?;
        Ok((name, pod))
    }

    fn delete_pods(&self, names: &[String]) -> Result<(), String> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let mut errors = Vec::new();
        for n in names {
            match self.rt.block_on(pods.delete(n, &DeleteParams::default())) {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => errors.push(format!("pod {n}: {}", api_error(&e))),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

/// List, then watch from the list's resourceVersion; relist when the
/// server says the version is too old (410) or the stream fails.
async fn watch_pods(api: Api<Pod>, selector: String, watched: Arc<Mutex<Watched>>) {
    let mut pause = Duration::from_millis(200);
    loop {
        let list = match api.list(&ListParams::default().labels(&selector)).await {
            Ok(l) => l,
            Err(e) => {
                watched.lock().expect("watch state").error = Some(api_error(&e));
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        let mut version = list.metadata.resource_version.clone().unwrap_or_default();
        {
            let mut w = watched.lock().expect("watch state");
            w.pods = list.items.iter().filter_map(seen).collect();
            w.synced = true;
            w.error = None;
        }
        pause = Duration::from_millis(200);
        'watch: loop {
            let params = WatchParams::default().labels(&selector).timeout(290);
            let stream = match api.watch(&params, &version).await {
                Ok(s) => s,
                Err(e) => {
                    watched.lock().expect("watch state").error = Some(api_error(&e));
                    break 'watch;
                }
            };
            futures_util::pin_mut!(stream);
            loop {
                match stream.try_next().await {
                    Ok(Some(event)) => {
                        let mut w = watched.lock().expect("watch state");
                        match event {
                            WatchEvent::Added(p) | WatchEvent::Modified(p) => {
                                version = p.metadata.resource_version.clone().unwrap_or(version);
                                if let Some((n, s)) = seen(&p) {
                                    w.pods.insert(n, s);
                                }
                            }
                            WatchEvent::Deleted(p) => {
                                version = p.metadata.resource_version.clone().unwrap_or(version);
                                if let Some(n) = &p.metadata.name {
                                    w.pods.remove(n);
                                }
                            }
                            WatchEvent::Bookmark(b) => version = b.metadata.resource_version,
                            WatchEvent::Error(s) => {
                                if s.code != 410 {
                                    w.error = Some(format!("{} ({})", s.message, s.reason));
                                }
                                break 'watch;
                            }
                        }
                    }
                    // The server ended the watch (its timeout): go on from where we are.
                    Ok(None) => continue 'watch,
                    Err(e) => {
                        watched.lock().expect("watch state").error = Some(api_error(&e));
                        tokio::time::sleep(pause).await;
                        break 'watch;
                    }
                }
            }
        }
    }
}

impl Backend for KubernetesBackend {
    fn kind(&self) -> &'static str {
        "kubernetes"
    }

    fn scale_up(&mut self, n: usize) -> Result<(), BackendError> {
        if self.owner_uid.is_none() {
            self.create()?;
        }
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        while self.pods.len() < n {
            let (name, pod) = self.next_pod()?;
            self.rt
                .block_on(pods.create(&PostParams::default(), &pod))
                .map_err(|e| BackendError::ScaleUp(format!("Kubernetes refused pod {name}: {}", api_error(&e))))?;
            tracing::info!("created pod {name}");
            self.pods.insert(name, Ours { created: Instant::now(), seen: false });
        }
        Ok(())
    }

    fn scale_down(&mut self, names: &[String]) -> Result<(), BackendError> {
        let ours: Vec<String> = names.iter().filter(|n| self.pods.contains_key(*n)).cloned().collect();
        self.delete_pods(&ours).map_err(BackendError::ScaleDown)?;
        for n in &ours {
            self.pods.remove(n);
        }
        Ok(())
    }

    fn workers(&mut self) -> Result<Vec<WorkerRecord>, BackendError> {
        let mut out = std::mem::take(&mut self.failed);
        let watched = self.watched.lock().expect("watch state");
        if !watched.synced && !self.pods.is_empty() {
            if let Some(e) = &watched.error {
                return Err(BackendError::Status(format!("Kubernetes: {e}")));
            }
        }
        let mut ended = Vec::new();
        for (name, ours) in self.pods.iter_mut() {
            let Some(pod) = watched.pods.get(name) else {
                if ours.seen {
                    ended.push((name.clone(), "the pod was deleted outside dask-rs".to_string(), false));
                } else {
                    let waited = ours.created.elapsed().as_secs();
                    out.push(WorkerRecord {
                        name: name.clone(),
                        status: WorkerStatus::Pending,
                        detail: format!("created {waited} s ago"),
                    });
                }
                continue;
            };
            ours.seen = true;
            if pod.deleting && !matches!(pod.state, PodState::Failed(_)) {
                ended.push((name.clone(), "the pod is being deleted outside dask-rs".to_string(), false));
                continue;
            }
            match pod.state.clone() {
                PodState::Pending(why) => {
                    out.push(WorkerRecord { name: name.clone(), status: WorkerStatus::Pending, detail: why })
                }
                PodState::Running(on) => {
                    out.push(WorkerRecord { name: name.clone(), status: WorkerStatus::Running, detail: on })
                }
                PodState::Failed(why) => ended.push((name.clone(), why, true)),
            }
        }
        drop(watched);
        let mut remove = Vec::new();
        for (name, why, delete) in ended {
            self.pods.remove(&name);
            if delete {
                remove.push(name.clone());
            }
            out.push(WorkerRecord { name, status: WorkerStatus::Failed, detail: why });
        }
        // A failed pod stays until deleted: remove it, its replacement is a new pod.
        if let Err(e) = self.delete_pods(&remove) {
            tracing::warn!("{e}");
        }
        Ok(out)
    }

    fn close(&mut self) -> Result<(), BackendError> {
        let owner = self.manifests.owner_name();
        let selector = format!("{CLUSTER_LABEL}={}", self.manifests.cluster);
        let r =
            self.rt.block_on(remove_cluster(&self.client, &self.namespace, &owner, &selector, Duration::from_secs(60)));
        self.pods.clear();
        self.owner_uid = None;
        r.map_err(BackendError::ScaleDown)
    }
}

/// Delete a cluster's pods, Secret and ConfigMap, and wait until no pod is left.
async fn remove_cluster(
    client: &kube::Client,
    namespace: &str,
    owner: &str,
    selector: &str,
    timeout: Duration,
) -> Result<(), String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let lp = ListParams::default().labels(selector);
    let mut errors = Vec::new();
    if let Err(e) = pods.delete_collection(&DeleteParams::default(), &lp).await {
        errors.push(format!("pods: {}", api_error(&e)));
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    if let Err(e) = secrets.delete_collection(&DeleteParams::default(), &lp).await {
        errors.push(format!("secrets: {}", api_error(&e)));
    }
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    match cms.delete(owner, &DeleteParams::background()).await {
        Ok(_) => {}
        Err(e) if is_not_found(&e) => {}
        Err(e) => errors.push(format!("configmap {owner}: {}", api_error(&e))),
    }
    let deadline = Instant::now() + timeout;
    loop {
        match pods.list(&lp).await {
            Ok(l) if l.items.is_empty() => break,
            Ok(l) if Instant::now() > deadline => {
                let names: Vec<String> = l.items.into_iter().filter_map(|p| p.metadata.name).collect();
                errors.push(format!("pods still terminating: {}", names.join(", ")));
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            Err(e) => {
                errors.push(format!("listing pods: {}", api_error(&e)));
                break;
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

fn block_on<F: std::future::Future>(f: F) -> Result<F::Output, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    Ok(rt.block_on(f))
}

/// Remove a cluster's objects (for `dask-ctl down` after its manager died).
pub fn cleanup(cluster: &str, target: &Target) -> Result<(), String> {
    block_on(async {
        let (client, namespace) = target.connect().await?;
        let selector = format!("{CLUSTER_LABEL}={cluster}");
        remove_cluster(&client, &namespace, &format!("dask-rs-{cluster}"), &selector, Duration::from_secs(60)).await
    })?
}

/// The cluster's objects still on the server.
pub fn alive(cluster: &str, target: &Target) -> Result<Vec<String>, String> {
    block_on(async {
        let (client, namespace) = target.connect().await?;
        let lp = ListParams::default().labels(&format!("{CLUSTER_LABEL}={cluster}"));
        let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        let mut left: Vec<String> = pods
            .list(&lp)
            .await
            .map_err(|e| api_error(&e))?
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name.map(|n| format!("pod {n}")))
            .collect();
        let cms: Api<ConfigMap> = Api::namespaced(client, &namespace);
        match cms.get_opt(&format!("dask-rs-{cluster}")).await {
            Ok(Some(_)) => left.push(format!("configmap dask-rs-{cluster}")),
            Ok(None) => {}
            Err(e) => return Err(api_error(&e)),
        }
        Ok(left)
    })?
}

impl Deployer for KubernetesBackend {
    fn owned(&self) -> Vec<Owned> {
        if self.owner_uid.is_none() {
            return Vec::new();
        }
        let target = Target { namespace: Some(self.namespace.clone()), ..self.target.clone() };
        vec![Owned::Kubernetes { name: self.manifests.cluster.clone(), target }]
    }
}

/// The manifests `up` would create, as YAML documents (`dask-ctl job-script`).
pub fn render(
    cluster: &str,
    opts: &WorkerOptions,
    scheduler: &str,
    with_credentials: bool,
) -> Result<String, BackendError> {
    let namespace = opts.namespace.clone().unwrap_or_else(|| "default".into());
    let m = Manifests::new(cluster, &namespace, opts, &opts.contact(scheduler))?;
    let keys: Vec<&str> = if with_credentials { secret_env().map(|(_, k)| k).to_vec() } else { Vec::new() };
    let uid = "<uid of the configmap>";
    let mut docs = vec![m.owner()];
    if with_credentials {
        docs.push(m.secret(None, uid));
    }
    docs.push(m.pod(&format!("{cluster}-worker-0"), &keys, uid)?);
    let mut out = String::new();
    for d in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&d).map_err(|e| BackendError::ScaleUp(e.to_string()))?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_states_in_kubernetes_words() {
        let pending = json!({"status": {"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
             "message": "0/1 nodes are available: 1 Insufficient cpu."}]}});
        assert_eq!(
            pod_state(&pending),
            PodState::Pending("Unschedulable: 0/1 nodes are available: 1 Insufficient cpu.".into())
        );
        let pull = json!({"status": {"phase": "Pending", "containerStatuses": [
            {"state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"nope\""}}}]}});
        assert_eq!(pod_state(&pull), PodState::Failed("ImagePullBackOff: Back-off pulling image \"nope\"".into()));
        let oom = json!({"status": {"phase": "Failed", "containerStatuses": [
            {"state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}]}});
        assert_eq!(pod_state(&oom), PodState::Failed("Failed: OOMKilled (exit code 137)".into()));
        let evicted = json!({"status": {"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."}});
        assert_eq!(pod_state(&evicted), PodState::Failed("Evicted: The node was low on resource: memory.".into()));
        let running = json!({"spec": {"nodeName": "n1"}, "status": {"phase": "Running"}});
        assert_eq!(pod_state(&running), PodState::Running("Running on n1".into()));
    }

    #[test]
    fn quantities_and_tolerations() {
        assert_eq!(cpu_quantity(0.5), "500m");
        assert_eq!(cpu_quantity(2.0), "2");
        assert_eq!(memory_quantity("4Gi").unwrap(), "4Gi");
        assert_eq!(memory_quantity("4GiB").unwrap(), (4u64 << 30).to_string());
        // Kubernetes' suffixes mean what Dask's do.
        assert_eq!(parse_bytes("512Mi"), Some(512 << 20));
        assert_eq!(parse_bytes("1G"), Some(1_000_000_000));
        assert_eq!(
            toleration("gpu=true:NoSchedule").unwrap(),
            json!({"key": "gpu", "operator": "Equal", "value": "true", "effect": "NoSchedule"})
        );
        assert_eq!(toleration("spot").unwrap(), json!({"key": "spot", "operator": "Exists"}));
        assert!(toleration("gpu:Sometimes").is_err());
        assert_eq!(base64(b"ab"), "YWI=");
        assert!(check_name("Bad_Name").is_err() && check_name("kube-1a2b").is_ok());
    }

    #[test]
    fn a_template_goes_under_the_generated_pod() {
        let template = json!({"metadata": {"labels": {"team": "geo"}}, "spec": {
            "volumes": [{"name": "scratch", "emptyDir": {}}],
            "containers": [{"name": "worker", "image": "theirs", "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]},
                           {"name": "sidecar", "image": "busybox"}]}});
        let ours = json!({"metadata": {"name": "c-worker-0", "labels": {"dask-rs/cluster": "c"}}, "spec": {
            "restartPolicy": "Never", "containers": [{"name": "worker", "image": "ours", "command": ["python"]}]}});
        let p = merge_pod(template, ours);
        assert_eq!(p["metadata"]["labels"], json!({"team": "geo", "dask-rs/cluster": "c"}));
        assert_eq!(p["spec"]["containers"][0]["image"], "ours");
        assert_eq!(p["spec"]["containers"][0]["volumeMounts"][0]["mountPath"], "/scratch");
        assert_eq!(p["spec"]["containers"][1]["name"], "sidecar");
        assert_eq!(p["spec"]["volumes"][0]["name"], "scratch");
    }

    /// The manifests for a table of option combinations, compared with the
    /// files under `tests/snapshots/` (`UPDATE_SNAPSHOTS=1` rewrites them).
    #[test]
    fn manifests_match_snapshots() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots");
        let template = std::env::temp_dir().join(format!("dask-rs-pod-template-{}.yaml", std::process::id()));
        std::fs::write(
            &template,
            "spec:\n  volumes:\n  - name: scratch\n    emptyDir: {}\n  containers:\n  - name: worker\n    volumeMounts:\n    - name: scratch\n      mountPath: /scratch\n",
        )
        .unwrap();
        let base = WorkerOptions {
            python: "python3".into(),
            processes: 1,
            image: Some("ghcr.io/example/dask-rs:0.1".into()),
            ..Default::default()
        };
        let cases = [
            ("minimal", base.clone(), false),
            (
                "full",
                WorkerOptions {
                    namespace: Some("science".into()),
                    cpus: Some(1.5),
                    cpu_limit: Some("2".into()),
                    memory: Some("4Gi".into()),
                    pod_memory_limit: Some("6Gi".into()),
                    env: vec!["OMP_NUM_THREADS=1".into()],
                    service_account: Some("dask".into()),
                    node_selector: vec!["pool=compute".into()],
                    tolerations: vec!["spot=true:NoSchedule".into(), "gpu".into()],
                    image_pull_secrets: vec!["regcred".into()],
                    pod_template: Some(template.display().to_string()),
                    worker_extra_args: vec!["--resources".into(), "GPU=1".into()],
                    ..base.clone()
                },
                true,
            ),
        ];
        let update = std::env::var_os("UPDATE_SNAPSHOTS").is_some();
        let mut mismatches = Vec::new();
        for (case, opts, creds) in cases {
            let scheme = if creds { "tls" } else { "tcp" };
            let got = render("geo", &opts, &format!("{scheme}://10.0.0.1:8786"), creds).unwrap();
            // Every document is a valid object of its kind.
            for doc in got.split("---\n").filter(|d| !d.is_empty()) {
                let v: Value = serde_yaml_ng::from_str(doc).unwrap();
                match v["kind"].as_str().unwrap() {
                    "Pod" => drop(serde_json::from_value::<Pod>(v).unwrap()),
                    "Secret" => drop(serde_json::from_value::<Secret>(v).unwrap()),
                    _ => drop(serde_json::from_value::<ConfigMap>(v).unwrap()),
                }
            }
            let path = dir.join(format!("kubernetes-{case}.yaml"));
            if update {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &got).unwrap();
            } else if std::fs::read_to_string(&path).ok().as_deref() != Some(got.as_str()) {
                mismatches.push(format!("{}:\n{got}", path.display()));
            }
        }
        let _ = std::fs::remove_file(&template);
        assert!(mismatches.is_empty(), "manifests differ from their snapshots:\n{}", mismatches.join("\n"));
    }
}
