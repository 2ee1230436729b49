//! `Conv2d` and `Linear` with their fused epilogues.
//!
//! Conv2d first materialises each padded sample (zeros, or `reflect`/`replicate`/`circular`
//! indexing, each spatial axis mapped independently as `F.pad` does), then slides the
//! dilated, strided kernel over it with no further padding. Products are summed in f64 with
//! the bias and rounded to f32 once.

use super::{NodeParams, internal};
use crate::error::Result;
use cnnc_compiler::ops::{Conv2d, Epilogue, Linear, PaddingMode};
use ndarray::{ArrayD, ArrayViewD, IxDyn};

/// The source index of padded position `i` (`i` counted from the start of the input, so
/// negative in the leading padding), or `None` for a zero.
pub(crate) fn pad_index(i: isize, size: usize, mode: PaddingMode) -> Option<usize> {
    let n = size as isize;
    if (0..n).contains(&i) {
        return Some(i as usize);
    }
    if n == 0 {
        return None;
    }
    match mode {
        PaddingMode::Zeros => None,
        // Mirror about the edge without repeating it: -1 → 1, n → n-2. Periodic, so even an
        // (invalid) padding ≥ size maps inside.
        PaddingMode::Reflect => {
            let period = 2 * (n - 1);
            if period == 0 {
                return Some(0);
            }
            let j = i.rem_euclid(period);
            Some(if j < n { j } else { period - j } as usize)
        }
        PaddingMode::Replicate => Some(i.clamp(0, n - 1) as usize),
        PaddingMode::Circular => Some(i.rem_euclid(n) as usize),
    }
}

/// Materialises one padded sample: `src` is `[c, h, w]`, `dst` is `[c, ph, pw]` with `(top,
/// left)` leading padding, each spatial axis mapped by [`pad_index`] as `F.pad` does.
pub(crate) fn pad_sample(
    src: &[f32],
    (c, h, w): (usize, usize, usize),
    (ph, pw, top, left): (usize, usize, usize, usize),
    mode: PaddingMode,
    dst: &mut [f32],
) {
    for ch in 0..c {
        for py in 0..ph {
            let sy = pad_index(py as isize - top as isize, h, mode);
            for px in 0..pw {
                let sx = pad_index(px as isize - left as isize, w, mode);
                dst[(ch * ph + py) * pw + px] = match (sy, sx) {
                    (Some(y), Some(x)) => src[(ch * h + y) * w + x],
                    _ => 0.0,
                };
            }
        }
    }
}

/// Applies a fused epilogue in place: `y = act((y·scale[c] + shift[c]) + residual)`, where
/// `c = channel(i)` for the flat index `i`.
fn apply_epilogue(
    y: &mut ArrayD<f32>,
    epi: &Epilogue,
    residual: Option<&ArrayViewD<'_, f32>>,
    params: &NodeParams<'_>,
    channel: impl Fn(usize) -> usize,
) -> Result<()> {
    let node = params.node();
    if epi.residual && residual.is_none_or(|r| r.shape() != y.shape()) {
        return Err(internal(node, "the fused residual operand is missing or mis-shaped"));
    }
    let Some(out) = y.as_slice_mut() else {
        return Err(internal(node, "the output is not contiguous"));
    };
    if epi.scale_shift {
        let (scale, shift) = (params.req("scale")?, params.req("shift")?);
        for (i, v) in out.iter_mut().enumerate() {
            let c = channel(i);
            *v = *v * scale[c] + shift[c];
        }
    }
    if let Some(r) = residual.filter(|_| epi.residual) {
        for (v, r) in out.iter_mut().zip(r.iter()) {
            *v += *r;
        }
    }
    if let Some(act) = epi.act {
        for v in out.iter_mut() {
            *v = act.apply(*v);
        }
    }
    Ok(())
}

/// `nn.Conv2d` (NCHW) followed by its epilogue.
pub(crate) fn conv2d(
    conv: &Conv2d,
    x: &ArrayViewD<'_, f32>,
    residual: Option<&ArrayViewD<'_, f32>>,
    params: &NodeParams<'_>,
) -> Result<ArrayD<f32>> {
    let node = params.node();
    let &[n, c_in, h, w] = x.shape() else {
        return Err(internal(node, "Conv2d needs a 4-D input"));
    };
    let g = conv.groups;
    if c_in != conv.in_channels || g == 0 || !c_in.is_multiple_of(g) || !conv.out_channels.is_multiple_of(g) {
        return Err(internal(node, "channels do not match the layer"));
    }
    let (cin_g, cout_g) = (c_in / g, conv.out_channels / g);
    let (kh, kw) = conv.kernel;
    let (sh, sw) = conv.stride;
    let (dh, dw) = conv.dilation;
    let (top, bottom, left, right) = conv.pads();
    let (wh, ww) = conv.windows();
    let (oh, ow) = match (wh.output(h), ww.output(w)) {
        (Ok(a), Ok(b)) => (a.out, b.out),
        _ => return Err(internal(node, "the kernel does not fit the padded input")),
    };
    let weight = params.req("weight")?;
    if weight.len() != conv.out_channels * cin_g * kh * kw {
        return Err(internal(node, "the weight has the wrong size"));
    }
    let bias = if conv.bias { Some(params.req("bias")?) } else { None };
    let x = x.as_standard_layout();
    let xs = x.as_slice().ok_or_else(|| internal(node, "the input is not contiguous"))?;

    let (ph, pw) = (h + top + bottom, w + left + right);
    let mut padded = vec![0f32; c_in * ph * pw];
    let mut out = vec![0f32; n * conv.out_channels * oh * ow];
    let mut acc = vec![0f64; oh * ow];
    for b in 0..n {
        let sample = &xs[b * c_in * h * w..][..c_in * h * w];
        pad_sample(sample, (c_in, h, w), (ph, pw, top, left), conv.padding_mode, &mut padded);
        for oc in 0..conv.out_channels {
            let grp = oc / cout_g;
            acc.fill(bias.map_or(0.0, |bs| f64::from(bs[oc])));
            for ic in 0..cin_g {
                let c = grp * cin_g + ic;
                for ky in 0..kh {
                    for kx in 0..kw {
                        let wv = f64::from(weight[((oc * cin_g + ic) * kh + ky) * kw + kx]);
                        for oy in 0..oh {
                            let row = &padded[(c * ph + oy * sh + ky * dh) * pw..][..pw];
                            let arow = &mut acc[oy * ow..][..ow];
                            for (ox, a) in arow.iter_mut().enumerate() {
                                *a += wv * f64::from(row[ox * sw + kx * dw]);
                            }
                        }
                    }
                }
            }
            let dst = &mut out[(b * conv.out_channels + oc) * oh * ow..][..oh * ow];
            for (d, a) in dst.iter_mut().zip(&acc) {
                *d = *a as f32;
            }
        }
    }
    let mut y = ArrayD::from_shape_vec(IxDyn(&[n, conv.out_channels, oh, ow]), out)
        .map_err(|e| internal(node, &e.to_string()))?;
    let plane = oh * ow;
    let channels = conv.out_channels;
    apply_epilogue(&mut y, &conv.epilogue, residual, params, |i| (i / plane) % channels)?;
    Ok(y)
}

/// `nn.Linear` on the last dimension of an input of any rank, followed by its epilogue.
pub(crate) fn linear(
    lin: &Linear,
    x: &ArrayViewD<'_, f32>,
    residual: Option<&ArrayViewD<'_, f32>>,
    params: &NodeParams<'_>,
) -> Result<ArrayD<f32>> {
    let node = params.node();
    let (fi, fo) = (lin.in_features, lin.out_features);
    if x.shape().last() != Some(&fi) {
        return Err(internal(node, "the input's last dimension is not in_features"));
    }
    let weight = params.req("weight")?;
    if weight.len() != fi * fo {
        return Err(internal(node, "the weight has the wrong size"));
    }
    let bias = if lin.bias { Some(params.req("bias")?) } else { None };
    let x = x.as_standard_layout();
    let xs = x.as_slice().ok_or_else(|| internal(node, "the input is not contiguous"))?;
    let rows = xs.len().checked_div(fi).unwrap_or(0);
    let mut out = vec![0f32; rows * fo];
    for r in 0..rows {
        let xr = &xs[r * fi..][..fi];
        for o in 0..fo {
            let wr = &weight[o * fi..][..fi];
            let mut acc = bias.map_or(0.0, |bs| f64::from(bs[o]));
            for (a, b) in xr.iter().zip(wr) {
                acc += f64::from(*a) * f64::from(*b);
            }
            out[r * fo + o] = acc as f32;
        }
    }
    let mut shape = x.shape().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = fo;
    }
    let mut y = ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(|e| internal(node, &e.to_string()))?;
    apply_epilogue(&mut y, &lin.epilogue, residual, params, |i| i % fo)?;
    Ok(y)
}
