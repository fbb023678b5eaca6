//! A private PostgreSQL server of Debian's binaries on a loopback port, in
//! a temporary directory of its own: for tests and benchmarks that stop and
//! start the database under a cluster (a shared server that other tests use
//! must never be stopped).
//!
//! The server runs in the foreground as a [`Process`] (its own process
//! group, its log in its directory), so it goes with whoever started it.
//! PostgreSQL refuses to run as root: started by root, `initdb` and the
//! server run as the `postgres` user (`runuser`), and the directory is
//! handed to that user. Trust authentication on loopback only; the server
//! keeps its default durability settings.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::nats::free_port;
use crate::probe;
use crate::process::{LogFile, Process, Stdout};
use crate::StackError;

/// Where Debian installs each PostgreSQL version's programs
/// (`<version>/bin`); the newest version found there is used.
pub const POSTGRES_LIB_DIR: &str = "/usr/lib/postgresql";

/// Names a directory of PostgreSQL programs to use instead.
pub const POSTGRES_BIN_VARIABLE: &str = "FLEETGRID_POSTGRES_BIN";

/// The user the server runs as when it is started by root; also the
/// database superuser that `initdb` creates.
pub const POSTGRES_USER: &str = "postgres";

/// Connections the server accepts: a cluster of several gateways and cells,
/// each with a store pool and a ledger pool, and the CLI beside them.
const CONNECTIONS_MAX: u32 = 300;

/// How long a fast shutdown may take before the server is killed.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(30);

/// How many ports a first start tries.
const START_ATTEMPTS: u32 = 3;

/// A PostgreSQL server of its own; stopped (fast shutdown) when dropped,
/// its directory removed.
pub struct PostgresServer {
    bin: PathBuf,
    /// Owned by the server's user; holds `data/`, the socket and the log.
    dir: tempfile::TempDir,
    address: SocketAddr,
    as_postgres_user: bool,
    process: Option<Process>,
}

impl PostgresServer {
    /// Creates a database cluster in a fresh temporary directory with
    /// `initdb`, starts a server on a free loopback port and waits until it
    /// accepts connections, at most `timeout`.
    pub async fn start(timeout: Duration) -> Result<PostgresServer, StackError> {
        let bin = programs()?;
        let dir = tempfile::Builder::new()
            .prefix("fleetgrid-postgres-")
            .tempdir()
            .map_err(|source| StackError::Spawn {
                name: "a directory for PostgreSQL".to_owned(),
                source,
            })?;
        let as_postgres_user = rustix::process::geteuid().is_root();
        if as_postgres_user {
            run_to_end(
                "chown",
                Command::new("chown")
                    .arg(format!("{POSTGRES_USER}:"))
                    .arg(dir.path()),
            )?;
        }
        let mut server = PostgresServer {
            bin,
            address: free_port()?,
            as_postgres_user,
            process: None,
            dir,
        };
        let mut initdb = server.command("initdb");
        initdb.arg("-D").arg(server.data_dir()).args([
            "-U",
            POSTGRES_USER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        run_to_end("initdb", &mut initdb)?;
        // The port is chosen free but taken only when the server starts:
        // if another process took it in between, the server exits and is
        // started again on a fresh one.
        let mut attempt = 1;
        loop {
            match server.start_again(timeout).await {
                Err(StackError::Exited { .. }) if attempt < START_ATTEMPTS => {
                    attempt += 1;
                    server.address = free_port()?;
                }
                started => return started.map(|()| server),
            }
        }
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`: the superuser on the
    /// default database.
    pub fn url(&self) -> String {
        format!("postgres://{POSTGRES_USER}@{}/postgres", self.address)
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The server's log (stderr of every start, appended).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// Whether the server process runs.
    pub fn running(&self) -> bool {
        self.process
            .as_ref()
            .is_some_and(|process| process.exit().is_none())
    }

    /// Stops the server with a fast shutdown (SIGINT: clients are
    /// disconnected, open transactions rolled back) and waits until it has
    /// exited; clients then find nothing listening on its port.
    pub async fn stop(&mut self) {
        let Some(process) = self.process.take() else {
            return;
        };
        process.interrupt();
        if tokio::time::timeout(SHUTDOWN_WAIT, process.exited())
            .await
            .is_err()
        {
            process.start_kill();
            process.exited().await;
        }
    }

    /// Starts the server (again) on the same data directory and port and
    /// waits until it accepts connections, at most `timeout`.
    pub async fn start_again(&mut self, timeout: Duration) -> Result<(), StackError> {
        if self.running() {
            return Ok(());
        }
        let mut command = self.command("postgres");
        command
            .arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.address.port().to_string()])
            .arg("-k")
            .arg(self.dir.path())
            .args(["-c", &format!("listen_addresses={}", self.address.ip())])
            .args(["-c", &format!("max_connections={CONNECTIONS_MAX}")]);
        let log = LogFile::append(self.log_path());
        let process = Process::spawn("postgres", command, &log, Stdout::Log)?;
        let members = [&process];
        let what = format!("PostgreSQL accepting connections on {}", self.address);
        let waited = probe::wait_until(&members, &what, timeout, || self.ready()).await;
        self.process = Some(process);
        waited
    }

    /// Whether the server accepts connections (`pg_isready`).
    async fn ready(&self) -> bool {
        let mut command = tokio::process::Command::new(self.bin.join("pg_isready"));
        command
            .args(["-h", &self.address.ip().to_string()])
            .args(["-p", &self.address.port().to_string()])
            .args(["-U", POSTGRES_USER])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        command.status().await.is_ok_and(|status| status.success())
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// One of the server's programs, run as its user.
    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        if !self.as_postgres_user {
            return Command::new(program);
        }
        let mut command = Command::new("runuser");
        command.args(["-u", POSTGRES_USER, "--"]).arg(program);
        command
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.interrupt();
            if process.exited_blocking(SHUTDOWN_WAIT).is_none() {
                process.kill();
            }
        }
    }
}

/// The directory of PostgreSQL's programs: [`POSTGRES_BIN_VARIABLE`], or
/// the newest version's under [`POSTGRES_LIB_DIR`].
fn programs() -> Result<PathBuf, StackError> {
    if let Some(bin) = std::env::var_os(POSTGRES_BIN_VARIABLE) {
        return Ok(PathBuf::from(bin));
    }
    let missing = |source| StackError::Spawn {
        name: format!(
            "PostgreSQL's programs (none under {POSTGRES_LIB_DIR}; install Debian's \
             postgresql package or set {POSTGRES_BIN_VARIABLE})"
        ),
        source,
    };
    let versions = std::fs::read_dir(POSTGRES_LIB_DIR).map_err(missing)?;
    versions
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version)
        .map(|(_, bin)| bin)
        .ok_or_else(|| missing(std::io::ErrorKind::NotFound.into()))
}

/// Runs `command` to its end; an error with its stderr unless it succeeds.
fn run_to_end(name: &str, command: &mut Command) -> Result<(), StackError> {
    let output = command.output().map_err(|source| StackError::Spawn {
        name: name.to_owned(),
        source,
    })?;
    if output.status.success() {
        return Ok(());
    }
    Err(StackError::CommandFailed {
        command: name.to_owned(),
        status: output.status.to_string(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const START_TIMEOUT: Duration = Duration::from_secs(60);

    async fn answers_a_query(url: &str) -> bool {
        let psql = programs().expect("programs").join("psql");
        let output = tokio::process::Command::new(psql)
            .args([url, "-tAc", "SELECT 40 + 2"])
            .output()
            .await
            .expect("run psql");
        String::from_utf8_lossy(&output.stdout).trim() == "42"
    }

    #[tokio::test]
    async fn a_private_server_stops_and_starts_again_on_its_port_with_its_data() {
        let mut server = PostgresServer::start(START_TIMEOUT)
            .await
            .expect("a private PostgreSQL server starts");
        let url = server.url();
        let psql = programs().expect("programs").join("psql");
        let created = tokio::process::Command::new(&psql)
            .args([
                url.as_str(),
                "-c",
                "CREATE TABLE kept (id INT); INSERT INTO kept VALUES (7)",
            ])
            .status()
            .await
            .expect("run psql");
        assert!(created.success());
        assert!(answers_a_query(&url).await);

        server.stop().await;
        assert!(!server.running());
        assert!(!answers_a_query(&url).await, "a stopped server answered");

        server
            .start_again(START_TIMEOUT)
            .await
            .expect("the server starts again");
        assert_eq!(server.url(), url, "the same port");
        let kept = tokio::process::Command::new(&psql)
            .args([url.as_str(), "-tAc", "SELECT id FROM kept"])
            .output()
            .await
            .expect("run psql");
        assert_eq!(String::from_utf8_lossy(&kept.stdout).trim(), "7");
        let dir = server.dir.path().to_path_buf();
        drop(server);
        assert!(!dir.exists(), "the server's directory is removed");
    }
}
