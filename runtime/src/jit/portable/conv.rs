//! Conv2d: weight packing, tap tables and the kernel.
//!
//! **Loop nest** (all bounds constants except the sample count and the per-row tap ranges):
//! `n → group → tile of MR output channels → output row → output columns`, and for each
//! piece of a row a register tile of `MR × NR` f32x4 accumulators (MR channels × NR·4
//! consecutive output pixels; 4 × 2 for ordinary convolutions, 1 × 4 for depthwise). The
//! tile runs `kh → (kw, ic)`: the kh loop covers only the rows that are real for this output
//! row, then, per kw, a loop over input channels two at a time (walking the input by one
//! channel plane per step); with fewer than 4 input channels per group, `(kw, ic)` is one
//! flattened loop over a table of input offsets instead. Weights are packed once as `[group][channel tile][kh][kw][ic][MR]`
//! (zero-padded to whole tiles), so the tile walks them sequentially; a weight is broadcast
//! and multiplied into NR input vectors with `fma`. The fused epilogue runs on the
//! accumulators before the single store. The tile (the body of the `(kw, ic)` loop plus its
//! accumulators) is the unit a hand-written micro-kernel can later replace.
//!
//! **Borders without a padded copy.** For every `(oh, kh)` a table gives the input row PyTorch
//! reads after applying the padding mode (reflect / replicate / circular remap the index;
//! zero padding marks the row absent, and the kh range skips it), and likewise for columns.
//! The vector tiles cover the interior columns where every tap's 4-pixel load stays inside
//! the row (contiguous loads for stride 1, two loads and a `shufps` for stride 2, lane
//! inserts otherwise); the few border columns go through a per-pixel path that looks every
//! tap's column up in the table and vectorises across the MR output channels instead.
//!
//! A 1×1, stride-1, unpadded convolution is run as if the image were one row of `H·W`
//! pixels, so it is a plain GEMM over all pixels.
//!
//! This is the portable code, on plain NCHW tensors: when the host has AVX-512F or
//! AVX2+FMA, convolutions whose groups are whole blocks of 16 channels run on the
//! micro-kernel tiles instead (`crate::jit::blocked::conv`).

use super::epilogue::Epi;
use crate::error::{Error, Result};
use crate::jit::codegen::{Count, Fx, Jit, LANES, V, c};
use crate::jit::cx::NodeCx;
use crate::jit::tables::{axis_table, vector_columns};
use cnnc_compiler::ops::{Conv2d, PaddingMode};
use cranelift_codegen::ir::{InstBuilder, Value, types};
use cranelift_frontend::Variable;

/// Tile shape `(MR channels, NR vectors)` for a group of `ocg` output channels.
fn tile_shape(ocg: usize) -> (usize, usize) {
    match ocg {
        1 => (1, 4),
        2 => (2, 3),
        3 => (3, 2),
        _ => (4, 2),
    }
}

/// Shapes and constants of one convolution, as the kernel sees them.
#[derive(Clone, Copy, Debug)]
struct Geo {
    ih: usize,
    iw: usize,
    oh: usize,
    ow: usize,
    kh: usize,
    kw: usize,
    sw: usize,
    dw: usize,
    pl: usize,
    groups: usize,
    icg: usize,
    ocg: usize,
    mr: usize,
    nr: usize,
    tiles: usize,
    in_size: usize,
    out_size: usize,
}

/// Addresses of the constant data a conv kernel reads.
#[derive(Clone, Copy, Debug)]
struct Consts {
    /// Packed weights `[group][tile][kh][kw][ic][MR]`.
    w: i64,
    /// `[oh][kh]`: input row (after remapping), −1 in zero padding.
    rows: i64,
    /// `[oh]`: the range `[lo, hi)` of kh whose rows are real.
    row_range: i64,
    /// `[ow][kw]`: input column (after remapping), −1 in zero padding.
    cols: i64,
    /// `[ow]`: the range `[lo, hi)` of kw whose columns are real.
    col_range: i64,
    /// `[kw][ic]`: element offset of tap `(kw, ic)` from the window's row start.
    taps: i64,
}

/// For every output position, the contiguous range of taps that read real input (zero
/// padding is skipped; for the other modes every tap reads a remapped element).
fn tap_ranges(table: &[i32], taps: usize) -> Result<Vec<i32>> {
    let mut out = Vec::with_capacity(2 * table.len() / taps.max(1));
    for row in table.chunks(taps) {
        let lo = row.iter().position(|&i| i >= 0).unwrap_or(0);
        let hi = row.iter().rposition(|&i| i >= 0).map_or(lo, |p| p + 1);
        if row[lo..hi].contains(&-1) {
            return Err(Error::Unsupported("conv taps inside the input are not contiguous".into()));
        }
        out.extend([lo as i32, hi as i32]);
    }
    Ok(out)
}

/// Lowers a Conv2d node.
pub(in crate::jit) fn lower(jit: &mut Jit, cx: &NodeCx<'_>, conv: &Conv2d) -> Result<()> {
    let (cin, ih, iw) = cx.in_chw(0)?;
    let (cout, oh, ow) = cx.out_chw()?;
    let (kh, kw) = conv.kernel;
    let (sh, sw) = conv.stride;
    let (dh, dw) = conv.dilation;
    let (pt, pb, pl, pr) = conv.pads();
    let groups = conv.groups;
    let (icg, ocg) = (cin / groups, cout / groups);
    let flat = (kh, kw, sh, sw, pt, pb, pl, pr) == (1, 1, 1, 1, 0, 0, 0, 0);
    let (ih, iw, oh, ow) = if flat { (1, ih * iw, 1, oh * ow) } else { (ih, iw, oh, ow) };
    let (mr, nr) = tile_shape(ocg);
    let tiles = ocg.div_ceil(mr);
    let mode = if flat { PaddingMode::Zeros } else { conv.padding_mode };

    let w = cx.param("weight")?;
    let mut packed = Vec::with_capacity(groups * tiles * kh * kw * icg * mr);
    for g in 0..groups {
        for t in 0..tiles {
            for a in 0..kh {
                for b in 0..kw {
                    for ic in 0..icg {
                        for j in 0..mr {
                            let o = t * mr + j;
                            packed.push(if o < ocg { w[(((g * ocg + o) * icg + ic) * kh + a) * kw + b] } else { 0.0 });
                        }
                    }
                }
            }
        }
    }
    let rows = axis_table(oh, kh, sh, dh, pt, ih, mode)?;
    let cols = axis_table(ow, kw, sw, dw, pl, iw, mode)?;
    let row_range = tap_ranges(&rows, kh)?;
    let col_range = tap_ranges(&cols, kw)?;
    let taps: Vec<i32> = (0..kw).flat_map(|b| (0..icg).map(move |ic| (ic * ih * iw + b * dw) as i32)).collect();
    let epi = Epi::new(jit, cx, conv.bias, &conv.epilogue)?;
    let consts = Consts {
        w: jit.consts.f32s(packed),
        rows: jit.consts.i32s(rows),
        row_range: jit.consts.i32s(row_range),
        cols: jit.consts.i32s(cols),
        col_range: jit.consts.i32s(col_range),
        taps: jit.consts.i32s(taps),
    };
    let geo = Geo {
        ih,
        iw,
        oh,
        ow,
        kh,
        kw,
        sw,
        dw,
        pl,
        groups,
        icg,
        ocg,
        mr,
        nr,
        tiles,
        in_size: cin * ih * iw,
        out_size: cout * oh * ow,
    };
    let vcols = vector_columns(ow, iw, kw, sw, dw, pl);
    let (xs, ys) = (cx.inputs[0], cx.output);
    jit.kernel(&cx.node.name, |fx| emit(fx, &geo, &consts, &epi, xs, ys, vcols))?;
    Ok(())
}

/// What the pieces of one output row of one channel tile need. All are loop-carried values
/// (see [`Fx::loop_n`]).
#[derive(Clone, Copy)]
struct RowCx {
    /// Input of the current group.
    xg: Value,
    /// Packed weights of the current channel tile.
    wt: Value,
    /// First output channel of the tile.
    oc0: Value,
    /// Output (and residual) at `(oc0, oh, 0)`.
    yrow: Value,
    rrow: Value,
    /// This row's entries of the `rows` table.
    rows: Value,
    /// The kh range of real rows.
    kh_lo: Value,
    kh_hi: Value,
}

impl RowCx {
    fn to_array(self) -> [Value; 8] {
        [self.xg, self.wt, self.oc0, self.yrow, self.rrow, self.rows, self.kh_lo, self.kh_hi]
    }

    fn from_array(a: [Value; 8]) -> RowCx {
        let [xg, wt, oc0, yrow, rrow, rows, kh_lo, kh_hi] = a;
        RowCx { xg, wt, oc0, yrow, rrow, rows, kh_lo, kh_hi }
    }
}

#[allow(clippy::too_many_arguments)]
fn emit(fx: &mut Fx<'_>, g: &Geo, k: &Consts, epi: &Epi, xs: usize, ys: usize, vcols: Option<(usize, usize)>) {
    let x = fx.slot(xs);
    let y = fx.slot(ys);
    // Without a residual, `r` tracks `y` and is never read.
    let r = epi.residual.map_or(y, |s| fx.slot(s));
    let (plane_in, plane_out) = (g.ih * g.iw, g.oh * g.ow);
    let tile_w = g.kh * g.kw * g.icg * g.mr;
    let nb = fx.nb;
    let sample = [c(4 * g.in_size), c(4 * g.out_size), c(4 * g.out_size)];
    fx.loop_n(Count::Dyn(nb), [x, y, r], sample, |fx, [xn, yn, rn]| {
        let w0 = fx.addr(k.w);
        let zero = fx.i(0);
        let group = [
            c(4 * g.icg * plane_in),
            c(4 * g.ocg * plane_out),
            c(4 * g.ocg * plane_out),
            c(4 * g.tiles * tile_w),
            c(g.ocg),
        ];
        fx.loop_n(Count::Const(g.groups), [xn, yn, rn, w0, zero], group, |fx, [xg, yg, rg, wg, og]| {
            let full = g.ocg / g.mr;
            let part = g.ocg % g.mr;
            let tile_steps = [0, c(4 * g.mr * plane_out), c(4 * g.mr * plane_out), c(4 * tile_w), c(g.mr)];
            fx.loop_n(Count::Const(full), [xg, yg, rg, wg, og], tile_steps, |fx, [xg, yt, rt, wt, oc0]| {
                rows(fx, g, k, epi, vcols, xg, yt, rt, wt, oc0, g.mr);
            });
            if part > 0 {
                let yt = fx.addi(yg, c(4 * full * g.mr * plane_out));
                let rt = fx.addi(rg, c(4 * full * g.mr * plane_out));
                let wt = fx.addi(wg, c(4 * full * tile_w));
                let oc0 = fx.addi(og, c(full * g.mr));
                rows(fx, g, k, epi, vcols, xg, yt, rt, wt, oc0, part);
            }
        });
    });
}

/// Every output row of one channel tile.
#[allow(clippy::too_many_arguments)]
fn rows(
    fx: &mut Fx<'_>,
    g: &Geo,
    k: &Consts,
    epi: &Epi,
    vcols: Option<(usize, usize)>,
    xg: Value,
    yt: Value,
    rt: Value,
    wt: Value,
    oc0: Value,
    valid: usize,
) {
    let rows0 = fx.addr(k.rows);
    let range0 = fx.addr(k.row_range);
    let vals = [xg, wt, oc0, yt, rt, rows0, range0];
    let steps = [0, 0, 0, c(4 * g.ow), c(4 * g.ow), c(4 * g.kh), 8];
    fx.loop_n(Count::Const(g.oh), vals, steps, |fx, [xg, wt, oc0, yrow, rrow, rows, range]| {
        let kh_lo = fx.load_i32(range, 0);
        let kh_hi = fx.load_i32(range, 1);
        let rc = RowCx { xg, wt, oc0, yrow, rrow, rows, kh_lo, kh_hi };
        row(fx, g, k, epi, &rc, valid, vcols);
    });
}

/// One output row of one channel tile: vector tiles over the interior, pixels at the edges.
fn row(fx: &mut Fx<'_>, g: &Geo, k: &Consts, epi: &Epi, rc: &RowCx, valid: usize, vcols: Option<(usize, usize)>) {
    let (lo, end) = vcols.unwrap_or((0, 0));
    let tw = LANES * g.nr;
    let big = (end - lo) / tw;
    let tail_vecs = (end - lo - big * tw) / LANES;
    // Vector tiles carry their input column, output and residual pointers.
    let col = |fx: &mut Fx<'_>, ow0: usize| {
        let xcol = fx.addi(rc.xg, c(4 * ow0 * g.sw));
        let ycol = fx.addi(rc.yrow, c(4 * ow0));
        let rcol = fx.addi(rc.rrow, c(4 * ow0));
        [xcol, ycol, rcol]
    };
    let start = col(fx, lo);
    let inv = rc.to_array();
    let vals = [start[0], start[1], start[2], inv[0], inv[1], inv[2], inv[3], inv[4], inv[5], inv[6], inv[7]];
    let steps = [c(4 * tw * g.sw), c(4 * tw), c(4 * tw), 0, 0, 0, 0, 0, 0, 0, 0];
    fx.loop_n(Count::Const(big), vals, steps, |fx, v| {
        let rc = RowCx::from_array([v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10]]);
        vtile(fx, g, k, epi, &rc, valid, [v[0], v[1], v[2]], g.nr);
    });
    let mut done = lo + big * tw;
    if tail_vecs > 0 {
        let p = col(fx, done);
        vtile(fx, g, k, epi, rc, valid, p, tail_vecs);
        done += tail_vecs * LANES;
    }
    let (left, right) = if vcols.is_some() { (lo, done) } else { (0, 0) };
    pixels(fx, g, k, epi, rc, valid, 0, left);
    pixels(fx, g, k, epi, rc, valid, right, g.ow);
}

/// A register tile: `valid` channels × `nrv` vectors of 4 pixels; `p` = input column start
/// (before the left padding offset), output and residual at the tile's first pixel.
///
/// The taps run as `kh` (real rows only) → `(kw, ic)` flattened into one loop whose offsets
/// come from a table, two taps per iteration when the count is even. Keeping one or two taps
/// per loop body matters: the e-graph pass schedules each accumulator's whole chain of
/// `fma`s at once, so straight-line code over many taps would keep every tap's input live.
#[allow(clippy::too_many_arguments)]
fn vtile(fx: &mut Fx<'_>, g: &Geo, k: &Consts, epi: &Epi, rc: &RowCx, valid: usize, p: [Value; 3], nrv: usize) {
    let [xcol, ycol, rcol] = p;
    let zero_v = fx.vf(0.0);
    let acc: Vec<Vec<Variable>> = (0..valid).map(|_| (0..nrv).map(|_| fx.var(V, zero_v)).collect()).collect();
    let taps = g.kw * g.icg;
    let count = fx.b.ins().isub(rc.kh_hi, rc.kh_lo);
    let rp = fx.elem(rc.rows, rc.kh_lo);
    let wk = fx.elem_scaled(rc.wt, rc.kh_lo, c(taps * g.mr));
    // One tap: input vectors at `p` (the tap's column 0 of the tile), weights at `wq`.
    let tap = |fx: &mut Fx<'_>, p: Value, wq: Value, u: usize| {
        let xv: Vec<Value> =
            (0..nrv).map(|v| fx.load_strided(p, (v * LANES * g.sw) as i64 - g.pl as i64, g.sw)).collect();
        for (j, accj) in acc.iter().enumerate() {
            let wv = fx.load_splat(wq, (u * g.mr + j) as i64);
            for (v, x) in xv.iter().enumerate() {
                let s = fx.b.use_var(accj[v]);
                let s = fx.fma(wv, *x, s);
                fx.b.def_var(accj[v], s);
            }
        }
    };
    fx.loop_n(Count::Dyn(count), [rp, wk, xcol], [4, c(4 * taps * g.mr), 0], |fx, [rp, wk, xcol]| {
        let r = fx.load_i32(rp, 0);
        let base = fx.elem_scaled(xcol, r, c(g.iw));
        let plane = g.ih * g.iw;
        if g.icg >= 4 || g.kw == 1 {
            // Per kw (unrolled in the code), a loop over input channels: a plain stride.
            let unroll = if g.icg.is_multiple_of(2) { 2 } else { 1 };
            for b in 0..g.kw {
                let p0 = fx.addi(base, c(4 * b * g.dw));
                let w0 = fx.addi(wk, c(4 * b * g.icg * g.mr));
                let steps = [c(4 * unroll * plane), c(4 * unroll * g.mr)];
                fx.loop_n(Count::Const(g.icg / unroll), [p0, w0], steps, |fx, [p, wq]| {
                    for u in 0..unroll {
                        let pu = fx.addi(p, c(4 * u * plane));
                        tap(fx, pu, wq, u);
                    }
                });
            }
        } else {
            // Few input channels: one loop over all (kw, ic) taps, offsets from a table.
            let unroll = if taps.is_multiple_of(2) { 2 } else { 1 };
            let tab = fx.addr(k.taps);
            let steps = [c(4 * unroll), c(4 * unroll * g.mr), 0];
            fx.loop_n(Count::Const(taps / unroll), [tab, wk, base], steps, |fx, [tq, wq, base]| {
                for u in 0..unroll {
                    let off = fx.load_i32(tq, u as i64);
                    let p = fx.elem(base, off);
                    tap(fx, p, wq, u);
                }
            });
        }
    });
    let plane = (g.oh * g.ow) as i64;
    for (j, accj) in acc.iter().enumerate() {
        let ch = fx.addi(rc.oc0, j as i64);
        let p = epi.splat(fx, ch);
        for (v, var) in accj.iter().enumerate() {
            let off = j as i64 * plane + (v * LANES) as i64;
            let a = fx.b.use_var(*var);
            let res = epi.residual.map(|_| fx.load_v(rcol, off));
            let out = epi.finish(fx, a, &p, res);
            fx.store_v(out, ycol, off);
        }
    }
}

/// Output pixels `ow0 .. ow1` of one row of a channel tile, one at a time.
#[allow(clippy::too_many_arguments)]
fn pixels(fx: &mut Fx<'_>, g: &Geo, k: &Consts, epi: &Epi, rc: &RowCx, valid: usize, ow0: usize, ow1: usize) {
    if ow1 <= ow0 {
        return;
    }
    let cols = fx.addr(k.cols);
    let cols = fx.addi(cols, c(4 * ow0 * g.kw));
    let range = fx.addr(k.col_range);
    let range = fx.addi(range, c(8 * ow0));
    let ypix = fx.addi(rc.yrow, c(4 * ow0));
    let rpix = fx.addi(rc.rrow, c(4 * ow0));
    let vals = [cols, range, ypix, rpix, rc.xg, rc.wt, rc.oc0, rc.rows, rc.kh_lo, rc.kh_hi];
    let steps = [c(4 * g.kw), 8, 4, 4, 0, 0, 0, 0, 0, 0];
    fx.loop_n(Count::Const(ow1 - ow0), vals, steps, |fx, v| {
        let [cols, range, ypix, rpix, xg, wt, oc0, rows, kh_lo, kh_hi] = v;
        pixel(fx, g, epi, valid, [cols, range, ypix, rpix, xg, wt, oc0, rows, kh_lo, kh_hi]);
    });
}

/// One output pixel of a channel tile at a border column: taps run over the real rows and
/// columns (looked up, so remapped padding works too), lanes across output channels.
fn pixel(fx: &mut Fx<'_>, g: &Geo, epi: &Epi, valid: usize, v: [Value; 10]) {
    let [cols, range, ypix, rpix, xg, wt, oc0, rows, kh_lo, kh_hi] = v;
    let kw_lo = fx.load_i32(range, 0);
    let kw_hi = fx.load_i32(range, 1);
    let vector = g.mr == LANES;
    // Independent accumulators, one set per unrolled input channel, so consecutive taps do
    // not wait on each other's `fma` latency.
    let unroll = [4, 2, 1].into_iter().find(|u| g.icg.is_multiple_of(*u)).unwrap_or(1);
    let zero_v = fx.vf(0.0);
    let zero_f = fx.f(0.0);
    let sets: Vec<Vec<Variable>> =
        (0..unroll)
            .map(|_| {
                if vector { vec![fx.var(V, zero_v)] } else { (0..valid).map(|_| fx.var(types::F32, zero_f)).collect() }
            })
            .collect();
    let plane_in = g.ih * g.iw;
    let taps_w = g.kw * g.icg * g.mr;
    let count = fx.b.ins().isub(kh_hi, kh_lo);
    let rp = fx.elem(rows, kh_lo);
    let wk = fx.elem_scaled(wt, kh_lo, c(taps_w));
    let vals = [rp, wk, xg, cols, kw_lo, kw_hi];
    fx.loop_n(Count::Dyn(count), vals, [4, c(4 * taps_w), 0, 0, 0, 0], |fx, [rp, wk, xg, cols, kw_lo, kw_hi]| {
        let r = fx.load_i32(rp, 0);
        let rowp = fx.elem_scaled(xg, r, c(g.iw));
        let n = fx.b.ins().isub(kw_hi, kw_lo);
        let cp = fx.elem(cols, kw_lo);
        let wkw = fx.elem_scaled(wk, kw_lo, c(g.icg * g.mr));
        fx.loop_n(Count::Dyn(n), [cp, wkw, rowp], [4, c(4 * g.icg * g.mr), 0], |fx, [cp, wkw, rowp]| {
            let col = fx.load_i32(cp, 0);
            let p = fx.elem(rowp, col);
            let steps = [c(4 * unroll * plane_in), c(4 * unroll * g.mr)];
            fx.loop_n(Count::Const(g.icg / unroll), [p, wkw], steps, |fx, [xp, wic]| {
                for (u, set) in sets.iter().enumerate() {
                    let xe = (u * plane_in) as i64;
                    let we = (u * g.mr) as i64;
                    if vector {
                        let xs = fx.load_splat(xp, xe);
                        let wv = fx.load_v(wic, we);
                        let s = fx.b.use_var(set[0]);
                        let s = fx.fma(xs, wv, s);
                        fx.b.def_var(set[0], s);
                    } else {
                        let xs = fx.load_f(xp, xe);
                        for (j, acc) in set.iter().enumerate() {
                            let w = fx.load_f(wic, we + j as i64);
                            let s = fx.b.use_var(*acc);
                            let s = fx.fma(w, xs, s);
                            fx.b.def_var(*acc, s);
                        }
                    }
                }
            });
        });
    });
    // Sum the sets into one vector whose lanes are the tile's channels.
    let lanes = |fx: &mut Fx<'_>, set: &[Variable]| {
        if vector {
            fx.b.use_var(set[0])
        } else {
            let mut v = fx.vf(0.0);
            for (j, a) in set.iter().enumerate() {
                let s = fx.b.use_var(*a);
                v = fx.b.ins().insertlane(v, s, j as u8);
            }
            v
        }
    };
    let mut acc = lanes(fx, &sets[0]);
    for set in &sets[1..] {
        let v = lanes(fx, set);
        acc = fx.b.ins().fadd(acc, v);
    }
    let plane = (g.oh * g.ow) as i64;
    let res = epi.residual.map(|_| {
        let mut v = fx.vf(0.0);
        for j in 0..valid {
            let s = fx.load_f(rpix, j as i64 * plane);
            v = fx.b.ins().insertlane(v, s, j as u8);
        }
        v
    });
    let p = epi.lanes(fx, oc0, valid);
    let out = epi.finish(fx, acc, &p, res);
    for j in 0..valid {
        let s = fx.b.ins().extractlane(out, j as u8);
        fx.store_f(s, ypix, j as i64 * plane);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_remap_each_padding_mode() {
        // 1-D input of 4, kernel 3, pad 2, stride 1: outputs 6.
        let t = |mode| axis_table(6, 3, 1, 1, 2, 4, mode).unwrap();
        let zeros = t(PaddingMode::Zeros);
        assert_eq!(&zeros[..6], &[-1, -1, 0, -1, 0, 1]);
        assert_eq!(&t(PaddingMode::Reflect)[..6], &[2, 1, 0, 1, 0, 1]);
        assert_eq!(&t(PaddingMode::Replicate)[..6], &[0, 0, 0, 0, 0, 1]);
        assert_eq!(&t(PaddingMode::Circular)[15..], &[3, 0, 1]);
        assert_eq!(tap_ranges(&zeros, 3).unwrap()[..4], [2, 3, 1, 3]);
        // Reflect padding as wide as the input reaches outside it: refused, never read.
        assert!(axis_table(3, 3, 1, 1, 2, 2, PaddingMode::Reflect).is_err());
    }

    #[test]
    fn vector_columns_keep_loads_inside_the_row() {
        // 3×3, pad 1 on 56: columns 1..55 (the last tile's loads end at column 55).
        assert_eq!(vector_columns(56, 56, 3, 1, 1, 1), Some((1, 55)));
        // Stride 2 also reads the element after the last tap.
        assert_eq!(vector_columns(28, 56, 3, 2, 1, 1), Some((1, 27)));
        // Too narrow for a single vector.
        assert_eq!(vector_columns(3, 5, 3, 1, 1, 0), None);
    }
}
