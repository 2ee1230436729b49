//! Pooling on blocked tensors ([`Layout::Blocked`], `[⌈C/16⌉, H, W, 16]`): MaxPool2d,
//! AvgPool2d and AdaptiveAvgPool2d, and a training graph's MaxPool2d backward
//! ([`max_pool_grad`]: each cell written once where the windows tile the map, else a
//! zeroed gradient with each window's share added at its first maximum). (BatchNorm, concatenation and reorders are in
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
use cranelift_codegen::ir::{InstBuilder, Value, types};

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

/// `(x, dy) → dx` of a MaxPool2d whose windows tile the input ([`crate::jit::plan::max_pool_grad_tiles`]),
/// all three blocked: each window's gradient goes to its first maximum (scan order, a later
/// tap winning if greater or NaN, as the plain kernels and the interpreter decide), every
/// other cell of the input gets zero, each cell written once. A window is its taps' 16
/// channels, four f32x4 vectors per tap, so the comparison needs no shuffle.
pub(in crate::jit) fn max_pool_grad(jit: &mut Jit, cx: &NodeCx<'_>, p: &MaxPool2d) -> Result<()> {
    use crate::jit::codegen::Count;
    let (_, h, w) = cx.in_chw(0)?;
    let (_, oh, ow) = cx.in_chw(1)?;
    let (kh, kw) = p.kernel;
    if !cx.in_layouts.iter().all(|l| l.is_blocked()) {
        return Err(Error::Unsupported(format!("`{}`: no blocked form of this max-pool backward", cx.node.name)));
    }
    if !crate::jit::plan::max_pool_grad_tiles(p, (h, w), (oh, ow)) {
        return overlapping_max_pool_grad(jit, cx, p);
    }
    let taps = kh * kw;
    let b = BLOCK as i64;
    jit.kernel(&cx.node.name, |fx| {
        for_sample_blocks(fx, cx, (h * w, oh * ow), |fx, [xp, dp, op]| {
            let steps = [c(4 * kh * w) * b, c(4 * ow) * b, c(4 * kh * w) * b];
            fx.loop_n(Count::Const(oh), [xp, dp, op], steps, |fx, [xr, dr, orow]| {
                let steps = [c(4 * kw) * b, 4 * b, c(4 * kw) * b];
                fx.loop_n(Count::Const(ow), [xr, dr, orow], steps, |fx, [xw, d, o]| {
                    for q in 0..BLOCK / 4 {
                        let at = |ky: usize, kx: usize| c((ky * w + kx) * BLOCK + 4 * q);
                        let t: Vec<Value> = (0..taps).map(|i| fx.load_v(xw, at(i / kw, i % kw))).collect();
                        let g = fx.load_v(d, c(4 * q));
                        for (i, v) in first_max_grads(fx, &t, None, g).into_iter().enumerate() {
                            fx.store_v(v, o, at(i / kw, i % kw));
                        }
                    }
                });
            });
            // Cells no window covers: the columns past the last window, then the rows.
            let z = fx.vf(0.0);
            if ow * kw < w {
                let right = fx.addi(op, c(4 * ow * kw * BLOCK));
                let step = c(4 * w * BLOCK);
                fx.loop_n(Count::Const(oh * kh), [right, z], [step, 0], |fx, [a, z]| {
                    for k in 0..(w - ow * kw) * BLOCK / 4 {
                        fx.store_v(z, a, c(4 * k));
                    }
                });
            }
            if oh * kh < h {
                let rest = fx.addi(op, c(4 * oh * kh * w * BLOCK));
                fx.loop_n(Count::Const((h - oh * kh) * w * BLOCK / 4), [rest, z], [16, 0], |fx, [a, z]| {
                    fx.store_v(z, a, 0)
                });
            }
        });
    })?;
    Ok(())
}

/// A max-pool backward's loops over the samples and the blocks of channels: `body` gets
/// the block's planes of `x`, `dy` and `dx` (`plane` and `out_plane` pixels of 16 lanes).
fn for_sample_blocks(
    fx: &mut crate::jit::codegen::Fx<'_>,
    cx: &NodeCx<'_>,
    (plane, out_plane): (usize, usize),
    body: impl FnOnce(&mut crate::jit::codegen::Fx<'_>, [Value; 3]),
) {
    use crate::jit::codegen::Count;
    let cb = cx.in_lens[0] / (plane * BLOCK);
    let (x, dy, out) = (fx.slot(cx.inputs[0]), fx.slot(cx.inputs[1]), fx.slot(cx.output));
    let steps = [c(4 * cx.in_lens[0]), c(4 * cx.in_lens[1]), c(4 * cx.out_len)];
    fx.loop_n(Count::Dyn(fx.nb), [x, dy, out], steps, |fx, [xn, dn, on]| {
        let b = c(4 * BLOCK);
        let steps = [c(plane) * b, c(out_plane) * b, c(plane) * b];
        fx.loop_n(Count::Const(cb), [xn, dn, on], steps, |fx, v| body(fx, v));
    });
}

/// Per tap of one window (`t`, four channels each, in scan order), the gradient `g` where
/// the tap is the window's first maximum — a later tap displaces the best so far if it is
/// greater or NaN, as the plain kernels and the interpreter decide — and zero elsewhere.
/// With `valid` (a lane mask per tap), taps outside the input are skipped: the first tap
/// inside it starts the scan.
fn first_max_grads(fx: &mut crate::jit::codegen::Fx<'_>, t: &[Value], valid: Option<&[Value]>, g: Value) -> Vec<Value> {
    use crate::jit::math::vsel;
    use cranelift_codegen::ir::condcodes::FloatCC;
    // better[i]: tap i displaces the best so far (`None`: always, the first tap of a
    // window with no padding).
    let mut best = t[0];
    let mut better = vec![valid.map(|v| v[0])];
    let mut have = valid.map(|v| v[0]);
    for (i, &v) in t.iter().enumerate().skip(1) {
        let gt = fx.b.ins().fcmp(FloatCC::GreaterThan, v, best);
        let nan = fx.b.ins().fcmp(FloatCC::Unordered, v, v);
        let mut m = fx.b.ins().bor(gt, nan);
        if let (Some(valid), Some(h)) = (valid, have) {
            // Inside the input, and greater, NaN, or the first such tap.
            let first = fx.b.ins().bnot(h);
            m = fx.b.ins().bor(m, first);
            m = fx.b.ins().band(m, valid[i]);
            have = Some(fx.b.ins().bor(h, valid[i]));
        }
        best = vsel(fx, m, v, best);
        better.push(Some(m));
    }
    let z = fx.vf(0.0);
    // Tap i wins if it displaced the best and no later tap did.
    let mut later: Option<Value> = None;
    let mut out = vec![g; t.len()];
    for i in (0..t.len()).rev() {
        let won = match (better[i], later) {
            (Some(m), None) => Some(m),
            (Some(m), Some(l)) => Some(fx.b.ins().band_not(m, l)),
            (None, None) => None,
            (None, Some(l)) => Some(fx.b.ins().bnot(l)),
        };
        out[i] = match won {
            Some(m) => vsel(fx, m, g, z),
            None => g,
        };
        later = match (later, better[i]) {
            (None, m) => m,
            (Some(l), Some(m)) => Some(fx.b.ins().bor(l, m)),
            (l, None) => l,
        };
    }
    out
}

/// `(x, dy) → dx` of a MaxPool2d with overlapping or padded windows (the ResNet stem's
/// `MaxPool2d(3, 2, 1)`), all three blocked: `dx` zeroed (row by row, just ahead of the
/// windows that first reach a row), then per window each tap's
/// gradient from [`first_max_grads`] added to its cell, windows in scan order, so a cell in
/// several windows sums their gradients in f32 in that order. The taps' cells come from
/// compile-time tables ([`crate::jit::tables::max_pool_taps`]). Sample-wise.
fn overlapping_max_pool_grad(jit: &mut Jit, cx: &NodeCx<'_>, p: &MaxPool2d) -> Result<()> {
    use crate::jit::codegen::Count;
    let (_, h, w) = cx.in_chw(0)?;
    let (_, oh, ow) = cx.in_chw(1)?;
    let (kh, kw) = p.kernel;
    let rows = crate::jit::tables::max_pool_taps(oh, kh, p.stride.0, p.dilation.0, p.padding.0, h, 4 * w * BLOCK);
    let cols = crate::jit::tables::max_pool_taps(ow, kw, p.stride.1, p.dilation.1, p.padding.1, w, 4 * BLOCK);
    let (Some((rows, rmask)), Some((cols, cmask))) = (rows, cols) else {
        return Err(Error::Unsupported(format!("`{}`: a max-pool window with no tap inside the input", cx.node.name)));
    };
    let (ry, rx) = (jit.consts.i64s(rows), jit.consts.i64s(cols));
    let (my, mx) = (jit.consts.i32s(rmask), jit.consts.i32s(cmask));
    // The gradient's rows are zeroed just before the first output row whose windows reach
    // them (so the adds find them in cache), per output row `[byte offset, vectors]`; the
    // rows below the last window's at the end.
    let row_bytes = 4 * w * BLOCK;
    let mut zero_rows = Vec::with_capacity(2 * oh);
    let mut next = 0;
    for o in 0..oh {
        let last = (o * p.stride.0 + (kh - 1) * p.dilation.0).checked_sub(p.padding.0).map_or(0, |r| (r + 1).min(h));
        let end = last.max(next);
        zero_rows.extend([c(next * row_bytes), c((end - next) * row_bytes / 16)]);
        next = end;
    }
    let tail = (c(next * row_bytes), (h - next) * row_bytes / 16);
    let zr = jit.consts.i64s(zero_rows);
    let b = BLOCK as i64;
    jit.kernel(&cx.node.name, |fx| {
        for_sample_blocks(fx, cx, (h * w, oh * ow), |fx, [xp, dp, op]| {
            let (ty, my, tz) = (fx.addr(ry), fx.addr(my), fx.addr(zr));
            let steps = [0, c(4 * ow) * b, 0, c(8 * kh), c(4 * kh), 16];
            let vals = [xp, dp, op, ty, my, tz];
            fx.loop_n(Count::Const(oh), vals, steps, |fx, [xp, dr, op, ty, my, tz]| {
                let (at, n) = (fx.load_i64(tz, 0), fx.load_i64(tz, 1));
                let first = fx.add(op, at);
                let z = fx.vf(0.0);
                fx.loop_n(Count::Dyn(n), [first, z], [16, 0], |fx, [a, z]| fx.store_v(z, a, 0));
                let (tx, mx) = (fx.addr(rx), fx.addr(mx));
                let steps = [0, 4 * b, 0, 0, 0, c(8 * kw), c(4 * kw)];
                let vals = [xp, dr, op, ty, my, tx, mx];
                fx.loop_n(Count::Const(ow), vals, steps, |fx, [xp, d, op, ty, my, tx, mx]| {
                    let ro: Vec<Value> = (0..kh).map(|ky| fx.load_i64(ty, c(ky))).collect();
                    let co: Vec<Value> = (0..kw).map(|kx| fx.load_i64(tx, c(kx))).collect();
                    let off: Vec<Value> = (0..kh * kw).map(|i| fx.b.ins().iadd(ro[i / kw], co[i % kw])).collect();
                    let rm: Vec<Value> = (0..kh).map(|ky| fx.load_i32(my, c(ky))).collect();
                    let cm: Vec<Value> = (0..kw).map(|kx| fx.load_i32(mx, c(kx))).collect();
                    let valid: Vec<Value> = (0..kh * kw)
                        .map(|i| {
                            let m = fx.b.ins().band(rm[i / kw], cm[i % kw]);
                            let m = fx.b.ins().ireduce(types::I32, m);
                            fx.b.ins().splat(types::I32X4, m)
                        })
                        .collect();
                    let xa: Vec<Value> = off.iter().map(|&o| fx.add(xp, o)).collect();
                    let oa: Vec<Value> = off.iter().map(|&o| fx.add(op, o)).collect();
                    for q in 0..BLOCK / 4 {
                        let t: Vec<Value> = xa.iter().map(|&a| fx.load_v(a, c(4 * q))).collect();
                        let g = fx.load_v(d, c(4 * q));
                        for (a, v) in oa.iter().zip(first_max_grads(fx, &t, Some(&valid), g)) {
                            let cur = fx.load_v_mut(*a, c(4 * q));
                            let s = fx.b.ins().fadd(cur, v);
                            fx.store_v(s, *a, c(4 * q));
                        }
                    }
                });
            });
            let rest = fx.addi(op, tail.0);
            let z = fx.vf(0.0);
            fx.loop_n(Count::Const(tail.1), [rest, z], [16, 0], |fx, [a, z]| fx.store_v(z, a, 0));
        });
    })?;
    Ok(())
}
