//! A Marathon stand-in: the `/v2` REST API subset dask-rs uses, with apps
//! whose tasks are local processes.
//!
//! Apps are checked as Marathon checks them (id pattern, `cpus`, `mem`,
//! `instances`, constraint operators; unknown fields refused) and answered
//! with Marathon's error bodies (`{"message": ..., "details": [...]}`). A
//! reconciler moves every app towards its `instances`: new tasks are
//! `TASK_STAGING` for `--staging-delay`, then run `sh -c CMD` with
//! `MESOS_TASK_ID`, `MARATHON_APP_ID`, `HOST` and the app's `env`, and are
//! `TASK_RUNNING`; tasks wait while the agent's `--cpus` are taken. A task
//! that exits is recorded as the app's `lastTaskFailure` and replaced after
//! the app's back-off (`backoffSeconds` x `backoffFactor`^n, up to
//! `maxLaunchDelaySeconds`), as Marathon does.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::procs::{self, Proc};

/// Options of `dask-rs-test-server marathon`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Port on 127.0.0.1 (0: any free one; the URL is printed).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// How long new tasks stay TASK_STAGING, e.g. 2s.
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    staging_delay: Duration,
    /// CPUs of the one agent: tasks beyond wait for resources.
    #[arg(long, default_value_t = 64.0)]
    cpus: f64,
    /// Require HTTP basic auth with USER:PASSWORD.
    #[arg(long)]
    basic_auth: Option<String>,
    /// Require `Authorization: token=TOKEN`.
    #[arg(long)]
    token: Option<String>,
    /// Where task sandboxes go.
    #[arg(long)]
    sandbox: PathBuf,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, mult) = match s.strip_suffix("ms") {
        Some(n) => (n, 0.001),
        None => (s.strip_suffix('s').unwrap_or(s), 1.0),
    };
    num.parse::<f64>().map(|n| Duration::from_secs_f64(n * mult)).map_err(|e| format!("{s:?}: {e}"))
}

struct Task {
    id: String,
    state: &'static str,
    staged: Instant,
    staged_at: SystemTime,
    started_at: Option<SystemTime>,
    started: Option<Instant>,
    cpus: f64,
    proc: Option<Proc>,
    /// Killed through the API: (when, whether the app shrinks).
    killing: Option<Instant>,
}

struct App {
    def: Value,
    instances: usize,
    tasks: Vec<Task>,
    last_failure: Option<Value>,
    version: String,
    failures: u32,
    delay_until: Instant,
    deleting: bool,
}

struct Marathon {
    args: Args,
    apps: BTreeMap<String, App>,
    next_task: u64,
    next_deployment: u64,
}

type Shared = Arc<Mutex<Marathon>>;

/// Marathon's error body.
fn error(status: StatusCode, message: &str, details: Vec<(String, String)>) -> Response {
    let details: Vec<Value> = details.into_iter().map(|(p, e)| json!({"path": p, "errors": [e]})).collect();
    let mut body = json!({ "message": message });
    if !details.is_empty() {
        body["details"] = Value::Array(details);
    }
    (status, Json(body)).into_response()
}

/// Marathon's id rule for each path segment.
fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

const ID_RULE: &str = "must fully match regular expression \
     '^(([a-z0-9]|[a-z0-9][a-z0-9\\-]*[a-z0-9])\\.)*([a-z0-9]|[a-z0-9][a-z0-9\\-]*[a-z0-9])|(\\.|\\.\\.)$'";

const KNOWN_FIELDS: &[&str] = &[
    "id",
    "cmd",
    "args",
    "cpus",
    "mem",
    "disk",
    "gpus",
    "instances",
    "env",
    "labels",
    "constraints",
    "container",
    "backoffSeconds",
    "backoffFactor",
    "maxLaunchDelaySeconds",
    "taskKillGracePeriodSeconds",
    "user",
    "fetch",
    "healthChecks",
    "upgradeStrategy",
    "portDefinitions",
    "requirePorts",
    "executor",
];

/// The problems with an app definition, as Marathon's `details`.
fn validate(app: &Value) -> Vec<(String, String)> {
    let mut bad = Vec::new();
    let Some(obj) = app.as_object() else {
        return vec![("/".into(), "error.expected.jsobject".into())];
    };
    for k in obj.keys().filter(|k| !KNOWN_FIELDS.contains(&k.as_str())) {
        bad.push((format!("/{k}"), "error.unknown.property".into()));
    }
    match obj.get("id").and_then(Value::as_str) {
        Some(id) if id.trim_start_matches('/').split('/').all(valid_segment) => {}
        _ => bad.push(("/id".into(), ID_RULE.into())),
    }
    if obj.get("cpus").is_some_and(|c| c.as_f64().is_none_or(|c| c < 0.0)) {
        bad.push(("/cpus".into(), "error.min".into()));
    }
    if obj.get("mem").is_some_and(|m| m.as_f64().is_none_or(|m| m < 0.0)) {
        bad.push(("/mem".into(), "error.min".into()));
    }
    if obj.get("instances").is_some_and(|n| n.as_u64().is_none()) {
        bad.push(("/instances".into(), "error.min".into()));
    }
    if obj.get("cmd").and_then(Value::as_str).is_none_or(str::is_empty) && obj.get("args").is_none() {
        bad.push((
            "/".into(),
            "AppDefinition must either contain one of 'cmd' or 'args', and/or a 'container'.".into(),
        ));
    }
    if let Some(env) = obj.get("env") {
        if !env.as_object().is_some_and(|m| m.values().all(Value::is_string)) {
            bad.push(("/env".into(), "error.expected.jsstring".into()));
        }
    }
    for (i, c) in obj.get("constraints").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let parts: Vec<&str> = c.as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        let ops = ["UNIQUE", "CLUSTER", "GROUP_BY", "LIKE", "UNLIKE", "MAX_PER", "IS"];
        if parts.len() < 2 || !ops.contains(&parts[1]) {
            bad.push((format!("/constraints({i})"), "Constraint operator must be one of the following: [UNIQUE, CLUSTER, GROUP_BY, LIKE, UNLIKE, MAX_PER, IS]".into()));
        }
    }
    bad
}

fn normalize_id(id: &str) -> String {
    format!("/{}", id.trim_matches('/'))
}

impl Marathon {
    fn deployment(&mut self) -> Value {
        self.next_deployment += 1;
        json!({ "version": procs::rfc3339(SystemTime::now()), "deploymentId": format!("deployment-{}", self.next_deployment) })
    }

    fn cpus_in_use(&self) -> f64 {
        self.apps.values().flat_map(|a| &a.tasks).map(|t| t.cpus).sum()
    }

    fn task_json(app_id: &str, t: &Task) -> Value {
        json!({
            "id": t.id,
            "appId": app_id,
            "host": "127.0.0.1",
            "state": if t.killing.is_some() { "TASK_KILLING" } else { t.state },
            "stagedAt": procs::rfc3339(t.staged_at),
            "startedAt": t.started_at.map(procs::rfc3339),
            "ports": [],
        })
    }

    fn app_json(&self, id: &str, app: &App) -> Value {
        let mut v = app.def.clone();
        v["id"] = json!(id);
        v["instances"] = json!(app.instances);
        v["version"] = json!(app.version);
        let running = app.tasks.iter().filter(|t| t.state == "TASK_RUNNING" && t.killing.is_none()).count();
        let staged = app.tasks.iter().filter(|t| t.state == "TASK_STAGING").count();
        v["tasksRunning"] = json!(running);
        v["tasksStaged"] = json!(staged);
        v["tasks"] = app.tasks.iter().map(|t| Self::task_json(id, t)).collect();
        v["lastTaskFailure"] = app.last_failure.clone().unwrap_or(Value::Null);
        let now = Instant::now();
        if app.delay_until > now {
            v["queue"] = json!({ "delay": { "timeLeftSeconds": (app.delay_until - now).as_secs_f64().ceil() as u64, "overdue": false } });
        }
        let busy = app.deleting || running != app.instances || app.tasks.iter().any(|t| t.killing.is_some());
        v["deployments"] =
            if busy { json!([{ "id": format!("deployment-of-{}", id.trim_matches('/')) }]) } else { json!([]) };
        v
    }

    /// One pass of the reconciler over every app.
    fn reconcile(&mut self) {
        let now = Instant::now();
        let staging = self.args.staging_delay;
        let sandbox = self.args.sandbox.clone();
        let capacity = self.args.cpus;
        let mut in_use = self.cpus_in_use();
        let ids: Vec<String> = self.apps.keys().cloned().collect();
        for id in ids {
            let mut new_ids = Vec::new();
            let app = self.apps.get_mut(&id).expect("listed");
            let grace =
                Duration::from_secs(app.def.get("taskKillGracePeriodSeconds").and_then(Value::as_u64).unwrap_or(5));
            let mut ended = Vec::new();
            for (i, t) in app.tasks.iter_mut().enumerate() {
                if let Some(p) = t.proc.as_mut() {
                    if let Some(status) = p.try_wait() {
                        ended.push((i, Some(status)));
                        continue;
                    }
                    if t.killing.is_some_and(|k| now - k > grace) {
                        p.signal(libc::SIGKILL);
                    }
                } else if t.killing.is_some() {
                    ended.push((i, None));
                } else if now - t.staged >= staging {
                    let cmd = app.def.get("cmd").and_then(Value::as_str).unwrap_or("").to_string();
                    let mut env: Vec<(String, String)> = app
                        .def
                        .get("env")
                        .and_then(Value::as_object)
                        .into_iter()
                        .flatten()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                        .collect();
                    env.extend([
                        ("MESOS_TASK_ID".into(), t.id.clone()),
                        ("MARATHON_APP_ID".into(), id.clone()),
                        ("HOST".into(), "127.0.0.1".into()),
                        ("MESOS_SANDBOX".into(), sandbox.join(&t.id).display().to_string()),
                    ]);
                    let argv = vec!["/bin/sh".to_string(), "-c".into(), cmd];
                    match Proc::spawn(&argv, &env, &sandbox.join(&t.id), &sandbox.join(&t.id)) {
                        Ok(p) => {
                            t.proc = Some(p);
                            t.state = "TASK_RUNNING";
                            t.started = Some(now);
                            t.started_at = Some(SystemTime::now());
                        }
                        Err(e) => {
                            eprintln!("task {}: cannot start: {e}", t.id);
                            ended.push((i, None));
                        }
                    }
                }
            }
            for (i, status) in ended.into_iter().rev() {
                let t = app.tasks.remove(i);
                in_use -= t.cpus;
                let (state, message) = match (t.killing, status) {
                    (Some(_), _) => ("TASK_KILLED", "Task killed through the API".to_string()),
                    (None, Some(s)) if s.success() => ("TASK_FINISHED", procs::describe(s).1),
                    (None, Some(s)) => ("TASK_FAILED", procs::describe(s).1),
                    (None, None) => ("TASK_FAILED", "the command could not be started".to_string()),
                };
                if state != "TASK_KILLED" || !app.deleting {
                    app.last_failure = Some(json!({
                        "appId": id, "taskId": t.id, "state": state, "message": message, "host": "127.0.0.1",
                        "timestamp": procs::rfc3339(SystemTime::now()), "version": app.version,
                    }));
                }
                let ran_long = t.started.is_some_and(|s| now - s > Duration::from_secs(5));
                if t.killing.is_none() && !ran_long {
                    app.failures += 1;
                    let base = app.def.get("backoffSeconds").and_then(Value::as_f64).unwrap_or(1.0);
                    let factor = app.def.get("backoffFactor").and_then(Value::as_f64).unwrap_or(1.15);
                    let max = app.def.get("maxLaunchDelaySeconds").and_then(Value::as_f64).unwrap_or(300.0);
                    let delay = (base * factor.powi(app.failures as i32 - 1)).min(max);
                    app.delay_until = now + Duration::from_secs_f64(delay);
                } else if ran_long {
                    app.failures = 0;
                }
            }
            if app.deleting {
                for t in app.tasks.iter_mut().filter(|t| t.killing.is_none()) {
                    t.killing = Some(now);
                    if let Some(p) = &t.proc {
                        p.signal(libc::SIGTERM);
                    }
                }
                if app.tasks.is_empty() {
                    self.apps.remove(&id);
                }
                continue;
            }
            let live: Vec<usize> = (0..app.tasks.len()).filter(|i| app.tasks[*i].killing.is_none()).collect();
            if live.len() > app.instances {
                for &i in live.iter().rev().take(live.len() - app.instances) {
                    app.tasks[i].killing = Some(now);
                    if let Some(p) = &app.tasks[i].proc {
                        p.signal(libc::SIGTERM);
                    }
                }
            }
            let cpus = app.def.get("cpus").and_then(Value::as_f64).unwrap_or(1.0);
            let mut live = live.len();
            while live < app.instances && now >= app.delay_until && in_use + cpus <= capacity + 1e-9 {
                new_ids.push(());
                live += 1;
                in_use += cpus;
            }
            for _ in new_ids {
                self.next_task += 1;
                let task_id = format!(
                    "{}.{:08x}-fake-{:04}",
                    id.trim_matches('/').replace('/', "_"),
                    self.next_task * 2654435761 % (1 << 32),
                    self.next_task
                );
                let app = self.apps.get_mut(&id).expect("listed");
                app.tasks.push(Task {
                    id: task_id,
                    state: "TASK_STAGING",
                    staged: now,
                    staged_at: SystemTime::now(),
                    started_at: None,
                    started: None,
                    cpus,
                    proc: None,
                    killing: None,
                });
            }
        }
    }
}

fn authorized(m: &Marathon, headers: &HeaderMap) -> bool {
    let got = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
    if let Some(t) = &m.args.token {
        return got == format!("token={t}");
    }
    if let Some(up) = &m.args.basic_auth {
        return got == format!("Basic {}", procs::base64(up.as_bytes()));
    }
    true
}

async fn info(State(s): State<Shared>, headers: HeaderMap) -> Response {
    let m = s.lock().unwrap();
    if !authorized(&m, &headers) {
        return error(StatusCode::UNAUTHORIZED, "Invalid username or password.", vec![]);
    }
    Json(json!({ "name": "marathon", "version": "1.11.24 (dask-rs test server)" })).into_response()
}

async fn list_apps(State(s): State<Shared>, headers: HeaderMap) -> Response {
    let m = s.lock().unwrap();
    if !authorized(&m, &headers) {
        return error(StatusCode::UNAUTHORIZED, "Invalid username or password.", vec![]);
    }
    let apps: Vec<Value> = m.apps.iter().map(|(id, a)| m.app_json(id, a)).collect();
    Json(json!({ "apps": apps })).into_response()
}

async fn create_app(State(s): State<Shared>, headers: HeaderMap, body: String) -> Response {
    let mut m = s.lock().unwrap();
    if !authorized(&m, &headers) {
        return error(StatusCode::UNAUTHORIZED, "Invalid username or password.", vec![]);
    }
    let Ok(def) = serde_json::from_str::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "Invalid JSON", vec![]);
    };
    let problems = validate(&def);
    if !problems.is_empty() {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "Object is not valid", problems);
    }
    let id = normalize_id(def["id"].as_str().unwrap_or(""));
    if m.apps.contains_key(&id) {
        return error(StatusCode::CONFLICT, &format!("An app with id [{id}] already exists."), vec![]);
    }
    let instances = def.get("instances").and_then(Value::as_u64).unwrap_or(1) as usize;
    let app = App {
        def,
        instances,
        tasks: Vec::new(),
        last_failure: None,
        version: procs::rfc3339(SystemTime::now()),
        failures: 0,
        delay_until: Instant::now(),
        deleting: false,
    };
    let v = m.app_json(&id, &app);
    m.apps.insert(id, app);
    (StatusCode::CREATED, Json(v)).into_response()
}

#[derive(serde::Deserialize)]
struct Flags {
    #[serde(default)]
    scale: Option<bool>,
    #[serde(default)]
    force: Option<bool>,
}

async fn app_path(
    State(s): State<Shared>,
    method: Method,
    headers: HeaderMap,
    Path(rest): Path<String>,
    Query(_flags): Query<Flags>,
    body: String,
) -> Response {
    let mut m = s.lock().unwrap();
    if !authorized(&m, &headers) {
        return error(StatusCode::UNAUTHORIZED, "Invalid username or password.", vec![]);
    }
    let (id, tasks) = match rest.strip_suffix("/tasks") {
        Some(id) => (normalize_id(id), true),
        None => (normalize_id(&rest), false),
    };
    if !m.apps.contains_key(&id) || m.apps[&id].deleting {
        return error(StatusCode::NOT_FOUND, &format!("App '{id}' does not exist"), vec![]);
    }
    match (method, tasks) {
        (Method::GET, true) => {
            let app = &m.apps[&id];
            let tasks: Vec<Value> = app.tasks.iter().map(|t| Marathon::task_json(&id, t)).collect();
            Json(json!({ "tasks": tasks })).into_response()
        }
        (Method::GET, false) => Json(json!({ "app": m.app_json(&id, &m.apps[&id]) })).into_response(),
        (Method::PUT, false) => {
            let Ok(update) = serde_json::from_str::<Value>(&body) else {
                return error(StatusCode::BAD_REQUEST, "Invalid JSON", vec![]);
            };
            let mut def = m.apps[&id].def.clone();
            for (k, v) in update.as_object().into_iter().flatten() {
                def[k] = v.clone();
            }
            def["id"] = json!(id);
            let problems = validate(&def);
            if !problems.is_empty() {
                return error(StatusCode::UNPROCESSABLE_ENTITY, "Object is not valid", problems);
            }
            let d = m.deployment();
            let app = m.apps.get_mut(&id).expect("checked");
            if let Some(n) = update.get("instances").and_then(Value::as_u64) {
                app.instances = n as usize;
            }
            app.def = def;
            app.version = d["version"].as_str().unwrap_or("").to_string();
            Json(d).into_response()
        }
        (Method::DELETE, false) => {
            let d = m.deployment();
            let app = m.apps.get_mut(&id).expect("checked");
            app.deleting = true;
            app.instances = 0;
            Json(d).into_response()
        }
        _ => error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed", vec![]),
    }
}

async fn delete_tasks(
    State(s): State<Shared>,
    headers: HeaderMap,
    Query(flags): Query<Flags>,
    Json(body): Json<Value>,
) -> Response {
    let mut m = s.lock().unwrap();
    if !authorized(&m, &headers) {
        return error(StatusCode::UNAUTHORIZED, "Invalid username or password.", vec![]);
    }
    let ids: Vec<String> = body
        .get("ids")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    let scale = flags.scale.unwrap_or(false);
    let now = Instant::now();
    let mut killed = Vec::new();
    for (app_id, app) in m.apps.iter_mut() {
        let mut n = 0;
        for t in app.tasks.iter_mut().filter(|t| ids.contains(&t.id) && t.killing.is_none()) {
            t.killing = Some(now);
            if let Some(p) = &t.proc {
                p.signal(libc::SIGTERM);
            }
            killed.push(Marathon::task_json(app_id, t));
            n += 1;
        }
        if scale {
            app.instances = app.instances.saturating_sub(n);
        }
    }
    let _ = flags.force;
    if scale {
        Json(m.deployment()).into_response()
    } else {
        Json(json!({ "tasks": killed })).into_response()
    }
}

async fn deployments(State(s): State<Shared>, headers: HeaderMap) -> Response {
    let m = s.lock().unwrap();
    if !authorized(&m, &headers) {
        return error(StatusCode::UNAUTHORIZED, "Invalid username or password.", vec![]);
    }
    let list: Vec<Value> = m
        .apps
        .iter()
        .filter(|(id, a)| m.app_json(id, a)["deployments"].as_array().is_some_and(|d| !d.is_empty()))
        .map(|(id, _)| {
            json!({
                "id": format!("deployment-of-{}", id.trim_matches('/')),
                "affectedApps": [id],
                "currentActions": [{ "action": "ScaleApplication", "app": id }],
            })
        })
        .collect();
    Json(Value::Array(list)).into_response()
}

/// Serve until SIGTERM or SIGINT; then kill every task.
pub async fn serve(args: Args) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await?;
    let addr = listener.local_addr()?;
    std::fs::create_dir_all(&args.sandbox)?;
    let state: Shared =
        Arc::new(Mutex::new(Marathon { args, apps: BTreeMap::new(), next_task: 0, next_deployment: 0 }));
    {
        let state = state.clone();
        tokio::spawn(async move {
            loop {
                state.lock().unwrap().reconcile();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
    let app = Router::new()
        .route("/v2/info", get(info))
        .route("/v2/apps", get(list_apps).post(create_app))
        .route("/v2/apps/{*rest}", get(app_path).put(app_path).delete(app_path))
        .route("/v2/tasks/delete", post(delete_tasks))
        .route("/v2/deployments", get(deployments))
        .with_state(state.clone());
    crate::serve_until_signal(listener, app, &format!("marathon at http://{addr}")).await?;
    // Tasks are processes: end them all.
    state.lock().unwrap().apps.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_definitions_are_checked_like_marathon() {
        let ok = json!({"id": "/dask-rs/c-1", "cmd": "sleep 1", "cpus": 0.5, "mem": 128, "instances": 0});
        assert!(validate(&ok).is_empty());
        let bad = json!({"id": "/Bad_ID", "cmd": "x", "cpus": 1, "colour": "red", "constraints": [["hostname", "SOMETIMES"]]});
        let paths: Vec<String> = validate(&bad).into_iter().map(|(p, _)| p).collect();
        assert_eq!(paths, ["/colour", "/id", "/constraints(0)"]);
        assert_eq!(procs::base64(b"user:pass"), "dXNlcjpwYXNz");
        assert_eq!(procs::base64(b"ab"), "YWI=");
    }
}
