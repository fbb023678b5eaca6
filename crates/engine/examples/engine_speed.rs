//! The engine's prefill and decode speed alone, measured as `fleetgrid bench engine` measures
//! ours (`Engine::bench_prefill_decode`, one sequence), repeated: a target for a profiler, to
//! set beside `llama-bench` on the same model and thread count.
//!
//! ```sh
//! cargo build -p engine --example engine_speed
//! perf record -F 999 -- target/debug/examples/engine_speed MODEL.gguf 2 5 [PREFILL DECODE]
//! ```
//! PREFILL and DECODE default to `llama-bench`'s 512 and 128. `--reference-kernels` anywhere
//! runs the engine on ggml's reference kernels (`EngineConfig::reference_kernels`),
//! `--flash-attention` with flash attention.

fn main() {
    const REFERENCE: &str = "--reference-kernels";
    const FLASH_ATTENTION: &str = "--flash-attention";
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let reference_kernels = args.iter().any(|arg| arg == REFERENCE);
    let flash_attention = args.iter().any(|arg| arg == FLASH_ATTENTION);
    args.retain(|arg| arg != REFERENCE && arg != FLASH_ATTENTION);
    let (model, threads, rounds, prefill_tokens, decode_tokens) = match args.as_slice() {
        [model, threads, rounds] => (model, threads, rounds, 512, 128),
        [model, threads, rounds, prefill, decode] => (
            model,
            threads,
            rounds,
            prefill.parse().expect("PREFILL is a number"),
            decode.parse().expect("DECODE is a number"),
        ),
        _ => {
            eprintln!(
                "usage: engine_speed MODEL.gguf THREADS ROUNDS [PREFILL DECODE] [{REFERENCE}] \
                 [{FLASH_ATTENTION}]"
            );
            std::process::exit(2);
        }
    };
    let mut config = engine::EngineConfig::new(model);
    config.threads = threads.parse().expect("THREADS is a number");
    config.parallel_sequences = 1;
    config.reference_kernels = reference_kernels;
    config.flash_attention = flash_attention;
    let engine = engine::Engine::start(config).expect("start the engine");
    for _ in 0..rounds.parse::<u32>().expect("ROUNDS is a number") {
        let (prefill, decode) = engine
            .bench_prefill_decode(prefill_tokens, decode_tokens)
            .expect("bench the engine");
        println!("prefill {prefill:.1} t/s, decode {decode:.1} t/s");
    }
}
