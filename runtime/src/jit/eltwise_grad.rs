//! The layout-agnostic training kernels on plain tensors: BatchNorm2d with batch statistics
//! and its gradients (and the eval-mode ones), Dropout's mask, the losses and their
//! gradients, activation backward, bias gradients, slices and reduction backward.
//!
//! They run the whole batch (a training graph runs as one chunk: see [`super::plan`]);
//! values of a fixed shape (statistics, gradients of parameters, the loss) are written
//! once, not per sample. BatchNorm and activation backward run on f32x4: a per-channel sum
//! adds f32 lanes over runs of at most 64 elements and those partial sums in f64
//! ([`add_sums`]); elementwise results use per-channel factors made in f64 and rounded
//! once (as ATen's CPU kernels do, in f32). Per-channel reductions are shared between
//! threads by channels; elementwise kernels are sample-wise (`lower::samplewise_work`).
//! The losses, slices and reduction backward follow the interpreter's arithmetic exactly
//! (sums in f64 in its order, rounded once), in scalar loops.

use super::codegen::{Count, Fx, Jit, LANES, V, c, part_range};
use super::cx::NodeCx;
use super::math::{exp_f64, ln_1p_f64, ln_f64, max_and_sum_exp, vsel};
use crate::error::{Error, Result};
use cnnc_compiler::ops::train::{Loss, Reduction};
use cnnc_compiler::ops::{Activation, BatchNorm2d, Reduce, ReduceKind};
use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::{InstBuilder, Value, types};
use cranelift_frontend::Variable;

/// `for i in 0..len { body(base + i) }`.
fn each(fx: &mut Fx<'_>, base: Value, len: usize, mut body: impl FnMut(&mut Fx<'_>, Value)) {
    fx.for_const(0, len, 1, |fx, i| {
        let at = fx.add(base, i);
        body(fx, at);
    });
}

/// `(weight, bias)` addresses of an affine BatchNorm, if affine.
pub(in crate::jit) fn bn_params(
    jit: &mut Jit,
    cx: &NodeCx<'_>,
    bn: &BatchNorm2d,
    bias: bool,
) -> Result<Option<(i64, Option<i64>)>> {
    if !bn.affine {
        return Ok(None);
    }
    let w = jit.consts.f32s(cx.param("weight")?);
    let b = if bias { Some(jit.consts.f32s(cx.param("bias")?)) } else { None };
    Ok(Some((w, b)))
}

/// The per-channel scale `g` (weight or 1) as f64.
fn gamma(fx: &mut Fx<'_>, w: Option<i64>, ch: Value) -> Value {
    match w {
        Some(a) => {
            let base = fx.addr(a);
            fx.load_d(base, ch)
        }
        None => fx.d(1.0),
    }
}

/// `(mean, 1/sqrt(var + eps))` of channel `ch` from `[2, C]` statistics, in f64.
pub(in crate::jit) fn mean_invstd(
    fx: &mut Fx<'_>,
    stats: Value,
    ch: Value,
    channels: usize,
    eps: f64,
) -> (Value, Value) {
    let mean = fx.load_d(stats, ch);
    let vi = fx.addi(ch, c(channels));
    let var = fx.load_d(stats, vi);
    let e = fx.d(eps);
    let ve = fx.b.ins().fadd(var, e);
    let sd = fx.b.ins().sqrt(ve);
    let one = fx.d(1.0);
    let inv = fx.b.ins().fdiv(one, sd);
    (mean, inv)
}

/// The f64 factors of train-mode BatchNorm's `y = (x − mean)·a + b` for channel `ch`:
/// `[mean, invstd·weight, bias]` (`p`: the weight and bias, [`bn_params`]).
pub(in crate::jit) fn bn_train_factors(
    fx: &mut Fx<'_>,
    p: Option<(i64, Option<i64>)>,
    (stats, ch, channels): (Value, Value, usize),
    eps: f64,
) -> [Value; 3] {
    let (mean, inv) = mean_invstd(fx, stats, ch, channels, eps);
    let g = gamma(fx, p.map(|p| p.0), ch);
    let b = match p.and_then(|p| p.1) {
        Some(a) => {
            let base = fx.addr(a);
            fx.load_d(base, ch)
        }
        None => fx.d(0.0),
    };
    let a = fx.b.ins().fmul(inv, g);
    [mean, a, b]
}

/// The f64 factors of train-mode BatchNorm's input gradient `dx = (dy − mdy − (x − mean)·k)·
/// ginv` for channel `ch` from its sums `Σ dy` and `Σ dy·(x − mean)` over `count` values:
/// `[mdy, k, ginv]`.
pub(in crate::jit) fn bn_grad_factors(
    fx: &mut Fx<'_>,
    w: Option<i64>,
    (ch, inv): (Value, Value),
    [sum_dy, sum_dxm]: [Value; 2],
    count: Value,
) -> [Value; 3] {
    let sum_dyx = fx.b.ins().fmul(sum_dxm, inv);
    let g = gamma(fx, w, ch);
    let mdy = fx.b.ins().fdiv(sum_dy, count);
    let mdyx = fx.b.ins().fdiv(sum_dyx, count);
    let k = fx.b.ins().fmul(inv, mdyx);
    let ginv = fx.b.ins().fmul(g, inv);
    [mdy, k, ginv]
}

/// Per-channel factors a vector loop uses (f32x4 splats), carried through the loop as
/// invariants (see [`Fx::loop_n`]).
type Factors = [Value; 4];

/// `dst[i] = f(a[i], b[i], factors)` for `len` floats on f32x4 (the last 1–3 as a partial
/// vector, the missing lanes loaded as 0); the loop carries its pointers and the factors.
fn map_run(
    fx: &mut Fx<'_>,
    [a, b]: [Value; 2],
    dst: Value,
    len: usize,
    k: Factors,
    mut f: impl FnMut(&mut Fx<'_>, [Value; 2], Factors) -> Value,
) {
    let full = len / LANES;
    let vals = [a, b, dst, k[0], k[1], k[2], k[3]];
    fx.loop_n(Count::Const(full), vals, [16, 16, 16, 0, 0, 0, 0], |fx, [a, b, d, k0, k1, k2, k3]| {
        let (va, vb) = (fx.load_v(a, 0), fx.load_v(b, 0));
        let r = f(fx, [va, vb], [k0, k1, k2, k3]);
        fx.store_v(r, d, 0);
    });
    let rem = len % LANES;
    if rem > 0 {
        let off = c(4 * full * LANES);
        let (a, b, d) = (fx.addi(a, off), fx.addi(b, off), fx.addi(dst, off));
        let (va, vb) = (fx.load_partial(a, 0, rem), fx.load_partial(b, 0, rem));
        let r = f(fx, [va, vb], k);
        fx.store_partial(r, d, 0, rem);
    }
}

/// Vectors per f32 partial sum before it is added into its f64 total (64 floats: a lane
/// sums at most 16 terms in f32).
const SUM_CHUNK: usize = 16;

/// Adds into the f64 totals `accs` the sums over `len` floats from the pointers `p` of the
/// `K` terms `terms(fx, [pointers at the current vector], k, lanes)` makes (f32x4 each; of
/// a partial vector of `lanes < 4` only the first `lanes` count; `k` a per-channel factor
/// carried through the loops). Terms are summed in f32
/// lanes over at most [`SUM_CHUNK`] vectors, then each lane is added into the total in f64.
fn add_sums<const K: usize>(
    fx: &mut Fx<'_>,
    p: [Value; 2],
    len: usize,
    k: Value,
    accs: [Variable; K],
    mut terms: impl FnMut(&mut Fx<'_>, [Value; 2], Value, usize) -> [Value; K],
) {
    type Terms<'t, const K: usize> = dyn FnMut(&mut Fx<'_>, [Value; 2], Value, usize) -> [Value; K] + 't;
    let vectors = len / LANES;
    let chunk = |fx: &mut Fx<'_>, p: [Value; 2], k: Value, count: usize, terms: &mut Terms<'_, K>| {
        let lanes: [Variable; K] = std::array::from_fn(|_| {
            let z = fx.vf(0.0);
            fx.var(V, z)
        });
        fx.loop_n(Count::Const(count), [p[0], p[1], k], [16, 16, 0], |fx, [p0, p1, k]| {
            let t = terms(fx, [p0, p1], k, LANES);
            for (l, t) in lanes.iter().zip(t) {
                let cur = fx.b.use_var(*l);
                let s = fx.b.ins().fadd(cur, t);
                fx.b.def_var(*l, s);
            }
        });
        for (l, acc) in lanes.iter().zip(accs) {
            let v = fx.b.use_var(*l);
            lane_total(fx, v, LANES, acc);
        }
    };
    let chunks = vectors / SUM_CHUNK;
    if chunks > 0 {
        let step = c(16 * SUM_CHUNK);
        fx.loop_n(Count::Const(chunks), [p[0], p[1], k], [step, step, 0], |fx, [p0, p1, k]| {
            chunk(fx, [p0, p1], k, SUM_CHUNK, &mut terms)
        });
    }
    let left = vectors % SUM_CHUNK;
    let done = c(4 * chunks * SUM_CHUNK * LANES);
    if left > 0 {
        let q = [fx.addi(p[0], done), fx.addi(p[1], done)];
        chunk(fx, q, k, left, &mut terms);
    }
    let rem = len % LANES;
    if rem > 0 {
        let off = c(4 * vectors * LANES);
        let q = [fx.addi(p[0], off), fx.addi(p[1], off)];
        let t = terms(fx, q, k, rem);
        for (t, acc) in t.into_iter().zip(accs) {
            lane_total(fx, t, rem, acc);
        }
    }
}

/// Adds the first `lanes` lanes of the f32x4 `v` into the f64 variable `acc`.
fn lane_total(fx: &mut Fx<'_>, v: Value, lanes: usize, acc: Variable) {
    for j in 0..lanes {
        let x = fx.b.ins().extractlane(v, j as u8);
        let x = fx.b.ins().fpromote(types::F64, x);
        fx.accumulate(acc, x);
    }
}

/// Loops over this part's channels (channels are split between the parts of a parallel
/// kernel) carrying the channel index and each pointer advanced to that channel's plane of
/// sample 0: `body(fx, ch, pointers)`.
fn for_channels(
    fx: &mut Fx<'_>,
    (ch_n, plane): (usize, usize),
    p: [Value; 3],
    body: impl FnOnce(&mut Fx<'_>, Value, [Value; 3]),
) {
    let n = fx.i(c(ch_n));
    let (lo, hi) = part_range(fx, n);
    let count = fx.b.ins().isub(hi, lo);
    let off = fx.b.ins().imul_imm_s(lo, c(4 * plane));
    let q = p.map(|p| fx.add(p, off));
    let step = c(4 * plane);
    fx.loop_n(Count::Dyn(count), [lo, q[0], q[1], q[2]], [1, step, step, step], |fx, [ch, a, b, d]| {
        body(fx, ch, [a, b, d])
    });
}

/// Loops over the chunk's samples, each pointer advanced by one sample of `[C, plane]`.
fn for_samples_of(
    fx: &mut Fx<'_>,
    (ch_n, plane): (usize, usize),
    p: [Value; 3],
    body: impl FnOnce(&mut Fx<'_>, [Value; 3]),
) {
    let step = c(4 * ch_n * plane);
    fx.loop_n(Count::Dyn(fx.nb), p, [step; 3], body);
}

/// Operations per sample of a per-channel reduction over `[C, plane]` (what decides
/// whether threads share it, by channels).
pub(in crate::jit) fn reduction_work(ch_n: usize, plane: usize) -> u64 {
    8 * (ch_n * plane) as u64
}

/// `x [N, C, H, W] → [2, C]`: per-channel mean and biased variance, two passes (the mean,
/// then the squared deviations from it), summed as [`add_sums`] does. Threads share it by
/// channels.
pub(super) fn batch_stats(jit: &mut Jit, cx: &NodeCx<'_>) -> Result<()> {
    let (ch_n, h, w) = cx.in_chw(0)?;
    let plane = h * w;
    let (xs, os) = (cx.inputs[0], cx.output);
    jit.parallel_kernel(&cx.node.name, reduction_work(ch_n, plane), |fx| {
        let (x, out) = (fx.slot(xs), fx.slot(os));
        for_channels(fx, (ch_n, plane), [x, out, out], |fx, ch, [xc, _, _]| {
            let s = fx.acc_f64();
            let z = fx.vf(0.0);
            for_samples_of(fx, (ch_n, plane), [xc, xc, xc], |fx, [xp, _, _]| {
                add_sums(fx, [xp, xp], plane, z, [s], |fx, [p, _], _, lanes| [fx.load_partial(p, 0, lanes)]);
            });
            let sum = fx.b.use_var(s);
            let count = fx.muli(fx.nb, c(plane));
            let count = fx.int_to_f64(count);
            let mean = fx.b.ins().fdiv(sum, count);
            let m32 = fx.b.ins().fdemote(types::F32, mean);
            let mv = fx.b.ins().splat(V, m32);
            let q = fx.acc_f64();
            let step = c(4 * ch_n * plane);
            fx.loop_n(Count::Dyn(fx.nb), [xc, mv], [step, 0], |fx, [xp, mv]| {
                add_sums(fx, [xp, xp], plane, mv, [q], |fx, [p, _], mv, lanes| {
                    let v = fx.load_partial(p, 0, lanes);
                    let d = fx.b.ins().fsub(v, mv);
                    [fx.b.ins().fmul(d, d)]
                });
            });
            let qs = fx.b.use_var(q);
            let var = fx.b.ins().fdiv(qs, count);
            let out = fx.slot(os);
            fx.store_d(mean, out, ch);
            let vi = fx.addi(ch, c(ch_n));
            fx.store_d(var, out, vi);
        });
    })?;
    Ok(())
}

/// `(x, stats) → (x − mean)·(invstd·weight) + bias` on f32x4, the per-channel factors made
/// in f64 and rounded once. Sample-wise.
pub(super) fn bn_train(jit: &mut Jit, cx: &NodeCx<'_>, bn: &BatchNorm2d) -> Result<()> {
    let (ch_n, h, w) = cx.in_chw(0)?;
    let plane = h * w;
    let p = bn_params(jit, cx, bn, true)?;
    let (xs, ss, ys) = (cx.inputs[0], cx.inputs[1], cx.output);
    let eps = bn.eps;
    jit.kernel(&cx.node.name, |fx| {
        let (x, st, y) = (fx.slot(xs), fx.slot(ss), fx.slot(ys));
        let sample = c(4 * ch_n * plane);
        fx.loop_n(Count::Dyn(fx.nb), [x, y, st], [sample, sample, 0], |fx, [xn, yn, st]| {
            let zero = fx.i(0);
            let step = c(4 * plane);
            fx.loop_n(Count::Const(ch_n), [zero, xn, yn, st], [1, step, step, 0], |fx, [ch, xp, yp, st]| {
                let [mv, av, bv] = bn_train_factors(fx, p, (st, ch, ch_n), eps).map(|v| {
                    let v = fx.b.ins().fdemote(types::F32, v);
                    fx.b.ins().splat(V, v)
                });
                map_run(fx, [xp, xp], yp, plane, [mv, av, bv, bv], |fx, [v, _], [mv, av, bv, _]| {
                    let d = fx.b.ins().fsub(v, mv);
                    fx.fma(d, av, bv)
                });
            });
        });
    })?;
    Ok(())
}

/// `(x, stats, dy) → dx` (`input`) or `→ Σ dy·x̂` per channel (the weight's gradient), as
/// the interpreter's `bn_train_grad`: per channel the sums `Σ dy` and `Σ dy·(x − mean)`
/// ([`add_sums`]), then `dx = (dy − mean(dy) − (x − mean)·invstd·mean(dy·x̂))·weight·invstd`
/// on f32x4. Threads share it by channels.
pub(super) fn bn_train_grad(jit: &mut Jit, cx: &NodeCx<'_>, bn: &BatchNorm2d, input: bool) -> Result<()> {
    let (ch_n, h, w) = cx.in_chw(0)?;
    let plane = h * w;
    let p = if input { bn_params(jit, cx, bn, false)? } else { None };
    let (xs, ss, ds, os) = (cx.inputs[0], cx.inputs[1], cx.inputs[2], cx.output);
    let eps = bn.eps;
    jit.parallel_kernel(&cx.node.name, reduction_work(ch_n, plane), |fx| {
        let (x, dy, out) = (fx.slot(xs), fx.slot(ds), fx.slot(os));
        // The result's pointer advances by channel only for the input gradient.
        let ptrs = [x, dy, if input { out } else { x }];
        for_channels(fx, (ch_n, plane), ptrs, |fx, ch, [xc, dc, oc]| {
            let st = fx.slot(ss);
            let (mean, inv) = mean_invstd(fx, st, ch, ch_n, eps);
            let m32 = fx.b.ins().fdemote(types::F32, mean);
            let mv = fx.b.ins().splat(V, m32);
            let (sdy, sdx) = (fx.acc_f64(), fx.acc_f64());
            let step = c(4 * ch_n * plane);
            fx.loop_n(Count::Dyn(fx.nb), [xc, dc, mv], [step, step, 0], |fx, [xp, dp, mv]| {
                add_sums(fx, [xp, dp], plane, mv, [sdy, sdx], |fx, [xq, dq], mv, lanes| {
                    let d = fx.load_partial(dq, 0, lanes);
                    let v = fx.load_partial(xq, 0, lanes);
                    let xm = fx.b.ins().fsub(v, mv);
                    [d, fx.b.ins().fmul(d, xm)]
                });
            });
            let sum_dy = fx.b.use_var(sdy);
            let sum_dxm = fx.b.use_var(sdx);
            let sum_dyx = fx.b.ins().fmul(sum_dxm, inv);
            if !input {
                let out = fx.slot(os);
                fx.store_d(sum_dyx, out, ch);
                return;
            }
            let count = fx.muli(fx.nb, c(plane));
            let count = fx.int_to_f64(count);
            let factors = bn_grad_factors(fx, p.map(|p| p.0), (ch, inv), [sum_dy, sum_dxm], count);
            let [mdy, k, ginv] = factors.map(|v| {
                let v = fx.b.ins().fdemote(types::F32, v);
                fx.b.ins().splat(V, v)
            });
            // The factors are carried through the sample loop too.
            let step = c(4 * ch_n * plane);
            let vals = [xc, dc, oc, mv, mdy, k, ginv];
            fx.loop_n(Count::Dyn(fx.nb), vals, [step, step, step, 0, 0, 0, 0], |fx, [xp, dp, op, mv, mdy, k, ginv]| {
                let ms = [mv, mdy, k, ginv];
                map_run(fx, [xp, dp], op, plane, ms, |fx, [v, d], [mv, mdy, k, ginv]| {
                    let xm = fx.b.ins().fsub(v, mv);
                    let t = fx.b.ins().fsub(d, mdy);
                    let u = fx.b.ins().fmul(xm, k);
                    let t = fx.b.ins().fsub(t, u);
                    fx.b.ins().fmul(t, ginv)
                });
            });
        });
    })?;
    Ok(())
}

/// `1/sqrt(running_var + eps)` and `running_mean` per channel (refreshed with the weights).
fn running(jit: &mut Jit, cx: &NodeCx<'_>, mean: bool) -> Result<(i64, Option<i64>)> {
    let v = jit.consts.f32s(cx.param("running_var")?);
    let m = if mean { Some(jit.consts.f32s(cx.param("running_mean")?)) } else { None };
    Ok((v, m))
}

/// `sqrt(running_var[ch] + eps)` in f64.
fn running_sd(fx: &mut Fx<'_>, var: i64, ch: Value, eps: f64) -> Value {
    let base = fx.addr(var);
    let v = fx.load_d(base, ch);
    let e = fx.d(eps);
    let s = fx.b.ins().fadd(v, e);
    fx.b.ins().sqrt(s)
}

/// `(dy) → dy·(weight/sqrt(running_var + eps))` (eval-mode BatchNorm) on f32x4.
/// Sample-wise.
pub(super) fn bn_eval_input_grad(jit: &mut Jit, cx: &NodeCx<'_>, bn: &BatchNorm2d) -> Result<()> {
    let (ch_n, h, w) = cx.out_chw()?;
    let plane = h * w;
    let p = bn_params(jit, cx, bn, false)?;
    let (var, _) = running(jit, cx, false)?;
    let (ds, os) = (cx.inputs[0], cx.output);
    let eps = bn.eps;
    jit.kernel(&cx.node.name, |fx| {
        let (dy, out) = (fx.slot(ds), fx.slot(os));
        for_samples_of(fx, (ch_n, plane), [dy, out, out], |fx, [dn, on, _]| {
            let zero = fx.i(0);
            let step = c(4 * plane);
            fx.loop_n(Count::Const(ch_n), [zero, dn, on], [1, step, step], |fx, [ch, dp, op]| {
                let g = gamma(fx, p.map(|p| p.0), ch);
                let sd = running_sd(fx, var, ch, eps);
                let f = fx.b.ins().fdiv(g, sd);
                let f = fx.b.ins().fdemote(types::F32, f);
                let f = fx.b.ins().splat(V, f);
                map_run(fx, [dp, dp], op, plane, [f; 4], |fx, [d, _], [f, ..]| fx.b.ins().fmul(d, f));
            });
        });
    })?;
    Ok(())
}

/// `(x, dy) → Σ dy·(x − running_mean)/sqrt(running_var + eps)` per channel. Threads share
/// it by channels.
pub(super) fn bn_eval_weight_grad(jit: &mut Jit, cx: &NodeCx<'_>, bn: &BatchNorm2d) -> Result<()> {
    let (ch_n, h, w) = cx.in_chw(0)?;
    let plane = h * w;
    let (var, mean) = running(jit, cx, true)?;
    let mean = mean.ok_or_else(|| Error::Unsupported("running_mean".into()))?;
    let (xs, ds, os) = (cx.inputs[0], cx.inputs[1], cx.output);
    let eps = bn.eps;
    jit.parallel_kernel(&cx.node.name, reduction_work(ch_n, plane), |fx| {
        let (x, dy) = (fx.slot(xs), fx.slot(ds));
        for_channels(fx, (ch_n, plane), [x, dy, dy], |fx, ch, [xc, dc, _]| {
            let sd = running_sd(fx, var, ch, eps);
            let mb = fx.addr(mean);
            let m = fx.load_f_at(mb, ch);
            let mv = fx.b.ins().splat(V, m);
            let s = fx.acc_f64();
            let step = c(4 * ch_n * plane);
            fx.loop_n(Count::Dyn(fx.nb), [xc, dc, mv], [step, step, 0], |fx, [xp, dp, mv]| {
                add_sums(fx, [xp, dp], plane, mv, [s], |fx, [xq, dq], mv, lanes| {
                    let d = fx.load_partial(dq, 0, lanes);
                    let v = fx.load_partial(xq, 0, lanes);
                    let xm = fx.b.ins().fsub(v, mv);
                    [fx.b.ins().fmul(d, xm)]
                });
            });
            let r = fx.b.use_var(s);
            let r = fx.b.ins().fdiv(r, sd);
            let out = fx.slot(os);
            fx.store_d(r, out, ch);
        });
    })?;
    Ok(())
}

/// `for i in 0..nb·size { body(i) }`.
fn all(fx: &mut Fx<'_>, size: usize, body: impl FnOnce(&mut Fx<'_>, Value)) {
    let zero = fx.i(0);
    let end = fx.muli(fx.nb, c(size));
    fx.for_range(zero, end, 1, body);
}

/// `(x, mask) → x·mask` (f32, as the interpreter).
pub(super) fn dropout_mask(jit: &mut Jit, cx: &NodeCx<'_>) -> Result<()> {
    let size = cx.out_size();
    let (xs, ms, ys) = (cx.inputs[0], cx.inputs[1], cx.output);
    jit.kernel(&cx.node.name, |fx| {
        let (x, m, y) = (fx.slot(xs), fx.slot(ms), fx.slot(ys));
        all(fx, size, |fx, i| {
            let a = fx.elem(x, i);
            let a = fx.load_f(a, 0);
            let b = fx.elem(m, i);
            let b = fx.load_f(b, 0);
            let r = fx.b.ins().fmul(a, b);
            let d = fx.elem(y, i);
            fx.store_f(r, d, 0);
        });
    })?;
    Ok(())
}

/// `(y, dy) → dx` of an activation from its output, on f32x4 (ReLU passes `dy` where
/// `y > 0`; Sigmoid `dy·y·(1 − y)`; Tanh `dy·(1 − y²)`; Hardtanh `dy` where
/// `min < y < max`). Sample-wise.
pub(super) fn activation_grad(jit: &mut Jit, cx: &NodeCx<'_>, a: Activation) -> Result<()> {
    // The whole buffer: on the blocked layout (`y`, `dy` and the result alike) the padding
    // lanes too.
    let size = cx.out_len;
    let (ys, ds, os) = (cx.inputs[0], cx.inputs[1], cx.output);
    jit.kernel(&cx.node.name, |fx| {
        let (y, dy, out) = (fx.slot(ys), fx.slot(ds), fx.slot(os));
        let step = c(4 * size);
        fx.loop_n(Count::Dyn(fx.nb), [y, dy, out], [step; 3], |fx, [y, dy, out]| {
            let z = fx.vf(0.0);
            map_run(fx, [y, dy], out, size, [z; 4], |fx, [v, g], _| match a {
                Activation::Relu => {
                    let z = fx.vf(0.0);
                    let pos = fx.b.ins().fcmp(FloatCC::GreaterThan, v, z);
                    vsel(fx, pos, g, z)
                }
                Activation::Sigmoid => {
                    let one = fx.vf(1.0);
                    let t = fx.b.ins().fmul(g, v);
                    let u = fx.b.ins().fsub(one, v);
                    fx.b.ins().fmul(t, u)
                }
                Activation::Tanh => {
                    let one = fx.vf(1.0);
                    let vv = fx.b.ins().fmul(v, v);
                    let u = fx.b.ins().fsub(one, vv);
                    fx.b.ins().fmul(g, u)
                }
                Activation::LeakyRelu(slope) => {
                    // From the output: for a slope ≥ 0 (autodiff refuses others) y > 0 ⇔ x > 0.
                    let (z, k) = (fx.vf(0.0), fx.vf(slope.get()));
                    let pos = fx.b.ins().fcmp(FloatCC::GreaterThan, v, z);
                    let scaled = fx.b.ins().fmul(g, k);
                    vsel(fx, pos, g, scaled)
                }
                Activation::Hardtanh(lo, hi) => {
                    let (lo, hi, z) = (fx.vf(lo.get()), fx.vf(hi.get()), fx.vf(0.0));
                    let above = fx.b.ins().fcmp(FloatCC::GreaterThan, v, lo);
                    let g = vsel(fx, above, g, z);
                    let below = fx.b.ins().fcmp(FloatCC::LessThan, v, hi);
                    vsel(fx, below, g, z)
                }
            });
        });
    })?;
    Ok(())
}

/// `(dy) → [C]`: the sum over every dimension but per-sample axis `axis`. Threads share it
/// by channels.
pub(super) fn bias_grad(jit: &mut Jit, cx: &NodeCx<'_>, axis: usize) -> Result<()> {
    let dims = &cx.in_tys[0].dims;
    let ch_n = *dims.get(axis).ok_or_else(|| Error::Unsupported(format!("`{}`: bias axis", cx.node.name)))?;
    let inner: usize = dims[axis + 1..].iter().product();
    let outer: usize = dims[..axis].iter().product();
    let (ds, os) = (cx.inputs[0], cx.output);
    // Threads share it by channels.
    jit.parallel_kernel(&cx.node.name, reduction_work(ch_n, outer * inner), |fx| {
        let (dy, out) = (fx.slot(ds), fx.slot(os));
        let channels = fx.i(c(ch_n));
        let (lo, hi) = part_range(fx, channels);
        fx.for_range(lo, hi, 1, |fx, ch| {
            let s = fx.acc_f64();
            fx.for_samples(|fx, n| {
                fx.for_const(0, outer, 1, |fx, o| {
                    let base = fx.lin(&[(n, c(outer * ch_n * inner)), (o, c(ch_n * inner)), (ch, c(inner))], 0);
                    if inner >= 8 {
                        // A plane: summed in f32 lanes, then added in f64.
                        let p = fx.elem(dy, base);
                        let v = fx.sum_run(p, inner);
                        let v = fx.b.ins().fpromote(types::F64, v);
                        fx.accumulate(s, v);
                    } else {
                        each(fx, base, inner, |fx, i| {
                            let v = fx.load_d(dy, i);
                            fx.accumulate(s, v);
                        });
                    }
                });
            });
            let r = fx.b.use_var(s);
            fx.store_d(r, out, ch);
        });
    })?;
    Ok(())
}

/// `(dy) → dy[…, start..start + len, …]` along `dim` (counting the batch).
pub(super) fn slice(jit: &mut Jit, cx: &NodeCx<'_>, dim: usize, start: usize, len: usize) -> Result<()> {
    let dims = &cx.in_tys[0].dims;
    if dim == 0 || dim > dims.len() || start + len > dims[dim - 1] {
        return Err(Error::Unsupported(format!("`{}`: the slice is out of range", cx.node.name)));
    }
    let inner: usize = dims[dim..].iter().product();
    let outer: usize = dims[..dim - 1].iter().product();
    let full = dims[dim - 1];
    let (ds, os) = (cx.inputs[0], cx.output);
    jit.kernel(&cx.node.name, |fx| {
        let (dy, out) = (fx.slot(ds), fx.slot(os));
        fx.for_samples(|fx, n| {
            fx.for_const(0, outer, 1, |fx, o| {
                let src = fx.lin(&[(n, c(outer * full * inner)), (o, c(full * inner))], c(start * inner));
                let dst = fx.lin(&[(n, c(outer * len * inner)), (o, c(len * inner))], 0);
                fx.for_const(0, len * inner, 1, |fx, i| {
                    let a = fx.add(src, i);
                    let a = fx.elem(dy, a);
                    let v = fx.load_f(a, 0);
                    let b = fx.add(dst, i);
                    let b = fx.elem(out, b);
                    fx.store_f(v, b, 0);
                });
            });
        });
    })?;
    Ok(())
}

/// `(x, dy) → dx` of a mean (`dy / count`) or amax (`dy` shared equally by the maxima).
/// Scratch: the kept maxima and tie counts of one sample.
pub(super) fn reduce_grad(jit: &mut Jit, cx: &NodeCx<'_>, r: &Reduce) -> Result<()> {
    let shape = &cx.in_tys[0].dims;
    let mut dims = r.dims.clone();
    dims.sort_unstable();
    dims.dedup();
    if dims.iter().any(|d| *d == 0 || *d > shape.len()) {
        return Err(Error::Unsupported(format!("`{}`: a reduced dim is out of range", cx.node.name)));
    }
    let numel: usize = shape.iter().product();
    let kept_dims: Vec<usize> =
        shape.iter().enumerate().map(|(i, s)| if dims.contains(&(i + 1)) { 1 } else { *s }).collect();
    let kept: usize = kept_dims.iter().product();
    let count: usize = dims.iter().map(|d| shape[d - 1]).product();
    // Each element's kept index (row-major over the kept dims).
    let mut map = Vec::with_capacity(numel);
    for e in 0..numel {
        let (mut rem, mut k, mut stride) = (e, 0, 1);
        for (i, s) in shape.iter().enumerate().rev() {
            let idx = rem % s;
            rem /= s;
            if !dims.contains(&(i + 1)) {
                k += idx * stride;
                stride *= s;
            }
        }
        map.push(i32::try_from(k).map_err(|_| Error::Unsupported("a reduction too large".into()))?);
    }
    let map = jit.consts.i32s(map);
    let kind = r.kind;
    let scratch = cx.scratch;
    let (xs, ds, os) = (cx.inputs[0], cx.inputs[1], cx.output);
    if kind == ReduceKind::Max && scratch.is_none() {
        cx.scratch_slot()?;
    }
    jit.kernel(&cx.node.name, |fx| {
        let (x, dy, out) = (fx.slot(xs), fx.slot(ds), fx.slot(os));
        let mp = fx.addr(map);
        let sc = scratch.map(|s| fx.slot(s));
        fx.for_samples(|fx, n| {
            let xb = fx.muli(n, c(numel));
            let kb = fx.muli(n, c(kept));
            let kidx = |fx: &mut Fx<'_>, e: Value| {
                let k = fx.load_i32_at(mp, e);
                fx.add(kb, k)
            };
            match (kind, sc) {
                (ReduceKind::Mean, _) => {
                    let cnt = fx.d(count as f64);
                    fx.for_const(0, numel, 1, |fx, e| {
                        let k = kidx(fx, e);
                        let g = fx.load_d(dy, k);
                        let v = fx.b.ins().fdiv(g, cnt);
                        let at = fx.add(xb, e);
                        fx.store_d(v, out, at);
                    });
                }
                (ReduceKind::Max, Some(sc)) => {
                    // scratch: [kept] maxima, then [kept] tie counts.
                    let ninf = fx.f(f32::NEG_INFINITY);
                    let zero = fx.f(0.0);
                    fx.for_const(0, kept, 1, |fx, k| {
                        let a = fx.elem(sc, k);
                        fx.store_f(ninf, a, 0);
                        fx.store_f(zero, a, c(kept));
                    });
                    fx.for_const(0, numel, 1, |fx, e| {
                        let k = fx.load_i32_at(mp, e);
                        let at = fx.add(xb, e);
                        let a = fx.elem(x, at);
                        let v = fx.load_f(a, 0);
                        let m = fx.load_f_mut(sc, k);
                        let gt = fx.b.ins().fcmp(FloatCC::GreaterThan, v, m);
                        let nan = fx.b.ins().fcmp(FloatCC::Unordered, v, v);
                        let take = fx.b.ins().bor(gt, nan);
                        let nm = fx.b.ins().select(take, v, m);
                        let p = fx.elem(sc, k);
                        fx.store_f(nm, p, 0);
                    });
                    let one = fx.f(1.0);
                    fx.for_const(0, numel, 1, |fx, e| {
                        let k = fx.load_i32_at(mp, e);
                        let at = fx.add(xb, e);
                        let a = fx.elem(x, at);
                        let v = fx.load_f(a, 0);
                        let m = fx.load_f_mut(sc, k);
                        let eq = fx.b.ins().fcmp(FloatCC::Equal, v, m);
                        let inc = fx.b.ins().select(eq, one, zero);
                        let ti = fx.addi(k, c(kept));
                        let t = fx.load_f_mut(sc, ti);
                        let t = fx.b.ins().fadd(t, inc);
                        let p = fx.elem(sc, ti);
                        fx.store_f(t, p, 0);
                    });
                    fx.for_const(0, numel, 1, |fx, e| {
                        let k = fx.load_i32_at(mp, e);
                        let at = fx.add(xb, e);
                        let a = fx.elem(x, at);
                        let v = fx.load_f(a, 0);
                        let m = fx.load_f_mut(sc, k);
                        let eq = fx.b.ins().fcmp(FloatCC::Equal, v, m);
                        let ti = fx.addi(k, c(kept));
                        let t = fx.load_f_mut(sc, ti);
                        let gk = fx.add(kb, k);
                        let ga = fx.elem(dy, gk);
                        let g = fx.load_f(ga, 0);
                        let q = fx.b.ins().fdiv(g, t);
                        let r = fx.b.ins().select(eq, q, zero);
                        let o = fx.elem(out, at);
                        fx.store_f(r, o, 0);
                    });
                }
                (ReduceKind::Max, None) => {}
            }
        });
    })?;
    Ok(())
}

fn sigmoid(fx: &mut Fx<'_>, v: Value) -> Value {
    let one = fx.d(1.0);
    let zero = fx.d(0.0);
    let nv = fx.b.ins().fneg(v);
    let e_neg = fx.call_f64(exp_f64 as *const () as usize, &[nv]);
    let e_pos = fx.call_f64(exp_f64 as *const () as usize, &[v]);
    let d1 = fx.b.ins().fadd(one, e_neg);
    let a = fx.b.ins().fdiv(one, d1);
    let d2 = fx.b.ins().fadd(one, e_pos);
    let b = fx.b.ins().fdiv(e_pos, d2);
    let pos = fx.b.ins().fcmp(FloatCC::GreaterThanOrEqual, v, zero);
    fx.b.ins().select(pos, a, b)
}

fn softplus(fx: &mut Fx<'_>, v: Value) -> Value {
    let zero = fx.d(0.0);
    let m = fx.b.ins().fmax(v, zero);
    let a = fx.b.ins().fabs(v);
    let na = fx.b.ins().fneg(a);
    let e = fx.call_f64(exp_f64 as *const () as usize, &[na]);
    let l = fx.call_f64(ln_1p_f64 as *const () as usize, &[e]);
    fx.b.ins().fadd(m, l)
}

/// A loss (`grad = false`: `[1]`) or its gradient with respect to the prediction, as the
/// interpreter computes them (f64, same order).
pub(super) fn loss(jit: &mut Jit, cx: &NodeCx<'_>, l: &Loss, grad: bool) -> Result<()> {
    let size = cx.in_tys[0].numel_per_sample();
    let reduction = match l {
        Loss::Mse { reduction } | Loss::CrossEntropy { reduction, .. } | Loss::BceWithLogits { reduction, .. } => {
            *reduction
        }
    };
    let pos_weight = match l {
        Loss::BceWithLogits { pos_weight: Some(p), .. } => {
            Some(jit.consts.i64s(p.iter().map(|v| v.to_bits() as i64).collect()))
        }
        _ => None,
    };
    let last = cx.in_tys[0].dims.last().copied().unwrap_or(1).max(1);
    let l = l.clone();
    let (ps, ts, os) = (cx.inputs[0], cx.inputs[1], cx.output);
    jit.kernel(&cx.node.name, |fx| {
        let (p, t, out) = (fx.slot(ps), fx.slot(ts), fx.slot(os));
        let divisor = match l {
            Loss::CrossEntropy { .. } => fx.nb,
            _ => fx.muli(fx.nb, c(size)),
        };
        let scale = match reduction {
            Reduction::Mean => {
                let one = fx.d(1.0);
                let dv = fx.int_to_f64(divisor);
                fx.b.ins().fdiv(one, dv)
            }
            Reduction::Sum => fx.d(1.0),
        };
        let total = fx.acc_f64();
        match &l {
            Loss::Mse { .. } => all(fx, size, |fx, i| {
                let a = fx.load_d(p, i);
                let b = fx.load_d(t, i);
                let d = fx.b.ins().fsub(a, b);
                let dd = fx.b.ins().fmul(d, d);
                fx.accumulate(total, dd);
                if grad {
                    let two = fx.d(2.0);
                    let g = fx.b.ins().fmul(two, d);
                    let g = fx.b.ins().fmul(g, scale);
                    fx.store_d(g, out, i);
                }
            }),
            Loss::CrossEntropy { label_smoothing, .. } => {
                let classes = size;
                let eps = *label_smoothing;
                fx.for_samples(|fx, s| {
                    let row = fx.muli(s, c(classes));
                    let tv = fx.load_d(t, s);
                    let (max, sum) = max_and_sum_exp(fx, p, classes, |fx, j| fx.add(row, j));
                    let ln = fx.call_f64(ln_f64 as *const () as usize, &[sum]);
                    let lse = fx.b.ins().fadd(max, ln);
                    fx.for_const(0, classes, 1, |fx, j| {
                        let jd = fx.int_to_f64(j);
                        let is = fx.b.ins().fcmp(FloatCC::Equal, jd, tv);
                        let hit = fx.d(1.0 - eps);
                        let miss = fx.d(0.0);
                        let q = fx.b.ins().select(is, hit, miss);
                        let smooth = fx.d(eps / classes as f64);
                        let q = fx.b.ins().fadd(q, smooth);
                        let at = fx.add(row, j);
                        let v = fx.load_d(p, at);
                        let logp = fx.b.ins().fsub(v, lse);
                        let ql = fx.b.ins().fmul(q, logp);
                        let ql = fx.b.ins().fneg(ql);
                        fx.accumulate(total, ql);
                        if grad {
                            let e = fx.call_f64(exp_f64 as *const () as usize, &[logp]);
                            let g = fx.b.ins().fsub(e, q);
                            let g = fx.b.ins().fmul(g, scale);
                            fx.store_d(g, out, at);
                        }
                    });
                });
            }
            Loss::BceWithLogits { .. } => all(fx, size, |fx, i| {
                let x = fx.load_d(p, i);
                let y = fx.load_d(t, i);
                let one = fx.d(1.0);
                let lw = match pos_weight {
                    Some(a) => {
                        let base = fx.addr(a);
                        let k = fx.b.ins().urem_imm_u(i, c(last));
                        let pw = fx.load_f64_const(base, k);
                        let pm = fx.b.ins().fsub(pw, one);
                        let t = fx.b.ins().fmul(pm, y);
                        fx.b.ins().fadd(one, t)
                    }
                    None => {
                        let z = fx.d(0.0);
                        let t = fx.b.ins().fmul(z, y);
                        fx.b.ins().fadd(one, t)
                    }
                };
                let omy = fx.b.ins().fsub(one, y);
                let nx = fx.b.ins().fneg(x);
                let a = fx.b.ins().fmul(omy, x);
                let sp = softplus(fx, nx);
                let b = fx.b.ins().fmul(lw, sp);
                let term = fx.b.ins().fadd(a, b);
                fx.accumulate(total, term);
                if grad {
                    let sg = sigmoid(fx, nx);
                    let u = fx.b.ins().fmul(lw, sg);
                    let g = fx.b.ins().fsub(omy, u);
                    let g = fx.b.ins().fmul(g, scale);
                    fx.store_d(g, out, i);
                }
            }),
        }
        if !grad {
            let tot = fx.b.use_var(total);
            let r = fx.b.ins().fmul(tot, scale);
            let zero = fx.i(0);
            fx.store_d(r, out, zero);
        }
    })?;
    Ok(())
}
