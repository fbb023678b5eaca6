//! The services later tests need: PostgreSQL on 127.0.0.1:5432 and NATS with JetStream on
//! 127.0.0.1:4222. Each is left alone when it already answers, and started otherwise.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::command::{self, note, step};
use crate::setup;

const POSTGRES_PORT: u16 = 5432;
const NATS_PORT: u16 = 4222;

/// How long a freshly started service gets to accept connections.
const SERVICE_START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one connection attempt may take; the services are local, so this is generous.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Where Debian keeps one directory per PostgreSQL cluster version.
const POSTGRES_CONFIG_DIR: &str = "/etc/postgresql";
/// Where Debian installs one directory per PostgreSQL server version.
const POSTGRES_LIB_DIR: &str = "/usr/lib/postgresql";

/// Makes sure PostgreSQL answers on its port, installing and starting it if needed.
pub fn postgres() -> Result<()> {
    step(&format!("postgresql on 127.0.0.1:{POSTGRES_PORT}"));
    if port_open(POSTGRES_PORT) {
        note("running");
        return Ok(());
    }
    setup::debian_packages(&["postgresql"])?;
    let version = match newest_version(Path::new(POSTGRES_CONFIG_DIR)) {
        Some(version) => version,
        None => {
            let version = newest_version(Path::new(POSTGRES_LIB_DIR))
                .context("postgresql is installed but no server version was found")?;
            command::run(setup::privileged("pg_createcluster")?.args([&version, "main"]))?;
            version
        }
    };
    command::run(setup::privileged("pg_ctlcluster")?.args([
        "--skip-systemctl-redirect",
        &version,
        "main",
        "start",
    ]))?;
    if !wait_for_port(POSTGRES_PORT) {
        bail!("postgresql {version} did not accept connections on port {POSTGRES_PORT}");
    }
    note("started");
    Ok(())
}

/// Makes sure Debian's `nats-server` is installed (the cluster tests and `demo --cluster` start
/// servers of their own on free ports) and that one with JetStream answers on its standard port.
pub fn nats(root: &Path) -> Result<()> {
    if !command::succeeds(Command::new("nats-server").arg("--version")) {
        setup::debian_packages(&["nats-server"])?;
    }
    step(&format!("nats-server (JetStream) on 127.0.0.1:{NATS_PORT}"));
    if port_open(NATS_PORT) {
        note("running");
        return Ok(());
    }
    start_nats(root)
}

fn start_nats(root: &Path) -> Result<()> {
    let state_dir = root.join("target").join("nats");
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("create {}", state_dir.display()))?;
    let log_path = state_dir.join("nats-server.log");
    let log = File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;
    let mut server = Command::new("nats-server");
    server
        .args([
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &NATS_PORT.to_string(),
            "-sd",
        ])
        .arg(&state_dir)
        // The server outlives xtask: it must not hold our stdout open (CI waits for it to close)
        // nor share our process group (Ctrl-C on xtask must not stop it).
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("duplicate log file handle")?)
        .stderr(log);
    detach(&mut server);
    println!(
        "    $ nats-server -js -a 127.0.0.1 -p {NATS_PORT} -sd {}",
        state_dir.display()
    );
    server.spawn().context("start nats-server")?;
    if !wait_for_port(NATS_PORT) {
        bail!(
            "nats-server did not accept connections; see {}",
            log_path.display()
        );
    }
    note("started");
    Ok(())
}

#[cfg(unix)]
fn detach(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    command.process_group(0);
}

#[cfg(not(unix))]
fn detach(_command: &mut Command) {}

/// The highest numeric version among the sub-directories of `dir` (e.g. "15").
fn newest_version(dir: &Path) -> Option<String> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path: &PathBuf| path.is_dir())
        .filter_map(|path| {
            let name = path.file_name()?.to_str()?.to_owned();
            let number: u32 = name.parse().ok()?;
            Some((number, name))
        })
        .max()
        .map(|(_, name)| name)
}

fn port_open(port: u16) -> bool {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&address, CONNECT_TIMEOUT).is_ok()
}

fn wait_for_port(port: u16) -> bool {
    let deadline = Instant::now() + SERVICE_START_TIMEOUT;
    while Instant::now() < deadline {
        if port_open(port) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    false
}
