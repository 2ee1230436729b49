//! The hand-written Conv2d/Linear micro-kernels, each ISA this CPU has forced in turn
//! (AVX-512F, AVX2+FMA) plus the portable Cranelift code, against the reference
//! interpreter: channel and pixel counts that leave partial register tiles, every padding
//! mode, strides, dilation, groups, 1×1 convs, every epilogue, batches 1 and 3.

mod jit_common;

use cnnc_compiler::Graph;
use cnnc_compiler::ops::args::ArgValue;
use cnnc_compiler::ops::{Activation, Epilogue};
use cnnc_runtime::{Compiled, ConvAlgorithm, Error, Kernels, Options, interp};
use jit_common::*;

/// Compares every kernel choice the host supports with the interpreter; returns how many
/// micro-kernel ISAs ran.
fn check_kernels(what: &str, g: &Graph, n: usize) -> usize {
    let w = weights(g, 17);
    let xs = inputs(g, n, 29);
    let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
    let want = interp::run(g, &w, &views).unwrap();
    let mut ran = 0;
    for kernels in [Kernels::Avx512, Kernels::Avx2, Kernels::Portable] {
        let opts = Options { threads: 1, portable: false, fuse: false, ..Default::default() };
        let net = match Compiled::with_kernels(g, &w, &opts, kernels) {
            Ok(net) => net,
            Err(Error::Unsupported(why)) if kernels != Kernels::Portable => {
                assert!(why.contains("cannot run"), "{why}");
                continue;
            }
            Err(e) => panic!("{what}: compile with {kernels:?}: {e}"),
        };
        ran += usize::from(kernels != Kernels::Portable);
        let got = net.run(&views).unwrap();
        for (a, b) in got.iter().zip(&want) {
            let e = error(a, b);
            assert!(e <= TOL, "{what} (batch {n}, {kernels:?}): worst error {e:e} > {TOL:e}\n{g}");
        }
    }
    ran
}

/// Input dims, positional and keyword arguments of one layer.
type Case = (Vec<usize>, Vec<ArgValue>, Vec<(&'static str, ArgValue)>);

fn epilogues() -> Vec<Epilogue> {
    vec![
        Epilogue::default(),
        Epilogue { act: Some(Activation::Relu), ..Epilogue::default() },
        Epilogue { scale_shift: true, act: Some(Activation::Tanh), ..Epilogue::default() },
        Epilogue { scale_shift: true, residual: true, act: Some(Activation::Relu) },
        Epilogue { residual: true, act: Some(Activation::Sigmoid), ..Epilogue::default() },
    ]
}

#[test]
fn the_host_has_a_micro_kernel_isa_on_x86_64() {
    let g = one_layer(&[8, 6, 6], layer("Conv2d", &[int(8), int(16), int(3)], &[]));
    let ran = check_kernels("probe", &g, 1);
    if cfg!(target_arch = "x86_64") && std::arch::is_x86_feature_detected!("avx2") {
        assert!(ran >= 1, "no micro-kernel ISA ran on an AVX2 host");
    }
}

#[test]
fn conv_shapes_and_padding_modes() {
    let cases: Vec<Case> = vec![
        (vec![16, 9, 11], vec![int(16), int(20), int(3)], vec![("padding", int(1))]),
        (vec![3, 17, 19], vec![int(3), int(9), int(3)], vec![("stride", int(2)), ("padding", int(1))]),
        (vec![4, 20, 20], vec![int(4), int(33), int(7)], vec![("stride", int(2)), ("padding", int(3))]),
        (vec![8, 15, 15], vec![int(8), int(12), int(3)], vec![("dilation", int(2)), ("padding", int(2))]),
        (vec![6, 9, 9], vec![int(6), int(12), int(3)], vec![("groups", int(2)), ("padding", int(1))]),
        (vec![24, 7, 9], vec![int(24), int(40), int(1)], vec![]),
        (vec![16, 8, 8], vec![int(16), int(24), int(1)], vec![("stride", int(2))]),
        (vec![5, 10, 12], vec![int(5), int(8), int(3)], vec![("padding", int(2)), ("padding_mode", s("reflect"))]),
        (vec![5, 10, 12], vec![int(5), int(8), int(3)], vec![("padding", int(1)), ("padding_mode", s("replicate"))]),
        (vec![5, 10, 12], vec![int(5), int(8), int(3)], vec![("padding", int(2)), ("padding_mode", s("circular"))]),
        (vec![64, 14, 14], vec![int(64), int(64), int(3)], vec![("padding", int(1)), ("bias", b(false))]),
    ];
    for (dims, pos, kw) in cases {
        let g = one_layer(&dims, layer("Conv2d", &pos, &kw));
        for n in [1, 3] {
            check_kernels(&format!("Conv2d {pos:?} {kw:?} on {dims:?}"), &g, n);
        }
    }
}

#[test]
fn conv_epilogues() {
    for e in epilogues() {
        let op = with_epilogue(layer("Conv2d", &[int(6), int(13), int(3)], &[("padding", int(1))]), e.clone());
        let dims = [6, 7, 10];
        let g = if e.residual { one_layer_residual(&dims, op) } else { one_layer(&dims, op) };
        for n in [1, 3] {
            check_kernels(&format!("Conv2d {e:?}"), &g, n);
        }
    }
}

#[test]
fn linear_shapes_and_epilogues() {
    // 2100 features: the reduction runs in chunks (partial sums kept in the output).
    for (dims, k, o) in
        [(vec![16], 16, 10), (vec![33], 33, 97), (vec![3, 7], 7, 9), (vec![200], 200, 50), (vec![2100], 2100, 70)]
    {
        for e in epilogues() {
            let op = with_epilogue(layer("Linear", &[int(k), int(o)], &[]), e.clone());
            let g = if e.residual { one_layer_residual(&dims, op) } else { one_layer(&dims, op) };
            for n in [1, 3, 11] {
                check_kernels(&format!("Linear({k}, {o}) {e:?} on {dims:?}"), &g, n);
            }
        }
    }
}

/// Layers with at least 4 MB of packed weights are packed by the model's threads, each a
/// run of whole column tiles or channel groups: the packing (and so the output, which
/// every split computes in the same order) is the same on one thread and on two.
#[test]
fn large_weights_pack_alike_on_one_and_two_threads() {
    let linear = layer("Linear", &[int(4096), int(300)], &[]);
    let conv = || layer("Conv2d", &[int(256), int(470), int(3)], &[("padding", int(1))]);
    for (what, g, conv_algo) in [
        ("Linear(4096, 300)", one_layer(&[4096], linear), ConvAlgorithm::Auto),
        ("3×3 conv 256→470, direct", one_layer(&[256, 6, 6], conv()), ConvAlgorithm::Direct),
        ("3×3 conv 256→470, Winograd", one_layer(&[256, 6, 6], conv()), ConvAlgorithm::Winograd),
    ] {
        let w = weights(&g, 21);
        let xs = inputs(&g, 3, 22);
        let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
        let want = interp::run(&g, &w, &views).unwrap();
        let run = |threads| {
            let opts = Options { threads, portable: false, fuse: false, conv: conv_algo };
            Compiled::new(&g, &w, &opts).unwrap().run(&views).unwrap()
        };
        let (one, two) = (run(1), run(2));
        assert_eq!(one, two, "{what}");
        let e = error(&two[0], &want[0]);
        assert!(e <= TOL, "{what}: error {e:e}");
    }
}
