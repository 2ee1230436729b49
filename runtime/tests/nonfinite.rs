//! NaN and ±∞ propagate as in PyTorch, in the interpreter and in the JIT (micro-kernel and
//! portable paths). The expectations are derived here from IEEE arithmetic and PyTorch's
//! rules, not from either engine: a sum with a NaN term is NaN, `+∞ + −∞` is NaN, a product
//! with an infinity keeps the infinity with the sign of the (non-zero) factor, ReLU keeps NaN
//! and `+∞` and maps `−∞` to 0, max-pooling and `amax` return NaN for a window that holds one
//! (ATen: `if (val > maxval || isnan(val))`), and padding never contributes a non-finite
//! value (zeros are skipped, reflect / replicate / circular re-read real elements).

mod jit_common;

use cnnc_compiler::ops::{Activation, Add, Epilogue, Op, Reduce, ReduceKind};
use cnnc_compiler::{Graph, GraphBuilder, ParamId, TensorType};
use cnnc_runtime::weights::{ParamData, Weights};
use cnnc_runtime::{Compiled, Options, interp};
use jit_common::*;
use ndarray::{ArrayD, Dimension, IxDyn};

/// What a value is, as far as propagation cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Finite,
    PosInf,
    NegInf,
    Nan,
}

fn kind(v: f32) -> Kind {
    if v.is_nan() {
        Kind::Nan
    } else if v == f32::INFINITY {
        Kind::PosInf
    } else if v == f32::NEG_INFINITY {
        Kind::NegInf
    } else {
        Kind::Finite
    }
}

/// The kind of a sum of terms of these kinds (finite terms never overflow here).
fn sum(terms: impl IntoIterator<Item = Kind>) -> Kind {
    let (mut pos, mut neg) = (false, false);
    for t in terms {
        match t {
            Kind::Nan => return Kind::Nan,
            Kind::PosInf => pos = true,
            Kind::NegInf => neg = true,
            Kind::Finite => {}
        }
    }
    match (pos, neg) {
        (true, true) => Kind::Nan,
        (true, false) => Kind::PosInf,
        (false, true) => Kind::NegInf,
        (false, false) => Kind::Finite,
    }
}

/// The kind of `value · w` for a finite, non-zero `w`.
fn times(value: f32, w: f32) -> Kind {
    match (kind(value), w > 0.0) {
        (Kind::PosInf, false) => Kind::NegInf,
        (Kind::NegInf, false) => Kind::PosInf,
        (k, _) => k,
    }
}

fn relu(k: Kind) -> Kind {
    if k == Kind::NegInf { Kind::Finite } else { k }
}

/// Every engine's outputs for `xs`: the interpreter, the JIT with the host's micro-kernels,
/// and the portable JIT.
fn engines(g: &Graph, w: &Weights, xs: &[ArrayD<f32>]) -> Vec<(&'static str, Vec<ArrayD<f32>>)> {
    let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
    let mut out = vec![("interpreter", interp::run(g, w, &views).unwrap_or_else(|e| panic!("interp: {e}")))];
    for (name, portable) in [("JIT", false), ("portable JIT", true)] {
        let net = Compiled::new(g, w, &Options { threads: 1, portable, fuse: false, ..Default::default() })
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        out.push((name, net.run(&views).unwrap_or_else(|e| panic!("{name}: {e}"))));
    }
    out
}

/// Asserts that every element of `got` is of the expected kind.
fn assert_kinds(what: &str, got: &ArrayD<f32>, want: &ArrayD<Kind>) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    for ((i, g), w) in got.indexed_iter().zip(want.iter()) {
        assert_eq!(kind(*g), *w, "{what}: element {:?} is {g}", i.slice());
    }
}

/// Replaces the f32 parameter `key` by `(|v| + 0.05) · sign(index)`: non-zero values with a
/// known sign.
fn signed(g: &Graph, w: &mut Weights, key: &str, sign: impl Fn(&[usize]) -> f32) {
    let id = ParamId(g.params.iter().position(|p| p.name == key).unwrap_or_else(|| panic!("no {key}")));
    let old = w.f32(id).unwrap().clone();
    let new = ArrayD::from_shape_fn(old.raw_dim(), |i| (old[&i].abs() + 0.05) * sign(i.slice()));
    w.set(id, ParamData::F32(new)).unwrap();
}

/// The input index PyTorch reads for padded coordinate `i` on an axis of `n`, if any.
fn remap(i: i64, n: i64, mode: &str) -> Option<usize> {
    let j = match mode {
        "zeros" if !(0..n).contains(&i) => return None,
        "reflect" if i < 0 => -i,
        "reflect" if i >= n => 2 * (n - 1) - i,
        "replicate" => i.clamp(0, n - 1),
        "circular" => i.rem_euclid(n),
        _ => i,
    };
    Some(j as usize)
}

/// `x` with NaN, `+∞` and `−∞` planted at the given `[n, c, h, w]` positions.
fn planted(shape: &[usize], seed: u64, specials: &[([usize; 4], f32)]) -> ArrayD<f32> {
    let mut x = random(shape, seed);
    for (at, v) in specials {
        x[&at[..]] = *v;
    }
    x
}

#[test]
fn conv_non_finite_inputs_reach_exactly_the_outputs_whose_window_reads_them() {
    let (h, w) = (6usize, 7usize);
    // (kernel, stride, padding, dilation)
    let geometries = [(3usize, 1usize, 1usize, 1usize), (3, 2, 1, 1), (3, 1, 2, 2)];
    // One NaN, one +∞ and one −∞ per sample; in sample 1 the infinities share windows, so
    // some outputs see +∞ + −∞.
    let specials = [
        ([0, 0, 0, 0], f32::NAN),
        ([0, 1, 3, 6], f32::INFINITY),
        ([0, 2, 5, 2], f32::NEG_INFINITY),
        ([1, 2, 1, 4], f32::NAN),
        ([1, 0, 3, 1], f32::INFINITY),
        ([1, 1, 4, 2], f32::NEG_INFINITY),
    ];
    let epilogues = [
        Epilogue::default(),
        Epilogue { scale_shift: false, residual: false, act: Some(Activation::Relu) },
        Epilogue { scale_shift: true, residual: false, act: Some(Activation::Relu) },
    ];
    for mode in ["zeros", "reflect", "replicate", "circular"] {
        for (k, st, p, d) in geometries {
            // 2 output channels: the plain Cranelift kernel; 8: the micro-kernel path.
            for cout in [2usize, 8] {
                for epi in &epilogues {
                    let op = layer(
                        "Conv2d",
                        &[int(3), int(cout as i64), int(k as i64)],
                        &[
                            ("stride", int(st as i64)),
                            ("padding", int(p as i64)),
                            ("dilation", int(d as i64)),
                            ("padding_mode", s(mode)),
                        ],
                    );
                    let g = one_layer(&[3, h, w], with_epilogue(op, epi.clone()));
                    let mut wts = weights(&g, 11);
                    // Even output channels have positive weights, odd ones negative.
                    signed(&g, &mut wts, "layer.weight", |i| if i[0] % 2 == 0 { 1.0 } else { -1.0 });
                    let x = planted(&[2, 3, h, w], 5, &specials);
                    let out_dims = g.node(g.outputs[0].1).ty.concrete(2);
                    let (oh, ow) = (out_dims[2], out_dims[3]);
                    let want = ArrayD::from_shape_fn(IxDyn(&out_dims), |i| {
                        let (n, oc, oy, ox) = (i[0], i[1], i[2], i[3]);
                        let wsign = if oc % 2 == 0 { 1.0 } else { -1.0 };
                        let mut terms = vec![];
                        for ky in 0..k {
                            let Some(iy) = remap((oy * st + ky * d) as i64 - p as i64, h as i64, mode) else {
                                continue;
                            };
                            for kx in 0..k {
                                let Some(ix) = remap((ox * st + kx * d) as i64 - p as i64, w as i64, mode) else {
                                    continue;
                                };
                                for ic in 0..3 {
                                    terms.push(times(x[[n, ic, iy, ix]], wsign));
                                }
                            }
                        }
                        let k = sum(terms);
                        // A positive scale keeps the sign; ReLU is last.
                        if epi.act.is_some() { relu(k) } else { k }
                    });
                    assert!(oh * ow > 0);
                    assert!(want.iter().any(|k| *k == Kind::Nan) && want.iter().any(|k| *k == Kind::Finite));
                    for (engine, y) in engines(&g, &wts, &[x]) {
                        let what = format!("{engine}: Conv2d k{k} s{st} p{p} d{d} {mode}, {cout} out, {epi:?}");
                        assert_kinds(&what, &y[0], &want);
                    }
                }
            }
        }
    }
}

#[test]
fn residual_epilogue_adds_non_finite_skips_before_the_activation() {
    for act in [None, Some(Activation::Relu)] {
        for cout in [2usize, 8] {
            let op = layer("Conv2d", &[int(3), int(cout as i64), int(3)], &[("padding", int(1))]);
            let g =
                one_layer_residual(&[3, 5, 5], with_epilogue(op, Epilogue { scale_shift: false, residual: true, act }));
            let wts = weights(&g, 3);
            let x = random(&[1, 3, 5, 5], 4);
            let specials =
                [([0, 0, 0, 0], f32::NAN), ([0, 1, 2, 2], f32::INFINITY), ([0, cout - 1, 4, 1], f32::NEG_INFINITY)];
            let r = planted(&[1, cout, 5, 5], 6, &specials);
            let want = r.mapv(|v| if act.is_some() { relu(kind(v)) } else { kind(v) });
            for (engine, y) in engines(&g, &wts, &[x.clone(), r.clone()]) {
                assert_kinds(&format!("{engine}: conv ⇒ +residual ⇒ {act:?}, {cout} out"), &y[0], &want);
            }
        }
    }
}

#[test]
fn linear_spreads_a_non_finite_feature_to_its_whole_row() {
    for act in [None, Some(Activation::Relu)] {
        for bias in [true, false] {
            let op = layer("Linear", &[int(6), int(5)], &[("bias", b(bias))]);
            let g = one_layer(&[6], with_epilogue(op, Epilogue { scale_shift: false, residual: false, act }));
            let mut wts = weights(&g, 2);
            // Outputs 0, 2, 4 have positive weights, 1 and 3 negative.
            signed(&g, &mut wts, "layer.weight", |i| if i[0] % 2 == 0 { 1.0 } else { -1.0 });
            let mut x = random(&[4, 6], 8);
            x[[0, 2]] = f32::NAN;
            x[[1, 1]] = f32::INFINITY;
            x[[2, 5]] = f32::INFINITY;
            x[[2, 0]] = f32::NEG_INFINITY;
            let want = ArrayD::from_shape_fn(IxDyn(&[4, 5]), |i| {
                let wsign = if i[1] % 2 == 0 { 1.0 } else { -1.0 };
                let k = sum((0..6).map(|j| times(x[[i[0], j]], wsign)));
                if act.is_some() { relu(k) } else { k }
            });
            for (engine, y) in engines(&g, &wts, std::slice::from_ref(&x)) {
                assert_kinds(&format!("{engine}: Linear(6, 5, bias={bias}) ⇒ {act:?}"), &y[0], &want);
            }
        }
    }
}

/// The input positions of output `o` of a pooling window along an axis of `n`.
fn taps(o: usize, k: usize, s: usize, p: usize, d: usize, n: usize) -> Vec<usize> {
    (0..k).filter_map(|t| usize::try_from((o * s + t * d) as i64 - p as i64).ok().filter(|i| *i < n)).collect()
}

#[test]
fn pooling_propagates_like_aten() {
    let (c, h, w) = (2usize, 6usize, 7usize);
    let specials = [
        ([0, 0, 0, 0], f32::NAN),
        ([0, 0, 3, 3], f32::INFINITY),
        ([0, 0, 3, 4], f32::NEG_INFINITY),
        ([0, 1, 2, 5], f32::NEG_INFINITY),
        ([1, 1, 5, 6], f32::NAN),
        ([1, 0, 1, 1], f32::INFINITY),
        ([1, 0, 0, 4], f32::NEG_INFINITY),
        ([1, 0, 0, 5], f32::NEG_INFINITY),
        ([1, 0, 1, 4], f32::NEG_INFINITY),
        ([1, 0, 1, 5], f32::NEG_INFINITY),
    ];
    let x = planted(&[2, c, h, w], 9, &specials);
    let window = |i: &[usize], (k, s, p, d): (usize, usize, usize, usize)| -> Vec<f32> {
        let mut v = vec![];
        for iy in taps(i[2], k, s, p, d, h) {
            for ix in taps(i[3], k, s, p, d, w) {
                v.push(x[[i[0], i[1], iy, ix]]);
            }
        }
        v
    };
    // (kernel, stride, padding, dilation)
    for geo in [(2usize, 2usize, 0usize, 1usize), (2, 2, 1, 1), (3, 2, 1, 1), (2, 1, 0, 2)] {
        let (k, st, p, d) = geo;
        let max = layer(
            "MaxPool2d",
            &[int(k as i64)],
            &[("stride", int(st as i64)), ("padding", int(p as i64)), ("dilation", int(d as i64))],
        );
        let g = one_layer(&[c, h, w], max);
        let dims = g.node(g.outputs[0].1).ty.concrete(2);
        // The exact value: the first NaN of the window, else its maximum (−∞ only when every
        // element is −∞; padding is never the maximum).
        let want = ArrayD::from_shape_fn(IxDyn(&dims), |i| {
            window(i.slice(), geo).into_iter().fold(f32::NEG_INFINITY, |m, v| if v > m || v.is_nan() { v } else { m })
        });
        assert!(want.iter().any(|v| v.is_nan()));
        if geo == (2, 2, 0, 1) {
            assert!(want.iter().any(|v| *v == f32::NEG_INFINITY), "a window of −∞ only");
        }
        for (engine, y) in engines(&g, &weights(&g, 0), std::slice::from_ref(&x)) {
            let what = format!("{engine}: MaxPool2d {geo:?}");
            assert_eq!(y[0].shape(), want.shape(), "{what}");
            for ((i, got), want) in y[0].indexed_iter().zip(&want) {
                assert!(got == want || got.is_nan() && want.is_nan(), "{what}: {:?}: {got}, not {want}", i.slice());
            }
        }
        if d == 1 {
            for cip in [true, false] {
                let avg = layer(
                    "AvgPool2d",
                    &[int(k as i64)],
                    &[("stride", int(st as i64)), ("padding", int(p as i64)), ("count_include_pad", b(cip))],
                );
                let g = one_layer(&[c, h, w], avg);
                let want = ArrayD::from_shape_fn(IxDyn(&dims), |i| sum(window(i.slice(), geo).into_iter().map(kind)));
                for (engine, y) in engines(&g, &weights(&g, 0), std::slice::from_ref(&x)) {
                    assert_kinds(&format!("{engine}: AvgPool2d {geo:?} count_include_pad={cip}"), &y[0], &want);
                }
            }
        }
    }
    for (oh, ow) in [(1usize, 1usize), (4, 3), (6, 7)] {
        let g = one_layer(&[c, h, w], layer("AdaptiveAvgPool2d", &[pair(oh as i64, ow as i64)], &[]));
        let bounds = |i: usize, n: usize, o: usize| (i * n / o, ((i + 1) * n).div_ceil(o));
        let want = ArrayD::from_shape_fn(IxDyn(&[2, c, oh, ow]), |i| {
            let ((y0, y1), (x0, x1)) = (bounds(i[2], h, oh), bounds(i[3], w, ow));
            sum((y0..y1).flat_map(|iy| (x0..x1).map(move |ix| (iy, ix))).map(|(iy, ix)| kind(x[[i[0], i[1], iy, ix]])))
        });
        for (engine, y) in engines(&g, &weights(&g, 0), std::slice::from_ref(&x)) {
            assert_kinds(&format!("{engine}: AdaptiveAvgPool2d(({oh}, {ow}))"), &y[0], &want);
        }
    }
}

#[test]
fn batchnorm_keeps_nan_and_signs_infinities_by_its_scale() {
    let g = one_layer(&[3, 4, 5], layer("BatchNorm2d", &[int(3)], &[]));
    let mut wts = weights(&g, 4);
    // Channel 1 scales by a negative weight.
    signed(&g, &mut wts, "layer.weight", |i| if i[0] == 1 { -1.0 } else { 1.0 });
    let specials = [
        ([0, 0, 0, 0], f32::NAN),
        ([0, 1, 1, 1], f32::INFINITY),
        ([1, 1, 3, 4], f32::NEG_INFINITY),
        ([1, 2, 2, 2], f32::INFINITY),
    ];
    let x = planted(&[2, 3, 4, 5], 1, &specials);
    let want = ArrayD::from_shape_fn(IxDyn(&[2, 3, 4, 5]), |i| times(x[&i], if i[1] == 1 { -1.0 } else { 1.0 }));
    for (engine, y) in engines(&g, &wts, std::slice::from_ref(&x)) {
        assert_kinds(&format!("{engine}: BatchNorm2d"), &y[0], &want);
    }
}

#[test]
fn add_mean_and_amax_propagate() {
    let mut gb = GraphBuilder::new("reduce");
    let a = gb.input("a", TensorType::new(vec![3, 4, 5]));
    let bb = gb.input("b", TensorType::new(vec![3, 4, 5]));
    let s = gb.layer("add", Op::Add(Add), &[a, bb]).unwrap();
    let reduce = |kind, dims: Vec<usize>, keepdim| Op::Reduce(Reduce { kind, dims, keepdim });
    let mean = gb.layer("mean", reduce(ReduceKind::Mean, vec![2, 3], false), &[s]).unwrap();
    let amax = gb.layer("amax", reduce(ReduceKind::Max, vec![2, 3], false), &[s]).unwrap();
    let amax_c = gb.layer("amax_c", reduce(ReduceKind::Max, vec![1], true), &[s]).unwrap();
    for (name, id) in [("sum", s), ("mean", mean), ("amax", amax), ("amax_c", amax_c)] {
        gb.output(name, id);
    }
    let g = gb.finish();
    // +∞ + −∞ at one place, a NaN at another, and a lone −∞ and +∞.
    let a_x = planted(&[2, 3, 4, 5], 2, &[([0, 0, 1, 1], f32::INFINITY), ([0, 2, 0, 0], f32::NEG_INFINITY)]);
    let b_x = planted(&[2, 3, 4, 5], 3, &[([0, 0, 1, 1], f32::NEG_INFINITY), ([1, 1, 3, 2], f32::NAN)]);
    let sum_k = ArrayD::from_shape_fn(IxDyn(&[2, 3, 4, 5]), |i| sum([kind(a_x[&i]), kind(b_x[&i])]));
    assert_eq!(sum_k[[0, 0, 1, 1]], Kind::Nan);
    let plane = |n: usize, c: usize| (0..4).flat_map(move |y| (0..5).map(move |x| [n, c, y, x]));
    let mean_k = ArrayD::from_shape_fn(IxDyn(&[2, 3]), |i| sum(plane(i[0], i[1]).map(|p| sum_k[p])));
    // amax: NaN if any, else +∞ if any, else finite (−∞ never wins against a finite value).
    let max_of = |ks: &mut dyn Iterator<Item = Kind>| {
        let ks: Vec<Kind> = ks.collect();
        if ks.contains(&Kind::Nan) {
            Kind::Nan
        } else if ks.contains(&Kind::PosInf) {
            Kind::PosInf
        } else if ks.iter().all(|k| *k == Kind::NegInf) {
            Kind::NegInf
        } else {
            Kind::Finite
        }
    };
    let amax_k = ArrayD::from_shape_fn(IxDyn(&[2, 3]), |i| max_of(&mut plane(i[0], i[1]).map(|p| sum_k[p])));
    let amax_c_k =
        ArrayD::from_shape_fn(IxDyn(&[2, 1, 4, 5]), |i| max_of(&mut (0..3).map(|c| sum_k[[i[0], c, i[2], i[3]]])));
    for (engine, y) in engines(&g, &weights(&g, 0), &[a_x.clone(), b_x.clone()]) {
        assert_kinds(&format!("{engine}: a + b"), &y[0], &sum_k);
        assert_kinds(&format!("{engine}: mean"), &y[1], &mean_k);
        assert_kinds(&format!("{engine}: amax over H, W"), &y[2], &amax_k);
        assert_kinds(&format!("{engine}: amax over C"), &y[3], &amax_c_k);
    }
}
