//! Hand-computed expectations for every op, and the input checks.

use super::*;
use crate::weights::ParamData;
use cnnc_compiler::GraphBuilder;
use cnnc_compiler::diag::SrcSpan;
use cnnc_compiler::graph::ParamId;
use cnnc_compiler::ops::args::{Arg, ArgValue};
use cnnc_compiler::ops::{
    self, Activation, AdaptiveAvgPool2d, Add, BatchNorm2d, Concat, Dropout, Epilogue, Flatten, Linear, Reduce,
    ReduceKind,
};
use ndarray::{Array, ArrayD, IxDyn, ShapeBuilder};
use proc_macro2::Span;

// ---- helpers ----------------------------------------------------------------------------

fn int(v: i64) -> ArgValue {
    ArgValue::Int(v)
}

fn pair(a: i64, b: i64) -> ArgValue {
    ArgValue::Tuple(vec![ArgValue::Int(a), ArgValue::Int(b)])
}

fn s(v: &str) -> ArgValue {
    ArgValue::Str(v.into())
}

fn boolean(v: bool) -> ArgValue {
    ArgValue::Bool(v)
}

/// A layer as the DSL would construct it, e.g. `layer("Conv2d", &[int(1), int(1), int(3)], &[("stride", int(2))])`.
fn layer(name: &str, pos: &[ArgValue], kw: &[(&str, ArgValue)]) -> Op {
    let span: SrcSpan = Span::call_site().into();
    let mut args: Vec<Arg> = pos.iter().map(|v| Arg { keyword: None, value: v.clone(), span }).collect();
    args.extend(kw.iter().map(|(k, v)| Arg { keyword: Some(k.to_string()), value: v.clone(), span }));
    ops::construct(ops::layer_ctor(name).expect("known layer"), &args, span).expect("valid arguments")
}

fn arr(shape: &[usize], v: &[f32]) -> ArrayD<f32> {
    ArrayD::from_shape_vec(IxDyn(shape), v.to_vec()).expect("shape matches data")
}

/// The 5×5 input of the conv examples.
fn seed_input() -> ArrayD<f32> {
    #[rustfmt::skip]
    let v = [
        1., 2., 0., 3., 1.,
        0., 1., 2., 3., 1.,
        1., 2., 1., 0., 0.,
        5., 2., 3., 1., 1.,
        2., 1., 0., 1., 1.,
    ];
    arr(&[1, 1, 5, 5], &v)
}

fn seed_kernel() -> ArrayD<f32> {
    arr(&[1, 1, 3, 3], &[1., 2., 1., 0., 1., 0., 2., 1., 0.])
}

/// A one-layer net `y = op(x)` with the layer at path `0`.
fn single(op: Op, dims: &[usize]) -> Graph {
    let mut b = GraphBuilder::new("t");
    let x = b.input("x", TensorType::new(dims.to_vec()));
    let y = b.layer("0", op, &[x]).expect("shapes fit");
    b.output("y", y);
    b.finish()
}

/// Weights with the given f32 tensors for the first parameters; the rest default.
fn weights_with(g: &Graph, given: &[ArrayD<f32>]) -> Weights {
    let mut w = Weights::random(g, 0);
    for (i, a) in given.iter().enumerate() {
        w.set(ParamId(i), ParamData::F32(a.clone())).expect("declared shape");
    }
    w
}

/// Runs a one-layer net on `x` with the given parameters.
fn run1(op: Op, x: &ArrayD<f32>, params: &[ArrayD<f32>]) -> ArrayD<f32> {
    let g = single(op, &x.shape()[1..]);
    let w = weights_with(&g, params);
    let mut out = run(&g, &w, &[x.view()]).expect("runs");
    out.remove(0)
}

fn values(a: &ArrayD<f32>) -> Vec<f32> {
    a.iter().copied().collect()
}

fn assert_close(a: &ArrayD<f32>, shape: &[usize], expected: &[f32]) {
    assert_eq!(a.shape(), shape);
    for (i, (x, y)) in a.iter().zip(expected).enumerate() {
        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "element {i}: {x} vs {y}\n{a}");
    }
}

fn conv_1x1_identity(mode: &str) -> Op {
    layer(
        "Conv2d",
        &[int(1), int(1), int(1)],
        &[("padding", int(1)), ("padding_mode", s(mode)), ("bias", boolean(false))],
    )
}

fn grid3() -> ArrayD<f32> {
    arr(&[1, 1, 3, 3], &[1., 2., 3., 4., 5., 6., 7., 8., 9.])
}

// ---- Conv2d -------------------------------------------------------------------------------

#[test]
fn conv_seed_examples() {
    let x = seed_input();
    let k = seed_kernel();
    let nobias = || ("bias", boolean(false));
    let k = std::slice::from_ref(&k);
    let y = run1(layer("Conv2d", &[int(1), int(1), int(3)], &[nobias()]), &x, k);
    assert_eq!(y, arr(&[1, 1, 3, 3], &[10., 12., 12., 18., 16., 16., 13., 9., 3.]));
    let y = run1(layer("Conv2d", &[int(1), int(1), int(3)], &[("stride", int(2)), nobias()]), &x, k);
    assert_eq!(y, arr(&[1, 1, 2, 2], &[10., 12., 13., 3.]));
    let y = run1(layer("Conv2d", &[int(1), int(1), int(3)], &[("padding", int(1)), nobias()]), &x, k);
    #[rustfmt::skip]
    let expected = [
        1., 3., 4., 10., 8.,
        5., 10., 12., 12., 6.,
        7., 18., 16., 16., 8.,
        11., 13., 9., 3., 4.,
        14., 13., 9., 7., 4.,
    ];
    assert_eq!(y, arr(&[1, 1, 5, 5], &expected));
}

#[test]
fn conv_bias_is_added_per_channel() {
    let x = seed_input();
    let k = seed_kernel();
    let w = ndarray::concatenate(ndarray::Axis(0), &[k.view(), (-&k).view()]).unwrap();
    let y = run1(layer("Conv2d", &[int(1), int(2), int(3)], &[("stride", int(2))]), &x, &[w, arr(&[2], &[0.5, 1.0])]);
    assert_eq!(y, arr(&[1, 2, 2, 2], &[10.5, 12.5, 13.5, 3.5, -9., -11., -12., -2.]));
}

#[test]
fn conv_padding_modes() {
    let x = grid3();
    let one = arr(&[1, 1, 1, 1], &[1.]);
    let run_mode = |mode: &str| values(&run1(conv_1x1_identity(mode), &x, std::slice::from_ref(&one)));
    #[rustfmt::skip]
    let zeros = [
        0., 0., 0., 0., 0.,
        0., 1., 2., 3., 0.,
        0., 4., 5., 6., 0.,
        0., 7., 8., 9., 0.,
        0., 0., 0., 0., 0.,
    ];
    #[rustfmt::skip]
    let reflect = [
        5., 4., 5., 6., 5.,
        2., 1., 2., 3., 2.,
        5., 4., 5., 6., 5.,
        8., 7., 8., 9., 8.,
        5., 4., 5., 6., 5.,
    ];
    #[rustfmt::skip]
    let replicate = [
        1., 1., 2., 3., 3.,
        1., 1., 2., 3., 3.,
        4., 4., 5., 6., 6.,
        7., 7., 8., 9., 9.,
        7., 7., 8., 9., 9.,
    ];
    #[rustfmt::skip]
    let circular = [
        9., 7., 8., 9., 7.,
        3., 1., 2., 3., 1.,
        6., 4., 5., 6., 4.,
        9., 7., 8., 9., 7.,
        3., 1., 2., 3., 1.,
    ];
    assert_eq!(run_mode("zeros"), zeros);
    assert_eq!(run_mode("reflect"), reflect);
    assert_eq!(run_mode("replicate"), replicate);
    assert_eq!(run_mode("circular"), circular);
}

#[test]
fn conv_same_padding_is_asymmetric() {
    // kernel 2, "same": pads (0, 1, 0, 1). Picking the bottom-right tap reads the padding.
    let x = grid3();
    let k = arr(&[1, 1, 2, 2], &[0., 0., 0., 1.]);
    let conv = |mode: &str| {
        layer(
            "Conv2d",
            &[int(1), int(1), int(2)],
            &[("padding", s("same")), ("padding_mode", s(mode)), ("bias", boolean(false))],
        )
    };
    assert_eq!(values(&run1(conv("zeros"), &x, std::slice::from_ref(&k))), [5., 6., 0., 8., 9., 0., 0., 0., 0.]);
    assert_eq!(values(&run1(conv("reflect"), &x, std::slice::from_ref(&k))), [5., 6., 5., 8., 9., 8., 5., 6., 5.]);
    assert_eq!(values(&run1(conv("replicate"), &x, std::slice::from_ref(&k))), [5., 6., 6., 8., 9., 9., 8., 9., 9.]);
    assert_eq!(values(&run1(conv("circular"), &x, std::slice::from_ref(&k))), [5., 6., 4., 8., 9., 7., 2., 3., 1.]);
    // The top-left tap is the identity.
    let k = arr(&[1, 1, 2, 2], &[1., 0., 0., 0.]);
    assert_eq!(run1(conv("reflect"), &x, &[k]), x);
}

#[test]
fn conv_groups() {
    // Conv2d(4, 2, 1, groups=2): out0 = a·x0 + b·x1, out1 = c·x2 + d·x3.
    let x = arr(&[1, 4, 1, 1], &[1., 2., 3., 4.]);
    let w = arr(&[2, 2, 1, 1], &[10., 100., 1000., 10000.]);
    let y = run1(layer("Conv2d", &[int(4), int(2), int(1)], &[("groups", int(2)), ("bias", boolean(false))]), &x, &[w]);
    assert_eq!(values(&y), [210., 43000.]);
    // Depthwise with a channel multiplier: Conv2d(2, 4, 1, groups=2): out c reads in c / 2.
    let x = arr(&[1, 2, 1, 2], &[1., 2., 3., 4.]);
    let w = arr(&[4, 1, 1, 1], &[1., 2., 3., 4.]);
    let y = run1(layer("Conv2d", &[int(2), int(4), int(1)], &[("groups", int(2)), ("bias", boolean(false))]), &x, &[w]);
    assert_eq!(values(&y), [1., 2., 2., 4., 9., 12., 12., 16.]);
}

#[test]
fn conv_dilation() {
    // A 2×2 kernel of ones with dilation 2 sums in[y, x] + in[y, x+2] + in[y+2, x] + in[y+2, x+2].
    let y = run1(
        layer("Conv2d", &[int(1), int(1), int(2)], &[("dilation", int(2)), ("bias", boolean(false))]),
        &seed_input(),
        &[arr(&[1, 1, 2, 2], &[1.; 4])],
    );
    assert_eq!(values(&y), [3., 7., 2., 10., 7., 7., 4., 4., 2.]);
}

#[test]
fn conv_rectangular_stride_and_batch() {
    // kernel (1, 2), stride (2, 1) on two samples; the second is the first negated.
    let x1 = seed_input();
    let x = ndarray::concatenate(ndarray::Axis(0), &[x1.view(), (-&x1).view()]).unwrap();
    let y = run1(
        layer("Conv2d", &[int(1), int(1), pair(1, 2)], &[("stride", pair(2, 1)), ("bias", boolean(false))]),
        &x,
        &[arr(&[1, 1, 1, 2], &[1., -1.])],
    );
    let first = [-1., 2., -3., 2., -1., 1., 1., 0., 1., 1., -1., 0.];
    let expected: Vec<f32> = first.iter().copied().chain(first.iter().map(|v| -v)).collect();
    assert_close(&y, &[2, 1, 3, 4], &expected);
}

#[test]
fn conv_fused_epilogue() {
    // y = relu((2x + 1)·3 − 10 + r)
    let mut op = layer("Conv2d", &[int(1), int(1), int(1)], &[]);
    if let Op::Conv2d(c) = &mut op {
        c.epilogue = Epilogue { scale_shift: true, residual: true, act: Some(Activation::Relu) };
    }
    let mut b = GraphBuilder::new("fused");
    let x = b.input("x", TensorType::new(vec![1, 1, 4]));
    let r = b.input("r", TensorType::new(vec![1, 1, 4]));
    let y = b.layer("conv", op, &[x, r]).unwrap();
    b.output("y", y);
    let g = b.finish();
    assert_eq!(g.state_dict_keys(), ["conv.weight", "conv.bias", "conv.scale", "conv.shift"]);
    let w = weights_with(&g, &[arr(&[1, 1, 1, 1], &[2.]), arr(&[1], &[1.]), arr(&[1], &[3.]), arr(&[1], &[-10.])]);
    let xs = arr(&[1, 1, 1, 4], &[0., 1., 2., 3.]);
    let rs = arr(&[1, 1, 1, 4], &[1., 1., -2., 0.5]);
    let out = run(&g, &w, &[xs.view(), rs.view()]).unwrap();
    // (2x+1)·3 − 10 = −7, −1, 5, 11; + r = −6, 0, 3, 11.5
    assert_eq!(values(&out[0]), [0., 0., 3., 11.5]);
}

// ---- Linear -------------------------------------------------------------------------------

#[test]
fn linear_acts_on_the_last_dim() {
    let op = layer("Linear", &[int(3), int(2)], &[]);
    let x = arr(&[2, 2, 3], &[1., 2., 3., 4., 5., 6., 0., 0., 0., 1., -1., 0.5]);
    let w = arr(&[2, 3], &[1., 0., -1., 0.5, 0.5, 0.5]);
    let y = run1(op, &x, &[w, arr(&[2], &[10., 20.])]);
    assert_close(&y, &[2, 2, 2], &[8., 23., 8., 27.5, 10., 20., 10.5, 20.25]);
}

#[test]
fn linear_fused_epilogue_is_per_feature() {
    let op = Op::Linear(Linear {
        in_features: 2,
        out_features: 2,
        bias: false,
        epilogue: Epilogue { scale_shift: true, residual: false, act: Some(Activation::Tanh) },
    });
    let x = arr(&[1, 2], &[1., 2.]);
    let w = arr(&[2, 2], &[1., 1., 1., -1.]);
    let y = run1(op, &x, &[w, arr(&[2], &[0.5, 2.]), arr(&[2], &[-1., 0.])]);
    // [3, −1] · [0.5, 2] + [−1, 0] = [0.5, −2]
    assert_close(&y, &[1, 2], &[0.5f32.tanh(), (-2f32).tanh()]);
}

// ---- pooling ------------------------------------------------------------------------------

#[test]
fn max_pool_ceil_mode() {
    let x = seed_input();
    let y = run1(layer("MaxPool2d", &[int(3)], &[]), &x, &[]);
    assert_eq!(y, arr(&[1, 1, 1, 1], &[2.]));
    let y = run1(layer("MaxPool2d", &[int(3)], &[("ceil_mode", boolean(true))]), &x, &[]);
    assert_eq!(y, arr(&[1, 1, 2, 2], &[2., 3., 5., 1.]));
}

#[test]
fn max_pool_padding_is_minus_infinity_and_dilation() {
    let x = arr(&[1, 1, 2, 2], &[-1., -2., -3., -4.]);
    let y = run1(layer("MaxPool2d", &[int(2)], &[("stride", int(1)), ("padding", int(1))]), &x, &[]);
    assert_eq!(values(&y), [-1., -1., -2., -1., -1., -2., -3., -3., -4.]);
    // kernel 2, dilation 2, stride 1 on the 5×5: max of in[y, x], in[y, x+2], in[y+2, x], in[y+2, x+2].
    let y = run1(layer("MaxPool2d", &[int(2)], &[("stride", int(1)), ("dilation", int(2))]), &seed_input(), &[]);
    assert_eq!(values(&y), [1., 3., 1., 5., 3., 3., 2., 2., 1.]);
}

#[test]
fn max_pool_propagates_nan() {
    let x = arr(&[1, 1, 2, 4], &[1., f32::NAN, 3., 4., 5., 6., 7., 8.]);
    let y = run1(layer("MaxPool2d", &[int(2)], &[]), &x, &[]);
    assert!(y[[0, 0, 0, 0]].is_nan());
    assert_eq!(y[[0, 0, 0, 1]], 8.);
}

#[test]
fn avg_pool_count_include_pad() {
    let x = grid3();
    let op =
        |include: bool| layer("AvgPool2d", &[int(2)], &[("padding", int(1)), ("count_include_pad", boolean(include))]);
    assert_close(&run1(op(true), &x, &[]), &[1, 1, 2, 2], &[0.25, 1.25, 2.75, 7.]);
    assert_close(&run1(op(false), &x, &[]), &[1, 1, 2, 2], &[1., 2.5, 5.5, 7.]);
}

#[test]
fn avg_pool_ceil_mode_clips_to_the_padded_input() {
    // 4×4 ones, k3 s2 p1 ceil: windows per axis [−1, 2), [1, 4), [3, 5) → padded sizes 3, 3, 2,
    // real sizes 2, 3, 1.
    let x = ArrayD::from_elem(IxDyn(&[1, 1, 4, 4]), 1f32);
    let op = |include: bool| {
        layer(
            "AvgPool2d",
            &[int(3)],
            &[
                ("stride", int(2)),
                ("padding", int(1)),
                ("ceil_mode", boolean(true)),
                ("count_include_pad", boolean(include)),
            ],
        )
    };
    let (inc, real) = ([3., 3., 2.], [2., 3., 1.]);
    let expected: Vec<f32> = (0..9).map(|i| real[i / 3] * real[i % 3] / (inc[i / 3] * inc[i % 3])).collect();
    assert_close(&run1(op(true), &x, &[]), &[1, 1, 3, 3], &expected);
    assert_close(&run1(op(false), &x, &[]), &[1, 1, 3, 3], &[1.; 9]);
    // Without padding, the last ceil window hangs off the input and divides by what is left.
    let x = arr(&[1, 1, 1, 5], &[1., 2., 3., 4., 5.]);
    let y = run1(layer("AvgPool2d", &[pair(1, 2)], &[("ceil_mode", boolean(true))]), &x, &[]);
    assert_close(&y, &[1, 1, 1, 3], &[1.5, 3.5, 5.]);
}

#[test]
fn avg_pool_divisor_override() {
    let x = arr(&[1, 1, 2, 4], &[1., 2., 3., 4., 5., 6., 7., 8.]);
    let y = run1(layer("AvgPool2d", &[int(2)], &[("divisor_override", int(3))]), &x, &[]);
    assert_close(&y, &[1, 1, 1, 2], &[14. / 3., 22. / 3.]);
}

#[test]
fn padding_index_maps() {
    use super::conv::pad_index;
    use cnnc_compiler::ops::PaddingMode::*;
    let map = |mode| (-2..5).map(|i| pad_index(i, 3, mode)).collect::<Vec<_>>();
    assert_eq!(map(Zeros), [None, None, Some(0), Some(1), Some(2), None, None]);
    assert_eq!(map(Reflect), [Some(2), Some(1), Some(0), Some(1), Some(2), Some(1), Some(0)]);
    assert_eq!(map(Replicate), [Some(0), Some(0), Some(0), Some(1), Some(2), Some(2), Some(2)]);
    assert_eq!(map(Circular), [Some(1), Some(2), Some(0), Some(1), Some(2), Some(0), Some(1)]);
    // Degenerate sizes do not panic.
    assert_eq!(pad_index(-1, 1, Reflect), Some(0));
    assert_eq!(pad_index(-1, 0, Replicate), None);
}

#[test]
fn adaptive_avg_pool() {
    let x = arr(&[1, 1, 1, 5], &[1., 2., 3., 4., 5.]);
    let op = Op::AdaptiveAvgPool2d(AdaptiveAvgPool2d { out_h: None, out_w: Some(3) });
    assert_close(&run1(op, &x, &[]), &[1, 1, 1, 3], &[1.5, 3., 4.5]);
    let y = run1(layer("AdaptiveAvgPool2d", &[int(1)], &[]), &seed_input(), &[]);
    assert_close(&y, &[1, 1, 1, 1], &[35. / 25.]);
    // Upsampling repeats.
    let x = arr(&[1, 1, 1, 2], &[1., 3.]);
    let op = Op::AdaptiveAvgPool2d(AdaptiveAvgPool2d { out_h: Some(2), out_w: Some(3) });
    assert_close(&run1(op, &x, &[]), &[1, 1, 2, 3], &[1., 2., 3., 1., 2., 3.]);
}

// ---- BatchNorm2d --------------------------------------------------------------------------

#[test]
fn batch_norm_uses_running_statistics() {
    let op = Op::BatchNorm2d(BatchNorm2d {
        num_features: 2,
        eps: 1e-5,
        momentum: 0.1,
        affine: true,
        track_running_stats: true,
    });
    let x = arr(&[1, 2, 1, 2], &[1., 3., 0., -1.]);
    let params = [arr(&[2], &[2., 1.]), arr(&[2], &[0.5, 0.]), arr(&[2], &[1., -1.]), arr(&[2], &[4., 0.25])];
    let y = run1(op, &x, &params);
    let f = |x: f64, m: f64, v: f64, g: f64, b: f64| ((x - m) / (v + 1e-5).sqrt() * g + b) as f32;
    assert_eq!(
        values(&y),
        [f(1., 1., 4., 2., 0.5), f(3., 1., 4., 2., 0.5), f(0., -1., 0.25, 1., 0.), f(-1., -1., 0.25, 1., 0.)]
    );
    // ≈ [0.5, 2.5, 2, 0] (eps shifts the third value by 4e-5).
    assert_close(&y, &[1, 2, 1, 2], &[0.5, 2.5 - 2.5e-6, 2. - 4e-5, 0.]);

    let op = Op::BatchNorm2d(BatchNorm2d {
        num_features: 2,
        eps: 1e-10,
        momentum: 0.1,
        affine: false,
        track_running_stats: true,
    });
    let y = run1(op, &x, &params[2..]);
    assert_close(&y, &[1, 2, 1, 2], &[0., 1., 2., 0.]);
}

// ---- elementwise and shape ops -------------------------------------------------------------

#[test]
fn activations_and_dropout() {
    let x = arr(&[1, 4], &[-2., 0., 1.5, f32::NAN]);
    let relu = run1(layer("ReLU", &[], &[]), &x, &[]);
    assert_eq!(&values(&relu)[..3], [0., 0., 1.5]);
    assert!(relu[[0, 3]].is_nan());
    let sig = run1(layer("Sigmoid", &[], &[]), &x, &[]);
    assert_close(&sig.slice_move(ndarray::s![.., ..3]).into_dyn(), &[1, 3], &[0.119_202_92, 0.5, 0.817_574_5]);
    let tanh = run1(layer("Tanh", &[], &[]), &x, &[]);
    assert_close(&tanh.slice_move(ndarray::s![.., ..3]).into_dyn(), &[1, 3], &[-0.964_027_6, 0., 0.905_148_3]);
    let x = arr(&[1, 3], &[1., 2., 3.]);
    assert_eq!(run1(Op::Dropout(Dropout { p: 0.5 }), &x, &[]), x);
}

#[test]
fn flatten_ranges() {
    let x = Array::from_iter((0..24).map(|v| v as f32)).into_shape_with_order(IxDyn(&[2, 3, 2, 2])).unwrap();
    let y = run1(layer("Flatten", &[], &[]), &x, &[]);
    assert_eq!(y.shape(), &[2, 12]);
    assert_eq!(values(&y), values(&x));
    let y = run1(Op::Flatten(Flatten { start_dim: 2, end_dim: -1 }), &x, &[]);
    assert_eq!(y.shape(), &[2, 3, 4]);
    let y = run1(Op::Flatten(Flatten { start_dim: 1, end_dim: 2 }), &x, &[]);
    assert_eq!(y.shape(), &[2, 6, 2]);
    assert_eq!(values(&y), values(&x));
}

/// `a`, `b` inputs of the same type, `y = f(a, b)`.
fn binary(op: Op, a: &[usize], b: &[usize]) -> Graph {
    let mut g = GraphBuilder::new("bin");
    let x = g.input("a", TensorType::new(a.to_vec()));
    let y = g.input("b", TensorType::new(b.to_vec()));
    let z = g.layer("f", op, &[x, y]).unwrap();
    g.output("z", z);
    g.finish()
}

#[test]
fn add_and_concat() {
    let a = arr(&[1, 2, 1, 2], &[1., 2., 3., 4.]);
    let b = arr(&[1, 2, 1, 2], &[10., 20., 30., 40.]);
    let g = binary(Op::Add(Add), &[2, 1, 2], &[2, 1, 2]);
    let w = Weights::random(&g, 0);
    assert_eq!(values(&run(&g, &w, &[a.view(), b.view()]).unwrap()[0]), [11., 22., 33., 44.]);

    let c = arr(&[1, 1, 1, 2], &[7., 8.]);
    let g = binary(Op::Concat(Concat { dim: 1 }), &[2, 1, 2], &[1, 1, 2]);
    let out = run(&g, &Weights::random(&g, 0), &[a.view(), c.view()]).unwrap();
    assert_eq!(out[0], arr(&[1, 3, 1, 2], &[1., 2., 3., 4., 7., 8.]));
    let g = binary(Op::Concat(Concat { dim: 3 }), &[2, 1, 2], &[2, 1, 2]);
    let out = run(&g, &Weights::random(&g, 0), &[a.view(), b.view()]).unwrap();
    assert_eq!(out[0], arr(&[1, 2, 1, 4], &[1., 2., 10., 20., 3., 4., 30., 40.]));
}

#[test]
fn reductions() {
    let x = arr(&[1, 2, 2, 2], &[1., 2., 3., 4., 5., 6., 7., f32::NAN]);
    let reduce =
        |kind, dims: &[usize], keepdim| run1(Op::Reduce(Reduce { kind, dims: dims.to_vec(), keepdim }), &x, &[]);
    let y = reduce(ReduceKind::Mean, &[2, 3], false);
    assert_eq!(y.shape(), &[1, 2]);
    assert_eq!(y[[0, 0]], 2.5);
    assert!(y[[0, 1]].is_nan());
    let y = reduce(ReduceKind::Mean, &[1], true);
    assert_eq!(y.shape(), &[1, 1, 2, 2]);
    assert_eq!(&values(&y)[..3], [3., 4., 5.]);
    let y = reduce(ReduceKind::Max, &[2, 3], true);
    assert_eq!(y.shape(), &[1, 2, 1, 1]);
    assert_eq!(y[[0, 0, 0, 0]], 4.);
    assert!(y[[0, 1, 0, 0]].is_nan());
    let y = reduce(ReduceKind::Max, &[3], false);
    assert_eq!(y.shape(), &[1, 2, 2]);
    assert_eq!(&values(&y)[..3], [2., 4., 6.]);
    assert!(y[[0, 1, 1]].is_nan());
    // NaN first in the window also wins.
    let x = arr(&[1, 3], &[f32::NAN, 5., 1.]);
    let y = run1(Op::Reduce(Reduce { kind: ReduceKind::Max, dims: vec![1], keepdim: false }), &x, &[]);
    assert!(y[[0]].is_nan());
}

// ---- whole nets ---------------------------------------------------------------------------

#[test]
fn small_net_with_two_outputs() {
    // conv → relu → (pool → flatten → linear), with the relu also an output.
    let mut b = GraphBuilder::new("small");
    let x = b.input("x", TensorType::new(vec![1, 5, 5]));
    let c = b.layer("conv", layer("Conv2d", &[int(1), int(1), int(3)], &[("bias", boolean(false))]), &[x]).unwrap();
    let r = b.layer("relu", layer("ReLU", &[], &[]), &[c]).unwrap();
    let p = b.layer("pool", layer("MaxPool2d", &[int(3)], &[]), &[r]).unwrap();
    let f = b.layer("flat", layer("Flatten", &[], &[]), &[p]).unwrap();
    let l = b.layer("fc", layer("Linear", &[int(1), int(2)], &[]), &[f]).unwrap();
    b.output("logits", l);
    b.output("features", r);
    let g = b.finish();
    let w = weights_with(&g, &[seed_kernel(), arr(&[2, 1], &[1., -1.]), arr(&[2], &[0., 100.])]);
    let batch = ndarray::concatenate(ndarray::Axis(0), &[seed_input().view(), (-seed_input()).view()]).unwrap();
    let out = run(&g, &w, &[batch.view()]).unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(out[0], arr(&[2, 2], &[18., 82., 0., 100.]));
    assert_eq!(out[1].shape(), &[2, 1, 3, 3]);
    assert_eq!(values(&out[1])[..9], [10., 12., 12., 18., 16., 16., 13., 9., 3.]);
    assert!(values(&out[1])[9..].iter().all(|v| *v == 0.));
}

// ---- input validation ---------------------------------------------------------------------

fn mnist_like() -> Graph {
    single(layer("Flatten", &[], &[]), &[1, 28, 28])
}

#[test]
fn wrong_input_count() {
    let g = mnist_like();
    let w = Weights::random(&g, 0);
    let err = run(&g, &w, &[]).unwrap_err();
    assert!(matches!(err, Error::InputCount { expected: 1, got: 0, .. }), "{err}");
    let x = ArrayD::<f32>::zeros(IxDyn(&[1, 1, 28, 28]));
    let err = run(&g, &w, &[x.view(), x.view()]).unwrap_err();
    assert!(matches!(err, Error::InputCount { expected: 1, got: 2, .. }), "{err}");
}

#[test]
fn wrong_input_shape_names_both() {
    let g = mnist_like();
    let w = Weights::random(&g, 0);
    for shape in [&[2, 1, 28, 27][..], &[1, 28, 28], &[2, 3, 28, 28]] {
        let x = ArrayD::<f32>::zeros(IxDyn(shape));
        let err = run(&g, &w, &[x.view()]).unwrap_err();
        let Error::InputShape { name, expected, found } = &err else { panic!("{err}") };
        assert_eq!((name.as_str(), expected.as_str(), found.as_slice()), ("x", "[N, 1, 28, 28]", shape));
        assert!(err.to_string().contains("[N, 1, 28, 28]"), "{err}");
    }
    // Any batch ≥ 1 fits N.
    for n in [1, 3] {
        let x = ArrayD::<f32>::zeros(IxDyn(&[n, 1, 28, 28]));
        assert_eq!(check_inputs(&g, &[x.view()]).unwrap(), n);
        assert_eq!(run(&g, &w, &[x.view()]).unwrap()[0].shape(), &[n, 784]);
    }
}

#[test]
fn fixed_batch_must_match() {
    let mut b = GraphBuilder::new("fixed");
    let x = b.input("x", TensorType { batch: Batch::Fixed(2), dims: vec![3] });
    let y = b.layer("0", layer("ReLU", &[], &[]), &[x]).unwrap();
    b.output("y", y);
    let g = b.finish();
    let w = Weights::random(&g, 0);
    let ok = ArrayD::<f32>::zeros(IxDyn(&[2, 3]));
    assert_eq!(check_inputs(&g, &[ok.view()]).unwrap(), 2);
    let bad = ArrayD::<f32>::zeros(IxDyn(&[3, 3]));
    let err = run(&g, &w, &[bad.view()]).unwrap_err();
    assert!(matches!(&err, Error::InputShape { expected, .. } if expected == "[2, 3]"), "{err}");
}

#[test]
fn symbolic_batch_is_shared_between_inputs() {
    let g = binary(Op::Add(Add), &[2], &[2]);
    let a = ArrayD::<f32>::zeros(IxDyn(&[2, 2]));
    let b = ArrayD::<f32>::zeros(IxDyn(&[3, 2]));
    let err = check_inputs(&g, &[a.view(), b.view()]).unwrap_err();
    assert!(
        matches!(&err, Error::InputShape { name, expected, .. } if name == "b" && expected.contains("N = 2")),
        "{err}"
    );
}

#[test]
fn empty_batch_is_rejected() {
    let g = mnist_like();
    let x = ArrayD::<f32>::zeros(IxDyn(&[0, 1, 28, 28]));
    let err = run(&g, &Weights::random(&g, 0), &[x.view()]).unwrap_err();
    assert!(matches!(err, Error::Batch { batch: 0, .. }), "{err}");
}

#[test]
fn non_contiguous_input_is_rejected() {
    let g = single(layer("ReLU", &[], &[]), &[2]);
    let w = Weights::random(&g, 0);
    let x = Array::from_shape_vec((3, 2).f(), vec![1f32; 6]).unwrap().into_dyn();
    let err = run(&g, &w, &[x.view()]).unwrap_err();
    assert!(matches!(&err, Error::NonContiguous { name, shape, .. } if name == "x" && shape == &[3, 2]), "{err}");
    // The message names the strides a standard layout has and the ones it found.
    assert!(err.to_string().contains("expected strides [2, 1], found [1, 3]"), "{err}");
    let std = x.as_standard_layout();
    assert!(run(&g, &w, &[std.view()]).is_ok());
    // A strided slice is not contiguous either.
    let big = ArrayD::<f32>::zeros(IxDyn(&[4, 2]));
    let every_other = big.slice(ndarray::s![..;2, ..]).into_dyn();
    assert!(matches!(run(&g, &w, &[every_other]), Err(Error::NonContiguous { .. })));
}

#[test]
fn weights_of_another_net_are_rejected() {
    let g = single(layer("Linear", &[int(3), int(2)], &[]), &[3]);
    let other = single(layer("Linear", &[int(3), int(4)], &[]), &[3]);
    let x = ArrayD::<f32>::zeros(IxDyn(&[1, 3]));
    let err = run(&g, &Weights::random(&other, 0), &[x.view()]).unwrap_err();
    assert!(matches!(err, Error::Weights(crate::WeightsError::Mismatch { .. })), "{err}");
}
