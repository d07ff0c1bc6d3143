//! The verdicts on a finished run, as pure functions of what was recorded: is each key's
//! history linearizable, is every acknowledged write in the final state, are the
//! replicas identical.
//!
//! Linearizability is decided by `stateright`'s [`LinearizabilityTester`], not by code of
//! ours; this module only feeds it. The sequential specification is the tree app's own
//! model ([`haven_treeapp::tree::Tree`]) holding the one key: the replicated app is
//! correct by assumption, and what is under test is whether Haven makes the replicas
//! together behave like that one model. The tester searches interleavings without
//! memoisation, so histories are kept to a few hundred operations per key, and every
//! successful write returns its new version, which pins it in the order and prunes the
//! search.

use std::collections::BTreeMap;

use haven_treeapp::tree::Tree;
use haven_treeapp::tree::TreeError;
use serde::Serialize;
use stateright::semantics::ConsistencyTester;
use stateright::semantics::LinearizabilityTester;
use stateright::semantics::SequentialSpec;

use super::history::OpKind;
use super::history::OpRecord;
use super::history::Outcome;
use super::history::Ret;

/// One key's data and version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyState {
    pub version: u64,
    pub data: String,
}

/// The sequential model of one key: the tree app's model with that one node.
#[derive(Debug, Clone)]
pub struct KeySpec {
    path: String,
    tree: Tree,
}

impl KeySpec {
    /// A tree holding `path` as it is after being created with `initial` data.
    pub fn new(path: &str, initial: &str) -> Result<Self, TreeError> {
        let mut tree = Tree::new();
        tree.create(path, initial.as_bytes().to_vec())?;
        Ok(Self {
            path: path.to_string(),
            tree,
        })
    }
}

impl SequentialSpec for KeySpec {
    type Op = OpKind;
    type Ret = Ret;

    fn invoke(&mut self, op: &OpKind) -> Ret {
        let (data, if_version) = match op {
            OpKind::Read => {
                return match self.tree.get(&self.path) {
                    Ok((data, version)) => Ret::Value {
                        version,
                        data: String::from_utf8_lossy(data).into_owned(),
                    },
                    // The key is never deleted; a read the model cannot answer matches no reply.
                    Err(_) => Ret::BadVersion { actual: u64::MAX },
                };
            }
            OpKind::Set { data } => (data, None),
            OpKind::Cas { expected, data } => (data, Some(*expected)),
        };
        match self
            .tree
            .set(&self.path, data.as_bytes().to_vec(), if_version)
        {
            Ok(version) => Ret::Written { version },
            Err(TreeError::BadVersion { actual, .. }) => Ret::BadVersion { actual },
            Err(_) => Ret::BadVersion { actual: u64::MAX },
        }
    }
}

/// Whether one key's history is linearizable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Linearizability {
    Linearizable,
    NotLinearizable,
    /// The recorded history is malformed (a harness bug, not Haven's).
    BadHistory(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    // Invocations sort before returns at the same instant: that makes the two operations
    // concurrent, the weaker (always safe) reading of a tie.
    Invoke,
    Return,
}

/// Thread ids from here on belong to operations that never return.
const FIRST_UNKNOWN_THREAD: u64 = 1 << 32;

/// Checks one key's operations (any order) against [`KeySpec`]. Completed operations run
/// on their client's thread; an unknown write is invoked on a thread of its own and never
/// returns; failed operations and reads without an answer are left out (they changed
/// nothing). `final_state`, if given, is checked as a read that starts after everything.
pub fn check_key(
    spec: KeySpec,
    ops: &[&OpRecord],
    final_state: Option<&KeyState>,
) -> Linearizability {
    let mut events: Vec<(u64, Event, u64, &OpKind, Option<&Ret>)> = Vec::new();
    let mut unknown_thread = FIRST_UNKNOWN_THREAD;
    for op in ops {
        match &op.outcome {
            Outcome::Done(ret) => {
                let thread = op.client as u64;
                events.push((op.invoked_ns, Event::Invoke, thread, &op.kind, None));
                events.push((op.completed_ns, Event::Return, thread, &op.kind, Some(ret)));
            }
            Outcome::Unknown(_) if op.kind.is_write() => {
                events.push((op.invoked_ns, Event::Invoke, unknown_thread, &op.kind, None));
                unknown_thread += 1;
            }
            Outcome::Unknown(_) | Outcome::Failed(_) => {}
        }
    }
    let last = events.iter().map(|e| e.0).max().unwrap_or(0);
    let final_ret = final_state.map(|s| Ret::Value {
        version: s.version,
        data: s.data.clone(),
    });
    if let Some(ret) = &final_ret {
        events.push((last + 1, Event::Invoke, u64::MAX, &OpKind::Read, None));
        events.push((last + 2, Event::Return, u64::MAX, &OpKind::Read, Some(ret)));
    }
    events.sort_by_key(|e| (e.0, e.1));
    let mut tester = LinearizabilityTester::new(spec);
    for (_, event, thread, op, ret) in events {
        let step = match (event, ret) {
            (Event::Invoke, _) => tester.on_invoke(thread, op.clone()).map(drop),
            (Event::Return, Some(ret)) => tester.on_return(thread, ret.clone()).map(drop),
            (Event::Return, None) => Ok(()),
        };
        if let Err(e) = step {
            return Linearizability::BadHistory(e);
        }
    }
    if tester.is_consistent() {
        Linearizability::Linearizable
    } else {
        Linearizability::NotLinearizable
    }
}

/// Evidence for a history the tester rejected: reads that returned an older version than
/// a write acknowledged before they began (stale reads), and reads of data no write
/// stored. Not a decision procedure (that is the tester's job), only pointers into the
/// history for a human; at most `limit` of them.
pub fn explain(ops: &[&OpRecord], limit: usize) -> Vec<String> {
    let acked = acknowledged_writes(ops);
    let mut found = Vec::new();
    for op in ops {
        let Outcome::Done(Ret::Value { version, data }) = &op.outcome else {
            continue;
        };
        let newer = acked
            .iter()
            .filter(|(w, v)| w.completed_ns < op.invoked_ns && v > version)
            .max_by_key(|(_, v)| *v);
        if let Some((w, v)) = newer {
            found.push(format!(
                "stale read: client {} read version {version} via n{} at {}, but version {v} was acknowledged to client {} at {}",
                op.client,
                op.node + 1,
                seconds(op.invoked_ns),
                w.client,
                seconds(w.completed_ns)
            ));
        } else if *version > 0 && !ops.iter().any(|w| w.kind.data() == Some(data)) {
            found.push(format!(
                "client {} read {data:?} (version {version}) via n{} at {}, which no write stored",
                op.client,
                op.node + 1,
                seconds(op.invoked_ns)
            ));
        }
        if found.len() >= limit {
            break;
        }
    }
    found
}

/// The writes acknowledged to their clients, with the version each one made.
fn acknowledged_writes<'a>(ops: &[&'a OpRecord]) -> Vec<(&'a OpRecord, u64)> {
    ops.iter()
        .filter_map(|op| match op.outcome {
            Outcome::Done(Ret::Written { version }) => Some((*op, version)),
            _ => None,
        })
        .collect()
}

/// `+12.345s`, an offset from the start of the workload.
fn seconds(ns: u64) -> String {
    format!("+{:.3}s", ns as f64 / 1e9)
}

/// Checks that the final state of a key accounts for its acknowledged writes: every
/// acknowledged set added one to the version, unknown ones may have, failed ones did not,
/// and the data is that of a write that was acknowledged or unknown (or the initial data
/// if nothing was written). Returns what is wrong, if anything.
pub fn check_acknowledged(
    initial: &KeyState,
    ops: &[&OpRecord],
    final_state: &KeyState,
) -> Vec<String> {
    let acked = acknowledged_writes(ops);
    let unknown = ops
        .iter()
        .filter(|op| op.kind.is_write() && matches!(op.outcome, Outcome::Unknown(_)))
        .count() as u64;
    let lowest = initial.version + acked.len() as u64;
    let mut problems = Vec::new();
    if final_state.version < lowest {
        problems.push(format!(
            "lost acknowledged write: final version {} but {} sets were acknowledged",
            final_state.version,
            acked.len()
        ));
    }
    if final_state.version > lowest + unknown {
        problems.push(format!(
            "phantom write: final version {} exceeds {} acknowledged + {unknown} unknown sets",
            final_state.version,
            acked.len()
        ));
    }
    let possible = |op: &&OpRecord| {
        !matches!(op.outcome, Outcome::Failed(_)) && op.kind.data() == Some(&final_state.data)
    };
    let from_initial = final_state.version == initial.version && final_state.data == initial.data;
    if !from_initial && !ops.iter().any(possible) {
        problems.push(format!(
            "final data {:?} was written by no acknowledged or unknown write",
            final_state.data
        ));
    }
    for (op, version) in acked {
        if version == final_state.version && op.kind.data() != Some(&final_state.data) {
            problems.push(format!(
                "the write acknowledged with version {version} stored {:?}, but the final data is {:?}",
                op.kind.data().unwrap_or_default(),
                final_state.data
            ));
        }
    }
    problems
}

/// Checks that every replica's dump is byte-identical to the first one's; `dumps` holds
/// (node index, dump or why it could not be fetched).
pub fn check_replicas(dumps: &[(usize, Result<String, String>)]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut distinct: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (node, dump) in dumps {
        match dump {
            Ok(dump) => distinct.entry(dump).or_default().push(*node),
            Err(e) => problems.push(format!("replica {}: {e}", node + 1)),
        }
    }
    if distinct.len() > 1 {
        let groups: Vec<String> = distinct
            .values()
            .map(|nodes| {
                let ids: Vec<String> = nodes.iter().map(|n| (n + 1).to_string()).collect();
                format!("[{}]", ids.join(","))
            })
            .collect();
        problems.push(format!(
            "replicas diverged: {} different states among replicas {}",
            distinct.len(),
            groups.join(" ")
        ));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: usize, kind: OpKind, span: (u64, u64), outcome: Outcome) -> OpRecord {
        OpRecord {
            client,
            key: 0,
            node: 0,
            kind,
            invoked_ns: span.0,
            completed_ns: span.1,
            outcome,
        }
    }

    fn set(data: &str) -> OpKind {
        OpKind::Set { data: data.into() }
    }

    fn written(version: u64) -> Outcome {
        Outcome::Done(Ret::Written { version })
    }

    fn value(version: u64, data: &str) -> Outcome {
        Outcome::Done(Ret::Value {
            version,
            data: data.into(),
        })
    }

    fn spec() -> KeySpec {
        KeySpec::new("/k0", "init").unwrap()
    }

    fn check(ops: &[OpRecord], final_state: Option<&KeyState>) -> Linearizability {
        let refs: Vec<&OpRecord> = ops.iter().collect();
        check_key(spec(), &refs, final_state)
    }

    #[test]
    fn concurrent_writes_and_reads_that_fit_one_order_are_linearizable() {
        let ops = [
            op(0, set("a"), (0, 10), written(1)),
            op(1, set("b"), (5, 20), written(2)),
            // Overlaps both writes, sees the first.
            op(2, OpKind::Read, (2, 12), value(1, "a")),
            op(
                2,
                OpKind::Cas {
                    expected: 1,
                    data: "c".into(),
                },
                (25, 30),
                Outcome::Done(Ret::BadVersion { actual: 2 }),
            ),
            op(0, OpKind::Read, (31, 32), value(2, "b")),
        ];
        assert_eq!(check(&ops, None), Linearizability::Linearizable);
    }

    #[test]
    fn a_stale_read_after_an_acknowledged_write_is_not_linearizable() {
        let ops = [
            op(0, set("a"), (0, 10), written(1)),
            op(1, OpKind::Read, (11, 12), value(0, "init")),
        ];
        assert_eq!(check(&ops, None), Linearizability::NotLinearizable);
    }

    #[test]
    fn an_unknown_write_may_apply_late_or_never() {
        let unknown = Outcome::Unknown("timeout".into());
        let late = [
            op(0, set("a"), (0, 10), unknown.clone()),
            op(1, OpKind::Read, (11, 12), value(0, "init")),
            op(1, OpKind::Read, (13, 14), value(1, "a")),
        ];
        assert_eq!(check(&late, None), Linearizability::Linearizable);
        let never = [op(0, set("a"), (0, 10), unknown.clone())];
        let untouched = KeyState {
            version: 0,
            data: "init".into(),
        };
        assert_eq!(
            check(&never, Some(&untouched)),
            Linearizability::Linearizable
        );
        // But not before it was invoked.
        let early = [
            op(1, OpKind::Read, (0, 5), value(1, "a")),
            op(0, set("a"), (6, 10), unknown),
        ];
        assert_eq!(check(&early, None), Linearizability::NotLinearizable);
    }

    #[test]
    fn a_failed_write_must_never_show() {
        let ops = [
            op(0, set("a"), (0, 10), Outcome::Failed("no-leader".into())),
            op(1, OpKind::Read, (11, 12), value(1, "a")),
        ];
        assert_eq!(check(&ops, None), Linearizability::NotLinearizable);
    }

    #[test]
    fn the_final_state_must_follow_the_history() {
        let ops = [op(0, set("a"), (0, 10), written(1))];
        let lost = KeyState {
            version: 0,
            data: "init".into(),
        };
        assert_eq!(check(&ops, Some(&lost)), Linearizability::NotLinearizable);
    }

    #[test]
    fn stale_reads_are_pointed_out() {
        let ops = [
            op(0, set("a"), (0, 10), written(1)),
            op(1, OpKind::Read, (11, 12), value(0, "init")),
            op(1, OpKind::Read, (13, 14), value(7, "zz")),
        ];
        let refs: Vec<&OpRecord> = ops.iter().collect();
        let found = explain(&refs, 5);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0].starts_with("stale read: client 1 read version 0"),
            "{found:?}"
        );
        assert!(found[1].contains("which no write stored"), "{found:?}");
    }

    #[test]
    fn acknowledged_writes_must_be_in_the_final_state() {
        let initial = KeyState {
            version: 0,
            data: "init".into(),
        };
        let ops = [
            op(0, set("a"), (0, 10), written(1)),
            op(1, set("b"), (0, 10), Outcome::Unknown("timeout".into())),
            op(2, set("c"), (0, 10), Outcome::Failed("no-leader".into())),
        ];
        let refs: Vec<&OpRecord> = ops.iter().collect();
        let state = |version: u64, data: &str| KeyState {
            version,
            data: data.into(),
        };
        assert!(check_acknowledged(&initial, &refs, &state(1, "a")).is_empty());
        assert!(check_acknowledged(&initial, &refs, &state(2, "b")).is_empty());
        let lost = check_acknowledged(&initial, &refs, &state(0, "init"));
        assert!(lost[0].starts_with("lost acknowledged write"), "{lost:?}");
        let phantom = check_acknowledged(&initial, &refs, &state(3, "b"));
        assert!(phantom[0].starts_with("phantom write"), "{phantom:?}");
        let failed = check_acknowledged(&initial, &refs, &state(2, "c"));
        assert!(
            failed[0].contains("written by no acknowledged"),
            "{failed:?}"
        );
        let overwritten = check_acknowledged(&initial, &refs, &state(1, "b"));
        assert!(
            overwritten[0].contains("acknowledged with version 1"),
            "{overwritten:?}"
        );
    }

    #[test]
    fn replicas_must_be_identical() {
        let same = [(0, Ok("x".to_string())), (1, Ok("x".to_string()))];
        assert!(check_replicas(&same).is_empty());
        let diverged = [
            (0, Ok("x".to_string())),
            (1, Ok("y".to_string())),
            (2, Ok("x".to_string())),
        ];
        assert_eq!(
            check_replicas(&diverged),
            ["replicas diverged: 2 different states among replicas [1,3] [2]"]
        );
        let missing = [(0, Ok("x".to_string())), (1, Err("refused".to_string()))];
        assert_eq!(check_replicas(&missing), ["replica 2: refused"]);
    }
}
