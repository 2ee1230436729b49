//! Fused vs unfused latency of ResNet-18 (224×224) with the JIT, at batch 1 and batch 64,
//! measured in one run: `cargo bench --bench fusion`.
//!
//! A plain timing harness (no benchmark framework): both versions are compiled from the same
//! random weights, checked against each other, warmed up, then timed in alternation (fused,
//! unfused, fused, …) so that drift in the machine's speed affects both alike. It prints
//! the median and the minimum of each, and the unfused/fused ratio of the medians.
//!
//! Iterations: `FUSION_BENCH_ITERS_B1` (default 30) and `FUSION_BENCH_ITERS_B64` (default 5;
//! one batch-64 run takes seconds on a 2-core machine). Run without `--bench` (as
//! `cargo test --benches` does) it only smoke-tests batch 1 with one iteration.

#[path = "../examples/zoo/mod.rs"]
mod zoo;

use cnnc::runtime::fusion_check::optimize;
use cnnc::runtime::weights::Weights;
use cnnc::runtime::{Compiled, Options};
use ndarray::{ArrayD, IxDyn};
use std::time::{Duration, Instant};

fn iterations(var: &str, default: usize) -> usize {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default).max(1)
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn cpu() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{model}, {cores} cores")
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let graph = zoo::ResNet18::graph();
    let mut weights = Weights::random(&graph, 2024);
    weights.randomize_batchnorm(&graph, 7);
    let fused = optimize(&graph, &weights).expect("the pipeline runs");
    // The passes ran above; `fuse: false` keeps `Compiled::new` from running them again,
    // so the unfused net really is the declared graph.
    let options = Options { fuse: false, ..Options::default() };
    let unfused_net = Compiled::new(&graph, &weights, &options).expect("compiles");
    let fused_net = Compiled::new(&fused.graph, &fused.weights, &options).expect("compiles");

    println!("ResNet-18 (224×224), JIT, fused vs unfused — {}", cpu());
    println!(
        "kernels: unfused {}, fused {} (compile {} / {}); activation traffic per sample {:.1} MB → {:.1} MB",
        unfused_net.kernel_count(),
        fused_net.kernel_count(),
        ms(unfused_net.compile_time()),
        ms(fused_net.compile_time()),
        fused.report.before.activation_traffic() as f64 / 1e6,
        fused.report.after.activation_traffic() as f64 / 1e6,
    );

    let batches: &[(usize, usize)] = if full {
        &[(1, iterations("FUSION_BENCH_ITERS_B1", 30)), (64, iterations("FUSION_BENCH_ITERS_B64", 5))]
    } else {
        &[(1, 1)]
    };
    println!(
        "{:>6} {:>5} {:>14} {:>14} {:>14} {:>14} {:>7}",
        "batch", "iters", "unfused med", "fused med", "unfused min", "fused min", "ratio"
    );
    for &(batch, iters) in batches {
        let mut k = 0u64;
        let x = ArrayD::from_shape_simple_fn(IxDyn(&[batch, 3, 224, 224]), || {
            k += 1;
            ((k * 7919 % 10007) as f32 * 0.713).sin()
        });
        // Same answer, and a warm-up of both (arena pools, caches).
        let a = unfused_net.run(&[x.view()]).expect("runs");
        let b = fused_net.run(&[x.view()]).expect("runs");
        let scale = a[0].iter().fold(1f32, |m, v| m.max(v.abs()));
        let diff = a[0].iter().zip(b[0].iter()).fold(0f32, |m, (p, q)| m.max((p - q).abs())) / scale;
        assert!(diff <= 1e-4, "fused and unfused differ by {diff:e}");

        let (mut tu, mut tf) = (vec![], vec![]);
        for _ in 0..iters {
            let t = Instant::now();
            std::hint::black_box(fused_net.run(&[x.view()]).expect("runs"));
            tf.push(t.elapsed());
            let t = Instant::now();
            std::hint::black_box(unfused_net.run(&[x.view()]).expect("runs"));
            tu.push(t.elapsed());
        }
        let (mu, mf) = (median(&mut tu), median(&mut tf));
        println!(
            "{batch:>6} {iters:>5} {:>14} {:>14} {:>14} {:>14} {:>6.2}×",
            ms(mu),
            ms(mf),
            ms(tu[0]),
            ms(tf[0]),
            mu.as_secs_f64() / mf.as_secs_f64()
        );
    }
}
