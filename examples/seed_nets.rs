//! Every seed network of the study notes, compiled by the JIT and checked against the
//! reference interpreter (the program fails if any output differs by more than 1e-4 of its
//! max |y|), with compile time and batch-1 latency for both, measured in the same run
//! (random weights; PyTorch-made weights are checked in `tests/parity.rs`).
//!
//! ```text
//! cargo run --release --example seed_nets
//! ```

#[path = "zoo/mod.rs"]
mod zoo;

use cnnc::runtime::jit::{Compiled, Options};
use cnnc::runtime::{interp, weights::Weights};
use cnnc::{Graph, Net, Summary};
use ndarray::{ArrayD, IxDyn};
use std::error::Error;
use std::time::{Duration, Instant};

fn median_time(mut f: impl FnMut(), budget: Duration, max_runs: usize) -> Duration {
    let mut times = vec![];
    let start = Instant::now();
    while times.len() < max_runs && (times.len() < 3 || start.elapsed() < budget) {
        let t = Instant::now();
        f();
        times.push(t.elapsed());
    }
    times.sort();
    times[times.len() / 2]
}

fn fmt(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 { format!("{us:.1} µs") } else { format!("{:.2} ms", us / 1000.0) }
}

fn bench<N: Net>() -> Result<(), Box<dyn Error>> {
    let graph: Graph = N::graph();
    let mut weights = Weights::random(&graph, 0);
    weights.randomize_batchnorm(&graph, 1);
    let inputs: Vec<ArrayD<f32>> = graph
        .inputs
        .iter()
        .map(|(_, id)| {
            let shape = graph.node(*id).ty.concrete(1);
            let n: usize = shape.iter().product();
            ArrayD::from_shape_vec(IxDyn(&shape), (0..n).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect())
        })
        .collect::<Result<_, _>>()?;
    let views: Vec<_> = inputs.iter().map(|x| x.view()).collect();

    // The model takes a copy of the weights (made before the clock starts; the
    // interpreter below reads the original): its Linear layers are packed in their own
    // memory, as for weights loaded from a file and handed over.
    let given = weights.clone();
    let t = Instant::now();
    let model = Compiled::from_owned(&graph, given, &Options { threads: 1, ..Options::default() })?;
    let compile = t.elapsed();

    let jit_out = model.run(&views)?;
    let ref_out = interp::run(&graph, &weights, &views)?;
    let mut err = 0f32;
    for (a, b) in jit_out.iter().zip(&ref_out) {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        err = err.max(a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale);
    }
    let jit = median_time(|| drop(model.run(&views)), Duration::from_millis(500), 200);
    let reference = median_time(|| drop(interp::run(&graph, &weights, &views)), Duration::from_millis(500), 5);
    let macs = Summary::of(&graph).total_macs;
    println!(
        "{:<16} {:>12} {:>10.1} {:>6} {:>11} {:>12} {:>12} {:>8.1} {:>10.1e}",
        N::NAME,
        cnnc::compiler::summary::thousands(graph.param_count() as u64),
        macs as f64 / 1e6,
        model.kernel_count(),
        fmt(compile),
        fmt(jit),
        fmt(reference),
        2.0 * macs as f64 / jit.as_secs_f64() / 1e9,
        err
    );
    if !err.is_finite() || err > 1e-4 {
        return Err(format!("{}: the JIT differs from the interpreter by {err:e} of max |y|", N::NAME).into());
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn Error>> {
    println!(
        "{:<16} {:>12} {:>10} {:>6} {:>11} {:>12} {:>12} {:>8} {:>10}",
        "net", "params", "MMACs", "kern.", "JIT compile", "JIT b1", "interp. b1", "GFLOP/s", "max err"
    );
    bench::<zoo::LeNet>()?;
    bench::<zoo::Cifar10>()?;
    bench::<zoo::NoneLinearModel>()?;
    bench::<zoo::Conv1x2>()?;
    bench::<zoo::AlexNet>()?;
    bench::<zoo::SeedAlexNet>()?;
    bench::<zoo::ResNet18>()?;
    bench::<zoo::SeedResNet>()?;
    bench::<zoo::Vgg11>()?;
    Ok(())
}
