//! The cluster benchmark's arithmetic and readings: nearest-rank
//! percentiles, a process's CPU time and resident memory from `/proc`, and
//! the deltas between two readings.

use std::time::Duration;

/// Clock ticks per second of `/proc/<pid>/stat`'s times: the kernel's
/// `USER_HZ`, 100 in its user-space interface on x86-64 and AArch64.
const USER_HZ: u64 = 100;

/// `utime` and `stime` are the 14th and 15th fields of `/proc/<pid>/stat`;
/// counted after the command name's closing parenthesis (which may itself
/// hold spaces) they are the 12th and 13th.
const UTIME_FIELD_AFTER_NAME: usize = 11;

/// The value at `fraction` of `sorted` by the nearest rank; 0 for none.
pub fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (fraction * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// p50, p95, p99 and the largest of `values`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Summary {
    pub count: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(values: &[f64]) -> Summary {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Summary {
            count: sorted.len(),
            p50: percentile(&sorted, 0.50),
            p95: percentile(&sorted, 0.95),
            p99: percentile(&sorted, 0.99),
            max: sorted.last().copied().unwrap_or(0.0),
        }
    }
}

/// One reading of a process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub rss_bytes: u64,
    /// User plus system time of every thread, at 10 ms resolution.
    pub cpu: Duration,
}

/// Reads process `pid` now; `None` once it is gone.
pub fn usage(pid: u32) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(Usage {
        rss_bytes: rss_bytes(&status)?,
        cpu: cpu_time(&stat)?,
    })
}

/// CPU time of several processes together (those gone count nothing).
pub fn cpu_of(pids: &[u32]) -> Duration {
    pids.iter()
        .filter_map(|pid| usage(*pid))
        .map(|usage| usage.cpu)
        .sum()
}

/// `VmRSS:   123456 kB` from `/proc/<pid>/status`.
fn rss_bytes(status: &str) -> Option<u64> {
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?;
    let kib: u64 = line.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// `utime + stime` from `/proc/<pid>/stat`.
fn cpu_time(stat: &str) -> Option<Duration> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(UTIME_FIELD_AFTER_NAME);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let ticks = utime.saturating_add(stime);
    Some(Duration::from_millis(ticks.saturating_mul(1000 / USER_HZ)))
}

/// Open file descriptors of process `pid` (0 if it cannot be read).
pub fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |entries| entries.count())
}

/// The processes whose command line has one of `arguments` as an argument.
pub fn pids_with_argument(arguments: &[String]) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let found = cmdline
            .split(|byte| *byte == 0)
            .any(|argument| arguments.iter().any(|wanted| wanted.as_bytes() == argument));
        if found {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    pids
}

/// CPU seconds per second of wall time spent between two readings.
pub fn cpu_share(before: Duration, after: Duration, wall: Duration) -> f64 {
    after.saturating_sub(before).as_secs_f64() / wall.as_secs_f64().max(f64::EPSILON)
}

/// PostgreSQL's counts of a database's writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatabaseWrites {
    pub commits: u64,
    /// Rows inserted, updated or deleted.
    pub rows: u64,
}

impl DatabaseWrites {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &DatabaseWrites) -> DatabaseWrites {
        DatabaseWrites {
            commits: self.commits.saturating_sub(earlier.commits),
            rows: self.rows.saturating_sub(earlier.rows),
        }
    }
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let values: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.5), 10.0);
        assert_eq!(percentile(&values, 0.95), 19.0);
        assert_eq!(percentile(&values, 0.99), 20.0);
        assert_eq!(percentile(&[7.0], 0.95), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn a_summary_sorts_before_it_ranks() {
        let summary = Summary::of(&[5.0, 1.0, 4.0, 2.0, 3.0]);
        assert_eq!(summary.count, 5);
        assert_eq!(summary.p50, 3.0);
        assert_eq!(summary.max, 5.0);
    }

    #[test]
    fn cpu_time_is_utime_plus_stime_after_a_name_with_spaces() {
        let stat = "4242 (tokio rt) S 1 4242 4242 0 -1 4194560 500 0 0 0 \
                    250 125 0 0 20 0 8 0 100 1000000 2000 18446744073709551615";
        assert_eq!(cpu_time(stat), Some(Duration::from_millis(3_750)));
        assert_eq!(cpu_time("no parenthesis"), None);
    }

    #[test]
    fn rss_is_read_in_kibibytes() {
        let status = "Name:\tcell\nVmRSS:\t   2048 kB\nThreads:\t8\n";
        assert_eq!(rss_bytes(status), Some(2 * 1024 * 1024));
        assert_eq!(rss_bytes("Name:\tcell\n"), None);
    }

    #[test]
    fn cpu_share_is_cpu_seconds_per_wall_second() {
        let share = cpu_share(
            Duration::from_secs(10),
            Duration::from_secs(13),
            Duration::from_secs(2),
        );
        assert!((share - 1.5).abs() < 1e-9);
        assert_eq!(
            cpu_share(
                Duration::from_secs(5),
                Duration::from_secs(4),
                Duration::from_secs(1)
            ),
            0.0
        );
    }

    #[test]
    fn database_writes_subtract_without_wrapping() {
        let later = DatabaseWrites {
            commits: 10,
            rows: 30,
        };
        let earlier = DatabaseWrites {
            commits: 4,
            rows: 40,
        };
        assert_eq!(
            later.since(&earlier),
            DatabaseWrites {
                commits: 6,
                rows: 0
            }
        );
    }

    #[test]
    fn this_process_can_be_read() {
        let usage = usage(std::process::id()).expect("read /proc/self");
        assert!(usage.rss_bytes > 0);
        assert!(open_files(std::process::id()) > 0);
    }
}
