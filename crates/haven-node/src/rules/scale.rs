//! `[[scale]]` rules: learners (non-voting read replicas) of a service added from the
//! rule's pool while its condition holds for its `for`, and removed while it does not,
//! between `min` and `max`, at most one change per `cooldown`. Only the service's leader
//! acts (membership changes are the leader's), through the same calls as `haven members
//! add-learner` and `haven members remove`. A pool node is a running node (`join = true`)
//! that is not a member; a learner it becomes catches up from the leader's newest
//! checkpoint and the log, as any new member does.

use std::time::Instant;

use axum::Json;
use openraft::rt::WatchReceiver;
use prometheus::proto::MetricFamily;

use super::Instances;
use crate::admin::members;
use crate::admin::members::AddLearner;
use crate::admin::members::ChangeNode;
use crate::ingress::select::Directory;
use haven_base::metrics::NodeMetrics;
use haven_base::rules::ScaleRule;
use haven_contract::NodeId;
use haven_service::apply::Raft;

/// One scale rule and what it remembers between evaluations.
pub struct Scaler {
    rule: ScaleRule,
    instances: Instances,
    /// Since when the condition has held, or not held.
    held_since: Option<Instant>,
    idle_since: Option<Instant>,
    last_change: Option<Instant>,
}

/// What a scale rule wants now.
#[derive(Debug, PartialEq, Eq)]
enum Want {
    More,
    Fewer,
    Same,
}

impl Scaler {
    pub fn new(rule: &ScaleRule) -> Self {
        Self {
            rule: rule.clone(),
            instances: Instances::default(),
            held_since: None,
            idle_since: None,
            last_change: None,
        }
    }

    pub async fn evaluate(
        &mut self,
        families: &[MetricFamily],
        now: Instant,
        me: NodeId,
        directory: &Directory,
        metrics: &NodeMetrics,
    ) {
        let condition = &self.rule.condition;
        let readings = self.instances.read(families, condition, now);
        let holds = (readings.iter()).any(|r| {
            r.measured
                .is_some_and(|v| condition.op.holds(v, condition.threshold))
        });
        let _ = self.instances.step(readings, condition, now);
        let want = self.want(holds, now);
        let Some(raft) = directory
            .get(&self.rule.service)
            .and_then(|i| i.raft.clone())
        else {
            return;
        };
        if raft.metrics().borrow_watched().current_leader != Some(me) {
            return;
        }
        let cooling =
            (self.last_change).is_some_and(|at| now.duration_since(at) < self.rule.cooldown);
        let learners = self.learners(&raft);
        let change = match want {
            _ if cooling => None,
            _ if learners.len() < self.rule.min => self.spare(&raft).map(|n| (n, true)),
            Want::More if learners.len() < self.rule.max => self.spare(&raft).map(|n| (n, true)),
            Want::Fewer if learners.len() > self.rule.min => learners.last().map(|&id| (id, false)),
            _ => None,
        };
        let Some((id, add)) = change else {
            return;
        };
        if self.change(raft, me, id, add).await {
            self.last_change = Some(now);
            (self.held_since, self.idle_since) = (None, None);
            let label = if add { "add" } else { "remove" };
            metrics
                .rules
                .scale_changes
                .with_label_values(&[&self.rule.name, label])
                .inc();
        }
    }

    /// More once the condition has held for `for`; fewer once it has not for as long.
    fn want(&mut self, holds: bool, now: Instant) -> Want {
        let hold = self.rule.condition.hold;
        let (on, off) = match holds {
            true => (&mut self.held_since, &mut self.idle_since),
            false => (&mut self.idle_since, &mut self.held_since),
        };
        *off = None;
        let since = *on.get_or_insert(now);
        match (holds, now.duration_since(since) >= hold) {
            (true, true) => Want::More,
            (false, true) => Want::Fewer,
            _ => Want::Same,
        }
    }

    /// The pool's nodes that are learners now, in pool order.
    fn learners(&self, raft: &Raft) -> Vec<NodeId> {
        let m = raft.metrics().borrow_watched().clone();
        let learners: Vec<NodeId> = m.membership_config.membership().learner_ids().collect();
        (self.rule.pool.iter())
            .map(|p| p.id)
            .filter(|id| learners.contains(id))
            .collect()
    }

    /// The first pool node that is not a member.
    fn spare(&self, raft: &Raft) -> Option<NodeId> {
        let m = raft.metrics().borrow_watched().clone();
        let members: Vec<NodeId> = m.membership_config.nodes().map(|(id, _)| *id).collect();
        (self.rule.pool.iter())
            .map(|p| p.id)
            .find(|id| !members.contains(id))
    }

    async fn change(&self, raft: Raft, me: NodeId, id: NodeId, add: bool) -> bool {
        let rule = &self.rule;
        let answer = match add {
            true => {
                let Some(node) = rule.pool.iter().find(|p| p.id == id) else {
                    return false;
                };
                let request = AddLearner {
                    id,
                    raft_addr: node.raft_addr.to_string(),
                    client_addr: node.client_addr.to_string(),
                };
                members::add_learner(raft, me, request).await
            }
            false => members::remove(raft, me, ChangeNode { id, force: false }).await,
        };
        match answer {
            Ok(Json(reply)) => {
                tracing::info!(rule = %rule.name, service = %rule.service, node = id, add, learners = ?reply.learners, "scale rule changed the learners");
                true
            }
            Err((_, Json(refused))) => {
                tracing::warn!(rule = %rule.name, service = %rule.service, node = id, add, error = %refused.message, "scale rule could not change the learners");
                false
            }
        }
    }
}
