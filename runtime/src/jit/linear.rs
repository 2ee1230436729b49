//! Linear: `y = x·Wᵀ + b` on the last dimension of an input of any rank.
//!
//! Every row of the input, across all samples of the chunk, is one row of an `M × K`
//! row-major matrix (`M = nb · rows per sample`), so the layer is one GEMM. Weights are
//! packed once as `[⌈O/8⌉][K][8]` (zero-padded). The register tile is 4 rows × 8 outputs
//! (eight f32x4 accumulators): per `k`, two weight vectors and four broadcast inputs feed
//! eight `fma`s; the K loop is unrolled by 4. Rows left over from the 4-row blocks use a
//! 1-row tile, and the last partial block of outputs stores only its valid lanes. The fused
//! epilogue runs on the accumulators, lanes being consecutive output features.

use super::codegen::{Fx, Jit, LANES, V, c};
use super::epilogue::Epi;
use super::lower::NodeCx;
use crate::error::Result;
use cnnc_compiler::ops::Linear;
use cranelift_codegen::ir::{InstBuilder, Value};
use cranelift_frontend::Variable;

/// Outputs per tile (two vectors).
const NW: usize = 8;
/// Rows per tile.
const MR: usize = 4;
/// K-loop unroll factor.
const UNROLL: usize = 4;

#[derive(Clone, Copy)]
struct Dims {
    k: usize,
    o: usize,
    w: i64,
}

/// Lowers a Linear node.
pub(super) fn lower(jit: &mut Jit, cx: &NodeCx<'_>, lin: &Linear) -> Result<()> {
    let (k, o) = (lin.in_features, lin.out_features);
    let rows = cx.in_tys[0].numel_per_sample() / k.max(1);
    let w = cx.param("weight")?;
    let tiles = o.div_ceil(NW);
    let mut packed = vec![0.0f32; tiles * k * NW];
    for (oi, row) in w.chunks(k.max(1)).enumerate().take(o) {
        let (t, j) = (oi / NW, oi % NW);
        for (ki, v) in row.iter().enumerate() {
            packed[(t * k + ki) * NW + j] = *v;
        }
    }
    let epi = Epi::new(jit, cx, lin.bias, &lin.epilogue)?;
    let d = Dims { k, o, w: jit.consts.f32s(packed) };
    let (xs, ys) = (cx.inputs[0], cx.output);
    jit.kernel(&cx.node.name, |fx| {
        let x = fx.slot(xs);
        let y = fx.slot(ys);
        let r = epi.residual.map(|s| fx.slot(s));
        let m = fx.muli(fx.nb, c(rows));
        let blocks = fx.b.ins().ushr_imm_u(m, 2);
        let zero = fx.i(0);
        fx.for_range(zero, blocks, 1, |fx, i| {
            let m0 = fx.muli(i, c(MR));
            block(fx, &d, &epi, x, y, r, m0, MR);
        });
        let start = fx.muli(blocks, c(MR));
        fx.for_range(start, m, 1, |fx, m0| block(fx, &d, &epi, x, y, r, m0, 1));
    })?;
    Ok(())
}

/// Rows `m0 .. m0 + mr` against every output tile.
#[allow(clippy::too_many_arguments)]
fn block(fx: &mut Fx<'_>, d: &Dims, epi: &Epi, x: Value, y: Value, r: Option<Value>, m0: Value, mr: usize) {
    let full = d.o / NW;
    let part = d.o % NW;
    fx.for_const(0, full, 1, |fx, t| tile(fx, d, epi, x, y, r, m0, mr, t, NW));
    if part > 0 {
        let t = fx.i(c(full));
        tile(fx, d, epi, x, y, r, m0, mr, t, part);
    }
}

/// One register tile: `mr` rows × `valid ≤ 8` outputs of output tile `t`.
#[allow(clippy::too_many_arguments)]
fn tile(
    fx: &mut Fx<'_>,
    d: &Dims,
    epi: &Epi,
    x: Value,
    y: Value,
    r: Option<Value>,
    m0: Value,
    mr: usize,
    t: Value,
    valid: usize,
) {
    let nv = valid.div_ceil(LANES);
    let zero_v = fx.vf(0.0);
    let acc: Vec<Vec<Variable>> = (0..mr).map(|_| (0..nv).map(|_| fx.var(V, zero_v)).collect()).collect();
    let wbase = fx.addr(d.w);
    let wt = fx.elem_scaled(wbase, t, c(d.k * NW));
    let xrow = fx.elem_scaled(x, m0, c(d.k));
    // One step of the K loop at index `kk + j` (`kk` a multiple of UNROLL, `j` constant).
    let step = |fx: &mut Fx<'_>, wk: Value, xk: Value, j: usize| {
        let wv: Vec<Value> = (0..nv).map(|v| fx.load_v(wk, (j * NW + v * LANES) as i64)).collect();
        for (ri, accr) in acc.iter().enumerate() {
            let xs = fx.load_splat(xk, (ri * d.k + j) as i64);
            for (v, w) in wv.iter().enumerate() {
                let s = fx.b.use_var(accr[v]);
                let s = fx.fma(xs, *w, s);
                fx.b.def_var(accr[v], s);
            }
        }
    };
    let rounds = d.k / UNROLL;
    fx.for_const(0, rounds, c(UNROLL), |fx, kk| {
        let wk = fx.elem_scaled(wt, kk, c(NW));
        let xk = fx.elem(xrow, kk);
        for j in 0..UNROLL {
            step(fx, wk, xk, j);
        }
    });
    for j in rounds * UNROLL..d.k {
        step(fx, wt, xrow, j);
    }
    let o0 = fx.muli(t, c(NW));
    let orow = fx.muli(m0, c(d.o));
    let oidx = fx.add(orow, o0);
    let yp = fx.elem(y, oidx);
    let rp = r.map(|r| fx.elem(r, oidx));
    for v in 0..nv {
        let lanes = (valid - v * LANES).min(LANES);
        let ch = fx.addi(o0, (v * LANES) as i64);
        let p = epi.lanes(fx, ch, lanes);
        for (ri, accr) in acc.iter().enumerate() {
            let off = (ri * d.o + v * LANES) as i64;
            let a = fx.b.use_var(accr[v]);
            let res = rp.map(|rp| fx.load_partial(rp, off, lanes));
            let out = epi.finish(fx, a, &p, res);
            fx.store_partial(out, yp, off, lanes);
        }
    }
}
