//! Conv2d backward on plain NCHW tensors, for every stride, dilation, group count and
//! padding mode: the input gradient (scatter into the padded input's gradient, then each
//! padded position added to the source pixel it was read from — dropped for zeros,
//! mirrored, clamped or wrapped for reflect, replicate and circular) and the weight
//! gradient (a reduction over samples and pixels of the padded input times the output
//! gradient). Sums in f64 in the interpreter's order, rounded once; scalar loops, used
//! without a micro-kernel ISA (`Options::portable`; with one, `blocked/gemm_grad.rs`).

use crate::error::{Error, Result};
use crate::jit::codegen::{Jit, c};
use crate::jit::cx::NodeCx;
use crate::jit::tables::axis_table;
use cnnc_compiler::ops::Conv2d;
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{InstBuilder, types};

/// Per padded coordinate, the source index it reads (or −1 for a zero).
fn sources(conv: &Conv2d, pad: usize, input: usize, padded: usize) -> Result<Vec<i32>> {
    axis_table(padded, 1, 1, 1, pad, input, conv.padding_mode)
}

/// The inverse of [`sources`] as CSR: for source `i`, the padded coordinates
/// `list[start[i]..start[i + 1]]` (ascending) that read it.
fn preimages(src: &[i32], input: usize) -> (Vec<i64>, Vec<i64>) {
    let mut start = vec![0i64];
    let mut list = vec![];
    for i in 0..input {
        list.extend(src.iter().enumerate().filter(|(_, s)| **s == i as i32).map(|(p, _)| p as i64));
        start.push(list.len() as i64);
    }
    (start, list)
}

/// `(dy) → dx` of a Conv2d on an input of `in_hw`; reads `weight`.
pub(in crate::jit) fn conv_input_grad(
    jit: &mut Jit,
    cx: &NodeCx<'_>,
    conv: &Conv2d,
    in_hw: (usize, usize),
) -> Result<()> {
    let (o, oh, ow) = cx.in_chw(0)?;
    let (cin, h, w) = cx.out_chw()?;
    if in_hw != (h, w) {
        return Err(Error::Unsupported(format!("`{}`: input size disagrees with the result", cx.node.name)));
    }
    let (pt, pb, pl, pr) = conv.pads();
    let (ph, pw) = (h + pt + pb, w + pl + pr);
    let g = conv.groups.max(1);
    let (cin_g, cout_g) = (cin / g, o / g);
    let (kh, kw) = conv.kernel;
    let (sh, sw) = conv.stride;
    let (dh, dw) = conv.dilation;
    let weight = jit.consts.f32s(cx.param("weight")?);
    let (ys, yl) = preimages(&sources(conv, pt, h, ph)?, h);
    let (xs_, xl) = preimages(&sources(conv, pl, w, pw)?, w);
    let tabs = [ys, yl, xs_, xl].map(|t| jit.consts.i64s(t));
    let sc = cx.scratch_slot()?;
    let (ds, os) = (cx.inputs[0], cx.output);
    let padded = cin * ph * pw;
    jit.kernel(&cx.node.name, |fx| {
        let (dy, out, dpad, wa) = (fx.slot(ds), fx.slot(os), fx.slot(sc), fx.addr(weight));
        let [ysa, yla, xsa, xla] = tabs.map(|t| fx.addr(t));
        fx.for_samples(|fx, n| {
            let z = fx.d(0.0);
            fx.for_const(0, padded, 1, |fx, i| fx.store_f64(z, dpad, i));
            fx.for_const(0, o, 1, |fx, oc| {
                let grp = fx.b.ins().udiv_imm_u(oc, c(cout_g));
                let dbase = fx.lin(&[(n, c(o * oh * ow)), (oc, c(oh * ow))], 0);
                fx.for_const(0, cin_g, 1, |fx, ic| {
                    let chn = fx.lin(&[(grp, c(cin_g)), (ic, 1)], 0);
                    fx.for_const(0, kh, 1, |fx, ky| {
                        fx.for_const(0, kw, 1, |fx, kx| {
                            let wi = fx.lin(&[(oc, c(cin_g * kh * kw)), (ic, c(kh * kw)), (ky, c(kw)), (kx, 1)], 0);
                            let wv = fx.load_d(wa, wi);
                            fx.for_const(0, oh, 1, |fx, oy| {
                                let row =
                                    fx.lin(&[(chn, c(ph * pw)), (oy, c(sh * pw)), (ky, c(dh * pw)), (kx, c(dw))], 0);
                                let drow = fx.lin(&[(oy, c(ow))], 0);
                                let drow = fx.add(dbase, drow);
                                fx.for_const(0, ow, 1, |fx, ox| {
                                    let di = fx.add(drow, ox);
                                    let g = fx.load_d(dy, di);
                                    let pi = fx.lin(&[(ox, c(sw))], 0);
                                    let pi = fx.add(row, pi);
                                    let cur = fx.load_f64(dpad, pi);
                                    let t = fx.b.ins().fmul(wv, g);
                                    let s = fx.b.ins().fadd(cur, t);
                                    fx.store_f64(s, dpad, pi);
                                });
                            });
                        });
                    });
                });
            });
            // Fold the padded gradient into the input's.
            fx.for_const(0, cin, 1, |fx, chn| {
                fx.for_const(0, h, 1, |fx, y| {
                    let y0 = fx.load_i64_at(ysa, y);
                    let y1i = fx.addi(y, 1);
                    let y1 = fx.load_i64_at(ysa, y1i);
                    fx.for_const(0, w, 1, |fx, x| {
                        let x0 = fx.load_i64_at(xsa, x);
                        let x1i = fx.addi(x, 1);
                        let x1 = fx.load_i64_at(xsa, x1i);
                        let s = fx.acc_f64();
                        fx.for_range(y0, y1, 1, |fx, k| {
                            let py = fx.load_i64_at(yla, k);
                            fx.for_range(x0, x1, 1, |fx, l| {
                                let px = fx.load_i64_at(xla, l);
                                let pi = fx.lin(&[(chn, c(ph * pw)), (py, c(pw)), (px, 1)], 0);
                                let v = fx.load_f64(dpad, pi);
                                fx.accumulate(s, v);
                            });
                        });
                        let v = fx.b.use_var(s);
                        let at = fx.lin(&[(n, c(cin * h * w)), (chn, c(h * w)), (y, c(w)), (x, 1)], 0);
                        fx.store_d(v, out, at);
                    });
                });
            });
        });
    })?;
    Ok(())
}

/// `(x, dy) → ∂/∂weight` of a Conv2d.
pub(in crate::jit) fn conv_weight_grad(jit: &mut Jit, cx: &NodeCx<'_>, conv: &Conv2d) -> Result<()> {
    let (cin, h, w) = cx.in_chw(0)?;
    let (o, oh, ow) = cx.in_chw(1)?;
    let (pt, pb, pl, pr) = conv.pads();
    let (ph, pw) = (h + pt + pb, w + pl + pr);
    let g = conv.groups.max(1);
    let (cin_g, cout_g) = (cin / g, o / g);
    let (kh, kw) = conv.kernel;
    let (sh, sw) = conv.stride;
    let (dh, dw) = conv.dilation;
    let sy = sources(conv, pt, h, ph)?;
    let sx = sources(conv, pl, w, pw)?;
    let (sya, sxa) = (jit.consts.i32s(sy), jit.consts.i32s(sx));
    let sc = cx.scratch_slot()?;
    let (xs, ds, os) = (cx.inputs[0], cx.inputs[1], cx.output);
    let padded = cin * ph * pw;
    jit.kernel(&cx.node.name, |fx| {
        let (x, dy, out, xp) = (fx.slot(xs), fx.slot(ds), fx.slot(os), fx.slot(sc));
        let (sya, sxa) = (fx.addr(sya), fx.addr(sxa));
        // The padded copy of every sample, as `F.pad` makes it.
        fx.for_samples(|fx, n| {
            fx.for_const(0, cin, 1, |fx, chn| {
                fx.for_const(0, ph, 1, |fx, py| {
                    let iy = fx.load_i32_at(sya, py);
                    fx.for_const(0, pw, 1, |fx, px| {
                        let ix = fx.load_i32_at(sxa, px);
                        let vy = fx.b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, iy, 0);
                        let vx = fx.b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, ix, 0);
                        let valid = fx.b.ins().band(vy, vx);
                        let i = fx.lin(&[(n, c(cin * h * w)), (chn, c(h * w)), (iy, c(w)), (ix, 1)], 0);
                        let z = fx.i(0);
                        let i = fx.select(valid, i, z);
                        let v = fx.load_f_at(x, i);
                        let zf = fx.f(0.0);
                        let v = fx.b.ins().select(valid, v, zf);
                        let d = fx.lin(&[(n, c(padded)), (chn, c(ph * pw)), (py, c(pw)), (px, 1)], 0);
                        let da = fx.elem(xp, d);
                        fx.store_f(v, da, 0);
                    });
                });
            });
        });
        fx.for_const(0, o, 1, |fx, oc| {
            let grp = fx.b.ins().udiv_imm_u(oc, c(cout_g));
            fx.for_const(0, cin_g, 1, |fx, ic| {
                let chn = fx.lin(&[(grp, c(cin_g)), (ic, 1)], 0);
                fx.for_const(0, kh, 1, |fx, ky| {
                    fx.for_const(0, kw, 1, |fx, kx| {
                        let total = fx.acc_f64();
                        fx.for_samples(|fx, n| {
                            let s = fx.acc_f64();
                            fx.for_const(0, oh, 1, |fx, oy| {
                                let row = fx.lin(
                                    &[
                                        (n, c(padded)),
                                        (chn, c(ph * pw)),
                                        (oy, c(sh * pw)),
                                        (ky, c(dh * pw)),
                                        (kx, c(dw)),
                                    ],
                                    0,
                                );
                                let drow = fx.lin(&[(n, c(o * oh * ow)), (oc, c(oh * ow)), (oy, c(ow))], 0);
                                fx.for_const(0, ow, 1, |fx, ox| {
                                    let di = fx.add(drow, ox);
                                    let gv = fx.load_d(dy, di);
                                    let pi = fx.lin(&[(ox, c(sw))], 0);
                                    let pi = fx.add(row, pi);
                                    let xv = fx.load_f_mut(xp, pi);
                                    let xv = fx.b.ins().fpromote(types::F64, xv);
                                    let t = fx.b.ins().fmul(gv, xv);
                                    fx.accumulate(s, t);
                                });
                            });
                            let sv = fx.b.use_var(s);
                            fx.accumulate(total, sv);
                        });
                        let v = fx.b.use_var(total);
                        let wi = fx.lin(&[(oc, c(cin_g * kh * kw)), (ic, c(kh * kw)), (ky, c(kw)), (kx, 1)], 0);
                        fx.store_d(v, out, wi);
                    });
                });
            });
        });
    })?;
    Ok(())
}
