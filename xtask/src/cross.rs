//! The vehicles' computers are ARM: the agent, with the llama.cpp it links, must build for
//! aarch64, with the CPU kernels of every ARM level it may meet. On another host this is checked
//! with a cross compiler and the Rust target's standard library, both installed here when
//! missing. The standard library comes from the Rust distribution (`rustup target add`); where
//! that cannot be reached, the check says it was skipped and why, and the test command goes on.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Result};

use crate::command::{self, note, step};
use crate::setup;

/// The vehicles' target.
pub const AARCH64: &str = "aarch64-unknown-linux-gnu";

/// Debian's C and C++ libraries for aarch64 (with GCC's cross compiler, whose libraries clang
/// links against), and a clang that knows Armv9.2 and SME: GCC 12 does not, and ggml's newest
/// ARM kernels need them.
const CROSS_PACKAGES: &[&str] = &["g++-aarch64-linux-gnu", "libc6-dev-arm64-cross", "clang-19"];

/// `cargo clippy` of the agent for aarch64, as it ships: choosing its CPU kernels at run time
/// (`engine`'s `cpu-dispatch`). Its build script compiles the whole of llama.cpp with the cross
/// compiler, ggml's CPU backend once per ARM level (`armv8.0` NEON, `armv8.2` dotprod and fp16,
/// SVE, `armv8.6` i8mm, SVE2, `armv9.2` SME); the Rust code is type-checked and linted for the
/// target.
pub fn check_agent_for_aarch64(root: &Path) -> Result<()> {
    if cfg!(target_arch = "aarch64") {
        note("this machine is aarch64: the agent was built for it with the workspace");
        return Ok(());
    }
    setup::debian_packages(CROSS_PACKAGES)?;
    if let Err(error) = rust_target(AARCH64) {
        // The target's standard library comes from the Rust distribution, not from the
        // package mirrors; where that cannot be reached the check cannot run, and says so.
        note(&format!(
            "SKIPPED: the aarch64 check did not run, the Rust target could not be installed: {error:#}"
        ));
        return Ok(());
    }
    step("check that the agent builds for aarch64, the vehicles' architecture");
    let env = [
        ("CC_aarch64_unknown_linux_gnu", OsStr::new("clang-19")),
        ("CXX_aarch64_unknown_linux_gnu", OsStr::new("clang++-19")),
        (
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
            OsStr::new("aarch64-linux-gnu-gcc"),
        ),
    ];
    command::cargo(
        root,
        &[
            "clippy",
            "-p",
            "agent",
            "--target",
            AARCH64,
            "--features",
            "engine/cpu-dispatch",
            // Its own: llama.cpp's CMake cache keeps the compiler it was first configured with.
            "--target-dir",
            "target/aarch64-cpu-dispatch",
            "--",
            "-D",
            "warnings",
        ],
        &env,
    )
}

/// Adds the standard library of `target` with rustup when it is missing.
fn rust_target(target: &str) -> Result<()> {
    step(&format!("rust target {target}"));
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    let Ok(installed) = installed else {
        bail!("rustup is not installed: add the Rust target {target} by other means");
    };
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|line| line.trim() == target)
    {
        note("installed");
        return Ok(());
    }
    command::run(Command::new("rustup").args(["target", "add", target]))
}
