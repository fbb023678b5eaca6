//! Which CPU kernels this build of llama.cpp runs: the instruction sets its quantized dot
//! products and matrix multiplications were compiled for (`AVX2`, `AVX512`, `NEON`, `DOTPROD`,
//! `MATMUL_INT8` …), as llama.cpp itself reports them. Two vehicles whose kernels differ may
//! round differently, which decides whether a generation moved between them continues bit for
//! bit; the agent sends this in its registration and the engine logs it at start-up.

use std::ffi::CStr;
use std::sync::OnceLock;

/// llama.cpp's system information, e.g. `CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 |
/// FMA = 1 | OPENMP = 1 | REPACK = 1 |`, trimmed. Read once per process: llama.cpp builds it in
/// a static buffer that a second caller would overwrite.
pub fn cpu_kernels() -> &'static str {
    static KERNELS: OnceLock<String> = OnceLock::new();
    KERNELS.get_or_init(|| {
        // SAFETY: `llama_print_system_info` takes no arguments and returns a pointer to a
        // NUL-terminated string in a static buffer of llama.cpp's; the OnceLock makes this the
        // only call in the process, and the text is copied before anything else runs.
        let text = unsafe { CStr::from_ptr(llama_cpp_sys_2::llama_print_system_info()) };
        text.to_string_lossy().trim().to_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_of_this_build_are_named() {
        let kernels = cpu_kernels();
        assert!(kernels.contains("CPU"), "{kernels}");
        #[cfg(target_arch = "x86_64")]
        assert!(kernels.contains("AVX2 = 1"), "{kernels}");
        #[cfg(target_arch = "aarch64")]
        assert!(kernels.contains("NEON = 1"), "{kernels}");
    }

    /// Repacked weights would make a token's numbers depend on its batch (`crate::worker`);
    /// `.cargo/config.toml` builds llama.cpp without them.
    #[test]
    fn this_build_keeps_weights_in_their_own_layout() {
        let kernels = cpu_kernels();
        assert!(!kernels.contains("REPACK = 1"), "{kernels}");
    }
}
