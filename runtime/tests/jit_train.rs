//! The JIT runs training graphs with the interpreter's numbers: every training op (the
//! train-mode forward, each loss and each backward op, over the grid of the finite-difference
//! tests) on fixed cases, random conv/pool/Linear nets by proptest, at 1 and 2 threads, on
//! the micro-kernel and the portable paths; every output of the training graph (loss,
//! prediction, each parameter's gradient, batch statistics, input gradient) within
//! `1e-5 · max(1, max |want|)`. And `Compiled::set_weights` gives what a fresh compilation
//! of the new weights gives, bit for bit.

mod jit_common;

use cnnc_compiler::Graph;
use cnnc_compiler::autodiff::{self, GradSpec, Mode, Seed, TrainGraph};
use cnnc_compiler::dsl::compile_str;
use cnnc_compiler::ops::train::{Loss, Reduction};
use cnnc_runtime::weights::Weights;
use cnnc_runtime::{Compiled, ConvAlgorithm, Error, Kernels, Options, interp};
use jit_common::{error, random, weights};
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;

const TOL: f32 = 1e-5;

fn graph(src: &str) -> Graph {
    let out = compile_str(src);
    assert!(!out.has_errors(), "{src}: {:?}", out.errors().map(|d| d.full_message()).collect::<Vec<_>>());
    out.nets.last().unwrap().clone()
}

fn layer(text: &str, shape: &[usize]) -> Graph {
    let dims: Vec<String> = shape[1..].iter().map(|d| d.to_string()).collect();
    graph(&format!("net L(x: [N, {}]) = Sequential({text});", dims.join(", ")))
}

/// The training graph of `g` (gradients of the parameters and of the input `x`).
fn training(g: &Graph, mode: Mode, loss: Option<Loss>) -> TrainGraph {
    let has_params = g.params.iter().any(|p| p.spec.kind != cnnc_compiler::ops::ParamKind::Buffer);
    let seed = loss.map_or(Seed::OutputGrad, Seed::Loss);
    let spec = GradSpec { seed, output: None, mode, params: has_params, wrt: vec!["x".into()] };
    autodiff::build(g, &spec).unwrap_or_else(|e| panic!("{e}\n{g}"))
}

/// Inputs of a training graph at batch `n`: random forward inputs, a valid target for the
/// loss (or a random output gradient), masks of 0 and 1/(1 − p).
fn train_inputs(tg: &TrainGraph, loss: Option<&Loss>, n: usize, seed: u64) -> Vec<ArrayD<f32>> {
    let g = &tg.graph;
    g.inputs
        .iter()
        .enumerate()
        .map(|(i, (_, id))| {
            let shape = g.node(*id).ty.concrete(n);
            let r = random(&shape, seed + i as u64);
            if i == tg.seed_input {
                match loss {
                    Some(Loss::CrossEntropy { .. }) => {
                        let classes = g.node(g.outputs[tg.prediction].1).ty.dims[0];
                        ArrayD::from_shape_fn(IxDyn(&shape), |ix| ((ix[0] * 7 + 3) % classes) as f32)
                    }
                    Some(Loss::BceWithLogits { .. }) => r.mapv(|v| (v + 1.0) / 2.0),
                    _ => r,
                }
            } else if let Some(m) = tg.masks.iter().find(|m| m.input == i) {
                let keep = (1.0 / (1.0 - m.p)) as f32;
                r.mapv(|v| if v > 0.0 { keep } else { 0.0 })
            } else {
                r
            }
        })
        .collect()
}

/// The worst error of the JIT against the interpreter over every output of `tg`.
fn jit_error(tg: &TrainGraph, w: &Weights, xs: &[ArrayD<f32>], opts: &Options) -> f32 {
    jit_error_with(tg, w, xs, opts, Kernels::Auto).unwrap_or(0.0)
}

/// As [`jit_error`] with the given micro-kernels; `None` when the CPU lacks them.
fn jit_error_with(tg: &TrainGraph, w: &Weights, xs: &[ArrayD<f32>], opts: &Options, kernels: Kernels) -> Option<f32> {
    jit_error_except(tg, w, xs, opts, kernels, &[])
}

/// As [`jit_error_with`], not comparing the outputs named in `skip`.
fn jit_error_except(
    tg: &TrainGraph,
    w: &Weights,
    xs: &[ArrayD<f32>],
    opts: &Options,
    kernels: Kernels,
    skip: &[&str],
) -> Option<f32> {
    let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
    let want = interp::run(&tg.graph, w, &views).unwrap_or_else(|e| panic!("interp: {e}"));
    let net = match Compiled::with_kernels(&tg.graph, w, opts, kernels) {
        Ok(net) => net,
        Err(Error::Unsupported(why)) if why.contains("cannot run") => return None,
        Err(e) => panic!("compile ({kernels:?}): {e}\n{}", tg.graph),
    };
    // With several threads, every kernel that can be shared is: sample-wise kernels by
    // ranges of samples (a range may be empty), weight gradients by column tiles.
    let net = if opts.threads > 1 { net.with_parallel_threshold(0) } else { net };
    let got = net.run(&views).unwrap_or_else(|e| panic!("run: {e}"));
    assert_eq!(got.len(), want.len());
    jit_common::assert_overwrites(&net, &views, &got);
    Some(
        got.iter()
            .zip(&want)
            .zip(&tg.graph.outputs)
            .filter(|(_, (name, _))| !skip.contains(&name.as_str()))
            .map(|((a, b), (name, _))| {
                let e = error(a, b);
                assert!(e <= TOL, "output `{name}` ({kernels:?}): error {e:e}\n{}", tg.graph);
                e
            })
            .fold(0f32, f32::max),
    )
}

/// Checks `g` in `mode` with `loss` at batch `n`, on both paths and two thread counts.
fn check(g: &Graph, mode: Mode, loss: Option<Loss>, n: usize, seed: u64) {
    let tg = training(g, mode, loss.clone());
    let w = weights(g, seed);
    let xs = train_inputs(&tg, loss.as_ref(), n, seed);
    for (portable, threads) in [(false, 1), (true, 2), (false, 2)] {
        jit_error(&tg, &w, &xs, &Options { threads, portable, fuse: true, ..Default::default() });
    }
    // The AVX2 register tiles (16-column GEMM tiles, 8-channel halves), where the CPU has them.
    jit_error_with(
        &tg,
        &w,
        &xs,
        &Options { threads: 2, portable: false, fuse: true, ..Default::default() },
        Kernels::Avx2,
    );
}

#[test]
fn conv_training_matches_the_interpreter() {
    for text in [
        "Conv2d(2, 3, 3)",
        "Conv2d(2, 3, 3, stride = 2, padding = 1)",
        "Conv2d(2, 3, (2, 3), stride = (1, 2), padding = (2, 1), bias = False)",
        "Conv2d(2, 3, 3, padding = \"same\", dilation = 2)",
        "Conv2d(2, 3, 2, padding = \"same\")",
        "Conv2d(4, 6, 3, groups = 2)",
        "Conv2d(4, 4, 3, groups = 4, padding = 1)",
        "Conv2d(2, 3, 3, padding = 2, padding_mode = \"reflect\")",
        "Conv2d(2, 3, 3, stride = 2, padding = (1, 2), padding_mode = \"replicate\")",
        "Conv2d(2, 3, 3, padding = 2, dilation = 2, padding_mode = \"circular\")",
        "Conv2d(20, 18, 3, padding = 1)",
    ] {
        let c = text.split(['(', ',']).nth(1).unwrap().trim().parse::<usize>().unwrap();
        check(&layer(text, &[2, c, 5, 6]), Mode::Train, None, 2, 1);
    }
}

/// The GEMM forms of Conv2d and Linear backward (`blocked/gemm_grad.rs`) at shapes that
/// reach every edge of their loops: several column tiles and a narrower last one, row
/// blocks and a remainder, several sample blocks and a partial last one, one sample per
/// block (≥ 256 pixels), several rows per sample.
#[test]
fn gemm_shapes_match_the_interpreter() {
    for (text, shape) in [
        ("Conv2d(70, 9, 3, padding = 1)", vec![19, 70, 6, 6]),
        // A 3×3 map with a 2.3 MB weight gradient: blocks of ≥ 1024 reduction steps.
        ("Conv2d(256, 250, 3, padding = 1)", vec![7, 256, 3, 3]),
        ("Conv2d(3, 8, 3)", vec![3, 3, 20, 20]),
        // Few taps: threads share the weight gradient by sample blocks, each into a partial;
        // one block of 8 samples (two threads: the first part has none).
        ("Conv2d(2, 5, 3, padding = 1)", vec![3, 2, 6, 6]),
        // Maps of > 4096 pixels: the weight gradient reduces chunks of output rows (stride 1
        // and 2, a ragged last chunk).
        ("Conv2d(1, 4, 3, padding = 1)", vec![2, 1, 70, 66]),
        ("Conv2d(2, 3, 3, stride = 2, padding = 1)", vec![2, 2, 140, 132]),
        ("Conv2d(8, 10, 3, stride = 2, groups = 2, padding = 1, padding_mode = \"reflect\")", vec![13, 8, 9, 7]),
        ("Linear(130, 70)", vec![300, 130]),
        ("Linear(50, 7)", vec![100, 3, 50]),
    ] {
        check(&layer(text, &shape), Mode::Train, None, shape[0], 3);
    }
}

/// Max-pool backward sends a window's gradient to its first maximum: inputs with many ties
/// (and a NaN, and a corner of −∞ where padded windows hold nothing greater, so the first
/// tap inside the input wins) on the tiled fast path, the padded vector path and the
/// general one; `MaxPool2d(2)` on planes it tiles exactly (its four-windows-at-a-time form,
/// with 0–3 windows left over per row).
#[test]
fn max_pool_ties_go_to_the_first_maximum() {
    for (text, hw) in [
        ("MaxPool2d(2)", [7, 6]),
        ("MaxPool2d(2)", [6, 10]),
        ("MaxPool2d(2)", [4, 16]),
        ("MaxPool2d(2)", [8, 14]),
        ("MaxPool2d(2)", [2, 6]),
        ("MaxPool2d(3)", [7, 6]),
        ("MaxPool2d(2, stride = 1)", [7, 6]),
        ("MaxPool2d(3, stride = 2, padding = 1)", [7, 6]),
        ("MaxPool2d(3, stride = 3, padding = 1, ceil_mode = True)", [7, 6]),
        ("MaxPool2d(2, stride = 1, dilation = 2, padding = 1)", [7, 6]),
    ] {
        let g = layer(text, &[2, 3, hw[0], hw[1]]);
        let tg = training(&g, Mode::Train, None);
        let w = weights(&g, 0);
        let mut xs = train_inputs(&tg, None, 2, 5);
        xs[0].mapv_inplace(|v| (v * 1.5).round());
        xs[0][[1, 2, 3.min(hw[0] - 1), 3]] = f32::NAN;
        xs[0][[0, 2, 1, 1]] = f32::NAN;
        xs[0][[1, 0, 0, 5]] = f32::NAN;
        for y in 0..3.min(hw[0]) {
            for x in 0..3 {
                xs[0][[0, 1, y, x]] = f32::NEG_INFINITY;
            }
        }
        for (portable, threads) in [(false, 1), (true, 1)] {
            jit_error(&tg, &w, &xs, &Options { threads, portable, fuse: true, ..Default::default() });
        }
    }
}

/// The training ops that take a convolution's blocked result as it is (no reorder):
/// train-mode BatchNorm (statistics, normalisation, both gradients), a max-pool whose
/// windows tile the map (exactly, with rows and columns left over, with a
/// partial last block of channels), an activation's gradient, a Conv2d's bias gradient and
/// its weight gradient from a blocked output gradient and a blocked input (the GEMM form —
/// 1×1, 5×5, strided, zero-padded unevenly, a partial block of input channels — and
/// Winograd's 3×3; a reflect-padded one takes its input plain), each against the
/// interpreter on both ISAs and thread counts.
#[test]
fn blocked_backward_matches_the_interpreter() {
    for (text, shape) in [
        ("Conv2d(3, 16, 3, padding = 1), MaxPool2d(2)", &[2, 3, 8, 8][..]),
        ("Conv2d(3, 20, 3, padding = 1), MaxPool2d(2)", &[2, 3, 7, 9]),
        ("Conv2d(3, 16, 1), MaxPool2d(3)", &[3, 3, 10, 9]),
        ("Conv2d(3, 16, 1), MaxPool2d((1, 2))", &[2, 3, 3, 5]),
        // Overlapping or padded windows: the scatter form.
        ("Conv2d(3, 16, 1), MaxPool2d(3, stride = 2, padding = 1)", &[2, 3, 9, 8]),
        ("Conv2d(3, 20, 1), MaxPool2d(3, stride = 1)", &[2, 3, 5, 6]),
        ("Conv2d(3, 16, 1), MaxPool2d(2, dilation = 2, padding = 1)", &[2, 3, 6, 7]),
        ("Conv2d(3, 16, 1), MaxPool2d(3, stride = 2, ceil_mode = True)", &[2, 3, 8, 8]),
        // Stride past the kernel: rows between and below the windows get no gradient.
        ("Conv2d(3, 16, 1), MaxPool2d(2, stride = 3)", &[2, 3, 7, 8]),
        ("Conv2d(3, 16, 1), ReLU(), MaxPool2d(2), Conv2d(16, 24, 5, padding = 2), Tanh()", &[2, 3, 8, 6]),
        ("Conv2d(3, 16, 1), Sigmoid(), Conv2d(16, 16, 3, stride = 2, padding = 1), ReLU()", &[2, 3, 9, 8]),
        ("Conv2d(16, 20, 3, padding = 1), ReLU(), Conv2d(20, 16, 3, padding = 1), LeakyReLU(0.1)", &[2, 16, 12, 12]),
        ("Conv2d(3, 32, 1), ReLU6(), Conv2d(32, 16, 1, bias = False), MaxPool2d(2)", &[2, 3, 6, 6]),
        ("Conv2d(3, 20, 1), ReLU(), Conv2d(20, 8, 3, padding = (1, 2))", &[3, 3, 5, 7]),
        // Train-mode BatchNorm on blocked values: a partial last block, no affine parameters.
        (
            "Conv2d(3, 20, 3, padding = 1), BatchNorm2d(20), ReLU(), Conv2d(20, 16, 3, padding = 1), BatchNorm2d(16, affine = False)",
            &[3, 3, 6, 6],
        ),
        ("Conv2d(3, 16, 1), ReLU(), Conv2d(16, 16, 3, padding = 1, padding_mode = \"reflect\")", &[2, 3, 5, 6]),
    ] {
        check(&layer(text, shape), Mode::Train, None, shape[0], 4);
    }
}

/// The shifted-row form of a stride-1 Conv2d's weight gradient (kernels 3–6 wide, ≥ 16
/// output channels, a padded width at most 4/3 of the output's): plain and blocked inputs
/// and output gradients, zero, reflect and no padding, a partial block of output channels,
/// widths that are not a multiple of four, one to four channels' rows of taps per tile, each
/// against the interpreter on both ISAs and thread counts (with few taps, two threads take
/// the GEMM form).
#[test]
fn shifted_row_weight_gradients_match_the_interpreter() {
    for (text, shape) in [
        ("Conv2d(3, 32, 5, padding = 2)", &[2, 3, 13, 18][..]),
        ("Conv2d(3, 16, 1), ReLU(), Conv2d(16, 17, 5, padding = 2), MaxPool2d(2)", &[2, 3, 12, 12]),
        ("Conv2d(5, 19, (3, 5), padding = (1, 2), padding_mode = \"reflect\")", &[3, 5, 9, 16]),
        ("Conv2d(4, 16, (3, 4))", &[2, 4, 10, 17]),
        ("Conv2d(2, 16, (2, 6), padding = (0, 1))", &[2, 2, 5, 20]),
        ("Conv2d(3, 16, 1), Tanh(), Conv2d(16, 33, 5, padding = 2), ReLU()", &[2, 3, 12, 13]),
        // Enough taps for two threads to keep this form: a plain output gradient into a
        // narrow last AVX2 tile (3 of 8 columns).
        ("Conv2d(6, 19, 5, padding = 2)", &[2, 6, 12, 12]),
        // Several channels' rows of taps stacked in one tile: four (3×3, 12 rows), three
        // (20 output channels), and the (ky, c, kx) order of the rows back into `dW`.
        ("Conv2d(12, 16, 3, padding = 1)", &[2, 12, 9, 10]),
        ("Conv2d(9, 20, 3, padding = 1, padding_mode = \"reflect\")", &[2, 9, 7, 11]),
    ] {
        check(&layer(text, shape), Mode::Train, None, shape[0], 4);
    }
}

/// A blocked max-pool backward (a 1×1 convolution with identity weights ahead of it keeps
/// the input's ties and NaNs, on the blocked layout; its last channel is −∞ everywhere, so
/// a padded window's first tap inside the input must win) sends each window's gradient to
/// its first maximum like the plain kernels and the interpreter, on tiling and on
/// overlapping, padded windows.
#[test]
fn blocked_max_pool_ties_go_to_the_first_maximum() {
    for (text, hw) in [
        ("MaxPool2d(2)", [6, 8]),
        ("MaxPool2d(2)", [7, 9]),
        ("MaxPool2d(3)", [6, 7]),
        ("MaxPool2d(3, stride = 2, padding = 1)", [7, 6]),
        ("MaxPool2d(2, stride = 1)", [5, 6]),
        ("MaxPool2d(3, stride = 2, padding = 1, ceil_mode = True)", [6, 8]),
    ] {
        let g = layer(&format!("Conv2d(16, 16, 1), {text}"), &[2, 16, hw[0], hw[1]]);
        let tg = training(&g, Mode::Train, None);
        let mut w = weights(&g, 0);
        let ids: Vec<_> = (0..g.params.len()).map(cnnc_compiler::ParamId).collect();
        for (id, p) in ids.iter().zip(&g.params) {
            let v = w.f32_values_mut(*id).unwrap();
            if p.name.ends_with("weight") {
                for (i, x) in v.iter_mut().enumerate() {
                    *x = if i % 17 == 0 && i < 15 * 17 { 1.0 } else { 0.0 };
                }
            } else {
                v.fill(0.0);
                v[15] = f32::NEG_INFINITY;
            }
        }
        let mut xs = train_inputs(&tg, None, 2, 5);
        xs[0].mapv_inplace(|v| (v * 1.5).round());
        xs[0][[1, 2, 3, 3]] = f32::NAN;
        xs[0][[0, 5, 1, 1]] = f32::NAN;
        if hw[0] >= 7 {
            // Two NaNs in windows whose last row is padding: the later one takes the gradient.
            xs[0][[1, 4, 5, 2]] = f32::NAN;
            xs[0][[1, 4, 6, 3]] = f32::NAN;
        }
        jit_error(&tg, &w, &xs, &Options { threads: 1, ..Default::default() });
        jit_error_with(&tg, &w, &xs, &Options { threads: 2, ..Default::default() }, Kernels::Avx2);
    }
}

#[test]
fn pool_training_matches_the_interpreter() {
    for text in [
        "MaxPool2d(2)",
        "MaxPool2d(3, stride = 2, padding = 1)",
        "MaxPool2d(3, stride = 2, ceil_mode = True)",
        "MaxPool2d(2, dilation = 2, padding = 1)",
        "MaxPool2d(3, stride = 1)",
        "AvgPool2d(3, stride = 2, padding = 1)",
        "AvgPool2d(3, stride = 2, padding = 1, count_include_pad = False, ceil_mode = True)",
        "AvgPool2d(2, divisor_override = 3)",
        "AdaptiveAvgPool2d((3, 2))",
        "AdaptiveAvgPool2d((5, 11))",
    ] {
        check(&layer(&format!("Conv2d(2, 2, 1), {text}"), &[2, 2, 7, 8]), Mode::Train, None, 3, 2);
    }
    // Windows two cells wide tiling the map exactly (the vector average-pool backward), an
    // odd number of them per row (its scalar last window) and an even one.
    for (text, shape) in [
        ("AvgPool2d(2)", &[2, 2, 6, 10][..]),
        ("AvgPool2d((3, 2), divisor_override = 5)", &[2, 2, 6, 10]),
        ("AvgPool2d(2, stride = 2)", &[2, 2, 4, 16]),
        ("AvgPool2d((1, 2))", &[2, 2, 3, 2]),
    ] {
        check(&layer(&format!("Conv2d(2, 2, 1), {text}"), shape), Mode::Train, None, 3, 2);
    }
}

/// A training graph runs an activation, and a residual add before it, as the epilogue of
/// the Conv2d or Linear before them (`TRAINING_PIPELINE`): fewer kernels, the same values,
/// whichever kernel computes the convolution (blocked tiles, the GEMM form of a grouped
/// reflect-padded one, the plane tiles), and new weights still apply.
#[test]
fn training_graphs_fuse_activations_and_residual_adds() {
    let g = graph(
        "net E(x: [N, 2, 6, 7]) {
            p = Conv2d(2, 4, 3, padding = 1);
            a = Conv2d(4, 16, 3, padding = 1);
            b = Conv2d(16, 16, 3, padding = 1, groups = 2, padding_mode = \"reflect\");
            c = Conv2d(16, 16, 1);
            f = Flatten();
            fc = Linear(672, 3);
            fn forward(self, x) {
                let q = sigmoid(self.p(x));
                let y = tanh(self.a(q));
                let z = relu(self.b(y) + y);
                let u = tanh(self.c(z) + z);
                sigmoid(self.fc(self.f(u)))
            }
        }",
    );
    let loss = Loss::Mse { reduction: Reduction::Mean };
    let tg = training(&g, Mode::Train, Some(loss.clone()));
    let w = weights(&g, 3);
    let xs = train_inputs(&tg, Some(&loss), 3, 3);
    let unfused = Compiled::new(&tg.graph, &w, &Options { threads: 1, fuse: false, ..Default::default() }).unwrap();
    let fused = Compiled::new(&tg.graph, &w, &Options { threads: 1, ..Default::default() }).unwrap();
    // Five activations and two adds fewer.
    assert_eq!(fused.kernel_count() + 7, unfused.kernel_count());
    check(&g, Mode::Train, Some(loss), 3, 3);
    // New weights go into the fused kernels as into the unfused ones.
    let w2 = weights(&g, 4);
    let mut fused = fused;
    fused.set_weights(&w2).unwrap();
    let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
    let want = interp::run(&tg.graph, &w2, &views).unwrap();
    for (got, want) in fused.run(&views).unwrap().iter().zip(&want) {
        assert!(error(got, want) <= TOL, "after set_weights: error {:e}", error(got, want));
    }
}

#[test]
fn batchnorm_linear_activations_dropout_match_the_interpreter() {
    for (text, shape) in [
        ("Conv2d(3, 3, 1), BatchNorm2d(3)", &[3, 3, 2, 3][..]),
        ("Conv2d(3, 3, 1), BatchNorm2d(3, affine = False, momentum = None)", &[3, 3, 2, 3]),
        ("Conv2d(3, 3, 1), BatchNorm2d(3, track_running_stats = False)", &[3, 3, 2, 3]),
        ("Linear(4, 3)", &[3, 4]),
        ("Linear(4, 3, bias = False)", &[2, 3, 4]),
        ("Linear(4, 5), Sigmoid(), Linear(5, 2)", &[2, 4]),
        ("Linear(4, 5), Tanh(), Dropout(0.3), Linear(5, 2)", &[2, 4]),
        ("Linear(4, 5), ReLU(), Linear(5, 2)", &[2, 4]),
        ("Linear(4, 5), Hardtanh(-0.2, 0.3), Linear(5, 2), ReLU6()", &[2, 4]),
        ("Conv2d(3, 2, 1), Flatten(start_dim = 2)", &[2, 3, 2, 2]),
        ("Conv2d(3, 2, 3, padding = (1, 0, 0, 2)), Flatten()", &[2, 3, 4, 4]),
        ("Conv2d(3, 4, 3, padding = 1), ReLU(), Dropout(0.5), Flatten(), Linear(24, 3)", &[2, 3, 2, 3]),
    ] {
        for mode in [Mode::Train, Mode::Eval] {
            check(&layer(text, shape), mode, None, shape[0], 3);
        }
    }
}

#[test]
fn cat_add_mean_amax_match_the_interpreter() {
    let src = "net B(x: [N, 2, 4, 5]) {
        a = Conv2d(2, 3, 3, padding = 1);
        c = Conv2d(5, 5, 1);
        bn = BatchNorm2d(5);
        fc = Linear(5, 2);
        fn forward(self, x) {
            let y = cat([tanh(self.a(x)), x], dim = 1);
            let z = self.bn(self.c(y)) + y;
            self.fc(z.mean(dim = [2, 3]) + z.mean(dim = 3, keepdim = True).mean(dim = [2, 3]))
        }
    }";
    check(&graph(src), Mode::Train, None, 3, 4);
    for body in ["self.c(x).amax(dim = (2, 3))", "self.c(x).amax(dim = 1, keepdim = True)"] {
        let src = format!("net M(x: [N, 3, 4, 5]) {{ c = Conv2d(3, 3, 1); fn forward(self, x) {{ {body} }} }}");
        check(&graph(&src), Mode::Train, None, 2, 6);
    }
}

#[test]
fn losses_match_the_interpreter() {
    let g = graph("net P(x: [N, 6]) = Sequential(Linear(6, 4));");
    for loss in [
        Loss::Mse { reduction: Reduction::Mean },
        Loss::Mse { reduction: Reduction::Sum },
        Loss::CrossEntropy { reduction: Reduction::Mean, label_smoothing: 0.0 },
        Loss::CrossEntropy { reduction: Reduction::Sum, label_smoothing: 0.2 },
        Loss::BceWithLogits { reduction: Reduction::Mean, pos_weight: None },
        Loss::BceWithLogits { reduction: Reduction::Sum, pos_weight: Some(vec![0.5, 1.0, 2.0, 3.0]) },
    ] {
        check(&g, Mode::Train, Some(loss), 5, 5);
    }
}

#[test]
fn a_lenet_and_a_residual_net_match_the_interpreter() {
    let lenet = graph(
        "net LeNet(x: [N, 1, 28, 28]) = Sequential(
            Conv2d(1, 6, 5, padding = 2), Sigmoid(), AvgPool2d(2, stride = 2),
            Conv2d(6, 16, 5), Sigmoid(), AvgPool2d(2, stride = 2), Flatten(),
            Linear(400, 120), Sigmoid(), Linear(120, 84), Sigmoid(), Linear(84, 10));",
    );
    check(&lenet, Mode::Train, Some(Loss::CrossEntropy { reduction: Reduction::Mean, label_smoothing: 0.0 }), 4, 7);
    let res = graph(
        "net R(x: [N, 3, 8, 8]) {
            c1 = Conv2d(3, 16, 3, padding = 1, bias = False);
            b1 = BatchNorm2d(16);
            c2 = Conv2d(16, 16, 3, padding = 1, bias = False);
            b2 = BatchNorm2d(16);
            p = MaxPool2d(2);
            g = AdaptiveAvgPool2d(1);
            f = Flatten();
            fc = Linear(16, 1);
            fn forward(self, x) {
                let y = relu(self.b1(self.c1(x)));
                let z = relu(self.b2(self.c2(y)) + y);
                self.fc(self.f(self.g(self.p(z))))
            }
        }",
    );
    for mode in [Mode::Train, Mode::Eval] {
        check(&res, mode, Some(Loss::BceWithLogits { reduction: Reduction::Mean, pos_weight: None }), 3, 8);
    }
}

/// The stride-1 3×3 convolutions of a training graph — forward, and the input gradients
/// run as convolutions with the flipped weights — on either algorithm.
#[test]
fn winograd_and_direct_training_steps_match_the_interpreter() {
    let g = graph(
        "net W(x: [N, 16, 9, 10]) = Sequential(
            Conv2d(16, 32, 3, padding = 1), ReLU(), Conv2d(32, 24, 3), BatchNorm2d(24), ReLU(),
            AdaptiveAvgPool2d(1), Flatten(), Linear(24, 5));",
    );
    let loss = Loss::CrossEntropy { reduction: Reduction::Mean, label_smoothing: 0.0 };
    let tg = training(&g, Mode::Train, Some(loss.clone()));
    let w = weights(&g, 4);
    let xs = train_inputs(&tg, Some(&loss), 3, 4);
    for conv in [ConvAlgorithm::Winograd, ConvAlgorithm::Direct] {
        for threads in [1, 2] {
            let opts = Options { threads, portable: false, fuse: true, conv };
            jit_error(&tg, &w, &xs, &opts);
            let net = Compiled::new(&tg.graph, &w, &opts).unwrap();
            let chosen: Vec<_> = net.conv_choices().iter().filter(|c| c.algorithm == conv).collect();
            // Both forward convolutions, and the input gradient of each (of `x` too).
            assert!(chosen.len() >= 4, "{conv:?}: {:?}", net.conv_choices());
        }
    }
}

/// Weight gradients as Winograd (forced): 3×3 and 5×5, padding 0–3 and one-sided, odd and
/// even maps (tiles past the map), input channels that leave a partial block or fill more
/// than one register tile's four, output channels in several groups with a partial last
/// block, several chunks of tiles per sample, each ISA, one and two threads — every
/// output of the step against the interpreter: at [`TOL`], except F(2×2, 5×5)'s weight
/// gradient at [`WGRAD_5X5_TOL`] (measured 3.7e-6 – 1.0e-5 of the largest gradient here:
/// its transforms magnify the inputs ~100× before the long f32 sums over tiles cancel —
/// which is why the default chooses it only for 3×3 kernels, at 2–5e-7).
#[test]
fn winograd_weight_gradients_match_the_interpreter() {
    for (text, shape) in [
        ("Conv2d(16, 32, 3, padding = 1)", vec![3, 16, 8, 8]),
        ("Conv2d(17, 33, 3)", vec![2, 17, 9, 7]),
        ("Conv2d(70, 80, 3, padding = 2)", vec![2, 70, 5, 6]),
        ("Conv2d(20, 24, 3, padding = (1, 0, 2, 1))", vec![2, 20, 21, 18]),
        ("Conv2d(32, 32, 5, padding = 2)", vec![3, 32, 16, 16]),
        ("Conv2d(3, 16, 5, padding = 3)", vec![2, 3, 7, 9]),
        ("Conv2d(40, 20, 5)", vec![2, 40, 9, 8]),
    ] {
        let g = layer(text, &shape);
        let tg = training(&g, Mode::Train, None);
        let w = weights(&g, 8);
        let xs = train_inputs(&tg, None, shape[0], 8);
        let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
        let want = interp::run(&tg.graph, &w, &views).unwrap();
        let five = text.contains(", 5");
        for kernels in [Kernels::Avx512, Kernels::Avx2] {
            for threads in [1, 2] {
                let opts = Options { threads, portable: false, fuse: false, conv: ConvAlgorithm::Winograd };
                let net = match Compiled::with_kernels(&tg.graph, &w, &opts, kernels) {
                    Ok(net) => net.with_parallel_threshold(0),
                    Err(Error::Unsupported(why)) if why.contains("cannot run") => continue,
                    Err(e) => panic!("{e}"),
                };
                let wgrad = net.conv_choices().iter().find(|c| c.node.ends_with("weight.grad"));
                assert!(wgrad.is_some_and(|c| c.algorithm == ConvAlgorithm::Winograd), "{:?}", net.conv_choices());
                let got = net.run(&views).unwrap();
                for ((a, b), (name, _)) in got.iter().zip(&want).zip(&tg.graph.outputs) {
                    let tol = if five && name == "grad.0.weight" { WGRAD_5X5_TOL } else { TOL };
                    let e = error(a, b);
                    assert!(e <= tol, "{text} ({kernels:?}, {threads} threads) `{name}`: {e:e}");
                }
            }
        }
    }
}

/// The tolerance of a forced F(2×2, 5×5) weight gradient against the interpreter (see
/// [`winograd_weight_gradients_match_the_interpreter`]).
const WGRAD_5X5_TOL: f32 = 3e-5;

#[test]
fn set_weights_equals_a_fresh_compilation() {
    let g = graph(
        "net S(x: [N, 3, 6, 6]) = Sequential(Conv2d(3, 16, 3, padding = 1), BatchNorm2d(16), ReLU(),
            MaxPool2d(2), Flatten(), Linear(144, 5));",
    );
    let loss = Loss::CrossEntropy { reduction: Reduction::Mean, label_smoothing: 0.0 };
    for (graph_to_run, name) in
        [(training(&g, Mode::Train, Some(loss.clone())).graph, "training"), (g.clone(), "forward")]
    {
        let (w1, w2) = (weights(&g, 11), weights(&g, 12));
        let tg = training(&g, Mode::Train, Some(loss.clone()));
        let xs = if name == "training" { train_inputs(&tg, Some(&loss), 4, 3) } else { vec![random(&[4, 3, 6, 6], 3)] };
        let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
        for portable in [false, true] {
            let opts = Options { threads: 1, portable, fuse: false, ..Default::default() };
            let mut net = Compiled::new(&graph_to_run, &w1, &opts).unwrap();
            net.set_weights(&w2).unwrap();
            let fresh = Compiled::new(&graph_to_run, &w2, &opts).unwrap();
            assert_eq!(net.run(&views).unwrap(), fresh.run(&views).unwrap(), "{name}, portable {portable}");
        }
    }
    // A fused model cannot take new weights, and weights of another net are refused.
    let mut fused = Compiled::new(&g, &weights(&g, 1), &Options::default()).unwrap();
    assert!(fused.set_weights(&weights(&g, 2)).unwrap_err().to_string().contains("fuse"));
    let mut plain = Compiled::new(&g, &weights(&g, 1), &Options { fuse: false, ..Options::default() }).unwrap();
    let other = graph("net O(x: [N, 3]) = Sequential(Linear(3, 2));");
    assert!(plain.set_weights(&weights(&other, 1)).is_err());
}

/// Every packing a training graph replays (Winograd 3×3 and 5×5 forward, input and weight
/// gradients, direct strided and 1×1 convolutions, GEMM forms, Linear), taking new weights
/// several times (a replay writes only what the first lowering wrote, into storage it does
/// not zero again), at 1 and 2 threads; and `run_reusing` handed the last run's outputs
/// (non-zero, or of another batch's shapes) gives what `run` gives.
#[test]
fn set_weights_replays_every_packing_and_runs_reuse_outputs() {
    let g = graph(
        "net S(x: [N, 3, 12, 12]) = Sequential(Conv2d(3, 16, 3, padding = 1), BatchNorm2d(16), ReLU(),
            Conv2d(16, 32, 3, padding = 1), ReLU(), Conv2d(32, 32, 5, padding = 2), ReLU(),
            Conv2d(32, 32, 3, stride = 2, padding = 1), ReLU(), Conv2d(32, 16, 1), MaxPool2d(2),
            Flatten(), Linear(144, 5));",
    );
    let loss = Loss::CrossEntropy { reduction: Reduction::Mean, label_smoothing: 0.0 };
    let tg = training(&g, Mode::Train, Some(loss.clone()));
    let ws: Vec<Weights> = (21..24).map(|s| weights(&g, s)).collect();
    for conv in [ConvAlgorithm::Auto, ConvAlgorithm::Winograd, ConvAlgorithm::Direct] {
        for threads in [1, 2] {
            let opts = Options { threads, conv, fuse: false, ..Default::default() };
            let mut net = Compiled::new(&tg.graph, &ws[0], &opts).unwrap();
            let mut last: Vec<ArrayD<f32>> = vec![];
            for (round, k) in [1, 2, 0, 1].into_iter().enumerate() {
                net.set_weights(&ws[k]).unwrap();
                let fresh = Compiled::new(&tg.graph, &ws[k], &opts).unwrap();
                // Alternate batches, so reused outputs sometimes have other shapes.
                let n = if round % 2 == 0 { 4 } else { 3 };
                let xs = train_inputs(&tg, Some(&loss), n, round as u64);
                let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
                let want = fresh.run(&views).unwrap();
                let got = net.run_reusing(&views, std::mem::take(&mut last)).unwrap();
                assert_eq!(got, want, "{conv:?}, {threads} thread(s), round {round}");
                // Same shapes again, into the outputs just written (all non-zero sums).
                let again = net.run_reusing(&views, got).unwrap();
                assert_eq!(again, want, "{conv:?}, {threads} thread(s), round {round}, reused");
                last = again;
            }
        }
    }
}

/// A training graph repacks its weights every step, so small maps whose 2×2 tiles waste
/// more than 1.2× (7×7) do not get Winograd units beside the direct packing there, as they
/// do at inference; 6×6 ones still do.
#[test]
fn training_graphs_keep_one_packing_on_wasteful_small_maps() {
    for (hw, units_in_training) in [(7, false), (6, true)] {
        let g = layer("Conv2d(16, 16, 3, padding = 1)", &[2, 16, hw, hw]);
        let tg = training(&g, Mode::Train, None);
        let opts = Options { threads: 1, fuse: false, ..Default::default() };
        let choice = |graph: &Graph| {
            let net = Compiled::new(graph, &weights(&g, 1), &opts).unwrap();
            let c = net.conv_choices().iter().find(|c| c.node == "0").cloned().unwrap();
            (c.algorithm, c.reason)
        };
        let (inference, why) = choice(&g);
        assert_eq!(inference, ConvAlgorithm::Winograd, "{hw}×{hw} at inference: {why}");
        assert!(why.contains("in units of"), "{why}");
        let (train, why) = choice(&tg.graph);
        let want = if units_in_training { ConvAlgorithm::Winograd } else { ConvAlgorithm::Direct };
        assert_eq!(train, want, "{hw}×{hw} in training: {why}");
        if !units_in_training {
            assert!(why.contains("repack"), "{why}");
        }
    }
}

fn try_graph(src: &str) -> Option<Graph> {
    let out = compile_str(src);
    (!out.has_errors()).then(|| out.nets.last().unwrap().clone())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Random conv → activation → pool → Linear nets, trained with cross-entropy.
    #[test]
    fn random_nets_train_as_on_the_interpreter(
        groups in 1usize..=2, icg in 1usize..=3, ocg in 1usize..=5,
        k in 1usize..=3, stride in 1usize..=2, pad in 0usize..=1, dil in 1usize..=2,
        mode in 0usize..4, bias in any::<bool>(), bn in any::<bool>(),
        act in 0usize..5, pool in 0usize..4, h in 3usize..=9, w in 3usize..=9, n in 1usize..=3,
        eval in any::<bool>(), seed in any::<u64>(), portable in any::<bool>(), threads in 1usize..=2,
    ) {
        let (cin, cout) = (groups * icg, groups * ocg);
        let modes = ["zeros", "reflect", "replicate", "circular"];
        let acts = ["ReLU()", "Sigmoid()", "Tanh()", "ReLU6()", "LeakyReLU(0.1)"];
        let pools = ["MaxPool2d(2, ceil_mode = True)", "AvgPool2d(2, padding = 1)", "AdaptiveAvgPool2d(2)", "MaxPool2d(3, stride = 1, padding = 1)"];
        let bn_text = if bn { format!("BatchNorm2d({cout}), ") } else { String::new() };
        let body = format!(
            "Conv2d({cin}, {cout}, {k}, stride = {stride}, padding = {pad}, dilation = {dil}, groups = {groups}, bias = {}, padding_mode = \"{}\"), {bn_text}{}, {}",
            if bias { "True" } else { "False" }, modes[mode], acts[act], pools[pool],
        );
        let probe = try_graph(&format!("net P(x: [N, {cin}, {h}, {w}]) = Sequential({body});"));
        prop_assume!(probe.is_some());
        let probe = probe.unwrap();
        let feat: usize = probe.node(probe.outputs[0].1).ty.dims.iter().product();
        prop_assume!(feat > 0);
        let g = graph(&format!("net P(x: [N, {cin}, {h}, {w}]) = Sequential({body}, Flatten(), Linear({feat}, 3));"));
        prop_assume!(!bn || eval || n * feat / cout.max(1) > 1);
        let loss = Loss::CrossEntropy { reduction: Reduction::Mean, label_smoothing: 0.1 };
        let tg = training(&g, if eval { Mode::Eval } else { Mode::Train }, Some(loss.clone()));
        let wts = weights(&g, seed);
        let xs = train_inputs(&tg, Some(&loss), n, seed);
        // A 1×1 convolution of one input channel per group followed by train-mode BatchNorm:
        // each output channel is `w·x + b` normalised by its own batch statistics, so the
        // result depends on `b` not at all and on `w` only through BatchNorm's `eps` (by a
        // factor of about `eps / (w²·var x)`). Their gradients are nearly zero sums of large
        // terms, and what an f32 engine computes for them is rounding noise of the size of
        // `2⁻²⁴·Σ|dy·x|` (up to ~3e-5 in the shrunk failure persisted beside this file) —
        // not comparable at a fixed tolerance. The same holds for the bias of *any*
        // convolution before train-mode BatchNorm (the mean it adds is subtracted again): its
        // gradient is `Σ dx` of BatchNorm's input gradient, zero up to the rounding of large
        // terms (1.2e-5 at 2 values per channel in another persisted case). Every other
        // output still is compared.
        let zero_grads: &[&str] = match (bn && !eval, icg == 1 && k == 1) {
            (true, true) => &["grad.0.weight", "grad.0.bias"],
            (true, false) => &["grad.0.bias"],
            _ => &[],
        };
        let opts = Options { threads, portable, fuse: true, ..Default::default() };
        let e = jit_error_except(&tg, &wts, &xs, &opts, Kernels::Auto, zero_grads).unwrap_or(0.0);
        prop_assert!(e <= TOL);
    }
}
