//! The fault schedule: drawn from the seed before the run starts, so a seed names one exact
//! sequence of faults. One fault is active at a time and each is healed before the next.

use std::fmt;
use std::time::Duration;

use haven_contract::NodeId;
use rand::Rng;
use rand::SeedableRng;
use rand::rngs::StdRng;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Every segment to and from the node waits until the heal, as TCP retransmission makes
    /// a real partition look. Also what a paused (SIGSTOP) node looks like to its peers.
    Isolate(NodeId),
    /// [`Fault::Isolate`] of whichever node leads when the fault starts.
    IsolateLeader,
    /// The listed minority is cut off from the majority (and the clients).
    Split(Vec<NodeId>),
    /// kill -9: the node's software stops; it starts again at the heal.
    Kill(NodeId),
    /// kill -9 and immediate restart.
    Restart(NodeId),
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Isolate(n) => write!(f, "isolate node {n}"),
            Fault::IsolateLeader => write!(f, "isolate the leader"),
            Fault::Split(minority) => write!(f, "split off {minority:?}"),
            Fault::Kill(n) => write!(f, "kill node {n}"),
            Fault::Restart(n) => write!(f, "restart node {n}"),
        }
    }
}

/// A fault and when it starts and ends, in simulated time.
#[derive(Debug, Clone)]
pub struct Window {
    pub start: Duration,
    pub end: Duration,
    pub fault: Fault,
}

/// Faults for `length` of simulated time on a cluster of `nodes`.
pub fn schedule(seed: u64, nodes: u64, length: Duration) -> Vec<Window> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_fa17);
    // Let the cluster elect its first leader in peace.
    let mut at = Duration::from_millis(rng.random_range(1_000..2_000));
    let mut windows = Vec::new();
    while at < length {
        let fault = draw(&mut rng, nodes);
        let lasts = match fault {
            Fault::Restart(_) => Duration::ZERO,
            _ => Duration::from_millis(rng.random_range(300..3_000)),
        };
        windows.push(Window {
            start: at,
            end: at + lasts,
            fault,
        });
        at += lasts + Duration::from_millis(rng.random_range(200..2_000));
    }
    windows
}

fn draw(rng: &mut StdRng, nodes: u64) -> Fault {
    let node = rng.random_range(1..=nodes);
    match rng.random_range(0..5) {
        0 => Fault::Isolate(node),
        1 => Fault::IsolateLeader,
        2 => {
            let minority = (nodes - 1) / 2;
            let first = rng.random_range(1..=nodes);
            Fault::Split((0..minority).map(|i| (first + i - 1) % nodes + 1).collect())
        }
        3 => Fault::Kill(node),
        _ => Fault::Restart(node),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_names_one_schedule_of_healed_non_overlapping_faults() {
        let length = Duration::from_secs(30);
        let windows = schedule(7, 5, length);
        assert_eq!(
            format!("{windows:?}"),
            format!("{:?}", schedule(7, 5, length))
        );
        assert_ne!(
            format!("{windows:?}"),
            format!("{:?}", schedule(8, 5, length))
        );
        assert!(windows.len() > 5, "{windows:?}");
        for pair in windows.windows(2) {
            assert!(pair[0].end < pair[1].start, "{pair:?}");
        }
        for window in &windows {
            if let Fault::Split(minority) = &window.fault {
                assert_eq!(minority.len(), 2);
                assert!(minority.iter().all(|n| (1..=5).contains(n)));
                assert_ne!(minority[0], minority[1]);
            }
        }
    }
}
