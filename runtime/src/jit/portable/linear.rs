//! Linear: `y = x·Wᵀ + b` on the last dimension of an input of any rank.
//!
//! Every row of the input, across all samples of the chunk, is one row of an `M × K`
//! row-major matrix (`M = nb · rows per sample`), so the layer is one GEMM. Weights are
//! packed once as `[⌈O/8⌉][K][8]` (zero-padded). The register tile is 4 rows × 8 outputs
//! (eight f32x4 accumulators): per `k`, two weight vectors and four broadcast inputs feed
//! eight `fma`s; the K loop is unrolled by 2. Rows left over from the 4-row blocks use a
//! 1-row tile, and the last partial block of outputs stores only its valid lanes. The fused
//! epilogue runs on the accumulators, lanes being consecutive output features.
//!
//! With a micro-kernel ISA (see [`super::microkernel`]) the GEMM is instead one call into
//! hand-written AVX-512F/AVX2 tiles (weights packed `[⌈O/NR⌉][K][NR]`; a single row, as at
//! batch 1, is a GEMV that streams the weights once), and the epilogue runs afterwards on
//! the stored rows.

use super::epilogue::Epi;
use crate::error::Result;
use crate::jit::codegen::{Count, Fx, Jit, LANES, V, c};
use crate::jit::cx::NodeCx;
use cnnc_compiler::ops::Linear;
use cranelift_codegen::ir::{InstBuilder, Value};
use cranelift_frontend::Variable;

/// Outputs per tile (two vectors).
const NW: usize = 8;
/// Rows per tile.
const MR: usize = 4;
/// K-loop unroll factor (more keeps more inputs live: see [`super::conv`]).
const UNROLL: usize = 2;

#[derive(Clone, Copy)]
struct Dims {
    k: usize,
    o: usize,
    w: i64,
}

/// Lowers a Linear node (the portable kernel; with a micro-kernel ISA the dispatcher picks
/// [`crate::jit::blocked::conv::linear`] instead).
pub(in crate::jit) fn lower(jit: &mut Jit, cx: &NodeCx<'_>, lin: &Linear) -> Result<()> {
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
        // Without a residual, `r` tracks `y` and is never read.
        let r = epi.residual.map_or(y, |s| fx.slot(s));
        let m = fx.muli(fx.nb, c(rows));
        let blocks = fx.b.ins().ushr_imm_u(m, 2);
        let row = [c(4 * k), c(4 * o), c(4 * o)];
        let block_steps = row.map(|s| s * c(MR));
        fx.loop_n(Count::Dyn(blocks), [x, y, r], block_steps, |fx, p| block(fx, &d, &epi, p, MR));
        let done = fx.muli(blocks, c(MR));
        let left = fx.b.ins().isub(m, done);
        let xt = fx.elem_scaled(x, done, c(k));
        let yt = fx.elem_scaled(y, done, c(o));
        let rt = fx.elem_scaled(r, done, c(o));
        fx.loop_n(Count::Dyn(left), [xt, yt, rt], row, |fx, p| block(fx, &d, &epi, p, 1));
    })?;
    Ok(())
}

/// Rows `x .. x + mr` (pointers to the first row of input, output, residual) against every
/// output tile.
fn block(fx: &mut Fx<'_>, d: &Dims, epi: &Epi, p: [Value; 3], mr: usize) {
    let [x, y, r] = p;
    let full = d.o / NW;
    let part = d.o % NW;
    let w0 = fx.addr(d.w);
    let zero = fx.i(0);
    let steps = [c(4 * d.k * NW), c(4 * NW), c(4 * NW), 0, c(NW)];
    fx.loop_n(Count::Const(full), [w0, y, r, x, zero], steps, |fx, [wt, yt, rt, x, o0]| {
        tile(fx, d, epi, [wt, yt, rt, x, o0], mr, NW);
    });
    if part > 0 {
        let wt = fx.addi(w0, c(4 * full * d.k * NW));
        let yt = fx.addi(y, c(4 * full * NW));
        let rt = fx.addi(r, c(4 * full * NW));
        let o0 = fx.i(c(full * NW));
        tile(fx, d, epi, [wt, yt, rt, x, o0], mr, part);
    }
}

/// One register tile: `mr` rows × `valid ≤ 8` outputs. `p` = packed weights of the output
/// tile, output and residual at the tile's first element, input row, first output index.
fn tile(fx: &mut Fx<'_>, d: &Dims, epi: &Epi, p: [Value; 5], mr: usize, valid: usize) {
    let [wt, yt, rt, x, o0] = p;
    let nv = valid.div_ceil(LANES);
    let zero_v = fx.vf(0.0);
    let acc: Vec<Vec<Variable>> = (0..mr).map(|_| (0..nv).map(|_| fx.var(V, zero_v)).collect()).collect();
    // One step of the K loop at index `j` relative to the pointers.
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
    let steps = [c(4 * UNROLL * NW), c(4 * UNROLL)];
    fx.loop_n(Count::Const(rounds), [wt, x], steps, |fx, [wk, xk]| {
        for j in 0..UNROLL {
            step(fx, wk, xk, j);
        }
    });
    for j in rounds * UNROLL..d.k {
        step(fx, wt, x, j);
    }
    for v in 0..nv {
        let lanes = (valid - v * LANES).min(LANES);
        let ch = fx.addi(o0, (v * LANES) as i64);
        let p = epi.lanes(fx, ch, lanes);
        for (ri, accr) in acc.iter().enumerate() {
            let off = (ri * d.o + v * LANES) as i64;
            let a = fx.b.use_var(accr[v]);
            let res = epi.residual.map(|_| fx.load_partial(rt, off, lanes));
            let out = epi.finish(fx, a, &p, res);
            fx.store_partial(out, yt, off, lanes);
        }
    }
}
