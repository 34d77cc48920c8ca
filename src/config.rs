//! Backend options from three layers, each overriding the one before: the
//! YAML config file (a section per backend), `DASK_RS_*` environment
//! variables, and command-line flags. Every value remembers where it came from
//! (`dask-ctl config show`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use deployers::{BackendKind, WorkerOptions};
use serde_yaml_ng::{Mapping, Value};

/// Where a value came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Default,
    File(PathBuf),
    Env(String),
    Flag,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Default => write!(f, "default"),
            Source::File(p) => write!(f, "file {}", p.display()),
            Source::Env(v) => write!(f, "env {v}"),
            Source::Flag => write!(f, "flag"),
        }
    }
}

/// Keys whose values are strings even when they look like numbers.
const STRING_KEYS: &[&str] = &[
    "python",
    "memory_limit",
    "memory",
    "walltime",
    "queue",
    "account",
    "contact_address",
    "log_directory",
    "image",
    "namespace",
    "kubeconfig",
    "context",
    "service_account",
    "cpu_limit",
    "pod_memory_limit",
    "pod_template",
    "marathon_url",
    "app_id",
    "marathon_auth_file",
];

/// List keys whose environment variable may be a comma-separated list.
const COMMA_LIST_KEYS: &[&str] = &["env", "node_selector", "tolerations", "image_pull_secrets", "constraints"];

/// Every option key, in display order.
pub fn keys() -> Vec<String> {
    match serde_yaml_ng::to_value(WorkerOptions::default()) {
        Ok(Value::Mapping(m)) => m.keys().filter_map(|k| k.as_str().map(String::from)).collect(),
        _ => Vec::new(),
    }
}

/// The config file used when `--config` is not given, if it exists.
pub fn default_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    let p = base.join("dask-rs").join("cluster.yaml");
    p.exists().then_some(p)
}

/// Merged options and the source of each.
pub struct Merged {
    pub options: WorkerOptions,
    pub sources: BTreeMap<String, (Value, Source)>,
}

fn python3_on_path() -> String {
    which("python3").map(|p| p.to_string_lossy().into_owned()).unwrap_or_else(|| "python3".into())
}

/// Find `prog` on PATH (or return it if it is a path).
pub fn which(prog: &str) -> Option<PathBuf> {
    if prog.contains('/') {
        let p = PathBuf::from(prog);
        return p.exists().then_some(p);
    }
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(prog)).find(|p| p.is_file())
}

/// Merge defaults, `file`'s section for `backend`, the environment and `flags`.
pub fn merge(backend: BackendKind, file: Option<&Path>, flags: &BTreeMap<String, Value>) -> Result<Merged> {
    let keys = keys();
    let mut sources: BTreeMap<String, (Value, Source)> = BTreeMap::new();
    sources.insert("python".into(), (Value::String(python3_on_path()), Source::Default));
    sources.insert("processes".into(), (Value::Number(1.into()), Source::Default));

    if let Some(path) = file {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        let doc: Value =
            serde_yaml_ng::from_str(&text).with_context(|| format!("parsing config {}", path.display()))?;
        let Value::Mapping(top) = doc else {
            bail!("config {}: expected a mapping with a section per backend", path.display());
        };
        let backend = backend.name();
        if let Some(section) = top.get(backend) {
            let Value::Mapping(m) = section else {
                bail!("config {}: section {backend:?} must be a mapping", path.display());
            };
            for (k, v) in m {
                let k = k.as_str().unwrap_or_default().replace('-', "_");
                if !keys.contains(&k) {
                    bail!(
                        "config {}: unknown key {k:?} in section {backend:?} (known: {})",
                        path.display(),
                        keys.join(", ")
                    );
                }
                sources.insert(k, (v.clone(), Source::File(path.to_path_buf())));
            }
        }
    }
    for k in &keys {
        let var = format!("DASK_RS_{}", k.to_uppercase());
        if let Ok(text) = std::env::var(&var) {
            let v: Value = if STRING_KEYS.contains(&k.as_str()) {
                Value::String(text)
            } else if k == "hosts" {
                Value::Sequence(
                    text.split([',', ' ']).filter(|h| !h.is_empty()).map(|h| Value::String(h.into())).collect(),
                )
            } else if COMMA_LIST_KEYS.contains(&k.as_str()) && !text.trim_start().starts_with('[') {
                Value::Sequence(text.split(',').filter(|h| !h.is_empty()).map(|h| Value::String(h.into())).collect())
            } else {
                serde_yaml_ng::from_str(&text).with_context(|| format!("{var}: cannot parse {text:?}"))?
            };
            sources.insert(k.clone(), (v, Source::Env(var)));
        }
    }
    for (k, v) in flags {
        sources.insert(k.clone(), (v.clone(), Source::Flag));
    }

    let mut m = Mapping::new();
    for (k, (v, _)) in &sources {
        let v = match v {
            Value::Number(n) if STRING_KEYS.contains(&k.as_str()) => Value::String(n.to_string()),
            // A single string where a list is expected is a one-item list.
            Value::String(s) if is_list_key(k) => Value::Sequence(vec![Value::String(s.clone())]),
            other => other.clone(),
        };
        m.insert(Value::String(k.clone()), v);
    }
    let options: WorkerOptions = serde_yaml_ng::from_value(Value::Mapping(m)).context("invalid backend options")?;
    Ok(Merged { options, sources })
}

fn is_list_key(k: &str) -> bool {
    matches!(
        k,
        "job_extra"
            | "prologue"
            | "epilogue"
            | "job_directives_skip"
            | "worker_extra_args"
            | "hosts"
            | "ssh_args"
            | "env"
            | "node_selector"
            | "tolerations"
            | "image_pull_secrets"
            | "constraints"
    )
}

/// `config show`: one line per key with its value and source.
pub fn render(backend: BackendKind, merged: &Merged) -> String {
    let mut out = format!("backend: {backend}\n");
    for k in keys() {
        let (value, source) = match merged.sources.get(&k) {
            Some((v, s)) => (serde_yaml_ng::to_string(v).unwrap_or_default().trim().to_string(), s.to_string()),
            None => ("~".to_string(), "unset".to_string()),
        };
        out.push_str(&format!("{k:<18} {value:<40} ({source})\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_env_override_file_override_defaults() {
        let dir = std::env::temp_dir().join(format!("dask-rs-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("cluster.yaml");
        std::fs::write(
            &file,
            "local:\n  nthreads: 4\n  memory-limit: 2GiB\n  queue: 7\nslurm:\n  nthreads: 9\n  job_extra: [\"--exclusive\"]\n",
        )
        .unwrap();
        // Env for a key this test owns alone (tests share the process environment).
        std::env::set_var("DASK_RS_ACCOUNT", "proj42");
        let mut flags = BTreeMap::new();
        flags.insert("memory_limit".to_string(), Value::String("1GiB".into()));
        let m = merge(BackendKind::Local, Some(&file), &flags).unwrap();
        std::env::remove_var("DASK_RS_ACCOUNT");
        assert_eq!(m.options.nthreads, 4);
        assert_eq!(m.options.memory_limit.as_deref(), Some("1GiB"));
        assert_eq!(m.options.queue.as_deref(), Some("7"), "numbers become strings where strings are expected");
        assert_eq!(m.options.account.as_deref(), Some("proj42"));
        assert_eq!(m.options.processes, 1);
        assert!(m.options.job_extra.is_empty(), "other backends' sections do not leak");
        assert_eq!(m.sources["nthreads"].1, Source::File(file.clone()));
        assert_eq!(m.sources["account"].1, Source::Env("DASK_RS_ACCOUNT".into()));
        assert_eq!(m.sources["memory_limit"].1, Source::Flag);
        let shown = render(BackendKind::Local, &m);
        assert!(shown.contains("account            proj42"), "{shown}");
        let s = merge(BackendKind::Slurm, Some(&file), &BTreeMap::new()).unwrap();
        assert_eq!((s.options.nthreads, s.options.job_extra.clone()), (9, vec!["--exclusive".to_string()]));

        std::fs::write(&file, "local:\n  nthread: 4\n").unwrap();
        let err = merge(BackendKind::Local, Some(&file), &BTreeMap::new()).err().unwrap().to_string();
        assert!(err.contains("unknown key \"nthread\""), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
