//! Results for people: a short text summary of one run, and the Markdown table
//! that compares scenarios side by side (as pasted into the README).

use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::histogram::LatencySummary;
use crate::load::{LoadReport, format_rate};
use crate::sweep::MIN_THROUGHPUT_RATIO;

/// One line of the comparison table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScenarioRow {
    /// What ran, such as `haven, 3 nodes`.
    pub scenario: String,
    /// The request mix, such as `POST 100%`, `50/50` or `GET 100%`.
    pub workload: String,
    pub throughput: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    /// `None` when CPU was not measured (for example, a remote system).
    pub cpu_us_per_request: Option<f64>,
    pub errors: u64,
    /// p90 latency with the load at half the measured throughput, where a
    /// system's added latency shows without queueing; `None` if not measured.
    pub p90_half_load_ms: Option<f64>,
}

/// A GitHub-flavoured Markdown table, numbers right-aligned: throughput and
/// CPU as whole numbers, latencies to 0.01 ms, and `n/a` for CPU not measured.
pub fn markdown_table(rows: &[ScenarioRow]) -> String {
    let mut table = String::from(
        "| Scenario | Workload | Throughput (req/s) | p50 (ms) | p90 (ms) | p99 (ms) | p90 at half load (ms) | CPU (µs/req) | Errors |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in rows {
        let cpu = row
            .cpu_us_per_request
            .map_or_else(|| "n/a".to_owned(), |cpu| format!("{cpu:.0}"));
        let half = row
            .p90_half_load_ms
            .map_or_else(|| "n/a".to_owned(), |ms| format!("{ms:.2}"));
        // Writing to a String cannot fail.
        let _ = writeln!(
            table,
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {half} | {cpu} | {} |",
            cell(&row.scenario),
            cell(&row.workload),
            row.throughput,
            row.p50_ms,
            row.p90_ms,
            row.p99_ms,
            row.errors,
        );
    }
    table
}

/// A `|` inside a cell would end the cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

/// A few lines summarising one run: throughput, latency percentiles (all
/// requests, then reads and writes where there were any), errors, and for an
/// open loop how late requests went out, with a warning when the intended
/// rate was not reached.
pub fn render_text(report: &LoadReport) -> String {
    let mut text = format!(
        "{}; {:.0}% reads\nthroughput  {:.1} req/s ({} ok in {:.2} s)\n",
        report.mode,
        report.read_ratio * 100.0,
        report.throughput,
        report.requests_ok,
        report.duration_s,
    );
    text += &latency_line("latency", report.latency.all.as_ref());
    for (label, summary) in [
        ("  reads", &report.latency.reads),
        ("  writes", &report.latency.writes),
    ] {
        if let Some(summary) = summary {
            text += &latency_line(label, Some(summary));
        }
    }
    text += &format!("errors      {}\n", errors_text(report));
    if let Some(lag) = report.max_schedule_lag_ms {
        text += &format!("schedule    requests went out up to {lag:.1} ms late\n");
    }
    if let Some(rate) = report
        .intended_rate
        .filter(|rate| report.throughput < MIN_THROUGHPUT_RATIO * rate)
    {
        text += &format!(
            "warning: only {:.0}% of the intended {} req/s was achieved: the system (or the generator) could not keep up\n",
            report.throughput / rate * 100.0,
            format_rate(rate),
        );
    }
    text
}

fn latency_line(label: &str, summary: Option<&LatencySummary>) -> String {
    match summary {
        Some(s) => format!(
            "{label:<11} p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3} ms\n",
            s.p50_ms, s.p90_ms, s.p99_ms, s.p999_ms, s.max_ms, s.mean_ms
        ),
        None => format!("{label:<11} no successful requests\n"),
    }
}

fn errors_text(report: &LoadReport) -> String {
    if report.errors.is_empty() {
        return "none".to_owned();
    }
    let kinds: Vec<String> = report
        .errors
        .iter()
        .map(|(kind, count)| format!("{kind} {count}"))
        .collect();
    kinds.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::Latencies;

    fn row(scenario: &str, workload: &str, cpu: Option<f64>) -> ScenarioRow {
        ScenarioRow {
            scenario: scenario.into(),
            workload: workload.into(),
            throughput: 1234.56,
            p50_ms: 1.234,
            p90_ms: 2.5,
            p99_ms: 10.0,
            cpu_us_per_request: cpu,
            errors: 3,
            p90_half_load_ms: cpu.map(|_| 0.75),
        }
    }

    #[test]
    fn markdown_table_exact() {
        let rows = [
            row("haven, 3 nodes", "POST 100%", Some(812.4)),
            row("etcd | 3 nodes", "50/50", None),
        ];
        assert_eq!(
            markdown_table(&rows),
            "| Scenario | Workload | Throughput (req/s) | p50 (ms) | p90 (ms) | p99 (ms) | p90 at half load (ms) | CPU (µs/req) | Errors |\n\
             |---|---|---:|---:|---:|---:|---:|---:|---:|\n\
             | haven, 3 nodes | POST 100% | 1235 | 1.23 | 2.50 | 10.00 | 0.75 | 812 | 3 |\n\
             | etcd \\| 3 nodes | 50/50 | 1235 | 1.23 | 2.50 | 10.00 | n/a | n/a | 3 |\n"
        );
    }

    fn summary(scale: f64) -> LatencySummary {
        LatencySummary {
            p50_ms: scale,
            p90_ms: 2.0 * scale,
            p99_ms: 3.0 * scale,
            p999_ms: 4.0 * scale,
            max_ms: 5.0 * scale,
            mean_ms: 1.5 * scale,
            count: 10,
        }
    }

    fn open_report() -> LoadReport {
        LoadReport {
            mode: "open loop, 500 req/s over 16 connections".into(),
            intended_rate: Some(500.0),
            connections: 16,
            read_ratio: 0.5,
            duration_s: 10.0,
            requests_ok: 4000,
            throughput: 400.0,
            errors: [("connect".to_owned(), 2), ("timeout".to_owned(), 1)].into(),
            latency: Latencies {
                all: Some(summary(1.0)),
                reads: Some(summary(0.5)),
                writes: None,
            },
            max_schedule_lag_ms: Some(123.45),
        }
    }

    #[test]
    fn text_summary_of_a_struggling_open_loop() {
        assert_eq!(
            render_text(&open_report()),
            "open loop, 500 req/s over 16 connections; 50% reads\n\
             throughput  400.0 req/s (4000 ok in 10.00 s)\n\
             latency     p50 1.000  p90 2.000  p99 3.000  p99.9 4.000  max 5.000  mean 1.500 ms\n\
             \x20 reads     p50 0.500  p90 1.000  p99 1.500  p99.9 2.000  max 2.500  mean 0.750 ms\n\
             errors      connect 2, timeout 1\n\
             schedule    requests went out up to 123.5 ms late\n\
             warning: only 80% of the intended 500 req/s was achieved: the system (or the generator) could not keep up\n"
        );
    }

    #[test]
    fn text_summary_of_a_failed_closed_loop() {
        let report = LoadReport {
            mode: "closed loop, 4 connections back-to-back".into(),
            intended_rate: None,
            read_ratio: 0.0,
            requests_ok: 0,
            throughput: 0.0,
            errors: [("connect".to_owned(), 7)].into(),
            latency: Latencies {
                all: None,
                reads: None,
                writes: None,
            },
            max_schedule_lag_ms: None,
            ..open_report()
        };
        assert_eq!(
            render_text(&report),
            "closed loop, 4 connections back-to-back; 0% reads\n\
             throughput  0.0 req/s (0 ok in 10.00 s)\n\
             latency     no successful requests\n\
             errors      connect 7\n"
        );
    }

    #[test]
    fn rows_round_trip_through_json() {
        let original = row("a", "GET 100%", Some(1.0));
        let json = serde_json::to_string(&original).expect("serialize");
        assert_eq!(
            serde_json::from_str::<ScenarioRow>(&json).expect("parse"),
            original
        );
    }
}
