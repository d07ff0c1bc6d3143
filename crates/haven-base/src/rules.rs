//! `[[alert]]` and `[[scale]]` rules as the config file writes them, and the built-in
//! alerts: a metric of the node's own registry (with labels), compared with a threshold,
//! held for a while. `haven_node::rules` evaluates them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::checks::parse_interval;
use haven_contract::NodeId;

/// `[alerts]`: where alerts go unless a rule names its own webhook, and how.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsSection {
    /// Where the built-in alerts, and rules without a webhook of their own, are posted.
    pub webhook: Option<String>,
    /// The built-in alerts (default true); `false` switches them all off.
    #[serde(default = "default_true")]
    pub defaults: bool,
    /// One delivery attempt's budget (default 2000).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Attempts after the first before a delivery is given up and counted (default 3).
    #[serde(default = "default_retries")]
    pub retries: u32,
}

impl Default for AlertsSection {
    fn default() -> Self {
        Self {
            webhook: None,
            defaults: true,
            timeout_ms: default_timeout_ms(),
            retries: default_retries(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_timeout_ms() -> u64 {
    2_000
}
fn default_retries() -> u32 {
    3
}

/// `[[alert]]` as written. A rule named like a built-in one changes only the keys it
/// writes (`enabled = false` switches it off); any other rule writes them all.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertSection {
    pub name: String,
    pub metric: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub op: Option<String>,
    pub threshold: Option<f64>,
    #[serde(rename = "for")]
    pub hold: Option<String>,
    pub measure: Option<String>,
    pub webhook: Option<String>,
    pub enabled: Option<bool>,
}

/// The condition keys `[[alert]]` and `[[scale]]` share, as written.
struct ConditionKeys<'a> {
    metric: &'a Option<String>,
    labels: &'a Option<BTreeMap<String, String>>,
    op: &'a Option<String>,
    threshold: Option<f64>,
    hold: &'a Option<String>,
    measure: &'a Option<String>,
}

/// The condition keys of a rule table.
macro_rules! condition_keys {
    ($w:expr) => {
        ConditionKeys {
            metric: &$w.metric,
            labels: &$w.labels,
            op: &$w.op,
            threshold: $w.threshold,
            hold: &$w.hold,
            measure: &$w.measure,
        }
    };
}

/// `[[scale]]` as written: learners of `service` taken from `pool`, between `min` and
/// `max`, one at a time, no more often than `cooldown`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleSection {
    pub name: String,
    /// The service whose learners change (default: the only one).
    pub service: Option<String>,
    pub metric: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub op: Option<String>,
    pub threshold: Option<f64>,
    #[serde(rename = "for")]
    pub hold: Option<String>,
    pub measure: Option<String>,
    #[serde(default)]
    pub min: usize,
    pub max: usize,
    /// Default `"60s"`.
    pub cooldown: Option<String>,
    /// Running nodes that are not members, to add as learners: `[[scale.pool]]`.
    #[serde(default)]
    pub pool: Vec<PoolNode>,
}

/// A spare node a scale rule may add as a learner.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolNode {
    pub id: NodeId,
    pub raft_addr: SocketAddr,
    pub client_addr: SocketAddr,
}

/// How a series compares with its threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl Op {
    const WRITTEN: [(&'static str, Op); 6] = [
        ("<", Op::Lt),
        ("<=", Op::Le),
        (">", Op::Gt),
        (">=", Op::Ge),
        ("==", Op::Eq),
        ("!=", Op::Ne),
    ];

    fn parse(text: &str) -> Option<Op> {
        (Self::WRITTEN.iter()).find_map(|(t, op)| (*t == text).then_some(*op))
    }

    pub fn as_str(self) -> &'static str {
        (Self::WRITTEN.iter())
            .find_map(|(t, op)| (*op == self).then_some(*t))
            .unwrap_or("?")
    }

    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Op::Lt => value < threshold,
            Op::Le => value <= threshold,
            Op::Gt => value > threshold,
            Op::Ge => value >= threshold,
            Op::Eq => value == threshold,
            Op::Ne => value != threshold,
        }
    }
}

/// What of a series is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    /// Its value.
    Value,
    /// A counter's increase per second since the previous evaluation.
    Rate,
    /// A Unix time's age in seconds; a series at 0 (never) is not compared.
    Age,
}

impl Measure {
    fn parse(text: &str) -> Option<Measure> {
        match text {
            "value" => Some(Measure::Value),
            "rate" => Some(Measure::Rate),
            "age" => Some(Measure::Age),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Measure::Value => "value",
            Measure::Rate => "rate",
            Measure::Age => "age",
        }
    }
}

/// A metric's series compared with a threshold, held for `hold`.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub metric: String,
    /// A series matches when it carries every one of these labels with these values.
    pub labels: BTreeMap<String, String>,
    pub op: Op,
    pub threshold: f64,
    pub hold: Duration,
    pub measure: Measure,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AlertRule {
    pub name: String,
    pub condition: Condition,
    /// None: `[alerts] webhook`, and without one the alert is only shown (`GET /alerts`).
    pub webhook: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScaleRule {
    pub name: String,
    pub service: String,
    pub condition: Condition,
    pub min: usize,
    pub max: usize,
    pub cooldown: Duration,
    pub pool: Vec<PoolNode>,
}

/// A key of a rule that is wrong, and why: `occurrence` counts the rule's table.
#[derive(Debug, PartialEq, Eq)]
pub struct BadRule {
    pub table: &'static str,
    pub occurrence: usize,
    pub key: &'static str,
    pub reason: String,
}

/// Longest accepted `for` and `cooldown`.
pub const MAX_HOLD: Duration = Duration::from_secs(30 * 86_400);
/// Most rules of each kind: each is evaluated every second against the whole registry.
pub const MAX_RULES: usize = 256;
const DEFAULT_COOLDOWN: Duration = Duration::from_secs(60);

/// What the built-in alerts need to know of the node's services.
pub struct ServiceFacts {
    pub archive: bool,
    /// `[drill] every`, when drills are scheduled.
    pub drill_every: Option<Duration>,
}

/// The built-in alerts: a runbook for each is in `docs/OPERATIONS.md`.
pub fn builtin_alerts(services: &[ServiceFacts]) -> Vec<AlertRule> {
    let rule = |name: &str, metric: &str, op, threshold, hold_s| AlertRule {
        name: name.to_string(),
        condition: Condition {
            metric: metric.to_string(),
            labels: BTreeMap::new(),
            op,
            threshold,
            hold: Duration::from_secs(hold_s),
            measure: Measure::Value,
        },
        webhook: None,
    };
    let mut rules = vec![
        rule("no-leader", "haven_raft_leader_id", Op::Eq, 0.0, 10),
        rule("app-down", "haven_app_up", Op::Lt, 1.0, 10),
        rule(
            "replica-lag",
            "haven_apply_lag_entries",
            Op::Gt,
            10_000.0,
            60,
        ),
        rule(
            "divergence",
            "haven_divergence_detected_total",
            Op::Gt,
            0.0,
            0,
        ),
        rule("disk-almost-full", "haven_disk_free_ratio", Op::Lt, 0.1, 60),
    ];
    if services.iter().any(|s| s.archive) {
        rules.push(rule(
            "archive-rpo",
            "haven_archive_lag_seconds",
            Op::Gt,
            60.0,
            60,
        ));
    }
    // Twice the longest drill interval: one missed or failed drill is not yet an alarm.
    if let Some(every) = services.iter().filter_map(|s| s.drill_every).max() {
        let mut overdue = rule(
            "drill-overdue",
            "haven_drill_last_success_timestamp_seconds",
            Op::Gt,
            2.0 * every.as_secs_f64(),
            0,
        );
        overdue.condition.measure = Measure::Age;
        rules.push(overdue);
    }
    rules
}

/// The alerts that run: the built-in ones (unless switched off) as the file changes
/// them, then the file's own, in order.
pub fn resolve_alerts(
    written: &[AlertSection],
    section: &AlertsSection,
    builtin: Vec<AlertRule>,
) -> Result<Vec<AlertRule>, BadRule> {
    if written.len() > MAX_RULES {
        return Err(bad(
            "alert",
            MAX_RULES,
            "name",
            format!("more than {MAX_RULES} rules"),
        ));
    }
    let builtin = if section.defaults {
        builtin
    } else {
        Vec::new()
    };
    let mut rules = Vec::new();
    for default in &builtin {
        let changed = written.iter().position(|w| w.name == default.name);
        match changed.map(|i| (i, &written[i])) {
            None => rules.push(default.clone()),
            Some((_, w)) if w.enabled == Some(false) => {}
            Some((i, w)) => rules.push(AlertRule {
                name: w.name.clone(),
                condition: condition(condition_keys!(w), Some(&default.condition), "alert", i)?,
                webhook: webhook(w.webhook.as_deref(), "alert", i)?,
            }),
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, w) in written.iter().enumerate() {
        if !names.insert(w.name.as_str()) {
            return Err(bad(
                "alert",
                i,
                "name",
                "another alert has this name".into(),
            ));
        }
        if w.name.is_empty() {
            return Err(bad("alert", i, "name", "must not be empty".into()));
        }
        if builtin.iter().any(|d| d.name == w.name) || w.enabled == Some(false) {
            continue;
        }
        rules.push(AlertRule {
            name: w.name.clone(),
            condition: condition(condition_keys!(w), None, "alert", i)?,
            webhook: webhook(w.webhook.as_deref(), "alert", i)?,
        });
    }
    Ok(rules)
}

/// The scale rules; `services` names the node's services (the first is the default).
pub fn resolve_scales(
    written: &[ScaleSection],
    services: &[String],
) -> Result<Vec<ScaleRule>, BadRule> {
    let mut rules = Vec::new();
    for (i, w) in written.iter().enumerate() {
        let service = match (&w.service, services) {
            (Some(s), _) if services.contains(s) => s.clone(),
            (Some(s), _) => {
                return Err(bad(
                    "scale",
                    i,
                    "service",
                    format!("no service is named {s:?}"),
                ));
            }
            (None, [only]) => only.clone(),
            (None, _) => {
                return Err(bad(
                    "scale",
                    i,
                    "service",
                    "name the service: this node runs several".into(),
                ));
            }
        };
        if w.max < w.min || w.max == 0 {
            let reason = format!("must be at least min ({}) and at least 1", w.min);
            return Err(bad("scale", i, "max", reason));
        }
        if w.pool.len() < w.max {
            let reason = format!(
                "{} nodes in [[scale.pool]] cannot make max = {} learners",
                w.pool.len(),
                w.max
            );
            return Err(bad("scale", i, "max", reason));
        }
        let cooldown = match &w.cooldown {
            Some(text) => interval(text, "scale", i, "cooldown")?,
            None => DEFAULT_COOLDOWN,
        };
        rules.push(ScaleRule {
            name: w.name.clone(),
            service,
            condition: condition(condition_keys!(w), None, "scale", i)?,
            min: w.min,
            max: w.max,
            cooldown,
            pool: w.pool.clone(),
        });
    }
    Ok(rules)
}

fn bad(table: &'static str, occurrence: usize, key: &'static str, reason: String) -> BadRule {
    BadRule {
        table,
        occurrence,
        key,
        reason,
    }
}

/// The condition as written, each key missing taken from `base` (a built-in rule).
fn condition(
    w: ConditionKeys<'_>,
    base: Option<&Condition>,
    table: &'static str,
    i: usize,
) -> Result<Condition, BadRule> {
    let missing = |key| bad(table, i, key, "is required".into());
    let metric = match (w.metric, base) {
        (Some(m), _) => m.clone(),
        (None, Some(b)) => b.metric.clone(),
        (None, None) => return Err(missing("metric")),
    };
    if metric.is_empty()
        || !metric
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return Err(bad(
            table,
            i,
            "metric",
            format!("{metric:?} is not a metric name"),
        ));
    }
    let op = match (w.op, base) {
        (Some(text), _) => Op::parse(text).ok_or_else(|| {
            bad(
                table,
                i,
                "op",
                format!("{text:?} is not one of <, <=, >, >=, ==, !="),
            )
        })?,
        (None, Some(b)) => b.op,
        (None, None) => return Err(missing("op")),
    };
    let threshold = match (w.threshold, base) {
        (Some(t), _) if !t.is_finite() => {
            return Err(bad(table, i, "threshold", "must be a finite number".into()));
        }
        (Some(t), _) => t,
        (None, Some(b)) => b.threshold,
        (None, None) => return Err(missing("threshold")),
    };
    let hold = match (w.hold, base) {
        (Some(text), _) => interval(text, table, i, "for")?,
        (None, Some(b)) => b.hold,
        (None, None) => Duration::ZERO,
    };
    let measure = match (w.measure, base) {
        (Some(text), _) => Measure::parse(text).ok_or_else(|| {
            bad(
                table,
                i,
                "measure",
                format!("{text:?} is not one of value, rate, age"),
            )
        })?,
        (None, Some(b)) => b.measure,
        (None, None) => Measure::Value,
    };
    let labels = match (w.labels, base) {
        (Some(l), _) => l.clone(),
        (None, Some(b)) => b.labels.clone(),
        (None, None) => BTreeMap::new(),
    };
    Ok(Condition {
        metric,
        labels,
        op,
        threshold,
        hold,
        measure,
    })
}

/// `"0s"` is allowed (fire at once); the longest is [`MAX_HOLD`].
fn interval(
    text: &str,
    table: &'static str,
    i: usize,
    key: &'static str,
) -> Result<Duration, BadRule> {
    let hold = parse_interval(text).map_err(|e| bad(table, i, key, e.to_string()))?;
    if hold > MAX_HOLD {
        return Err(bad(
            table,
            i,
            key,
            format!("{text:?} is longer than 30 days"),
        ));
    }
    Ok(hold)
}

fn webhook(url: Option<&str>, table: &'static str, i: usize) -> Result<Option<String>, BadRule> {
    match url {
        Some(url) if !url.starts_with("http://") => Err(bad(
            table,
            i,
            "webhook",
            format!("{url:?} must start with http://"),
        )),
        other => Ok(other.map(str::to_string)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(name: &str) -> AlertSection {
        AlertSection {
            name: name.to_string(),
            ..AlertSection::default()
        }
    }

    #[test]
    fn a_builtin_rule_is_changed_key_by_key_or_switched_off() {
        let facts = [ServiceFacts {
            archive: false,
            drill_every: None,
        }];
        let mut lag = written("replica-lag");
        lag.threshold = Some(500.0);
        let mut down = written("app-down");
        down.enabled = Some(false);
        let rules = resolve_alerts(
            &[lag, down],
            &AlertsSection::default(),
            builtin_alerts(&facts),
        )
        .unwrap();
        let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            ["no-leader", "replica-lag", "divergence", "disk-almost-full"]
        );
        let lag = &rules[1].condition;
        assert_eq!(
            (lag.metric.as_str(), lag.threshold, lag.hold),
            ("haven_apply_lag_entries", 500.0, Duration::from_secs(60))
        );
        let off = AlertsSection {
            defaults: false,
            ..AlertsSection::default()
        };
        assert_eq!(
            resolve_alerts(&[], &off, builtin_alerts(&facts)).unwrap(),
            []
        );
    }

    #[test]
    fn archive_and_drill_alerts_exist_only_with_an_archive_and_drills() {
        let facts = [ServiceFacts {
            archive: true,
            drill_every: Some(Duration::from_secs(86_400)),
        }];
        let rules = builtin_alerts(&facts);
        let drill = rules.iter().find(|r| r.name == "drill-overdue").unwrap();
        assert_eq!(
            (drill.condition.threshold, drill.condition.measure),
            (172_800.0, Measure::Age)
        );
        assert!(rules.iter().any(|r| r.name == "archive-rpo"));
    }

    #[test]
    fn ops_compare_as_written() {
        assert!(Op::parse("<=").unwrap().holds(1.0, 1.0));
        assert!(!Op::parse("<").unwrap().holds(1.0, 1.0));
        assert!(Op::parse("!=").unwrap().holds(0.0, 1.0));
        assert_eq!(Op::parse("=>"), None);
        assert_eq!(Op::Ge.as_str(), ">=");
    }
}
