//! Kernels that touch each element a bounded number of times: activations, BatchNorm2d (a
//! per-channel `x·scale + shift` precomputed at compile time), the residual add, copies,
//! channel (or any-dim) concatenation, and mean/max reductions.
//!
//! All of them walk contiguous runs with f32x4 and finish a run's last 1–3 elements with a
//! partial vector (lane loads and stores), so the vector math serves the tails too.

use super::codegen::{Count, Fx, Jit, LANES, c};
use super::cx::NodeCx;
use super::math::act_v;
use crate::error::Result;
use cnnc_compiler::ops::{Activation, BatchNorm2d, Concat, Reduce, ReduceKind, Softmax};
use cranelift_codegen::ir::{InstBuilder, Value};

/// Calls `body(fx, i, lanes)` for `i = 0, 4, 8, …` covering `len` elements: full vectors in
/// a loop, then one partial vector of `lanes < 4`.
pub(super) fn for_vectors(fx: &mut Fx<'_>, len: usize, mut body: impl FnMut(&mut Fx<'_>, Value, usize)) {
    let full = len / LANES;
    fx.for_const(0, full, LANES as i64, |fx, i| body(fx, i, LANES));
    let rem = len % LANES;
    if rem > 0 {
        let i = fx.i(c(full * LANES));
        body(fx, i, rem);
    }
}

/// `dst[d + k] = src[s + k]` for `k < len` (offsets in elements). The loop carries its
/// pointers (see [`Fx::loop_n`]), so whatever computed `src` and `dst` stays outside it.
pub(super) fn copy_run(fx: &mut Fx<'_>, src: Value, dst: Value, len: usize) {
    const UNROLL: usize = 4;
    let step = UNROLL * LANES;
    let full = len / step;
    let (s, d) = (c(4 * step), c(4 * step));
    fx.loop_n(Count::Const(full), [src, dst], [s, d], |fx, [sp, dp]| {
        for u in 0..UNROLL {
            let v = fx.load_v(sp, c(u * LANES));
            fx.store_v(v, dp, c(u * LANES));
        }
    });
    let done = full * step;
    let (src, dst) = (fx.addi(src, c(4 * done)), fx.addi(dst, c(4 * done)));
    for_vectors(fx, len - done, |fx, i, lanes| {
        let s = fx.elem(src, i);
        let v = fx.load_partial(s, 0, lanes);
        let d = fx.elem(dst, i);
        fx.store_partial(v, d, 0, lanes);
    });
}

/// `y = act(x)` (in any layout: the operand's buffer and the result's are alike).
pub(super) fn activation(jit: &mut Jit, cx: &NodeCx<'_>, act: Activation) -> Result<()> {
    let size = cx.out_len;
    let (xs, ys) = (cx.inputs[0], cx.output);
    jit.kernel(&cx.node.name, |fx| {
        let x = fx.slot(xs);
        let y = fx.slot(ys);
        fx.for_samples(|fx, n| {
            let xn = fx.elem_scaled(x, n, c(size));
            let yn = fx.elem_scaled(y, n, c(size));
            for_vectors(fx, size, |fx, i, lanes| {
                let a = fx.elem(xn, i);
                let v = fx.load_partial(a, 0, lanes);
                let r = act_v(fx, act, v);
                let d = fx.elem(yn, i);
                fx.store_partial(r, d, 0, lanes);
            });
        });
    })?;
    Ok(())
}

/// `y = a + b` (in any layout: both operands and the result are alike).
pub(super) fn add(jit: &mut Jit, cx: &NodeCx<'_>) -> Result<()> {
    let size = cx.out_len;
    let (as_, bs, ys) = (cx.inputs[0], cx.inputs[1], cx.output);
    jit.kernel(&cx.node.name, |fx| {
        let a = fx.slot(as_);
        let b = fx.slot(bs);
        let y = fx.slot(ys);
        fx.for_samples(|fx, n| {
            let an = fx.elem_scaled(a, n, c(size));
            let bn = fx.elem_scaled(b, n, c(size));
            let yn = fx.elem_scaled(y, n, c(size));
            for_vectors(fx, size, |fx, i, lanes| {
                let pa = fx.elem(an, i);
                let va = fx.load_partial(pa, 0, lanes);
                let pb = fx.elem(bn, i);
                let vb = fx.load_partial(pb, 0, lanes);
                let r = fx.b.ins().fadd(va, vb);
                let d = fx.elem(yn, i);
                fx.store_partial(r, d, 0, lanes);
            });
        });
    })?;
    Ok(())
}

/// Inference BatchNorm as a per-channel affine map, folded in f64 at compile time:
/// `scale = weight / sqrt(var + eps)`, `shift = bias − mean·scale`.
pub(super) fn batchnorm_affine(cx: &NodeCx<'_>, bn: &BatchNorm2d) -> Result<(Vec<f32>, Vec<f32>)> {
    let ch = bn.num_features;
    let (w, b) = if bn.affine { (cx.param("weight")?, cx.param("bias")?) } else { (vec![1.0; ch], vec![0.0; ch]) };
    let mean = cx.param("running_mean")?;
    let var = cx.param("running_var")?;
    let mut scale = Vec::with_capacity(ch);
    let mut shift = Vec::with_capacity(ch);
    for k in 0..ch {
        let s = f64::from(w[k]) / (f64::from(var[k]) + bn.eps).sqrt();
        scale.push(s as f32);
        shift.push((f64::from(b[k]) - f64::from(mean[k]) * s) as f32);
    }
    Ok((scale, shift))
}

/// `y = x·scale[c] + shift[c]`.
pub(super) fn batchnorm(jit: &mut Jit, cx: &NodeCx<'_>, bn: &BatchNorm2d) -> Result<()> {
    let (scale, shift) = batchnorm_affine(cx, bn)?;
    let (ch, h, w) = cx.out_chw()?;
    let plane = h * w;
    let size = ch * plane;
    let sa = jit.consts.f32s(scale);
    let ta = jit.consts.f32s(shift);
    let (xs, ys) = (cx.inputs[0], cx.output);
    jit.kernel(&cx.node.name, |fx| {
        let x = fx.slot(xs);
        let y = fx.slot(ys);
        let sa = fx.addr(sa);
        let ta = fx.addr(ta);
        fx.for_samples(|fx, n| {
            let xn = fx.elem_scaled(x, n, c(size));
            let yn = fx.elem_scaled(y, n, c(size));
            fx.for_const(0, ch, 1, |fx, k| {
                let ps = fx.elem(sa, k);
                let s = fx.load_splat(ps, 0);
                let pt = fx.elem(ta, k);
                let t = fx.load_splat(pt, 0);
                let xc = fx.elem_scaled(xn, k, c(plane));
                let yc = fx.elem_scaled(yn, k, c(plane));
                for_vectors(fx, plane, |fx, i, lanes| {
                    let a = fx.elem(xc, i);
                    let v = fx.load_partial(a, 0, lanes);
                    let r = fx.fma(v, s, t);
                    let d = fx.elem(yc, i);
                    fx.store_partial(r, d, 0, lanes);
                });
            });
        });
    })?;
    Ok(())
}

/// Copies slot `from` into slot `to` (`size` floats per sample).
pub(super) fn copy(jit: &mut Jit, name: &str, from: usize, to: usize, size: usize) -> Result<()> {
    jit.kernel(name, |fx| {
        let x = fx.slot(from);
        let y = fx.slot(to);
        fx.for_samples(|fx, n| {
            let xn = fx.elem_scaled(x, n, c(size));
            let yn = fx.elem_scaled(y, n, c(size));
            copy_run(fx, xn, yn, size);
        });
    })?;
    Ok(())
}

/// `torch.cat(xs, dim)`: per sample and per index of the dims before `dim`, each input
/// contributes one contiguous run.
pub(super) fn concat(jit: &mut Jit, cx: &NodeCx<'_>, cat: &Concat) -> Result<()> {
    let d = cat.dim - 1;
    let out_dims = cx.node.ty.dims.clone();
    let outer: usize = out_dims[..d].iter().product();
    let inner: usize = out_dims[d + 1..].iter().product();
    let total = out_dims[d] * inner;
    let out_size = cx.out_size();
    let parts: Vec<(usize, usize, usize)> = cx
        .inputs
        .iter()
        .zip(&cx.in_tys)
        .scan(0, |off, (s, t)| {
            let run = t.dims[d] * inner;
            let r = (*s, run, *off);
            *off += run;
            Some(r)
        })
        .collect();
    let ys = cx.output;
    jit.kernel(&cx.node.name, |fx| {
        let y = fx.slot(ys);
        let xs: Vec<Value> = parts.iter().map(|(s, _, _)| fx.slot(*s)).collect();
        fx.for_samples(|fx, n| {
            let yn = fx.elem_scaled(y, n, c(out_size));
            for (x, &(_, run, off)) in xs.iter().zip(&parts) {
                let xn = fx.elem_scaled(*x, n, c(run * outer));
                fx.for_const(0, outer, 1, |fx, o| {
                    let src = fx.elem_scaled(xn, o, c(run));
                    let dst0 = fx.elem_scaled(yn, o, c(total));
                    let dst = fx.addi(dst0, c(4 * off));
                    copy_run(fx, src, dst, run);
                });
            }
        });
    })?;
    Ok(())
}

/// Emits nested constant loops over `runs` (count, input stride, output stride — strides in
/// elements), calling `body(input offset, output offset)` innermost.
fn nest(
    fx: &mut Fx<'_>,
    runs: &[(usize, usize, usize)],
    in_off: Value,
    out_off: Value,
    body: &mut dyn FnMut(&mut Fx<'_>, Value, Value),
) {
    match runs.split_first() {
        None => body(fx, in_off, out_off),
        Some((&(count, si, so), rest)) => fx.for_const(0, count, 1, |fx, i| {
            let a = fx.muli(i, c(si));
            let io = fx.add(in_off, a);
            let b = fx.muli(i, c(so));
            let oo = fx.add(out_off, b);
            nest(fx, rest, io, oo, body);
        }),
    }
}

/// Combines two vectors (or scalars) for a reduction.
fn combine(fx: &mut Fx<'_>, kind: ReduceKind, a: Value, b: Value) -> Value {
    match kind {
        ReduceKind::Mean => fx.b.ins().fadd(a, b),
        // NaN-propagating, as PyTorch's max.
        ReduceKind::Max => super::math::nan_max(fx, a, b),
    }
}

fn neutral(kind: ReduceKind) -> f32 {
    match kind {
        ReduceKind::Mean => 0.0,
        ReduceKind::Max => f32::NEG_INFINITY,
    }
}

/// `x.mean(dims)` / `x.amax(dims)` over any non-batch dims. Dims are merged into maximal
/// runs of kept or reduced dims; if the innermost run is kept the kernel vectorises across
/// it, else it reduces the contiguous innermost run with vectors and sums the lanes.
pub(super) fn reduce(jit: &mut Jit, cx: &NodeCx<'_>, r: &Reduce) -> Result<()> {
    let dims = &cx.in_tys[0].dims;
    let mut runs: Vec<(usize, bool)> = vec![];
    for (i, &s) in dims.iter().enumerate() {
        let red = r.dims.contains(&(i + 1));
        if s == 1 {
            continue;
        }
        match runs.last_mut() {
            Some((size, rd)) if *rd == red => *size *= s,
            _ => runs.push((s, red)),
        }
    }
    // Strides of the input (row-major over runs) and of the output (over kept runs only).
    let mut in_stride = vec![0; runs.len()];
    let mut out_stride = vec![0; runs.len()];
    let (mut si, mut so) = (1, 1);
    for k in (0..runs.len()).rev() {
        in_stride[k] = si;
        si *= runs[k].0;
        if !runs[k].1 {
            out_stride[k] = so;
            so *= runs[k].0;
        }
    }
    let count: usize = runs.iter().filter(|r| r.1).map(|r| r.0).product();
    let in_size = cx.in_tys[0].numel_per_sample();
    let out_size = cx.out_size();
    let kind = r.kind;
    let inner_kept = matches!(runs.last(), Some((_, false)));
    let inner_len = runs.last().map_or(1, |r| r.0);
    let outer = if runs.is_empty() { &runs[..] } else { &runs[..runs.len() - 1] };
    let kept: Vec<(usize, usize, usize)> =
        outer.iter().enumerate().filter(|(_, r)| !r.1).map(|(k, r)| (r.0, in_stride[k], out_stride[k])).collect();
    let reduced: Vec<(usize, usize, usize)> =
        outer.iter().enumerate().filter(|(_, r)| r.1).map(|(k, r)| (r.0, in_stride[k], 0)).collect();
    let (xs, ys) = (cx.inputs[0], cx.output);
    jit.kernel(&cx.node.name, |fx| {
        let x = fx.slot(xs);
        let y = fx.slot(ys);
        let zero = fx.i(0);
        fx.for_samples(|fx, n| {
            let xn = fx.elem_scaled(x, n, c(in_size));
            let yn = fx.elem_scaled(y, n, c(out_size));
            nest(fx, &kept, zero, zero, &mut |fx, io, oo| {
                let xb = fx.elem(xn, io);
                let yb = fx.elem(yn, oo);
                if inner_kept || runs.is_empty() {
                    for_vectors(fx, inner_len, |fx, i, lanes| {
                        let init = fx.vf(neutral(kind));
                        let acc = fx.var(super::codegen::V, init);
                        let xi = fx.elem(xb, i);
                        nest(fx, &reduced, zero, zero, &mut |fx, ro, _| {
                            let p = fx.elem(xi, ro);
                            let v = fx.load_partial(p, 0, lanes);
                            let a = fx.b.use_var(acc);
                            let s = combine(fx, kind, a, v);
                            fx.b.def_var(acc, s);
                        });
                        let mut v = fx.b.use_var(acc);
                        if kind == ReduceKind::Mean {
                            let d = fx.vf(count as f32);
                            v = fx.b.ins().fdiv(v, d);
                        }
                        let p = fx.elem(yb, i);
                        fx.store_partial(v, p, 0, lanes);
                    });
                } else {
                    let init = fx.vf(neutral(kind));
                    let acc = fx.var(super::codegen::V, init);
                    nest(fx, &reduced, zero, zero, &mut |fx, ro, _| {
                        let xr = fx.elem(xb, ro);
                        for_vectors(fx, inner_len, |fx, i, lanes| {
                            let p = fx.elem(xr, i);
                            let v = fx.load_partial_or(p, 0, lanes, neutral(kind));
                            let a = fx.b.use_var(acc);
                            let s = combine(fx, kind, a, v);
                            fx.b.def_var(acc, s);
                        });
                    });
                    let v = fx.b.use_var(acc);
                    let mut s = fx.b.ins().extractlane(v, 0);
                    for l in 1..LANES as u8 {
                        let e = fx.b.ins().extractlane(v, l);
                        s = combine(fx, kind, s, e);
                    }
                    if kind == ReduceKind::Mean {
                        let d = fx.f(count as f32);
                        s = fx.b.ins().fdiv(s, d);
                    }
                    fx.store_f(s, yb, 0);
                }
            });
        });
    })?;
    Ok(())
}

/// `nn.Softmax(dim)` on plain tensors, with the interpreter's arithmetic (f64, the same `exp`):
/// per line along the axis, the NaN-propagating maximum, `Σ exp(x − max)`, then each
/// `exp(x − max) / Σ`. Sample-wise.
pub(super) fn softmax(jit: &mut Jit, cx: &NodeCx<'_>, sm: &Softmax) -> Result<()> {
    let dims = &cx.in_tys[0].dims;
    let axis = sm.axis(dims.len() + 1).ok_or_else(|| {
        crate::Error::Unsupported(format!("`{}`: softmax axis {} out of range", cx.node.name, sm.dim))
    })? - 1;
    let (outer, len, inner): (usize, usize, usize) =
        (dims[..axis].iter().product(), dims[axis], dims[axis + 1..].iter().product());
    let size = cx.in_tys[0].numel_per_sample();
    let exp = super::math::exp_f64 as *const () as usize;
    let (xs, ys) = (cx.inputs[0], cx.output);
    jit.kernel(&cx.node.name, |fx| {
        let (x, y) = (fx.slot(xs), fx.slot(ys));
        fx.for_samples(|fx, n| {
            let xn = fx.elem_scaled(x, n, c(size));
            let yn = fx.elem_scaled(y, n, c(size));
            fx.for_const(0, outer, 1, |fx, o| {
                fx.for_const(0, inner, 1, |fx, i| {
                    let o_off = fx.muli(o, c(len * inner));
                    let start = fx.add(o_off, i);
                    let at = |fx: &mut Fx<'_>, j: Value| {
                        let jj = fx.muli(j, c(inner));
                        fx.add(start, jj)
                    };
                    let (max, total) = super::math::max_and_sum_exp(fx, xn, len, at);
                    fx.for_const(0, len, 1, |fx, j| {
                        let k = at(fx, j);
                        let v = fx.load_d(xn, k);
                        let d = fx.b.ins().fsub(v, max);
                        let e = fx.call_f64(exp, &[d]);
                        let q = fx.b.ins().fdiv(e, total);
                        fx.store_d(q, yn, k);
                    });
                });
            });
        });
    })?;
    Ok(())
}
