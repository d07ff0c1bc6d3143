//! One simulated run: the hosts, the clients, the fault schedule, and the checks at the end.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::UNIX_EPOCH;

use haven_base::config::RaftTiming;
use haven_base::config::ReadConfirmation;
use haven_base::metrics::Metrics;
use haven_consensus::raft_config;
use haven_consensus::runtime;
use haven_consensus::server;
use haven_consensus::server::Group;
use haven_consensus::server::Groups;
use haven_consensus::server::InboxFactory;
use haven_consensus::types::RaftOf;
use haven_contract::NodeId;
use haven_contract::PeerNode;
use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use turmoil::Sim;

use crate::check::Checker;
use crate::faults;
use crate::faults::Fault;
use crate::faults::Window;
use crate::lock;
use crate::machine::Replica;
use crate::net::RAFT_PORT;
use crate::net::SIM_CLUSTER;
use crate::net::SIM_SERVICE;
use crate::net::SimDial;
use crate::net::SimListener;
use crate::net::sim_transport;
use crate::store::SimLog;
use crate::workload;
use crate::workload::RECOVERY_DEADLINE;
use crate::workload::host_name;

type SimRaft = RaftOf<Replica>;

#[derive(Debug, Clone)]
pub struct Options {
    pub nodes: u64,
    pub clients: u64,
    /// How long faults are injected, in simulated time.
    pub fault_phase: Duration,
    /// Keep every observation for [`Report::trace`].
    pub trace: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            nodes: 3,
            clients: 3,
            fault_phase: Duration::from_secs(20),
            trace: false,
        }
    }
}

/// What one seed did and whether every check held.
#[derive(Debug)]
pub struct Report {
    pub seed: u64,
    pub nodes: u64,
    pub reads_confirmed_by: ReadConfirmation,
    pub timeline: Vec<String>,
    pub acknowledged: usize,
    pub unknown: u64,
    pub reads: usize,
    pub elections: usize,
    pub last_index: u64,
    pub simulated: Duration,
    /// Hash of every observation in order: equal for two runs of one seed.
    pub fingerprint: String,
    pub violations: Vec<String>,
    /// Every observation with its simulated time, if [`Options::trace`] was set.
    pub trace: Vec<String>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "seed {} ({} nodes, reads confirmed by {:?}), {:?} simulated",
            self.seed, self.nodes, self.reads_confirmed_by, self.simulated
        )?;
        for line in &self.timeline {
            writeln!(f, "  {line}")?;
        }
        writeln!(
            f,
            "  {} writes acknowledged, {} unknown, {} read indexes, {} leaders elected, last index {}, fingerprint {}",
            self.acknowledged,
            self.unknown,
            self.reads,
            self.elections,
            self.last_index,
            self.fingerprint
        )?;
        for violation in &self.violations {
            writeln!(f, "  VIOLATION {violation}")?;
        }
        let verdict = if self.passed() { "PASS" } else { "FAIL" };
        write!(
            f,
            "  verdict: {verdict} (replay: cargo run -p haven-sim -- --seed {})",
            self.seed
        )
    }
}

/// The nodes' live raft handles and replicas, as the hosts publish them at each start.
#[derive(Default)]
struct Registry {
    rafts: BTreeMap<NodeId, SimRaft>,
    replicas: BTreeMap<NodeId, Replica>,
    /// Every node's disk, also while the node is down.
    disks: BTreeMap<NodeId, SimLog>,
}

fn members(nodes: u64) -> BTreeMap<NodeId, PeerNode> {
    (1..=nodes)
        .map(|id| {
            let addr = format!("{}:{RAFT_PORT}", host_name(id));
            (
                id,
                PeerNode {
                    raft_addr: addr.clone(),
                    client_addr: addr,
                },
            )
        })
        .collect()
}

/// Registers node `id`: its software, re-run from scratch at every restart, over a disk
/// that survives restarts.
fn add_node(
    sim: &mut Sim,
    id: NodeId,
    nodes: u64,
    reads: ReadConfirmation,
    registry: &Arc<Mutex<Registry>>,
    checker: &Arc<Mutex<Checker>>,
) {
    let disk = SimLog::default();
    lock(registry).disks.insert(id, disk.clone());
    let registry = registry.clone();
    let checker = checker.clone();
    sim.host(host_name(id), move || {
        let disk = disk.clone();
        let registry = registry.clone();
        let replica = Replica::new(id, checker.clone());
        async move {
            let first_boot = disk.is_empty();
            let config = Arc::new(raft_config(&RaftTiming::default())?);
            let network = sim_transport()?;
            let raft = SimRaft::new(id, config, network, disk, replica.clone()).await?;
            let listener = SimListener::bind().await?;
            {
                let mut registry = lock(&registry);
                registry.rafts.insert(id, raft.clone());
                registry.replicas.insert(id, replica);
            }
            if id == 1 && first_boot {
                raft.initialize(members(nodes)).await?;
            }
            let inbox = InboxFactory {
                checkpoints: None,
                metrics: Metrics::new()?,
                answers: None,
                stand_in: Default::default(),
            };
            let (_keep_running, shutdown) = tokio::sync::watch::channel(false);
            let groups = Groups::new(SIM_CLUSTER, id, Arc::new(SimDial));
            let stop = shutdown.clone();
            let settings = Vec::new();
            groups.insert(
                SIM_SERVICE,
                Group {
                    raft,
                    inbox,
                    stop,
                    settings,
                    durable: None,
                },
            );
            server::serve(listener, groups, reads, shutdown).await;
            Ok(())
        }
    });
}

/// Applies faults to the simulation and heals them.
struct Nemesis {
    nodes: u64,
    clients: Vec<String>,
    killed: BTreeSet<NodeId>,
}

impl Nemesis {
    fn everyone_but(&self, cut: &[NodeId]) -> Vec<String> {
        let nodes = (1..=self.nodes).filter(|n| !cut.contains(n)).map(host_name);
        nodes.chain(self.clients.iter().cloned()).collect()
    }

    fn start(&mut self, sim: &mut Sim, fault: &Fault, registry: &Mutex<Registry>) -> String {
        match fault {
            Fault::Isolate(node) => self.hold(sim, &[*node]),
            Fault::IsolateLeader => {
                let leader = current_leader(registry).unwrap_or(1);
                self.hold(sim, &[leader]);
                return format!("{fault} (node {leader})");
            }
            Fault::Split(minority) => self.hold(sim, minority),
            Fault::Kill(node) => {
                lock(registry).rafts.remove(node);
                sim.crash(host_name(*node));
                self.killed.insert(*node);
            }
            Fault::Restart(node) => {
                lock(registry).rafts.remove(node);
                sim.bounce(host_name(*node));
            }
        }
        fault.to_string()
    }

    fn hold(&self, sim: &mut Sim, cut: &[NodeId]) {
        for node in cut {
            for other in self.everyone_but(cut) {
                sim.hold(host_name(*node), other);
            }
        }
    }

    fn heal(&mut self, sim: &mut Sim) {
        let hosts: Vec<String> = self.everyone_but(&[]);
        for a in &hosts {
            for b in &hosts {
                if a < b {
                    sim.repair(a.as_str(), b.as_str());
                    sim.release(a.as_str(), b.as_str());
                }
            }
        }
        for node in std::mem::take(&mut self.killed) {
            sim.bounce(host_name(node));
        }
    }
}

fn current_leader(registry: &Mutex<Registry>) -> Option<NodeId> {
    lock(registry)
        .rafts
        .iter()
        .find(|(_, raft)| raft.metrics().borrow_watched().state == ServerState::Leader)
        .map(|(id, _)| *id)
}

/// Records every leader, for the report and the trace, and checks each new one's log.
fn observe_leaders(registry: &Mutex<Registry>, checker: &Mutex<Checker>) {
    let registry = lock(registry);
    let leaders = registry.rafts.iter().filter_map(|(id, raft)| {
        let metrics = raft.metrics().borrow_watched().clone();
        let log = registry.disks.get(id)?;
        (metrics.state == ServerState::Leader).then_some((metrics.current_term, *id, log))
    });
    let mut checker = lock(checker);
    for (term, id, log) in leaders {
        checker.observe_leader(term, id, log);
    }
}

/// Even seeds run with lease reads (the default), odd ones with a quorum round per read,
/// so the seed table covers both.
fn reads_confirmed_by(seed: u64) -> ReadConfirmation {
    if seed.is_multiple_of(2) {
        ReadConfirmation::Lease
    } else {
        ReadConfirmation::Quorum
    }
}

/// Runs one seed to the end and checks it.
pub fn run(seed: u64, options: &Options) -> Report {
    align_task_ids();
    runtime::seed_this_thread(seed);
    let report = simulate(seed, options);
    runtime::unseed_this_thread();
    report
}

/// A multiple of the number of task lists a current-thread tokio runtime keeps (4).
const TASK_ID_ALIGNMENT: u64 = 64;

/// Makes the next tokio task id a multiple of [`TASK_ID_ALIGNMENT`].
///
/// Tokio numbers tasks from one counter for the whole process and files each task in one
/// of its runtime's lists by that number. When the simulation kills a node, tokio drops
/// the node's tasks list by list; each dropped connection sends a simulated FIN whose
/// latency is drawn from the seeded generator, so the drop order decides every later
/// message's latency. Starting every run at the same residue makes that order, and so the
/// run, depend on the seed alone, even for the second seed a process runs.
fn align_task_ids() {
    let Ok(spawner) = tokio::runtime::Builder::new_current_thread().build() else {
        tracing::warn!("no runtime to align task ids; this run may not replay in-process");
        return;
    };
    loop {
        let task = spawner.spawn(async {});
        let id = task.id().to_string().parse::<u64>();
        let _ = spawner.block_on(task);
        match id {
            Ok(id) if id % TASK_ID_ALIGNMENT == TASK_ID_ALIGNMENT - 1 => return,
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(
                    "tokio task ids are not numbers; this run may not replay in-process"
                );
                return;
            }
        }
    }
}

fn simulate(seed: u64, options: &Options) -> Report {
    let heal_at = options.fault_phase;
    let mut sim = turmoil::Builder::new()
        .simulation_duration(heal_at + RECOVERY_DEADLINE * 3)
        .epoch(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(20))
        .tcp_capacity(1 << 16)
        .rng_seed(seed)
        .build();
    let registry = Arc::new(Mutex::new(Registry::default()));
    let mut checker = Checker::default();
    checker.trace_lines = options.trace.then(Vec::new);
    let checker = Arc::new(Mutex::new(checker));
    let reads = reads_confirmed_by(seed);
    for id in 1..=options.nodes {
        add_node(&mut sim, id, options.nodes, reads, &registry, &checker);
    }
    let mut clients = Vec::new();
    for c in 1..=options.clients {
        let name = format!("client{c}");
        let work = workload::client(
            c,
            options.nodes,
            seed.wrapping_add(c),
            heal_at,
            checker.clone(),
        );
        sim.client(name.as_str(), work);
        clients.push(name);
    }
    sim.client(
        "prober",
        workload::prober(options.nodes, seed, heal_at, checker.clone()),
    );
    clients.push("prober".to_string());

    let schedule = faults::schedule(seed, options.nodes, heal_at);
    let mut nemesis = Nemesis {
        nodes: options.nodes,
        clients,
        killed: BTreeSet::new(),
    };
    let mut timeline = Vec::new();
    let mut pending = schedule.iter().peekable();
    let mut active: Option<&Window> = None;
    let mut healed = false;
    let mut converged = false;
    loop {
        let now = sim.elapsed();
        lock(&checker).now = now;
        if let Some(window) = active.filter(|w| now >= w.end) {
            nemesis.heal(&mut sim);
            timeline.push(format!(
                "{:>9.3}s heal ({})",
                now.as_secs_f64(),
                window.fault
            ));
            active = None;
        }
        if now < heal_at
            && let Some(window) = pending.next_if(|w| now >= w.start)
        {
            let what = nemesis.start(&mut sim, &window.fault, &registry);
            lock(&checker).observe_fault(&what);
            timeline.push(format!("{:>9.3}s {what}", now.as_secs_f64()));
            active = Some(window);
        }
        if now >= heal_at && !healed {
            nemesis.heal(&mut sim);
            timeline.push(format!("{:>9.3}s heal everything", now.as_secs_f64()));
            healed = true;
        }
        observe_leaders(&registry, &checker);
        let finished = match sim.step() {
            Ok(finished) => finished,
            Err(e) => {
                lock(&checker)
                    .violations
                    .push(format!("a host failed: {e}"));
                break;
            }
        };
        if finished {
            converged = wait_converged(&mut sim, &registry);
            break;
        }
    }
    let simulated = sim.elapsed();
    let mut checker = lock(&checker);
    final_checks(&registry, &mut checker, converged, options.nodes);
    Report {
        seed,
        nodes: options.nodes,
        reads_confirmed_by: reads,
        timeline,
        acknowledged: checker.acks.len(),
        unknown: checker.unknown_writes,
        reads: checker.reads.len(),
        elections: checker.elections(),
        last_index: lock(&registry)
            .replicas
            .get(&1)
            .and_then(|r| lock(&r.state).applied)
            .map_or(0, |l| l.index),
        simulated,
        fingerprint: checker.fingerprint(),
        violations: checker.violations.clone(),
        trace: checker.trace_lines.take().unwrap_or_default(),
    }
}

/// Steps until every replica applied the same last entry, or the deadline passes.
fn wait_converged(sim: &mut Sim, registry: &Mutex<Registry>) -> bool {
    let deadline = sim.elapsed() + RECOVERY_DEADLINE;
    while sim.elapsed() < deadline {
        let applied: BTreeSet<_> = lock(registry)
            .replicas
            .values()
            .map(|r| lock(&r.state).applied)
            .collect();
        if applied.len() == 1 {
            return true;
        }
        if sim.step().is_err() {
            return false;
        }
    }
    false
}

fn final_checks(registry: &Mutex<Registry>, checker: &mut Checker, converged: bool, nodes: u64) {
    let registry = lock(registry);
    if !converged {
        let applied: Vec<String> = registry
            .replicas
            .iter()
            .map(|(id, r)| format!("node {id} at {:?}", lock(&r.state).applied))
            .collect();
        checker
            .violations
            .push(format!("replicas did not converge: {}", applied.join(", ")));
    }
    for (id, raft) in &registry.rafts {
        if let Err(fatal) = &raft.metrics().borrow_watched().running_state {
            checker
                .violations
                .push(format!("node {id} stopped: {fatal}"));
        }
    }
    let states: BTreeMap<NodeId, Vec<u8>> = registry
        .replicas
        .iter()
        .map(|(id, r)| (*id, lock(&r.state).bytes()))
        .collect();
    if states.len() as u64 != nodes || states.values().collect::<BTreeSet<_>>().len() != 1 {
        let sizes: Vec<String> = states
            .iter()
            .map(|(id, b)| format!("node {id}: {} bytes", b.len()))
            .collect();
        checker
            .violations
            .push(format!("replicas differ: {}", sizes.join(", ")));
    }
    if let Some(replica) = registry.replicas.get(&1) {
        let state = lock(&replica.state);
        let at: BTreeMap<u64, _> = state.writes.iter().map(|w| (w.index, w.tag)).collect();
        let tags: BTreeSet<_> = state
            .writes
            .iter()
            .map(|w| (w.tag.origin, w.tag.seq))
            .collect();
        if tags.len() != state.writes.len() {
            checker
                .violations
                .push("a write was applied twice".to_string());
        }
        let lost: Vec<String> = checker
            .acks
            .iter()
            .filter(|ack| at.get(&ack.index) != Some(&ack.tag))
            .map(|ack| format!("{}:{} at {}", ack.tag.origin, ack.tag.seq, ack.index))
            .collect();
        if !lost.is_empty() {
            let first: Vec<&str> = lost.iter().take(5).map(String::as_str).collect();
            let message = format!(
                "{} acknowledged writes missing from node 1, first: {}",
                lost.len(),
                first.join(", ")
            );
            checker.violations.push(message);
        }
    }
    checker.check_reads();
}
