//! HTTP: the routes, the live streams (Server-Sent Events) and the JSON API.
//!
//! Each live page's fragments are rendered at most once per model update
//! and per distinct page query, whatever the number of viewers (a cache
//! keyed by page and query, stamped with the model's update count). A
//! viewer's stream yields the latest fragments when it is polled, so one
//! that reads slowly only skips updates: nothing queues up for it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream;
use serde_json::json;

use crate::metrics::{self, ManagerGauges};
use crate::pages;
use cluster::monitor::Model;

/// Retires workers by name or address: the names retired, and those not
/// retired with why.
pub(crate) type Retire = Box<dyn Fn(Vec<String>) -> Result<(Vec<String>, Vec<(String, String)>), String> + Send + Sync>;

/// What the HTTP handlers share with the feeder thread.
pub(crate) struct Shared {
    pub model: Mutex<Model>,
    /// Rendered fragments by page and query: (model update count, JSON).
    cache: Mutex<HashMap<String, (u64, Arc<String>)>>,
    pub scheduler: String,
    pub manager: Mutex<Option<ManagerGauges>>,
    /// Retires workers through the scheduler (`POST /api/v1/retire_workers`).
    pub retire: Retire,
    /// How often a live page gets fresh fragments.
    pub interval: Duration,
    /// The cluster token every request but `/health` must carry, when the
    /// dashboard listens beyond loopback.
    pub token: Option<String>,
    /// What the process serving it was configured with, for `/info`.
    pub config: Mutex<Vec<(String, String)>>,
}

impl Shared {
    pub(crate) fn new(scheduler: String, retire: Retire, token: Option<String>) -> Self {
        Shared {
            token,
            model: Mutex::new(Model::default()),
            cache: Mutex::new(HashMap::new()),
            scheduler,
            manager: Mutex::new(None),
            retire,
            interval: Duration::from_millis(400),
            config: Mutex::new(Vec::new()),
        }
    }

    /// The fragments of `page` (with `query`) for the model as it is now,
    /// and the model's update count; rendered once per update.
    fn fragments(&self, page: &str, query: &HashMap<String, String>) -> (u64, Arc<String>) {
        let window =
            pages::window_of(query.get("window").map(String::as_str), if page == "tasks" { 300.0 } else { 10.0 });
        let worker = query.get("worker").cloned().unwrap_or_default();
        let (span, end) = pages::tasks_view(
            query.get("span").or_else(|| query.get("window")).map(String::as_str),
            query.get("end").map(String::as_str),
        );
        let key = if page == "tasks" { format!("tasks?{span}&{end}") } else { format!("{page}?{window}&{worker}") };
        let model = self.model.lock().expect("model");
        let version = model.updates;
        if let Some((v, text)) = self.cache.lock().expect("cache").get(&key) {
            if *v == version {
                return (version, text.clone());
            }
        }
        let value = match page {
            "status" => pages::status_fragments(&model, window),
            "workers" if !worker.is_empty() => pages::worker_fragments(&model, &worker),
            "workers" => pages::workers_fragments(&model),
            "tasks" => pages::tasks_fragments(&model, span, end),
            "groups" => pages::groups_fragments(&model),
            "adaptive" => pages::adaptive_fragments(&model),
            "info" => {
                let config = self.config.lock().expect("config").clone();
                pages::info_fragments(&model, &self.scheduler, &config, &crate::logbook::recent())
            }
            other => pages::individual_fragments(&model, other),
        };
        drop(model);
        let text = Arc::new(value.to_string());
        let mut cache = self.cache.lock().expect("cache");
        if cache.len() > 64 {
            cache.clear();
        }
        cache.insert(key, (version, text.clone()));
        (version, text)
    }
}

/// The application's routes.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    let mut app = Router::new()
        .route("/", get(|| async { Redirect::temporary("/status") }))
        .route("/status", get(|s, q| page(s, q, "status", pages::status_page())))
        .route("/workers", get(|s, q| page(s, q, "workers", pages::workers_page())))
        .route(
            "/workers/{name}",
            get(|s: State<Arc<Shared>>, Path(name): Path<String>| async move {
                let q = HashMap::from([("worker".to_string(), name.clone())]);
                page(s, Query(q), "workers", pages::worker_page(&name)).await
            }),
        )
        .route("/tasks", get(|s, q| page(s, q, "tasks", pages::tasks_page())))
        .route("/groups", get(|s, q| page(s, q, "groups", pages::groups_page())))
        .route("/adaptive", get(|s, q| page(s, q, "adaptive", pages::adaptive_page())))
        .route("/info", get(|s, q| page(s, q, "info", pages::info_page())))
        .route("/stream/{page}", get(live))
        .route("/metrics", get(prometheus))
        .route("/health", get(|| async { "ok" }))
        .route("/individual-plots.json", get(individual_plots))
        .route("/api/v1/get_workers", get(get_workers))
        .route("/api/v1/adaptive_target", get(adaptive_target))
        .route("/api/v1/retire_workers", post(retire_workers));
    for (plot, _) in pages::INDIVIDUAL {
        app = app.route(&format!("/{plot}"), get(move |s, q| page(s, q, plot, pages::individual_page(plot))));
    }
    app.layer(axum::middleware::from_fn_with_state(shared.clone(), guard)).with_state(shared)
}

/// Name of the cookie that remembers the token after a link carried it.
const TOKEN_COOKIE: &str = "dask_rs_token";

/// Let a request through when the dashboard asks for no token, when it asks
/// for `/health`, or when it carries the token: `?token=` in the URL (then
/// remembered in a cookie, as Jupyter does), the cookie, or an
/// `Authorization: Bearer` header (for Prometheus).
async fn guard(
    State(shared): State<Arc<Shared>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(token) = shared.token.as_deref() else {
        return next.run(req).await;
    };
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let from_query = req
        .uri()
        .query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(|kv| kv.strip_prefix("token="))
        .any(|t| same(t, token));
    let headers = req.headers();
    let from_cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix(TOKEN_COOKIE).and_then(|c| c.strip_prefix('=')))
        .any(|t| same(t, token));
    let from_bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| same(t.trim(), token));
    if !(from_query || from_cookie || from_bearer) {
        let body = "This dashboard belongs to a cluster with credentials: open the link with ?token= \
                    that `dask-ctl up` printed (also in `dask-ctl status NAME`), or send \
                    `Authorization: Bearer TOKEN`.\n";
        return (StatusCode::FORBIDDEN, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response();
    }
    let mut resp = next.run(req).await;
    if from_query && !from_cookie {
        let cookie = format!("{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict");
        if let Ok(v) = header::HeaderValue::from_str(&cookie) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    resp
}

/// Compare two tokens in time that does not depend on where they differ.
fn same(given: &str, token: &str) -> bool {
    given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// A page with its fragments as they are now already in place, so it
/// shows the cluster before its stream delivers the first update (and
/// without scripts).
async fn page(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
    name: &'static str,
    shell: String,
) -> Html<String> {
    let rendered = tokio::task::spawn_blocking(move || shared.fragments(name, &query)).await;
    let Ok((_, text)) = rendered else { return Html(shell) };
    let Ok(serde_json::Value::Object(parts)) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Html(shell);
    };
    let mut html = shell;
    for (id, fragment) in parts {
        if let Some(f) = fragment.as_str() {
            html = html.replacen(&format!("<div id=\"{id}\"></div>"), &format!("<div id=\"{id}\">{f}</div>"), 1);
        }
    }
    Html(html)
}

/// `/stream/PAGE`: the page's fragments as Server-Sent Events, whenever
/// the model changed, at most every `interval`.
async fn live(
    State(shared): State<Arc<Shared>>,
    Path(page): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let known = pages::PAGES.iter().chain(pages::INDIVIDUAL).any(|(p, _)| *p == page);
    if !known {
        return (StatusCode::NOT_FOUND, format!("no page {page:?}")).into_response();
    }
    let mut tick = tokio::time::interval(shared.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // `?once=1`: the stream ends after its first update.
    let once = query.get("once").is_some_and(|v| v == "1");
    let updates = stream::unfold(
        (shared, page, query, tick, u64::MAX),
        move |(shared, page, query, mut tick, seen)| async move {
            if once && seen != u64::MAX {
                return None;
            }
            loop {
                tick.tick().await;
                let s = shared.clone();
                let (p, q) = (page.clone(), query.clone());
                // Rendering is CPU work: off the runtime's threads.
                let Ok((version, text)) = tokio::task::spawn_blocking(move || s.fragments(&p, &q)).await else {
                    return None;
                };
                if version != seen {
                    let event: Result<Event, Infallible> = Ok(Event::default().data(text.as_str()));
                    return Some((event, (shared, page, query, tick, version)));
                }
            }
        },
    );
    Sse::new(updates).keep_alive(KeepAlive::default()).into_response()
}

async fn prometheus(State(shared): State<Arc<Shared>>) -> Response {
    let manager = *shared.manager.lock().expect("manager");
    let text = metrics::render(&shared.model.lock().expect("model"), manager);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

async fn individual_plots() -> Json<serde_json::Value> {
    let map: serde_json::Map<String, serde_json::Value> =
        pages::INDIVIDUAL.iter().map(|(p, t)| (format!("/{p}"), json!(t))).collect();
    Json(serde_json::Value::Object(map))
}

async fn get_workers(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let m = shared.model.lock().expect("model");
    let workers: Vec<_> = m
        .workers
        .iter()
        .map(|w| {
            json!({
                "name": w.name, "address": w.address, "nthreads": w.nthreads, "memory_limit": w.memory_limit,
                "pid": w.pid, "managed": w.managed, "rss": w.rss, "spilled": w.spilled, "executing": w.executing,
                "ready": w.ready, "processing": w.processing, "nkeys": w.nkeys, "retiring": w.retiring,
            })
        })
        .collect();
    Json(json!({ "workers": workers }))
}

/// Workers the cluster needs: the manager's target when a policy runs it,
/// else Dask's rule of thumb (expected seconds of work over five seconds,
/// no more than there are tasks).
pub(crate) fn target(m: &Model, manager: Option<ManagerGauges>) -> u64 {
    if let Some(g) = manager {
        return g.target;
    }
    let work = m.load.occupancy + m.load.queued_occupancy;
    let tasks = m.load.processing + m.load.queued + m.load.no_worker;
    let threads = m.workers.iter().map(|w| w.nthreads as u64).sum::<u64>().max(1);
    let per_worker = (threads as f64 / m.workers.len().max(1) as f64).max(1.0);
    (((work / 5.0) / per_worker).ceil() as u64).min(tasks)
}

async fn adaptive_target(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let manager = *shared.manager.lock().expect("manager");
    let t = target(&shared.model.lock().expect("model"), manager);
    Json(json!({ "workers": t }))
}

#[derive(serde::Deserialize)]
struct RetireRequest {
    workers: Vec<String>,
}

async fn retire_workers(State(shared): State<Arc<Shared>>, Json(req): Json<RetireRequest>) -> Response {
    let result = tokio::task::spawn_blocking(move || (shared.retire)(req.workers)).await;
    match result {
        Ok(Ok((retired, failed))) => {
            let failed: serde_json::Map<String, serde_json::Value> =
                failed.into_iter().map(|(w, why)| (w, json!(why))).collect();
            Json(json!({ "retired": retired, "failed": failed })).into_response()
        }
        Ok(Err(e)) => (StatusCode::BAD_GATEWAY, e).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// A retirer that always fails, for tests without a scheduler.
#[cfg(test)]
pub(crate) fn no_retire() -> Retire {
    Box::new(|_| Err("no scheduler".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster::protocol::{EventsUpdate, GroupCounts, WorkerInfo};
    use std::io::{Read, Write};

    /// GET `path` from the server at `addr`; the status line and the body
    /// (for a stream: what arrived within a second).
    fn get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
        get_with(addr, path, "")
    }

    /// As [`get`], with extra header lines, and the whole head.
    fn get_with(addr: std::net::SocketAddr, path: &str, headers: &str) -> (String, String) {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n").unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let head = if headers.is_empty() { head.lines().next().unwrap_or("") } else { head };
        (head.to_string(), body.to_string())
    }

    fn serve(shared: Arc<Shared>) -> std::net::SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(shared);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(l, app).await.unwrap();
            });
        });
        addr
    }

    #[test]
    fn a_guarded_dashboard_asks_for_the_token_except_on_health() {
        let token = "ab".repeat(32);
        let addr = serve(Arc::new(Shared::new("tcp://sched:1".into(), no_retire(), Some(token.clone()))));
        assert_eq!(get(addr, "/health"), ("HTTP/1.1 200 OK".into(), "ok".into()));
        for path in ["/status", "/metrics", "/api/v1/get_workers", "/stream/status", "/status?token=nope"] {
            let (status, body) = get(addr, path);
            assert!(status.contains("403"), "{path}: {status}");
            assert!(body.contains("?token="), "{path}: {body}");
        }
        // The link's token opens the page and sets a cookie that opens the rest.
        let (head, _) = get_with(addr, &format!("/status?token={token}"), "X-Test: 1\r\n");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let cookie = head.lines().find_map(|l| l.strip_prefix("set-cookie: ")).expect("a cookie");
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
        let pair = cookie.split(';').next().unwrap();
        let (head, _) = get_with(addr, "/metrics", &format!("Cookie: {pair}\r\n"));
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let (head, _) = get_with(addr, "/metrics", &format!("Authorization: Bearer {token}\r\n"));
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let (head, _) = get_with(addr, "/metrics", "Authorization: Bearer wrong\r\n");
        assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    }

    #[test]
    fn routes_answer_and_streams_carry_the_plots() {
        let shared = Arc::new(Shared::new("tcp://sched:1".into(), no_retire(), None));
        {
            let mut m = shared.model.lock().unwrap();
            let g = GroupCounts { name: "inc".into(), memory: 2, ..Default::default() };
            let workers = vec![WorkerInfo::new("w0", "tcp://h:1", 1, 0)];
            m.apply(EventsUpdate { time: 1.0, groups: vec![g], workers, ..Default::default() });
        }
        let addr = serve(shared);
        assert_eq!(get(addr, "/health"), ("HTTP/1.1 200 OK".into(), "ok".into()));
        let (status, metrics) = get(addr, "/metrics");
        assert!(status.contains("200") && metrics.contains("dask_scheduler_workers 1"), "{metrics}");
        assert!(get(addr, "/individual-plots.json").1.contains("/individual-task-stream"));
        assert!(get(addr, "/status").1.contains("id=\"task-stream\""));
        let (status, events) = get(addr, "/stream/status");
        assert!(status.contains("200"), "{status}");
        assert!(events.contains("data: {") && events.contains("data-key=\\\"inc\\\""), "{events}");
        assert!(get(addr, "/stream/nope").0.contains("404"));
        assert!(get(addr, "/api/v1/get_workers").1.contains("\"address\":\"tcp://h:1\""));
        assert!(get(addr, "/api/v1/adaptive_target").1.contains("\"workers\":0"));
    }
}
