//! CPU time of processes, to report what each request costs.
//!
//! Throughput alone favours whichever system burns more CPU; CPU time per
//! request shows efficiency, and on a shared machine it is the honest measure.
//! Sample [`total_cpu`] of the system's processes before and after a run, and
//! divide the difference by the requests served ([`cpu_us_per_request`]).
//! Linux only: the times come from `/proc/{pid}/stat`.

use std::fs;
use std::io;
use std::time::Duration;

use crate::BenchError;

/// User plus system CPU time the process `pid` has used so far (its threads
/// included, its children not).
pub fn process_cpu(pid: u32) -> Result<Duration, BenchError> {
    let stat = read_proc(pid, "stat")?;
    let ticks = cpu_ticks(&stat).ok_or(BenchError::ProcFormat { pid })?;
    Ok(ticks_to_duration(
        ticks,
        rustix::param::clock_ticks_per_second(),
    ))
}

fn read_proc(pid: u32, file: &str) -> Result<String, BenchError> {
    fs::read_to_string(format!("/proc/{pid}/{file}")).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            BenchError::NoProcess { pid }
        } else {
            BenchError::ProcRead { pid, source }
        }
    })
}

/// Sum of [`process_cpu`] over `pids`; fails if any of them does.
pub fn total_cpu(pids: &[u32]) -> Result<Duration, BenchError> {
    pids.iter()
        .try_fold(Duration::ZERO, |sum, &pid| Ok(sum + process_cpu(pid)?))
}

/// Largest resident set the process `pid` has had (`VmHWM`), in bytes: the
/// memory figure that matters for sizing, since a sample at the end of a run
/// can miss the peak.
pub fn peak_rss_bytes(pid: u32) -> Result<u64, BenchError> {
    let status = read_proc(pid, "status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or(BenchError::ProcFormat { pid })
}

/// Microseconds of CPU per request; `None` when no request was served.
pub fn cpu_us_per_request(cpu: Duration, requests: u64) -> Option<f64> {
    (requests > 0).then(|| cpu.as_secs_f64() * 1e6 / requests as f64)
}

/// utime + stime, fields 14 and 15 of `/proc/{pid}/stat`, in clock ticks.
/// Fields are counted after the last `)`, because the command name in field 2
/// is parenthesised and may itself contain spaces and parentheses.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let (_, after_name) = stat.rsplit_once(')')?;
    // After the name come field 3 (state) onwards, so utime is the 12th.
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

/// Clock ticks are `sysconf(_SC_CLK_TCK)` per second (100 on mainstream Linux,
/// but asked rather than assumed).
fn ticks_to_duration(ticks: u64, per_second: u64) -> Duration {
    let per_second = per_second.max(1);
    let fraction = Duration::from_secs(ticks % per_second) / per_second as u32;
    Duration::from_secs(ticks / per_second) + fraction
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hint::black_box;
    use std::time::Instant;

    #[test]
    fn peak_rss_of_this_process_is_plausible() {
        let rss = peak_rss_bytes(std::process::id()).unwrap();
        assert!(rss > 1024 * 1024 && rss < 4 * 1024 * 1024 * 1024, "{rss}");
    }

    #[test]
    fn parses_utime_and_stime_after_an_awkward_name() {
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 1 0 5 1000 10";
        assert_eq!(cpu_ticks(stat), Some(325));
        assert_eq!(cpu_ticks("42 (truncated) S 1 2"), None);
        assert_eq!(cpu_ticks("no parenthesis"), None);
    }

    #[test]
    fn ticks_convert_exactly() {
        assert_eq!(ticks_to_duration(250, 100), Duration::from_millis(2500));
        assert_eq!(ticks_to_duration(1, 3), Duration::from_nanos(333_333_333));
        assert_eq!(ticks_to_duration(7, 0), Duration::from_secs(7));
    }

    #[test]
    fn own_process_uses_cpu_after_burning_some() {
        let started = Instant::now();
        let mut x = 0u64;
        while started.elapsed() < Duration::from_millis(100) {
            x = black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let pid = std::process::id();
        let own = process_cpu(pid).expect("own /proc entry");
        assert!(own > Duration::ZERO, "{own:?}");
        assert!(total_cpu(&[pid, pid]).expect("twice") >= own * 2);
    }

    #[test]
    fn missing_process_is_named() {
        // Above the kernel's pid_max (at most 2^22), so never a live process.
        let pid = u32::MAX;
        let message = process_cpu(pid).map_err(|e| e.to_string());
        assert_eq!(
            message,
            Err("no process 4294967295: /proc/4294967295/stat does not exist".into())
        );
        assert!(total_cpu(&[std::process::id(), pid]).is_err());
    }

    #[test]
    fn per_request_cost() {
        assert_eq!(
            cpu_us_per_request(Duration::from_millis(5), 1000),
            Some(5.0)
        );
        assert_eq!(cpu_us_per_request(Duration::from_millis(5), 0), None);
    }
}
