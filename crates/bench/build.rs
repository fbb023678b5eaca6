//! Records how this crate is being compiled for the CPU, so that the llama.cpp reference build can
//! use the same instruction set that `llama-cpp-sys-2` chose for the engine.
//!
//! `llama-cpp-sys-2` reads `target-cpu` from `CARGO_ENCODED_RUSTFLAGS` and the enabled target
//! features from `CARGO_CFG_TARGET_FEATURE`; cargo hands every crate of one build the same values, so
//! what this script sees is what the engine's llama.cpp was configured with. It also records where
//! the llama.cpp sources the engine was built from are, for the same-version reference build.

fn main() {
    let rustflags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    let target_cpu = rustflags
        .split('\x1f')
        .find_map(|flag| flag.split("target-cpu=").nth(1))
        .unwrap_or_default()
        .to_owned();
    let target_features = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    println!("cargo:rustc-env=BENCH_ENGINE_TARGET_CPU={target_cpu}");
    println!("cargo:rustc-env=BENCH_ENGINE_TARGET_FEATURES={target_features}");
    println!("cargo:rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");
    println!(
        "cargo:rustc-env=BENCH_ENGINE_LLAMA_CPP_SOURCE={}",
        engine_llama_cpp_source().unwrap_or_default()
    );
    println!("cargo:rerun-if-env-changed=DEP_LLAMA_ROOT");
}

/// The llama.cpp tree `llama-cpp-sys-2` built the engine's library from: the source directory of
/// its CMake build, whose output directory it hands its dependents as `DEP_LLAMA_ROOT`.
fn engine_llama_cpp_source() -> Option<String> {
    let root = std::env::var("DEP_LLAMA_ROOT").ok()?;
    let cache = std::path::Path::new(&root)
        .join("build")
        .join("CMakeCache.txt");
    println!("cargo:rerun-if-changed={}", cache.display());
    let text = std::fs::read_to_string(cache).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("CMAKE_HOME_DIRECTORY:INTERNAL="))
        .map(str::to_owned)
}
