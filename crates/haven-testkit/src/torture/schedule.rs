//! The fault schedule: a pure function of the seed and the run's shape, so that a run can
//! be replayed from its printed `--seed` (with the same build: the generator is `rand`'s
//! `StdRng`, whose stream may change between `rand` versions).
//!
//! Faults come one at a time: each episode starts, holds, heals, then a quiet gap lets the
//! cluster recover before the next. One fault at a time keeps a quorum alive most of the
//! run, so the workload keeps producing operations for the checker; the faults that break
//! a quorum on their own (isolating the leader, pausing it) still do.

use std::time::Duration;

use rand::Rng;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Serialize;

/// Which node a fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Target {
    /// Whoever leads when the fault starts; node `fallback` if nobody does.
    Leader { fallback: usize },
    /// Node index (0-based).
    Node(usize),
}

/// One kind of fault, as scheduled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Fault {
    /// SIGKILL the node; restart it when the episode heals.
    KillNode(Target),
    /// SIGKILL the node's app replica; restart it when the episode heals.
    KillApp(Target),
    /// SIGSTOP the node; SIGCONT when the episode heals.
    PauseNode(Target),
    /// SIGKILL the node and keep it down while writes go on; on heal, restart it, kill it
    /// again `catch_up_ms` into its catch-up, and restart it once more.
    CatchUpRestart { target: Target, catch_up_ms: u64 },
    /// SIGKILL every node at once (the whole cluster loses power, less the page cache);
    /// restart them all when the episode heals.
    KillAllNodes,
    /// Cut the current leader off from every other node.
    IsolateLeader { fallback: usize },
    /// Cut these nodes (a minority) off from the rest (the majority).
    SplitMinority { minority: Vec<usize> },
}

impl Fault {
    pub fn is_partition(&self) -> bool {
        matches!(
            self,
            Fault::IsolateLeader { .. } | Fault::SplitMinority { .. }
        )
    }
}

/// A fault, when it starts and how long it holds (offsets from the start of the workload).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Episode {
    pub start_ms: u64,
    pub hold_ms: u64,
    pub fault: Fault,
}

impl Episode {
    pub fn start(&self) -> Duration {
        Duration::from_millis(self.start_ms)
    }

    pub fn end(&self) -> Duration {
        Duration::from_millis(self.start_ms + self.hold_ms)
    }
}

/// The shape of a run the schedule is generated for.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub seed: u64,
    pub duration: Duration,
    pub nodes: usize,
    /// Whether partition faults can be carried out (network namespaces are available).
    pub partitions: bool,
}

/// No fault in the first moments: the workload first records a fault-free baseline.
const WARMUP_MS: u64 = 1_000;
/// The last episode heals this long before the workload stops.
const COOLDOWN_MS: u64 = 1_000;
/// Quiet time between two episodes.
const GAP_MS: (u64, u64) = (300, 1_500);
/// How long most faults hold.
const HOLD_MS: (u64, u64) = (500, 3_000);
/// How long a node stays down before a catch-up restart (writes keep going meanwhile).
const CATCH_UP_DOWN_MS: (u64, u64) = (2_000, 5_000);
/// How far into its catch-up the restarted node is killed again.
const CATCH_UP_KILL_MS: (u64, u64) = (100, 800);

/// The episodes for `shape`, in start order, none overlapping, all healed by
/// `duration - COOLDOWN_MS`.
pub fn generate(shape: Shape) -> Vec<Episode> {
    let mut rng = StdRng::seed_from_u64(shape.seed);
    let end = (shape.duration.as_millis() as u64).saturating_sub(COOLDOWN_MS);
    let mut episodes = Vec::new();
    if shape.nodes == 0 {
        return episodes;
    }
    let mut at = WARMUP_MS;
    loop {
        let (fault, hold_ms) = pick(&mut rng, shape);
        if at + hold_ms > end {
            break;
        }
        episodes.push(Episode {
            start_ms: at,
            hold_ms,
            fault,
        });
        at += hold_ms + rng.random_range(GAP_MS.0..=GAP_MS.1);
    }
    episodes
}

/// One fault and its hold time; partition faults only when `shape.partitions`.
fn pick(rng: &mut StdRng, shape: Shape) -> (Fault, u64) {
    let kinds = if shape.partitions { 8 } else { 6 };
    let hold = rng.random_range(HOLD_MS.0..=HOLD_MS.1);
    let fault = match rng.random_range(0..kinds) {
        0 | 1 => Fault::KillNode(target(rng, shape.nodes)),
        2 => Fault::KillApp(target(rng, shape.nodes)),
        3 => Fault::PauseNode(target(rng, shape.nodes)),
        4 => {
            let fault = Fault::CatchUpRestart {
                target: target(rng, shape.nodes),
                catch_up_ms: rng.random_range(CATCH_UP_KILL_MS.0..=CATCH_UP_KILL_MS.1),
            };
            return (
                fault,
                rng.random_range(CATCH_UP_DOWN_MS.0..=CATCH_UP_DOWN_MS.1),
            );
        }
        5 => Fault::KillAllNodes,
        6 => Fault::IsolateLeader {
            fallback: rng.random_range(0..shape.nodes),
        },
        _ => Fault::SplitMinority {
            minority: minority(rng, shape.nodes),
        },
    };
    (fault, hold)
}

/// The leader half the time (failover is where bugs hide), otherwise any node.
fn target(rng: &mut StdRng, nodes: usize) -> Target {
    let node = rng.random_range(0..nodes);
    if rng.random_bool(0.5) {
        Target::Leader { fallback: node }
    } else {
        Target::Node(node)
    }
}

/// A random non-empty minority (at most `(nodes - 1) / 2` nodes, at least one), sorted.
fn minority(rng: &mut StdRng, nodes: usize) -> Vec<usize> {
    let size = rng.random_range(1..=((nodes.saturating_sub(1)) / 2).max(1));
    let mut all: Vec<usize> = (0..nodes).collect();
    let mut chosen = Vec::with_capacity(size);
    for _ in 0..size.min(nodes) {
        chosen.push(all.swap_remove(rng.random_range(0..all.len())));
    }
    chosen.sort_unstable();
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(seed: u64, partitions: bool) -> Shape {
        Shape {
            seed,
            duration: Duration::from_secs(30),
            nodes: 5,
            partitions,
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        assert_eq!(generate(shape(42, true)), generate(shape(42, true)));
        assert_ne!(generate(shape(42, true)), generate(shape(43, true)));
    }

    #[test]
    fn episodes_are_ordered_apart_and_healed_before_the_end() {
        for seed in 0..50 {
            let episodes = generate(shape(seed, true));
            assert!(episodes.len() >= 3, "seed {seed}: {episodes:?}");
            assert!(episodes[0].start_ms >= WARMUP_MS);
            for pair in episodes.windows(2) {
                assert!(pair[0].end() < pair[1].start(), "seed {seed}: {pair:?}");
            }
            let last = episodes.last().map(Episode::end).unwrap_or_default();
            assert!(last <= Duration::from_millis(30_000 - COOLDOWN_MS));
        }
    }

    #[test]
    fn targets_and_minorities_fit_the_cluster() {
        for seed in 0..50 {
            for episode in generate(shape(seed, true)) {
                match episode.fault {
                    Fault::KillNode(t) | Fault::KillApp(t) | Fault::PauseNode(t) => {
                        assert!(
                            matches!(t, Target::Node(n) | Target::Leader { fallback: n } if n < 5)
                        );
                    }
                    Fault::SplitMinority { minority } => {
                        assert!((1..=2).contains(&minority.len()), "{minority:?}");
                        assert!(minority.windows(2).all(|w| w[0] < w[1] && w[1] < 5));
                    }
                    _ => {}
                }
            }
        }
        assert_eq!(minority(&mut StdRng::seed_from_u64(1), 3).len(), 1);
    }

    #[test]
    fn no_partition_without_namespaces_but_every_other_kind_appears() {
        let faults: Vec<Fault> = (0..20)
            .flat_map(|seed| generate(shape(seed, false)))
            .map(|e| e.fault)
            .collect();
        assert!(!faults.iter().any(Fault::is_partition));
        assert!(faults.iter().any(|f| matches!(f, Fault::KillApp(_))));
        assert!(faults.iter().any(|f| matches!(f, Fault::PauseNode(_))));
        assert!(
            faults
                .iter()
                .any(|f| matches!(f, Fault::CatchUpRestart { .. }))
        );
        assert!(faults.contains(&Fault::KillAllNodes));
        let with: Vec<Fault> = (0..20)
            .flat_map(|seed| generate(shape(seed, true)))
            .map(|e| e.fault)
            .collect();
        assert!(
            with.iter()
                .any(|f| matches!(f, Fault::IsolateLeader { .. }))
        );
        assert!(
            with.iter()
                .any(|f| matches!(f, Fault::SplitMinority { .. }))
        );
    }
}
