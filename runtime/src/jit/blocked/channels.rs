//! Per-channel and layout kernels on blocked tensors ([`Layout::Blocked`],
//! `[⌈C/16⌉, H, W, 16]`): BatchNorm2d as a per-channel scale and shift, channel
//! concatenation of whole blocks, the reorders between the blocked and the plain layout, and
//! a training graph's Conv2d bias gradient from a blocked output gradient ([`bias_grad`]).
//! BatchNorm splits its work between threads by output rows.

use crate::error::{Error, Result};
use crate::jit::codegen::part_range;
use crate::jit::codegen::{Count, Jit, LANES, c};
use crate::jit::cx::NodeCx;
use crate::jit::eltwise::{batchnorm_affine, copy_run};
use crate::jit::plan::{BLOCK, Layout};
use cnnc_compiler::ops::BatchNorm2d;
use cranelift_codegen::ir::{InstBuilder, Value};

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
            // Channel `16·blk + l`, clamped to the last channel: lanes past it (the padding
            // of the last block) are stored first, in reverse, so the real lane's value is
            // the one that stays.
            let base = fx.b.ins().imul_imm_s(blk, c(BLOCK));
            let last = fx.i(c(ch - 1));
            for (l, s) in sums.iter().enumerate().rev() {
                let r = fx.b.use_var(*s);
                let r = fx.b.ins().fdemote(types::F32, r);
                let ch_l = fx.b.ins().iadd_imm_s(base, c(l));
                let ch_l = fx.b.ins().umin(ch_l, last);
                let at = fx.elem(out, ch_l);
                fx.store_f(r, at, 0);
            }
        });
    })?;
    Ok(())
}
