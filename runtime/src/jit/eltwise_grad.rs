//! The layout-agnostic training kernels on plain tensors: BatchNorm2d with batch statistics
//! and its gradients (and the eval-mode ones), Dropout's mask, the losses and their
//! gradients, activation backward, bias gradients, slices and reduction backward.
//!
//! They follow the interpreter's arithmetic exactly — sums in f64 in the same order,
//! rounded to f32 once — so a training graph gives the interpreter's numbers up to the
//! last bit in these ops. They run the whole batch (a training graph runs as one chunk:
//! see [`super::plan`]); values of a fixed shape (statistics, gradients of parameters, the
//! loss) are written once, not per sample. Straightforward scalar loops: the fast,
//! vectorised forms are future work.

use super::codegen::{Fx, Jit, c};
use super::cx::NodeCx;
use super::math::{exp_f64, ln_1p_f64, ln_f64};
use crate::error::{Error, Result};
use cnnc_compiler::ops::train::{Loss, Reduction};
use cnnc_compiler::ops::{Activation, BatchNorm2d, Reduce, ReduceKind};
use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::{InstBuilder, Value, types};

/// `(N·C planes, plane)` loop: `body(n, ch, base)` for each sample and channel, `base` the
/// plane's first element index in an `[N, C, plane]` tensor.
fn planes(fx: &mut Fx<'_>, ch: Value, ch_count: usize, plane: usize, mut body: impl FnMut(&mut Fx<'_>, Value)) {
    fx.for_samples(|fx, n| {
        let base = fx.lin(&[(n, c(ch_count * plane)), (ch, c(plane))], 0);
        body(fx, base);
    });
}

/// `for i in 0..plane { body(base + i) }`.
fn each(fx: &mut Fx<'_>, base: Value, plane: usize, mut body: impl FnMut(&mut Fx<'_>, Value)) {
    fx.for_const(0, plane, 1, |fx, i| {
        let at = fx.add(base, i);
        body(fx, at);
    });
}

/// `(weight, bias)` addresses of an affine BatchNorm, if affine.
fn bn_params(jit: &mut Jit, cx: &NodeCx<'_>, bn: &BatchNorm2d, bias: bool) -> Result<Option<(i64, Option<i64>)>> {
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
fn mean_invstd(fx: &mut Fx<'_>, stats: Value, ch: Value, channels: usize, eps: f64) -> (Value, Value) {
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

/// `x [N, C, H, W] → [2, C]`: per-channel mean and biased variance, two passes in f64.
pub(super) fn batch_stats(jit: &mut Jit, cx: &NodeCx<'_>) -> Result<()> {
    let (ch_n, h, w) = cx.in_chw(0)?;
    let plane = h * w;
    let (xs, os) = (cx.inputs[0], cx.output);
    jit.kernel(&cx.node.name, |fx| {
        let x = fx.slot(xs);
        let out = fx.slot(os);
        let count = fx.muli(fx.nb, c(plane));
        let count = fx.int_to_f64(count);
        fx.for_const(0, ch_n, 1, |fx, ch| {
            let s = fx.acc_f64();
            planes(fx, ch, ch_n, plane, |fx, base| {
                each(fx, base, plane, |fx, i| {
                    let v = fx.load_d(x, i);
                    fx.accumulate(s, v);
                });
            });
            let sum = fx.b.use_var(s);
            let mean = fx.b.ins().fdiv(sum, count);
            let q = fx.acc_f64();
            planes(fx, ch, ch_n, plane, |fx, base| {
                each(fx, base, plane, |fx, i| {
                    let v = fx.load_d(x, i);
                    let d = fx.b.ins().fsub(v, mean);
                    let dd = fx.b.ins().fmul(d, d);
                    fx.accumulate(q, dd);
                });
            });
            let qs = fx.b.use_var(q);
            let var = fx.b.ins().fdiv(qs, count);
            fx.store_d(mean, out, ch);
            let vi = fx.addi(ch, c(ch_n));
            fx.store_d(var, out, vi);
        });
    })?;
    Ok(())
}

/// `(x, stats) → (x − mean)·invstd·weight + bias`.
pub(super) fn bn_train(jit: &mut Jit, cx: &NodeCx<'_>, bn: &BatchNorm2d) -> Result<()> {
    let (ch_n, h, w) = cx.in_chw(0)?;
    let plane = h * w;
    let p = bn_params(jit, cx, bn, true)?;
    let (xs, ss, ys) = (cx.inputs[0], cx.inputs[1], cx.output);
    let eps = bn.eps;
    jit.kernel(&cx.node.name, |fx| {
        let (x, st, y) = (fx.slot(xs), fx.slot(ss), fx.slot(ys));
        fx.for_const(0, ch_n, 1, |fx, ch| {
            let (mean, inv) = mean_invstd(fx, st, ch, ch_n, eps);
            let g = gamma(fx, p.map(|p| p.0), ch);
            let b = match p.and_then(|p| p.1) {
                Some(a) => {
                    let base = fx.addr(a);
                    fx.load_d(base, ch)
                }
                None => fx.d(0.0),
            };
            planes(fx, ch, ch_n, plane, |fx, base| {
                each(fx, base, plane, |fx, i| {
                    let v = fx.load_d(x, i);
                    let d = fx.b.ins().fsub(v, mean);
                    let d = fx.b.ins().fmul(d, inv);
                    let d = fx.b.ins().fmul(d, g);
                    let r = fx.b.ins().fadd(d, b);
                    fx.store_d(r, y, i);
                });
            });
        });
    })?;
    Ok(())
}

/// `(x, stats, dy) → dx` (`input`) or `→ Σ dy·x̂` per channel, as the interpreter's
/// `bn_train_grad`.
pub(super) fn bn_train_grad(jit: &mut Jit, cx: &NodeCx<'_>, bn: &BatchNorm2d, input: bool) -> Result<()> {
    let (ch_n, h, w) = cx.in_chw(0)?;
    let plane = h * w;
    let p = if input { bn_params(jit, cx, bn, false)? } else { None };
    let (xs, ss, ds, os) = (cx.inputs[0], cx.inputs[1], cx.inputs[2], cx.output);
    let eps = bn.eps;
    jit.kernel(&cx.node.name, |fx| {
        let (x, st, dy, out) = (fx.slot(xs), fx.slot(ss), fx.slot(ds), fx.slot(os));
        let count = fx.muli(fx.nb, c(plane));
        let count = fx.int_to_f64(count);
        fx.for_const(0, ch_n, 1, |fx, ch| {
            let (mean, inv) = mean_invstd(fx, st, ch, ch_n, eps);
            let (sdy, sdx) = (fx.acc_f64(), fx.acc_f64());
            planes(fx, ch, ch_n, plane, |fx, base| {
                each(fx, base, plane, |fx, i| {
                    let d = fx.load_d(dy, i);
                    fx.accumulate(sdy, d);
                    let v = fx.load_d(x, i);
                    let xh = fx.b.ins().fsub(v, mean);
                    let t = fx.b.ins().fmul(d, xh);
                    let t = fx.b.ins().fmul(t, inv);
                    fx.accumulate(sdx, t);
                });
            });
            let sum_dy = fx.b.use_var(sdy);
            let sum_dyx = fx.b.use_var(sdx);
            if !input {
                fx.store_d(sum_dyx, out, ch);
                return;
            }
            let g = gamma(fx, p.map(|p| p.0), ch);
            let mdy = fx.b.ins().fdiv(sum_dy, count);
            let mdyx = fx.b.ins().fdiv(sum_dyx, count);
            let ginv = fx.b.ins().fmul(g, inv);
            planes(fx, ch, ch_n, plane, |fx, base| {
                each(fx, base, plane, |fx, i| {
                    let v = fx.load_d(x, i);
                    let xh = fx.b.ins().fsub(v, mean);
                    let xh = fx.b.ins().fmul(xh, inv);
                    let d = fx.load_d(dy, i);
                    let t = fx.b.ins().fsub(d, mdy);
                    let u = fx.b.ins().fmul(xh, mdyx);
                    let t = fx.b.ins().fsub(t, u);
                    let r = fx.b.ins().fmul(ginv, t);
                    fx.store_d(r, out, i);
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

/// `(dy) → dy·weight/sqrt(running_var + eps)` (eval-mode BatchNorm).
pub(super) fn bn_eval_input_grad(jit: &mut Jit, cx: &NodeCx<'_>, bn: &BatchNorm2d) -> Result<()> {
    let (ch_n, h, w) = cx.out_chw()?;
    let plane = h * w;
    let p = bn_params(jit, cx, bn, false)?;
    let (var, _) = running(jit, cx, false)?;
    let (ds, os) = (cx.inputs[0], cx.output);
    let eps = bn.eps;
    jit.kernel(&cx.node.name, |fx| {
        let (dy, out) = (fx.slot(ds), fx.slot(os));
        fx.for_const(0, ch_n, 1, |fx, ch| {
            let g = gamma(fx, p.map(|p| p.0), ch);
            let sd = running_sd(fx, var, ch, eps);
            planes(fx, ch, ch_n, plane, |fx, base| {
                each(fx, base, plane, |fx, i| {
                    let d = fx.load_d(dy, i);
                    let t = fx.b.ins().fmul(d, g);
                    let r = fx.b.ins().fdiv(t, sd);
                    fx.store_d(r, out, i);
                });
            });
        });
    })?;
    Ok(())
}

/// `(x, dy) → Σ dy·(x − running_mean)/sqrt(running_var + eps)` per channel.
pub(super) fn bn_eval_weight_grad(jit: &mut Jit, cx: &NodeCx<'_>, bn: &BatchNorm2d) -> Result<()> {
    let (ch_n, h, w) = cx.in_chw(0)?;
    let plane = h * w;
    let (var, mean) = running(jit, cx, true)?;
    let mean = mean.ok_or_else(|| Error::Unsupported("running_mean".into()))?;
    let (xs, ds, os) = (cx.inputs[0], cx.inputs[1], cx.output);
    let eps = bn.eps;
    jit.kernel(&cx.node.name, |fx| {
        let (x, dy, out) = (fx.slot(xs), fx.slot(ds), fx.slot(os));
        fx.for_const(0, ch_n, 1, |fx, ch| {
            let sd = running_sd(fx, var, ch, eps);
            let mb = fx.addr(mean);
            let m = fx.load_d(mb, ch);
            let s = fx.acc_f64();
            planes(fx, ch, ch_n, plane, |fx, base| {
                each(fx, base, plane, |fx, i| {
                    let d = fx.load_d(dy, i);
                    let v = fx.load_d(x, i);
                    let xm = fx.b.ins().fsub(v, m);
                    let t = fx.b.ins().fmul(d, xm);
                    let t = fx.b.ins().fdiv(t, sd);
                    fx.accumulate(s, t);
                });
            });
            let r = fx.b.use_var(s);
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

/// `(y, dy) → dx` of an activation from its output, in f64 as the interpreter.
pub(super) fn activation_grad(jit: &mut Jit, cx: &NodeCx<'_>, a: Activation) -> Result<()> {
    let size = cx.out_size();
    let (ys, ds, os) = (cx.inputs[0], cx.inputs[1], cx.output);
    jit.kernel(&cx.node.name, |fx| {
        let (y, dy, out) = (fx.slot(ys), fx.slot(ds), fx.slot(os));
        all(fx, size, |fx, i| {
            let g = fx.load_d(dy, i);
            let v = fx.load_d(y, i);
            let r = match a {
                Activation::Relu => {
                    let z = fx.d(0.0);
                    let pos = fx.b.ins().fcmp(FloatCC::GreaterThan, v, z);
                    fx.b.ins().select(pos, g, z)
                }
                Activation::Sigmoid => {
                    let one = fx.d(1.0);
                    let t = fx.b.ins().fmul(g, v);
                    let u = fx.b.ins().fsub(one, v);
                    fx.b.ins().fmul(t, u)
                }
                Activation::Tanh => {
                    let one = fx.d(1.0);
                    let vv = fx.b.ins().fmul(v, v);
                    let u = fx.b.ins().fsub(one, vv);
                    fx.b.ins().fmul(g, u)
                }
            };
            fx.store_d(r, out, i);
        });
    })?;
    Ok(())
}

/// `(dy) → [C]`: the sum over every dimension but per-sample axis `axis`.
pub(super) fn bias_grad(jit: &mut Jit, cx: &NodeCx<'_>, axis: usize) -> Result<()> {
    let dims = &cx.in_tys[0].dims;
    let ch_n = *dims.get(axis).ok_or_else(|| Error::Unsupported(format!("`{}`: bias axis", cx.node.name)))?;
    let inner: usize = dims[axis + 1..].iter().product();
    let outer: usize = dims[..axis].iter().product();
    let (ds, os) = (cx.inputs[0], cx.output);
    jit.kernel(&cx.node.name, |fx| {
        let (dy, out) = (fx.slot(ds), fx.slot(os));
        fx.for_const(0, ch_n, 1, |fx, ch| {
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
                    let ninf = fx.d(f64::NEG_INFINITY);
                    let mx = fx.var(types::F64, ninf);
                    fx.for_const(0, classes, 1, |fx, j| {
                        let at = fx.add(row, j);
                        let v = fx.load_d(p, at);
                        let cur = fx.b.use_var(mx);
                        let m = fx.b.ins().fmax(cur, v);
                        fx.b.def_var(mx, m);
                    });
                    let max = fx.b.use_var(mx);
                    let se = fx.acc_f64();
                    fx.for_const(0, classes, 1, |fx, j| {
                        let at = fx.add(row, j);
                        let v = fx.load_d(p, at);
                        let d = fx.b.ins().fsub(v, max);
                        let e = fx.call_f64(exp_f64 as *const () as usize, &[d]);
                        fx.accumulate(se, e);
                    });
                    let sum = fx.b.use_var(se);
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
