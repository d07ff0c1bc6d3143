//! Rate sweeps: the throughput–latency curve, and where it bends.
//!
//! One run at one rate says little; a system is characterised by how latency
//! grows as offered load rises until it saturates. A sweep runs open-loop steps
//! at geometrically increasing rates and stops after the first *saturated*
//! step ([`is_saturated`]), so it never hammers a system far past its limit
//! (this machine also runs that system). [`saturation_throughput`] then gives
//! the one number to compare systems by.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::info;

use crate::BenchError;
use crate::error::{
    ensure_at_least_one, ensure_fraction, ensure_greater_than_one, ensure_positive,
};
use crate::load::{self, LoadReport, LoadSpec, Mode};
use crate::progress::Progress;
use crate::workload::Workload;

/// A step that achieves less than this share of its intended rate is
/// saturated: requests are piling up (or the generator cannot keep up).
pub const MIN_THROUGHPUT_RATIO: f64 = 0.9;

/// How to sweep, and what counts as saturated.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepSpec {
    /// Names the curve in JSON and in the chart's legend.
    pub label: String,
    pub start_rate: f64,
    /// Each step's rate is the previous one's times this (> 1).
    pub step_factor: f64,
    pub max_steps: usize,
    pub step_duration: Duration,
    pub warmup: Duration,
    pub p90_bound_ms: f64,
    /// Largest acceptable share of failed requests, from 0 to 1.
    pub error_ratio_bound: f64,
}

/// One step of a sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    pub intended_rate: f64,
    pub throughput: f64,
    pub requests_ok: u64,
    pub errors: u64,
    /// `None` when no request succeeded.
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Whether this step broke a bound of the sweep's [`SweepSpec`].
    pub saturated: bool,
}

/// A throughput–latency curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Curve {
    pub label: String,
    pub points: Vec<CurvePoint>,
    /// The intended rate of the step that saturated, if one did.
    pub saturated_at: Option<f64>,
}

impl SweepSpec {
    /// Messages name the `haven bench sweep` flags.
    pub fn validate(&self) -> Result<(), BenchError> {
        ensure_positive("--start-rate", self.start_rate)?;
        ensure_greater_than_one("--step-factor", self.step_factor)?;
        ensure_at_least_one("--max-steps", self.max_steps as u64)?;
        ensure_positive("--p90-bound-ms", self.p90_bound_ms)?;
        ensure_fraction("--error-ratio-bound", self.error_ratio_bound)?;
        Ok(())
    }

    /// The intended rate of every step, in order.
    pub fn rates(&self) -> impl Iterator<Item = f64> + use<> {
        let factor = self.step_factor;
        std::iter::successors(Some(self.start_rate), move |rate| Some(rate * factor))
            .take(self.max_steps)
    }
}

impl CurvePoint {
    /// The point for a step, not yet judged (`saturated` is false).
    pub fn from_report(intended_rate: f64, report: &LoadReport) -> Self {
        let latency = report.latency.all;
        Self {
            intended_rate,
            throughput: report.throughput,
            requests_ok: report.requests_ok,
            errors: report.errors_total(),
            p50_ms: latency.map(|l| l.p50_ms),
            p90_ms: latency.map(|l| l.p90_ms),
            p99_ms: latency.map(|l| l.p99_ms),
            saturated: false,
        }
    }

    /// Failed share of all requests; 1 when nothing was attempted, since a
    /// step that completed nothing is as bad as one where everything failed.
    pub fn error_ratio(&self) -> f64 {
        let attempts = self.requests_ok + self.errors;
        if attempts == 0 {
            1.0
        } else {
            self.errors as f64 / attempts as f64
        }
    }
}

/// The stop rule: p90 above its bound (or no successful request at all), too
/// many errors, or less than [`MIN_THROUGHPUT_RATIO`] of the intended rate
/// achieved.
pub fn is_saturated(point: &CurvePoint, spec: &SweepSpec) -> bool {
    point.p90_ms.is_none_or(|p90| p90 > spec.p90_bound_ms)
        || point.error_ratio() > spec.error_ratio_bound
        || point.throughput < MIN_THROUGHPUT_RATIO * point.intended_rate
}

/// The highest throughput among the steps that were *not* saturated: the
/// load the system sustains within the bounds. Saturated steps are left out
/// because their throughput was bought with latency or errors beyond the
/// bounds. `0.0` when even the first step saturated (start lower).
pub fn saturation_throughput(curve: &Curve) -> f64 {
    curve
        .points
        .iter()
        .filter(|p| !p.saturated)
        .map(|p| p.throughput)
        .fold(0.0, f64::max)
}

/// Runs open-loop steps at increasing rates, each a fresh [`load::run`] with
/// `base`'s targets, connections and mix, until a step saturates or
/// `max_steps` have run.
pub async fn sweep(
    base: &LoadSpec,
    workload: Arc<dyn Workload>,
    spec: &SweepSpec,
    progress: &Progress,
) -> Result<Curve, BenchError> {
    spec.validate()?;
    let mut curve = Curve {
        label: spec.label.clone(),
        points: Vec::new(),
        saturated_at: None,
    };
    for (step, rate) in spec.rates().enumerate() {
        progress.set_stage(format!(
            "step {}/{} at {rate:.0} req/s: ",
            step + 1,
            spec.max_steps
        ));
        let load = LoadSpec {
            mode: Mode::Open { rate },
            duration: spec.step_duration,
            warmup: spec.warmup,
            ..base.clone()
        };
        let report = load::run(&load, Arc::clone(&workload), progress).await?;
        let mut point = CurvePoint::from_report(rate, &report);
        point.saturated = is_saturated(&point, spec);
        info!(rate, throughput = point.throughput, p90_ms = ?point.p90_ms, errors = point.errors, saturated = point.saturated, "sweep step");
        let saturated = point.saturated;
        curve.points.push(point);
        if saturated {
            curve.saturated_at = Some(rate);
            break;
        }
    }
    Ok(curve)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SweepSpec {
        SweepSpec {
            label: "test".into(),
            start_rate: 100.0,
            step_factor: 1.5,
            max_steps: 4,
            step_duration: Duration::from_secs(1),
            warmup: Duration::ZERO,
            p90_bound_ms: 50.0,
            error_ratio_bound: 0.01,
        }
    }

    fn point(intended_rate: f64, throughput: f64, p90_ms: Option<f64>, errors: u64) -> CurvePoint {
        CurvePoint {
            intended_rate,
            throughput,
            requests_ok: 1000,
            errors,
            p50_ms: p90_ms.map(|p| p / 2.0),
            p90_ms,
            p99_ms: p90_ms.map(|p| p * 2.0),
            saturated: false,
        }
    }

    #[test]
    fn rates_grow_geometrically() {
        let rates: Vec<f64> = spec().rates().collect();
        assert_eq!(rates, [100.0, 150.0, 225.0, 337.5]);
    }

    #[test]
    fn a_healthy_step_is_not_saturated() {
        assert!(!is_saturated(&point(1000.0, 995.0, Some(10.0), 0), &spec()));
        // Exactly on the bounds still passes.
        assert!(!is_saturated(
            &point(1000.0, 900.0, Some(50.0), 10),
            &spec()
        ));
    }

    #[test]
    fn each_bound_alone_saturates() {
        let spec = spec();
        assert!(
            is_saturated(&point(1000.0, 995.0, Some(50.1), 0), &spec),
            "p90"
        );
        assert!(
            is_saturated(&point(1000.0, 995.0, Some(10.0), 11), &spec),
            "errors"
        );
        assert!(
            is_saturated(&point(1000.0, 899.0, Some(10.0), 0), &spec),
            "throughput"
        );
        assert!(
            is_saturated(&point(1000.0, 995.0, None, 0), &spec),
            "no latency"
        );
    }

    #[test]
    fn error_ratio_of_nothing_is_total_failure() {
        let mut nothing = point(10.0, 0.0, None, 0);
        nothing.requests_ok = 0;
        assert_eq!(nothing.error_ratio(), 1.0);
        assert_eq!(point(10.0, 10.0, None, 1000).error_ratio(), 0.5);
    }

    #[test]
    fn saturation_throughput_ignores_saturated_steps() {
        let mut saturated = point(400.0, 380.0, Some(90.0), 0);
        saturated.saturated = true;
        let curve = Curve {
            label: "x".into(),
            points: vec![
                point(100.0, 99.0, Some(1.0), 0),
                point(200.0, 198.0, Some(2.0), 0),
                saturated,
            ],
            saturated_at: Some(400.0),
        };
        assert_eq!(saturation_throughput(&curve), 198.0);
        let none = Curve {
            points: vec![curve.points[2].clone()],
            ..curve
        };
        assert_eq!(saturation_throughput(&none), 0.0);
    }

    #[test]
    fn validation_names_the_flags() {
        let message = |s: SweepSpec| s.validate().map_err(|e| e.to_string());
        assert_eq!(message(spec()), Ok(()));
        assert_eq!(
            message(SweepSpec {
                step_factor: 1.0,
                ..spec()
            }),
            Err("--step-factor must be greater than 1, got 1".into())
        );
        assert_eq!(
            message(SweepSpec {
                max_steps: 0,
                ..spec()
            }),
            Err("--max-steps must be at least 1, got 0".into())
        );
        assert_eq!(
            message(SweepSpec {
                error_ratio_bound: 1.5,
                ..spec()
            }),
            Err("--error-ratio-bound must be between 0 and 1, got 1.5".into())
        );
    }
}
