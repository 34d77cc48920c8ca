//! Static ordering of a task graph: the tie-breaking priority each task of
//! a submitted graph gets, so that workers walk it depth first along a
//! critical path and free intermediate results early.
//!
//! This is the strategy of Dask's `dask.order` (the 2024 rewrite), ported so
//! that a graph is ordered in Rust instead of in the client's Python: the
//! same pruning of data nodes and aliases, the same sort key
//! `(total dependencies, dependencies, connected roots, -max dependents,
//! key)`, the same critical-path walk with cached runnable paths. Where
//! Dask iterates a Python set (whose order changes with the string hash
//! seed, so Dask itself is not deterministic there) this module uses a
//! fixed order: dependents in graph order, a node's dependencies on the
//! critical path in sort-key order.

use rustc_hash::{FxHashMap, FxHashSet};
use std::collections::VecDeque;
use std::rc::Rc;

/// The graph has a cycle; `cycle` lists its keys, the first again at the end.
#[derive(Debug, thiserror::Error)]
#[error("Cycle detected between the following keys:\n  -> {}", cycle.join("\n  -> "))]
pub struct CycleError {
    /// Keys along the cycle.
    pub cycle: Vec<String>,
}

/// One node of a graph to order.
pub struct Node<'a> {
    /// Its key.
    pub key: &'a str,
    /// Keys it depends on; keys that are not nodes of the graph are
    /// external (results of earlier graphs) and are ordered as data.
    pub deps: &'a [String],
    /// False for a node that only holds data (Dask's `DataNode`).
    pub is_task: bool,
}

/// Priorities for `nodes`, one each in the same order: run lower first.
pub fn order(nodes: &[Node<'_>]) -> Result<Vec<u64>, CycleError> {
    let n_internal = nodes.len();
    if n_internal == 0 {
        return Ok(Vec::new());
    }
    let mut index: FxHashMap<&str, u32> = FxHashMap::default();
    index.reserve(n_internal);
    let mut keys: Vec<&str> = Vec::with_capacity(n_internal);
    let mut is_task: Vec<bool> = Vec::with_capacity(n_internal);
    for node in nodes {
        index.entry(node.key).or_insert(keys.len() as u32);
        keys.push(node.key);
        is_task.push(node.is_task);
    }
    let mut deps: Vec<Vec<u32>> = Vec::with_capacity(n_internal);
    for node in nodes {
        let mut ds: Vec<u32> = Vec::with_capacity(node.deps.len());
        for d in node.deps {
            let id = *index.entry(d.as_str()).or_insert_with(|| {
                keys.push(d.as_str());
                is_task.push(false);
                (keys.len() - 1) as u32
            });
            if !ds.contains(&id) {
                ds.push(id);
            }
        }
        deps.push(ds);
    }
    deps.resize(keys.len(), Vec::new());
    let mut result = Orderer::new(keys, deps, is_task, n_internal)?.run();
    result.truncate(n_internal);
    Ok(result)
}

const UNSET: u64 = u64::MAX;

/// Dask's sort key: which of two nodes is the more valuable target.
#[derive(PartialEq, Eq, PartialOrd, Ord, Clone, Copy)]
struct SortKey<'a> {
    total_dependencies: u64,
    dependencies: usize,
    roots_connected: usize,
    neg_max_dependents: i64,
    key: &'a str,
}

struct Orderer<'a> {
    keys: Vec<&'a str>,
    deps: Vec<Vec<u32>>,
    dependents: Vec<Vec<u32>>,
    external: Vec<bool>,
    leaf: Vec<bool>,
    root: Vec<bool>,
    result: Vec<u64>,
    done: usize,
    expected: usize,
    i: u64,
    requires_data: Vec<Vec<u32>>,
    num_needed: Vec<u32>,
    sort: Vec<SortKey<'a>>,
    leafs_connected: Vec<Rc<Vec<u32>>>,
    leafs_degree: FxHashMap<u32, usize>,
    leafs_per_degree: FxHashMap<usize, FxHashSet<u32>>,
    min_leaf_degree: usize,
    max_leaf_degree: usize,
    runnable_hull: Vec<bool>,
    reachable_hull: Vec<bool>,
    reachable_count: usize,
    runnable: Vec<u32>,
    known_paths: FxHashMap<u32, Vec<Vec<u32>>>,
    critical_path: Vec<u32>,
}

impl<'a> Orderer<'a> {
    /// Prune data roots and alias leaves as Dask does, then compute what
    /// the sort key needs.
    fn new(
        keys: Vec<&'a str>,
        mut deps: Vec<Vec<u32>>,
        is_task: Vec<bool>,
        n_internal: usize,
    ) -> Result<Orderer<'a>, CycleError> {
        let n = keys.len();
        let mut dependents: Vec<Vec<u32>> = vec![Vec::new(); n];
        for (k, ds) in deps.iter().enumerate() {
            for &d in ds {
                dependents[d as usize].push(k as u32);
            }
        }
        let mut leaf: Vec<bool> = dependents.iter().map(Vec::is_empty).collect();
        let mut root: Vec<bool> = deps.iter().map(Vec::is_empty).collect();
        let mut alive = vec![true; n];
        let mut len = n;
        let mut result = vec![UNSET; n];
        let mut done = 0;
        let mut removed_leaves = 0;
        let mut requires_data: Vec<Vec<u32>> = vec![Vec::new(); n];
        let mut all_tasks = false;
        while !all_tasks {
            all_tasks = true;
            // Leaves that are not tasks but gather several results (an
            // alias to many keys): last, they cost nothing.
            let leaves: Vec<usize> = (0..n).filter(|&k| leaf[k]).collect();
            for l in leaves {
                if root[l] || is_task[l] || deps[l].len() <= 1 {
                    continue;
                }
                all_tasks = false;
                result[l] = (len - 1 - removed_leaves) as u64;
                done += 1;
                removed_leaves += 1;
                leaf[l] = false;
                for d in std::mem::take(&mut deps[l]) {
                    let ds = &mut dependents[d as usize];
                    ds.retain(|&x| x as usize != l);
                    if ds.is_empty() {
                        leaf[d as usize] = true;
                    }
                }
                alive[l] = false;
                len -= 1;
            }
            // Data that several tasks take: embedded in their run specs,
            // ordered just before the first of them runs.
            let roots: Vec<usize> = (0..n).filter(|&k| root[k]).collect();
            for r in roots {
                if leaf[r] || is_task[r] || dependents[r].len() <= 1 {
                    continue;
                }
                alive[r] = false;
                len -= 1;
                root[r] = false;
                for d in std::mem::take(&mut dependents[r]) {
                    requires_data[d as usize].push(r as u32);
                    let ds = &mut deps[d as usize];
                    ds.retain(|&x| x as usize != r);
                    if ds.is_empty() {
                        root[d as usize] = true;
                    }
                }
            }
        }
        let num_needed: Vec<u32> = deps.iter().map(|d| d.len() as u32).collect();
        let Some(total) = total_dependencies(&deps, &dependents, &alive, len) else {
            return Err(CycleError { cycle: find_cycle(&keys, &deps, &alive) });
        };
        let (roots_connected, max_dependents) = connecting_to_roots(&deps, &dependents, &alive);
        let (leafs_connected, _) = connecting_to_roots(&dependents, &deps, &alive);
        let sort = (0..n)
            .map(|k| SortKey {
                total_dependencies: total[k],
                dependencies: deps[k].len(),
                roots_connected: roots_connected[k].len(),
                neg_max_dependents: -(max_dependents[k] as i64),
                key: keys[k],
            })
            .collect();
        drop(roots_connected);
        let mut external = vec![false; n];
        external[n_internal..].fill(true);
        Ok(Orderer {
            keys,
            deps,
            dependents,
            external,
            leaf,
            root,
            result,
            done,
            expected: n,
            i: 0,
            requires_data,
            num_needed,
            sort,
            leafs_connected,
            leafs_degree: FxHashMap::default(),
            leafs_per_degree: FxHashMap::default(),
            min_leaf_degree: len,
            max_leaf_degree: len,
            runnable_hull: vec![false; n],
            reachable_hull: vec![false; n],
            reachable_count: 0,
            runnable: Vec::new(),
            known_paths: FxHashMap::default(),
            critical_path: Vec::new(),
        })
    }

    fn key(&self, k: u32) -> SortKey<'a> {
        self.sort[k as usize]
    }

    fn in_result(&self, k: u32) -> bool {
        self.result[k as usize] != UNSET
    }

    fn sorted(&self, items: impl IntoIterator<Item = u32>) -> Vec<u32> {
        let mut v: Vec<u32> = items.into_iter().collect();
        v.sort_unstable_by_key(|&k| self.key(k));
        v
    }

    fn discard_reachable(&mut self, k: u32) {
        if std::mem::replace(&mut self.reachable_hull[k as usize], false) {
            self.reachable_count -= 1;
        }
    }

    fn add_reachable(&mut self, k: u32) {
        if !std::mem::replace(&mut self.reachable_hull[k as usize], true) {
            self.reachable_count += 1;
        }
    }

    /// Give `item` the next priority, then whatever it makes runnable that
    /// has no other way to go (a single dependent).
    fn add_to_result(&mut self, item: u32) {
        let mut next = vec![item];
        while let Some(item) = next.pop() {
            let it = item as usize;
            self.runnable_hull[it] = false;
            self.discard_reachable(item);
            self.leaf[it] = false;
            if self.in_result(item) {
                continue;
            }
            while let Some(data) = self.requires_data[it].pop() {
                self.add_to_result(data);
            }
            self.result[it] = self.i;
            self.done += 1;
            if !self.external[it] {
                self.i += 1;
            }
            if self.root[it] {
                let leaves = Rc::clone(&self.leafs_connected[it]);
                for &l in leaves.iter() {
                    if !self.leaf[l as usize] {
                        continue;
                    }
                    let degree = self.leafs_degree.remove(&l).expect("a leaf's degree");
                    let at = self.leafs_per_degree.entry(degree).or_default();
                    at.remove(&l);
                    let emptied = at.is_empty();
                    let new_degree = degree - 1;
                    if new_degree > 0 {
                        self.min_leaf_degree = self.min_leaf_degree.min(new_degree);
                        self.leafs_per_degree.entry(new_degree).or_default().insert(l);
                        self.leafs_degree.insert(l, new_degree);
                    } else if emptied {
                        while self.min_leaf_degree != self.max_leaf_degree
                            && self.leafs_per_degree.get(&self.min_leaf_degree).is_none_or(FxHashSet::is_empty)
                        {
                            self.min_leaf_degree += 1;
                        }
                    }
                }
            }
            let single = self.dependents[it].len() == 1;
            for j in 0..self.dependents[it].len() {
                let dep = self.dependents[it][j];
                self.num_needed[dep as usize] -= 1;
                self.add_reachable(dep);
                if self.num_needed[dep as usize] == 0 {
                    if single {
                        next.push(dep);
                    } else {
                        self.runnable.push(dep);
                    }
                }
            }
        }
    }

    /// Walk forward from what became runnable without being on the critical
    /// path: run a path at once when it ends in a leaf or completes a
    /// reducer, otherwise remember it until the reducer is needed.
    fn process_runnables(&mut self) {
        while !self.runnable.is_empty() {
            let mut candidates = std::mem::take(&mut self.runnable);
            while let Some(key) = candidates.pop() {
                if self.runnable_hull[key as usize] || self.in_result(key) {
                    continue;
                }
                if self.leaf[key as usize] {
                    self.add_to_result(key);
                    continue;
                }
                let mut branches: VecDeque<(usize, Vec<u32>)> = VecDeque::from([(0, vec![key])]);
                while let Some((mut nsplits, mut path)) = branches.pop_front() {
                    loop {
                        let current = *path.last().expect("a path is never empty");
                        let c = current as usize;
                        self.runnable_hull[c] = true;
                        let downstream = self.dependents[c].len();
                        if downstream == 0 {
                            if self.num_needed[c] <= 1 {
                                for &k in &path {
                                    self.add_to_result(k);
                                }
                            } else {
                                self.runnable_hull[c] = false;
                            }
                        } else if path.len() == 1 || self.deps[c].len() == 1 {
                            if downstream > 1 {
                                nsplits += 1;
                                for d in self.sorted(self.dependents[c].iter().copied()) {
                                    // Only genuine splits, not interleavings.
                                    if self.deps[d as usize].len() == 1 {
                                        let mut branch = path.clone();
                                        branch.push(d);
                                        branches.push_back((nsplits, branch));
                                    }
                                }
                                break;
                            }
                            path.push(self.dependents[c][0]);
                            continue;
                        } else if let Some(known) = self.known_paths.get_mut(&current) {
                            known.push(path);
                            let count = known.len();
                            self.runnable_hull[c] = false;
                            if count >= self.num_needed[c] as usize {
                                let all = self.known_paths.remove(&current).expect("just seen");
                                let mut pruned: VecDeque<Vec<u32>> =
                                    all.into_iter().filter(|p| !self.in_result(p[p.len() - 2])).collect();
                                if pruned.len() < self.num_needed[c] as usize {
                                    self.known_paths.insert(current, pruned.into());
                                } else {
                                    if nsplits > 1 {
                                        let joined: Vec<u32> = pruned.into_iter().flatten().collect();
                                        branches.push_back((nsplits - 1, joined));
                                        break;
                                    }
                                    // Round and round until every path ran (a path
                                    // may wait for another's end); a full round that
                                    // runs nothing leaves the rest to the walk.
                                    let mut stalled = 0;
                                    while let Some(p) = pruned.pop_front() {
                                        let before = self.done;
                                        let mut blocked = false;
                                        for &k in &p {
                                            if self.num_needed[k as usize] > 0 {
                                                blocked = true;
                                                break;
                                            }
                                            self.add_to_result(k);
                                        }
                                        if !blocked {
                                            stalled = 0;
                                            continue;
                                        }
                                        stalled = if self.done == before { stalled + 1 } else { 0 };
                                        pruned.push_back(p);
                                        if stalled > pruned.len() {
                                            break;
                                        }
                                    }
                                }
                            }
                        } else if self.deps[c].len() > 1 && self.num_needed[c] <= 1 {
                            for &k in &path {
                                self.add_to_result(k);
                            }
                        } else {
                            self.known_paths.insert(current, vec![path]);
                            self.runnable_hull[c] = false;
                        }
                        break;
                    }
                }
            }
        }
    }

    /// The next leaf to aim for: the most valuable one, or, mid-run, one
    /// needing the fewest further roots.
    fn get_target(&mut self, leaves_sorted: &mut Vec<u32>) -> u32 {
        let all_accessible = self.min_leaf_degree == self.max_leaf_degree;
        let found = if self.reachable_count == 0 || all_accessible {
            leaves_sorted.pop()
        } else {
            let at_min = self.leafs_per_degree.get(&self.min_leaf_degree);
            let at_min = || at_min.into_iter().flatten().copied();
            let reachable = at_min().filter(|&l| self.reachable_hull[l as usize]).min_by_key(|&l| self.key(l));
            reachable.or_else(|| at_min().min_by_key(|&l| self.key(l)))
        };
        // Dask would fail here; any node not ordered yet keeps us going.
        found.unwrap_or_else(|| (0..self.keys.len() as u32).find(|&k| !self.in_result(k)).unwrap_or(0))
    }

    /// Whether the graph is shaped so that the leaf with the most work
    /// behind it should go first.
    fn use_longest_path(&self) -> bool {
        let roots: Vec<usize> = (0..self.keys.len()).filter(|&k| self.root[k]).collect();
        let leaves = self.leaf.iter().filter(|&&l| l).count();
        if roots.is_empty() {
            return true;
        }
        if (roots.len() as f64 - leaves as f64).abs() / (roots.len() as f64) < 0.8 {
            let size = self.leafs_connected[roots[0]].len();
            if roots.iter().any(|&r| self.leafs_connected[r].len() != size) {
                return false;
            }
        }
        true
    }

    fn run(mut self) -> Vec<u64> {
        let n = self.keys.len();
        for l in 0..n {
            if self.leaf[l] && !self.root[l] {
                let degree = self.sort[l].roots_connected;
                self.min_leaf_degree = self.min_leaf_degree.min(degree);
                self.max_leaf_degree = self.max_leaf_degree.max(degree);
                self.leafs_degree.insert(l as u32, degree);
                self.leafs_per_degree.entry(degree).or_default().insert(l as u32);
            }
        }
        let longest = self.use_longest_path();
        let mut leaves_sorted = self.sorted((0..n as u32).filter(|&k| self.leaf[k as usize]));
        if !longest {
            leaves_sorted.reverse();
        }
        while self.done < self.expected {
            // A. The critical path: from a target leaf back to a root along
            // the most valuable dependencies.
            let target = self.get_target(&mut leaves_sorted);
            self.critical_path.push(target);
            let mut next: Vec<u32> = self.deps[target as usize].clone();
            while !next.is_empty() {
                let item = *next.iter().max_by_key(|&&k| self.key(k)).expect("not empty");
                self.critical_path.push(item);
                next = self.sorted(self.deps[item as usize].iter().copied().filter(|&d| !self.in_result(d)));
                self.critical_path.extend_from_slice(&next);
            }
            // B. Walk it, walking back for what each step still needs.
            let mut walked_back = false;
            while let Some(item) = self.critical_path.pop() {
                if self.in_result(item) {
                    continue;
                }
                if self.num_needed[item as usize] > 0 {
                    self.critical_path.push(item);
                    let missing = self.sorted(self.deps[item as usize].iter().copied().filter(|&d| !self.in_result(d)));
                    let (known, unknown): (Vec<u32>, Vec<u32>) =
                        missing.into_iter().partition(|d| self.known_paths.contains_key(d));
                    if unknown.len() > 1 {
                        walked_back = true;
                    }
                    self.critical_path.extend_from_slice(&unknown);
                    for d in known {
                        for path in self.known_paths.remove(&d).unwrap_or_default() {
                            self.critical_path.extend(path.into_iter().rev());
                        }
                    }
                    continue;
                }
                if walked_back && self.runnable.len() < self.critical_path.len() {
                    self.process_runnables();
                }
                self.add_to_result(item);
            }
            self.process_runnables();
        }
        self.result
    }
}

/// Tasks each node needs run first, counted along every path (Dask's
/// `ndependencies`); None when some alive node is on a cycle.
fn total_dependencies(deps: &[Vec<u32>], dependents: &[Vec<u32>], alive: &[bool], len: usize) -> Option<Vec<u64>> {
    let n = deps.len();
    let mut total = vec![0u64; n];
    let mut needed: Vec<u32> = deps.iter().map(|d| d.len() as u32).collect();
    let mut current: Vec<u32> = Vec::new();
    let mut counted = 0;
    for k in 0..n {
        if alive[k] && deps[k].is_empty() {
            total[k] = 1;
            counted += 1;
            for &p in &dependents[k] {
                needed[p as usize] -= 1;
                if needed[p as usize] == 0 {
                    current.push(p);
                }
            }
        }
    }
    while let Some(k) = current.pop() {
        let k = k as usize;
        total[k] = deps[k].iter().fold(1u64, |s, &c| s.saturating_add(total[c as usize]));
        counted += 1;
        for &p in &dependents[k] {
            needed[p as usize] -= 1;
            if needed[p as usize] == 0 {
                current.push(p);
            }
        }
    }
    (counted == len).then_some(total)
}

/// For every node, the roots it descends from (with `up` the dependencies;
/// pass them swapped for the leaves each node leads to), and the most
/// dependents any of those roots has. Roots get the empty set.
fn connecting_to_roots(up: &[Vec<u32>], down: &[Vec<u32>], alive: &[bool]) -> (Vec<Rc<Vec<u32>>>, Vec<usize>) {
    let n = up.len();
    let empty: Rc<Vec<u32>> = Rc::new(Vec::new());
    let mut result: Vec<Option<Rc<Vec<u32>>>> = vec![None; n];
    let mut needed: Vec<u32> = up.iter().map(|d| d.len() as u32).collect();
    let mut max_dependents = vec![0usize; n];
    let mut current: Vec<u32> = Vec::new();
    let mut roots: Vec<usize> = Vec::new();
    for k in 0..n {
        if alive[k] && up[k].is_empty() {
            roots.push(k);
            result[k] = Some(Rc::new(vec![k as u32]));
            max_dependents[k] = down[k].len();
            for &c in &down[k] {
                needed[c as usize] -= 1;
                if needed[c as usize] == 0 {
                    current.push(c);
                }
            }
        }
    }
    // Dense graphs end with many nodes sharing one set: keep one copy.
    let mut dedup: FxHashSet<Rc<Vec<u32>>> = FxHashSet::default();
    while let Some(key) = current.pop() {
        let k = key as usize;
        if result[k].is_some() {
            continue;
        }
        for &p in &down[k] {
            needed[p as usize] -= 1;
            if needed[p as usize] == 0 {
                current.push(p);
            }
        }
        let mut sets: Vec<&Rc<Vec<u32>>> = Vec::new();
        let mut most = 0;
        for &c in &up[k] {
            let set = result[c as usize].as_ref().expect("dependencies come first");
            most = most.max(max_dependents[c as usize]);
            if !sets.iter().any(|s| Rc::ptr_eq(s, set)) {
                sets.push(set);
            }
        }
        max_dependents[k] = most;
        let first = sets[0];
        let merged = if sets.len() == 1 || sets[1..].iter().all(|s| is_subset(s, first)) {
            Rc::clone(first)
        } else {
            let mut all: Vec<u32> = sets.iter().flat_map(|s| s.iter().copied()).collect();
            all.sort_unstable();
            all.dedup();
            match dedup.get(&all) {
                Some(same) => Rc::clone(same),
                None => {
                    let rc = Rc::new(all);
                    dedup.insert(Rc::clone(&rc));
                    rc
                }
            }
        };
        result[k] = Some(merged);
    }
    for r in roots {
        result[r] = Some(Rc::clone(&empty));
    }
    (result.into_iter().map(|r| r.unwrap_or_else(|| Rc::clone(&empty))).collect(), max_dependents)
}

/// Whether sorted `a` is within sorted `b`.
fn is_subset(a: &[u32], b: &[u32]) -> bool {
    if a.len() > b.len() {
        return false;
    }
    let mut j = 0;
    for &x in a {
        while j < b.len() && b[j] < x {
            j += 1;
        }
        if j == b.len() || b[j] != x {
            return false;
        }
        j += 1;
    }
    true
}

/// A cycle among the alive nodes, as keys, the first repeated at the end.
fn find_cycle(keys: &[&str], deps: &[Vec<u32>], alive: &[bool]) -> Vec<String> {
    // Iterative depth-first search: 0 unseen, 1 on the stack, 2 finished.
    let n = deps.len();
    let mut mark = vec![0u8; n];
    for start in 0..n {
        if !alive[start] || mark[start] != 0 {
            continue;
        }
        let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
        mark[start] = 1;
        while let Some(&mut (k, ref mut next)) = stack.last_mut() {
            if let Some(&d) = deps[k].get(*next) {
                *next += 1;
                let d = d as usize;
                match mark[d] {
                    0 => {
                        mark[d] = 1;
                        stack.push((d, 0));
                    }
                    1 => {
                        let from = stack.iter().position(|&(s, _)| s == d).expect("on the stack");
                        let mut cycle: Vec<String> = stack[from..].iter().map(|&(s, _)| keys[s].to_string()).collect();
                        cycle.push(keys[d].to_string());
                        return cycle;
                    }
                    _ => {}
                }
            } else {
                mark[k] = 2;
                stack.pop();
            }
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(graph: &[(&str, &[&str])]) -> FxHashMap<String, u64> {
        let deps: Vec<Vec<String>> = graph.iter().map(|(_, d)| d.iter().map(|s| s.to_string()).collect()).collect();
        let nodes: Vec<Node<'_>> =
            graph.iter().zip(&deps).map(|((k, _), d)| Node { key: k, deps: d, is_task: true }).collect();
        let o = order(&nodes).expect("no cycle");
        graph.iter().map(|(k, _)| k.to_string()).zip(o).collect()
    }

    #[test]
    fn orders_dasks_docstring_example_as_dask_does() {
        // dask.order's own example: {'a': 0, 'c': 1, 'b': 2, 'd': 3}.
        let o = run(&[("a", &[]), ("b", &[]), ("c", &["a"]), ("d", &["b", "c"])]);
        assert_eq!((o["a"], o["c"], o["b"], o["d"]), (0, 1, 2, 3));
    }

    #[test]
    fn priorities_are_a_permutation_and_respect_dependencies() {
        // Two binary trees sharing nothing, and a chain.
        let mut g: Vec<(String, Vec<String>)> = Vec::new();
        for t in 0..2 {
            let mut level: Vec<String> = (0..16).map(|i| format!("t{t}-0-{i}")).collect();
            for k in &level {
                g.push((k.clone(), vec![]));
            }
            let mut depth = 1;
            while level.len() > 1 {
                let next: Vec<String> = (0..level.len() / 2).map(|j| format!("t{t}-{depth}-{j}")).collect();
                for (j, k) in next.iter().enumerate() {
                    g.push((k.clone(), vec![level[2 * j].clone(), level[2 * j + 1].clone()]));
                }
                level = next;
                depth += 1;
            }
        }
        let nodes: Vec<Node<'_>> = g.iter().map(|(k, d)| Node { key: k, deps: d, is_task: true }).collect();
        let o = order(&nodes).unwrap();
        let mut seen = o.clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..g.len() as u64).collect::<Vec<_>>());
        let at: FxHashMap<&str, u64> = g.iter().map(|(k, _)| k.as_str()).zip(o.iter().copied()).collect();
        for (k, ds) in &g {
            for d in ds {
                assert!(at[d.as_str()] < at[k.as_str()], "{d} after its dependent {k}");
            }
        }
        // Depth first: one tree finishes before the other starts.
        for t in ["t0", "t1"] {
            let mine: Vec<u64> = g.iter().filter(|(k, _)| k.starts_with(t)).map(|(k, _)| at[k.as_str()]).collect();
            let (lo, hi) = (mine.iter().min().unwrap(), mine.iter().max().unwrap());
            assert_eq!(hi - lo, 30, "tree {t} interleaves with the other");
        }
    }

    #[test]
    fn external_keys_take_no_priority() {
        let deps_a = vec!["old".to_string()];
        let deps_b = vec!["a".to_string(), "old".to_string()];
        let nodes = [Node { key: "a", deps: &deps_a, is_task: true }, Node { key: "b", deps: &deps_b, is_task: true }];
        assert_eq!(order(&nodes).unwrap(), vec![0, 1]);
    }

    #[test]
    fn a_cycle_is_reported_with_its_keys() {
        let (a, b, c) = (vec!["c".to_string()], vec!["a".to_string()], vec!["b".to_string()]);
        let nodes = [
            Node { key: "a", deps: &a, is_task: true },
            Node { key: "b", deps: &b, is_task: true },
            Node { key: "c", deps: &c, is_task: true },
        ];
        let e = order(&nodes).unwrap_err();
        assert_eq!(e.cycle.len(), 4);
        assert_eq!(e.cycle.first(), e.cycle.last());
        assert!(e.to_string().starts_with("Cycle detected between the following keys:\n  -> "));
    }
}
