//! The reference tools, `llama-bench`, `llama-server` and `llama-quantize`, built at bench time from the llama.cpp
//! tree that the `llama-cpp-python` source distribution vendors, and again on the llama.cpp library
//! the engine links ([`same_version`]).
//!
//! Our engine is llama.cpp as vendored by `llama-cpp-sys-2` (0.1.161, ggml 0.26.0). That crate
//! ships only the library, not the tools; `llama-cpp-python` 0.3.36, the newest release, vendors
//! the full tree at llama.cpp commit 0c1e57098 (ggml 0.25.3), the closest version available as a
//! package. The two trees have identical x86 quantized dot-product kernels; they differ mostly in
//! model architectures added since.
//!
//! The build mirrors how `llama-cpp-sys-2` configures llama.cpp for the engine in this very cargo
//! build (see [`CpuFlags::matching_engine`]), so that the comparison measures our code, not
//! different compiler flags.

mod cpu_flags;
mod fetch;
pub mod same_version;

use std::path::{Path, PathBuf};
use std::process::Command;

pub use cpu_flags::CpuFlags;
pub(crate) use fetch::sha256_hex;

use crate::process::run_logged;
use crate::BenchError;

/// The `llama-cpp-python` release whose vendored llama.cpp is the reference.
pub const LLAMA_CPP_PYTHON_VERSION: &str = "0.3.36";
/// sha256 of `llama_cpp_python-0.3.36.tar.gz` as published on PyPI; a different file is refused.
pub const LLAMA_CPP_PYTHON_SDIST_SHA256: &str =
    "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e";
/// The llama.cpp commit that release vendors, from its CHANGELOG (the sdist carries no git data).
pub const REFERENCE_LLAMA_CPP_COMMIT: &str = "0c1e57098";
/// The llama.cpp that our engine links, as vendored by `llama-cpp-sys-2`.
pub const ENGINE_LLAMA_CPP_DESCRIPTION: &str =
    "llama.cpp (ggml 0.26.0) via llama-cpp-sys-2 0.1.161";

/// The name of the file that marks a finished build and records the flags it was made with.
const BUILD_STAMP_FILE_NAME: &str = "fleetgrid-reference.stamp";

/// Paths of the built reference tools and what they were built from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReferenceBinaries {
    pub llama_bench: PathBuf,
    pub llama_server: PathBuf,
    /// Requantizes a model, e.g. into a coarser type for the verification benchmark's cheats.
    pub llama_quantize: PathBuf,
    /// e.g. "llama.cpp 0c1e57098 (ggml 0.25.3) from llama-cpp-python 0.3.36".
    pub llama_cpp_version: String,
    /// The CPU-related CMake definitions the tools were built with.
    pub cpu_flags: CpuFlags,
}

/// Builds the reference tools into `cache_dir` with the same CPU flags as the engine, or returns
/// the ones built there before. Downloads the source distribution with pip the first time.
pub fn ensure_built(cache_dir: &Path) -> Result<ReferenceBinaries, BenchError> {
    ensure_built_with(cache_dir, &CpuFlags::matching_engine())
}

/// [`ensure_built`] with explicit CPU flags, e.g. [`CpuFlags::native`] to see what the engine
/// would gain from a `target-cpu=native` build.
pub fn ensure_built_with(
    cache_dir: &Path,
    cpu_flags: &CpuFlags,
) -> Result<ReferenceBinaries, BenchError> {
    std::fs::create_dir_all(cache_dir).map_err(|e| BenchError::io("create", cache_dir, e))?;
    let source_dir = fetch::ensure_source(cache_dir)?;
    let ggml_version = read_ggml_version(&source_dir)?;
    let version = format!(
        "llama.cpp {REFERENCE_LLAMA_CPP_COMMIT} (ggml {ggml_version}) from llama-cpp-python \
         {LLAMA_CPP_PYTHON_VERSION}"
    );
    let build_dir = cache_dir.join(format!("build-{}", cpu_flags.short_name()));
    build_tools(&source_dir, &build_dir, version, cpu_flags)
}

/// The reference tools built on the llama.cpp library the engine links (see
/// [`same_version`]), with the same CPU flags as the engine, or the ones built before.
pub fn ensure_same_version_built(cache_dir: &Path) -> Result<ReferenceBinaries, BenchError> {
    std::fs::create_dir_all(cache_dir).map_err(|e| BenchError::io("create", cache_dir, e))?;
    let cpu_flags = CpuFlags::matching_engine();
    let (tree, version) = same_version::ensure_tree(cache_dir)?;
    let build_dir = cache_dir
        .join("same-version")
        .join(format!("build-{}", cpu_flags.short_name()));
    build_tools(&tree, &build_dir, version, &cpu_flags)
}

/// Builds the tools of `source_dir` into `build_dir`, unless a build with the same definitions
/// is already there.
fn build_tools(
    source_dir: &Path,
    build_dir: &Path,
    llama_cpp_version: String,
    cpu_flags: &CpuFlags,
) -> Result<ReferenceBinaries, BenchError> {
    let binaries = ReferenceBinaries {
        llama_bench: build_dir.join("bin").join("llama-bench"),
        llama_server: build_dir.join("bin").join("llama-server"),
        llama_quantize: build_dir.join("bin").join("llama-quantize"),
        llama_cpp_version,
        cpu_flags: cpu_flags.clone(),
    };
    let defines = cmake_defines(cpu_flags);
    let stamp_path = build_dir.join(BUILD_STAMP_FILE_NAME);
    let stamp = defines.join("\n");
    let already_built = std::fs::read_to_string(&stamp_path).is_ok_and(|found| found == stamp)
        && binaries.llama_bench.is_file()
        && binaries.llama_server.is_file()
        && binaries.llama_quantize.is_file();
    if already_built {
        return Ok(binaries);
    }
    build(source_dir, build_dir, &defines)?;
    std::fs::write(&stamp_path, stamp).map_err(|e| BenchError::io("write", &stamp_path, e))?;
    Ok(binaries)
}

/// Every CMake definition of the reference build: what `llama-cpp-sys-2` sets for the library
/// (Release, static, OpenMP, no curl), plus switches that keep the tools from reaching the network.
fn cmake_defines(cpu_flags: &CpuFlags) -> Vec<String> {
    let fixed = [
        "CMAKE_BUILD_TYPE=Release",
        "BUILD_SHARED_LIBS=OFF",
        "GGML_OPENMP=ON",
        "LLAMA_CURL=OFF",
        "LLAMA_OPENSSL=OFF",
        "LLAMA_BUILD_UI=OFF",
        "LLAMA_USE_PREBUILT_UI=OFF",
        "LLAMA_BUILD_TESTS=OFF",
        "LLAMA_BUILD_EXAMPLES=OFF",
        "LLAMA_BUILD_APP=OFF",
        "LLAMA_BUILD_TOOLS=ON",
        "LLAMA_BUILD_SERVER=ON",
    ];
    let mut defines: Vec<String> = fixed.iter().map(|d| (*d).to_owned()).collect();
    defines.extend(cpu_flags.cmake_defines().iter().cloned());
    defines
}

fn build(source_dir: &Path, build_dir: &Path, defines: &[String]) -> Result<(), BenchError> {
    std::fs::create_dir_all(build_dir).map_err(|e| BenchError::io("create", build_dir, e))?;
    let mut configure = Command::new("cmake");
    configure.arg("-S").arg(source_dir).arg("-B").arg(build_dir);
    for define in defines {
        configure.arg(format!("-D{define}"));
    }
    run_logged(&mut configure, "cmake", &build_dir.join("configure.log"))?;
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut compile = Command::new("cmake");
    compile
        .arg("--build")
        .arg(build_dir)
        .args([
            "--config",
            "Release",
            "--target",
            "llama-bench",
            "llama-server",
            "llama-quantize",
        ])
        .arg(format!("-j{jobs}"));
    run_logged(&mut compile, "cmake --build", &build_dir.join("build.log"))?;
    Ok(())
}

/// The ggml version of a llama.cpp tree, from `ggml/CMakeLists.txt`.
fn read_ggml_version(source_dir: &Path) -> Result<String, BenchError> {
    let path = source_dir.join("ggml").join("CMakeLists.txt");
    let text = std::fs::read_to_string(&path).map_err(|e| BenchError::io("read", &path, e))?;
    parse_ggml_version(&text).ok_or_else(|| BenchError::Parse {
        what: "ggml version",
        reason: format!("no GGML_VERSION_MAJOR/MINOR/PATCH in {}", path.display()),
    })
}

fn parse_ggml_version(cmake_lists: &str) -> Option<String> {
    let component = |name: &str| {
        let prefix = format!("set({name} ");
        cmake_lists.lines().find_map(|line| {
            let value = line.trim().strip_prefix(&prefix)?.strip_suffix(')')?;
            value.trim().parse::<u32>().ok()
        })
    };
    Some(format!(
        "{}.{}.{}",
        component("GGML_VERSION_MAJOR")?,
        component("GGML_VERSION_MINOR")?,
        component("GGML_VERSION_PATCH")?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ggml_version_is_read_from_cmake_lists() {
        let text = "project(\"ggml\")\nset(GGML_VERSION_MAJOR 0)\nset(GGML_VERSION_MINOR 25)\n\
                    set(GGML_VERSION_PATCH 3)\nset(GGML_VERSION_BASE \"x\")\n";
        assert_eq!(parse_ggml_version(text).as_deref(), Some("0.25.3"));
        assert_eq!(parse_ggml_version("set(GGML_VERSION_MAJOR 0)\n"), None);
    }

    #[test]
    fn reference_build_keeps_the_engine_build_settings() {
        let defines = cmake_defines(&CpuFlags::native());
        for expected in [
            "CMAKE_BUILD_TYPE=Release",
            "GGML_OPENMP=ON",
            "LLAMA_CURL=OFF",
            "GGML_NATIVE=ON",
        ] {
            assert!(defines.iter().any(|d| d == expected), "{expected} missing");
        }
    }
}
