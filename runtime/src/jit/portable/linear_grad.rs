//! Linear backward: the input gradient `dy · W` and the weight gradient `Σ_rows dyᵀ · x`
//! (every leading dimension is a row). Sums in f64 in the interpreter's order, rounded
//! once; scalar loops, used without a micro-kernel ISA (with one, `blocked/gemm_grad.rs`).

use crate::error::Result;
use crate::jit::codegen::{Jit, c};
use crate::jit::cx::NodeCx;
use cnnc_compiler::ops::Linear;
use cranelift_codegen::ir::InstBuilder;

/// `(dy) → dx`; reads `weight`.
pub(in crate::jit) fn linear_input_grad(jit: &mut Jit, cx: &NodeCx<'_>, l: &Linear) -> Result<()> {
    let (fi, fo) = (l.in_features, l.out_features);
    let rows = cx.in_tys[0].numel_per_sample() / fo.max(1);
    let weight = jit.consts.f32s(cx.param("weight")?);
    let (ds, os) = (cx.inputs[0], cx.output);
    jit.kernel(&cx.node.name, |fx| {
        let (dy, out, wa) = (fx.slot(ds), fx.slot(os), fx.addr(weight));
        let zero = fx.i(0);
        let m = fx.muli(fx.nb, c(rows));
        fx.for_range(zero, m, 1, |fx, r| {
            fx.for_const(0, fi, 1, |fx, i| {
                let s = fx.acc_f64();
                fx.for_const(0, fo, 1, |fx, o| {
                    let di = fx.lin(&[(r, c(fo)), (o, 1)], 0);
                    let d = fx.load_d(dy, di);
                    let wi = fx.lin(&[(o, c(fi)), (i, 1)], 0);
                    let wv = fx.load_d(wa, wi);
                    let t = fx.b.ins().fmul(d, wv);
                    fx.accumulate(s, t);
                });
                let v = fx.b.use_var(s);
                let at = fx.lin(&[(r, c(fi)), (i, 1)], 0);
                fx.store_d(v, out, at);
            });
        });
    })?;
    Ok(())
}

/// `(x, dy) → ∂/∂weight`, `[out_features, in_features]`.
pub(in crate::jit) fn linear_weight_grad(jit: &mut Jit, cx: &NodeCx<'_>, l: &Linear) -> Result<()> {
    let (fi, fo) = (l.in_features, l.out_features);
    let rows = cx.in_tys[0].numel_per_sample() / fi.max(1);
    let (xs, ds, os) = (cx.inputs[0], cx.inputs[1], cx.output);
    jit.kernel(&cx.node.name, |fx| {
        let (x, dy, out) = (fx.slot(xs), fx.slot(ds), fx.slot(os));
        let m = fx.muli(fx.nb, c(rows));
        fx.for_const(0, fo, 1, |fx, o| {
            fx.for_const(0, fi, 1, |fx, i| {
                let s = fx.acc_f64();
                let zero = fx.i(0);
                fx.for_range(zero, m, 1, |fx, r| {
                    let di = fx.lin(&[(r, c(fo)), (o, 1)], 0);
                    let d = fx.load_d(dy, di);
                    let xi = fx.lin(&[(r, c(fi)), (i, 1)], 0);
                    let xv = fx.load_d(x, xi);
                    let t = fx.b.ins().fmul(d, xv);
                    fx.accumulate(s, t);
                });
                let v = fx.b.use_var(s);
                let at = fx.lin(&[(o, c(fi)), (i, 1)], 0);
                fx.store_d(v, out, at);
            });
        });
    })?;
    Ok(())
}
