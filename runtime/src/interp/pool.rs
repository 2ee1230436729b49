//! Pooling: `MaxPool2d`, `AvgPool2d`, `AdaptiveAvgPool2d`, with ATen's window rules.

use super::internal;
use crate::error::Result;
use cnnc_compiler::graph::Node;
use cnnc_compiler::ops::{AdaptiveAvgPool2d, AvgPool2d, MaxPool2d};
use cnnc_compiler::shape::{Window, adaptive_window};
use ndarray::{ArrayD, ArrayViewD, CowArray, IxDyn};

/// A contiguous NCHW input's data and `[n, c, h, w]`.
fn nchw<'a>(x: &'a CowArray<'_, f32, IxDyn>, node: &Node) -> Result<(&'a [f32], [usize; 4])> {
    let &[n, c, h, w] = x.shape() else {
        return Err(internal(node, "pooling needs a 4-D input"));
    };
    let xs = x.as_slice().ok_or_else(|| internal(node, "the input is not contiguous"))?;
    Ok((xs, [n, c, h, w]))
}

/// Output sizes along both axes.
fn out_sizes(node: &Node, (wh, ww): (Window, Window), h: usize, w: usize) -> Result<(usize, usize)> {
    match (wh.output(h), ww.output(w)) {
        (Ok(a), Ok(b)) => Ok((a.out, b.out)),
        _ => Err(internal(node, "the window does not fit the padded input")),
    }
}

/// Runs `f(plane, n·c index)` for every plane and collects `[n, c, oh, ow]`.
fn per_plane(
    xs: &[f32],
    [n, c, h, w]: [usize; 4],
    (oh, ow): (usize, usize),
    node: &Node,
    mut f: impl FnMut(&[f32], &mut [f32]),
) -> Result<ArrayD<f32>> {
    let mut out = vec![0f32; n * c * oh * ow];
    if h * w > 0 && oh * ow > 0 {
        for (src, dst) in xs.chunks_exact(h * w).zip(out.chunks_exact_mut(oh * ow)) {
            f(src, dst);
        }
    }
    ArrayD::from_shape_vec(IxDyn(&[n, c, oh, ow]), out).map_err(|e| internal(node, &e.to_string()))
}

/// `nn.MaxPool2d`: implicit `-inf` padding, dilation, `ceil_mode`; a NaN anywhere in a window
/// makes that output NaN.
pub(crate) fn max_pool2d(p: &MaxPool2d, x: &ArrayViewD<'_, f32>, node: &Node) -> Result<ArrayD<f32>> {
    let x = x.as_standard_layout();
    let (xs, dims @ [_, _, h, w]) = nchw(&x, node)?;
    let (oh, ow) = out_sizes(node, p.windows(), h, w)?;
    let (kh, kw) = p.kernel;
    let (sh, sw) = p.stride;
    let (dh, dw) = p.dilation;
    let (padh, padw) = p.padding;
    per_plane(xs, dims, (oh, ow), node, |src, dst| {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut best = f32::NEG_INFINITY;
                for ky in 0..kh {
                    let iy = (oy * sh + ky * dh) as isize - padh as isize;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    for kx in 0..kw {
                        let ix = (ox * sw + kx * dw) as isize - padw as isize;
                        if ix < 0 || ix >= w as isize {
                            continue;
                        }
                        let v = src[iy as usize * w + ix as usize];
                        // As ATen: `if (val > maxval || isnan(val)) maxval = val`.
                        if v > best || v.is_nan() {
                            best = v;
                        }
                    }
                }
                dst[oy * ow + ox] = best;
            }
        }
    })
}

/// `nn.AvgPool2d`, exactly as ATen's CPU kernel: the window `[start, start + k)` is first
/// clipped to the padded input `[−pad, in + pad)` (its size is the divisor when
/// `count_include_pad`), then to the input (the divisor otherwise, and the summed region).
/// `divisor_override`, when set, replaces the divisor. A window with no input cell gives 0.
pub(crate) fn avg_pool2d(p: &AvgPool2d, x: &ArrayViewD<'_, f32>, node: &Node) -> Result<ArrayD<f32>> {
    let x = x.as_standard_layout();
    let (xs, dims @ [_, _, h, w]) = nchw(&x, node)?;
    let (oh, ow) = out_sizes(node, p.windows(), h, w)?;
    per_plane(xs, dims, (oh, ow), node, |src, dst| {
        for oy in 0..oh {
            for ox in 0..ow {
                dst[oy * ow + ox] = match avg_window(p, (oy, ox), (h, w)) {
                    None => 0.0,
                    Some(((y0, y1), (x0, x1), divisor)) => {
                        let mut sum = 0f64;
                        for iy in y0..y1 {
                            for ix in x0..x1 {
                                sum += f64::from(src[iy * w + ix]);
                            }
                        }
                        (sum / divisor) as f32
                    }
                };
            }
        }
    })
}

/// The input rows and columns an AvgPool2d output cell sums, and its divisor (see
/// [`avg_pool2d`]); `None` for a window with no input cell.
#[allow(clippy::type_complexity)]
pub(crate) fn avg_window(
    p: &AvgPool2d,
    (oy, ox): (usize, usize),
    (h, w): (usize, usize),
) -> Option<((usize, usize), (usize, usize), f64)> {
    let (kh, kw) = (p.kernel.0 as isize, p.kernel.1 as isize);
    let (padh, padw) = (p.padding.0 as isize, p.padding.1 as isize);
    let (hi, wi) = (h as isize, w as isize);
    let (mut y0, mut x0) = (oy as isize * p.stride.0 as isize - padh, ox as isize * p.stride.1 as isize - padw);
    let (mut y1, mut x1) = ((y0 + kh).min(hi + padh), (x0 + kw).min(wi + padw));
    let pool_size = (y1 - y0) * (x1 - x0);
    (y0, x0, y1, x1) = (y0.max(0), x0.max(0), y1.min(hi), x1.min(wi));
    if y0 >= y1 || x0 >= x1 {
        return None;
    }
    let divisor = match p.divisor_override {
        Some(d) => d as isize,
        None if p.count_include_pad => pool_size,
        None => (y1 - y0) * (x1 - x0),
    };
    Some(((y0 as usize, y1 as usize), (x0 as usize, x1 as usize), divisor as f64))
}

/// `nn.AdaptiveAvgPool2d`: output cell `i` averages `[floor(i·in/out), ceil((i+1)·in/out))`.
pub(crate) fn adaptive_avg_pool2d(p: &AdaptiveAvgPool2d, x: &ArrayViewD<'_, f32>, node: &Node) -> Result<ArrayD<f32>> {
    let x = x.as_standard_layout();
    let (xs, dims @ [_, _, h, w]) = nchw(&x, node)?;
    let (oh, ow) = (p.out_h.unwrap_or(h), p.out_w.unwrap_or(w));
    per_plane(xs, dims, (oh, ow), node, |src, dst| {
        for oy in 0..oh {
            let (y0, y1) = adaptive_window(oy, h, oh);
            for ox in 0..ow {
                let (x0, x1) = adaptive_window(ox, w, ow);
                let mut sum = 0f64;
                for iy in y0..y1 {
                    for ix in x0..x1 {
                        sum += f64::from(src[iy * w + ix]);
                    }
                }
                dst[oy * ow + ox] = (sum / ((y1 - y0) * (x1 - x0)) as f64) as f32;
            }
        }
    })
}
