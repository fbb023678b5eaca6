//! One child process in its own process group: started with its stderr in a
//! log file, its exit observed by a thread of its own as it happens, stopped
//! with SIGTERM to the group, a bounded grace and SIGKILL.
//!
//! Its own process group means two things: a Ctrl-C in a terminal reaches
//! only the process that started it (which then stops its children itself),
//! and a stop reaches everything the child started.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

use crate::lines::Lines;
use crate::StackError;

/// How long a process gets to stop after SIGTERM before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// How long a process killed with SIGKILL may take to be reaped; only a
/// process stuck in the kernel takes longer, and it is then left to the OS.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// How much of a log goes into an error: enough for the message that
/// explains a failure, small enough for a terminal.
const LOG_TAIL_BYTES_MAX: u64 = 4_000;

/// Where a process's stderr goes: a file created afresh, or appended to (so
/// that a process started again keeps one log).
#[derive(Clone, Debug)]
pub struct LogFile {
    path: PathBuf,
    append: bool,
}

impl LogFile {
    pub fn create(path: impl Into<PathBuf>) -> LogFile {
        LogFile {
            path: path.into(),
            append: false,
        }
    }

    pub fn append(path: impl Into<PathBuf>) -> LogFile {
        LogFile {
            path: path.into(),
            append: true,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open(&self) -> Result<File, StackError> {
        std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(self.append)
            .truncate(!self.append)
            .open(&self.path)
            .map_err(|source| StackError::Log {
                path: self.path.clone(),
                source,
            })
    }
}

/// What becomes of a process's stdout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stdout {
    /// Discarded.
    Null,
    /// Into the log, after stderr's lines as they come.
    Log,
    /// Read line by line ([`Process::lines`]); announcements come this way.
    Lines,
}

/// How a process ended: its status, or why it could not be had.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exit(Result<ExitStatus, String>);

impl Exit {
    pub fn success(&self) -> bool {
        self.0.as_ref().is_ok_and(ExitStatus::success)
    }

    pub fn status(&self) -> Option<ExitStatus> {
        self.0.as_ref().ok().copied()
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Ok(status) => write!(f, "{status}"),
            Err(reason) => write!(f, "status unknown: {reason}"),
        }
    }
}

/// A process's exit, set once by the thread (or task) that waits for it.
#[derive(Default)]
pub(crate) struct ExitCell {
    // No `.await` happens under this lock.
    exit: Mutex<Option<Exit>>,
    changed: Condvar,
    notify: tokio::sync::Notify,
}

impl ExitCell {
    fn set(&self, exit: Exit) {
        *self
            .exit
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = Some(exit);
        self.changed.notify_all();
        self.notify.notify_waiters();
    }

    pub(crate) fn get(&self) -> Option<Exit> {
        self.exit
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }

    pub(crate) fn wait_blocking(&self, timeout: Duration) -> Option<Exit> {
        let guard = self
            .exit
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |exit| exit.is_none())
            .unwrap_or_else(|poison| poison.into_inner());
        guard.clone()
    }

    async fn wait(&self) -> Exit {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so that an exit in between is not missed.
            notified.as_mut().enable();
            if let Some(exit) = self.get() {
                return exit;
            }
            notified.await;
        }
    }
}

/// A child process, stopped when dropped.
pub struct Process {
    /// What logs and errors call it: `coordinator`, a node id.
    pub name: String,
    pid: u32,
    exit: Arc<ExitCell>,
    // Behind a lock only so that a `Process` may be shared (a test's one
    // local cloud for all its tests); it is taken once, through `&mut self`.
    lines: Mutex<Option<Lines>>,
    log: PathBuf,
    grace: Duration,
}

impl Process {
    /// Starts `command` in a process group of its own, with no stdin and its
    /// stderr in `log`.
    pub fn spawn(
        name: impl Into<String>,
        mut command: Command,
        log: &LogFile,
        stdout: Stdout,
    ) -> Result<Process, StackError> {
        let name = name.into();
        let stderr = log.open()?;
        let stdout_to = match stdout {
            Stdout::Null => Stdio::null(),
            Stdout::Lines => Stdio::piped(),
            Stdout::Log => Stdio::from(stderr.try_clone().map_err(|source| StackError::Log {
                path: log.path.clone(),
                source,
            })?),
        };
        let mut child = command
            .stdin(Stdio::null())
            .stdout(stdout_to)
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .map_err(|source| StackError::Spawn {
                name: name.clone(),
                source,
            })?;
        let exit = Arc::new(ExitCell::default());
        let lines = child
            .stdout
            .take()
            .map(|out| Lines::read(&name, out, Arc::clone(&exit), log.path.clone()));
        let pid = child.id();
        let waiter = Arc::clone(&exit);
        std::thread::Builder::new()
            .name(format!("wait-{name}"))
            .spawn(move || waiter.set(Exit(child.wait().map_err(|e| e.to_string()))))
            .map_err(|source| StackError::Spawn {
                name: name.clone(),
                source,
            })?;
        Ok(Process {
            name,
            pid,
            exit,
            lines: Mutex::new(lines),
            log: log.path.clone(),
            grace: STOP_GRACE,
        })
    }

    /// Its process id, which is also its process group's.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The end of its log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    /// How it ended, if it has.
    pub fn exit(&self) -> Option<Exit> {
        self.exit.get()
    }

    /// Waits until it ends, at most `timeout`; `None` if it still runs.
    pub fn exited_blocking(&self, timeout: Duration) -> Option<Exit> {
        self.exit.wait_blocking(timeout)
    }

    /// Waits until it ends.
    pub async fn exited(&self) -> Exit {
        self.exit.wait().await
    }

    /// Its stdout, line by line, when started with [`Stdout::Lines`]; once.
    pub fn lines(&mut self) -> Option<Lines> {
        self.lines
            .get_mut()
            .unwrap_or_else(|poison| poison.into_inner())
            .take()
    }

    /// How long it gets between SIGTERM and SIGKILL when stopped.
    pub fn set_grace(&mut self, grace: Duration) {
        self.grace = grace;
    }

    /// An error saying that it exited, with the end of its log.
    pub(crate) fn exited_error(&self, exit: &Exit) -> StackError {
        StackError::Exited {
            name: self.name.clone(),
            exit: exit.to_string(),
            log_tail: self.log_tail(),
        }
    }

    /// An error if it has exited.
    pub fn check_running(&self) -> Result<(), StackError> {
        match self.exit() {
            Some(exit) => Err(self.exited_error(&exit)),
            None => Ok(()),
        }
    }

    /// Asks it to stop (SIGTERM to its group) and returns at once.
    pub fn terminate(&self) {
        self.signal(Signal::TERM);
    }

    /// SIGINT to its group, as a Ctrl-C in its terminal would send.
    pub fn interrupt(&self) {
        self.signal(Signal::INT);
    }

    /// Kills its group with SIGKILL, with no shutdown of any kind, and waits
    /// until it is gone.
    pub fn kill(&mut self) {
        self.start_kill();
        self.exit.wait_blocking(KILL_WAIT);
    }

    /// SIGKILL to its group; returns at once ([`Process::exit`] tells when it is gone).
    pub fn start_kill(&self) {
        self.signal(Signal::KILL);
    }

    /// SIGTERM, the grace, then SIGKILL; returns once it is gone.
    pub fn stop_blocking(&mut self) {
        stop_all_blocking([self]);
    }

    /// SIGTERM, the grace, then SIGKILL; returns once it is gone.
    pub async fn stop(&mut self) {
        stop_all([self]).await;
    }

    fn signal(&self, signal: Signal) {
        // After the exit the group may be gone and its id reused: no signal then.
        if self.exit().is_none() {
            self.signal_group(signal);
        }
    }

    /// Kills what it left behind in its group once it has exited: nothing, for a
    /// process that stops its own children. The group's id is still its own
    /// while any member is left, and an empty group takes no signal.
    fn kill_stragglers(&self) {
        if self.exit().is_some() {
            self.signal_group(Signal::KILL);
        }
    }

    fn signal_group(&self, signal: Signal) {
        let Some(group) = i32::try_from(self.pid).ok().and_then(Pid::from_raw) else {
            return;
        };
        // Group 1 would be every process we may signal.
        assert!(group != Pid::INIT, "a child never has process group 1");
        // An error means that the group is gone already, which is what is asked.
        let _ = rustix::process::kill_process_group(group, signal);
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop_blocking();
    }
}

/// Stops processes together: SIGTERM to all, then SIGKILL to those still
/// running after the longest of their graces.
pub fn stop_all_blocking<'a>(processes: impl IntoIterator<Item = &'a mut Process>) {
    let processes: Vec<&mut Process> = processes.into_iter().collect();
    for process in &processes {
        process.terminate();
    }
    let deadline = Instant::now() + grace_of(&processes);
    for process in processes {
        let left = deadline.saturating_duration_since(Instant::now());
        if process.exit.wait_blocking(left).is_none() {
            process.kill();
        }
        process.kill_stragglers();
    }
}

/// [`stop_all_blocking`] for async callers: no thread blocks while waiting.
pub async fn stop_all<'a>(processes: impl IntoIterator<Item = &'a mut Process>) {
    let processes: Vec<&mut Process> = processes.into_iter().collect();
    for process in &processes {
        process.terminate();
    }
    let deadline = tokio::time::Instant::now() + grace_of(&processes);
    for process in processes {
        if tokio::time::timeout_at(deadline, process.exited())
            .await
            .is_err()
        {
            process.start_kill();
            let _ = tokio::time::timeout(KILL_WAIT, process.exited()).await;
        }
        process.kill_stragglers();
    }
}

fn grace_of(processes: &[&mut Process]) -> Duration {
    processes
        .iter()
        .map(|process| process.grace)
        .max()
        .unwrap_or_default()
}

/// The last [`LOG_TAIL_BYTES_MAX`] bytes of a log, or a note saying it cannot be read.
pub fn log_tail(path: &Path) -> String {
    let read_tail = || -> std::io::Result<String> {
        let mut file = File::open(path)?;
        let length = file.metadata()?.len();
        file.seek(SeekFrom::Start(length.saturating_sub(LOG_TAIL_BYTES_MAX)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    read_tail().unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()))
}

#[cfg(test)]
mod tests;
