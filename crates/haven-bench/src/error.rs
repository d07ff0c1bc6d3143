//! The crate's one error type, and the range checks that produce its
//! [`BenchError::Invalid`] messages.
//!
//! Range checks live here, written once, so that every setting is rejected with
//! the same wording: `NAME must be …, got VALUE`. The names passed in are the
//! `haven bench` flags, since the flags are how people set these values.

use std::io;
use std::path::PathBuf;

/// Everything that can stop a benchmark. Failed *requests* are not errors:
/// they are measurements, counted in the report.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A setting is out of range; the message names the flag, the allowed
    /// range and the value given.
    #[error("{0}")]
    Invalid(String),
    #[error("invalid target URL '{url}': {reason}")]
    Target { url: String, reason: &'static str },
    #[error("the workload built an invalid request path '{path}': {source}")]
    RequestPath {
        path: String,
        source: http::uri::InvalidUri,
    },
    #[error("a load worker stopped abnormally: {0}")]
    Worker(#[from] tokio::task::JoinError),
    #[error("cannot merge latency histograms: {0}")]
    Histogram(#[from] hdrhistogram::errors::AdditionError),
    #[error("cannot draw chart {path}: {reason}")]
    Chart { path: PathBuf, reason: String },
    #[error("no process {pid}: /proc/{pid}/stat does not exist")]
    NoProcess { pid: u32 },
    #[error("cannot read /proc/{pid}/stat: {source}")]
    ProcRead { pid: u32, source: io::Error },
    #[error("unexpected format of /proc/{pid}/stat: no utime and stime fields")]
    ProcFormat { pid: u32 },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot encode the results as JSON: {0}")]
    Json(#[from] serde_json::Error),
}

fn invalid(message: String) -> BenchError {
    BenchError::Invalid(message)
}

/// Rejects zero, negatives, NaN and infinity: rates and bounds of those kinds
/// would divide by zero or never trigger.
pub(crate) fn ensure_positive(name: &str, value: f64) -> Result<f64, BenchError> {
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(invalid(format!("{name} must be positive, got {value}")))
    }
}

pub(crate) fn ensure_fraction(name: &str, value: f64) -> Result<f64, BenchError> {
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(invalid(format!(
            "{name} must be between 0 and 1, got {value}"
        )))
    }
}

pub(crate) fn ensure_at_least_one(name: &str, value: u64) -> Result<u64, BenchError> {
    if value >= 1 {
        Ok(value)
    } else {
        Err(invalid(format!("{name} must be at least 1, got {value}")))
    }
}

pub(crate) fn ensure_greater_than_one(name: &str, value: f64) -> Result<f64, BenchError> {
    if value.is_finite() && value > 1.0 {
        Ok(value)
    } else {
        Err(invalid(format!(
            "{name} must be greater than 1, got {value}"
        )))
    }
}

pub(crate) fn ensure_non_negative(name: &str, value: f64) -> Result<f64, BenchError> {
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(invalid(format!("{name} must not be negative, got {value}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_setting_and_the_value() {
        let cases = [
            (
                ensure_positive("--rate", 0.0).err(),
                "--rate must be positive, got 0",
            ),
            (
                ensure_positive("--rate", f64::NAN).err(),
                "--rate must be positive, got NaN",
            ),
            (
                ensure_fraction("--read-ratio", -0.5).err(),
                "--read-ratio must be between 0 and 1, got -0.5",
            ),
            (
                ensure_at_least_one("--keys", 0).err(),
                "--keys must be at least 1, got 0",
            ),
            (
                ensure_greater_than_one("--step-factor", 1.0).err(),
                "--step-factor must be greater than 1, got 1",
            ),
            (
                ensure_non_negative("--warmup", -1.0).err(),
                "--warmup must not be negative, got -1",
            ),
        ];
        for (error, expected) in cases {
            assert_eq!(error.map(|e| e.to_string()).as_deref(), Some(expected));
        }
    }

    #[test]
    fn values_in_range_pass_through() {
        assert_eq!(ensure_positive("x", 2.5).ok(), Some(2.5));
        assert_eq!(ensure_fraction("x", 1.0).ok(), Some(1.0));
        assert_eq!(ensure_fraction("x", 0.0).ok(), Some(0.0));
        assert_eq!(ensure_at_least_one("x", 3).ok(), Some(3));
        assert_eq!(ensure_greater_than_one("x", 1.5).ok(), Some(1.5));
        assert_eq!(ensure_non_negative("x", 0.0).ok(), Some(0.0));
    }
}
