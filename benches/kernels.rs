//! Criterion benchmarks of the JIT, per layer and per net, each next to a baseline measured
//! in the same run: `cargo bench --bench kernels` (a filter selects groups, e.g.
//! `cargo bench --bench kernels -- conv`).
//!
//! - `conv/<shape>/<kernels>`: the four 3×3 convolutions of ResNet-18 (and its 1×1
//!   projection and 7×7 stem), batch 1, one thread, with the AVX-512 and AVX2 register
//!   tiles where the CPU has them and the portable Cranelift f32x4 code as the baseline.
//!   Throughput is in FLOP (2 per multiply-accumulate), so criterion's "elem/s" reads as
//!   FLOP/s.
//! - `linear/<shape>/<kernels>`: AlexNet's first classifier layer (9216 → 4096) at batch 1
//!   (a GEMV that streams 151 MB of weights) and batch 64.
//! - `net/<net>/<variant>`: whole seed nets at batch 1, one thread, fused (what
//!   `Compiled::new` does by default) against the declared, unfused graph.
//!
//! The convolutions' time is that of the conv kernel alone (`Compiled::profile`, as
//! `runtime/examples/conv_layers.rs` measures it: without the reorders between the plain and
//! the blocked layout that a lone conv needs and a net does once); the Linear layers' and
//! the nets' time is that of `Compiled::run` (input checks, output allocation, every
//! kernel).

#[path = "../examples/zoo/mod.rs"]
mod zoo;

use cnnc::Net;
use cnnc::compiler::ops::{Conv2d, Epilogue, Linear, Op, PaddingMode, PaddingSpec};
use cnnc::compiler::{Graph, GraphBuilder, TensorType};
use cnnc::runtime::weights::Weights;
use cnnc::runtime::{Compiled, Error, Kernels, Options};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ndarray::{ArrayD, IxDyn};
use std::hint::black_box;
use std::time::Duration;

/// A seeded input of `shape`, values in [-1, 1).
fn input(shape: &[usize]) -> ArrayD<f32> {
    let mut k = 0u64;
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        k = k.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (k >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    })
}

/// Every kernel variant, the portable baseline last; `Compiled::with_kernels` refuses the
/// ones this CPU lacks, and the benches skip those.
const VARIANTS: [Kernels; 3] = [Kernels::Avx512, Kernels::Avx2, Kernels::Portable];

/// One layer compiled with `kernels` on one thread; `None` if this CPU lacks them.
fn compile(g: &Graph, w: &Weights, kernels: Kernels) -> Option<Compiled> {
    match Compiled::with_kernels(g, w, &single(), kernels) {
        Err(Error::Unsupported(_)) => None,
        r => Some(r.expect("compiles")),
    }
}

fn one_layer(name: &str, op: Op, input: Vec<usize>) -> Graph {
    let mut b = GraphBuilder::new(name);
    let x = b.input("x", TensorType::new(input));
    let y = b.layer(name, op, &[x]).expect("a valid layer");
    b.output("y", y);
    b.finish()
}

fn single() -> Options {
    Options { threads: 1, portable: false, fuse: false, ..Default::default() }
}

/// The time of the conv kernel alone in one run (`Compiled::profile`): a lone conv on a
/// plain input also reorders its operand to the blocked layout and its result back, which
/// a net does once, not per layer.
fn conv_kernel_time(net: &Compiled, x: &ArrayD<f32>) -> Duration {
    let prof = net.profile(&[x.view()], 1).expect("runs");
    prof.iter().find(|k| k.name == "conv").expect("a conv kernel").min
}

fn conv_layers(c: &mut Criterion) {
    // The machine's speed varies (shared cores): one core's FMA peak right now, for scale.
    if let Some(peak) = cnnc::runtime::jit::peak_gflops() {
        eprintln!("one core's measured peak: {peak:.1} GFLOP/s");
    }
    let mut group = c.benchmark_group("conv");
    group.sample_size(20).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    // (in, out, kernel, stride, pad, size): ResNet-18's 3×3 convs, its 1×1/2 projection, its stem.
    for (ci, co, k, s, p, hw) in [
        (64, 64, 3, 1, 1, 56),
        (128, 128, 3, 1, 1, 28),
        (256, 256, 3, 1, 1, 14),
        (512, 512, 3, 1, 1, 7),
        (256, 512, 1, 2, 0, 14),
        (3, 64, 7, 2, 3, 224),
    ] {
        let conv = Conv2d {
            in_channels: ci,
            out_channels: co,
            kernel: (k, k),
            stride: (s, s),
            padding: PaddingSpec::Explicit(p, p),
            dilation: (1, 1),
            groups: 1,
            bias: true,
            padding_mode: PaddingMode::Zeros,
            epilogue: Epilogue::default(),
        };
        let g = one_layer("conv", Op::Conv2d(conv), vec![ci, hw, hw]);
        let w = Weights::random(&g, 0);
        let x = input(&[1, ci, hw, hw]);
        let out = (hw + 2 * p - k) / s + 1;
        group.throughput(Throughput::Elements(2 * (ci * co * k * k * out * out) as u64));
        let shape = format!("{k}x{k}s{s} {ci}->{co} at {hw}x{hw}");
        for kernels in VARIANTS {
            let Some(net) = compile(&g, &w, kernels) else { continue };
            group.bench_with_input(BenchmarkId::new(&shape, format!("{kernels:?}")), &x, |b, x| {
                b.iter_custom(|iters| (0..iters).map(|_| conv_kernel_time(&net, x)).sum());
            });
        }
    }
    group.finish();
}

fn linear_layers(c: &mut Criterion) {
    let mut group = c.benchmark_group("linear");
    group.sample_size(20).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    let lin = Linear { in_features: 9216, out_features: 4096, bias: true, epilogue: Epilogue::default() };
    let g = one_layer("fc", Op::Linear(lin), vec![9216]);
    let w = Weights::random(&g, 0);
    for batch in [1, 64] {
        let x = input(&[batch, 9216]);
        group.throughput(Throughput::Elements(2 * 9216 * 4096 * batch as u64));
        for kernels in VARIANTS {
            let Some(net) = compile(&g, &w, kernels) else { continue };
            let id = BenchmarkId::new(format!("9216->4096 b{batch}"), format!("{kernels:?}"));
            group.bench_with_input(id, &x, |b, x| b.iter(|| black_box(net.run(&[x.view()]).expect("runs"))));
        }
    }
    group.finish();
}

fn net<N: Net>(c: &mut Criterion, name: &str) {
    let graph = N::graph();
    let mut weights = Weights::random(&graph, 0);
    weights.randomize_batchnorm(&graph, 1);
    let shape = graph.node(graph.inputs[0].1).ty.concrete(1);
    let x = input(&shape);
    let mut group = c.benchmark_group("net");
    group.sample_size(20).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    for (variant, fuse) in [("fused", true), ("unfused", false)] {
        let model = Compiled::new(&graph, &weights, &Options { fuse, ..single() }).expect("compiles");
        group.bench_with_input(BenchmarkId::new(name, variant), &x, |b, x| {
            b.iter(|| black_box(model.run(&[x.view()]).expect("runs")));
        });
    }
    group.finish();
}

fn nets(c: &mut Criterion) {
    net::<zoo::LeNet>(c, "LeNet b1");
    net::<zoo::Cifar10>(c, "CIFAR-10 b1");
    net::<zoo::ResNet18>(c, "ResNet-18 b1");
}

criterion_group!(benches, conv_layers, linear_layers, nets);
criterion_main!(benches);
