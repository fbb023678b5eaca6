//! Side-by-side benchmarks of fleetgrid against llama.cpp's own tools, measured in the same run.
//!
//! Two benchmarks, both reporting ratios against a named reference rather than absolute numbers:
//!
//! - [`engine()`]: prefill and decode tokens/s of our [`engine::Engine`] against `llama-bench` on the
//!   same model file and thread count;
//! - [`serving()`]: aggregate completion tokens/s of one node at several concurrent streams through
//!   the whole gateway → agent path against `llama-server` with the same number of slots.
//!
//! The reference tools are built from the llama.cpp tree vendored by the `llama-cpp-python`
//! source distribution (see [`reference`]); nothing fetched is ever committed, the build happens at
//! bench time into a cache directory. Benchmarks are never timed assertions in the test suite.

mod engine_bench;
mod error;
mod loadgen;
mod process;
pub mod reference;
mod report;
mod serving;
mod structured;

pub use engine_bench::{engine, EngineBenchReport, EngineRound, ENGINE_BENCH_ROUNDS};
pub use error::BenchError;
pub use loadgen::{LoadResult, LoadSpec};
pub use reference::{ensure_built, ReferenceBinaries};
pub use report::{Comparison, Verdict};
pub use serving::{
    serving, ServingBenchReport, ServingConfig, ServingRow, DEFAULT_CONCURRENCY_LEVELS,
    SERVING_ROUNDS,
};
pub use structured::{structured, StructuredReport, StructuredRow};
