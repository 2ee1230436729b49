//! The JIT against the reference interpreter, op by op: every op kind and the variants that
//! take different code paths (padding modes, strides, dilation, groups, odd sizes, ceil
//! mode, partial vectors and channel tiles), at batch 1 and 3, default and portable paths.

mod jit_common;

use cnnc_compiler::ops::{Activation, Concat, Epilogue, Op, Reduce, ReduceKind};
use cnnc_compiler::{GraphBuilder, TensorType};
use jit_common::*;

fn conv(dims: &[usize], pos: &[cnnc_compiler::ops::args::ArgValue], kw: &[(&str, cnnc_compiler::ops::args::ArgValue)]) {
    let g = one_layer(dims, layer("Conv2d", pos, kw));
    for n in [1, 3] {
        check(&format!("Conv2d {pos:?} {kw:?} on {dims:?}"), &g, n, 7);
    }
}

#[test]
fn conv_basic_and_odd_sizes() {
    conv(&[3, 8, 8], &[int(3), int(8), int(3)], &[]);
    conv(&[3, 13, 11], &[int(3), int(5), int(3)], &[("padding", int(1))]);
    conv(&[1, 28, 28], &[int(1), int(6), int(5)], &[("padding", int(2))]);
    conv(&[6, 14, 14], &[int(6), int(16), int(5)], &[]);
    conv(&[2, 5, 5], &[int(2), int(3), int(5)], &[]);
    conv(&[4, 1, 1], &[int(4), int(9), int(1)], &[]);
    conv(&[7, 3, 3], &[int(7), int(10), int(3)], &[("padding", int(1)), ("bias", b(false))]);
}

#[test]
fn conv_1x1_is_a_gemm() {
    conv(&[16, 7, 9], &[int(16), int(24), int(1)], &[]);
    conv(&[5, 3, 3], &[int(5), int(3), int(1)], &[]);
}

#[test]
fn conv_strides() {
    conv(&[3, 17, 17], &[int(3), int(8), int(3)], &[("stride", int(2)), ("padding", int(1))]);
    conv(&[8, 16, 16], &[int(8), int(8), int(1)], &[("stride", int(2))]);
    conv(&[3, 20, 23], &[int(3), int(4), int(3)], &[("stride", int(3))]);
    conv(&[2, 19, 31], &[int(2), int(4), int(3)], &[("stride", pair(1, 2)), ("padding", pair(0, 1))]);
    conv(&[3, 32, 32], &[int(3), int(8), int(7)], &[("stride", int(2)), ("padding", int(3))]);
}

#[test]
fn conv_dilation() {
    conv(&[3, 15, 15], &[int(3), int(5), int(3)], &[("dilation", int(2)), ("padding", int(2))]);
    conv(&[2, 20, 20], &[int(2), int(4), int(3)], &[("dilation", pair(2, 3)), ("stride", int(2))]);
}

#[test]
fn conv_groups_and_depthwise() {
    conv(&[8, 10, 10], &[int(8), int(8), int(3)], &[("groups", int(8)), ("padding", int(1))]);
    conv(&[8, 10, 10], &[int(8), int(16), int(3)], &[("groups", int(8)), ("padding", int(1))]);
    conv(&[6, 9, 9], &[int(6), int(12), int(3)], &[("groups", int(3))]);
    conv(&[4, 9, 9], &[int(4), int(6), int(3)], &[("groups", int(2)), ("padding", int(1))]);
    conv(&[6, 12, 12], &[int(6), int(6), int(3)], &[("groups", int(6)), ("stride", int(2)), ("padding", int(1))]);
}

fn sides(t: i64, b: i64, l: i64, r: i64) -> cnnc_compiler::ops::args::ArgValue {
    cnnc_compiler::ops::args::ArgValue::Tuple(vec![int(t), int(b), int(l), int(r)])
}

#[test]
fn conv_padding_by_sides() {
    conv(&[3, 9, 10], &[int(3), int(5), int(3)], &[("padding", sides(0, 1, 2, 0))]);
    conv(&[4, 16, 16], &[int(4), int(16), int(3)], &[("padding", sides(0, 1, 0, 1)), ("stride", int(2))]);
    conv(&[20, 8, 8], &[int(20), int(20), int(3)], &[("padding", sides(1, 2, 2, 1)), ("groups", int(20))]);
    conv(&[3, 7, 7], &[int(3), int(2), int(2)], &[("padding", sides(1, 0, 0, 1)), ("padding_mode", s("reflect"))]);
}

/// The interpreter's meaning of `(top, bottom, left, right)`: padding (1, 0, 1, 0) is
/// padding 1 all round with the last row and column of the output dropped.
#[test]
fn padding_by_sides_is_the_symmetric_padding_cropped() {
    let asym = one_layer(&[2, 6, 7], layer("Conv2d", &[int(2), int(3), int(3)], &[("padding", sides(1, 0, 1, 0))]));
    let sym = one_layer(&[2, 6, 7], layer("Conv2d", &[int(2), int(3), int(3)], &[("padding", int(1))]));
    let w = weights(&asym, 3);
    let x: Vec<_> = inputs(&asym, 2, 4);
    let x: Vec<_> = x.iter().map(|a| a.view()).collect();
    let a = cnnc_runtime::interp::run(&asym, &w, &x).unwrap().remove(0);
    let s = cnnc_runtime::interp::run(&sym, &w, &x).unwrap().remove(0);
    assert_eq!(a.shape(), &[2, 3, 5, 6]);
    assert_eq!(a, s.slice(ndarray::s![.., .., ..5, ..6]).into_dyn());
}

#[test]
fn conv_asymmetric_kernel_and_same_padding() {
    conv(&[3, 9, 10], &[int(3), int(5), pair(1, 2)], &[]);
    conv(&[3, 9, 10], &[int(3), int(5), pair(1, 2)], &[("padding", s("same"))]);
    conv(&[3, 9, 10], &[int(3), int(5), int(4)], &[("padding", s("same"))]);
    conv(&[2, 11, 7], &[int(2), int(3), pair(2, 4)], &[("padding", s("same")), ("dilation", int(2))]);
    conv(&[3, 9, 10], &[int(3), int(5), int(3)], &[("padding", s("valid"))]);
}

#[test]
fn conv_padding_modes() {
    for mode in ["zeros", "reflect", "replicate", "circular"] {
        conv(&[3, 9, 10], &[int(3), int(5), int(3)], &[("padding", int(1)), ("padding_mode", s(mode))]);
        conv(&[2, 8, 12], &[int(2), int(4), int(5)], &[("padding", pair(2, 1)), ("padding_mode", s(mode))]);
        conv(
            &[4, 7, 7],
            &[int(4), int(4), int(3)],
            &[("padding", int(2)), ("stride", int(2)), ("padding_mode", s(mode))],
        );
        conv(&[3, 10, 9], &[int(3), int(2), int(4)], &[("padding", s("same")), ("padding_mode", s(mode))]);
        conv(
            &[4, 8, 8],
            &[int(4), int(4), int(3)],
            &[("padding", int(2)), ("dilation", int(2)), ("groups", int(4)), ("padding_mode", s(mode))],
        );
    }
}

fn epilogues() -> Vec<Epilogue> {
    let mut v = vec![];
    for scale_shift in [false, true] {
        for residual in [false, true] {
            for act in [None, Some(Activation::Relu), Some(Activation::Sigmoid), Some(Activation::Tanh)] {
                v.push(Epilogue { scale_shift, residual, act });
            }
        }
    }
    v
}

#[test]
fn conv_epilogues() {
    for e in epilogues() {
        for (dims, pos, kw) in [
            (vec![3, 9, 11], vec![int(3), int(6), int(3)], vec![("padding", int(1))]),
            (vec![4, 6, 6], vec![int(4), int(4), int(3)], vec![("groups", int(4)), ("padding", int(1))]),
            (vec![5, 4, 5], vec![int(5), int(7), int(1)], vec![]),
        ] {
            let op = with_epilogue(layer("Conv2d", &pos, &kw), e.clone());
            let g = if e.residual { one_layer_residual(&dims, op) } else { one_layer(&dims, op) };
            for n in [1, 3] {
                check(&format!("Conv2d {pos:?} {e:?}"), &g, n, 11);
            }
        }
    }
}

#[test]
fn linear_variants() {
    for (dims, k, o) in
        [(vec![16], 16, 10), (vec![5], 5, 3), (vec![33], 33, 17), (vec![3, 7], 7, 9), (vec![2, 2, 8], 8, 8)]
    {
        for bias in [true, false] {
            let g = one_layer(&dims, layer("Linear", &[int(k), int(o)], &[("bias", b(bias))]));
            for n in [1, 3, 6] {
                check(&format!("Linear({k}, {o}, bias={bias}) on {dims:?}"), &g, n, 3);
            }
        }
    }
}

#[test]
fn linear_epilogues() {
    for e in epilogues() {
        for (dims, k, o) in [(vec![12], 12, 13), (vec![2, 6], 6, 4)] {
            let op = with_epilogue(layer("Linear", &[int(k), int(o)], &[]), e.clone());
            let g = if e.residual { one_layer_residual(&dims, op) } else { one_layer(&dims, op) };
            for n in [1, 3, 5] {
                check(&format!("Linear({k}, {o}) {e:?} on {dims:?}"), &g, n, 5);
            }
        }
    }
}

fn pool(
    name: &str,
    dims: &[usize],
    pos: &[cnnc_compiler::ops::args::ArgValue],
    kw: &[(&str, cnnc_compiler::ops::args::ArgValue)],
) {
    let g = one_layer(dims, layer(name, pos, kw));
    for n in [1, 3] {
        check(&format!("{name} {pos:?} {kw:?} on {dims:?}"), &g, n, 13);
    }
}

#[test]
fn max_pool_variants() {
    pool("MaxPool2d", &[3, 8, 8], &[int(2)], &[]);
    pool("MaxPool2d", &[3, 9, 11], &[int(3)], &[("stride", int(2)), ("padding", int(1))]);
    pool("MaxPool2d", &[2, 5, 5], &[int(3)], &[("ceil_mode", b(true))]);
    pool("MaxPool2d", &[2, 10, 13], &[int(3)], &[("stride", int(2)), ("dilation", int(2)), ("padding", int(1))]);
    pool("MaxPool2d", &[2, 7, 8], &[int(2)], &[("stride", int(2)), ("padding", int(1)), ("ceil_mode", b(true))]);
    pool("MaxPool2d", &[1, 20, 20], &[pair(2, 3)], &[("stride", pair(1, 3)), ("padding", pair(1, 1))]);
    pool("MaxPool2d", &[4, 16, 16], &[int(3)], &[("stride", int(1)), ("padding", int(1))]);
    pool("MaxPool2d", &[2, 25, 25], &[int(3)], &[("stride", int(3)), ("ceil_mode", b(true))]);
}

#[test]
fn avg_pool_variants() {
    for cip in [true, false] {
        for ceil in [false, true] {
            let kw = |extra: &[(&'static str, cnnc_compiler::ops::args::ArgValue)]| {
                let mut v = vec![("count_include_pad", b(cip)), ("ceil_mode", b(ceil))];
                v.extend_from_slice(extra);
                v
            };
            pool("AvgPool2d", &[3, 8, 8], &[int(2)], &kw(&[]));
            pool("AvgPool2d", &[3, 9, 11], &[int(3)], &kw(&[("stride", int(2)), ("padding", int(1))]));
            pool("AvgPool2d", &[2, 7, 8], &[int(2)], &kw(&[("stride", int(2)), ("padding", int(1))]));
            pool("AvgPool2d", &[2, 12, 17], &[pair(3, 2)], &kw(&[("stride", pair(1, 2)), ("padding", pair(1, 1))]));
            pool("AvgPool2d", &[2, 10, 10], &[int(3)], &kw(&[("stride", int(1)), ("padding", int(1))]));
        }
    }
    pool("AvgPool2d", &[2, 9, 9], &[int(3)], &[("padding", int(1)), ("divisor_override", int(4))]);
}

#[test]
fn adaptive_avg_pool_variants() {
    for (dims, out) in [
        (vec![3, 7, 7], pair(1, 1)),
        (vec![2, 5, 7], pair(3, 2)),
        (vec![2, 6, 6], pair(6, 6)),
        (vec![2, 10, 3], pair(4, 5)),
        (vec![4, 13, 13], int(2)),
    ] {
        pool("AdaptiveAvgPool2d", &dims, &[out], &[]);
    }
}

#[test]
fn max_pool_propagates_nan() {
    let g = one_layer(&[1, 6, 6], layer("MaxPool2d", &[int(2)], &[]));
    let w = weights(&g, 1);
    let mut x = random(&[1, 1, 6, 6], 2);
    x[[0, 0, 3, 2]] = f32::NAN;
    x[[0, 0, 0, 5]] = f32::INFINITY;
    let e = jit_vs_interp(&g, &w, &[x.clone()], &cnnc_runtime::Options::default());
    assert!(e <= TOL, "worst error {e:e}");
    let net = cnnc_runtime::Compiled::new(&g, &w, &Default::default()).unwrap();
    let y = net.run(&[x.view()]).unwrap().remove(0);
    assert!(y[[0, 0, 1, 1]].is_nan());
    assert_eq!(y[[0, 0, 0, 2]], f32::INFINITY);
    assert_eq!(y.iter().filter(|v| v.is_nan()).count(), 1);
}

#[test]
fn batchnorm_and_activations() {
    let g = one_layer(&[5, 7, 9], layer("BatchNorm2d", &[int(5)], &[]));
    check("BatchNorm2d", &g, 3, 1);
    let g = one_layer(
        &[3, 4, 4],
        layer(
            "BatchNorm2d",
            &[int(3)],
            &[("affine", b(false)), ("eps", cnnc_compiler::ops::args::ArgValue::Float(1e-3))],
        ),
    );
    check("BatchNorm2d affine=False", &g, 2, 1);
    for act in ["ReLU", "Sigmoid", "Tanh"] {
        for dims in [vec![3, 5, 5], vec![7], vec![4, 2]] {
            let g = one_layer(&dims, layer(act, &[], &[]));
            check(act, &g, 3, 2);
        }
    }
}

#[test]
fn add_concat_reduce_flatten_dropout() {
    // Residual add of two branches, channel concat, spatial concat, reductions.
    let mut gb = GraphBuilder::new("mix");
    let x = gb.input("x", TensorType::new(vec![3, 6, 5]));
    let a = gb.layer("a", layer("Conv2d", &[int(3), int(4), int(3)], &[("padding", int(1))]), &[x]).unwrap();
    let bb = gb.layer("b", layer("Conv2d", &[int(3), int(4), int(1)], &[]), &[x]).unwrap();
    let sum = gb.layer("add", Op::Add(Default::default()), &[a, bb]).unwrap();
    let cat = gb.layer("cat", Op::Concat(Concat { dim: 1 }), &[sum, x, a]).unwrap();
    let cat2 = gb.layer("cat2", Op::Concat(Concat { dim: 3 }), &[cat, cat]).unwrap();
    let m = gb
        .layer("mean", Op::Reduce(Reduce { kind: ReduceKind::Mean, dims: vec![2, 3], keepdim: false }), &[cat2])
        .unwrap();
    let mx =
        gb.layer("max", Op::Reduce(Reduce { kind: ReduceKind::Max, dims: vec![1], keepdim: true }), &[cat2]).unwrap();
    let mx2 = gb
        .layer("max2", Op::Reduce(Reduce { kind: ReduceKind::Max, dims: vec![1, 3], keepdim: false }), &[cat2])
        .unwrap();
    let mn = gb
        .layer("mean2", Op::Reduce(Reduce { kind: ReduceKind::Mean, dims: vec![3], keepdim: true }), &[cat2])
        .unwrap();
    let d = gb.layer("drop", layer("Dropout", &[], &[]), &[mx]).unwrap();
    let f = gb.layer("flat", layer("Flatten", &[], &[]), &[d]).unwrap();
    gb.output("mean", m);
    gb.output("max", f);
    gb.output("max2", mx2);
    gb.output("mean2", mn);
    gb.output("cat", cat2);
    gb.output("again", m);
    gb.output("x", x);
    let g = gb.finish();
    for n in [1, 3] {
        check("mix", &g, n, 9);
    }
}

#[test]
fn lenet_end_to_end() {
    let mut gb = GraphBuilder::new("lenet");
    let x = gb.input("x", TensorType::new(vec![1, 28, 28]));
    let c1 = gb.layer("c1", layer("Conv2d", &[int(1), int(6), int(5)], &[("padding", int(2))]), &[x]).unwrap();
    let r1 = gb.layer("r1", layer("Tanh", &[], &[]), &[c1]).unwrap();
    let p1 = gb.layer("p1", layer("AvgPool2d", &[int(2)], &[]), &[r1]).unwrap();
    let c2 = gb.layer("c2", layer("Conv2d", &[int(6), int(16), int(5)], &[]), &[p1]).unwrap();
    let r2 = gb.layer("r2", layer("ReLU", &[], &[]), &[c2]).unwrap();
    let p2 = gb.layer("p2", layer("MaxPool2d", &[int(2)], &[]), &[r2]).unwrap();
    let f = gb.layer("f", layer("Flatten", &[], &[]), &[p2]).unwrap();
    let f1 = gb.layer("f1", layer("Linear", &[int(400), int(120)], &[]), &[f]).unwrap();
    let s1 = gb.layer("s1", layer("Sigmoid", &[], &[]), &[f1]).unwrap();
    let f2 = gb.layer("f2", layer("Linear", &[int(120), int(84)], &[]), &[s1]).unwrap();
    let f3 = gb.layer("f3", layer("Linear", &[int(84), int(10)], &[]), &[f2]).unwrap();
    gb.output("logits", f3);
    let g = gb.finish();
    for n in [1, 3, 70] {
        check("LeNet", &g, n, 21);
    }
}

/// Softmax along each axis: the JIT computes exactly the interpreter's f64 arithmetic (bit for
/// bit, NaN and infinities included), and each line sums to 1.
#[test]
fn softmax_matches_the_interpreter_exactly() {
    use cnnc_compiler::ops::Softmax;
    for (dims, dim) in [(vec![10], 1), (vec![3, 4, 5], 1), (vec![3, 4, 5], 2), (vec![3, 4, 5], -1)] {
        let g = one_layer(&dims, Op::Softmax(Softmax { dim }));
        let w = weights(&g, 0);
        let mut x = inputs(&g, 3, 5).remove(0);
        if let Some(v) = x.as_slice_mut() {
            v[0] = f32::NAN;
            v[v.len() - 1] = 80.0;
            v[v.len() - 2] = f32::NEG_INFINITY;
        }
        let want = cnnc_runtime::interp::run(&g, &w, &[x.view()]).unwrap().remove(0);
        for portable in [false, true] {
            let opts = cnnc_runtime::Options { threads: 1, portable, fuse: true, ..Default::default() };
            let got = cnnc_runtime::Compiled::new(&g, &w, &opts).unwrap().run(&[x.view()]).unwrap().remove(0);
            for (a, b) in got.iter().zip(want.iter()) {
                assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "{dims:?} dim {dim}: {a} vs {b}");
            }
        }
        // The lines of the last sample (no NaN in it) sum to 1.
        let axis = if dim < 0 { dims.len() } else { dim as usize };
        let last = want.index_axis(ndarray::Axis(0), 2);
        for line in last.lanes(ndarray::Axis(axis - 1)) {
            if line.iter().all(|v| v.is_finite()) {
                assert!((line.sum() - 1.0).abs() < 1e-5, "{line}");
            }
        }
    }
}

/// Pools padded by sides (`(top, bottom, left, right)`, ONNX's SAME_UPPER/SAME_LOWER): the JIT
/// against the interpreter, max and average (without count_include_pad), with ceil_mode and
/// dilation.
#[test]
fn pools_padded_by_sides() {
    let cases: Vec<(&str, Vec<(&str, cnnc_compiler::ops::args::ArgValue)>)> = vec![
        ("MaxPool2d", vec![("stride", int(2)), ("padding", sides(0, 1, 0, 1))]),
        ("MaxPool2d", vec![("stride", int(1)), ("padding", sides(1, 0, 1, 0))]),
        ("MaxPool2d", vec![("stride", int(2)), ("padding", sides(1, 0, 0, 1)), ("ceil_mode", b(true))]),
        ("MaxPool2d", vec![("stride", int(1)), ("padding", sides(0, 1, 1, 1)), ("dilation", int(2))]),
        ("AvgPool2d", vec![("stride", int(2)), ("padding", sides(0, 1, 0, 1)), ("count_include_pad", b(false))]),
        ("AvgPool2d", vec![("stride", int(1)), ("padding", sides(1, 0, 1, 1)), ("count_include_pad", b(false))]),
    ];
    for (kind, kw) in cases {
        for dims in [[3usize, 7, 8], [20, 9, 9]] {
            let g = one_layer(&dims, layer(kind, &[int(3)], &kw));
            for n in [1, 3] {
                check(&format!("{kind} {kw:?} on {dims:?}"), &g, n, 3);
            }
        }
    }
    // Counting the padding needs even ends.
    assert!(try_layer("AvgPool2d", &[int(3)], &[("padding", sides(0, 1, 0, 1))]).is_none());
}
