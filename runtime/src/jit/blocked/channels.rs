//! Per-channel and layout kernels on blocked tensors ([`Layout::Blocked`],
//! `[⌈C/16⌉, H, W, 16]`): BatchNorm2d as a per-channel scale and shift, channel
//! concatenation of whole blocks, the reorders between the blocked and the plain layout, and
//! in training graphs a Conv2d's bias gradient from a blocked output gradient
//! ([`bias_grad`]) and train-mode BatchNorm ([`batch_stats`], [`bn_train`],
//! [`bn_train_grad`]): vectors across a block's channels, per-channel totals in f64.
//! BatchNorm splits its work between threads by output rows.

use super::common::{block_rows, unblock_rows};
use crate::error::{Error, Result};
use crate::jit::codegen::part_range;
use crate::jit::codegen::{Count, Fx, Jit, LANES, V, c};
use crate::jit::cx::NodeCx;
use crate::jit::eltwise::{batchnorm_affine, copy_run};
use crate::jit::plan::{BLOCK, Layout};
use cnnc_compiler::ops::BatchNorm2d;
use cranelift_codegen::ir::{InstBuilder, Value, types};
use cranelift_frontend::Variable;

/// Vectors per block.
const VB: usize = BLOCK / LANES;

/// BatchNorm2d on a blocked tensor: `y = x·scale[c] + shift[c]`, the parameters four
/// vectors per block (zero in the padding lanes, which so stay zero-based and finite).
pub(in crate::jit) fn batchnorm(jit: &mut Jit, cx: &NodeCx<'_>, bn: &BatchNorm2d) -> Result<()> {
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
pub(in crate::jit) fn concat(jit: &mut Jit, cx: &NodeCx<'_>) -> Result<()> {
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
pub(in crate::jit) fn reorder(jit: &mut Jit, (from, lf): (usize, Layout), (to, lt): (usize, Layout)) -> Result<()> {
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
            // Channel k: plane k of the plain tensor, lane k mod 16 of block k / 16; four
            // channels of four pixels at a time.
            if to_blocked {
                block_rows(fx, xn, yn, ch, (plane, plane * BLOCK, BLOCK), plane, true);
            } else {
                unblock_rows(fx, xn, yn, ch, (plane, plane * BLOCK), plane);
            }
        });
    })?;
    Ok(())
}

/// `dy → Σ_{samples, pixels} dy` per channel of a blocked `dy` (a Conv2d's bias gradient):
/// per sample and block, the plane's pixels summed in f32 lanes (a vector per four
/// channels), the samples' sums added in f64 — as the plain kernel sums a plane in f32 and
/// the planes in f64. Threads share it by blocks.
pub(in crate::jit) fn bias_grad(jit: &mut Jit, cx: &NodeCx<'_>) -> Result<()> {
    use cranelift_codegen::ir::types;
    let (ch, h, w) = cx.in_chw(0)?;
    let plane = h * w;
    let cb = ch.div_ceil(BLOCK);
    let (ds, os) = (cx.inputs[0], cx.output);
    let len = cx.in_lens[0];
    let work = 8 * (ch * plane) as u64;
    jit.parallel_kernel(&cx.node.name, work, |fx| {
        let (dy, out) = (fx.slot(ds), fx.slot(os));
        let blocks = fx.i(c(cb));
        let (lo, hi) = part_range(fx, blocks);
        fx.for_range(lo, hi, 1, |fx, blk| {
            let sums: Vec<_> = (0..BLOCK).map(|_| fx.acc_f64()).collect();
            let first = fx.elem_scaled(dy, blk, c(plane * BLOCK));
            fx.loop_n(Count::Dyn(fx.nb), [first], [c(4 * len)], |fx, [p]| {
                let z = fx.vf(0.0);
                let accs: Vec<_> = (0..VB).map(|_| fx.var(crate::jit::codegen::V, z)).collect();
                fx.loop_n(Count::Const(plane), [p], [c(4 * BLOCK)], |fx, [q]| {
                    for (k, a) in accs.iter().enumerate() {
                        let v = fx.load_v(q, c(LANES * k));
                        let cur = fx.b.use_var(*a);
                        let s = fx.b.ins().fadd(cur, v);
                        fx.b.def_var(*a, s);
                    }
                });
                for (k, a) in accs.iter().enumerate() {
                    let v = fx.b.use_var(*a);
                    for l in 0..LANES {
                        let x = fx.b.ins().extractlane(v, l as u8);
                        let x = fx.b.ins().fpromote(types::F64, x);
                        fx.accumulate(sums[k * LANES + l], x);
                    }
                }
            });
            // In reverse lane order ([`lane_channel`]).
            for (l, s) in sums.iter().enumerate().rev() {
                let r = fx.b.use_var(*s);
                let chl = lane_channel(fx, blk, l, ch);
                fx.store_d(r, out, chl);
            }
        });
    })?;
    Ok(())
}

/// What [`block_totals`] sums: `K` terms from a pixel's `[x, dy]` vectors of one quad of
/// channels, the constants pointer and the quad.
type Terms<'t, const K: usize> = dyn Fn(&mut Fx<'_>, [Value; 2], Value, usize) -> [Value; K] + 't;

/// Per-channel f64 totals, over the samples and pixels of one block of 16 channels, of `K`
/// terms `terms(fx, [x, dy] vectors, constants, quad)` makes from the block's four-channel
/// vectors (`constants`: a pointer carried through the loops, for per-channel vectors the
/// terms read). The terms are summed in f32 lanes over chunks of 16 pixels, then each lane
/// into its channel's f64 total — as the plain kernels sum a plane's chunks.
fn block_totals<const K: usize>(
    fx: &mut Fx<'_>,
    base: [Value; 2],
    sample: [usize; 2],
    plane: usize,
    consts: Value,
    terms: &Terms<'_, K>,
) -> Vec<[Variable; K]> {
    const CHUNK: usize = 16;
    let totals: Vec<[Variable; K]> = (0..BLOCK).map(|_| std::array::from_fn(|_| fx.acc_f64())).collect();
    let chunk = |fx: &mut Fx<'_>, [p0, p1, k]: [Value; 3], count: usize| {
        let lanes: Vec<[Variable; K]> = (0..VB)
            .map(|_| {
                std::array::from_fn(|_| {
                    let z = fx.vf(0.0);
                    fx.var(V, z)
                })
            })
            .collect();
        let step = c(4 * BLOCK);
        fx.loop_n(Count::Const(count), [p0, p1, k], [step, step, 0], |fx, [q0, q1, k]| {
            for (quad, acc) in lanes.iter().enumerate() {
                let xv = fx.load_v(q0, c(LANES * quad));
                let dv = fx.load_v(q1, c(LANES * quad));
                for (a, t) in acc.iter().zip(terms(fx, [xv, dv], k, quad)) {
                    let cur = fx.b.use_var(*a);
                    let s = fx.b.ins().fadd(cur, t);
                    fx.b.def_var(*a, s);
                }
            }
        });
        for (quad, acc) in lanes.iter().enumerate() {
            for (t, a) in acc.iter().enumerate() {
                let v = fx.b.use_var(*a);
                for j in 0..LANES {
                    let x = fx.b.ins().extractlane(v, j as u8);
                    let x = fx.b.ins().fpromote(types::F64, x);
                    fx.accumulate(totals[quad * LANES + j][t], x);
                }
            }
        }
    };
    let steps = [c(4 * sample[0]), c(4 * sample[1]), 0];
    fx.loop_n(Count::Dyn(fx.nb), [base[0], base[1], consts], steps, |fx, [p0, p1, k]| {
        let full = plane / CHUNK;
        let step = c(4 * BLOCK * CHUNK);
        fx.loop_n(Count::Const(full), [p0, p1, k], [step, step, 0], |fx, v| chunk(fx, v, CHUNK));
        if !plane.is_multiple_of(CHUNK) {
            let off = c(4 * BLOCK * CHUNK * full);
            let v = [fx.addi(p0, off), fx.addi(p1, off), k];
            chunk(fx, v, plane % CHUNK);
        }
    });
    totals
}

/// Channel `16·blk + j`, clamped to the last of `ch` (a partial last block's padding lanes
/// read and write the last channel; its stores go in reverse lane order, so the real
/// lane's value is the one that stays).
fn lane_channel(fx: &mut Fx<'_>, blk: Value, j: usize, ch: usize) -> Value {
    let base = fx.b.ins().imul_imm_s(blk, c(BLOCK));
    let chj = fx.b.ins().iadd_imm_s(base, c(j));
    let last = fx.i(c(ch - 1));
    fx.b.ins().umin(chj, last)
}

/// A training graph's `x → [2, C]` (per-channel mean and biased variance) of a blocked `x`:
/// two passes, the mean, then the squared deviations from it (rounded to f32 as the plain
/// kernel's), totalled per channel in f64 ([`block_totals`]). Threads share it by blocks.
pub(in crate::jit) fn batch_stats(jit: &mut Jit, cx: &NodeCx<'_>) -> Result<()> {
    use crate::jit::eltwise_grad::reduction_work;
    let (ch, h, w) = cx.in_chw(0)?;
    let plane = h * w;
    let cb = ch.div_ceil(BLOCK);
    let (xs, os, xl) = (cx.inputs[0], cx.output, cx.in_lens[0]);
    jit.parallel_kernel(&cx.node.name, reduction_work(ch, plane), |fx| {
        let x = fx.slot(xs);
        let blocks = fx.i(c(cb));
        let (lo, hi) = part_range(fx, blocks);
        let consts = fx.stack_floats(BLOCK);
        fx.for_range(lo, hi, 1, |fx, blk| {
            let xb = fx.elem_scaled(x, blk, c(plane * BLOCK));
            let s = block_totals::<1>(fx, [xb, xb], [xl, xl], plane, consts, &|_, [v, _], _, _| [v]);
            let count = fx.muli(fx.nb, c(plane));
            let count = fx.int_to_f64(count);
            let means: Vec<Value> = s
                .iter()
                .enumerate()
                .map(|(j, t)| {
                    let sum = fx.b.use_var(t[0]);
                    let mean = fx.b.ins().fdiv(sum, count);
                    let m32 = fx.b.ins().fdemote(types::F32, mean);
                    fx.store_f(m32, consts, c(j));
                    mean
                })
                .collect();
            let q = block_totals::<1>(fx, [xb, xb], [xl, xl], plane, consts, &|fx, [v, _], k, quad| {
                let m = fx.load_v_mut(k, c(LANES * quad));
                let d = fx.b.ins().fsub(v, m);
                [fx.b.ins().fmul(d, d)]
            });
            let out = fx.slot(os);
            for j in (0..BLOCK).rev() {
                let qs = fx.b.use_var(q[j][0]);
                let var = fx.b.ins().fdiv(qs, count);
                let chj = lane_channel(fx, blk, j, ch);
                fx.store_d(means[j], out, chj);
                let vi = fx.b.ins().iadd_imm_s(chj, c(ch));
                fx.store_d(var, out, vi);
            }
        });
    })?;
    Ok(())
}

/// A training graph's `(x, stats) → (x − mean)·(invstd·weight) + bias` of a blocked `x`
/// (blocked result), the per-channel factors made in f64 and rounded once, as the plain
/// kernel does. Sample-wise.
pub(in crate::jit) fn bn_train(jit: &mut Jit, cx: &NodeCx<'_>, bn: &BatchNorm2d) -> Result<()> {
    use crate::jit::eltwise_grad::{bn_params, bn_train_factors};
    let (ch, h, w) = cx.in_chw(0)?;
    let plane = h * w;
    let cb = ch.div_ceil(BLOCK);
    let p = bn_params(jit, cx, bn, true)?;
    let (xs, ss, ys) = (cx.inputs[0], cx.inputs[1], cx.output);
    let (xl, yl) = (cx.in_lens[0], cx.out_len);
    let eps = bn.eps;
    jit.kernel(&cx.node.name, |fx| {
        let (x, st, y) = (fx.slot(xs), fx.slot(ss), fx.slot(ys));
        let consts = fx.stack_floats(3 * BLOCK);
        fx.for_const(0, cb, 1, |fx, blk| {
            for j in 0..BLOCK {
                let chj = lane_channel(fx, blk, j, ch);
                for (k, v) in bn_train_factors(fx, p, (st, chj, ch), eps).into_iter().enumerate() {
                    let v = fx.b.ins().fdemote(types::F32, v);
                    fx.store_f(v, consts, c(k * BLOCK + j));
                }
            }
            let f: Vec<Value> = (0..3 * VB).map(|i| fx.load_v_mut(consts, c(LANES * i))).collect();
            let f: [Value; 3 * VB] = std::array::from_fn(|i| f[i]);
            let xb = fx.elem_scaled(x, blk, c(plane * BLOCK));
            let yb = fx.elem_scaled(y, blk, c(plane * BLOCK));
            let mut vals = [xb; 2 + 3 * VB];
            vals[1] = yb;
            vals[2..].copy_from_slice(&f);
            let mut steps = [0; 2 + 3 * VB];
            steps[0] = c(4 * xl);
            steps[1] = c(4 * yl);
            fx.loop_n(Count::Dyn(fx.nb), vals, steps, |fx, vals| {
                let mut steps = [0; 2 + 3 * VB];
                steps[0] = c(4 * BLOCK);
                steps[1] = c(4 * BLOCK);
                fx.loop_n(Count::Const(plane), vals, steps, |fx, v| {
                    for quad in 0..VB {
                        let xv = fx.load_v(v[0], c(LANES * quad));
                        let (m, a, b) = (v[2 + quad], v[2 + VB + quad], v[2 + 2 * VB + quad]);
                        let d = fx.b.ins().fsub(xv, m);
                        let r = fx.fma(d, a, b);
                        fx.store_v(r, v[1], c(LANES * quad));
                    }
                });
            });
        });
    })?;
    Ok(())
}

/// A training graph's `(x, stats, dy) → dx` (`input`, blocked) or `→ Σ dy·x̂` per channel
/// (the weight's gradient) of blocked `x` and `dy`, as the plain kernel: per channel `Σ dy`
/// and `Σ dy·(x − mean)` ([`block_totals`]), then `dx = (dy − mean(dy) − (x − mean)·invstd·
/// mean(dy·x̂))·weight·invstd`. Threads share it by blocks.
pub(in crate::jit) fn bn_train_grad(jit: &mut Jit, cx: &NodeCx<'_>, bn: &BatchNorm2d, input: bool) -> Result<()> {
    use crate::jit::eltwise_grad::{bn_grad_factors, bn_params, mean_invstd, reduction_work};
    let (ch, h, w) = cx.in_chw(0)?;
    let plane = h * w;
    let cb = ch.div_ceil(BLOCK);
    let p = if input { bn_params(jit, cx, bn, false)? } else { None };
    let (xs, ss, ds, os) = (cx.inputs[0], cx.inputs[1], cx.inputs[2], cx.output);
    let (xl, dl, ol) = (cx.in_lens[0], cx.in_lens[2], cx.out_len);
    let eps = bn.eps;
    jit.parallel_kernel(&cx.node.name, reduction_work(ch, plane), |fx| {
        let (x, dy, st) = (fx.slot(xs), fx.slot(ds), fx.slot(ss));
        let blocks = fx.i(c(cb));
        let (lo, hi) = part_range(fx, blocks);
        let consts = fx.stack_floats(4 * BLOCK);
        fx.for_range(lo, hi, 1, |fx, blk| {
            let mi: Vec<(Value, Value)> = (0..BLOCK)
                .map(|j| {
                    let chj = lane_channel(fx, blk, j, ch);
                    let (mean, inv) = mean_invstd(fx, st, chj, ch, eps);
                    let m32 = fx.b.ins().fdemote(types::F32, mean);
                    fx.store_f(m32, consts, c(j));
                    (chj, inv)
                })
                .collect();
            let xb = fx.elem_scaled(x, blk, c(plane * BLOCK));
            let db = fx.elem_scaled(dy, blk, c(plane * BLOCK));
            let t = block_totals::<2>(fx, [xb, db], [xl, dl], plane, consts, &|fx, [v, d], k, quad| {
                let m = fx.load_v_mut(k, c(LANES * quad));
                let xm = fx.b.ins().fsub(v, m);
                [d, fx.b.ins().fmul(d, xm)]
            });
            if !input {
                let out = fx.slot(os);
                for j in (0..BLOCK).rev() {
                    let sum_dxm = fx.b.use_var(t[j][1]);
                    let sum_dyx = fx.b.ins().fmul(sum_dxm, mi[j].1);
                    let chj = lane_channel(fx, blk, j, ch);
                    fx.store_d(sum_dyx, out, chj);
                }
                return;
            }
            let count = fx.muli(fx.nb, c(plane));
            let count = fx.int_to_f64(count);
            for (j, &(chj, inv)) in mi.iter().enumerate() {
                let sums = [fx.b.use_var(t[j][0]), fx.b.use_var(t[j][1])];
                let factors = bn_grad_factors(fx, p.map(|p| p.0), (chj, inv), sums, count);
                for (i, v) in factors.into_iter().enumerate() {
                    let v = fx.b.ins().fdemote(types::F32, v);
                    fx.store_f(v, consts, c((i + 1) * BLOCK + j));
                }
            }
            let f: Vec<Value> = (0..4 * VB).map(|i| fx.load_v_mut(consts, c(LANES * i))).collect();
            let out = fx.slot(os);
            let ob = fx.elem_scaled(out, blk, c(plane * BLOCK));
            let mut vals = [xb; 3 + 4 * VB];
            vals[1] = db;
            vals[2] = ob;
            vals[3..].copy_from_slice(&f);
            let mut steps = [0; 3 + 4 * VB];
            steps[..3].copy_from_slice(&[c(4 * xl), c(4 * dl), c(4 * ol)]);
            fx.loop_n(Count::Dyn(fx.nb), vals, steps, |fx, vals| {
                let mut steps = [0; 3 + 4 * VB];
                steps[..3].copy_from_slice(&[c(4 * BLOCK); 3]);
                fx.loop_n(Count::Const(plane), vals, steps, |fx, v| {
                    for quad in 0..VB {
                        let xv = fx.load_v(v[0], c(LANES * quad));
                        let dv = fx.load_v(v[1], c(LANES * quad));
                        let [mv, mdy, k, ginv] = std::array::from_fn(|i| v[3 + i * VB + quad]);
                        let xm = fx.b.ins().fsub(xv, mv);
                        let t = fx.b.ins().fsub(dv, mdy);
                        let u = fx.b.ins().fmul(xm, k);
                        let t = fx.b.ins().fsub(t, u);
                        let r = fx.b.ins().fmul(t, ginv);
                        fx.store_v(r, v[2], c(LANES * quad));
                    }
                });
            });
        });
    })?;
    Ok(())
}
