//! The training ops ([`TrainOp`]): BatchNorm2d with batch statistics, Dropout's mask, the
//! losses and every backward op, with PyTorch's semantics. Sums are accumulated in f64 and
//! rounded to f32 once, as the forward ops are.

use super::conv::{pad_index, pad_sample};
use super::pool::avg_window;
use super::{NodeParams, internal};
use crate::error::{Error, Result};
use cnnc_compiler::graph::Node;
use cnnc_compiler::ops::train::{Loss, Reduction, TrainOp};
use cnnc_compiler::ops::{
    Activation, AdaptiveAvgPool2d, AvgPool2d, BatchNorm2d, Conv2d, Linear, MaxPool2d, Reduce, ReduceKind,
};
use cnnc_compiler::shape::adaptive_window;
use ndarray::{ArrayD, ArrayViewD, Axis, IxDyn, Slice};

fn arr(node: &Node, shape: &[usize], data: Vec<f32>) -> Result<ArrayD<f32>> {
    ArrayD::from_shape_vec(IxDyn(shape), data).map_err(|e| internal(node, &e.to_string()))
}

fn contiguous<'a>(x: &'a ndarray::CowArray<'_, f32, IxDyn>, node: &Node) -> Result<&'a [f32]> {
    x.as_slice().ok_or_else(|| internal(node, "an operand is not contiguous"))
}

fn nchw(shape: &[usize], node: &Node) -> Result<[usize; 4]> {
    match shape {
        &[n, c, h, w] => Ok([n, c, h, w]),
        _ => Err(internal(node, "a 4-D operand is expected")),
    }
}

/// Evaluates one training op.
pub(crate) fn eval(op: &TrainOp, args: &[ArrayViewD<'_, f32>], params: &NodeParams<'_>) -> Result<ArrayD<f32>> {
    let node = params.node();
    let arg = |i: usize| args.get(i).ok_or_else(|| internal(node, "an operand is missing"));
    match op {
        TrainOp::BatchStats(_) => batch_stats(arg(0)?, node),
        TrainOp::BatchNormTrain(bn) => bn_train(bn, arg(0)?, arg(1)?, params),
        TrainOp::DropoutMask(_) => {
            let (a, b) = (arg(0)?, arg(1)?);
            if a.shape() != b.shape() {
                return Err(internal(node, "the mask's shape differs from the input's"));
            }
            Ok((a * b).as_standard_layout().into_owned())
        }
        TrainOp::Loss(l) => loss(l, arg(0)?, arg(1)?, node, false),
        TrainOp::LossGrad(l) => loss(l, arg(0)?, arg(1)?, node, true),
        TrainOp::ConvInputGrad(c, hw) => conv_input_grad(c, *hw, arg(0)?, params),
        TrainOp::ConvWeightGrad(c) => conv_weight_grad(c, arg(0)?, arg(1)?, node),
        TrainOp::LinearInputGrad(l) => linear_input_grad(l, arg(0)?, params),
        TrainOp::LinearWeightGrad(l) => linear_weight_grad(l, arg(0)?, arg(1)?, node),
        TrainOp::BiasGrad(axis) => bias_grad(*axis, arg(0)?, node),
        TrainOp::MaxPoolGrad(p) => max_pool_grad(p, arg(0)?, arg(1)?, node),
        TrainOp::AvgPoolGrad(p, hw) => avg_pool_grad(p, *hw, arg(0)?, node),
        TrainOp::AdaptiveAvgPoolGrad(p, hw) => adaptive_avg_pool_grad(p, *hw, arg(0)?, node),
        TrainOp::BatchNormInputGrad(bn) => bn_train_grad(bn, arg(0)?, arg(1)?, arg(2)?, params, true),
        TrainOp::BatchNormWeightGrad(bn) => bn_train_grad(bn, arg(0)?, arg(1)?, arg(2)?, params, false),
        TrainOp::BatchNormEvalInputGrad(bn) => bn_eval_input_grad(bn, arg(0)?, params),
        TrainOp::BatchNormEvalWeightGrad(bn) => bn_eval_weight_grad(bn, arg(0)?, arg(1)?, params),
        TrainOp::ActivationGrad(a) => activation_grad(*a, arg(0)?, arg(1)?, node),
        TrainOp::Reshape(dims) => {
            let dy = arg(0)?;
            let mut shape = vec![dy.shape()[0]];
            shape.extend_from_slice(dims);
            dy.as_standard_layout()
                .into_owned()
                .into_shape_with_order(IxDyn(&shape))
                .map_err(|e| internal(node, &e.to_string()))
        }
        TrainOp::Slice { dim, start, len } => {
            let dy = arg(0)?;
            if *dim >= dy.ndim() || start + len > dy.shape()[*dim] {
                return Err(internal(node, "the slice is out of range"));
            }
            Ok(dy.slice_axis(Axis(*dim), Slice::from(*start..start + len)).as_standard_layout().into_owned())
        }
        TrainOp::ReduceGrad(r) => reduce_grad(r, arg(0)?, arg(1)?, node),
    }
}

/// Per-channel mean and biased variance of an NCHW tensor (two passes in f64), as `[2, C]`.
fn batch_stats(x: &ArrayViewD<'_, f32>, node: &Node) -> Result<ArrayD<f32>> {
    let [n, c, h, w] = nchw(x.shape(), node)?;
    let x = x.as_standard_layout();
    let xs = contiguous(&x, node)?;
    let plane = h * w;
    let count = (n * plane) as f64;
    let mut out = vec![0f32; 2 * c];
    for ch in 0..c {
        let values = || (0..n).flat_map(move |b| xs[(b * c + ch) * plane..][..plane].iter().map(|v| f64::from(*v)));
        let mean = values().sum::<f64>() / count;
        let var = values().map(|v| (v - mean) * (v - mean)).sum::<f64>() / count;
        out[ch] = mean as f32;
        out[c + ch] = var as f32;
    }
    arr(node, &[2, c], out)
}

/// BatchNorm2d normalising with the batch's own statistics (`track_running_stats=False`).
pub(crate) fn bn_batch(bn: &BatchNorm2d, x: &ArrayViewD<'_, f32>, params: &NodeParams<'_>) -> Result<ArrayD<f32>> {
    let stats = batch_stats(x, params.node())?;
    bn_train(bn, x, &stats.view(), params)
}

/// The per-channel `(mean, 1/sqrt(var + eps))` of a `[2, C]` statistics tensor.
fn mean_invstd(bn: &BatchNorm2d, stats: &ArrayViewD<'_, f32>, node: &Node) -> Result<Vec<(f64, f64)>> {
    let c = bn.num_features;
    if stats.shape() != [2, c] {
        return Err(internal(node, "batch statistics of the wrong shape"));
    }
    Ok((0..c)
        .map(|ch| {
            let mean = f64::from(stats[[0, ch]]);
            let var = f64::from(stats[[1, ch]]);
            (mean, 1.0 / (var + bn.eps).sqrt())
        })
        .collect())
}

fn affine_params<'a>(bn: &BatchNorm2d, params: &NodeParams<'a>) -> Result<Option<&'a [f32]>> {
    if bn.affine { Ok(Some(params.req("weight")?)) } else { Ok(None) }
}

/// `(x − mean)·invstd·weight + bias` with the batch statistics.
fn bn_train(
    bn: &BatchNorm2d,
    x: &ArrayViewD<'_, f32>,
    stats: &ArrayViewD<'_, f32>,
    params: &NodeParams<'_>,
) -> Result<ArrayD<f32>> {
    let node = params.node();
    let [_, c, h, w] = nchw(x.shape(), node)?;
    let ms = mean_invstd(bn, stats, node)?;
    let weight = affine_params(bn, params)?;
    let bias = if bn.affine { Some(params.req("bias")?) } else { None };
    let mut y = x.as_standard_layout().into_owned();
    let plane = (h * w).max(1);
    let ys = y.as_slice_mut().ok_or_else(|| internal(node, "the output is not contiguous"))?;
    for (i, v) in ys.iter_mut().enumerate() {
        let ch = (i / plane) % c;
        let (mean, inv) = ms[ch];
        let g = weight.map_or(1.0, |wt| f64::from(wt[ch]));
        let b = bias.map_or(0.0, |bs| f64::from(bs[ch]));
        *v = ((f64::from(*v) - mean) * inv * g + b) as f32;
    }
    Ok(y)
}

/// dx (`input`) or dweight of a training-mode BatchNorm2d:
/// `dx = weight·invstd·(dy − mean(dy) − x̂·mean(dy·x̂))`, `dweight = Σ dy·x̂`.
fn bn_train_grad(
    bn: &BatchNorm2d,
    x: &ArrayViewD<'_, f32>,
    stats: &ArrayViewD<'_, f32>,
    dy: &ArrayViewD<'_, f32>,
    params: &NodeParams<'_>,
    input: bool,
) -> Result<ArrayD<f32>> {
    let node = params.node();
    let [n, c, h, w] = nchw(x.shape(), node)?;
    if dy.shape() != x.shape() {
        return Err(internal(node, "the gradient's shape differs from the input's"));
    }
    let ms = mean_invstd(bn, stats, node)?;
    let (x, dy) = (x.as_standard_layout(), dy.as_standard_layout());
    let (xs, ds) = (contiguous(&x, node)?, contiguous(&dy, node)?);
    let plane = h * w;
    let count = (n * plane) as f64;
    let weight = if input { affine_params(bn, params)? } else { None };
    let mut dx = vec![0f32; if input { xs.len() } else { 0 }];
    let mut dw = vec![0f32; c];
    for ch in 0..c {
        let (mean, inv) = ms[ch];
        let idx = || (0..n).flat_map(move |b| ((b * c + ch) * plane)..((b * c + ch) * plane + plane));
        let (mut sum_dy, mut sum_dy_xhat) = (0f64, 0f64);
        for i in idx() {
            let d = f64::from(ds[i]);
            sum_dy += d;
            sum_dy_xhat += d * (f64::from(xs[i]) - mean) * inv;
        }
        dw[ch] = sum_dy_xhat as f32;
        if input {
            let g = weight.map_or(1.0, |wt| f64::from(wt[ch]));
            let (mdy, mdyx) = (sum_dy / count, sum_dy_xhat / count);
            for i in idx() {
                let xhat = (f64::from(xs[i]) - mean) * inv;
                dx[i] = (g * inv * (f64::from(ds[i]) - mdy - xhat * mdyx)) as f32;
            }
        }
    }
    if input { arr(node, x.shape(), dx) } else { arr(node, &[c], dw) }
}

/// dx of an eval-mode BatchNorm2d: `dy·weight/sqrt(running_var + eps)`.
fn bn_eval_input_grad(bn: &BatchNorm2d, dy: &ArrayViewD<'_, f32>, params: &NodeParams<'_>) -> Result<ArrayD<f32>> {
    let node = params.node();
    let [_, c, h, w] = nchw(dy.shape(), node)?;
    let weight = affine_params(bn, params)?;
    let var = params.req("running_var")?;
    let mut out = dy.as_standard_layout().into_owned();
    let plane = (h * w).max(1);
    let s = out.as_slice_mut().ok_or_else(|| internal(node, "the output is not contiguous"))?;
    for (i, v) in s.iter_mut().enumerate() {
        let ch = (i / plane) % c;
        let g = weight.map_or(1.0, |wt| f64::from(wt[ch]));
        *v = (f64::from(*v) * g / (f64::from(var[ch]) + bn.eps).sqrt()) as f32;
    }
    Ok(out)
}

/// dweight of an eval-mode BatchNorm2d: `Σ dy·(x − running_mean)/sqrt(running_var + eps)`.
fn bn_eval_weight_grad(
    bn: &BatchNorm2d,
    x: &ArrayViewD<'_, f32>,
    dy: &ArrayViewD<'_, f32>,
    params: &NodeParams<'_>,
) -> Result<ArrayD<f32>> {
    let node = params.node();
    let [_, c, h, w] = nchw(x.shape(), node)?;
    let (mean, var) = (params.req("running_mean")?, params.req("running_var")?);
    let (x, dy) = (x.as_standard_layout(), dy.as_standard_layout());
    let (xs, ds) = (contiguous(&x, node)?, contiguous(&dy, node)?);
    let plane = (h * w).max(1);
    let mut acc = vec![0f64; c];
    for (i, (xv, dv)) in xs.iter().zip(ds).enumerate() {
        let ch = (i / plane) % c;
        acc[ch] += f64::from(*dv) * (f64::from(*xv) - f64::from(mean[ch])) / (f64::from(var[ch]) + bn.eps).sqrt();
    }
    arr(node, &[c], acc.into_iter().map(|v| v as f32).collect())
}

/// `softplus(v) = log(1 + e^v)`, stably.
fn softplus(v: f64) -> f64 {
    v.max(0.0) + (-v.abs()).exp().ln_1p()
}

fn sigmoid(v: f64) -> f64 {
    if v >= 0.0 {
        1.0 / (1.0 + (-v).exp())
    } else {
        let e = v.exp();
        e / (1.0 + e)
    }
}

/// A loss (`grad = false`, `[1]`) or its gradient with respect to the prediction.
fn loss(
    l: &Loss,
    pred: &ArrayViewD<'_, f32>,
    target: &ArrayViewD<'_, f32>,
    node: &Node,
    grad: bool,
) -> Result<ArrayD<f32>> {
    let (p, t) = (pred.as_standard_layout(), target.as_standard_layout());
    let (ps, ts) = (contiguous(&p, node)?, contiguous(&t, node)?);
    let reduction = match l {
        Loss::Mse { reduction } | Loss::CrossEntropy { reduction, .. } | Loss::BceWithLogits { reduction, .. } => {
            *reduction
        }
    };
    let mut total = 0f64;
    let mut g = vec![0f32; if grad { ps.len() } else { 0 }];
    let divisor = match l {
        Loss::Mse { .. } | Loss::BceWithLogits { .. } => {
            if ps.len() != ts.len() {
                return Err(internal(node, "the target's shape differs from the prediction's"));
            }
            ps.len()
        }
        Loss::CrossEntropy { .. } => ts.len(),
    };
    let scale = match reduction {
        Reduction::Mean => 1.0 / divisor.max(1) as f64,
        Reduction::Sum => 1.0,
    };
    match l {
        Loss::Mse { .. } => {
            for (i, (a, b)) in ps.iter().zip(ts).enumerate() {
                let d = f64::from(*a) - f64::from(*b);
                total += d * d;
                if grad {
                    g[i] = (2.0 * d * scale) as f32;
                }
            }
        }
        Loss::CrossEntropy { label_smoothing, .. } => {
            let n = ts.len();
            let classes = ps.len().checked_div(n).unwrap_or(0);
            if classes * n != ps.len() || classes == 0 {
                return Err(internal(node, "logits and class indices disagree in size"));
            }
            let eps = *label_smoothing;
            for (s, &tv) in ts.iter().enumerate() {
                let class = class_index(tv, classes, s)?;
                let row = &ps[s * classes..][..classes];
                let max = row.iter().fold(f64::NEG_INFINITY, |m, v| m.max(f64::from(*v)));
                let lse = max + row.iter().map(|v| (f64::from(*v) - max).exp()).sum::<f64>().ln();
                for (j, v) in row.iter().enumerate() {
                    let q = if j == class { 1.0 - eps } else { 0.0 } + eps / classes as f64;
                    let logp = f64::from(*v) - lse;
                    total -= q * logp;
                    if grad {
                        g[s * classes + j] = ((logp.exp() - q) * scale) as f32;
                    }
                }
            }
        }
        Loss::BceWithLogits { pos_weight, .. } => {
            let last = pred.shape().last().copied().unwrap_or(1).max(1);
            for (i, (xv, yv)) in ps.iter().zip(ts).enumerate() {
                let (x, y) = (f64::from(*xv), f64::from(*yv));
                let pw = pos_weight.as_ref().map_or(1.0, |p| p[i % last]);
                let lw = 1.0 + (pw - 1.0) * y;
                total += (1.0 - y) * x + lw * softplus(-x);
                if grad {
                    g[i] = (((1.0 - y) - lw * sigmoid(-x)) * scale) as f32;
                }
            }
        }
    }
    if grad { arr(node, pred.shape(), g) } else { arr(node, &[1], vec![(total * scale) as f32]) }
}

/// A class index given as a float: an integer in `[0, classes)`.
fn class_index(v: f32, classes: usize, sample: usize) -> Result<usize> {
    if v.fract() != 0.0 || v < 0.0 || (v as f64) >= classes as f64 {
        return Err(Error::Target(format!(
            "sample {sample}: class index {v} is not an integer in 0..{classes} (the logits have {classes} classes)"
        )));
    }
    Ok(v as usize)
}

/// The conv's geometry on an input of `h×w`: `(oh, ow, padded h, padded w, top, left)`.
fn conv_geometry(c: &Conv2d, h: usize, w: usize, node: &Node) -> Result<(usize, usize, usize, usize, usize, usize)> {
    let (top, bottom, left, right) = c.pads();
    let (wh, ww) = c.windows();
    match (wh.output(h), ww.output(w)) {
        (Ok(a), Ok(b)) => Ok((a.out, b.out, h + top + bottom, w + left + right, top, left)),
        _ => Err(internal(node, "the kernel does not fit the padded input")),
    }
}

/// dx of a Conv2d: the gradient of the padded input, then each padded position's gradient
/// added to the source pixel it was read from (zeros padding drops it; reflect, replicate
/// and circular scatter-add into the mirrored, edge or wrapped pixel).
fn conv_input_grad(
    c: &Conv2d,
    (h, w): (usize, usize),
    dy: &ArrayViewD<'_, f32>,
    params: &NodeParams<'_>,
) -> Result<ArrayD<f32>> {
    let node = params.node();
    let [n, o, oh, ow] = nchw(dy.shape(), node)?;
    let (eoh, eow, ph, pw, top, left) = conv_geometry(c, h, w, node)?;
    if (o, oh, ow) != (c.out_channels, eoh, eow) {
        return Err(internal(node, "the gradient does not match the conv's output"));
    }
    let weight = params.req("weight")?;
    let g = c.groups.max(1);
    let (cin_g, cout_g) = (c.in_channels / g, c.out_channels / g);
    let (kh, kw) = c.kernel;
    let (sh, sw) = c.stride;
    let (dh, dw) = c.dilation;
    let dy = dy.as_standard_layout();
    let ds = contiguous(&dy, node)?;
    let cin = c.in_channels;
    let mut dpad = vec![0f64; cin * ph * pw];
    let mut dx = vec![0f32; n * cin * h * w];
    let mut acc = vec![0f64; cin * h * w];
    for b in 0..n {
        dpad.fill(0.0);
        for oc in 0..o {
            let grp = oc / cout_g;
            let dplane = &ds[(b * o + oc) * oh * ow..][..oh * ow];
            for ic in 0..cin_g {
                let ch = grp * cin_g + ic;
                for ky in 0..kh {
                    for kx in 0..kw {
                        let wv = f64::from(weight[((oc * cin_g + ic) * kh + ky) * kw + kx]);
                        for oy in 0..oh {
                            let row = &mut dpad[(ch * ph + oy * sh + ky * dh) * pw..][..pw];
                            for ox in 0..ow {
                                row[ox * sw + kx * dw] += wv * f64::from(dplane[oy * ow + ox]);
                            }
                        }
                    }
                }
            }
        }
        acc.fill(0.0);
        for ch in 0..cin {
            for py in 0..ph {
                let Some(sy) = pad_index(py as isize - top as isize, h, c.padding_mode) else { continue };
                for px in 0..pw {
                    let Some(sx) = pad_index(px as isize - left as isize, w, c.padding_mode) else { continue };
                    acc[(ch * h + sy) * w + sx] += dpad[(ch * ph + py) * pw + px];
                }
            }
        }
        for (d, a) in dx[b * cin * h * w..][..cin * h * w].iter_mut().zip(&acc) {
            *d = *a as f32;
        }
    }
    arr(node, &[n, cin, h, w], dx)
}

/// dweight of a Conv2d: `Σ_{n, oy, ox} dy[n, o, oy, ox] · padded_x[n, c, oy·s + ky·d, ox·s + kx·d]`.
fn conv_weight_grad(c: &Conv2d, x: &ArrayViewD<'_, f32>, dy: &ArrayViewD<'_, f32>, node: &Node) -> Result<ArrayD<f32>> {
    let [n, cin, h, w] = nchw(x.shape(), node)?;
    let [_, o, oh, ow] = nchw(dy.shape(), node)?;
    let (eoh, eow, ph, pw, top, left) = conv_geometry(c, h, w, node)?;
    if (o, oh, ow) != (c.out_channels, eoh, eow) || cin != c.in_channels {
        return Err(internal(node, "the operands do not match the conv"));
    }
    let g = c.groups.max(1);
    let (cin_g, cout_g) = (cin / g, o / g);
    let (kh, kw) = c.kernel;
    let (sh, sw) = c.stride;
    let (dh, dw) = c.dilation;
    let (x, dy) = (x.as_standard_layout(), dy.as_standard_layout());
    let (xs, ds) = (contiguous(&x, node)?, contiguous(&dy, node)?);
    let mut padded = vec![0f32; cin * ph * pw];
    let mut acc = vec![0f64; o * cin_g * kh * kw];
    for b in 0..n {
        let sample = &xs[b * cin * h * w..][..cin * h * w];
        pad_sample(sample, (cin, h, w), (ph, pw, top, left), c.padding_mode, &mut padded);
        for oc in 0..o {
            let grp = oc / cout_g;
            let dplane = &ds[(b * o + oc) * oh * ow..][..oh * ow];
            for ic in 0..cin_g {
                let ch = grp * cin_g + ic;
                for ky in 0..kh {
                    for kx in 0..kw {
                        let mut s = 0f64;
                        for oy in 0..oh {
                            let row = &padded[(ch * ph + oy * sh + ky * dh) * pw..][..pw];
                            for ox in 0..ow {
                                s += f64::from(dplane[oy * ow + ox]) * f64::from(row[ox * sw + kx * dw]);
                            }
                        }
                        acc[((oc * cin_g + ic) * kh + ky) * kw + kx] += s;
                    }
                }
            }
        }
    }
    arr(node, &c.weight_shape(), acc.into_iter().map(|v| v as f32).collect())
}

/// dx of a Linear: `dy · W`.
fn linear_input_grad(l: &Linear, dy: &ArrayViewD<'_, f32>, params: &NodeParams<'_>) -> Result<ArrayD<f32>> {
    let node = params.node();
    let (fi, fo) = (l.in_features, l.out_features);
    let weight = params.req("weight")?;
    let dy = dy.as_standard_layout();
    let ds = contiguous(&dy, node)?;
    if dy.shape().last() != Some(&fo) || weight.len() != fi * fo {
        return Err(internal(node, "the gradient does not match the layer"));
    }
    let rows = ds.len() / fo.max(1);
    let mut out = vec![0f32; rows * fi];
    let mut acc = vec![0f64; fi];
    for r in 0..rows {
        acc.fill(0.0);
        for (o, d) in ds[r * fo..][..fo].iter().enumerate() {
            let d = f64::from(*d);
            for (a, wv) in acc.iter_mut().zip(&weight[o * fi..][..fi]) {
                *a += d * f64::from(*wv);
            }
        }
        for (v, a) in out[r * fi..][..fi].iter_mut().zip(&acc) {
            *v = *a as f32;
        }
    }
    let mut shape = dy.shape().to_vec();
    *shape.last_mut().ok_or_else(|| internal(node, "a scalar gradient"))? = fi;
    arr(node, &shape, out)
}

/// dweight of a Linear: `Σ_rows dyᵀ · x`.
fn linear_weight_grad(
    l: &Linear,
    x: &ArrayViewD<'_, f32>,
    dy: &ArrayViewD<'_, f32>,
    node: &Node,
) -> Result<ArrayD<f32>> {
    let (fi, fo) = (l.in_features, l.out_features);
    let (x, dy) = (x.as_standard_layout(), dy.as_standard_layout());
    let (xs, ds) = (contiguous(&x, node)?, contiguous(&dy, node)?);
    let rows = xs.len() / fi.max(1);
    if ds.len() != rows * fo {
        return Err(internal(node, "the operands do not match the layer"));
    }
    let mut acc = vec![0f64; fo * fi];
    for r in 0..rows {
        let xr = &xs[r * fi..][..fi];
        for (o, d) in ds[r * fo..][..fo].iter().enumerate() {
            let d = f64::from(*d);
            for (a, xv) in acc[o * fi..][..fi].iter_mut().zip(xr) {
                *a += d * f64::from(*xv);
            }
        }
    }
    arr(node, &[fo, fi], acc.into_iter().map(|v| v as f32).collect())
}

/// The sum over every dimension but per-sample axis `axis`.
fn bias_grad(axis: usize, dy: &ArrayViewD<'_, f32>, node: &Node) -> Result<ArrayD<f32>> {
    let shape = dy.shape();
    let Some(&c) = shape.get(axis + 1) else {
        return Err(internal(node, "the bias axis is out of range"));
    };
    let inner: usize = shape[axis + 2..].iter().product();
    let dy = dy.as_standard_layout();
    let ds = contiguous(&dy, node)?;
    let mut acc = vec![0f64; c];
    for (i, v) in ds.iter().enumerate() {
        acc[(i / inner.max(1)) % c] += f64::from(*v);
    }
    arr(node, &[c], acc.into_iter().map(|v| v as f32).collect())
}

/// dx of a MaxPool2d: each output's gradient goes to the element the forward chose, the
/// first maximum of its window (ATen's `val > max || isnan(val)`, starting from the first
/// element inside the input).
fn max_pool_grad(p: &MaxPool2d, x: &ArrayViewD<'_, f32>, dy: &ArrayViewD<'_, f32>, node: &Node) -> Result<ArrayD<f32>> {
    let [n, c, h, w] = nchw(x.shape(), node)?;
    let [_, _, oh, ow] = nchw(dy.shape(), node)?;
    let (x, dy) = (x.as_standard_layout(), dy.as_standard_layout());
    let (xs, ds) = (contiguous(&x, node)?, contiguous(&dy, node)?);
    let (kh, kw) = p.kernel;
    let (sh, sw) = p.stride;
    let (dh, dw) = p.dilation;
    let (padh, padw) = (p.padding.0 as isize, p.padding.1 as isize);
    let mut acc = vec![0f64; n * c * h * w];
    for plane in 0..n * c {
        let src = &xs[plane * h * w..][..h * w];
        let dst = &mut acc[plane * h * w..][..h * w];
        for oy in 0..oh {
            for ox in 0..ow {
                let mut best = f32::NEG_INFINITY;
                let mut at: Option<usize> = None;
                for ky in 0..kh {
                    let iy = (oy * sh + ky * dh) as isize - padh;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    for kx in 0..kw {
                        let ix = (ox * sw + kx * dw) as isize - padw;
                        if ix < 0 || ix >= w as isize {
                            continue;
                        }
                        let i = iy as usize * w + ix as usize;
                        let v = src[i];
                        at.get_or_insert(i);
                        if v > best || v.is_nan() {
                            best = v;
                            at = Some(i);
                        }
                    }
                }
                if let Some(i) = at {
                    dst[i] += f64::from(ds[(plane * oh + oy) * ow + ox]);
                }
            }
        }
    }
    arr(node, &[n, c, h, w], acc.into_iter().map(|v| v as f32).collect())
}

/// dx of an AvgPool2d: each output's gradient divided by the forward's divisor and added to
/// every input cell its window summed.
fn avg_pool_grad(p: &AvgPool2d, (h, w): (usize, usize), dy: &ArrayViewD<'_, f32>, node: &Node) -> Result<ArrayD<f32>> {
    let [n, c, oh, ow] = nchw(dy.shape(), node)?;
    let dy = dy.as_standard_layout();
    let ds = contiguous(&dy, node)?;
    let mut acc = vec![0f64; n * c * h * w];
    for plane in 0..n * c {
        let dst = &mut acc[plane * h * w..][..h * w];
        for oy in 0..oh {
            for ox in 0..ow {
                let Some(((y0, y1), (x0, x1), divisor)) = avg_window(p, (oy, ox), (h, w)) else { continue };
                let g = f64::from(ds[(plane * oh + oy) * ow + ox]) / divisor;
                for iy in y0..y1 {
                    for ix in x0..x1 {
                        dst[iy * w + ix] += g;
                    }
                }
            }
        }
    }
    arr(node, &[n, c, h, w], acc.into_iter().map(|v| v as f32).collect())
}

/// dx of an AdaptiveAvgPool2d.
fn adaptive_avg_pool_grad(
    _p: &AdaptiveAvgPool2d,
    (h, w): (usize, usize),
    dy: &ArrayViewD<'_, f32>,
    node: &Node,
) -> Result<ArrayD<f32>> {
    let [n, c, oh, ow] = nchw(dy.shape(), node)?;
    let dy = dy.as_standard_layout();
    let ds = contiguous(&dy, node)?;
    let mut acc = vec![0f64; n * c * h * w];
    for plane in 0..n * c {
        let dst = &mut acc[plane * h * w..][..h * w];
        for oy in 0..oh {
            let (y0, y1) = adaptive_window(oy, h, oh);
            for ox in 0..ow {
                let (x0, x1) = adaptive_window(ox, w, ow);
                let g = f64::from(ds[(plane * oh + oy) * ow + ox]) / ((y1 - y0) * (x1 - x0)) as f64;
                for iy in y0..y1 {
                    for ix in x0..x1 {
                        dst[iy * w + ix] += g;
                    }
                }
            }
        }
    }
    arr(node, &[n, c, h, w], acc.into_iter().map(|v| v as f32).collect())
}

/// dx of an activation from its output `y`: ReLU `dy·[y > 0]`, Sigmoid `dy·y·(1 − y)`, Tanh
/// `dy·(1 − y²)`, as PyTorch's backward formulas.
fn activation_grad(
    a: Activation,
    y: &ArrayViewD<'_, f32>,
    dy: &ArrayViewD<'_, f32>,
    node: &Node,
) -> Result<ArrayD<f32>> {
    if y.shape() != dy.shape() {
        return Err(internal(node, "the gradient's shape differs from the output's"));
    }
    let mut out = dy.as_standard_layout().into_owned();
    ndarray::Zip::from(&mut out).and(y).for_each(|d, &yv| {
        let (g, yv) = (f64::from(*d), f64::from(yv));
        *d = match a {
            Activation::Relu => {
                if yv > 0.0 {
                    g
                } else {
                    0.0
                }
            }
            Activation::Sigmoid => g * yv * (1.0 - yv),
            Activation::Tanh => g * (1.0 - yv * yv),
            // PyTorch's leaky_relu_backward from the result (slope ≥ 0, which autodiff checks).
            Activation::LeakyRelu(s) => {
                if yv > 0.0 {
                    g
                } else {
                    g * f64::from(s.get())
                }
            }
            // PyTorch's hardtanh_backward: the gradient passes strictly inside the bounds
            // (the output lies strictly inside exactly where the input does).
            Activation::Hardtanh(lo, hi) => {
                if yv > f64::from(lo.get()) && yv < f64::from(hi.get()) {
                    g
                } else {
                    0.0
                }
            }
        } as f32;
    });
    Ok(out)
}

/// dx of a mean (`dy / count`, broadcast) or amax (`dy` shared equally by the elements equal
/// to the maximum).
fn reduce_grad(r: &Reduce, x: &ArrayViewD<'_, f32>, dy: &ArrayViewD<'_, f32>, node: &Node) -> Result<ArrayD<f32>> {
    let mut dims = r.dims.clone();
    dims.sort_unstable();
    dims.dedup();
    if dims.iter().any(|d| *d == 0 || *d >= x.ndim()) {
        return Err(internal(node, "a reduced dim is out of range"));
    }
    let kept: Vec<usize> = x.shape().iter().enumerate().map(|(i, s)| if dims.contains(&i) { 1 } else { *s }).collect();
    let dyk = dy
        .as_standard_layout()
        .into_owned()
        .into_shape_with_order(IxDyn(&kept))
        .map_err(|e| internal(node, &e.to_string()))?;
    let count: usize = dims.iter().map(|d| x.shape()[*d]).product();
    let dyb = dyk.broadcast(x.shape()).ok_or_else(|| internal(node, "the gradient does not broadcast"))?;
    let out = match r.kind {
        ReduceKind::Mean => dyb.mapv(|v| (f64::from(v) / count as f64) as f32),
        ReduceKind::Max => {
            let y =
                super::tensor::reduce(&Reduce { kind: ReduceKind::Max, dims: dims.clone(), keepdim: true }, x, node)?;
            let yb = y.broadcast(x.shape()).ok_or_else(|| internal(node, "the maximum does not broadcast"))?;
            let eq = ndarray::Zip::from(x).and(&yb).map_collect(|a, b| if a == b { 1f32 } else { 0.0 });
            let mut ties = eq.clone();
            for d in dims.iter().rev() {
                ties = ties.sum_axis(Axis(*d)).insert_axis(Axis(*d));
            }
            let tb = ties.broadcast(x.shape()).ok_or_else(|| internal(node, "the tie count does not broadcast"))?;
            ndarray::Zip::from(&eq).and(&dyb).and(&tb).map_collect(|e, g, t| if *e > 0.0 { g / t } else { 0.0 })
        }
    };
    Ok(out.as_standard_layout().into_owned())
}
