//! The console's state and what each key does: a pure state machine (keys
//! in, effects out), so every behaviour is testable without a terminal.

use cluster::monitor::Model;
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use crate::source::{ClusterRow, Command};

/// The views, k9s style: Enter goes in, Esc goes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// Every registered cluster.
    Clusters,
    /// One cluster: workers, task groups, the task stream.
    Cluster,
    /// One worker of the cluster: its figures, memory over time, recent
    /// tasks and the tail of its log.
    Worker,
    /// The cluster manager's log.
    Logs,
}

/// What the console's driver must do after a key.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Follow this cluster (a registered name, or `tcp://HOST:PORT`).
    Open(String),
    /// Stop following the current cluster.
    Close,
    /// Carry out a command on a registered cluster.
    Act(String, Command),
    Quit,
}

/// The workers table's sort columns, in order (`s` moves to the next).
pub const SORTS: [&str; 4] = ["name", "memory", "processing", "stored"];

/// The key table (`?`, and the README).
pub const KEYS: &[(&str, &str)] = &[
    ("Enter", "open the selected cluster or worker"),
    ("Esc", "back (worker -> cluster -> clusters)"),
    ("j / Down, k / Up", "move the selection"),
    ("PgDn / PgUp, g / G", "page down / up, first / last"),
    ("/", "filter rows by name"),
    ("s", "sort workers by the next column"),
    (":scale N", "ask for N workers (fixed size)"),
    (":adapt MIN MAX", "scale with the load between MIN and MAX"),
    (":retire WORKER", "retire one worker (its data moves first)"),
    (":down", "stop the cluster (asks y/N)"),
    (":clusters", "back to the clusters view"),
    (":logs", "the cluster manager's log"),
    ("?", "this help"),
    ("q", "quit"),
];

/// Everything the console shows.
#[derive(Debug, Default)]
pub struct App {
    pub view: Option<View>,
    pub clusters: Vec<ClusterRow>,
    /// Selected row of the current table.
    pub selected: usize,
    /// The cluster followed in the cluster view: its registry name (None
    /// when opened by address) and address.
    pub current: Option<(Option<String>, String)>,
    pub model: Model,
    /// A line being typed after `:` or `/`.
    pub prompt: Option<(char, String)>,
    /// Rows shown contain this text.
    pub filter: String,
    /// A command waiting for y/N.
    pub confirm: Option<(String, Command)>,
    /// The last answer or error, for the bottom line.
    pub message: Option<(String, bool)>,
    /// Whether the connection to the followed scheduler is up, and why not.
    pub link: Option<String>,
    pub readonly: bool,
    pub help: bool,
    pub sort: usize,
    /// The worker shown in the worker view (its name).
    pub worker: Option<String>,
    /// Log lines shown in the worker and logs views (refreshed by the driver).
    pub log: Vec<String>,
}

impl App {
    /// A console starting on the clusters view.
    pub fn new(readonly: bool) -> Self {
        App { view: Some(View::Clusters), readonly, ..Default::default() }
    }

    fn view(&self) -> View {
        self.view.unwrap_or(View::Clusters)
    }

    /// Rows of the current table after the filter.
    pub fn visible_clusters(&self) -> Vec<&ClusterRow> {
        self.clusters.iter().filter(|c| c.name.contains(&self.filter)).collect()
    }

    fn rows(&self) -> usize {
        match self.view() {
            View::Clusters => self.visible_clusters().len(),
            View::Cluster => self.workers_shown().len(),
            View::Worker | View::Logs => self.log.len(),
        }
    }

    /// The cluster's workers after the filter, in the chosen order.
    pub fn workers_shown(&self) -> Vec<&cluster::protocol::WorkerInfo> {
        let mut ws: Vec<_> = self.model.workers.iter().filter(|w| w.name.contains(&self.filter)).collect();
        match SORTS[self.sort] {
            "memory" => ws.sort_by_key(|w| std::cmp::Reverse(w.rss)),
            "processing" => ws.sort_by_key(|w| std::cmp::Reverse(w.processing)),
            "stored" => ws.sort_by_key(|w| std::cmp::Reverse(w.managed)),
            _ => {}
        }
        ws
    }

    /// The registered name of the followed cluster, if it has one.
    pub fn cluster_name(&self) -> Option<&str> {
        self.current.as_ref().and_then(|(n, _)| n.as_deref())
    }

    fn say(&mut self, text: impl Into<String>, error: bool) {
        self.message = Some((text.into(), error));
    }

    /// Show the result of an effect.
    pub fn answer(&mut self, result: Result<String, String>) {
        match result {
            Ok(t) => self.say(t, false),
            Err(e) => self.say(e, true),
        }
    }

    /// Apply one key; the effect the driver must carry out, if any.
    pub fn key(&mut self, key: KeyEvent) -> Option<Effect> {
        if key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL) {
            return Some(Effect::Quit);
        }
        if let Some((name, command)) = self.confirm.take() {
            return match key.code {
                KeyCode::Char('y') | KeyCode::Char('Y') => Some(Effect::Act(name, command)),
                _ => {
                    self.say("cancelled", false);
                    None
                }
            };
        }
        if let Some((kind, mut text)) = self.prompt.take() {
            match key.code {
                KeyCode::Esc => {
                    if kind == '/' {
                        self.filter.clear();
                    }
                }
                KeyCode::Enter if kind == ':' => return self.command(&text),
                KeyCode::Enter => self.filter = text,
                KeyCode::Backspace => {
                    text.pop();
                    self.prompt = Some((kind, text));
                }
                KeyCode::Char(c) => {
                    text.push(c);
                    if kind == '/' {
                        self.filter = text.clone();
                    }
                    self.prompt = Some((kind, text));
                }
                _ => self.prompt = Some((kind, text)),
            }
            return None;
        }
        if self.help {
            self.help = false;
            return None;
        }
        let last = self.rows().saturating_sub(1);
        match key.code {
            KeyCode::Char('q') => return Some(Effect::Quit),
            KeyCode::Char('?') => self.help = true,
            KeyCode::Char(':') => self.prompt = Some((':', String::new())),
            KeyCode::Char('/') => self.prompt = Some(('/', self.filter.clone())),
            KeyCode::Char('j') | KeyCode::Down => self.selected = (self.selected + 1).min(last),
            KeyCode::Char('k') | KeyCode::Up => self.selected = self.selected.saturating_sub(1),
            KeyCode::PageDown => self.selected = (self.selected + 10).min(last),
            KeyCode::PageUp => self.selected = self.selected.saturating_sub(10),
            KeyCode::Char('g') | KeyCode::Home => self.selected = 0,
            KeyCode::Char('G') | KeyCode::End => self.selected = last,
            KeyCode::Char('s') => self.sort = (self.sort + 1) % SORTS.len(),
            KeyCode::Enter if self.view() == View::Clusters => {
                let name = self.visible_clusters().get(self.selected).map(|c| c.name.clone());
                return name.map(Effect::Open);
            }
            KeyCode::Enter if self.view() == View::Cluster => {
                if let Some(w) = self.workers_shown().get(self.selected).map(|w| w.name.clone()) {
                    self.worker = Some(w);
                    self.view = Some(View::Worker);
                    self.log.clear();
                    self.selected = 0;
                }
            }
            KeyCode::Esc if matches!(self.view(), View::Worker | View::Logs) => {
                self.view = Some(View::Cluster);
                self.worker = None;
                self.log.clear();
                self.selected = 0;
            }
            KeyCode::Esc if self.view() == View::Cluster => return self.back(),
            KeyCode::Esc => self.filter.clear(),
            _ => {}
        }
        None
    }

    /// Back to the clusters view.
    fn back(&mut self) -> Option<Effect> {
        self.view = Some(View::Clusters);
        self.current = None;
        self.model = Model::default();
        self.selected = 0;
        self.filter.clear();
        Some(Effect::Close)
    }

    /// The cluster a command acts on: the one followed, else the selected one.
    fn target(&self) -> Option<String> {
        match (self.view(), &self.current) {
            (View::Cluster | View::Worker | View::Logs, Some((name, _))) => name.clone(),
            (View::Clusters, _) => self.visible_clusters().get(self.selected).map(|c| c.name.clone()),
            _ => None,
        }
    }

    /// Run a `:` command.
    fn command(&mut self, text: &str) -> Option<Effect> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let usage = |me: &mut App, u: &str| {
            me.say(format!("usage: {u}"), true);
            None
        };
        let command = match words.as_slice() {
            [] => return None,
            ["q" | "quit"] => return Some(Effect::Quit),
            ["clusters"] => return if self.view() == View::Clusters { None } else { self.back() },
            ["workers"] => {
                return self.target().map(Effect::Open);
            }
            ["logs"] => {
                if self.current.is_some() {
                    self.view = Some(View::Logs);
                    self.log.clear();
                    self.selected = 0;
                } else {
                    self.say("open a cluster first (Enter)", true);
                }
                return None;
            }
            ["scale", n] => match n.parse() {
                Ok(n) => Command::Scale(n),
                Err(_) => return usage(self, "scale N (a whole number of workers)"),
            },
            ["scale", ..] => return usage(self, "scale N"),
            ["adapt", lo, hi] => match (lo.parse::<usize>(), hi.parse::<usize>()) {
                (Ok(lo), Ok(hi)) if lo <= hi => Command::Adapt(lo, hi),
                (Ok(_), Ok(_)) => return usage(self, "adapt MIN MAX with MIN <= MAX"),
                _ => return usage(self, "adapt MIN MAX (whole numbers)"),
            },
            ["adapt", ..] => return usage(self, "adapt MIN MAX"),
            ["retire", w] => Command::Retire(w.to_string()),
            ["retire", ..] => return usage(self, "retire WORKER"),
            ["down"] => Command::Down,
            [other, ..] => {
                self.say(format!("unknown command :{other} (? lists them)"), true);
                return None;
            }
        };
        if self.readonly {
            self.say(format!(":{text} refused: the console is read-only (--readonly)"), true);
            return None;
        }
        let Some(name) = self.target() else {
            self.say("no managed cluster to act on: this one was opened by address", true);
            return None;
        };
        // Every change is confirmed first.
        let question = match &command {
            Command::Down => format!("stop cluster {name} and every worker? y/N"),
            Command::Scale(n) => format!("scale {name} to {n} workers? y/N"),
            Command::Adapt(lo, hi) => format!("scale {name} adaptively between {lo} and {hi} workers? y/N"),
            Command::Retire(w) => format!("retire worker {w} of {name} (its data moves first)? y/N"),
        };
        self.say(question, false);
        self.confirm = Some((name, command));
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn press(app: &mut App, keys: &str) -> Vec<Effect> {
        keys.chars()
            .filter_map(|c| {
                let code = match c {
                    '\n' => KeyCode::Enter,
                    '\x1b' => KeyCode::Esc,
                    c => KeyCode::Char(c),
                };
                app.key(KeyEvent::new(code, KeyModifiers::NONE))
            })
            .collect()
    }

    fn with_clusters() -> App {
        let mut app = App::new(false);
        app.clusters =
            ["alpha", "beta"].iter().map(|n| ClusterRow { name: n.to_string(), ..Default::default() }).collect();
        app
    }

    #[test]
    fn commands_act_on_the_selected_cluster_and_down_asks_first() {
        let mut app = with_clusters();
        assert!(press(&mut app, "j:scale 3\n").is_empty(), "asks first");
        assert!(app.message.as_ref().unwrap().0.contains("scale beta to 3 workers? y/N"));
        assert_eq!(press(&mut app, "y"), [Effect::Act("beta".into(), Command::Scale(3))]);
        assert_eq!(press(&mut app, ":adapt 1 4\ny"), [Effect::Act("beta".into(), Command::Adapt(1, 4))]);
        assert_eq!(press(&mut app, ":retire w1\ny"), [Effect::Act("beta".into(), Command::Retire("w1".into()))]);
        assert!(press(&mut app, ":down\n").is_empty(), "asks first");
        assert!(app.message.as_ref().unwrap().0.contains("y/N"));
        assert!(press(&mut app, "n").is_empty(), "anything but y cancels");
        assert_eq!(press(&mut app, ":down\ny"), [Effect::Act("beta".into(), Command::Down)]);
        assert_eq!(press(&mut app, "k\n"), [Effect::Open("alpha".into())]);
    }

    #[test]
    fn bad_commands_explain_themselves_and_readonly_refuses() {
        let mut app = with_clusters();
        for (typed, says) in [
            (":scale x\n", "usage: scale N"),
            (":adapt 4 1\n", "MIN <= MAX"),
            (":frobnicate\n", "unknown command :frobnicate"),
        ] {
            assert!(press(&mut app, typed).is_empty(), "{typed}");
            let (text, error) = app.message.clone().unwrap();
            assert!(error && text.contains(says), "{typed}: {text}");
        }
        let mut ro = with_clusters();
        ro.readonly = true;
        for typed in [":scale 2\n", ":adapt 1 2\n", ":down\n", ":retire w0\n"] {
            assert!(press(&mut ro, typed).is_empty(), "{typed}");
            assert!(ro.message.as_ref().unwrap().0.contains("read-only"), "{typed}");
            assert!(ro.confirm.is_none());
        }
    }

    #[test]
    fn filter_selection_and_quit() {
        let mut app = with_clusters();
        press(&mut app, "/bet\n");
        assert_eq!(app.visible_clusters().len(), 1);
        assert_eq!(press(&mut app, "\n"), [Effect::Open("beta".into())]);
        app.view = Some(View::Cluster);
        app.current = Some((Some("beta".into()), "tcp://h:1".into()));
        assert_eq!(press(&mut app, "\x1b"), [Effect::Close]);
        assert_eq!(app.view, Some(View::Clusters));
        app.view = Some(View::Cluster);
        app.current = Some((Some("beta".into()), "tcp://h:1".into()));
        // Enter on a worker opens it; Esc goes back one view at a time.
        app.model.workers = vec![cluster::protocol::WorkerInfo::new("w0", "tcp://h:1", 1, 0)];
        assert_eq!(press(&mut app, "\n"), []);
        assert_eq!((app.view, app.worker.as_deref()), (Some(View::Worker), Some("w0")));
        assert_eq!(press(&mut app, "\x1b"), []);
        assert_eq!(app.view, Some(View::Cluster));
        press(&mut app, ":logs\n");
        assert_eq!(app.view, Some(View::Logs));
        assert_eq!(press(&mut app, ":clusters\n"), [Effect::Close]);
        assert_eq!(press(&mut app, "?x"), []);
        assert!(!app.help);
        assert_eq!(press(&mut app, "q"), [Effect::Quit]);
    }
}
