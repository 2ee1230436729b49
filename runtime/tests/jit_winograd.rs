//! Winograd F(2×2, 3×3) and F(2×2, 5×5) convolutions against the reference interpreter: even and odd map
//! sizes, channel counts that leave padding lanes, several passes over the input channels,
//! units of one and of many tile rows, padding 0–2, every fused epilogue
//! (bias, BatchNorm's scale and shift, residual, activations), a batch, one and two threads
//! splitting every kernel, each micro-kernel ISA the host has — forced with
//! `ConvAlgorithm::Winograd`, and checked to have run.

mod jit_common;

use cnnc_compiler::ops::{Activation, Epilogue};
use cnnc_runtime::{Compiled, ConvAlgorithm, Kernels, Options, interp};
use jit_common::*;

fn run_case(what: &str, g: &cnnc_compiler::Graph, algo: ConvAlgorithm) -> usize {
    let w = weights(g, 3);
    let mut ran = 0;
    for n in [1, 2] {
        let xs = inputs(g, n, 9);
        let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
        let want = interp::run(g, &w, &views).unwrap();
        for kernels in [Kernels::Avx512, Kernels::Avx2] {
            for threads in [1, 2] {
                let opts = Options { threads, portable: false, fuse: false, conv: algo };
                let Some(net) = compile_split(what, g, &w, &opts, kernels) else { continue };
                ran += 1;
                let chosen: Vec<_> = net.conv_choices().iter().map(|c| c.algorithm).collect();
                assert_eq!(chosen, [algo], "{what}: {:?}", net.conv_choices());
                let got = net.run(&views).unwrap();
                for (a, b) in got.iter().zip(&want) {
                    let e = error(a, b);
                    assert!(e <= TOL, "{what} (batch {n}, {kernels:?}, {threads} threads): error {e:e}");
                }
            }
        }
    }
    ran
}

/// Maps with fewer than 36 tiles per sample run in units of several samples (the last unit
/// of a batch partial).
#[test]
fn units_of_several_samples_match_the_interpreter() {
    for (dims, cout) in [(&[32usize, 7, 7][..], 48), (&[16, 3, 3], 16), (&[20, 6, 5], 24), (&[16, 2, 2], 32)] {
        let op = layer("Conv2d", &[int(dims[0] as i64), int(cout as i64), int(3)], &[("padding", int(1))]);
        let e = Epilogue { residual: true, act: Some(Activation::Relu), ..Default::default() };
        let g = one_layer_residual(dims, with_epilogue(op, e));
        let w = weights(&g, 5);
        for n in [1, 2, 5, 8] {
            let xs = inputs(&g, n, 13);
            let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
            let want = interp::run(&g, &w, &views).unwrap();
            for threads in [1, 2] {
                let opts = Options { threads, portable: false, fuse: false, conv: ConvAlgorithm::Winograd };
                let net = Compiled::new(&g, &w, &opts).unwrap().with_parallel_threshold(0);
                let got = net.run(&views).unwrap();
                let e = error(&got[0], &want[0]);
                assert!(e <= TOL, "{dims:?} → {cout} (batch {n}, {threads} threads): error {e:e}");
            }
        }
    }
}

/// By default a small map (7×7) is Winograd in units of several samples from that batch on
/// and direct below: both paths of the one kernel against the interpreter.
#[test]
fn small_maps_switch_algorithm_with_the_batch() {
    let op = layer("Conv2d", &[int(32), int(48), int(3)], &[("padding", int(1))]);
    let g = one_layer(&[32, 7, 7], with_epilogue(op, Epilogue { act: Some(Activation::Relu), ..Default::default() }));
    let w = weights(&g, 6);
    for threads in [1, 2] {
        let net =
            Compiled::new(&g, &w, &Options { threads, portable: false, fuse: false, ..Default::default() }).unwrap();
        let choice = &net.conv_choices()[0];
        assert_eq!(choice.algorithm, ConvAlgorithm::Winograd, "{choice:?}");
        assert!(choice.reason.contains("in units of 6 samples from batch 6 on"), "{choice:?}");
        for n in [1, 5, 6, 7, 13] {
            let xs = inputs(&g, n, 17);
            let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
            let want = interp::run(&g, &w, &views).unwrap();
            let got = net.run(&views).unwrap();
            let e = error(&got[0], &want[0]);
            assert!(e <= TOL, "batch {n}, {threads} threads: error {e:e}");
        }
    }
}

#[test]
fn winograd_matches_the_interpreter() {
    let cases: &[(&[usize], usize, i64)] = &[
        (&[16, 8, 8], 16, 1),
        (&[20, 7, 9], 24, 1),
        (&[64, 14, 14], 64, 1),
        (&[32, 5, 6], 80, 0),
        (&[17, 6, 5], 33, 2),
        (&[48, 3, 3], 16, 1),
        (&[16, 1, 1], 16, 1),
        // Several passes over the input channels (128 at a time), the last one partial.
        (&[144, 6, 7], 40, 1),
        (&[130, 9, 4], 17, 1),
        // Many tile rows per unit (narrow maps), the last unit of a sample shorter.
        (&[24, 30, 3], 32, 1),
    ];
    for &(dims, cout, pad) in cases {
        for (ei, e) in [
            Epilogue::default(),
            Epilogue { act: Some(Activation::Relu), ..Default::default() },
            Epilogue { scale_shift: true, act: Some(Activation::Sigmoid), ..Default::default() },
        ]
        .into_iter()
        .enumerate()
        {
            let op = layer("Conv2d", &[int(dims[0] as i64), int(cout as i64), int(3)], &[("padding", int(pad))]);
            let g = one_layer(dims, with_epilogue(op, e));
            let ran =
                run_case(&format!("{dims:?} → {cout}, padding {pad}, epilogue {ei}"), &g, ConvAlgorithm::Winograd);
            assert!(ran > 0);
        }
        let op = layer("Conv2d", &[int(dims[0] as i64), int(cout as i64), int(3)], &[("padding", int(pad))]);
        let e = Epilogue { residual: true, act: Some(Activation::Relu), ..Default::default() };
        let g = one_layer_residual(dims, with_epilogue(op, e));
        run_case(&format!("{dims:?} → {cout}, padding {pad}, residual"), &g, ConvAlgorithm::Winograd);
    }
}

/// F(2×2, 5×5): the same kinds of cases as the 3×3 ones, passes of 64 input channels.
#[test]
fn winograd_5x5_matches_the_interpreter() {
    let cases: &[(&[usize], usize, i64)] = &[
        (&[32, 16, 16], 32, 2),
        (&[20, 7, 9], 24, 2),
        (&[16, 8, 8], 64, 0),
        (&[17, 6, 5], 33, 3),
        (&[48, 5, 5], 16, 1),
        (&[16, 1, 1], 16, 2),
        // Several passes over the input channels (64 at a time), the last one partial.
        (&[96, 13, 13], 40, 2),
        (&[130, 9, 4], 17, 2),
        // Many tile rows per unit (narrow maps), the last unit of a sample shorter.
        (&[24, 30, 3], 32, 2),
    ];
    for &(dims, cout, pad) in cases {
        let conv = || layer("Conv2d", &[int(dims[0] as i64), int(cout as i64), int(5)], &[("padding", int(pad))]);
        for (ei, e) in
            [Epilogue::default(), Epilogue { scale_shift: true, act: Some(Activation::Sigmoid), ..Default::default() }]
                .into_iter()
                .enumerate()
        {
            let g = one_layer(dims, with_epilogue(conv(), e));
            let what = format!("5×5, {dims:?} → {cout}, padding {pad}, epilogue {ei}");
            assert!(run_case(&what, &g, ConvAlgorithm::Winograd) > 0);
        }
        let e = Epilogue { residual: true, act: Some(Activation::Relu), ..Default::default() };
        let g = one_layer_residual(dims, with_epilogue(conv(), e));
        run_case(&format!("5×5, {dims:?} → {cout}, padding {pad}, residual"), &g, ConvAlgorithm::Winograd);
    }
    // Units of several samples (8×8: 16 tiles per sample), the last unit of a batch partial.
    let op = layer("Conv2d", &[int(32), int(64), int(5)], &[("padding", int(2))]);
    let g = one_layer(&[32, 8, 8], with_epilogue(op, Epilogue { act: Some(Activation::Relu), ..Default::default() }));
    let w = weights(&g, 5);
    for threads in [1, 2] {
        let opts = Options { threads, portable: false, fuse: false, ..Default::default() };
        let net = Compiled::new(&g, &w, &opts).unwrap().with_parallel_threshold(0);
        assert_eq!(net.conv_choices()[0].algorithm, ConvAlgorithm::Winograd, "{:?}", net.conv_choices());
        for n in [1, 5, 6, 7, 13] {
            let xs = inputs(&g, n, 13);
            let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
            let want = interp::run(&g, &w, &views).unwrap();
            let e = error(&net.run(&views).unwrap()[0], &want[0]);
            assert!(e <= TOL, "5×5 at 8×8, batch {n}, {threads} threads: error {e:e}");
        }
    }
}
