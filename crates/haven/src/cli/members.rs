//! `haven members ...`: membership changes through a node's admin API. They must reach the
//! leader; a follower answers with the leader's id, which the error repeats.

use std::time::Duration;

use clap::Args;
use clap::Subcommand;
use haven_node::admin::members::AddLearner;
use haven_node::admin::members::ChangeNode;
use haven_node::admin::members::MembershipReply;
use haven_node::admin::members::Replace;
use serde::Serialize;

use super::AdminTarget;

/// A replacement's `add_learner` waits until it caught up, which may take a checkpoint
/// transfer.
const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Args)]
pub struct NewNode {
    /// The new node's id.
    #[arg(long)]
    id: u64,
    /// Its raft address (`[node] raft_addr`).
    #[arg(long)]
    raft_addr: String,
    /// Its client address (`[node] client_addr`).
    #[arg(long)]
    client_addr: String,
}

impl NewNode {
    fn request(&self) -> AddLearner {
        AddLearner {
            id: self.id,
            raft_addr: self.raft_addr.clone(),
            client_addr: self.client_addr.clone(),
        }
    }
}

/// One existing member to change.
#[derive(Args)]
pub struct ChangeArgs {
    /// The leader's admin address and the service.
    #[command(flatten)]
    target: AdminTarget,
    /// The member's node id.
    #[arg(long)]
    id: u64,
    /// Even if the new voter set would lack a healthy majority.
    #[arg(long)]
    force: bool,
}

impl ChangeArgs {
    fn request(&self) -> ChangeNode {
        ChangeNode {
            id: self.id,
            force: self.force,
        }
    }
}

#[derive(Subcommand)]
pub enum MembersCommand {
    /// Add a non-voting member; it catches up from a checkpoint and the log.
    AddLearner {
        /// The leader's admin address and the service.
        #[command(flatten)]
        target: AdminTarget,
        #[command(flatten)]
        node: NewNode,
    },
    /// Make a caught-up learner a voter.
    Promote(ChangeArgs),
    /// Remove a voter or learner.
    Remove(ChangeArgs),
    /// Replace a dead voter with a fresh node (the same id, or a new one).
    Replace {
        #[command(flatten)]
        target: AdminTarget,
        /// The dead voter's id.
        #[arg(long)]
        old: u64,
        #[command(flatten)]
        node: NewNode,
        /// Even if the new voter set would lack a healthy majority.
        #[arg(long)]
        force: bool,
    },
}

pub async fn run(command: MembersCommand) -> anyhow::Result<String> {
    let reply = match command {
        MembersCommand::AddLearner { target, node } => {
            post(&target, "learner", &node.request()).await?
        }
        MembersCommand::Promote(change) => {
            post(&change.target, "promote", &change.request()).await?
        }
        MembersCommand::Remove(change) => post(&change.target, "remove", &change.request()).await?,
        MembersCommand::Replace {
            target,
            old,
            node,
            force,
        } => {
            let request = Replace {
                old,
                new: node.request(),
                force,
            };
            post(&target, "replace", &request).await?
        }
    };
    Ok(format!(
        "voters {:?}, learners {:?}\n",
        reply.voters, reply.learners
    ))
}

async fn post<T: Serialize>(
    target: &AdminTarget,
    change: &str,
    body: &T,
) -> anyhow::Result<MembershipReply> {
    let client = target.client(MEMBERSHIP_TIMEOUT);
    Ok(client.membership(change, body).await?)
}
