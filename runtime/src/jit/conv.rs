//! Conv2d: weight packing, border tables and the kernel.
//!
//! **Loop nest** (all bounds constants except the sample count):
//! `n → group → tile of MR output channels → output row → output columns`, and for each
//! piece of a row a register tile of `MR × NR` f32x4 accumulators (MR channels × NR·4
//! consecutive output pixels) that runs `input channel → kh → kw` with the taps unrolled.
//! Weights are packed once as `[group][channel tile][ic][kh][kw][MR]` (zero-padded to whole
//! tiles), so a tile reads them sequentially; a weight is broadcast with one
//! `vbroadcastss` and multiplied into NR input vectors with `fma`. The fused epilogue runs on
//! the accumulators before the single store. The tile is the unit a hand-written
//! micro-kernel can later replace.
//!
//! **Borders without a padded copy.** Rows: a table gives, for each `(oh, kh)`, the input row
//! after padding-mode remapping (reflect / replicate / circular), or −1 for a zero-padded
//! row; a −1 row selects a row of zeros instead of branching, so every output row uses the
//! vector tiles. Columns: the vector tiles cover the interior columns where every tap is in
//! the input (contiguous loads for stride 1, two loads and a `shufps` for stride 2, lane
//! inserts otherwise); the few border columns go through a per-pixel path that looks up
//! each tap's column in a second table and vectorises across the MR output channels instead.
//!
//! A 1×1, stride-1, unpadded convolution is run as if the image were one row of `H·W`
//! pixels, so it is a plain GEMM over all pixels.

use super::codegen::{Fx, Jit, LANES, V, c};
use super::epilogue::Epi;
use super::lower::NodeCx;
use crate::error::{Error, Result};
use cnnc_compiler::ops::{Conv2d, PaddingMode};
use cranelift_codegen::ir::{InstBuilder, Value, types};
use cranelift_frontend::Variable;

/// Maps an input coordinate that may lie in the padding to the element PyTorch reads: the
/// remapped index, or −1 for a zero.
fn remap(i: i64, n: usize, mode: PaddingMode) -> i64 {
    let n = n as i64;
    match mode {
        PaddingMode::Zeros if (0..n).contains(&i) => i,
        PaddingMode::Zeros => -1,
        PaddingMode::Reflect if i < 0 => -i,
        PaddingMode::Reflect if i >= n => 2 * (n - 1) - i,
        PaddingMode::Reflect => i,
        PaddingMode::Replicate => i.clamp(0, n - 1),
        PaddingMode::Circular => i.rem_euclid(n),
    }
}

/// One spatial axis: for every output position and tap, the input index it reads (or −1).
pub(super) fn axis_table(
    out: usize,
    taps: usize,
    stride: usize,
    dilation: usize,
    pad: usize,
    input: usize,
    mode: PaddingMode,
) -> Result<Vec<i32>> {
    let mut t = Vec::with_capacity(out * taps);
    for o in 0..out {
        for k in 0..taps {
            let i = (o * stride + k * dilation) as i64 - pad as i64;
            let r = remap(i, input, mode);
            if r < -1 || r >= input as i64 || (r == -1 && mode != PaddingMode::Zeros) {
                return Err(Error::Unsupported(format!(
                    "{} padding reaches index {i} of an axis of size {input}",
                    mode.name()
                )));
            }
            t.push(r as i32);
        }
    }
    Ok(t)
}

/// The interior output columns `[lo, end)` where 4-pixel vector loads of every tap stay inside
/// the input row (`None` if there are none).
pub(super) fn vector_columns(
    out_w: usize,
    in_w: usize,
    kw: usize,
    stride: usize,
    dilation: usize,
    pad: usize,
) -> Option<(usize, usize)> {
    let extra = usize::from(stride == 2);
    let lo = pad.div_ceil(stride);
    // Largest start s with (s + 3)·stride − pad + (kw − 1)·dilation + extra ≤ in_w − 1.
    let reach = (in_w + pad) as i64 - 1 - extra as i64 - ((kw - 1) * dilation) as i64;
    if reach < 0 {
        return None;
    }
    let s_max = reach / stride as i64 - 3;
    let end = (s_max + 4).min(out_w as i64);
    (end >= lo as i64 + LANES as i64).then_some((lo, end as usize))
}

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
pub(super) fn lower(jit: &mut Jit, cx: &NodeCx<'_>, conv: &Conv2d) -> Result<()> {
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

/// Pointers and ranges shared by the pieces of one output row of one channel tile.
struct RowCx {
    /// Input of the current group.
    xg: Value,
    /// Packed weights of the current channel tile.
    wt: Value,
    /// Output (and residual) at `(oc0, oh, 0)`.
    yrow: Value,
    rrow: Option<Value>,
    /// First output channel of the tile.
    oc0: Value,
    /// Valid channels in the tile.
    valid: usize,
    /// This row's `rows` table entries.
    rows: Value,
    /// The kh range of real rows.
    kh_lo: Value,
    kh_hi: Value,
}

#[allow(clippy::too_many_arguments)]
fn emit(fx: &mut Fx<'_>, g: &Geo, k: &Consts, epi: &Epi, xs: usize, ys: usize, vcols: Option<(usize, usize)>) {
    let x = fx.slot(xs);
    let y = fx.slot(ys);
    let r = epi.residual.map(|s| fx.slot(s));
    fx.for_samples(|fx, n| {
        let xn = fx.elem_scaled(x, n, c(g.in_size));
        let yn = fx.elem_scaled(y, n, c(g.out_size));
        let rn = r.map(|r| fx.elem_scaled(r, n, c(g.out_size)));
        fx.for_const(0, g.groups, 1, |fx, gi| {
            let xg = fx.elem_scaled(xn, gi, c(g.icg * g.ih * g.iw));
            let full = g.ocg / g.mr;
            let part = g.ocg % g.mr;
            let tile = |fx: &mut Fx<'_>, t: Value, valid: usize| {
                let gt = fx.muli(gi, c(g.tiles));
                let gt = fx.add(gt, t);
                let wbase = fx.addr(k.w);
                let wt = fx.elem_scaled(wbase, gt, c(g.kh * g.kw * g.icg * g.mr));
                let og = fx.muli(gi, c(g.ocg));
                let ot = fx.muli(t, c(g.mr));
                let oc0 = fx.add(og, ot);
                fx.for_const(0, g.oh, 1, |fx, oh| {
                    let rt = fx.addr(k.rows);
                    let rows = fx.elem_scaled(rt, oh, c(g.kh));
                    let rr = fx.addr(k.row_range);
                    let rr = fx.elem_scaled(rr, oh, 2);
                    let kh_lo = fx.load_i32(rr, 0);
                    let kh_hi = fx.load_i32(rr, 1);
                    let ybase = fx.muli(oc0, c(g.oh * g.ow));
                    let yoff = fx.muli(oh, c(g.ow));
                    let yidx = fx.add(ybase, yoff);
                    let yrow = fx.elem(yn, yidx);
                    let rrow = rn.map(|rn| fx.elem(rn, yidx));
                    let rc = RowCx { xg, wt, yrow, rrow, oc0, valid, rows, kh_lo, kh_hi };
                    row(fx, g, k, epi, &rc, vcols);
                });
            };
            if full > 0 {
                fx.for_const(0, full, 1, |fx, t| tile(fx, t, g.mr));
            }
            if part > 0 {
                let t = fx.i(c(full));
                tile(fx, t, part);
            }
        });
    });
}

/// One output row of one channel tile: vector tiles over the interior, pixels at the edges.
fn row(fx: &mut Fx<'_>, g: &Geo, k: &Consts, epi: &Epi, rc: &RowCx, vcols: Option<(usize, usize)>) {
    let (lo, end) = vcols.unwrap_or((0, 0));
    let tw = LANES * g.nr;
    let big = (end - lo) / tw;
    let tail_vecs = (end - lo - big * tw) / LANES;
    fx.for_const(c(lo), big, c(tw), |fx, ow0| vtile(fx, g, k, epi, rc, ow0, g.nr));
    let mut done = lo + big * tw;
    if tail_vecs > 0 {
        let ow0 = fx.i(c(done));
        vtile(fx, g, k, epi, rc, ow0, tail_vecs);
        done += tail_vecs * LANES;
    }
    let (left, right) = if vcols.is_some() { (lo, done) } else { (0, 0) };
    fx.for_const(0, left, 1, |fx, ow| pixel(fx, g, k, epi, rc, ow));
    fx.for_const(c(right), g.ow - right, 1, |fx, ow| pixel(fx, g, k, epi, rc, ow));
}

/// A register tile: `valid` channels × `nrv` vectors of 4 pixels starting at `ow0`.
///
/// The taps run as `kh` (real rows only) → `(kw, ic)` flattened into one loop whose offsets
/// come from a table, two taps per iteration when the count is even. Keeping one or two taps
/// per loop body matters: the e-graph pass schedules each accumulator's whole chain of
/// `fma`s at once, so straight-line code over many taps would keep every tap's input live.
fn vtile(fx: &mut Fx<'_>, g: &Geo, k: &Consts, epi: &Epi, rc: &RowCx, ow0: Value, nrv: usize) {
    let zero_v = fx.vf(0.0);
    let acc: Vec<Vec<Variable>> = (0..rc.valid).map(|_| (0..nrv).map(|_| fx.var(V, zero_v)).collect()).collect();
    let xoff = fx.muli(ow0, c(4 * g.sw));
    let xrow = fx.add(rc.xg, xoff);
    let taps = g.kw * g.icg;
    let unroll = if taps % 2 == 0 { 2 } else { 1 };
    fx.for_range(rc.kh_lo, rc.kh_hi, 1, |fx, kh| {
        let rp = fx.elem(rc.rows, kh);
        let r = fx.load_i32(rp, 0);
        let base = fx.elem_scaled(xrow, r, c(g.iw));
        let wk = fx.elem_scaled(rc.wt, kh, c(taps * g.mr));
        fx.for_const(0, taps / unroll, c(unroll), |fx, q| {
            let tab = fx.addr(k.taps);
            let tq = fx.elem(tab, q);
            let wq = fx.elem_scaled(wk, q, c(g.mr));
            for u in 0..unroll {
                let off = fx.load_i32(tq, u as i64);
                let p = fx.elem(base, off);
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
            }
        });
    });
    let plane = (g.oh * g.ow) as i64;
    let yo = fx.elem(rc.yrow, ow0);
    let ro = rc.rrow.map(|r| fx.elem(r, ow0));
    for (j, accj) in acc.iter().enumerate() {
        let ch = fx.addi(rc.oc0, j as i64);
        let p = epi.splat(fx, ch);
        for (v, var) in accj.iter().enumerate() {
            let off = j as i64 * plane + (v * LANES) as i64;
            let a = fx.b.use_var(*var);
            let res = ro.map(|ro| fx.load_v(ro, off));
            let out = epi.finish(fx, a, &p, res);
            fx.store_v(out, yo, off);
        }
    }
}

/// One output pixel of a channel tile, at a border column: taps run over the real rows and
/// columns (looked up, so remapped padding works too), lanes across output channels.
fn pixel(fx: &mut Fx<'_>, g: &Geo, k: &Consts, epi: &Epi, rc: &RowCx, ow: Value) {
    let ct = fx.addr(k.cols);
    let cols = fx.elem_scaled(ct, ow, c(g.kw));
    let cr = fx.addr(k.col_range);
    let cr = fx.elem_scaled(cr, ow, 2);
    let kw_lo = fx.load_i32(cr, 0);
    let kw_hi = fx.load_i32(cr, 1);
    let vector = g.mr == LANES;
    let zero_v = fx.vf(0.0);
    let zero_f = fx.f(0.0);
    let accs: Vec<Variable> =
        if vector { vec![fx.var(V, zero_v)] } else { (0..rc.valid).map(|_| fx.var(types::F32, zero_f)).collect() };
    let plane_in = c(g.ih * g.iw);
    fx.for_range(rc.kh_lo, rc.kh_hi, 1, |fx, kh| {
        let rp = fx.elem(rc.rows, kh);
        let r = fx.load_i32(rp, 0);
        let rowp = fx.elem_scaled(rc.xg, r, c(g.iw));
        let wk = fx.elem_scaled(rc.wt, kh, c(g.kw * g.icg * g.mr));
        fx.for_range(kw_lo, kw_hi, 1, |fx, kw| {
            let cp = fx.elem(cols, kw);
            let col = fx.load_i32(cp, 0);
            let p = fx.elem(rowp, col);
            let wkw = fx.elem_scaled(wk, kw, c(g.icg * g.mr));
            fx.for_const(0, g.icg, 1, |fx, ic| {
                let xp = fx.elem_scaled(p, ic, plane_in);
                let wic = fx.elem_scaled(wkw, ic, c(g.mr));
                if vector {
                    let xs = fx.load_splat(xp, 0);
                    let wv = fx.load_v(wic, 0);
                    let s = fx.b.use_var(accs[0]);
                    let s = fx.fma(xs, wv, s);
                    fx.b.def_var(accs[0], s);
                } else {
                    let xs = fx.load_f(xp, 0);
                    for (j, acc) in accs.iter().enumerate() {
                        let w = fx.load_f(wic, j as i64);
                        let s = fx.b.use_var(*acc);
                        let s = fx.fma(w, xs, s);
                        fx.b.def_var(*acc, s);
                    }
                }
            });
        });
    });
    let acc = if vector {
        fx.b.use_var(accs[0])
    } else {
        let mut v = fx.vf(0.0);
        for (j, a) in accs.iter().enumerate() {
            let s = fx.b.use_var(*a);
            v = fx.b.ins().insertlane(v, s, j as u8);
        }
        v
    };
    let plane = (g.oh * g.ow) as i64;
    let yp = fx.elem(rc.yrow, ow);
    let res = rc.rrow.map(|r| {
        let rp = fx.elem(r, ow);
        let mut v = fx.vf(0.0);
        for j in 0..rc.valid {
            let s = fx.load_f(rp, j as i64 * plane);
            v = fx.b.ins().insertlane(v, s, j as u8);
        }
        v
    });
    let p = epi.lanes(fx, rc.oc0, rc.valid);
    let out = epi.finish(fx, acc, &p, res);
    for j in 0..rc.valid {
        let s = fx.b.ins().extractlane(out, j as u8);
        fx.store_f(s, yp, j as i64 * plane);
    }
}
