//! This process's resident memory and CPU time, from `/proc/self` (Linux).

use std::time::Duration;

use crate::LoadError;

/// Clock ticks per second of `/proc/<pid>/stat`'s times: the kernel's `USER_HZ`, fixed at 100 in
/// its user-space interface on the architectures fleetgrid runs on (x86-64, AArch64).
const USER_HZ: u64 = 100;

/// `utime` and `stime` are the 14th and 15th fields of `/proc/<pid>/stat`; counted after the
/// command name's closing parenthesis (which may itself hold spaces) they are the 12th and 13th.
const UTIME_FIELD_AFTER_NAME: usize = 11;

/// One reading of this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// Resident set size (`VmRSS`).
    pub rss_bytes: u64,
    /// User plus system CPU time of every thread, at `USER_HZ` resolution (10 ms).
    pub cpu: Duration,
}

/// Reads this process's usage now.
pub fn current() -> Result<Usage, LoadError> {
    let status = read("/proc/self/status")?;
    let stat = read("/proc/self/stat")?;
    Ok(Usage {
        rss_bytes: rss_bytes(&status)?,
        cpu: cpu_time(&stat)?,
    })
}

fn read(path: &str) -> Result<String, LoadError> {
    std::fs::read_to_string(path).map_err(|error| LoadError::Usage(format!("{path}: {error}")))
}

/// `VmRSS:   123456 kB` from `/proc/<pid>/status`.
fn rss_bytes(status: &str) -> Result<u64, LoadError> {
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .ok_or_else(|| LoadError::Usage("no VmRSS in /proc/self/status".to_owned()))?;
    let kib = line
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .map_err(|error| LoadError::Usage(format!("VmRSS {line:?}: {error}")))?;
    Ok(kib.saturating_mul(1024))
}

fn cpu_time(stat: &str) -> Result<Duration, LoadError> {
    let after_name = stat
        .rfind(')')
        .map(|end| &stat[end + 1..])
        .ok_or_else(|| LoadError::Usage("malformed /proc/self/stat".to_owned()))?;
    let mut fields = after_name.split_whitespace().skip(UTIME_FIELD_AFTER_NAME);
    let mut ticks = 0_u64;
    for name in ["utime", "stime"] {
        let value = fields
            .next()
            .and_then(|field| field.parse::<u64>().ok())
            .ok_or_else(|| LoadError::Usage(format!("no {name} in /proc/self/stat")))?;
        ticks = ticks.saturating_add(value);
    }
    Ok(Duration::from_millis(ticks.saturating_mul(1000 / USER_HZ)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rss_from_status() {
        let status = "Name:\tx\nVmPeak:\t  999 kB\nVmRSS:\t    2048 kB\nThreads:\t4\n";
        assert_eq!(rss_bytes(status).expect("rss"), 2048 * 1024);
        assert!(rss_bytes("Name:\tx\n").is_err());
    }

    #[test]
    fn reads_user_and_system_time_after_a_name_with_spaces() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
        let stat = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0";
        assert_eq!(cpu_time(stat).expect("cpu"), Duration::from_secs(3));
    }

    #[test]
    fn this_process_has_memory_and_its_cpu_time_grows_while_it_computes() {
        let before = current().expect("usage");
        assert!(before.rss_bytes > 0);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut x = 0_u64;
        loop {
            for _ in 0..1_000_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
            std::hint::black_box(x);
            if current().expect("usage").cpu > before.cpu {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "cpu time never grew");
        }
    }
}
