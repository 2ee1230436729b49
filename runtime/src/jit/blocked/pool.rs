//! Pooling on blocked tensors ([`Layout::Blocked`], `[⌈C/16⌉, H, W, 16]`): MaxPool2d,
//! AvgPool2d and AdaptiveAvgPool2d. (BatchNorm, concatenation and reorders are in
//! `channels.rs`; activations and adds do not care about the layout: see
//! `crate::jit::eltwise`.)
//!
//! In the blocked layout a pixel's 16 channels are four consecutive f32x4 vectors, so these
//! kernels vectorise across channels and never need a horizontal step: a pooling window is
//! four vector accumulators fed by one load per tap and vector; per-channel parameters are
//! four vectors per block.
//!
//! Pooling windows come from tables built at compile time — for each output row the input
//! rows of its taps that lie inside the input, for each output column the columns — so
//! padding, dilation and `ceil_mode` cost nothing in the loop, and the average divides by a
//! per-pixel divisor computed by ATen's rules (`crate::jit::tables::avg_factor`). Pooling
//! splits its work between threads by output rows.

use crate::error::{Error, Result};
use crate::jit::codegen::part_range;
use crate::jit::codegen::{Jit, c};
use crate::jit::cx::NodeCx;
use crate::jit::microkernel::{self, PoolRow};
use crate::jit::plan::BLOCK;
use crate::jit::tables::avg_factor;
use crate::jit::tables::axis_table;
use cnnc_compiler::ops::{AvgPool2d, MaxPool2d, PaddingMode};
use cnnc_compiler::shape::adaptive_window;
use cranelift_codegen::ir::InstBuilder;

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
pub(in crate::jit) fn max_pool(jit: &mut Jit, cx: &NodeCx<'_>, p: &MaxPool2d) -> Result<()> {
    let (_, ih, iw) = cx.in_chw(0)?;
    let (_, oh, ow) = cx.out_chw()?;
    let r = axis_table(oh, p.kernel.0, p.stride.0, p.dilation.0, p.padding.0, ih, PaddingMode::Zeros)?;
    let cl = axis_table(ow, p.kernel.1, p.stride.1, p.dilation.1, p.padding.1, iw, PaddingMode::Zeros)?;
    let affine = Some((p.kernel.1, p.stride.1, p.dilation.1, p.padding.1));
    pool(jit, cx, Kind::Max, clipped(&r, p.kernel.0), clipped(&cl, p.kernel.1), None, affine)
}

/// Lowers an AvgPool2d node on blocked tensors.
pub(in crate::jit) fn avg_pool(jit: &mut Jit, cx: &NodeCx<'_>, p: &AvgPool2d) -> Result<()> {
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
pub(in crate::jit) fn adaptive_avg_pool(jit: &mut Jit, cx: &NodeCx<'_>) -> Result<()> {
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
