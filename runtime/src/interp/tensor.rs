//! `BatchNorm2d`, `Flatten`, the residual `Add`, `Concat` and the mean/max reductions.

use super::{NodeParams, internal};
use crate::error::Result;
use cnnc_compiler::graph::Node;
use cnnc_compiler::ops::{BatchNorm2d, Concat, Flatten, Reduce, ReduceKind, Softmax};
use ndarray::{ArrayD, ArrayViewD, Axis, IxDyn};

/// `nn.BatchNorm2d` in eval mode, in f64:
/// `(x − running_mean) / sqrt(running_var + eps) · weight + bias`, rounded to f32 once
/// (`weight` = 1 and `bias` = 0 when `affine=False`).
pub(crate) fn batch_norm2d(bn: &BatchNorm2d, x: &ArrayViewD<'_, f32>, params: &NodeParams<'_>) -> Result<ArrayD<f32>> {
    let node = params.node();
    let &[_, c, h, w] = x.shape() else {
        return Err(internal(node, "BatchNorm2d needs a 4-D input"));
    };
    let mean = params.req("running_mean")?;
    let var = params.req("running_var")?;
    let (weight, bias) =
        if bn.affine { (Some(params.req("weight")?), Some(params.req("bias")?)) } else { (None, None) };
    if c != bn.num_features || [Some(mean), Some(var), weight, bias].iter().flatten().any(|p| p.len() != c) {
        return Err(internal(node, "channels do not match the layer"));
    }
    let mut y = x.as_standard_layout().into_owned();
    let plane = h * w;
    let Some(ys) = y.as_slice_mut() else {
        return Err(internal(node, "the output is not contiguous"));
    };
    for (i, v) in ys.iter_mut().enumerate() {
        let ch = (i / plane.max(1)) % c;
        let norm = (f64::from(*v) - f64::from(mean[ch])) / (f64::from(var[ch]) + bn.eps).sqrt();
        let g = weight.map_or(1.0, |wt| f64::from(wt[ch]));
        let b = bias.map_or(0.0, |bs| f64::from(bs[ch]));
        *v = (norm * g + b) as f32;
    }
    Ok(y)
}

/// `nn.Flatten`: merges dims `start_dim..=end_dim` (PyTorch numbering, batch excluded by
/// [`Flatten::range`]).
pub(crate) fn flatten(f: &Flatten, x: &ArrayViewD<'_, f32>, node: &Node) -> Result<ArrayD<f32>> {
    let shape = x.shape();
    let (s, e) = f.range(shape.len()).map_err(|e| internal(node, &e.message))?;
    // Per-sample indices `s..=e` are array axes `s + 1..=e + 1`.
    let mut dims = shape[..=s].to_vec();
    dims.push(shape[s + 1..=e + 1].iter().product());
    dims.extend_from_slice(&shape[e + 2..]);
    x.as_standard_layout()
        .into_owned()
        .into_shape_with_order(IxDyn(&dims))
        .map_err(|err| internal(node, &err.to_string()))
}

/// `a + b` of two equal-shaped tensors.
pub(crate) fn add(a: &ArrayViewD<'_, f32>, b: &ArrayViewD<'_, f32>, node: &Node) -> Result<ArrayD<f32>> {
    if a.shape() != b.shape() {
        return Err(internal(node, "`+` operands differ in shape"));
    }
    Ok(a + b)
}

/// `torch.cat(xs, dim)`, `dim` counting the batch.
pub(crate) fn concat(c: &Concat, xs: &[ArrayViewD<'_, f32>], node: &Node) -> Result<ArrayD<f32>> {
    ndarray::concatenate(Axis(c.dim), xs)
        .map(|y| y.as_standard_layout().into_owned())
        .map_err(|e| internal(node, &format!("cat: {e}")))
}

/// Maximum that propagates NaN (`torch.amax`).
fn nan_max(a: f32, b: f32) -> f32 {
    if a.is_nan() {
        a
    } else if b.is_nan() || b > a {
        b
    } else {
        a
    }
}

/// `x.mean(dim=…)` (summed in f64) or `x.amax(dim=…)` (NaN propagates), `dims` counting the
/// batch, with `keepdim`.
/// `nn.Softmax(dim)`: along the axis, `exp(x − max) / Σ exp(x − max)` in f64 (the maximum
/// NaN-propagating, so a NaN anywhere on the line makes it all NaN, as in PyTorch).
pub(crate) fn softmax(sm: &Softmax, x: &ArrayViewD<'_, f32>, node: &Node) -> Result<ArrayD<f32>> {
    let axis = sm.axis(x.ndim()).ok_or_else(|| internal(node, "softmax axis out of range"))?;
    let mut out = x.as_standard_layout().into_owned();
    for mut lane in out.lanes_mut(Axis(axis)) {
        let max = lane.iter().fold(f64::NEG_INFINITY, |m, v| {
            let v = f64::from(*v);
            if m.is_nan() || v.is_nan() { f64::NAN } else { m.max(v) }
        });
        let sum: f64 = lane.iter().map(|v| (f64::from(*v) - max).exp()).sum();
        for v in lane.iter_mut() {
            *v = ((f64::from(*v) - max).exp() / sum) as f32;
        }
    }
    Ok(out)
}

pub(crate) fn reduce(r: &Reduce, x: &ArrayViewD<'_, f32>, node: &Node) -> Result<ArrayD<f32>> {
    let rank = x.ndim();
    let mut dims = r.dims.clone();
    dims.sort_unstable();
    dims.dedup();
    if dims.iter().any(|d| *d >= rank) {
        return Err(internal(node, "a reduced dim is out of range"));
    }
    let mut y = match r.kind {
        ReduceKind::Mean => {
            let count: usize = dims.iter().map(|d| x.shape()[*d]).product();
            let mut acc = x.mapv(f64::from);
            for d in dims.iter().rev() {
                acc = acc.sum_axis(Axis(*d));
            }
            acc.mapv(|s| (s / count as f64) as f32)
        }
        ReduceKind::Max => {
            let mut acc = x.to_owned();
            for d in dims.iter().rev() {
                acc = acc.fold_axis(Axis(*d), f32::NEG_INFINITY, |m, v| nan_max(*m, *v));
            }
            acc
        }
    };
    if r.keepdim {
        for d in &dims {
            y.insert_axis_inplace(Axis(*d));
        }
    }
    Ok(y.as_standard_layout().into_owned())
}
