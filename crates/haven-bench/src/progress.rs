//! The live progress line on stderr, or nothing at all.
//!
//! A benchmark that runs for minutes should show it is alive, but its output
//! (text or JSON on stdout) must stay clean, and tests must draw nothing. So
//! progress is a value the caller chooses: [`Progress::stderr`] draws a spinner
//! line about four times a second, [`Progress::hidden`] spawns no task and
//! draws nothing. Workers only bump two shared atomic counters; the drawing
//! task reads them, so the hot path never waits on the terminal.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;
use tokio::time::Instant;

const REFRESH: Duration = Duration::from_millis(250);

/// Where (and whether) progress is drawn. Cloning shares the same line.
#[derive(Debug, Clone)]
pub struct Progress {
    bar: Option<ProgressBar>,
}

/// Totals since the start of a run, warmup included, for display only (the
/// report counts from the workers' own tallies).
#[derive(Debug, Default)]
pub(crate) struct LiveCounters {
    pub(crate) ok: AtomicU64,
    pub(crate) errors: AtomicU64,
}

impl Progress {
    pub fn hidden() -> Self {
        Self { bar: None }
    }

    /// A spinner line on stderr. indicatif draws nothing when stderr is not a
    /// terminal, so redirected output stays clean too.
    pub fn stderr() -> Self {
        let style = ProgressStyle::with_template("{spinner} {prefix}{msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let target = ProgressDrawTarget::stderr_with_hz(4);
        let bar = ProgressBar::with_draw_target(None, target).with_style(style);
        Self { bar: Some(bar) }
    }

    pub fn is_hidden(&self) -> bool {
        self.bar.is_none()
    }

    /// Text shown before the counters, such as the current sweep step.
    pub fn set_stage(&self, stage: impl Into<Cow<'static, str>>) {
        if let Some(bar) = &self.bar {
            bar.set_prefix(stage);
        }
    }

    /// Removes the line, so that a report printed afterwards starts on a clean
    /// terminal line.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    /// Starts redrawing from `live` until the returned task is aborted; `None`
    /// (no task at all) when hidden.
    pub(crate) fn watch(
        &self,
        live: Arc<LiveCounters>,
        start: Instant,
        warmup: Duration,
    ) -> Option<JoinHandle<()>> {
        let bar = self.bar.clone()?;
        Some(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(REFRESH);
            let mut previous = (start, 0);
            loop {
                let now = ticks.tick().await;
                let ok = live.ok.load(Ordering::Relaxed);
                let errors = live.errors.load(Ordering::Relaxed);
                let rate = per_second(ok.saturating_sub(previous.1), now - previous.0);
                let phase = if now - start < warmup {
                    "warming up "
                } else {
                    ""
                };
                let elapsed = (now - start).as_secs_f64();
                bar.set_message(format!(
                    "{phase}{elapsed:.1}s  {ok} ok  {rate:.0} req/s  {errors} errors"
                ));
                bar.tick();
                previous = (now, ok);
            }
        }))
    }
}

fn per_second(count: u64, over: Duration) -> f64 {
    if over.is_zero() {
        0.0
    } else {
        count as f64 / over.as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hidden_progress_spawns_nothing() {
        let progress = Progress::hidden();
        assert!(progress.is_hidden());
        let live = Arc::new(LiveCounters::default());
        assert!(
            progress
                .watch(live, Instant::now(), Duration::ZERO)
                .is_none()
        );
        progress.set_stage("ignored");
        progress.finish();
    }

    #[test]
    fn rate_over_an_empty_interval_is_zero() {
        assert_eq!(per_second(10, Duration::ZERO), 0.0);
        assert_eq!(per_second(10, Duration::from_millis(250)), 40.0);
    }
}
