//! Alert notices and their delivery: each is a JSON POST to the rule's webhook (or
//! `[alerts] webhook`), tried up to `1 + retries` times with a timeout each and a
//! doubling pause between; one that no attempt delivered is counted in
//! `haven_alert_delivery_failures_total{alert}` and logged. One worker sends them in
//! order, so a rule's resolution never overtakes its firing.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::sync::watch;

use haven_base::metrics::NodeMetrics;
use haven_base::rules::AlertRule;
use haven_base::rules::AlertsSection;
use haven_contract::NodeId;
use haven_service::app::AppClient;

/// Notices waiting for delivery; beyond it the evaluator drops (and counts) new ones
/// rather than wait on a webhook that does not answer.
pub const QUEUE: usize = 256;
/// The first pause between attempts; it doubles after each.
const FIRST_PAUSE: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Firing,
    Resolved,
}

/// The body of one POST.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notice {
    pub name: String,
    pub state: State,
    /// What was compared (a rate or an age when the rule says so); null when the series
    /// is gone.
    pub value: Option<f64>,
    pub node: NodeId,
    pub metric: String,
    pub op: String,
    pub threshold: f64,
    pub measure: String,
    /// The series' labels (e.g. `service`).
    pub labels: BTreeMap<String, String>,
    /// `for`, in seconds.
    pub for_s: f64,
    /// When the notice was made (RFC 3339, UTC).
    pub at: String,
    /// Where it goes; not sent.
    #[serde(skip)]
    pub webhook: Option<String>,
}

impl Notice {
    pub fn new(
        rule: &AlertRule,
        state: State,
        labels: BTreeMap<String, String>,
        value: Option<f64>,
        node: NodeId,
    ) -> Self {
        let c = &rule.condition;
        Self {
            name: rule.name.clone(),
            state,
            value,
            node,
            metric: c.metric.clone(),
            op: c.op.as_str().to_string(),
            threshold: c.threshold,
            measure: c.measure.as_str().to_string(),
            labels,
            for_s: c.hold.as_secs_f64(),
            at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            webhook: rule.webhook.clone(),
        }
    }
}

/// Sends notices in order until the node stops.
pub async fn deliver(
    mut notices: mpsc::Receiver<Notice>,
    delivery: AlertsSection,
    metrics: NodeMetrics,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let notice = tokio::select! {
            notice = notices.recv() => notice,
            _ = stop.wait_for(|stop| *stop) => return,
        };
        let Some(notice) = notice else {
            return;
        };
        let Some(url) = notice.webhook.clone().or_else(|| delivery.webhook.clone()) else {
            continue;
        };
        if let Err(e) = post(&url, &notice, &delivery, &mut stop).await {
            metrics
                .rules
                .delivery_failures
                .with_label_values(&[&notice.name])
                .inc();
            tracing::warn!(alert = %notice.name, state = ?notice.state, %url, error = %e, "alert notice not delivered");
        }
    }
}

/// Tries until one attempt gets a 2xx answer, the attempts run out, or the node stops.
async fn post(
    url: &str,
    notice: &Notice,
    delivery: &AlertsSection,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    let body = Bytes::from(serde_json::to_vec(notice).map_err(|e| e.to_string())?);
    let client = AppClient::new(url, Duration::from_millis(delivery.timeout_ms));
    let headers = [(
        "content-type".to_string(),
        Bytes::from_static(b"application/json"),
    )];
    let mut pause = FIRST_PAUSE;
    let mut last = String::new();
    for attempt in 0..=delivery.retries {
        if attempt > 0 {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.wait_for(|stop| *stop) => return Err(format!("node stopping; {last}")),
            }
            pause *= 2;
        }
        match client.read("POST", "", &headers, body.clone()).await {
            Ok(answer) if (200..300).contains(&answer.status) => return Ok(()),
            Ok(answer) => last = format!("the webhook answered {}", answer.status),
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!(
        "{} attempts failed; the last: {last}",
        delivery.retries + 1
    ))
}
