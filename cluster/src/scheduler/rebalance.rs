//! The rebalancing plan (`Client.rebalance`): which results move from
//! workers holding more managed memory than the mean to workers holding less.
//!
//! Pure: loads and candidate keys in, moves out. The scheduler state carries
//! the moves out (copy to the recipient, then free on the sender) and keeps
//! a key whose sender still needs it.

use rustc_hash::{FxHashMap, FxHashSet};

use super::state::PeerId;

/// A result that may move, with the workers holding it.
#[derive(Debug, Clone)]
pub(crate) struct Candidate<Id> {
    pub id: Id,
    pub nbytes: u64,
    pub holders: Vec<PeerId>,
}

/// Plan moves `(id, from, to)` among the workers of `loads` (peer, bytes in
/// memory). Senders are workers above the mean, largest first; each gives
/// its largest keys first to the worker holding least that lacks the key,
/// and only while the move narrows the gap between the two (sender minus
/// recipient greater than the key's size, so the spread of loads strictly
/// shrinks and the plan never moves a key back and forth). A key moves at
/// most once.
pub(crate) fn plan<Id: Copy + Ord + std::hash::Hash>(
    loads: &[(PeerId, u64)],
    candidates: &[Candidate<Id>],
) -> Vec<(Id, PeerId, PeerId)> {
    if loads.len() < 2 {
        return Vec::new();
    }
    let mut load: FxHashMap<PeerId, u64> = loads.iter().copied().collect();
    let mean = loads.iter().map(|&(_, b)| b as f64).sum::<f64>() / loads.len() as f64;
    let mut by_sender: FxHashMap<PeerId, Vec<(u64, Id, usize)>> = FxHashMap::default();
    for (i, c) in candidates.iter().enumerate() {
        if c.nbytes == 0 {
            continue;
        }
        for h in &c.holders {
            if load.contains_key(h) {
                by_sender.entry(*h).or_default().push((c.nbytes, c.id, i));
            }
        }
    }
    let mut senders: Vec<(u64, PeerId)> =
        loads.iter().filter(|&&(_, b)| b as f64 > mean).map(|&(p, b)| (b, p)).collect();
    senders.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut moved: FxHashSet<Id> = FxHashSet::default();
    let mut moves = Vec::new();
    for (_, s) in senders {
        let Some(mut keys) = by_sender.remove(&s) else { continue };
        keys.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for (nbytes, id, i) in keys {
            if load[&s] as f64 <= mean {
                break;
            }
            if moved.contains(&id) {
                continue;
            }
            let holders = &candidates[i].holders;
            let recipient = loads
                .iter()
                .map(|&(p, _)| (load[&p], p))
                .filter(|&(b, p)| (b as f64) < mean && !holders.contains(&p))
                .min();
            let Some((rb, r)) = recipient else { continue };
            if load[&s] - rb <= nbytes {
                continue;
            }
            *load.get_mut(&s).expect("sender") -= nbytes;
            *load.get_mut(&r).expect("recipient") += nbytes;
            moved.insert(id);
            moves.push((id, s, r));
        }
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: u32, nbytes: u64, holders: &[PeerId]) -> Candidate<u32> {
        Candidate { id, nbytes, holders: holders.to_vec() }
    }

    fn after(loads: &[(PeerId, u64)], cands: &[Candidate<u32>], moves: &[(u32, PeerId, PeerId)]) -> Vec<u64> {
        let mut l: FxHashMap<PeerId, u64> = loads.iter().copied().collect();
        for &(id, from, to) in moves {
            let n = cands.iter().find(|c| c.id == id).unwrap().nbytes;
            *l.get_mut(&from).unwrap() -= n;
            *l.get_mut(&to).unwrap() += n;
        }
        loads.iter().map(|(p, _)| l[p]).collect()
    }

    #[test]
    fn spreads_equal_keys_evenly_from_one_worker() {
        let cands: Vec<_> = (0..12).map(|i| c(i, 100, &[1])).collect();
        let loads = [(1, 1200), (2, 0), (3, 0)];
        let moves = plan(&loads, &cands);
        assert_eq!(moves.len(), 8);
        assert_eq!(after(&loads, &cands, &moves), [400, 400, 400]);
        // Balanced already: nothing moves.
        assert!(plan(&[(1, 400), (2, 400), (3, 400)], &cands).is_empty());
    }

    #[test]
    fn moves_only_what_narrows_the_gap_and_skips_holders() {
        // The big key cannot help (moving it would only swap the imbalance),
        // key 4 is on the recipient already: the other small ones move.
        let cands = vec![c(1, 1000, &[1]), c(2, 100, &[1]), c(3, 100, &[1]), c(4, 100, &[1, 2])];
        let loads = [(1, 1300), (2, 400)];
        let moves = plan(&loads, &cands);
        assert_eq!(moves, [(2, 1, 2), (3, 1, 2)]);
        assert_eq!(after(&loads, &cands, &moves), [1100, 600]);
        // A single worker, or keys nobody participating holds: no moves.
        assert!(plan(&[(1, 1300)], &cands).is_empty());
        assert!(plan(&[(5, 1000), (6, 0)], &cands).is_empty());
    }
}
