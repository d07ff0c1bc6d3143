//! The simulation seeds CI runs. Each seed is a different fault schedule, client mix and
//! message timing; a failure prints the seed's full report and the command that replays it.

use std::time::Duration;

use haven_sim::Options;

#[cfg(not(tokio_unstable))]
compile_error!(
    "built without --cfg tokio_unstable (.cargo/config.toml sets it; a RUSTFLAGS environment \
     variable replaces that setting): tokio's own random choices are then unseeded and a \
     seed cannot replay"
);

/// Seeds run in CI per cluster size: a 3-node seed takes about 1.5 s in a debug build, a
/// 5-node seed about 4 s.
const SEEDS_3: u64 = 24;
const SEEDS_5: u64 = 12;

fn run_seeds(seeds: std::ops::Range<u64>, options: &Options) {
    let failed: Vec<String> = seeds
        .map(|seed| haven_sim::run(seed, options))
        .filter(|report| !report.passed())
        .map(|report| report.to_string())
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn three_node_seeds_keep_every_invariant() {
    run_seeds(1..1 + SEEDS_3, &Options::default());
}

#[test]
fn five_node_seeds_keep_every_invariant() {
    let options = Options {
        nodes: 5,
        ..Options::default()
    };
    run_seeds(1001..1001 + SEEDS_5, &options);
}

/// A seed replays exactly: same faults, same messages, same applies, same acknowledgements.
#[test]
fn a_seed_replays_exactly() {
    let options = Options {
        fault_phase: Duration::from_secs(10),
        trace: true,
        ..Options::default()
    };
    let first = haven_sim::run(42, &options);
    let second = haven_sim::run(42, &options);
    assert!(first.passed(), "{first}");
    assert!(first.acknowledged > 100, "{first}");
    assert_same_history(&first.trace, &second.trace);
    assert_eq!(first.fingerprint, second.fingerprint);
    let other = haven_sim::run(43, &options);
    assert_ne!(first.fingerprint, other.fingerprint);
}

/// Names the first event where two runs of a seed parted, instead of printing both
/// histories whole (thousands of lines that hide the one that matters).
fn assert_same_history(first: &[String], second: &[String]) {
    let parted = first.iter().zip(second).position(|(a, b)| a != b);
    if let Some(at) = parted {
        let from = at.saturating_sub(5);
        panic!(
            "the runs parted at event {at}:\n first: {:#?}\nsecond: {:#?}",
            &first[from..(at + 5).min(first.len())],
            &second[from..(at + 5).min(second.len())]
        );
    }
    assert_eq!(
        first.len(),
        second.len(),
        "one run's history is a prefix of the other's"
    );
}
