//! Shared set-up steps: Debian packages, the Python virtual environment and the models. Each one
//! checks first and does nothing when it is already satisfied.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Result};

use crate::command::{self, note, step};

/// What building the workspace (llama.cpp via cmake and bindgen, protobuf code generation) and
/// fetching models (pip in a virtual environment) need.
pub const BUILD_PACKAGES: &[&str] = &[
    "cmake",
    "clang",
    "libclang-dev",
    "protobuf-compiler",
    "pkg-config",
    "python3",
    "python3-venv",
    "python3-pip",
];

/// Models the demo serves: the edge model and the local "cloud" model it escalates to.
pub const DEMO_MODELS: &[&str] = &["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"];

/// Models the test suite uses: the edge model and the local system-2 stand-in for the router.
pub const TEST_MODELS: &[&str] = &["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"];

/// Python packages the demo needs in the venv: the OpenAI SDK.
pub const DEMO_PYTHON_PACKAGES: &[(&str, &str)] = &[("openai>=1", "openai")];

/// Python packages the tests need in the venv: the clients of the compatibility suite
/// (`crates/fleetgrid/tests/clients.rs`), each with the module that shows it is installed.
pub const TEST_PYTHON_PACKAGES: &[(&str, &str)] = &[
    ("openai>=1", "openai"),
    ("langchain-openai", "langchain_openai"),
    ("litellm", "litellm"),
];

/// Installs whichever of `packages` are missing with apt-get (through sudo when not root).
pub fn debian_packages(packages: &[&str]) -> Result<()> {
    step(&format!("debian packages: {}", packages.join(" ")));
    if !command::succeeds(Command::new("dpkg-query").arg("--version")) {
        note("not a Debian system (no dpkg-query); skipping, make sure these are installed");
        return Ok(());
    }
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| !is_installed(package))
        .collect();
    if missing.is_empty() {
        note("all installed");
        return Ok(());
    }
    note(&format!("missing: {}", missing.join(" ")));
    command::run(privileged("apt-get")?.arg("update"))?;
    command::run(
        privileged("apt-get")?
            .args(["install", "-y"])
            .args(&missing),
    )?;
    Ok(())
}

fn is_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["--show", "--showformat=${Status}", package])
        .output()
        .is_ok_and(|output| {
            output.status.success()
                && String::from_utf8_lossy(&output.stdout).trim() == "install ok installed"
        })
}

/// A command for `program` run as root: directly when we are root, else through `sudo`. apt-get
/// is told not to ask questions, since CI has no standard input.
pub fn privileged(program: &str) -> Result<Command> {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == "0");
    let mut command = if is_root {
        Command::new(program)
    } else if command::succeeds(Command::new("sudo").arg("--version")) {
        let mut sudo = Command::new("sudo");
        // sudo drops most of the environment, so the variable is passed through `env`.
        sudo.args(["env", "DEBIAN_FRONTEND=noninteractive", program]);
        sudo
    } else {
        bail!("`{program}` must run as root, and sudo is not installed");
    };
    command.env("DEBIAN_FRONTEND", "noninteractive");
    Ok(command)
}

/// Makes `<root>/.venv` with `packages` (pip requirement, module to import); returns the
/// venv's Python.
pub fn python_venv(root: &Path, packages: &[(&str, &str)]) -> Result<PathBuf> {
    let requirements: Vec<&str> = packages
        .iter()
        .map(|(requirement, _)| *requirement)
        .collect();
    step(&format!(
        "python virtual environment (.venv) with {}",
        requirements.join(" ")
    ));
    let venv = root.join(".venv");
    let python = venv.join("bin").join("python");
    let imports = packages
        .iter()
        .map(|(_, module)| format!("import {module}"))
        .collect::<Vec<_>>()
        .join("; ");
    let mut ready = Command::new(&python);
    ready
        .args(["-c", &imports])
        // litellm reads its price map from the network on import unless told not to.
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True");
    if command::succeeds(&mut ready) {
        note("ready");
        return Ok(python);
    }
    if !command::succeeds(Command::new(&python).args(["-c", "import sys"])) {
        // Missing, or left broken by a Python that has since been removed: build it afresh.
        command::run(
            Command::new("python3")
                .args(["-m", "venv", "--clear"])
                .arg(&venv),
        )?;
    }
    command::run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--quiet",
            ])
            .args(&requirements),
    )?;
    Ok(python)
}

/// Fetches each model into the default store with `fleetgrid models fetch`, which verifies the
/// sha256 and returns at once when the model is already there.
pub fn models(fleetgrid: &Path, python: &Path, names: &[&str]) -> Result<()> {
    step(&format!("models: {}", names.join(" ")));
    for name in names {
        let mut fetch = std::process::Command::new(fleetgrid);
        fetch
            .args(["models", "fetch", name])
            // The venv always has pip, unlike a bare Debian python3.
            .env("FLEETGRID_PYTHON", python);
        command::run(&mut fetch)?;
    }
    Ok(())
}
