//! A build that chooses its CPU kernels at run time (`cpu-dispatch`) loads the variant an
//! operator names instead of the best (`FLEETGRID_CPU_VARIANT`). The choice is made once per
//! process, so this file holds one test: its own process under either test runner.
#![cfg(all(feature = "cpu-dispatch", target_arch = "x86_64"))]

#[test]
fn a_named_variant_is_loaded_instead_of_the_best() {
    // Every x86-64 CPU with SSE4.2 runs it; no AVX at all.
    std::env::set_var(engine::dispatch::VARIANT_ENV, "sse42");
    let kernels = engine::cpu_kernels();
    assert!(kernels.ends_with("VARIANT = sse42 |"), "{kernels}");
    assert!(!kernels.contains("AVX2 = 1"), "{kernels}");
    assert_eq!(engine::dispatch::loaded_variant().as_deref(), Some("sse42"));
}
