//! Command-line flags for `haven bench`, as `clap::Args` structs the `haven`
//! binary flattens into its subcommands, and their conversion into validated
//! specs.
//!
//! Flags are the user's interface, so every rejection names the flag, the
//! allowed range and the value given (`--read-ratio must be between 0 and 1,
//! got 1.5`).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::BenchError;
use crate::error::{ensure_at_least_one, ensure_non_negative, ensure_positive};
use crate::load::{LoadSpec, Mode, Target};
use crate::sweep::SweepSpec;
use crate::workload::WorkloadChoice;

/// Which application the requests are shaped for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WorkloadKind {
    /// Haven's log app: `POST /append`, `GET /line/N`.
    #[value(name = "logapp")]
    LogApp,
    /// etcd's v3 JSON gateway: `/v3/kv/put`, `/v3/kv/range`.
    Etcd,
}

/// Flags shared by a single run and a sweep.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct CommonArgs {
    /// Base URL of a server to load, e.g. http://127.0.0.1:7001 (repeat for
    /// several; connections are spread over them round-robin).
    #[arg(long = "target", value_name = "URL", required = true)]
    pub targets: Vec<String>,
    /// Seconds of load before measuring starts (connections open, caches warm).
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    pub warmup: f64,
    /// Share of requests that are reads, from 0 (all writes) to 1 (all reads).
    #[arg(long, value_name = "RATIO", default_value_t = 0.0)]
    pub read_ratio: f64,
    /// Bytes in each written line or value.
    #[arg(long, value_name = "BYTES", default_value_t = 128)]
    pub body_size: usize,
    #[arg(long, value_enum, default_value_t = WorkloadKind::LogApp)]
    pub workload: WorkloadKind,
    /// logapp: lines the app already holds, so reads can start on them.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub prepopulated: u64,
    /// etcd: number of distinct keys written and read.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub keys: u64,
    /// Per-request (and per-connect) timeout; a timed-out request is an error.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    pub timeout_ms: u64,
    /// Seed of the read/write and key choices, for repeatable runs.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print the results as JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `haven bench`: one run, open loop (`--rate`) or closed loop.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct LoadArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Open loop: total requests per second, sent on a fixed timetable.
    #[arg(long, value_name = "REQ_PER_S", conflicts_with = "concurrency")]
    pub rate: Option<f64>,
    /// Closed loop (the default, with 16): connections sending back-to-back.
    #[arg(long, value_name = "N")]
    pub concurrency: Option<usize>,
    /// Open loop: connections the rate is spread over [default: 16].
    #[arg(long, value_name = "N", requires = "rate")]
    pub connections: Option<usize>,
    /// Seconds measured, after the warmup.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub duration: f64,
}

/// `haven bench sweep`: open-loop steps of rising rate until saturation.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct SweepArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Connections each step's rate is spread over.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_WORKERS)]
    pub connections: usize,
    /// Rate of the first step, requests per second.
    #[arg(long, value_name = "REQ_PER_S", default_value_t = 100.0)]
    pub start_rate: f64,
    /// Each step's rate is the previous one's times this.
    #[arg(long, value_name = "FACTOR", default_value_t = 1.5)]
    pub step_factor: f64,
    /// Stop after this many steps even if none saturated.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub max_steps: usize,
    /// Seconds measured per step, after that step's warmup.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    pub step_duration: f64,
    /// A step whose p90 latency exceeds this is saturated.
    #[arg(long, value_name = "MS", default_value_t = 100.0)]
    pub p90_bound_ms: f64,
    /// A step whose share of failed requests exceeds this is saturated.
    #[arg(long, value_name = "RATIO", default_value_t = 0.01)]
    pub error_ratio_bound: f64,
    /// Name of the curve in the JSON and the chart [default: the target URLs].
    #[arg(long)]
    pub label: Option<String>,
    /// Directory for sweep.json and sweep.svg.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Connections when none are given, and the closed loop's default concurrency.
pub const DEFAULT_WORKERS: usize = 16;

impl LoadArgs {
    pub fn to_spec(&self) -> Result<(LoadSpec, WorkloadChoice), BenchError> {
        let (mode, connections) = match self.rate {
            Some(rate) => (
                Mode::Open { rate },
                self.connections.unwrap_or(DEFAULT_WORKERS),
            ),
            None => (Mode::Closed, self.concurrency.unwrap_or(DEFAULT_WORKERS)),
        };
        let duration = seconds("--duration", ensure_positive("--duration", self.duration)?)?;
        self.common.to_spec(mode, connections, duration)
    }
}

impl SweepArgs {
    /// The base load of every step (its mode is replaced per step), the sweep
    /// itself, and the workload.
    pub fn to_spec(&self) -> Result<(LoadSpec, SweepSpec, WorkloadChoice), BenchError> {
        let step_duration = seconds(
            "--step-duration",
            ensure_positive("--step-duration", self.step_duration)?,
        )?;
        let sweep = SweepSpec {
            label: self
                .label
                .clone()
                .unwrap_or_else(|| self.common.targets.join(", ")),
            start_rate: self.start_rate,
            step_factor: self.step_factor,
            max_steps: self.max_steps,
            step_duration,
            warmup: self.common.warmup()?,
            p90_bound_ms: self.p90_bound_ms,
            error_ratio_bound: self.error_ratio_bound,
        };
        // First, so that a bad start rate is reported as --start-rate.
        sweep.validate()?;
        let mode = Mode::Open {
            rate: self.start_rate,
        };
        let (base, workload) = self.common.to_spec(mode, self.connections, step_duration)?;
        Ok((base, sweep, workload))
    }
}

impl CommonArgs {
    fn to_spec(
        &self,
        mode: Mode,
        connections: usize,
        duration: Duration,
    ) -> Result<(LoadSpec, WorkloadChoice), BenchError> {
        let spec = LoadSpec {
            targets: self
                .targets
                .iter()
                .map(|url| Target::parse(url))
                .collect::<Result<_, _>>()?,
            mode,
            connections,
            duration,
            warmup: self.warmup()?,
            read_ratio: self.read_ratio,
            request_timeout: Duration::from_millis(ensure_at_least_one(
                "--timeout-ms",
                self.timeout_ms,
            )?),
            seed: self.seed,
        };
        spec.validate()?;
        Ok((spec, self.workload()?))
    }

    fn warmup(&self) -> Result<Duration, BenchError> {
        seconds("--warmup", ensure_non_negative("--warmup", self.warmup)?)
    }

    fn workload(&self) -> Result<WorkloadChoice, BenchError> {
        Ok(match self.workload {
            WorkloadKind::LogApp => WorkloadChoice::LogApp {
                body_size: self.body_size,
                prepopulated_lines: self.prepopulated,
            },
            WorkloadKind::Etcd => WorkloadChoice::Etcd {
                body_size: self.body_size,
                keys: ensure_at_least_one("--keys", self.keys)?,
            },
        })
    }
}

/// A number of seconds already checked for sign; only overflow remains.
fn seconds(flag: &str, value: f64) -> Result<Duration, BenchError> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| BenchError::Invalid(format!("{flag} is too large, got {value}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct LoadCli {
        #[command(flatten)]
        args: LoadArgs,
    }

    #[derive(Debug, Parser)]
    struct SweepCli {
        #[command(flatten)]
        args: SweepArgs,
    }

    fn load(extra: &[&str]) -> Result<LoadArgs, clap::Error> {
        let base = ["bench", "--target", "http://127.0.0.1:7001"];
        LoadCli::try_parse_from(base.iter().chain(extra)).map(|cli| cli.args)
    }

    fn load_spec(extra: &[&str]) -> Result<(LoadSpec, WorkloadChoice), String> {
        load(extra)
            .map_err(|e| e.to_string())?
            .to_spec()
            .map_err(|e| e.to_string())
    }

    fn error(extra: &[&str]) -> String {
        match load_spec(extra) {
            Ok(spec) => panic!("{extra:?} was accepted: {spec:?}"),
            Err(message) => message,
        }
    }

    #[test]
    fn defaults_are_a_closed_loop_of_16_writes() {
        let (spec, workload) = load_spec(&[]).expect("defaults are valid");
        assert_eq!(spec.mode, Mode::Closed);
        assert_eq!(spec.connections, 16);
        assert_eq!(spec.duration, Duration::from_secs(10));
        assert_eq!(spec.warmup, Duration::from_secs(1));
        assert_eq!(spec.read_ratio, 0.0);
        assert_eq!(spec.request_timeout, Duration::from_secs(5));
        assert_eq!(spec.targets[0].url(), "http://127.0.0.1:7001");
        assert_eq!(
            workload,
            WorkloadChoice::LogApp {
                body_size: 128,
                prepopulated_lines: 0
            }
        );
    }

    #[test]
    fn rate_selects_the_open_loop() {
        let (spec, _) = load_spec(&["--rate", "500", "--connections", "8"]).expect("valid");
        assert_eq!(
            (spec.mode, spec.connections),
            (Mode::Open { rate: 500.0 }, 8)
        );
        let (spec, _) = load_spec(&["--rate", "500"]).expect("valid");
        assert_eq!(spec.connections, 16);
        let (spec, _) = load_spec(&["--concurrency", "3"]).expect("valid");
        assert_eq!((spec.mode, spec.connections), (Mode::Closed, 3));
    }

    #[test]
    fn etcd_workload_and_several_targets() {
        let (spec, workload) = load_spec(&[
            "--target",
            "http://127.0.0.1:2379",
            "--workload",
            "etcd",
            "--keys",
            "50",
            "--body-size",
            "10",
        ])
        .expect("valid");
        assert_eq!(spec.targets.len(), 2);
        assert_eq!(
            workload,
            WorkloadChoice::Etcd {
                body_size: 10,
                keys: 50
            }
        );
    }

    #[test]
    fn out_of_range_values_are_explained_exactly() {
        let cases: [(&[&str], &str); 9] = [
            (
                &["--read-ratio", "1.5"],
                "--read-ratio must be between 0 and 1, got 1.5",
            ),
            (&["--rate", "0"], "--rate must be positive, got 0"),
            (&["--rate=-5"], "--rate must be positive, got -5"),
            (
                &["--concurrency", "0"],
                "--concurrency must be at least 1, got 0",
            ),
            (
                &["--rate", "10", "--connections", "0"],
                "--connections must be at least 1, got 0",
            ),
            (&["--duration", "0"], "--duration must be positive, got 0"),
            (&["--warmup=-1"], "--warmup must not be negative, got -1"),
            (
                &["--timeout-ms", "0"],
                "--timeout-ms must be at least 1, got 0",
            ),
            (
                &["--workload", "etcd", "--keys", "0"],
                "--keys must be at least 1, got 0",
            ),
        ];
        for (extra, expected) in cases {
            assert_eq!(error(extra), expected, "{extra:?}");
        }
        assert_eq!(
            error(&["--duration", "1e30"]),
            "--duration is too large, got 1000000000000000000000000000000"
        );
    }

    #[test]
    fn bad_targets_are_named() {
        assert_eq!(
            error(&["--target", "localhost:7001"]),
            "invalid target URL 'localhost:7001': only http:// URLs are supported"
        );
    }

    #[test]
    fn clap_rejects_contradictory_modes() {
        let message = |extra: &[&str]| load(extra).map(|_| ()).map_err(|e| e.kind());
        assert_eq!(
            message(&["--rate", "5", "--concurrency", "2"]),
            Err(clap::error::ErrorKind::ArgumentConflict)
        );
        assert_eq!(
            message(&["--connections", "2"]),
            Err(clap::error::ErrorKind::MissingRequiredArgument)
        );
        let no_target = LoadCli::try_parse_from(["bench"])
            .map(|_| ())
            .map_err(|e| e.kind());
        assert_eq!(
            no_target,
            Err(clap::error::ErrorKind::MissingRequiredArgument)
        );
    }

    fn sweep(extra: &[&str]) -> Result<(LoadSpec, SweepSpec, WorkloadChoice), String> {
        let base = ["sweep", "--target", "http://127.0.0.1:7001"];
        SweepCli::try_parse_from(base.iter().chain(extra))
            .map_err(|e| e.to_string())?
            .args
            .to_spec()
            .map_err(|e| e.to_string())
    }

    #[test]
    fn sweep_defaults_and_overrides() {
        let (base, spec, _) = sweep(&[]).expect("defaults are valid");
        assert_eq!(
            (base.mode, base.connections),
            (Mode::Open { rate: 100.0 }, 16)
        );
        assert_eq!(spec.label, "http://127.0.0.1:7001");
        assert_eq!(
            (spec.step_factor, spec.max_steps, spec.step_duration),
            (1.5, 10, Duration::from_secs(5))
        );
        assert_eq!(spec.warmup, base.warmup);

        let (_, spec, _) = sweep(&[
            "--label",
            "haven",
            "--start-rate",
            "50",
            "--p90-bound-ms",
            "20",
        ])
        .expect("valid");
        assert_eq!(
            (spec.label.as_str(), spec.start_rate, spec.p90_bound_ms),
            ("haven", 50.0, 20.0)
        );
    }

    #[test]
    fn sweep_values_are_explained_exactly() {
        let cases: [(&[&str], &str); 4] = [
            (
                &["--start-rate", "0"],
                "--start-rate must be positive, got 0",
            ),
            (
                &["--step-factor", "0.5"],
                "--step-factor must be greater than 1, got 0.5",
            ),
            (
                &["--step-duration", "0"],
                "--step-duration must be positive, got 0",
            ),
            (
                &["--p90-bound-ms=-1"],
                "--p90-bound-ms must be positive, got -1",
            ),
        ];
        for (extra, expected) in cases {
            assert_eq!(
                sweep(extra).map(|_| ()),
                Err(expected.to_owned()),
                "{extra:?}"
            );
        }
    }
}
