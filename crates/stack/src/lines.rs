//! A process's stdout, line by line: where `fleetgrid serve` and `fleetgrid
//! cloud serve` announce their addresses, and `fleetgrid demo` its keys.
//!
//! A thread of its own reads the pipe to its end, so that the child never
//! blocks on a full pipe nor fails writing to a closed one, whether or not
//! anyone reads the lines.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::ChildStdout;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use crate::process::{log_tail, ExitCell};
use crate::StackError;

/// Lines kept for a reader that has not read them yet; more are dropped
/// rather than stalling the child. Every line a fleetgrid process prints
/// before anyone reads (an announcement, the demo's instructions) fits.
const LINES_BUFFERED_MAX: usize = 256;

/// How long a process whose stdout closed has to be seen exiting, for the
/// error to carry its exit status.
const EXIT_AFTER_CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The lines of one process's stdout.
pub struct Lines {
    name: String,
    receiver: Receiver<String>,
    exit: Arc<ExitCell>,
    log: PathBuf,
}

impl Lines {
    pub(crate) fn read(
        name: &str,
        stdout: ChildStdout,
        exit: Arc<ExitCell>,
        log: PathBuf,
    ) -> Lines {
        let (sender, receiver) = sync_channel(LINES_BUFFERED_MAX);
        let reader = move || {
            let mut open = true;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if open {
                    match sender.try_send(line) {
                        Ok(()) | Err(TrySendError::Full(_)) => {}
                        // Nobody reads any more; the rest is drained unread.
                        Err(TrySendError::Disconnected(_)) => open = false,
                    }
                }
            }
        };
        // Without the thread nobody reads the pipe; the child then sees it closed.
        let _ = std::thread::Builder::new()
            .name(format!("stdout-{name}"))
            .spawn(reader);
        Lines {
            name: name.to_owned(),
            receiver,
            exit,
            log,
        }
    }

    /// The next line; `None` once stdout has closed (the process is ending).
    pub fn next_blocking(&mut self, timeout: Duration) -> Result<Option<String>, StackError> {
        match self.receiver.recv_timeout(timeout) {
            Ok(line) => Ok(Some(line)),
            Err(RecvTimeoutError::Disconnected) => Ok(None),
            Err(RecvTimeoutError::Timeout) => Err(StackError::Timeout {
                what: format!("{} printed no line", self.name),
                waited: timeout,
            }),
        }
    }

    /// The first line that `accept` accepts, skipping none: the first line
    /// of all must be the one. An error if the process exits first.
    pub fn first_blocking<T>(
        mut self,
        timeout: Duration,
        accept: impl FnOnce(&str) -> Option<T>,
    ) -> Result<T, StackError> {
        let Some(line) = self.next_blocking(timeout)? else {
            let exit = self.exit.wait_blocking(EXIT_AFTER_CLOSE_WAIT);
            return Err(StackError::Exited {
                name: self.name.clone(),
                exit: exit.map_or_else(|| "closed its output".to_owned(), |exit| exit.to_string()),
                log_tail: log_tail(&self.log),
            });
        };
        accept(&line).ok_or(StackError::Announcement {
            name: self.name,
            line,
        })
    }
}
