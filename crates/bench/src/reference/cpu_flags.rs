//! Which instruction set the reference llama.cpp is compiled for.
//!
//! `llama-cpp-sys-2` does not simply turn on `GGML_NATIVE`: it reads the Rust target. With
//! `-C target-cpu=native` it sets `GGML_NATIVE=ON`; otherwise it sets `GGML_NATIVE=OFF`, passes any
//! other `target-cpu` as `-march`, and turns on the `GGML_<feature>` switch of each enabled Rust
//! target feature. With `GGML_NATIVE=OFF` ggml itself then defaults to AVX2, FMA, F16C and BMI2 on
//! x86-64, but no AVX-512. This module repeats that logic with the values this crate was compiled
//! with (recorded by `build.rs`), which cargo hands to every crate of one build alike.

use sha2::{Digest, Sha256};

/// The Rust target features that `llama-cpp-sys-2` maps to ggml CMake switches, with those
/// switches; the list is the one in its `build.rs`.
const FEATURE_SWITCHES: [(&str, &str); 10] = [
    ("avx", "GGML_AVX"),
    ("avx2", "GGML_AVX2"),
    ("avx512bf16", "GGML_AVX512_BF16"),
    ("avx512vbmi", "GGML_AVX512_VBMI"),
    ("avx512vnni", "GGML_AVX512_VNNI"),
    ("avxvnni", "GGML_AVX_VNNI"),
    ("bmi2", "GGML_BMI2"),
    ("f16c", "GGML_F16C"),
    ("fma", "GGML_FMA"),
    ("sse4.2", "GGML_SSE42"),
];

/// CPU-related CMake definitions for a llama.cpp build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuFlags {
    defines: Vec<String>,
    native: bool,
}

impl CpuFlags {
    /// The flags `llama-cpp-sys-2` used for the engine in this cargo build.
    pub fn matching_engine() -> CpuFlags {
        CpuFlags::for_rust_target(
            env!("BENCH_ENGINE_TARGET_CPU"),
            env!("BENCH_ENGINE_TARGET_FEATURES"),
        )
    }

    /// `GGML_NATIVE=ON`: everything this machine's CPU offers, what a `target-cpu=native` build of
    /// the engine would get.
    pub fn native() -> CpuFlags {
        CpuFlags::for_rust_target("native", "")
    }

    /// The flags for a Rust `target-cpu` (empty when unset) and a comma-separated list of enabled
    /// target features, decided exactly as `llama-cpp-sys-2` decides them.
    pub fn for_rust_target(target_cpu: &str, target_features: &str) -> CpuFlags {
        if target_cpu == "native" {
            return CpuFlags {
                defines: vec!["GGML_NATIVE=ON".to_owned()],
                native: true,
            };
        }
        let mut defines = vec!["GGML_NATIVE=OFF".to_owned()];
        if !target_cpu.is_empty() {
            defines.push(format!("CMAKE_C_FLAGS=-march={target_cpu}"));
            defines.push(format!("CMAKE_CXX_FLAGS=-march={target_cpu}"));
        }
        for feature in target_features.split(',') {
            if let Some((_, switch)) = FEATURE_SWITCHES.iter().find(|(name, _)| *name == feature) {
                defines.push(format!("{switch}=ON"));
            }
        }
        CpuFlags {
            defines,
            native: false,
        }
    }

    /// The CMake definitions, `NAME=VALUE`, without the `-D`.
    pub fn cmake_defines(&self) -> &[String] {
        &self.defines
    }

    /// Whether this is a `GGML_NATIVE=ON` build.
    pub fn is_native(&self) -> bool {
        self.native
    }

    /// A name for the build directory, distinct for distinct flags.
    pub(crate) fn short_name(&self) -> String {
        let digest = Sha256::digest(self.defines.join(" ").as_bytes());
        let kind = if self.native { "native" } else { "mirror" };
        format!("{kind}-{}", &hex::encode(digest)[..12])
    }
}

impl std::fmt::Display for CpuFlags {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.defines.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_rust_target_builds_ggml_without_native() {
        // The default x86-64 target enables only fxsr, sse and sse2, none of which ggml has a
        // switch for, so ggml falls back to its own non-native defaults.
        let flags = CpuFlags::for_rust_target("", "fxsr,sse,sse2");
        assert_eq!(flags.cmake_defines(), ["GGML_NATIVE=OFF"]);
        assert!(!flags.is_native());
    }

    #[test]
    fn target_cpu_native_builds_ggml_native() {
        let flags = CpuFlags::for_rust_target("native", "avx2,fma,avx512f");
        assert_eq!(flags.cmake_defines(), ["GGML_NATIVE=ON"]);
        assert!(flags.is_native());
    }

    #[test]
    fn explicit_cpu_and_features_are_passed_on() {
        let flags = CpuFlags::for_rust_target("znver4", "avx2,fma,avx512vnni,sse2");
        assert_eq!(
            flags.cmake_defines(),
            [
                "GGML_NATIVE=OFF",
                "CMAKE_C_FLAGS=-march=znver4",
                "CMAKE_CXX_FLAGS=-march=znver4",
                "GGML_AVX2=ON",
                "GGML_FMA=ON",
                "GGML_AVX512_VNNI=ON",
            ]
        );
    }

    #[test]
    fn different_flags_build_in_different_directories() {
        let portable = CpuFlags::for_rust_target("", "");
        let native = CpuFlags::native();
        let avx2 = CpuFlags::for_rust_target("", "avx2");
        assert_ne!(portable.short_name(), native.short_name());
        assert_ne!(portable.short_name(), avx2.short_name());
        assert_eq!(
            portable.short_name(),
            CpuFlags::for_rust_target("", "sse2").short_name()
        );
    }
}
