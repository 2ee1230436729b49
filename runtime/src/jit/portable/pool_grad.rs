//! Pooling backward on plain NCHW tensors: max-pool (each window's gradient to its first
//! maximal element, ATen's scan order and NaN rule), average-pool (the forward's divisors)
//! and adaptive average-pool. Window geometry comes from compile-time tables. Max-pool
//! backward scans four windows at once on a padded copy of each plane and adds their
//! gradients in f32 (any padding, stride, dilation, overlap), or, for `MaxPool2d(k)`
//! tiling its input, stores each window's gradient at its first maximum of a zeroed
//! plane; a window with no tap inside the input falls back to the general scalar form.
//! Average-pool backward takes, where windows do not overlap, each input cell's one output
//! gradient times `1 / divisor` (a gather; four cells at a time for windows two wide that
//! tile the map, as `AvgPool2d(2)`'s usually do); otherwise, like adaptive pooling, it
//! accumulates each input plane's gradient in f64 in the step's scratch, in the
//! interpreter's order, and rounds once (scalar loops).

use crate::error::Result;
use crate::jit::codegen::{Count, Fx, Jit, c};
use crate::jit::cx::NodeCx;
use crate::jit::eltwise::copy_run;
use crate::jit::math::vsel;
use crate::jit::tables::{axis_table, max_pool_axis};
use cnnc_compiler::ops::{AvgPool2d, MaxPool2d, PaddingMode};
use cnnc_compiler::shape::adaptive_window;
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{InstBuilder, Value, types};

/// Zeroes the f64 accumulator of one plane.
fn zero_plane(fx: &mut Fx<'_>, acc: Value, len: usize) {
    let z = fx.d(0.0);
    fx.for_const(0, len, 1, |fx, i| fx.store_f64(z, acc, i));
}

/// Rounds one plane's f64 accumulator into the f32 result at element `base`.
fn store_plane(fx: &mut Fx<'_>, acc: Value, out: Value, base: Value, len: usize) {
    fx.for_const(0, len, 1, |fx, i| {
        let v = fx.load_f64(acc, i);
        let at = fx.add(base, i);
        fx.store_d(v, out, at);
    });
}

/// `(x, dy) → dx` of a MaxPool2d.
pub(in crate::jit) fn max_pool_grad(jit: &mut Jit, cx: &NodeCx<'_>, p: &MaxPool2d) -> Result<()> {
    let (ch, h, w) = cx.in_chw(0)?;
    let (_, oh, ow) = cx.in_chw(1)?;
    let (kh, kw) = p.kernel;
    if p.padding == (0, 0) && p.dilation == (1, 1) && p.stride == p.kernel && oh * kh <= h && ow * kw <= w {
        return tiled_max_pool_grad(jit, cx, (ch, h, w), (oh, ow), p.kernel);
    }
    let rows = max_pool_axis(oh, kh, p.stride.0, p.dilation.0, p.padding.0, h);
    let cols = max_pool_axis(ow, kw, p.stride.1, p.dilation.1, p.padding.1, w);
    if let (Some(rows), Some(cols)) = (rows, cols) {
        return vector_max_pool_grad(jit, cx, p, (ch, h, w), (oh, ow), (rows, cols));
    }
    let ty = axis_table(oh, kh, p.stride.0, p.dilation.0, p.padding.0, h, PaddingMode::Zeros)?;
    let tx = axis_table(ow, kw, p.stride.1, p.dilation.1, p.padding.1, w, PaddingMode::Zeros)?;
    let (ty, tx) = (jit.consts.i32s(ty), jit.consts.i32s(tx));
    let sc = cx.scratch_slot()?;
    let (xs, ds, os) = (cx.inputs[0], cx.inputs[1], cx.output);
    let plane = h * w;
    jit.kernel(&cx.node.name, |fx| {
        let (x, dy, out, acc) = (fx.slot(xs), fx.slot(ds), fx.slot(os), fx.slot(sc));
        let (tya, txa) = (fx.addr(ty), fx.addr(tx));
        let zero = fx.i(0);
        let planes = fx.muli(fx.nb, c(ch));
        fx.for_range(zero, planes, 1, |fx, pl| {
            let xb = fx.muli(pl, c(plane));
            let db = fx.muli(pl, c(oh * ow));
            zero_plane(fx, acc, plane);
            fx.for_const(0, oh, 1, |fx, oy| {
                fx.for_const(0, ow, 1, |fx, ox| {
                    let ninf = fx.f(f32::NEG_INFINITY);
                    let best = fx.var(cranelift_codegen::ir::types::F32, ninf);
                    let m1 = fx.i(-1);
                    let at = fx.var(cranelift_codegen::ir::types::I64, m1);
                    fx.for_const(0, kh, 1, |fx, ky| {
                        let yi = fx.lin(&[(oy, c(kh)), (ky, 1)], 0);
                        let iy = fx.load_i32_at(tya, yi);
                        fx.for_const(0, kw, 1, |fx, kx| {
                            let xi = fx.lin(&[(ox, c(kw)), (kx, 1)], 0);
                            let ix = fx.load_i32_at(txa, xi);
                            let vy = fx.b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, iy, 0);
                            let vx = fx.b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, ix, 0);
                            let valid = fx.b.ins().band(vy, vx);
                            let i = fx.lin(&[(iy, c(w)), (ix, 1)], 0);
                            let z = fx.i(0);
                            let i = fx.select(valid, i, z);
                            let e = fx.add(xb, i);
                            let ea = fx.elem(x, e);
                            let v = fx.load_f(ea, 0);
                            let cur_best = fx.b.use_var(best);
                            let cur_at = fx.b.use_var(at);
                            let first = fx.b.ins().icmp_imm_s(IntCC::SignedLessThan, cur_at, 0);
                            let gt = fx.b.ins().fcmp(FloatCC::GreaterThan, v, cur_best);
                            let nan = fx.b.ins().fcmp(FloatCC::Unordered, v, v);
                            let better = fx.b.ins().bor(gt, nan);
                            // The first element inside the input is chosen until a greater one (or a NaN) comes.
                            let take_at = fx.b.ins().bor(first, better);
                            let take_at = fx.b.ins().band(valid, take_at);
                            let take_best = fx.b.ins().band(valid, better);
                            let na = fx.select(take_at, i, cur_at);
                            fx.b.def_var(at, na);
                            let nbst = fx.b.ins().select(take_best, v, cur_best);
                            fx.b.def_var(best, nbst);
                        });
                    });
                    let at = fx.b.use_var(at);
                    let some = fx.b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, at, 0);
                    let z = fx.i(0);
                    let slot = fx.select(some, at, z);
                    let o = fx.lin(&[(oy, c(ow)), (ox, 1)], 0);
                    let o = fx.add(db, o);
                    let g = fx.load_d(dy, o);
                    let zd = fx.d(0.0);
                    let g = fx.b.ins().select(some, g, zd);
                    let cur = fx.load_f64(acc, slot);
                    let s = fx.b.ins().fadd(cur, g);
                    fx.store_f64(s, acc, slot);
                });
            });
            store_plane(fx, acc, out, xb, plane);
        });
    })?;
    Ok(())
}

/// Max-pool backward with padding, strides, dilation or overlapping windows, four outputs of a
/// row at a time: each input plane is copied into a padded plane (`rows × cols` of
/// [`max_pool_axis`], −∞ around the input), every window is at constant offsets from its
/// corner there, and 4 windows (`stride` apart) are scanned at once with strided vector
/// loads — ATen's rule: the first tap inside the input is the candidate, a later tap wins if
/// it is greater or NaN; −∞ padding never wins. Each window's gradient is then added at its
/// winner in a padded f32 gradient plane (in output order), whose interior is the result.
/// The padded input's border is written once per call (planes only overwrite the interior).
fn vector_max_pool_grad(
    jit: &mut Jit,
    cx: &NodeCx<'_>,
    p: &MaxPool2d,
    (ch, h, w): (usize, usize, usize),
    (oh, ow): (usize, usize),
    ((rows, row_first), (cols, col_first)): ((usize, Vec<i32>), (usize, Vec<i32>)),
) -> Result<()> {
    let (kh, kw) = p.kernel;
    let (sh, sw) = p.stride;
    let (dh, dw) = p.dilation;
    let (pt, pl) = p.padding;
    let row_first: Vec<i32> = row_first.iter().map(|f| f * cols as i32).collect();
    let (rf, cf) = (jit.consts.i32s(row_first), jit.consts.i32s(col_first));
    let sc = cx.scratch_slot()?;
    let (xs, ds, os) = (cx.inputs[0], cx.inputs[1], cx.output);
    let (plane, padded) = (h * w, rows * cols);
    let groups = ow / 4;
    let rem = ow % 4;
    jit.kernel(&cx.node.name, |fx| {
        let (x, dy, out, scr) = (fx.slot(xs), fx.slot(ds), fx.slot(os), fx.slot(sc));
        let xp = scr;
        let gp = fx.addi(scr, c(4 * padded));
        let ninf = fx.vf(f32::NEG_INFINITY);
        fx.loop_n(Count::Const(padded / 4), [xp, ninf], [16, 0], |fx, [d, v]| fx.store_v(v, d, 0));
        let ninf_s = fx.f(f32::NEG_INFINITY);
        for i in padded / 4 * 4..padded {
            fx.store_f(ninf_s, xp, c(i));
        }
        let planes = fx.muli(fx.nb, c(ch));
        let steps = [c(4 * plane), c(4 * oh * ow), c(4 * plane), 0, 0];
        fx.loop_n(Count::Dyn(planes), [x, dy, out, xp, gp], steps, |fx, [xn, dn, on, xp, gp]| {
            // The padded input and a zeroed padded gradient.
            let x0 = fx.addi(xp, c(4 * (pt * cols + pl)));
            fx.loop_n(Count::Const(h), [xn, x0], [c(4 * w), c(4 * cols)], |fx, [s, d]| copy_run(fx, s, d, w));
            let z = fx.vf(0.0);
            fx.loop_n(Count::Const(padded / 4), [gp, z], [16, 0], |fx, [d, z]| fx.store_v(z, d, 0));
            let zs = fx.f(0.0);
            for i in padded / 4 * 4..padded {
                fx.store_f(zs, gp, c(i));
            }
            let (rfa, cfa) = (fx.addr(rf), fx.addr(cf));
            let row = c(4 * sh * cols);
            let steps = [row, c(4 * ow), row, 4, 0];
            fx.loop_n(Count::Const(oh), [xp, dn, gp, rfa, cfa], steps, |fx, [xr, dr, gr, rfp, cfa]| {
                let first_row = fx.load_i32(rfp, 0);
                let first_row = fx.b.ins().ireduce(types::I32, first_row);
                let first_row = fx.b.ins().splat(types::I32X4, first_row);
                // Four windows: their winners' offsets from their corners, then the scatter.
                let scan = |fx: &mut Fx<'_>, xw: Value, cfp: Value| -> Value {
                    let firsts = fx.load_v(cfp, 0);
                    let firsts = fx.bitcast(types::I32X4, firsts);
                    let mut at = fx.b.ins().iadd(first_row, firsts);
                    let mut best = fx.vf(f32::NEG_INFINITY);
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let off = ky * dh * cols + kx * dw;
                            let v = fx.load_strided(xw, c(off), sw);
                            let gt = fx.b.ins().fcmp(FloatCC::GreaterThan, v, best);
                            let nan = fx.b.ins().fcmp(FloatCC::Unordered, v, v);
                            let take = fx.b.ins().bor(gt, nan);
                            best = vsel(fx, take, v, best);
                            let o = fx.vi(off as i32);
                            at = fx.b.ins().bitselect(take, o, at);
                        }
                    }
                    at
                };
                let scatter = |fx: &mut Fx<'_>, at: Value, d: Value, g: Value, lanes: usize| {
                    for j in 0..lanes {
                        let a = fx.b.ins().extractlane(at, j as u8);
                        let a = fx.b.ins().sextend(types::I64, a);
                        let a = fx.addi(a, c(j * sw));
                        let v = fx.load_f(d, c(j));
                        let cur = fx.load_f_mut(g, a);
                        let s = fx.b.ins().fadd(cur, v);
                        let ga = fx.elem(g, a);
                        fx.store_f(s, ga, 0);
                    }
                };
                let steps = [c(16 * sw), 16, c(16 * sw), 16];
                fx.loop_n(Count::Const(groups), [xr, dr, gr, cfa], steps, |fx, [xw, d, g, cfp]| {
                    let at = scan(fx, xw, cfp);
                    scatter(fx, at, d, g, 4);
                });
                if rem > 0 {
                    let xw = fx.addi(xr, c(4 * groups * 4 * sw));
                    let d = fx.addi(dr, c(4 * groups * 4));
                    let g = fx.addi(gr, c(4 * groups * 4 * sw));
                    let cfp = fx.addi(cfa, c(4 * groups * 4));
                    let at = scan(fx, xw, cfp);
                    scatter(fx, at, d, g, rem);
                }
            });
            // The interior is the input's gradient.
            let g0 = fx.addi(gp, c(4 * (pt * cols + pl)));
            fx.loop_n(Count::Const(h), [g0, on], [c(4 * cols), c(4 * w)], |fx, [s, d]| copy_run(fx, s, d, w));
        });
    })?;
    Ok(())
}

/// Max-pool backward when the windows tile the input without padding, dilation, overlap or
/// a partial window (`stride == kernel`, the usual `MaxPool2d(k)`): each window scanned
/// with constant offsets from its corner (the same first-maximum and NaN rule), its output
/// gradient stored at the chosen cell of a zeroed plane — each cell takes at most one, so
/// no accumulator is needed and the result is the general form's bit for bit.
fn tiled_max_pool_grad(
    jit: &mut Jit,
    cx: &NodeCx<'_>,
    (ch, h, w): (usize, usize, usize),
    (oh, ow): (usize, usize),
    (kh, kw): (usize, usize),
) -> Result<()> {
    let (xs, ds, os) = (cx.inputs[0], cx.inputs[1], cx.output);
    let plane = h * w;
    if (kh, kw) == (2, 2) && (h, w) == (2 * oh, 2 * ow) {
        return jit.kernel(&cx.node.name, |fx| max_pool_2x2_grad(fx, [xs, ds, os], ch, (oh, ow))).map(|_| ());
    }
    jit.kernel(&cx.node.name, |fx| {
        let (x, dy, out) = (fx.slot(xs), fx.slot(ds), fx.slot(os));
        let planes = fx.muli(fx.nb, c(ch));
        let steps = [c(4 * plane), c(4 * oh * ow), c(4 * plane)];
        fx.loop_n(Count::Dyn(planes), [x, dy, out], steps, |fx, [xp, dp, op]| {
            let z = fx.vf(0.0);
            fx.loop_n(Count::Const(plane / 4), [op], [16], |fx, [o]| fx.store_v(z, o, 0));
            let zf = fx.f(0.0);
            for i in plane / 4 * 4..plane {
                fx.store_f(zf, op, c(i));
            }
            let steps = [c(4 * kh * w), c(4 * ow), c(4 * kh * w)];
            fx.loop_n(Count::Const(oh), [xp, dp, op], steps, |fx, [xr, dr, orow]| {
                let steps = [c(4 * kw), 4, c(4 * kw)];
                fx.loop_n(Count::Const(ow), [xr, dr, orow], steps, |fx, [xw, d, ow_]| {
                    let mut best = fx.load_f(xw, 0);
                    let mut at = fx.i(0);
                    for ky in 0..kh {
                        for kx in 0..kw {
                            if ky == 0 && kx == 0 {
                                continue;
                            }
                            let off = c(ky * w + kx);
                            let v = fx.load_f(xw, off);
                            let gt = fx.b.ins().fcmp(FloatCC::GreaterThan, v, best);
                            let nan = fx.b.ins().fcmp(FloatCC::Unordered, v, v);
                            let better = fx.b.ins().bor(gt, nan);
                            best = fx.b.ins().select(better, v, best);
                            let o = fx.i(off);
                            at = fx.select(better, o, at);
                        }
                    }
                    let g = fx.load_f(d, 0);
                    let a = fx.elem(ow_, at);
                    fx.store_f(g, a, 0);
                });
            });
        });
    })?;
    Ok(())
}

/// `MaxPool2d(2)` backward on planes it tiles exactly (`2·oh × 2·ow`): every input cell is
/// written once — its window's gradient where it is the window's first maximum (the
/// scalar form's scan order and NaN rule), else zero — so nothing is zeroed first and
/// nothing scattered. Four windows at a time: the two input rows' eight columns split into
/// even and odd lanes, the four taps compared in scan order, the masked gradients
/// interleaved back into the rows; the last `ow % 4` windows one at a time, alike. (The
/// CIFAR-10 net's first pool backward at batch 64: 2.4 ms as zero-and-scatter.)
fn max_pool_2x2_grad(fx: &mut Fx<'_>, [xs, ds, os]: [usize; 3], ch: usize, (oh, ow): (usize, usize)) {
    let w = 2 * ow;
    let (x, dy, out) = (fx.slot(xs), fx.slot(ds), fx.slot(os));
    let rows = fx.muli(fx.nb, c(ch * oh));
    // The window's four taps in scan order → which one is its first maximum (one mask per
    // tap: a later tap wins if it is greater or NaN, as `nan_max` decides).
    let winners = |fx: &mut Fx<'_>, t: [Value; 4], scalar: bool| -> [Value; 4] {
        let mut best = t[0];
        let mut took = vec![];
        for &v in &t[1..] {
            let gt = fx.b.ins().fcmp(FloatCC::GreaterThan, v, best);
            let nan = fx.b.ins().fcmp(FloatCC::Unordered, v, v);
            let better = fx.b.ins().bor(gt, nan);
            best = if scalar { fx.b.ins().select(better, v, best) } else { vsel(fx, better, v, best) };
            took.push(better);
        }
        // Tap k wins if it took the lead and no later tap did; tap 0 if none did.
        let mut later = took[2];
        let w3 = took[2];
        let w2 = fx.b.ins().band_not(took[1], later);
        later = fx.b.ins().bor(later, took[1]);
        let w1 = fx.b.ins().band_not(took[0], later);
        later = fx.b.ins().bor(later, took[0]);
        // (A scalar compare gives 0 or 1, whose `bnot` is never 0.)
        let w0 = if scalar { fx.b.ins().bxor_imm_u(later, 1) } else { fx.b.ins().bnot(later) };
        [w0, w1, w2, w3]
    };
    let steps = [c(8 * w), c(4 * ow), c(8 * w)];
    fx.loop_n(Count::Dyn(rows), [x, dy, out], steps, |fx, [xr, dr, orow]| {
        let z = fx.vf(0.0);
        fx.loop_n(Count::Const(ow / 4), [xr, dr, orow], [32, 16, 32], |fx, [xp, d, o]| {
            let (r0a, r0b) = (fx.load_v(xp, 0), fx.load_v(xp, 4));
            let (r1a, r1b) = (fx.load_v(xp, c(w)), fx.load_v(xp, c(w) + 4));
            let t = [
                fx.lanes_of(r0a, r0b, [0, 2, 4, 6]),
                fx.lanes_of(r0a, r0b, [1, 3, 5, 7]),
                fx.lanes_of(r1a, r1b, [0, 2, 4, 6]),
                fx.lanes_of(r1a, r1b, [1, 3, 5, 7]),
            ];
            let win = winners(fx, t, false);
            let g = fx.load_v(d, 0);
            let m = win.map(|mk| vsel(fx, mk, g, z));
            let (lo0, hi0) = (fx.lanes_of(m[0], m[1], [0, 4, 1, 5]), fx.lanes_of(m[0], m[1], [2, 6, 3, 7]));
            let (lo1, hi1) = (fx.lanes_of(m[2], m[3], [0, 4, 1, 5]), fx.lanes_of(m[2], m[3], [2, 6, 3, 7]));
            fx.store_v(lo0, o, 0);
            fx.store_v(hi0, o, 4);
            fx.store_v(lo1, o, c(w));
            fx.store_v(hi1, o, c(w) + 4);
        });
        let zf = fx.f(0.0);
        for q in ow / 4 * 4..ow {
            let at = [0, 1, w, w + 1].map(|e| c(2 * q + e));
            let t = at.map(|a| fx.load_f(xr, a));
            let win = winners(fx, t, true);
            let g = fx.load_f(dr, c(q));
            for (mk, a) in win.into_iter().zip(at) {
                let v = fx.b.ins().select(mk, g, zf);
                fx.store_f(v, orow, a);
            }
        }
    });
}

/// One axis of an averaging window: for each output, the input range `[start, end)` it
/// sums, and the length of the (padded) window.
type Windows = Vec<(usize, usize, usize)>;

/// AvgPool2d's windows along one axis (as ATen: the window may hang into the padding and,
/// with `ceil_mode`, past it; it is clipped to `input + pad` for its size and to the input
/// for what it sums).
fn avg_axis(out: usize, k: usize, s: usize, p: usize, input: usize) -> Windows {
    (0..out)
        .map(|o| {
            let start = (o * s) as i64 - p as i64;
            let end = (start + k as i64).min((input + p) as i64);
            let pool = (end - start).max(0) as usize;
            let (a, b) = (start.max(0) as usize, end.min(input as i64).max(0) as usize);
            (a, b.max(a), pool)
        })
        .collect()
}

/// `(dy) → dx` of an AvgPool2d on an input of `in_hw`.
pub(in crate::jit) fn avg_pool_grad(
    jit: &mut Jit,
    cx: &NodeCx<'_>,
    p: &AvgPool2d,
    in_hw: (usize, usize),
) -> Result<()> {
    let (ch, oh, ow) = cx.in_chw(0)?;
    let (h, w) = in_hw;
    let unpadded = p.padding == (0, 0) && p.padding_end.is_none_or(|e| e == (0, 0));
    let (kh, kw) = p.kernel;
    if unpadded && p.stride == p.kernel && kw == 2 && kh >= 1 && oh * kh == h && ow * kw == w {
        let divisor = p.divisor_override.unwrap_or(kh * kw);
        return tiled_avg_pool_grad(jit, cx, (ch, oh, ow), kh, (1.0 / divisor as f64) as f32);
    }
    let wy = avg_axis(oh, p.kernel.0, p.stride.0, p.padding.0, h);
    let wx = avg_axis(ow, p.kernel.1, p.stride.1, p.padding.1, w);
    let mut divisors = Vec::with_capacity(oh * ow);
    for &(y0, y1, py) in &wy {
        for &(x0, x1, px) in &wx {
            divisors.push(match p.divisor_override {
                Some(d) => d as f64,
                None if p.count_include_pad => (py * px) as f64,
                None => ((y1 - y0) * (x1 - x0)) as f64,
            });
        }
    }
    window_grad(jit, cx, (h, w), &wy, &wx, divisors)
}

/// `AvgPool2d((kh, 2))` with stride = kernel tiling its input exactly (the usual
/// `AvgPool2d(2)`): every input cell takes its one window's gradient times `scale`, as
/// [`gather_grad`] computes it, four cells at a time — the output row's gradients in pairs,
/// each lane doubled, stored to the window's `kh` input rows (an odd last window: two
/// scalar cells per row).
fn tiled_avg_pool_grad(
    jit: &mut Jit,
    cx: &NodeCx<'_>,
    (ch, oh, ow): (usize, usize, usize),
    kh: usize,
    scale: f32,
) -> Result<()> {
    let (ds, os) = (cx.inputs[0], cx.output);
    let w = 2 * ow;
    let pairs = ow / 2;
    jit.kernel(&cx.node.name, |fx| {
        let (dy, out) = (fx.slot(ds), fx.slot(os));
        let rows = fx.muli(fx.nb, c(ch * oh));
        let sv = fx.vf(scale);
        let steps = [c(4 * ow), c(4 * kh * w), 0];
        fx.loop_n(Count::Dyn(rows), [dy, out, sv], steps, |fx, [dp, xp, sv]| {
            fx.loop_n(Count::Const(pairs), [dp, xp, sv], [8, 16, 0], |fx, [d, x, sv]| {
                let q = fx.load_i64(d, 0);
                let v = fx.b.ins().scalar_to_vector(types::I64X2, q);
                let v = fx.bitcast(types::F32X4, v);
                let v = fx.lanes_of(v, v, [0, 0, 1, 1]);
                let v = fx.b.ins().fmul(v, sv);
                for r in 0..kh {
                    fx.store_v(v, x, (r * w) as i64);
                }
            });
            if ow % 2 == 1 {
                let g = fx.load_f(dp, (ow - 1) as i64);
                let k = fx.f(scale);
                let v = fx.b.ins().fmul(g, k);
                for r in 0..kh {
                    fx.store_f(v, xp, (r * w + w - 2) as i64);
                    fx.store_f(v, xp, (r * w + w - 1) as i64);
                }
            }
        });
    })?;
    Ok(())
}

/// `(dy) → dx` of an AdaptiveAvgPool2d on an input of `in_hw`.
pub(in crate::jit) fn adaptive_avg_pool_grad(jit: &mut Jit, cx: &NodeCx<'_>, in_hw: (usize, usize)) -> Result<()> {
    let (_, oh, ow) = cx.in_chw(0)?;
    let (h, w) = in_hw;
    let axis = |out: usize, input: usize| -> Windows {
        (0..out)
            .map(|o| {
                let (a, b) = adaptive_window(o, input, out);
                (a, b, b - a)
            })
            .collect()
    };
    let (wy, wx) = (axis(oh, h), axis(ow, w));
    let divisors = wy.iter().flat_map(|y| wx.iter().map(move |x| ((y.1 - y.0) * (x.1 - x.0)) as f64)).collect();
    window_grad(jit, cx, (h, w), &wy, &wx, divisors)
}

/// When no input cell is in two windows (stride ≥ kernel, the usual case): per input
/// cell, the output whose window holds it (−1: none) and `1 / divisor`.
fn disjoint(wy: &Windows, wx: &Windows, (h, w): (usize, usize), divisors: &[f64]) -> Option<(Vec<i32>, Vec<f32>)> {
    let mut owner = vec![-1i32; h * w];
    let mut scale = vec![0f32; h * w];
    for (oy, &(y0, y1, _)) in wy.iter().enumerate() {
        for (ox, &(x0, x1, _)) in wx.iter().enumerate() {
            let o = oy * wx.len() + ox;
            for iy in y0..y1 {
                for ix in x0..x1 {
                    let cell = iy * w + ix;
                    if owner[cell] >= 0 {
                        return None;
                    }
                    owner[cell] = i32::try_from(o).ok()?;
                    scale[cell] = (1.0 / divisors[o]) as f32;
                }
            }
        }
    }
    Some((owner, scale))
}

/// `dx[cell] = dy[owner[cell]] · scale[cell]` (zero for a cell of no window), plane by
/// plane: the disjoint windows' gradient as one gather per input cell, no accumulator.
fn gather_grad(
    jit: &mut Jit,
    cx: &NodeCx<'_>,
    (ch, plane, out_plane): (usize, usize, usize),
    owner: Vec<i32>,
    scale: Vec<f32>,
) -> Result<()> {
    let (own, sca) = (jit.consts.i32s(owner), jit.consts.f32s(scale));
    let (ds, os) = (cx.inputs[0], cx.output);
    jit.kernel(&cx.node.name, |fx| {
        let (dy, out) = (fx.slot(ds), fx.slot(os));
        let planes = fx.muli(fx.nb, c(ch));
        let steps = [c(4 * out_plane), c(4 * plane)];
        fx.loop_n(Count::Dyn(planes), [dy, out], steps, |fx, [dp, xp]| {
            let (oa, sa) = (fx.addr(own), fx.addr(sca));
            fx.loop_n(Count::Const(plane), [oa, sa, xp, dp], [4, 4, 4, 0], |fx, [oa, sa, xp, dp]| {
                let o = fx.load_i32(oa, 0);
                let valid = fx.b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, o, 0);
                let zero = fx.i(0);
                let o = fx.select(valid, o, zero);
                let a = fx.elem(dp, o);
                let g = fx.load_f(a, 0);
                let k = fx.load_f(sa, 0);
                let v = fx.b.ins().fmul(g, k);
                let z = fx.f(0.0);
                let v = fx.b.ins().select(valid, v, z);
                fx.store_f(v, xp, 0);
            });
        });
    })?;
    Ok(())
}

/// Each output's gradient divided by its divisor and added to every input cell of its
/// window (an empty window adds nothing).
fn window_grad(
    jit: &mut Jit,
    cx: &NodeCx<'_>,
    (h, w): (usize, usize),
    wy: &Windows,
    wx: &Windows,
    divisors: Vec<f64>,
) -> Result<()> {
    let (ch, oh, ow) = cx.in_chw(0)?;
    if let Some((owner, scale)) = disjoint(wy, wx, (h, w), &divisors) {
        return gather_grad(jit, cx, (ch, h * w, oh * ow), owner, scale);
    }
    let bounds = |ws: &Windows| -> Vec<i64> { ws.iter().flat_map(|&(a, b, _)| [a as i64, b as i64]).collect() };
    let (ty, tx) = (jit.consts.i64s(bounds(wy)), jit.consts.i64s(bounds(wx)));
    let dv = jit.consts.i64s(divisors.iter().map(|d| d.to_bits() as i64).collect());
    let sc = cx.scratch_slot()?;
    let (ds, os) = (cx.inputs[0], cx.output);
    let plane = h * w;
    jit.kernel(&cx.node.name, |fx| {
        let (dy, out, acc) = (fx.slot(ds), fx.slot(os), fx.slot(sc));
        let (tya, txa, dva) = (fx.addr(ty), fx.addr(tx), fx.addr(dv));
        let zero = fx.i(0);
        let planes = fx.muli(fx.nb, c(ch));
        fx.for_range(zero, planes, 1, |fx, pl| {
            let xb = fx.muli(pl, c(plane));
            let db = fx.muli(pl, c(oh * ow));
            zero_plane(fx, acc, plane);
            fx.for_const(0, oh, 1, |fx, oy| {
                let (i0, i1) = (fx.muli(oy, 2), fx.lin(&[(oy, 2)], 1));
                let (y0, y1) = (fx.load_i64_at(tya, i0), fx.load_i64_at(tya, i1));
                fx.for_const(0, ow, 1, |fx, ox| {
                    let (i0, i1) = (fx.muli(ox, 2), fx.lin(&[(ox, 2)], 1));
                    let (x0, x1) = (fx.load_i64_at(txa, i0), fx.load_i64_at(txa, i1));
                    let o = fx.lin(&[(oy, c(ow)), (ox, 1)], 0);
                    let div = fx.load_f64_const(dva, o);
                    let o = fx.add(db, o);
                    let g = fx.load_d(dy, o);
                    let g = fx.b.ins().fdiv(g, div);
                    fx.for_range(y0, y1, 1, |fx, iy| {
                        fx.for_range(x0, x1, 1, |fx, ix| {
                            let i = fx.lin(&[(iy, c(w)), (ix, 1)], 0);
                            let cur = fx.load_f64(acc, i);
                            let s = fx.b.ins().fadd(cur, g);
                            fx.store_f64(s, acc, i);
                        });
                    });
                });
            });
            store_plane(fx, acc, out, xb, plane);
        });
    })?;
    Ok(())
}
