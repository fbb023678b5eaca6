//! Runs the scheduler benchmark: `cargo run --release -p scheduler --example scheduler_bench -- [nodes] [seed]`.

fn main() {
    let mut args = std::env::args().skip(1);
    let nodes = args
        .next()
        .and_then(|arg| arg.parse().ok())
        .unwrap_or(1_000_000);
    let seed = args.next().and_then(|arg| arg.parse().ok()).unwrap_or(1);
    println!("{}", scheduler::bench::run(nodes, seed));
}
