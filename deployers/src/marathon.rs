//! The Marathon backend: one Marathon app per cluster whose tasks are the
//! workers. Scaling up sets the app's `instances`; scaling down kills exactly
//! the retired workers' tasks with `scale=true`, so Marathon neither restarts
//! them nor another task in their place. A worker's name is its Marathon
//! task id (`--name "$MESOS_TASK_ID"`), which is how retired workers map to
//! tasks. Marathon replaces tasks that die by itself, with its own back-off
//! (`backoffSeconds`, `backoffFactor`); this module reports each such death
//! once, with Marathon's `lastTaskFailure` words.
//!
//! This module owns the app definition, the REST calls (`/v2/apps`,
//! `/v2/apps/{id}/tasks`, `/v2/tasks/delete`, `/v2/deployments`) and the
//! mapping of Mesos task states to pending / running / failed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{json, Value};

use crate::{parse_bytes, sh_quote, Backend, BackendError, Credentials, Deployer, Owned, WorkerOptions, WorkerRecord};
use crate::{DeployError, WorkerStatus};

/// How requests authenticate.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Auth {
    Basic(String, String),
    Token(String),
}

/// A connection to Marathon's REST API.
#[derive(Clone)]
pub struct Marathon {
    url: String,
    auth: Option<Auth>,
    http: reqwest::blocking::Client,
}

/// A Marathon task, as `/v2/apps/{id}/tasks` lists it.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Task {
    pub id: String,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub host: String,
}

impl Marathon {
    /// A client for `url`; `auth_file` holds `USER:PASSWORD` or a token.
    pub fn new(url: &str, auth_file: Option<&str>) -> Result<Self, DeployError> {
        let bad = |m: String| DeployError::Invalid(m);
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(bad(format!("--marathon-url {url:?}: expected http://HOST:PORT or https://...")));
        }
        let auth = match auth_file {
            None => None,
            Some(f) => {
                let text = std::fs::read_to_string(f).map_err(|e| bad(format!("--marathon-auth-file {f}: {e}")))?;
                let text = text.trim();
                Some(match text.split_once(':') {
                    Some((u, p)) => Auth::Basic(u.to_string(), p.to_string()),
                    None => Auth::Token(text.to_string()),
                })
            }
        };
        crate::install_crypto_provider();
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| bad(format!("cannot make an HTTP client: {e}")))?;
        Ok(Marathon { url: url.trim_end_matches('/').to_string(), auth, http })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::blocking::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.url));
        match &self.auth {
            None => r,
            Some(Auth::Basic(u, p)) => r.basic_auth(u, Some(p)),
            Some(Auth::Token(t)) => r.header("Authorization", format!("token={t}")),
        }
    }

    /// Send a request; a JSON answer on success (`Null` for 404 when
    /// `missing_ok`), else Marathon's own message.
    fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        missing_ok: bool,
    ) -> Result<Value, String> {
        let mut r = self.request(method.clone(), path);
        if let Some(b) = body {
            r = r.json(b);
        }
        let resp = r.send().map_err(|e| format!("cannot reach Marathon at {}: {}", self.url, error_chain(&e)))?;
        let status = resp.status();
        let text = resp.text().unwrap_or_default();
        if status.is_success() {
            return Ok(serde_json::from_str(&text).unwrap_or(Value::Null));
        }
        if status == reqwest::StatusCode::NOT_FOUND && missing_ok {
            return Ok(Value::Null);
        }
        Err(format!("{method} {path}: HTTP {}: {}", status.as_u16(), marathon_message(&text)))
    }

    /// Marathon's name and version (`/v2/info`): checks the address and the credentials.
    pub fn info(&self) -> Result<String, String> {
        let v = self.call(reqwest::Method::GET, "/v2/info", None, false)?;
        Ok(format!(
            "{} {}",
            v.get("name").and_then(Value::as_str).unwrap_or("marathon"),
            v.get("version").and_then(Value::as_str).unwrap_or("")
        ))
    }

    /// The app, or `None` if Marathon does not know it.
    pub fn app(&self, id: &str) -> Result<Option<Value>, String> {
        let v = self.call(reqwest::Method::GET, &format!("/v2/apps{id}"), None, true)?;
        Ok(v.get("app").cloned())
    }

    /// The app's tasks.
    pub fn tasks(&self, id: &str) -> Result<Vec<Task>, String> {
        let v = self.call(reqwest::Method::GET, &format!("/v2/apps{id}/tasks"), None, true)?;
        Ok(serde_json::from_value(v.get("tasks").cloned().unwrap_or(json!([]))).unwrap_or_default())
    }

    /// Kill tasks; with `scale` the app's instances go down by as many.
    pub fn kill(&self, ids: &[String], scale: bool) -> Result<(), String> {
        if ids.is_empty() {
            return Ok(());
        }
        let path = format!("/v2/tasks/delete?scale={scale}");
        self.call(reqwest::Method::POST, &path, Some(&json!({ "ids": ids })), false).map(drop)
    }

    /// Delete the app (its tasks are killed); an unknown app is not an error.
    pub fn delete_app(&self, id: &str) -> Result<(), String> {
        self.call(reqwest::Method::DELETE, &format!("/v2/apps{id}"), None, true).map(drop)
    }

    /// Wait until Marathon no longer knows the app.
    pub fn wait_deleted(&self, id: &str, timeout: Duration) -> Result<(), String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match self.app(id)? {
                None => return Ok(()),
                Some(_) if std::time::Instant::now() > deadline => {
                    return Err(format!("app {id} still exists {} s after deleting it", timeout.as_secs()))
                }
                Some(_) => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    }
}

/// An error and its causes, on one line (reqwest's top message alone says
/// little: "error sending request").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = s.source();
    }
    parts.join(": ")
}

/// Marathon's error body in one line: `message` and each `details` entry
/// (`{"path": "/id", "errors": [...]}`).
fn marathon_message(text: &str) -> String {
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return text.trim().to_string();
    };
    let mut out = v.get("message").and_then(Value::as_str).unwrap_or("").to_string();
    for d in v.get("details").and_then(Value::as_array).into_iter().flatten() {
        let path = d.get("path").and_then(Value::as_str).unwrap_or("");
        let errors: Vec<&str> =
            d.get("errors").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
        out.push_str(&format!(" ({path}: {})", errors.join("; ")));
    }
    if out.is_empty() {
        text.trim().to_string()
    } else {
        out
    }
}

/// The default app id of a cluster.
pub fn default_app_id(cluster: &str) -> String {
    format!("/dask-rs/{cluster}")
}

/// `mem` of each task (MiB) when `--memory` is not given.
const DEFAULT_MEM_MIB: u64 = 1024;

/// `cpus` of each task: `--cpus`, else `--cores`, else 1.
fn task_cpus(opts: &WorkerOptions) -> f64 {
    opts.cpus.or(opts.cores.map(f64::from)).unwrap_or(1.0)
}

/// The app definition for a cluster's workers (`instances` 0: scaling sets it).
pub fn app_definition(
    opts: &WorkerOptions,
    app_id: &str,
    cluster: &str,
    scheduler: &str,
    credentials: &Credentials,
) -> Result<Value, BackendError> {
    let mut argv = opts.worker_command(scheduler, "TASK");
    let mem_bytes = opts.memory.as_deref().map(|m| {
        parse_bytes(m).ok_or_else(|| BackendError::ScaleUp(format!("--memory {m:?}: expected a size like 4GiB")))
    });
    // Mesos enforces `mem`: the worker spills and pauses within it.
    let mem_bytes = mem_bytes.transpose()?.unwrap_or(DEFAULT_MEM_MIB << 20);
    if opts.memory_limit.is_none() {
        argv.insert(argv.len() - opts.worker_extra_args.len(), "--memory-limit".into());
        argv.insert(argv.len() - opts.worker_extra_args.len(), mem_bytes.to_string());
    }
    // The name is the task id, which only the task's shell knows.
    let words: Vec<String> =
        argv.iter().enumerate().map(|(i, a)| if i == 6 { "\"$MESOS_TASK_ID\"".into() } else { sh_quote(a) }).collect();
    let mut lines = opts.prologue.clone();
    lines.push(format!("exec {}", words.join(" ")));
    let mut env: BTreeMap<String, String> = opts.env_pairs()?.into_iter().collect();
    for (var, path) in credentials.env() {
        env.insert(var.to_string(), path.display().to_string());
    }
    env.insert("DASK_RS_CLUSTER".into(), cluster.to_string());
    let constraints: Vec<Vec<String>> = opts
        .constraints
        .iter()
        .map(|c| {
            let parts: Vec<String> = c.splitn(3, ':').map(String::from).collect();
            if parts.len() < 2 || parts.iter().any(String::is_empty) {
                Err(BackendError::ScaleUp(format!("constraint {c:?}: expected FIELD:OPERATOR[:VALUE]")))
            } else {
                Ok(parts)
            }
        })
        .collect::<Result<_, _>>()?;
    let mut app = json!({
        "id": app_id,
        "cmd": lines.join("\n"),
        "cpus": task_cpus(opts),
        "mem": (mem_bytes as f64 / (1 << 20) as f64).ceil(),
        "instances": 0,
        "env": env,
        "labels": { "dask-rs/cluster": cluster, "dask-rs/component": "worker" },
        "constraints": constraints,
        "backoffSeconds": 1,
        "backoffFactor": 2,
        "maxLaunchDelaySeconds": 60,
        "taskKillGracePeriodSeconds": 30,
    });
    if let Some(image) = &opts.image {
        app["container"] = json!({ "type": "DOCKER", "docker": { "image": image } });
    }
    Ok(app)
}

/// Mesos task states that mean "not yet a worker".
fn is_starting(state: &str) -> bool {
    matches!(state, "TASK_STAGING" | "TASK_STARTING" | "TASK_UNREACHABLE" | "")
}

/// Workers as the tasks of one Marathon app.
pub struct MarathonBackend {
    marathon: Marathon,
    app_id: String,
    definition: Value,
    /// Instances asked for (the app's `instances`, once it exists).
    instances: usize,
    created: bool,
    /// Live tasks at the last look, by id.
    tasks: BTreeMap<String, Task>,
    /// Tasks we killed: their disappearance is not a failure.
    killed: BTreeSet<String>,
    failed: Vec<WorkerRecord>,
    auth_file: Option<String>,
}

/// Names standing for instances Marathon has not launched yet.
const WAITING: &str = "waiting-";

impl MarathonBackend {
    /// The workers of `cluster`, connecting to `scheduler`.
    pub fn new(
        opts: &WorkerOptions,
        cluster: &str,
        scheduler: &str,
        credentials: &Credentials,
    ) -> Result<Self, BackendError> {
        let url = opts
            .marathon_url
            .as_deref()
            .ok_or_else(|| BackendError::ScaleUp("the marathon backend needs --marathon-url".into()))?;
        let marathon =
            Marathon::new(url, opts.marathon_auth_file.as_deref()).map_err(|e| BackendError::ScaleUp(e.to_string()))?;
        let app_id = opts.app_id.clone().unwrap_or_else(|| default_app_id(cluster));
        let app_id = if app_id.starts_with('/') { app_id } else { format!("/{app_id}") };
        let definition = app_definition(opts, &app_id, cluster, &opts.contact(scheduler), credentials)?;
        Ok(MarathonBackend {
            marathon,
            app_id,
            definition,
            instances: 0,
            created: false,
            tasks: BTreeMap::new(),
            killed: BTreeSet::new(),
            failed: Vec::new(),
            auth_file: opts.marathon_auth_file.clone(),
        })
    }

    /// The app id.
    pub fn app_id(&self) -> &str {
        &self.app_id
    }

    /// The app definition `scale_up` creates.
    pub fn definition(&self) -> &Value {
        &self.definition
    }

    /// Create the app with no instances: Marathon checks the definition (a
    /// bad id, too many cpus, an app that exists) before any worker is asked for.
    pub fn create(&mut self) -> Result<(), BackendError> {
        if let Some(app) = self.marathon.app(&self.app_id).map_err(BackendError::ScaleUp)? {
            let owner = app.pointer("/labels/dask-rs~1cluster").and_then(Value::as_str).unwrap_or("");
            return Err(BackendError::ScaleUp(format!(
                "Marathon already has an app {} ({}); choose another --app-id or delete it",
                self.app_id,
                if owner.is_empty() { "not a dask-rs cluster's".to_string() } else { format!("cluster {owner}'s") }
            )));
        }
        self.marathon
            .call(reqwest::Method::POST, "/v2/apps", Some(&self.definition), false)
            .map_err(|e| BackendError::ScaleUp(format!("Marathon refused app {}: {e}", self.app_id)))?;
        self.created = true;
        tracing::info!("created Marathon app {}", self.app_id);
        Ok(())
    }

    fn set_instances(&mut self, n: usize) -> Result<(), String> {
        let path = format!("/v2/apps{}?force=true", self.app_id);
        self.marathon.call(reqwest::Method::PUT, &path, Some(&json!({ "instances": n })), false)?;
        self.instances = n;
        Ok(())
    }
}

impl Backend for MarathonBackend {
    fn kind(&self) -> &'static str {
        "marathon"
    }

    fn scale_up(&mut self, n: usize) -> Result<(), BackendError> {
        if !self.created {
            self.create()?;
        }
        if n > self.instances {
            self.set_instances(n).map_err(|e| BackendError::ScaleUp(format!("Marathon app {}: {e}", self.app_id)))?;
            tracing::info!("Marathon app {}: {n} instances", self.app_id);
        }
        Ok(())
    }

    fn scale_down(&mut self, names: &[String]) -> Result<(), BackendError> {
        let ids: Vec<String> = names.iter().filter(|n| self.tasks.contains_key(*n)).cloned().collect();
        let waiting = names.iter().filter(|n| n.starts_with(&format!("{}{WAITING}", self.prefix()))).count();
        if !ids.is_empty() {
            self.marathon.kill(&ids, true).map_err(|e| BackendError::ScaleDown(format!("Marathon: {e}")))?;
            self.instances = self.instances.saturating_sub(ids.len());
            for id in &ids {
                self.tasks.remove(id);
                self.killed.insert(id.clone());
            }
            tracing::info!("killed Marathon tasks {}", ids.join(", "));
        }
        if waiting > 0 {
            let n = self.instances.saturating_sub(waiting);
            self.set_instances(n).map_err(|e| BackendError::ScaleDown(format!("Marathon: {e}")))?;
        }
        Ok(())
    }

    fn workers(&mut self) -> Result<Vec<WorkerRecord>, BackendError> {
        if !self.created {
            return Ok(std::mem::take(&mut self.failed));
        }
        let status = |e: String| BackendError::Status(format!("Marathon: {e}"));
        let Some(app) = self.marathon.app(&self.app_id).map_err(status)? else {
            // Deleted from outside: every worker is gone.
            let gone: Vec<String> = std::mem::take(&mut self.tasks).into_keys().collect();
            self.created = false;
            self.instances = 0;
            let mut out = std::mem::take(&mut self.failed);
            out.extend(gone.into_iter().map(|name| WorkerRecord {
                name,
                status: WorkerStatus::Failed,
                detail: format!("the Marathon app {} was deleted", self.app_id),
            }));
            return Ok(out);
        };
        let tasks = self.marathon.tasks(&self.app_id).map_err(status)?;
        if let Some(n) = app.get("instances").and_then(Value::as_u64) {
            self.instances = n as usize;
        }
        let last_failure = app.get("lastTaskFailure");
        let failure_of = |id: &str| -> Option<String> {
            let f = last_failure.filter(|f| f.get("taskId").and_then(Value::as_str) == Some(id))?;
            let state = f.get("state").and_then(Value::as_str).unwrap_or("");
            let msg = f.get("message").and_then(Value::as_str).unwrap_or("");
            Some(format!("{state}: {msg}"))
        };
        let now: BTreeMap<String, Task> = tasks.into_iter().map(|t| (t.id.clone(), t)).collect();
        let mut out = std::mem::take(&mut self.failed);
        for (id, _) in self.tasks.iter().filter(|(id, _)| !now.contains_key(*id)) {
            if self.killed.remove(id) {
                continue;
            }
            let detail = failure_of(id).unwrap_or_else(|| "the task ended (killed or lost outside dask-rs)".into());
            out.push(WorkerRecord { name: id.clone(), status: WorkerStatus::Failed, detail });
        }
        self.killed.retain(|id| now.contains_key(id));
        for t in now.values().filter(|t| !self.killed.contains(&t.id)) {
            let status = if is_starting(&t.state) { WorkerStatus::Pending } else { WorkerStatus::Running };
            let on = if t.host.is_empty() { String::new() } else { format!(" on {}", t.host) };
            out.push(WorkerRecord { name: t.id.clone(), status, detail: format!("{}{on}", t.state) });
        }
        let live = now.values().filter(|t| !self.killed.contains(&t.id)).count();
        let delay = app.pointer("/queue/delay/timeLeftSeconds").and_then(Value::as_u64);
        for k in 0..self.instances.saturating_sub(live) {
            let detail = match delay {
                Some(s) if s > 0 => format!("waiting: Marathon delays launches for {s} s after failures"),
                _ => "waiting for Marathon to launch a task".to_string(),
            };
            out.push(WorkerRecord {
                name: format!("{}{WAITING}{k}", self.prefix()),
                status: WorkerStatus::Pending,
                detail,
            });
        }
        self.tasks = now;
        Ok(out)
    }

    fn close(&mut self) -> Result<(), BackendError> {
        self.marathon.delete_app(&self.app_id).map_err(|e| BackendError::ScaleDown(format!("Marathon: {e}")))?;
        self.marathon
            .wait_deleted(&self.app_id, Duration::from_secs(60))
            .map_err(|e| BackendError::ScaleDown(format!("Marathon: {e}")))?;
        self.created = false;
        self.tasks.clear();
        Ok(())
    }
}

impl MarathonBackend {
    /// Placeholder names start with the app id's last segment.
    fn prefix(&self) -> String {
        format!("{}-", self.app_id.rsplit('/').next().unwrap_or("app"))
    }
}

impl Deployer for MarathonBackend {
    fn owned(&self) -> Vec<Owned> {
        if !self.created {
            return Vec::new();
        }
        vec![Owned::MarathonApp {
            name: self.app_id.clone(),
            url: self.marathon.url.clone(),
            app_id: self.app_id.clone(),
            auth_file: self.auth_file.clone(),
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_app_names_workers_by_task_id_and_keeps_secrets_off_the_command() {
        let opts = WorkerOptions {
            python: "/opt/venv/bin/python".into(),
            processes: 1,
            cpus: Some(0.5),
            memory: Some("2GiB".into()),
            env: vec!["OMP_NUM_THREADS=1".into()],
            constraints: vec!["hostname:UNIQUE".into(), "rack:LIKE:r[12]".into()],
            prologue: vec!["cd /tmp".into()],
            ..Default::default()
        };
        let d = std::path::Path::new("/state/c");
        let creds = Credentials { token_file: Some(d.join("token")), tls: None };
        let app = app_definition(&opts, "/dask-rs/c", "c", "tls://10.0.0.1:8786", &creds).unwrap();
        let cmd = app["cmd"].as_str().unwrap();
        assert_eq!(
            cmd,
            "cd /tmp\nexec /opt/venv/bin/python -m dask_rs worker tls://10.0.0.1:8786 --name \"$MESOS_TASK_ID\" \
             --nthreads 1 --memory-limit 2147483648"
        );
        assert_eq!(app["cpus"], json!(0.5));
        assert_eq!(app["mem"], json!(2048.0));
        assert_eq!(app["env"]["DASK_RS_TOKEN_FILE"], json!("/state/c/token"));
        assert_eq!(app["env"]["OMP_NUM_THREADS"], json!("1"));
        assert_eq!(app["constraints"], json!([["hostname", "UNIQUE"], ["rack", "LIKE", "r[12]"]]));
        let bad = WorkerOptions { constraints: vec!["hostname".into()], ..opts };
        let err = app_definition(&bad, "/x", "c", "tcp://h:1", &creds).unwrap_err().to_string();
        assert!(err.contains("FIELD:OPERATOR"), "{err}");
    }

    #[test]
    fn marathon_errors_read_as_one_line() {
        let body = r#"{"message":"Object is not valid","details":[{"path":"/id","errors":["must fully match regular expression"]}]}"#;
        assert_eq!(marathon_message(body), "Object is not valid (/id: must fully match regular expression)");
        assert_eq!(marathon_message("<html>oops</html>"), "<html>oops</html>");
    }
}
