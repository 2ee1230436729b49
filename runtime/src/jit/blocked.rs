//! Kernels on blocked tensors ([`Layout::Blocked`], `[⌈C/16⌉, H, W, 16]`) besides the
//! convolution: pooling, BatchNorm2d, channel concatenation, and the reorders between the
//! blocked and the plain layout. (Activations and adds do not care about the layout: see
//! [`super::eltwise`].)
//!
//! In the blocked layout a pixel's 16 channels are four consecutive f32x4 vectors, so these
//! kernels vectorise across channels and never need a horizontal step: a pooling window is
//! four vector accumulators fed by one load per tap and vector; per-channel parameters are
//! four vectors per block.
//!
//! Pooling windows come from tables built at compile time — for each output row the input
//! rows of its taps that lie inside the input, for each output column the columns — so
//! padding, dilation and `ceil_mode` cost nothing in the loop, and the average divides by a
//! per-pixel divisor computed by ATen's rules (see [`super::pool`]). Pooling and BatchNorm
//! split their work between threads by output rows.

use super::codegen::{Count, Jit, LANES, c};
use super::conv::axis_table;
use super::conv_tiles::part_range;
use super::eltwise::{batchnorm_affine, copy_run};
use super::lower::NodeCx;
use super::microkernel::{self, PoolRow};
use super::plan::{BLOCK, Layout};
use super::pool::avg_factor;
use crate::error::{Error, Result};
use cnnc_compiler::ops::{AvgPool2d, BatchNorm2d, MaxPool2d, PaddingMode};
use cnnc_compiler::shape::adaptive_window;
use cranelift_codegen::ir::{InstBuilder, Value};

/// Vectors per block.
const VB: usize = BLOCK / LANES;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Max,
    Avg,
}

/// Input positions of each output position's taps that lie inside `[0, n)`.
fn clipped(table: &[i32], taps: usize) -> Vec<Vec<usize>> {
    table.chunks(taps.max(1)).map(|r| r.iter().filter(|&&i| i >= 0).map(|&i| i as usize).collect()).collect()
}

/// `[count, offset…]` per window, `1 + taps` entries each, offsets in elements.
fn tap_lists(windows: &[Vec<usize>], taps: usize, unit: usize) -> Vec<i64> {
    let mut t = Vec::with_capacity(windows.len() * (1 + taps));
    for w in windows {
        t.push(w.len() as i64);
        t.extend(w.iter().map(|&i| c(i * unit)));
        t.resize(t.len() + taps - w.len(), 0);
    }
    t
}

/// The pooling kernel: `rows`/`cols` list each output position's input rows and columns
/// (inside the input), `div` (average only) is the divisor of each output pixel,
/// row-major. `affine` is `(stride, dilation, pad)` of the columns, if the windows are
/// strided (not adaptive): columns whose whole window is inside then skip the table.
fn pool(
    jit: &mut Jit,
    cx: &NodeCx<'_>,
    kind: Kind,
    rows: Vec<Vec<usize>>,
    cols: Vec<Vec<usize>>,
    div: Option<Vec<f32>>,
    affine: Option<(usize, usize, usize, usize)>,
) -> Result<()> {
    let isa = jit.isa.ok_or_else(|| Error::Unsupported("blocked pooling without a micro-kernel ISA".into()))?;
    let (ch, ih, iw) = cx.in_chw(0)?;
    let (_, oh, ow) = cx.out_chw()?;
    let cb = ch.div_ceil(BLOCK);
    let kh = rows.iter().map(Vec::len).max().unwrap_or(0);
    let kw = cols.iter().map(Vec::len).max().unwrap_or(0);
    // Interior columns: the full window of `k` taps, all inside.
    let (lo, hi, step, pad, tap) = match affine {
        Some((k, s, d, p)) => {
            let inside = |o: usize| cols[o].len() == k && cols[o].first() == Some(&(o * s).wrapping_sub(p));
            let lo = (0..ow).find(|&o| inside(o)).unwrap_or(ow);
            let hi = (lo..ow).find(|&o| !inside(o)).unwrap_or(ow);
            (lo, hi, s, p, d)
        }
        None => (0, 0, 1, 0, 1),
    };
    let row_tab = jit.consts.i64s(tap_lists(&rows, kh, iw * BLOCK));
    let col_tab = jit.consts.i64s(tap_lists(&cols, kw, BLOCK));
    let desc = PoolRow {
        isa,
        max: kind == Kind::Max,
        ow,
        kw,
        cols: col_tab as usize as *const isize,
        lo,
        hi,
        step: (step * BLOCK) as isize,
        pad: (pad * BLOCK) as isize,
        tap: (tap * BLOCK) as isize,
    };
    let desc = jit.consts.keep(desc, 0);
    let dt = div.map(|d| jit.consts.f32s(d));
    let (xs, ys) = (cx.inputs[0], cx.output);
    let (in_size, out_size) = (cx.in_lens[0], cx.out_len);
    let work = (cb * BLOCK * oh * ow * kh * kw) as u64;
    jit.parallel_kernel(&cx.node.name, work, |fx| {
        let x = fx.slot(xs);
        let y = fx.slot(ys);
        let d = fx.i(desc);
        let units = fx.muli(fx.nb, c(cb * oh));
        let (lo_u, hi_u) = part_range(fx, units);
        fx.for_range(lo_u, hi_u, 1, |fx, u| {
            // u = (n·cb + block)·oh + row; blocks of all samples are consecutive.
            let nbk = fx.b.ins().udiv_imm_u(u, c(oh));
            let row = fx.b.ins().urem_imm_u(u, c(oh));
            let n = fx.b.ins().udiv_imm_u(nbk, c(cb));
            let blk = fx.b.ins().urem_imm_u(nbk, c(cb));
            let xn = fx.elem_scaled(x, n, c(in_size));
            let xb = fx.elem_scaled(xn, blk, c(ih * iw * BLOCK));
            let yn = fx.elem_scaled(y, n, c(out_size));
            let yb = fx.elem_scaled(yn, blk, c(oh * ow * BLOCK));
            let yr = fx.elem_scaled(yb, row, c(ow * BLOCK));
            let r0 = fx.i(row_tab);
            let rtab = fx.elem_scaled(r0, row, c(2 * (1 + kh)));
            let dp = match dt {
                Some(a) => {
                    let d0 = fx.i(a);
                    fx.elem_scaled(d0, row, c(ow))
                }
                None => fx.i(0),
            };
            fx.call(microkernel::pool_row as *const () as usize, &[d, xb, yr, rtab, dp]);
        });
    })?;
    Ok(())
}

/// Lowers a MaxPool2d node on blocked tensors.
pub(super) fn max_pool(jit: &mut Jit, cx: &NodeCx<'_>, p: &MaxPool2d) -> Result<()> {
    let (_, ih, iw) = cx.in_chw(0)?;
    let (_, oh, ow) = cx.out_chw()?;
    let r = axis_table(oh, p.kernel.0, p.stride.0, p.dilation.0, p.padding.0, ih, PaddingMode::Zeros)?;
    let cl = axis_table(ow, p.kernel.1, p.stride.1, p.dilation.1, p.padding.1, iw, PaddingMode::Zeros)?;
    let affine = Some((p.kernel.1, p.stride.1, p.dilation.1, p.padding.1));
    pool(jit, cx, Kind::Max, clipped(&r, p.kernel.0), clipped(&cl, p.kernel.1), None, affine)
}

/// Lowers an AvgPool2d node on blocked tensors.
pub(super) fn avg_pool(jit: &mut Jit, cx: &NodeCx<'_>, p: &AvgPool2d) -> Result<()> {
    let (_, ih, iw) = cx.in_chw(0)?;
    let (_, oh, ow) = cx.out_chw()?;
    let r = axis_table(oh, p.kernel.0, p.stride.0, 1, p.padding.0, ih, PaddingMode::Zeros)?;
    let cl = axis_table(ow, p.kernel.1, p.stride.1, 1, p.padding.1, iw, PaddingMode::Zeros)?;
    let div: Vec<f32> = (0..oh)
        .flat_map(|o| (0..ow).map(move |q| (o, q)))
        .map(|(o, q)| match p.divisor_override {
            Some(d) => d as f32,
            None => {
                let fr = avg_factor(o, p.kernel.0, p.stride.0, p.padding.0, ih, p.count_include_pad);
                let fc = avg_factor(q, p.kernel.1, p.stride.1, p.padding.1, iw, p.count_include_pad);
                fr * fc
            }
        })
        .collect();
    let affine = Some((p.kernel.1, p.stride.1, 1, p.padding.1));
    pool(jit, cx, Kind::Avg, clipped(&r, p.kernel.0), clipped(&cl, p.kernel.1), Some(div), affine)
}

/// Lowers an AdaptiveAvgPool2d node on blocked tensors.
pub(super) fn adaptive_avg_pool(jit: &mut Jit, cx: &NodeCx<'_>) -> Result<()> {
    let (_, ih, iw) = cx.in_chw(0)?;
    let (_, oh, ow) = cx.out_chw()?;
    let win = |out: usize, input: usize| -> Vec<Vec<usize>> {
        (0..out)
            .map(|i| {
                let (s, e) = adaptive_window(i, input, out);
                (s..e).collect()
            })
            .collect()
    };
    let (rows, cols) = (win(oh, ih), win(ow, iw));
    let div: Vec<f32> = (0..oh)
        .flat_map(|o| (0..ow).map(move |q| (o, q)))
        .map(|(o, q)| (rows[o].len() * cols[q].len()) as f32)
        .collect();
    pool(jit, cx, Kind::Avg, rows, cols, Some(div), None)
}

/// BatchNorm2d on a blocked tensor: `y = x·scale[c] + shift[c]`, the parameters four
/// vectors per block (zero in the padding lanes, which so stay zero-based and finite).
pub(super) fn batchnorm(jit: &mut Jit, cx: &NodeCx<'_>, bn: &BatchNorm2d) -> Result<()> {
    let (scale, shift) = batchnorm_affine(cx, bn)?;
    let (ch, h, w) = cx.out_chw()?;
    let cb = ch.div_ceil(BLOCK);
    let pad = |mut v: Vec<f32>| {
        v.resize(cb * BLOCK, 0.0);
        v
    };
    let sa = jit.consts.f32s_aligned(&pad(scale));
    let ta = jit.consts.f32s_aligned(&pad(shift));
    let plane = h * w;
    let (xs, ys) = (cx.inputs[0], cx.output);
    let size = cx.out_len;
    let work = (size * 2) as u64;
    jit.parallel_kernel(&cx.node.name, work, |fx| {
        let x = fx.slot(xs);
        let y = fx.slot(ys);
        let units = fx.muli(fx.nb, c(cb));
        let (lo, hi) = part_range(fx, units);
        fx.for_range(lo, hi, 1, |fx, u| {
            let blk = fx.b.ins().urem_imm_u(u, c(cb));
            let s0 = fx.i(sa);
            let t0 = fx.i(ta);
            let sp = fx.elem_scaled(s0, blk, c(BLOCK));
            let tp = fx.elem_scaled(t0, blk, c(BLOCK));
            let s: Vec<Value> = (0..VB).map(|k| fx.load_v(sp, c(k * LANES))).collect();
            let t: Vec<Value> = (0..VB).map(|k| fx.load_v(tp, c(k * LANES))).collect();
            // Unit u is block `u mod cb` of sample `u / cb`: `plane·16` floats at u·plane·16.
            let xu = fx.elem_scaled(x, u, c(plane * BLOCK));
            let yu = fx.elem_scaled(y, u, c(plane * BLOCK));
            fx.loop_n(Count::Const(plane), [xu, yu], [c(4 * BLOCK), c(4 * BLOCK)], |fx, [xp, yp]| {
                for k in 0..VB {
                    let v = fx.load_v(xp, c(k * LANES));
                    let r = fx.fma(v, s[k], t[k]);
                    fx.store_v(r, yp, c(k * LANES));
                }
            });
        });
    })?;
    Ok(())
}

/// `torch.cat(xs, 1)` of blocked tensors whose channel counts (but the last) are whole
/// blocks: each input's blocks are one contiguous run of the result.
pub(super) fn concat(jit: &mut Jit, cx: &NodeCx<'_>) -> Result<()> {
    let mut off = 0;
    let mut parts = vec![];
    for (s, len) in cx.inputs.iter().zip(&cx.in_lens) {
        parts.push((*s, *len, off));
        off += len;
    }
    if off != cx.out_len {
        return Err(Error::Unsupported(format!("`{}`: blocked concat of unaligned channels", cx.node.name)));
    }
    let (ys, out) = (cx.output, cx.out_len);
    jit.kernel(&cx.node.name, |fx| {
        let y = fx.slot(ys);
        let xs: Vec<Value> = parts.iter().map(|(s, _, _)| fx.slot(*s)).collect();
        fx.for_samples(|fx, n| {
            let yn = fx.elem_scaled(y, n, c(out));
            for (x, &(_, len, off)) in xs.iter().zip(&parts) {
                let src = fx.elem_scaled(*x, n, c(len));
                let dst = fx.addi(yn, c(4 * off));
                copy_run(fx, src, dst, len);
            }
        });
    })?;
    Ok(())
}

/// Rewrites slot `from` (in layout `lf`) into slot `to` (layout `lt`): plain `[c, h, w]` ↔
/// blocked. Plain → blocked writes zeros in the padding lanes.
pub(super) fn reorder(jit: &mut Jit, (from, lf): (usize, Layout), (to, lt): (usize, Layout)) -> Result<()> {
    let (geo, to_blocked) = match (lf, lt) {
        (Layout::Plain, Layout::Blocked { c, h, w }) => ((c, h, w), true),
        (Layout::Blocked { c, h, w }, Layout::Plain) => ((c, h, w), false),
        _ => return Err(Error::Unsupported(format!("reorder from {lf:?} to {lt:?}"))),
    };
    let (ch, h, w) = geo;
    let plane = h * w;
    let cb = ch.div_ceil(BLOCK);
    let (plain, blocked) = (ch * plane, cb * BLOCK * plane);
    jit.data_kernel("<reorder>", |fx| {
        let x = fx.slot(from);
        let y = fx.slot(to);
        fx.for_samples(|fx, n| {
            let (xs, ys) = if to_blocked { (plain, blocked) } else { (blocked, plain) };
            let xn = fx.elem_scaled(x, n, c(xs));
            let yn = fx.elem_scaled(y, n, c(ys));
            let (pn, bn) = if to_blocked { (xn, yn) } else { (yn, xn) };
            // Channel k: plane k of the plain tensor, lane k mod 16 of block k / 16.
            fx.for_const(0, ch, 1, |fx, k| {
                let pp = fx.elem_scaled(pn, k, c(plane));
                let blk = fx.b.ins().ushr_imm_u(k, 4);
                let lane = fx.b.ins().band_imm_u(k, c(BLOCK - 1));
                let b0 = fx.elem_scaled(bn, blk, c(plane * BLOCK));
                let bp = fx.elem(b0, lane);
                fx.loop_n(Count::Const(plane), [pp, bp], [4, c(4 * BLOCK)], |fx, [pq, bq]| {
                    if to_blocked {
                        let v = fx.load_f(pq, 0);
                        fx.store_f(v, bq, 0);
                    } else {
                        let v = fx.load_f(bq, 0);
                        fx.store_f(v, pq, 0);
                    }
                });
            });
            if to_blocked && ch % BLOCK != 0 {
                // The padding lanes of the last block.
                let z = fx.f(0.0);
                let last = fx.addi(bn, c(4 * (cb - 1) * plane * BLOCK));
                fx.loop_n(Count::Const(plane), [last], [c(4 * BLOCK)], |fx, [bq]| {
                    for l in ch % BLOCK..BLOCK {
                        fx.store_f(z, bq, c(l));
                    }
                });
            }
        });
    })?;
    Ok(())
}
