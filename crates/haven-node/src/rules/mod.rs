//! The rule evaluator: one named worker per node (`rules`) reads the node's own metrics
//! registry every [`EVERY`] and evaluates each `[[alert]]` (built-in ones included) and
//! `[[scale]]` rule against it. A rule's condition is judged per series: every series of
//! its metric carrying the rule's labels is one instance, pending while the condition
//! holds, firing once it has held for the rule's `for`, resolved when it stops holding
//! (or the series disappears). Firing and resolved notices go to the webhook worker
//! ([`webhook`]); scale rules act on the leader of their service ([`scale`]).
//!
//! Before each evaluation it brings the gauges the built-in alerts watch up to date: each
//! service's leader and replica lag, and the data directory's free space.

mod scale;
pub mod webhook;

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use prometheus::proto::MetricFamily;
use prometheus::proto::MetricType;
use tokio::sync::mpsc;
use tokio::sync::watch;

use crate::ingress::select::Directory;
use haven_base::metrics::NodeMetrics;
use haven_base::rules::AlertRule;
use haven_base::rules::Condition;
use haven_base::rules::Measure;
use haven_base::rules::ScaleRule;
use haven_contract::NodeId;
use webhook::Notice;
use webhook::State;

/// How often the rules are evaluated; also the resolution of every `for`.
pub const EVERY: Duration = Duration::from_secs(1);

/// One series of a metric: its labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// The series of `metric` carrying every one of `labels`.
pub fn matching(families: &[MetricFamily], condition: &Condition) -> Vec<Series> {
    let Some(family) = families.iter().find(|f| f.name() == condition.metric) else {
        return Vec::new();
    };
    let kind = family.get_field_type();
    family
        .get_metric()
        .iter()
        .filter_map(|m| {
            let labels: BTreeMap<String, String> = (m.get_label().iter())
                .map(|l| (l.name().to_string(), l.value().to_string()))
                .collect();
            let wanted = (condition.labels.iter()).all(|(k, v)| labels.get(k) == Some(v));
            let value = match kind {
                MetricType::COUNTER => m.get_counter().get_value(),
                MetricType::GAUGE => m.get_gauge().get_value(),
                _ => return None,
            };
            wanted.then_some(Series { labels, value })
        })
        .collect()
}

/// One series of one rule over time.
#[derive(Debug)]
struct Instance {
    /// When the condition began to hold, while it does.
    since: Option<Instant>,
    firing: bool,
    /// For `measure = "rate"`: the previous value and when it was read.
    previous: Option<(f64, Instant)>,
}

impl Instance {
    fn new() -> Self {
        Self {
            since: None,
            firing: false,
            previous: None,
        }
    }

    /// What the condition compares, now; `None` when there is nothing to compare yet (a
    /// rate's first reading, a time that was never set).
    fn measure(&mut self, measure: Measure, value: f64, now: Instant) -> Option<f64> {
        match measure {
            Measure::Value => Some(value),
            Measure::Rate => {
                let previous = self.previous.replace((value, now));
                let (before, at) = previous?;
                let elapsed = now.duration_since(at).as_secs_f64();
                (elapsed > 0.0).then(|| (value - before).max(0.0) / elapsed)
            }
            Measure::Age => (value > 0.0).then(|| unix_now() - value),
        }
    }

    /// Moves the instance on with this reading; the state it entered, if it changed.
    fn step(&mut self, holds: bool, hold: Duration, now: Instant) -> Option<State> {
        match (holds, self.firing) {
            (true, false) => {
                let since = *self.since.get_or_insert(now);
                self.firing = now.duration_since(since) >= hold;
                self.firing.then_some(State::Firing)
            }
            (false, true) => {
                self.since = None;
                self.firing = false;
                Some(State::Resolved)
            }
            (false, false) => {
                self.since = None;
                None
            }
            (true, true) => None,
        }
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One series' reading this round: its labels, the value compared (`None`: nothing to
/// compare), and whether the series is still there.
struct Reading {
    labels: BTreeMap<String, String>,
    measured: Option<f64>,
    present: bool,
}

/// A change of one instance: the state it entered, its labels, the value compared.
type Change = (State, BTreeMap<String, String>, Option<f64>);

/// The instances of one condition, by their series' labels.
#[derive(Debug, Default)]
struct Instances(HashMap<BTreeMap<String, String>, Instance>);

impl Instances {
    /// Reads the condition's series, and the instances whose series is gone.
    fn read(
        &mut self,
        families: &[MetricFamily],
        condition: &Condition,
        now: Instant,
    ) -> Vec<Reading> {
        let mut readings: Vec<Reading> = matching(families, condition)
            .into_iter()
            .map(|Series { labels, value }| {
                let instance = (self.0.entry(labels.clone())).or_insert_with(Instance::new);
                let measured = instance.measure(condition.measure, value, now);
                Reading {
                    labels,
                    measured,
                    present: true,
                }
            })
            .collect();
        let gone: Vec<Reading> = (self.0.keys())
            .filter(|l| !readings.iter().any(|r| &r.labels == *l))
            .map(|labels| Reading {
                labels: labels.clone(),
                measured: None,
                present: false,
            })
            .collect();
        readings.extend(gone);
        readings
    }

    /// Steps every instance; what changed. An instance whose series is gone resolves (if
    /// it fired) and is forgotten.
    fn step(&mut self, readings: Vec<Reading>, condition: &Condition, now: Instant) -> Vec<Change> {
        let mut changes = Vec::new();
        for Reading {
            labels,
            measured,
            present,
        } in readings
        {
            let holds = measured.is_some_and(|v| condition.op.holds(v, condition.threshold));
            let Some(instance) = self.0.get_mut(&labels) else {
                continue;
            };
            if let Some(state) = instance.step(holds, condition.hold, now) {
                changes.push((state, labels.clone(), measured));
            }
            if !present {
                self.0.remove(&labels);
            }
        }
        changes
    }

    fn firing(&self) -> usize {
        self.0.values().filter(|i| i.firing).count()
    }
}

/// What the evaluator needs of its node.
pub struct Evaluator {
    pub node: NodeId,
    pub metrics: NodeMetrics,
    pub data_dir: PathBuf,
    pub alerts: Vec<AlertRule>,
    pub scales: Vec<ScaleRule>,
    pub directory: Arc<Directory>,
    pub notices: mpsc::Sender<Notice>,
}

impl Evaluator {
    /// Evaluates every [`EVERY`] until the node stops.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut alerts: Vec<Instances> = self.alerts.iter().map(|_| Instances::default()).collect();
        let mut scales: Vec<scale::Scaler> = (self.scales.iter()).map(scale::Scaler::new).collect();
        let mut ticks = tokio::time::interval(EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
            self.refresh_gauges();
            let families = self.metrics.gather();
            let now = Instant::now();
            for (rule, instances) in self.alerts.iter().zip(&mut alerts) {
                self.evaluate(rule, instances, &families, now);
            }
            for scaler in &mut scales {
                scaler
                    .evaluate(&families, now, self.node, &self.directory, &self.metrics)
                    .await;
            }
        }
    }

    fn evaluate(
        &self,
        rule: &AlertRule,
        instances: &mut Instances,
        families: &[MetricFamily],
        now: Instant,
    ) {
        let readings = instances.read(families, &rule.condition, now);
        for (state, labels, value) in instances.step(readings, &rule.condition, now) {
            let notice = Notice::new(rule, state, labels, value, self.node);
            match state {
                State::Firing => {
                    tracing::warn!(alert = %rule.name, labels = ?notice.labels, value, "alert firing")
                }
                State::Resolved => {
                    tracing::info!(alert = %rule.name, labels = ?notice.labels, "alert resolved")
                }
            }
            if self.notices.try_send(notice).is_err() {
                self.metrics
                    .rules
                    .delivery_failures
                    .with_label_values(&[&rule.name])
                    .inc();
                tracing::warn!(alert = %rule.name, "alert notices are not being delivered fast enough; one dropped");
            }
        }
        (self.metrics.rules.firing.with_label_values(&[&rule.name])).set(instances.firing() as i64);
    }

    /// The gauges the built-in alerts read: each service's Raft gauges (leader, apply
    /// lag), the data directory's free space.
    fn refresh_gauges(&self) {
        for (_, ingress) in self.directory.all() {
            crate::progress::refresh_raft_gauges(&ingress);
        }
        if let Err(e) = self.metrics.rules.sample_disk(&self.data_dir) {
            tracing::debug!(dir = %self.data_dir.display(), error = %e, "cannot read the data directory's free space");
        }
    }
}
