//! Winograd F(2×2, 3×3) convolutions against the reference interpreter: even and odd map
//! sizes, channel counts that leave padding lanes, several passes over the input channels,
//! units of one and of many tile rows, padding 0–2, every fused epilogue
//! (bias, BatchNorm's scale and shift, residual, activations), a batch, one and two threads
//! splitting every kernel, each micro-kernel ISA the host has — forced with
//! `ConvAlgorithm::Winograd`, and checked to have run.

mod jit_common;

use cnnc_compiler::ops::{Activation, Epilogue};
use cnnc_runtime::{Compiled, ConvAlgorithm, Error, Kernels, Options, interp};
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
                let net = match Compiled::with_kernels(g, &w, &opts, kernels) {
                    Ok(net) => net.with_parallel_threshold(0),
                    Err(Error::Unsupported(why)) if why.contains("cannot run") => continue,
                    Err(e) => panic!("{what}: compile with {kernels:?}: {e}"),
                };
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
