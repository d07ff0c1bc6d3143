//! Carries out the fault schedule against the running cluster, records the timeline, and
//! watches for processes that die without being killed (each one is a crash: it is
//! recorded, then restarted so the run can go on).

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::netns::NetHosts;
use super::schedule::Episode;
use super::schedule::Fault;
use super::schedule::Target;
use crate::cluster::LocalCluster;
use crate::cluster::Process;

/// How often processes are checked for unexpected exits.
const WATCH_EVERY: Duration = Duration::from_millis(100);
/// How long a fault aimed at the leader waits for one before taking its fallback node.
const LEADER_WAIT: Duration = Duration::from_secs(2);

/// One thing the nemesis did (or saw), at an offset from the start of the workload.
#[derive(Debug, Clone, Serialize)]
pub struct TimelineEntry {
    pub at_ms: u64,
    pub action: String,
    pub target: String,
}

pub struct Nemesis<'a> {
    pub cluster: LocalCluster,
    net: Option<&'a NetHosts>,
    started: Instant,
    pub timeline: Vec<TimelineEntry>,
    /// Processes that exited by themselves, described with their exit status.
    pub crashes: Vec<String>,
    paused: BTreeSet<usize>,
}

fn name(i: usize) -> String {
    format!("n{}", i + 1)
}

fn names(nodes: &[usize]) -> String {
    nodes.iter().map(|i| name(*i)).collect::<Vec<_>>().join(",")
}

impl<'a> Nemesis<'a> {
    pub fn new(cluster: LocalCluster, net: Option<&'a NetHosts>, started: Instant) -> Self {
        Self {
            cluster,
            net,
            started,
            timeline: Vec::new(),
            crashes: Vec::new(),
            paused: BTreeSet::new(),
        }
    }

    fn note(&mut self, action: &str, target: String) {
        let at_ms = self.started.elapsed().as_millis() as u64;
        tracing::info!(at_ms, action, %target, "nemesis");
        self.timeline.push(TimelineEntry {
            at_ms,
            action: action.to_string(),
            target,
        });
    }

    /// Plays every episode in order; a step that cannot be carried out is noted, not fatal.
    pub async fn play(&mut self, episodes: &[Episode]) {
        for episode in episodes {
            self.watch_until(self.started + episode.start()).await;
            let undo = self.apply(&episode.fault).await;
            self.watch_until(self.started + episode.end()).await;
            self.undo(undo).await;
        }
    }

    /// Sleeps until `until`, reaping crashed processes meanwhile.
    pub async fn watch_until(&mut self, until: Instant) {
        loop {
            self.reap();
            let now = Instant::now();
            if now >= until {
                return;
            }
            tokio::time::sleep(WATCH_EVERY.min(until - now)).await;
        }
    }

    /// Records every process that exited by itself and restarts it.
    pub fn reap(&mut self) {
        for exited in self.cluster.reap_exited() {
            let what = format!("{} {}", exited.process.name(), name(exited.slot));
            // Nodes and apps exit cleanly only when asked to (SIGTERM or SIGINT), and
            // the harness never asks: something outside it did.
            let hint = if exited.status.success() {
                "; a clean exit: SIGTERM or SIGINT from outside this harness?"
            } else {
                ""
            };
            self.crashes
                .push(format!("{what} exited by itself ({}{hint})", exited.status));
            self.note("CRASH (exited by itself)", what);
            match exited.process {
                Process::Node => self.start_node(exited.slot),
                Process::App => self.start_app(exited.slot),
            }
        }
    }

    async fn resolve(&mut self, target: Target) -> usize {
        match target {
            Target::Node(i) => i,
            Target::Leader { fallback } => self
                .cluster
                .wait_for_leader(LEADER_WAIT)
                .await
                .unwrap_or(fallback),
        }
    }

    /// Starts a fault; returns how to end it.
    async fn apply(&mut self, fault: &Fault) -> Undo {
        match fault {
            Fault::KillNode(target) => {
                let i = self.resolve(*target).await;
                self.kill_node(i);
                Undo::StartNode(i)
            }
            Fault::KillApp(target) => {
                let i = self.resolve(*target).await;
                self.cluster.kill_app(i);
                self.note("kill -9 app", name(i));
                Undo::StartApp(i)
            }
            Fault::PauseNode(target) => {
                let i = self.resolve(*target).await;
                self.pause(i);
                Undo::Resume(i)
            }
            Fault::CatchUpRestart {
                target,
                catch_up_ms,
            } => {
                let i = self.resolve(*target).await;
                self.kill_node(i);
                Undo::CatchUp(i, Duration::from_millis(*catch_up_ms))
            }
            Fault::KillAllNodes => {
                for i in 0..self.cluster.slots.len() {
                    self.kill_node(i);
                }
                Undo::StartAll
            }
            Fault::IsolateLeader { fallback } => {
                let leader = self
                    .resolve(Target::Leader {
                        fallback: *fallback,
                    })
                    .await;
                self.partition(&[leader]).await;
                Undo::Heal
            }
            Fault::SplitMinority { minority } => {
                self.partition(minority).await;
                Undo::Heal
            }
        }
    }

    async fn undo(&mut self, undo: Undo) {
        match undo {
            Undo::StartNode(i) => self.start_node(i),
            Undo::StartApp(i) => self.start_app(i),
            Undo::Resume(i) => self.resume(i),
            Undo::CatchUp(i, catch_up) => {
                self.start_node(i);
                self.watch_until(Instant::now() + catch_up).await;
                self.kill_node(i);
                self.start_node(i);
            }
            Undo::StartAll => {
                for i in 0..self.cluster.slots.len() {
                    self.start_node(i);
                }
            }
            Undo::Heal => self.heal().await,
        }
    }

    fn kill_node(&mut self, i: usize) {
        self.paused.remove(&i);
        self.cluster.kill_node(i);
        self.note("kill -9 node", name(i));
    }

    fn start_node(&mut self, i: usize) {
        match self.cluster.start_node(i) {
            Ok(()) => self.note("restart node", name(i)),
            Err(e) => self.note("restart node FAILED", format!("{} ({e:#})", name(i))),
        }
    }

    fn start_app(&mut self, i: usize) {
        match self.cluster.start_app(i) {
            Ok(()) => self.note("restart app", name(i)),
            Err(e) => self.note("restart app FAILED", format!("{} ({e:#})", name(i))),
        }
    }

    fn pause(&mut self, i: usize) {
        match self.cluster.pause_node(i) {
            Ok(()) => {
                self.paused.insert(i);
                self.note("pause (SIGSTOP) node", name(i));
            }
            Err(e) => self.note("pause FAILED", format!("{} ({e:#})", name(i))),
        }
    }

    fn resume(&mut self, i: usize) {
        if !self.paused.remove(&i) {
            return;
        }
        match self.cluster.resume_node(i) {
            Ok(()) => self.note("resume (SIGCONT) node", name(i)),
            Err(e) => self.note("resume FAILED", format!("{} ({e:#})", name(i))),
        }
    }

    /// Cuts every link between `side` and the other nodes.
    async fn partition(&mut self, side: &[usize]) {
        let Some(net) = self.net else {
            self.note("partition SKIPPED (no namespaces)", names(side));
            return;
        };
        let others: Vec<usize> = (0..self.cluster.slots.len())
            .filter(|i| !side.contains(i))
            .collect();
        for a in side {
            for b in &others {
                if let Err(e) = net.cut(*a, *b).await {
                    self.note("cut FAILED", format!("{e:#}"));
                }
            }
        }
        self.note("partition", format!("{} | {}", names(side), names(&others)));
    }

    async fn heal(&mut self) {
        let Some(net) = self.net else { return };
        match net.heal().await {
            Ok(()) => self.note("heal partition", "all".to_string()),
            Err(e) => self.note("heal FAILED", format!("{e:#}")),
        }
    }

    /// Ends every fault still in force: resumes, heals, restarts what is down.
    pub async fn heal_all(&mut self) {
        for i in self.paused.clone() {
            self.resume(i);
        }
        self.heal().await;
        self.reap();
        for i in 0..self.cluster.slots.len() {
            if !self.cluster.app_running(i) {
                self.start_app(i);
            }
            if !self.cluster.slots[i].node_running() {
                self.start_node(i);
            }
        }
    }
}

/// How to end a fault.
enum Undo {
    StartNode(usize),
    StartApp(usize),
    Resume(usize),
    CatchUp(usize, Duration),
    StartAll,
    Heal,
}
