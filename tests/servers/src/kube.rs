//! A kube-apiserver stand-in with one node whose containers are local
//! processes.
//!
//! The API: core/v1 `pods`, `configmaps`, `secrets`, `services` and
//! `events` in namespaces given at start; create (with `dryRun`), get, list
//! and watch (label selectors, `resourceVersion`, bookmarks, `410 Gone` for
//! versions older than the kept history), replace, merge patch, delete
//! (graceful for pods) and delete-collection; owner-reference garbage
//! collection; `Status` error bodies as the real server writes them. Request
//! bodies are decoded into `k8s-openapi`'s types and any field those types
//! do not know is refused, as `fieldValidation=Strict` does.
//!
//! The node: pods are scheduled after `--schedule-delay` if they fit its
//! `--max-pods`, `--cpus` and labels (else they stay Pending with
//! `PodScheduled=False`, `Unschedulable`, and a `FailedScheduling` event);
//! images containing `--unpullable` end in `ImagePullBackOff`; the first
//! container's command runs with its env (values, `secretKeyRef`,
//! `configMapKeyRef`, `fieldRef`), args and working directory; exit ends
//! the pod Succeeded or Failed with the exit code; a container above its
//! memory limit is killed `OOMKilled`; `POST /fake/evict/NS/NAME` evicts a
//! pod as node pressure would.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};

use crate::procs::{self, Proc};

/// Options of `dask-rs-test-server kube`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Port on 127.0.0.1 (0: any free one; the URL is printed).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Namespaces that exist (repeatable; default: default).
    #[arg(long = "namespace")]
    namespaces: Vec<String>,
    /// Write a kubeconfig for this server here.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Require `Authorization: Bearer TOKEN`.
    #[arg(long, default_value = "test-token")]
    token: String,
    /// How long a pod waits before the scheduler looks at it, e.g. 2s.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    schedule_delay: Duration,
    /// Pods the node runs at once.
    #[arg(long, default_value_t = 110)]
    max_pods: usize,
    /// CPUs the node offers to requests.
    #[arg(long, default_value_t = 64.0)]
    cpus: f64,
    /// A label of the node, KEY=VALUE (repeatable).
    #[arg(long = "node-label")]
    node_labels: Vec<String>,
    /// Images containing this text cannot be pulled.
    #[arg(long, default_value = "does-not-exist")]
    unpullable: String,
    /// Where container sandboxes (working directories, output) go.
    #[arg(long)]
    sandbox: PathBuf,
    /// Watch events kept for resuming watches (older versions get 410 Gone).
    #[arg(long, default_value_t = 10_000)]
    history: usize,
    /// End every watch after this many seconds, whatever the client asked
    /// (as API servers behind load balancers do).
    #[arg(long)]
    max_watch_seconds: Option<u64>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, mult) = match s.strip_suffix("ms") {
        Some(n) => (n, 0.001),
        None => (s.strip_suffix('s').unwrap_or(s), 1.0),
    };
    num.parse::<f64>().map(|n| Duration::from_secs_f64(n * mult)).map_err(|e| format!("{s:?}: {e}"))
}

const NODE: &str = "dask-rs-test-node";

/// The resources served, with their kinds.
const RESOURCES: &[(&str, &str)] = &[
    ("pods", "Pod"),
    ("configmaps", "ConfigMap"),
    ("secrets", "Secret"),
    ("services", "Service"),
    ("events", "Event"),
];

fn kind_of(resource: &str) -> Option<&'static str> {
    RESOURCES.iter().find(|(r, _)| *r == resource).map(|(_, k)| *k)
}

/// One change, as watches see it.
#[derive(Clone)]
struct Change {
    version: u64,
    resource: String,
    namespace: String,
    kind: &'static str,
    object: Value,
}

/// A container process and what the node knows of it.
struct Container {
    proc: Proc,
    oom: bool,
    terminated: bool,
}

type Key = (String, String, String);

struct Store {
    args: Args,
    objects: BTreeMap<Key, Value>,
    version: u64,
    history: VecDeque<Change>,
    changes: broadcast::Sender<Change>,
    namespaces: BTreeSet<String>,
    containers: BTreeMap<(String, String), Container>,
    /// When each pod was created (the scheduling delay counts from it).
    created: BTreeMap<(String, String), Instant>,
    next_uid: u64,
}

type Shared = Arc<Mutex<Store>>;

/// A `Status` error body.
fn status(code: StatusCode, reason: &str, message: String, details: Value) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "details": details, "code": code.as_u16(),
    });
    (code, Json(body)).into_response()
}

fn not_found(resource: &str, name: &str) -> Response {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("{resource} \"{name}\" not found"),
        json!({"name": name, "kind": resource}),
    )
}

fn no_such_resource() -> Response {
    status(StatusCode::NOT_FOUND, "NotFound", "the server could not find the requested resource".into(), json!({}))
}

fn bad_request(message: String) -> Response {
    status(StatusCode::BAD_REQUEST, "BadRequest", message, json!({}))
}

/// Fields of `input` that decoding into the typed object dropped (`typed`
/// is the object decoded and encoded again).
fn unknown_fields(input: &Value, typed: &Value, path: &str, out: &mut Vec<String>) {
    match (input, typed) {
        (Value::Object(i), Value::Object(t)) => {
            for (k, v) in i {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                match t.get(k) {
                    None if !v.is_null() => out.push(p),
                    None => {}
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

/// Decode `body` as the resource's type, strictly.
fn decode(resource: &str, body: &Value) -> Result<Value, String> {
    use k8s_openapi::api::core::v1 as core;
    fn round<T: serde::de::DeserializeOwned + serde::Serialize>(v: &Value) -> Result<Value, String> {
        let t: T = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
        serde_json::to_value(t).map_err(|e| e.to_string())
    }
    let typed = match resource {
        "pods" => round::<core::Pod>(body),
        "configmaps" => round::<core::ConfigMap>(body),
        "secrets" => round::<core::Secret>(body),
        "services" => round::<core::Service>(body),
        "events" => round::<core::Event>(body),
        _ => Err(format!("no such resource {resource}")),
    }?;
    let mut unknown = Vec::new();
    unknown_fields(body, &typed, "", &mut unknown);
    if unknown.is_empty() {
        Ok(typed)
    } else {
        let list: Vec<String> = unknown.iter().map(|u| format!("unknown field \"{u}\"")).collect();
        Err(format!("strict decoding error: {}", list.join(", ")))
    }
}

/// A parsed label selector: `k=v`, `k==v`, `k!=v`, `k`, `!k`.
fn matches(selector: &str, labels: &Value) -> bool {
    selector.split(',').map(str::trim).filter(|s| !s.is_empty()).all(|term| {
        let get = |k: &str| labels.get(k.trim()).and_then(Value::as_str);
        if let Some((k, v)) = term.split_once("!=") {
            get(k) != Some(v.trim())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            get(k) == Some(v.trim())
        } else if let Some(k) = term.strip_prefix('!') {
            get(k).is_none()
        } else {
            get(term).is_some()
        }
    })
}

/// RFC 7386 merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().expect("object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn now() -> String {
    procs::rfc3339(SystemTime::now())
}

/// Bytes in a memory quantity.
fn quantity_bytes(q: &str) -> Option<u64> {
    let split = q.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(q.len());
    let (num, unit) = q.split_at(split);
    let num: f64 = num.parse().ok()?;
    let mult: f64 = match unit {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        _ => return None,
    };
    Some((num * mult) as u64)
}

fn cpu_quantity(q: &str) -> f64 {
    match q.strip_suffix('m') {
        Some(m) => m.parse::<f64>().unwrap_or(0.0) / 1000.0,
        None => q.parse().unwrap_or(0.0),
    }
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32;
        buf = buf << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
            buf &= (1 << bits) - 1;
        }
    }
    Some(out)
}

impl Store {
    fn bump(&mut self) -> u64 {
        self.version += 1;
        self.version
    }

    /// Record a change (the object's resourceVersion set to a new one) and tell watchers.
    fn emit(&mut self, resource: &str, namespace: &str, kind: &'static str, mut object: Value) -> Value {
        let v = self.bump();
        object["metadata"]["resourceVersion"] = json!(v.to_string());
        let change =
            Change { version: v, resource: resource.into(), namespace: namespace.into(), kind, object: object.clone() };
        if self.history.len() >= self.args.history {
            self.history.pop_front();
        }
        self.history.push_back(change.clone());
        let _ = self.changes.send(change);
        object
    }

    /// Store an object (a new version of it) and tell watchers.
    fn put(&mut self, resource: &str, namespace: &str, name: &str, object: Value, added: bool) -> Value {
        let object = self.emit(resource, namespace, if added { "ADDED" } else { "MODIFIED" }, object);
        self.objects.insert((resource.into(), namespace.into(), name.into()), object.clone());
        object
    }

    /// Remove an object now, and collect what it owned.
    fn remove(&mut self, resource: &str, namespace: &str, name: &str, orphan: bool) -> Option<Value> {
        let obj = self.objects.remove(&(resource.into(), namespace.into(), name.into()))?;
        if resource == "pods" {
            self.containers.remove(&(namespace.to_string(), name.to_string()));
            self.created.remove(&(namespace.to_string(), name.to_string()));
        }
        let obj = self.emit(resource, namespace, "DELETED", obj);
        if !orphan {
            let uid = obj["metadata"]["uid"].as_str().unwrap_or("").to_string();
            let owned: Vec<Key> = self
                .objects
                .iter()
                .filter(|(_, o)| {
                    o["metadata"]["ownerReferences"].as_array().is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid))
                })
                .map(|(k, _)| k.clone())
                .collect();
            for (r, ns, n) in owned {
                self.delete(&r, &ns, &n, None, false);
            }
        }
        Some(obj)
    }

    /// Delete: pods with a running container terminate gracefully first.
    fn delete(
        &mut self,
        resource: &str,
        namespace: &str,
        name: &str,
        grace: Option<i64>,
        orphan: bool,
    ) -> Option<Value> {
        let key = (resource.to_string(), namespace.to_string(), name.to_string());
        let obj = self.objects.get(&key)?.clone();
        let running = self.containers.get(&(namespace.to_string(), name.to_string())).is_some_and(|c| !c.terminated);
        if resource == "pods" && running && grace != Some(0) {
            if obj["metadata"]["deletionTimestamp"].is_string() {
                return Some(obj);
            }
            let grace = grace.or(obj["spec"]["terminationGracePeriodSeconds"].as_i64()).unwrap_or(30);
            let mut o = obj;
            o["metadata"]["deletionTimestamp"] = json!(now());
            o["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
            if let Some(c) = self.containers.get(&(namespace.to_string(), name.to_string())) {
                c.proc.signal(libc::SIGTERM);
            }
            return Some(self.put(resource, namespace, name, o, false));
        }
        self.remove(resource, namespace, name, orphan)
    }

    fn list(&self, resource: &str, namespace: Option<&str>, selector: &str) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((r, ns, _), o)| {
                r == resource && namespace.is_none_or(|n| n == ns) && matches(selector, &o["metadata"]["labels"])
            })
            .map(|(_, o)| o.clone())
            .collect()
    }

    fn event(&mut self, namespace: &str, pod: &str, reason: &str, message: &str, kind: &str) {
        let uid = self.next_uid;
        self.next_uid += 1;
        let name = format!("{pod}.{uid:x}");
        let ev = json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": { "name": name, "namespace": namespace, "uid": format!("ev-{uid}"), "creationTimestamp": now() },
            "involvedObject": { "kind": "Pod", "name": pod, "namespace": namespace, "apiVersion": "v1" },
            "reason": reason, "message": message, "type": kind, "count": 1,
            "firstTimestamp": now(), "lastTimestamp": now(), "source": { "component": "dask-rs-test-node" },
        });
        self.put("events", namespace, &name, ev, true);
    }

    /// One pass of the node over every pod.
    fn run_node(&mut self) {
        let pods: Vec<(String, String, Value)> = self
            .objects
            .iter()
            .filter(|((r, _, _), _)| r == "pods")
            .map(|((_, ns, n), o)| (ns.clone(), n.clone(), o.clone()))
            .collect();
        let scheduled: Vec<&Value> = pods
            .iter()
            .map(|(_, _, p)| p)
            .filter(|p| {
                p["spec"]["nodeName"].is_string()
                    && !matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))
            })
            .collect();
        let mut in_use = scheduled.len();
        let mut cpus_used: f64 = scheduled.iter().map(|p| pod_cpu(p)).sum();
        for (ns, name, pod) in pods {
            let key = (ns.clone(), name.clone());
            let deleting = pod["metadata"]["deletionTimestamp"].is_string();
            // Graceful deletion: wait for the container, then remove.
            if deleting {
                let grace = pod["metadata"]["deletionGracePeriodSeconds"].as_u64().unwrap_or(30);
                let c = self.containers.get_mut(&key);
                let gone = match c {
                    None => true,
                    Some(c) => {
                        if c.proc.try_wait().is_some() {
                            true
                        } else {
                            let ts = pod["metadata"]["deletionTimestamp"].as_str().unwrap_or("");
                            if elapsed_since(ts) > grace as f64 {
                                c.proc.signal(libc::SIGKILL);
                            }
                            false
                        }
                    }
                };
                if gone {
                    self.remove("pods", &ns, &name, false);
                }
                continue;
            }
            let phase = pod["status"]["phase"].as_str().unwrap_or("Pending").to_string();
            if phase == "Succeeded" || phase == "Failed" {
                continue;
            }
            if !pod["spec"]["nodeName"].is_string() {
                let created = self.created.get(&key).copied().unwrap_or_else(Instant::now);
                if created.elapsed() < self.args.schedule_delay {
                    continue;
                }
                let cpu = pod_cpu(&pod);
                let selector_ok = pod["spec"]["nodeSelector"].as_object().is_none_or(|sel| {
                    sel.iter().all(|(k, v)| {
                        self.args
                            .node_labels
                            .iter()
                            .any(|l| l.split_once('=') == Some((k.as_str(), v.as_str().unwrap_or(""))))
                    })
                });
                let why = if !selector_ok {
                    Some("0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector.")
                } else if in_use >= self.args.max_pods {
                    Some("0/1 nodes are available: 1 Too many pods.")
                } else if cpus_used + cpu > self.args.cpus + 1e-9 {
                    Some("0/1 nodes are available: 1 Insufficient cpu.")
                } else {
                    None
                };
                let mut p = pod.clone();
                match why {
                    Some(msg) => {
                        let already = p["status"]["conditions"][0]["message"].as_str() == Some(msg);
                        if !already {
                            p["status"]["conditions"] = json!([{
                                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                "message": msg, "lastTransitionTime": now(),
                            }]);
                            self.put("pods", &ns, &name, p, false);
                            self.event(&ns, &name, "FailedScheduling", msg, "Warning");
                        }
                    }
                    None => {
                        in_use += 1;
                        cpus_used += cpu;
                        p["spec"]["nodeName"] = json!(NODE);
                        p["status"]["conditions"] =
                            json!([{ "type": "PodScheduled", "status": "True", "lastTransitionTime": now() }]);
                        p["status"]["hostIP"] = json!("127.0.0.1");
                        self.put("pods", &ns, &name, p, false);
                        self.event(
                            &ns,
                            &name,
                            "Scheduled",
                            &format!("Successfully assigned {ns}/{name} to {NODE}"),
                            "Normal",
                        );
                    }
                }
                continue;
            }
            match self.containers.get_mut(&key) {
                None => self.start(&ns, &name, pod),
                Some(c) if !c.terminated => {
                    let exited = c.proc.try_wait();
                    if exited.is_none() {
                        let limit = pod["spec"]["containers"][0]["resources"]["limits"]["memory"]
                            .as_str()
                            .and_then(quantity_bytes);
                        if let Some(limit) = limit {
                            if rss(c.proc.child.id()) > limit {
                                c.oom = true;
                                c.proc.signal(libc::SIGKILL);
                            }
                        }
                        continue;
                    }
                    c.terminated = true;
                    let oom = c.oom;
                    let (code, _) = procs::describe(exited.expect("exited"));
                    let reason = if oom {
                        "OOMKilled"
                    } else if code == 0 {
                        "Completed"
                    } else {
                        "Error"
                    };
                    let mut p = pod.clone();
                    p["status"]["phase"] = json!(if code == 0 && !oom { "Succeeded" } else { "Failed" });
                    let started = p["status"]["containerStatuses"][0]["state"]["running"]["startedAt"].clone();
                    p["status"]["containerStatuses"][0]["state"] = json!({ "terminated": {
                        "exitCode": if oom { 137 } else { code }, "reason": reason, "startedAt": started, "finishedAt": now(),
                    }});
                    p["status"]["containerStatuses"][0]["ready"] = json!(false);
                    self.put("pods", &ns, &name, p, false);
                }
                Some(_) => {}
            }
        }
    }

    /// Pull the image and start the container, or say why not.
    fn start(&mut self, ns: &str, name: &str, pod: Value) {
        let c = &pod["spec"]["containers"][0];
        let image = c["image"].as_str().unwrap_or("");
        let mut p = pod.clone();
        let waiting = |p: &mut Value, reason: &str, message: &str| {
            p["status"]["containerStatuses"] = json!([{
                "name": c["name"], "image": image, "imageID": "", "ready": false, "restartCount": 0, "started": false,
                "state": { "waiting": { "reason": reason, "message": message } },
            }]);
        };
        if !self.args.unpullable.is_empty() && image.contains(&self.args.unpullable) {
            let before =
                pod["status"]["containerStatuses"][0]["state"]["waiting"]["reason"].as_str().unwrap_or("").to_string();
            let (reason, message) = if before.is_empty() {
                ("ErrImagePull", format!("failed to pull and unpack image \"{image}\": not found"))
            } else {
                ("ImagePullBackOff", format!("Back-off pulling image \"{image}\""))
            };
            if before != reason {
                waiting(&mut p, reason, &message);
                self.put("pods", ns, name, p, false);
                self.event(ns, name, if reason == "ErrImagePull" { "Failed" } else { "BackOff" }, &message, "Warning");
            }
            return;
        }
        let mut env: Vec<(String, String)> = Vec::new();
        for e in c["env"].as_array().into_iter().flatten() {
            let var = e["name"].as_str().unwrap_or("").to_string();
            let value = if let Some(v) = e["value"].as_str() {
                Ok(v.to_string())
            } else if let Some(r) = e["valueFrom"]["secretKeyRef"].as_object() {
                let (sname, skey) = (r["name"].as_str().unwrap_or(""), r["key"].as_str().unwrap_or(""));
                match self.objects.get(&("secrets".into(), ns.into(), sname.into())) {
                    None => Err(format!("secret \"{sname}\" not found")),
                    Some(s) => s["data"][skey]
                        .as_str()
                        .and_then(base64_decode)
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .ok_or_else(|| format!("couldn't find key {skey} in Secret {ns}/{sname}")),
                }
            } else if let Some(r) = e["valueFrom"]["configMapKeyRef"].as_object() {
                let (cname, ckey) = (r["name"].as_str().unwrap_or(""), r["key"].as_str().unwrap_or(""));
                match self.objects.get(&("configmaps".into(), ns.into(), cname.into())) {
                    None => Err(format!("configmap \"{cname}\" not found")),
                    Some(m) => m["data"][ckey]
                        .as_str()
                        .map(String::from)
                        .ok_or_else(|| format!("couldn't find key {ckey} in ConfigMap {ns}/{cname}")),
                }
            } else if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Ok(match path {
                    "metadata.name" => name.to_string(),
                    "metadata.namespace" => ns.to_string(),
                    "status.podIP" | "status.hostIP" => "127.0.0.1".into(),
                    "spec.nodeName" => NODE.into(),
                    _ => String::new(),
                })
            } else {
                Ok(String::new())
            };
            match value {
                Ok(v) => env.push((var, v)),
                Err(msg) => {
                    let before = pod["status"]["containerStatuses"][0]["state"]["waiting"]["reason"].as_str();
                    if before != Some("CreateContainerConfigError") {
                        waiting(&mut p, "CreateContainerConfigError", &msg);
                        self.put("pods", ns, name, p, false);
                        self.event(ns, name, "Failed", &format!("Error: {msg}"), "Warning");
                    }
                    return;
                }
            }
        }
        env.push(("HOSTNAME".into(), name.into()));
        let mut argv: Vec<String> =
            c["command"].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(String::from)).collect();
        argv.extend(c["args"].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(String::from)));
        let sandbox = self.args.sandbox.join(ns).join(name);
        let cwd = c["workingDir"].as_str().map(PathBuf::from).unwrap_or_else(|| sandbox.clone());
        match Proc::spawn(&argv, &env, &sandbox, &cwd) {
            Ok(proc) => {
                self.containers.insert((ns.into(), name.into()), Container { proc, oom: false, terminated: false });
                p["status"]["phase"] = json!("Running");
                p["status"]["podIP"] = json!("127.0.0.1");
                p["status"]["startTime"] = json!(now());
                p["status"]["containerStatuses"] = json!([{
                    "name": c["name"], "image": image, "imageID": format!("{image}@sha256:test"), "ready": true,
                    "restartCount": 0, "started": true, "state": { "running": { "startedAt": now() } },
                }]);
                p["status"]["conditions"] = json!([
                    { "type": "PodScheduled", "status": "True" }, { "type": "Ready", "status": "True" },
                ]);
                self.put("pods", ns, name, p, false);
                self.event(ns, name, "Started", "Started container worker", "Normal");
            }
            Err(e) => {
                let msg = format!(
                    "failed to create containerd task: exec: {:?}: {e}",
                    argv.first().cloned().unwrap_or_default()
                );
                self.containers.remove(&(ns.to_string(), name.to_string()));
                p["status"]["phase"] = json!("Failed");
                p["status"]["containerStatuses"] = json!([{
                    "name": c["name"], "image": image, "ready": false, "restartCount": 0,
                    "state": { "terminated": { "exitCode": 128, "reason": "StartError", "message": msg } },
                }]);
                self.put("pods", ns, name, p, false);
            }
        }
    }
}

fn pod_cpu(p: &Value) -> f64 {
    p["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c["resources"]["requests"]["cpu"].as_str().map(cpu_quantity).unwrap_or(0.0))
        .sum()
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Seconds since an RFC 3339 time written by [`now`] (whole seconds).
fn elapsed_since(ts: &str) -> f64 {
    let parse = || -> Option<u64> {
        let (date, time) = ts.trim_end_matches('Z').split_once('T')?;
        let d: Vec<i64> = date.split('-').map(|x| x.parse().ok()).collect::<Option<_>>()?;
        let t: Vec<u64> = time.split(':').map(|x| x.parse().ok()).collect::<Option<_>>()?;
        let (y, m, day) = (d[0] - (d[1] <= 2) as i64, d[1], d[2]);
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = (m + 9) % 12;
        let doy = (153 * mp + 2) / 5 + day - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        Some(days as u64 * 86400 + t[0] * 3600 + t[1] * 60 + t[2])
    };
    match parse() {
        Some(secs) => now_ms() as f64 / 1000.0 - secs as f64,
        None => 0.0,
    }
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn authorized(store: &Store, headers: &HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {}", store.args.token))
}

fn unauthorized() -> Response {
    status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized".into(), json!({}))
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Params {
    #[serde(default)]
    label_selector: Option<String>,
    #[serde(default)]
    watch: Option<String>,
    #[serde(default)]
    resource_version: Option<String>,
    #[serde(default)]
    allow_watch_bookmarks: Option<bool>,
    #[serde(default)]
    timeout_seconds: Option<u64>,
    #[serde(default)]
    dry_run: Option<String>,
    #[serde(default)]
    grace_period_seconds: Option<i64>,
    #[serde(default)]
    propagation_policy: Option<String>,
}

fn list_kind(resource: &str) -> String {
    format!("{}List", kind_of(resource).unwrap_or("Object"))
}

async fn collection(
    State(s): State<Shared>,
    method: Method,
    headers: HeaderMap,
    Path((ns, resource)): Path<(String, String)>,
    Query(q): Query<Params>,
    body: String,
) -> Response {
    let Some(kind) = kind_of(&resource) else {
        return no_such_resource();
    };
    if method == Method::GET && q.watch.as_deref().is_some_and(|w| w == "true" || w == "1") {
        {
            let store = s.lock().unwrap();
            if !authorized(&store, &headers) {
                return unauthorized();
            }
            if !store.namespaces.contains(&ns) {
                return not_found("namespaces", &ns);
            }
        }
        return watch(s, resource, Some(ns), q).await;
    }
    let mut store = s.lock().unwrap();
    if !authorized(&store, &headers) {
        return unauthorized();
    }
    if !store.namespaces.contains(&ns) {
        return not_found("namespaces", &ns);
    }
    let selector = q.label_selector.clone().unwrap_or_default();
    match method {
        Method::GET => {
            let items = store.list(&resource, Some(&ns), &selector);
            Json(json!({ "kind": list_kind(&resource), "apiVersion": "v1", "metadata": { "resourceVersion": store.version.to_string() }, "items": items })).into_response()
        }
        Method::POST => {
            let Ok(input) = serde_json::from_str::<Value>(&body) else {
                return bad_request("the body of the request was in an unknown format".into());
            };
            let mut obj = match decode(&resource, &input) {
                Ok(o) => o,
                Err(e) => return bad_request(format!("{kind} in version \"v1\" cannot be handled as a {kind}: {e}")),
            };
            let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
            if name.is_empty() {
                return status(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    format!("{kind} \"\" is invalid: metadata.name: Required value: name or generateName is required"),
                    json!({"kind": resource}),
                );
            }
            let valid_name = name.len() <= 253
                && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
            if !valid_name {
                return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", format!("{kind} \"{name}\" is invalid: metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'"), json!({"name": name, "kind": resource}));
            }
            if obj["metadata"]["namespace"].as_str().is_some_and(|n| n != ns) {
                return bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request".into(),
                );
            }
            if resource == "pods" {
                let containers = obj["spec"]["containers"].as_array().map_or(0, Vec::len);
                if containers == 0 {
                    return status(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "Invalid",
                        format!("Pod \"{name}\" is invalid: spec.containers: Required value"),
                        json!({"name": name, "kind": "Pod"}),
                    );
                }
            }
            if store.objects.contains_key(&(resource.clone(), ns.clone(), name.clone())) {
                return status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    format!("{resource} \"{name}\" already exists"),
                    json!({"name": name, "kind": resource}),
                );
            }
            if q.dry_run.as_deref() == Some("All") {
                return (StatusCode::CREATED, Json(obj)).into_response();
            }
            store.next_uid += 1;
            let uid = format!("00000000-0000-4000-8000-{:012x}", store.next_uid);
            obj["apiVersion"] = json!("v1");
            obj["kind"] = json!(kind);
            obj["metadata"]["namespace"] = json!(ns);
            obj["metadata"]["uid"] = json!(uid);
            obj["metadata"]["creationTimestamp"] = json!(now());
            if resource == "pods" {
                store.created.insert((ns.clone(), name.clone()), Instant::now());
                obj["status"] = json!({ "phase": "Pending", "qosClass": "Burstable" });
            }
            if resource == "secrets" {
                let string_data = obj.as_object_mut().and_then(|o| o.remove("stringData"));
                for (k, v) in string_data.as_ref().and_then(Value::as_object).into_iter().flatten() {
                    obj["data"][k] = json!(procs::base64(v.as_str().unwrap_or("").as_bytes()));
                }
            }
            let out = store.put(&resource, &ns, &name, obj, true);
            (StatusCode::CREATED, Json(out)).into_response()
        }
        Method::DELETE => {
            let names: Vec<String> = store
                .list(&resource, Some(&ns), &selector)
                .iter()
                .filter_map(|o| o["metadata"]["name"].as_str().map(String::from))
                .collect();
            let (grace, orphan) = delete_options(&q, &body);
            let items: Vec<Value> =
                names.iter().filter_map(|n| store.delete(&resource, &ns, n, grace, orphan)).collect();
            Json(json!({ "kind": list_kind(&resource), "apiVersion": "v1", "metadata": { "resourceVersion": store.version.to_string() }, "items": items })).into_response()
        }
        _ => {
            status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", format!("{method} is not supported"), json!({}))
        }
    }
}

/// Grace period and whether dependents are orphaned, from the query or a DeleteOptions body.
fn delete_options(q: &Params, body: &str) -> (Option<i64>, bool) {
    let opts: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let grace = q.grace_period_seconds.or(opts["gracePeriodSeconds"].as_i64());
    let policy = q.propagation_policy.clone().or(opts["propagationPolicy"].as_str().map(String::from));
    (grace, policy.as_deref() == Some("Orphan"))
}

async fn object(
    State(s): State<Shared>,
    method: Method,
    headers: HeaderMap,
    Path((ns, resource, name)): Path<(String, String, String)>,
    Query(q): Query<Params>,
    body: String,
) -> Response {
    let Some(kind) = kind_of(&resource) else {
        return no_such_resource();
    };
    let mut store = s.lock().unwrap();
    if !authorized(&store, &headers) {
        return unauthorized();
    }
    if !store.namespaces.contains(&ns) {
        return not_found("namespaces", &ns);
    }
    let key = (resource.clone(), ns.clone(), name.clone());
    let Some(current) = store.objects.get(&key).cloned() else {
        return not_found(&resource, &name);
    };
    match method {
        Method::GET => Json(current).into_response(),
        Method::DELETE => {
            let (grace, orphan) = delete_options(&q, &body);
            match store.delete(&resource, &ns, &name, grace, orphan) {
                Some(o) => Json(o).into_response(),
                None => not_found(&resource, &name),
            }
        }
        Method::PUT | Method::PATCH => {
            let Ok(input) = serde_json::from_str::<Value>(&body) else {
                return bad_request("the body of the request was in an unknown format".into());
            };
            let mut next = current.clone();
            if method == Method::PUT {
                next = input;
            } else {
                let ct = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
                if ct.contains("json-patch+json") {
                    return status(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "UnsupportedMediaType",
                        "JSON patches are not supported by this server; use a merge patch".into(),
                        json!({}),
                    );
                }
                merge_patch(&mut next, &input);
            }
            let mut obj = match decode(&resource, &next) {
                Ok(o) => o,
                Err(e) => return bad_request(format!("{kind} in version \"v1\" cannot be handled as a {kind}: {e}")),
            };
            for f in ["uid", "creationTimestamp", "namespace", "name"] {
                obj["metadata"][f] = current["metadata"][f].clone();
            }
            if resource == "pods" {
                // Status belongs to the node.
                obj["status"] = current["status"].clone();
                obj["spec"]["nodeName"] = current["spec"]["nodeName"].clone();
            }
            if q.dry_run.as_deref() == Some("All") {
                return Json(obj).into_response();
            }
            Json(store.put(&resource, &ns, &name, obj, false)).into_response()
        }
        _ => {
            status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", format!("{method} is not supported"), json!({}))
        }
    }
}

/// A watch: the changes after `resourceVersion` (or every object as ADDED
/// when none is given), then live ones, as JSON lines; BOOKMARK events
/// each second when asked; ends after `timeoutSeconds`.
async fn watch(s: Shared, resource: String, ns: Option<String>, q: Params) -> Response {
    let selector = q.label_selector.clone().unwrap_or_default();
    let (tx, rx) = mpsc::channel::<bytes::Bytes>(1024);
    let (mut live, replay, gone, mut sent) = {
        let store = s.lock().unwrap();
        let live = store.changes.subscribe();
        let from: Option<u64> =
            q.resource_version.as_deref().filter(|v| !v.is_empty() && *v != "0").and_then(|v| v.parse().ok());
        let oldest = store.history.front().map_or(store.version + 1, |c| c.version);
        let kind = kind_of(&resource).unwrap_or("Object");
        match from {
            Some(v) if v + 1 < oldest => {
                (live, Vec::new(), Some(format!("too old resource version: {v} ({})", oldest - 1)), v)
            }
            Some(v) => {
                let replay: Vec<(String, Value)> = store
                    .history
                    .iter()
                    .filter(|c| {
                        c.version > v && c.resource == resource && ns.as_ref().is_none_or(|n| *n == c.namespace)
                    })
                    .filter(|c| matches(&selector, &c.object["metadata"]["labels"]))
                    .map(|c| (c.kind.to_string(), c.object.clone()))
                    .collect();
                (live, replay, None, store.version.max(v))
            }
            None => {
                let _ = kind;
                let replay = store
                    .list(&resource, ns.as_deref(), &selector)
                    .into_iter()
                    .map(|o| ("ADDED".to_string(), o))
                    .collect();
                (live, replay, None, store.version)
            }
        }
    };
    let bookmarks = q.allow_watch_bookmarks.unwrap_or(false);
    let max = s.lock().unwrap().args.max_watch_seconds.unwrap_or(u64::MAX);
    let timeout = Duration::from_secs(q.timeout_seconds.unwrap_or(1800).min(max));
    let kind = kind_of(&resource).unwrap_or("Object");
    tokio::spawn(async move {
        let line = |t: &str, o: &Value| {
            let mut b = serde_json::to_vec(&json!({ "type": t, "object": o })).unwrap_or_default();
            b.push(b'\n');
            bytes::Bytes::from(b)
        };
        if let Some(msg) = gone {
            let st = json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": msg, "reason": "Expired", "code": 410 });
            let _ = tx.send(line("ERROR", &st)).await;
            return;
        }
        for (t, o) in replay {
            if tx.send(line(&t, &o)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tokio::select! {
                c = live.recv() => match c {
                    Ok(c) => {
                        if c.version <= sent || c.resource != resource || ns.as_ref().is_some_and(|n| *n != c.namespace)
                            || !matches(&selector, &c.object["metadata"]["labels"]) {
                            continue;
                        }
                        sent = c.version;
                        if tx.send(line(c.kind, &c.object)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let st = json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "the watcher fell behind", "reason": "Expired", "code": 410 });
                        let _ = tx.send(line("ERROR", &st)).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    let current = s.lock().unwrap().version;
                    let bm = json!({ "kind": kind, "apiVersion": "v1", "metadata": { "resourceVersion": current.max(sent).to_string() } });
                    if tx.send(line("BOOKMARK", &bm)).await.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    });
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx)) });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn namespaces(State(s): State<Shared>, headers: HeaderMap) -> Response {
    let store = s.lock().unwrap();
    if !authorized(&store, &headers) {
        return unauthorized();
    }
    let items: Vec<Value> = store
        .namespaces
        .iter()
        .map(|n| json!({ "metadata": { "name": n }, "status": { "phase": "Active" } }))
        .collect();
    Json(json!({ "kind": "NamespaceList", "apiVersion": "v1", "metadata": {}, "items": items })).into_response()
}

async fn namespace(State(s): State<Shared>, headers: HeaderMap, Path(ns): Path<String>) -> Response {
    let store = s.lock().unwrap();
    if !authorized(&store, &headers) {
        return unauthorized();
    }
    if !store.namespaces.contains(&ns) {
        return not_found("namespaces", &ns);
    }
    Json(
        json!({ "kind": "Namespace", "apiVersion": "v1", "metadata": { "name": ns }, "status": { "phase": "Active" } }),
    )
    .into_response()
}

async fn version() -> Response {
    Json(json!({ "major": "1", "minor": "33", "gitVersion": "v1.33.0-dask-rs-test", "platform": "linux/amd64" }))
        .into_response()
}

/// Node-pressure eviction of one pod (a test's hook; the real API has none).
async fn evict(State(s): State<Shared>, Path((ns, name)): Path<(String, String)>) -> Response {
    let mut store = s.lock().unwrap();
    let key = ("pods".to_string(), ns.clone(), name.clone());
    let Some(mut pod) = store.objects.get(&key).cloned() else {
        return not_found("pods", &name);
    };
    if let Some(c) = store.containers.get_mut(&(ns.clone(), name.clone())) {
        c.proc.signal(libc::SIGKILL);
        c.terminated = true;
    }
    pod["status"]["phase"] = json!("Failed");
    pod["status"]["reason"] = json!("Evicted");
    pod["status"]["message"] =
        json!("The node was low on resource: memory. Threshold quantity: 100Mi, available: 80Mi.");
    let out = store.put("pods", &ns, &name, pod, false);
    store.event(&ns, &name, "Evicted", "The node was low on resource: memory.", "Warning");
    Json(out).into_response()
}

/// Serve until SIGTERM or SIGINT; then end every container.
pub async fn serve(mut args: Args) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await?;
    let addr = listener.local_addr()?;
    std::fs::create_dir_all(&args.sandbox)?;
    if args.namespaces.is_empty() {
        args.namespaces.push("default".into());
    }
    if let Some(path) = &args.kubeconfig {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: dask-rs-test\n  cluster:\n    server: http://{addr}\n\
             users:\n- name: dask-rs-test\n  user:\n    token: {}\ncontexts:\n- name: dask-rs-test\n  context:\n    \
             cluster: dask-rs-test\n    user: dask-rs-test\n    namespace: {}\ncurrent-context: dask-rs-test\n",
            args.token, args.namespaces[0]
        );
        std::fs::write(path, text)?;
    }
    let (changes, _) = broadcast::channel(4096);
    let store = Store {
        namespaces: args.namespaces.iter().cloned().collect(),
        args,
        objects: BTreeMap::new(),
        version: 1,
        history: VecDeque::new(),
        changes,
        containers: BTreeMap::new(),
        created: BTreeMap::new(),
        next_uid: 0,
    };
    let state: Shared = Arc::new(Mutex::new(store));
    {
        let state = state.clone();
        tokio::spawn(async move {
            loop {
                state.lock().unwrap().run_node();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
    let app = Router::new()
        .route("/version", get(version))
        .route("/api/v1/namespaces", get(namespaces))
        .route("/api/v1/namespaces/{ns}", get(namespace))
        .route("/api/v1/namespaces/{ns}/{resource}", get(collection).post(collection).delete(collection))
        .route("/api/v1/namespaces/{ns}/{resource}/{name}", get(object).delete(object).put(object).patch(object))
        .route("/fake/evict/{ns}/{name}", post(evict))
        .with_state(state.clone());
    crate::serve_until_signal(listener, app, &format!("kube-apiserver at http://{addr}")).await?;
    state.lock().unwrap().containers.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_decoding_names_unknown_fields() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "image": "i", "colour": "red"}], "restartPolicy": "Never", "nope": 1}});
        let err = decode("pods", &pod).unwrap_err();
        assert_eq!(
            err,
            "strict decoding error: unknown field \"spec.containers[0].colour\", unknown field \"spec.nope\""
        );
        let ok = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {"a": "b"}},
            "spec": {"containers": [{"name": "c", "image": "i", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}]}});
        assert!(decode("pods", &ok).is_ok());
    }

    #[test]
    fn selectors_patches_and_times() {
        let labels = json!({"app": "dask-rs", "tier": "worker"});
        assert!(matches("app=dask-rs,tier==worker", &labels));
        assert!(matches("app,!missing,tier!=scheduler", &labels));
        assert!(!matches("app=other", &labels));
        let mut v = json!({"a": {"b": 1, "c": 2}, "d": [1]});
        merge_patch(&mut v, &json!({"a": {"b": null, "e": 3}, "d": [2]}));
        assert_eq!(v, json!({"a": {"c": 2, "e": 3}, "d": [2]}));
        let t = procs::rfc3339(SystemTime::now() - Duration::from_secs(100));
        assert!((elapsed_since(&t) - 100.0).abs() < 2.0, "{}", elapsed_since(&t));
        assert_eq!(base64_decode(&procs::base64(b"hello, pod")).unwrap(), b"hello, pod");
        assert_eq!(cpu_quantity("500m"), 0.5);
    }
}
