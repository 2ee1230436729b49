//! Pooling kernels: MaxPool2d, AvgPool2d and AdaptiveAvgPool2d.
//!
//! Max and average pooling share the convolution's scheme (see [`super::conv`]): per plane
//! and output row, a table gives each window row's input row or −1; an out-of-range row
//! selects a row of the neutral element (−inf for max, 0 for average) instead of branching;
//! interior columns run 8 pixels at a time in f32x4 (strided loads as for conv), the border
//! columns one pixel at a time through a column table. Max propagates NaN as PyTorch does
//! ([`crate::jit::math::nan_max`]). The average's divisor is separable, `rows(oh) · cols(ow)`, with
//! both factors precomputed by ATen's rule for `count_include_pad` and `ceil_mode`
//! (or `divisor_override · 1`).
//!
//! Adaptive average pooling sums each ATen window `[⌊i·in/out⌋, ⌈(i+1)·in/out⌉)` with
//! loops driven by window tables; the global case (1×1 output) sums the plane with vectors.

use crate::error::Result;
use crate::jit::codegen::{Fx, Jit, LANES, c, non_negative};
use crate::jit::cx::NodeCx;
use crate::jit::eltwise::for_vectors;
use crate::jit::tables::avg_factor;
use crate::jit::tables::{axis_table, vector_columns};
use cnnc_compiler::ops::{AvgPool2d, MaxPool2d, PaddingMode};
use cnnc_compiler::shape::adaptive_window;
use cranelift_codegen::ir::{InstBuilder, Value, types};

/// Vectors per interior tile.
const NR: usize = 2;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Max,
    Avg,
}

/// What an average is divided by.
#[derive(Clone, Copy, Debug)]
enum Divisor {
    /// The window's size (clipped per ATen; padding counted or not).
    Window { count_include_pad: bool },
    /// `divisor_override`.
    Override(usize),
}

#[derive(Clone, Copy, Debug)]
struct Geo {
    ch: usize,
    ih: usize,
    iw: usize,
    oh: usize,
    ow: usize,
    kh: usize,
    kw: usize,
    sw: usize,
    dw: usize,
    pw: usize,
    kind: Kind,
    rows_pad: bool,
    cols_pad: bool,
}

#[derive(Clone, Copy, Debug)]
struct Consts {
    rows: i64,
    cols: i64,
    neutral: i64,
    /// Average only: per-row and per-column divisor factors.
    div: Option<(i64, i64)>,
}

#[allow(clippy::too_many_arguments)]
fn window(
    jit: &mut Jit,
    cx: &NodeCx<'_>,
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
    dilation: (usize, usize),
    kind: Kind,
    divisor: Divisor,
) -> Result<()> {
    let (ch, ih, iw) = cx.in_chw(0)?;
    let (_, oh, ow) = cx.out_chw()?;
    let rows = axis_table(oh, kernel.0, stride.0, dilation.0, padding.0, ih, PaddingMode::Zeros)?;
    let cols = axis_table(ow, kernel.1, stride.1, dilation.1, padding.1, iw, PaddingMode::Zeros)?;
    let geo = Geo {
        ch,
        ih,
        iw,
        oh,
        ow,
        kh: kernel.0,
        kw: kernel.1,
        sw: stride.1,
        dw: dilation.1,
        pw: padding.1,
        kind,
        rows_pad: rows.contains(&-1),
        cols_pad: cols.contains(&-1),
    };
    let neutral = if kind == Kind::Max { f32::NEG_INFINITY } else { 0.0 };
    let div = (kind == Kind::Avg).then(|| {
        let (h, w): (Vec<f32>, Vec<f32>) = match divisor {
            Divisor::Override(d) => (vec![d as f32; oh], vec![1.0; ow + LANES]),
            Divisor::Window { count_include_pad } => (
                (0..oh).map(|o| avg_factor(o, kernel.0, stride.0, padding.0, ih, count_include_pad)).collect(),
                (0..ow).map(|o| avg_factor(o, kernel.1, stride.1, padding.1, iw, count_include_pad)).collect(),
            ),
        };
        (jit.consts.f32s(h), jit.consts.f32s(w))
    });
    let k = Consts {
        rows: jit.consts.i32s(rows),
        cols: jit.consts.i32s(cols),
        neutral: jit.consts.f32s(vec![neutral; iw + 8]),
        div,
    };
    let (xs, ys) = (cx.inputs[0], cx.output);
    jit.kernel(&cx.node.name, |fx| emit(fx, &geo, &k, xs, ys))?;
    Ok(())
}

fn combine(fx: &mut Fx<'_>, kind: Kind, a: Value, b: Value) -> Value {
    match kind {
        Kind::Max => crate::jit::math::nan_max(fx, a, b),
        Kind::Avg => fx.b.ins().fadd(a, b),
    }
}

fn emit(fx: &mut Fx<'_>, g: &Geo, k: &Consts, xs: usize, ys: usize) {
    let x = fx.slot(xs);
    let y = fx.slot(ys);
    let in_plane = g.ih * g.iw;
    let out_plane = g.oh * g.ow;
    let vcols = vector_columns(g.ow, g.iw, g.kw, g.sw, g.dw, g.pw);
    let nval = if g.kind == Kind::Max { f32::NEG_INFINITY } else { 0.0 };
    fx.for_samples(|fx, n| {
        let xn = fx.elem_scaled(x, n, c(g.ch * in_plane));
        let yn = fx.elem_scaled(y, n, c(g.ch * out_plane));
        fx.for_const(0, g.ch, 1, |fx, chn| {
            let xc = fx.elem_scaled(xn, chn, c(in_plane));
            let yc = fx.elem_scaled(yn, chn, c(out_plane));
            fx.for_const(0, g.oh, 1, |fx, oh| {
                let neutral = fx.addr(k.neutral);
                // Row pointers of the window, neutral rows for padding.
                let tab = fx.addr(k.rows);
                let base = fx.muli(oh, c(g.kh));
                let tab = fx.elem(tab, base);
                let mut rowp = vec![];
                let mut rowv = vec![];
                for a in 0..g.kh {
                    let r = fx.load_i32(tab, a as i64);
                    let p = fx.elem_scaled(xc, r, c(g.iw));
                    let ok = non_negative(fx, r);
                    rowp.push(if g.rows_pad { fx.select(ok, p, neutral) } else { p });
                    rowv.push(r);
                }
                let yrow = fx.elem_scaled(yc, oh, c(g.ow));
                let hdiv = k.div.map(|(h, _)| {
                    let h = fx.addr(h);
                    let p = fx.elem(h, oh);
                    fx.load_f(p, 0)
                });
                // Interior: NR vectors at a time, then single vectors.
                let (lo, end) = vcols.unwrap_or((0, 0));
                let tw = NR * LANES;
                let big = (end - lo) / tw;
                let singles = (end - lo - big * tw) / LANES;
                let vtile = |fx: &mut Fx<'_>, ow0: Value, nv: usize| {
                    let init = fx.vf(nval);
                    let mut acc = vec![init; nv];
                    let xoff = fx.muli(ow0, c(4 * g.sw));
                    for p in &rowp {
                        let rb = fx.add(*p, xoff);
                        for b in 0..g.kw {
                            let col = (b * g.dw) as i64 - g.pw as i64;
                            for (v, a) in acc.iter_mut().enumerate() {
                                let xv = fx.load_strided(rb, col + (v * LANES * g.sw) as i64, g.sw);
                                *a = combine(fx, g.kind, *a, xv);
                            }
                        }
                    }
                    let yp = fx.elem(yrow, ow0);
                    for (v, a) in acc.into_iter().enumerate() {
                        let mut out = a;
                        if let (Some((_, w)), Some(hd)) = (k.div, hdiv) {
                            let w = fx.addr(w);
                            let wp = fx.elem(w, ow0);
                            let wd = fx.load_v(wp, (v * LANES) as i64);
                            let hv = fx.b.ins().splat(crate::jit::codegen::V, hd);
                            let d = fx.b.ins().fmul(hv, wd);
                            out = fx.b.ins().fdiv(out, d);
                        }
                        fx.store_v(out, yp, (v * LANES) as i64);
                    }
                };
                fx.for_const(c(lo), big, c(tw), |fx, ow0| vtile(fx, ow0, NR));
                let mut done = lo + big * tw;
                for _ in 0..singles {
                    let ow0 = fx.i(c(done));
                    vtile(fx, ow0, 1);
                    done += LANES;
                }
                let (left, right) = if vcols.is_some() { (lo, done) } else { (0, 0) };
                let pixel = |fx: &mut Fx<'_>, ow: Value| {
                    let tab = fx.addr(k.cols);
                    let base = fx.muli(ow, c(g.kw));
                    let tab = fx.elem(tab, base);
                    let mut acc = fx.f(nval);
                    for (a, p) in rowp.iter().enumerate() {
                        for b in 0..g.kw {
                            let col = fx.load_i32(tab, b as i64);
                            let mut addr = fx.elem(*p, col);
                            if g.cols_pad || g.rows_pad {
                                let both = fx.b.ins().bor(rowv[a], col);
                                let ok = non_negative(fx, both);
                                addr = fx.select(ok, addr, neutral);
                            }
                            let v = fx.load_f(addr, 0);
                            acc = combine(fx, g.kind, acc, v);
                        }
                    }
                    if let (Some((_, w)), Some(hd)) = (k.div, hdiv) {
                        let w = fx.addr(w);
                        let wp = fx.elem(w, ow);
                        let wd = fx.load_f(wp, 0);
                        let d = fx.b.ins().fmul(hd, wd);
                        acc = fx.b.ins().fdiv(acc, d);
                    }
                    let yp = fx.elem(yrow, ow);
                    fx.store_f(acc, yp, 0);
                };
                fx.for_const(0, left, 1, pixel);
                fx.for_const(c(right), g.ow - right, 1, pixel);
            });
        });
    });
}

/// Lowers a MaxPool2d node (−inf padding).
pub(in crate::jit) fn max_pool(jit: &mut Jit, cx: &NodeCx<'_>, p: &MaxPool2d) -> Result<()> {
    window(jit, cx, p.kernel, p.stride, p.padding, p.dilation, Kind::Max, Divisor::Override(1))
}

/// Lowers an AvgPool2d node.
pub(in crate::jit) fn avg_pool(jit: &mut Jit, cx: &NodeCx<'_>, p: &AvgPool2d) -> Result<()> {
    let divisor = match p.divisor_override {
        Some(d) => Divisor::Override(d),
        None => Divisor::Window { count_include_pad: p.count_include_pad },
    };
    window(jit, cx, p.kernel, p.stride, p.padding, (1, 1), Kind::Avg, divisor)
}

/// Lowers an AdaptiveAvgPool2d node.
pub(in crate::jit) fn adaptive_avg_pool(jit: &mut Jit, cx: &NodeCx<'_>) -> Result<()> {
    let (ch, ih, iw) = cx.in_chw(0)?;
    let (_, oh, ow) = cx.out_chw()?;
    let (in_plane, out_plane) = (ih * iw, oh * ow);
    let win = |out: usize, input: usize| -> Vec<i32> {
        (0..out)
            .flat_map(|i| {
                let (s, e) = adaptive_window(i, input, out);
                [s as i32, e as i32]
            })
            .collect()
    };
    let hw = jit.consts.i32s(win(oh, ih));
    let ww = jit.consts.i32s(win(ow, iw));
    let (xs, ys) = (cx.inputs[0], cx.output);
    jit.kernel(&cx.node.name, |fx| {
        let x = fx.slot(xs);
        let y = fx.slot(ys);
        fx.for_samples(|fx, n| {
            let xn = fx.elem_scaled(x, n, c(ch * in_plane));
            let yn = fx.elem_scaled(y, n, c(ch * out_plane));
            fx.for_const(0, ch, 1, |fx, k| {
                let xc = fx.elem_scaled(xn, k, c(in_plane));
                let yc = fx.elem_scaled(yn, k, c(out_plane));
                if out_plane == 1 {
                    let zero = fx.vf(0.0);
                    let acc = fx.var(crate::jit::codegen::V, zero);
                    for_vectors(fx, in_plane, |fx, i, lanes| {
                        let p = fx.elem(xc, i);
                        let v = fx.load_partial(p, 0, lanes);
                        let a = fx.b.use_var(acc);
                        let s = fx.b.ins().fadd(a, v);
                        fx.b.def_var(acc, s);
                    });
                    let v = fx.b.use_var(acc);
                    let mut s = fx.b.ins().extractlane(v, 0);
                    for l in 1..LANES as u8 {
                        let e = fx.b.ins().extractlane(v, l);
                        s = fx.b.ins().fadd(s, e);
                    }
                    let d = fx.f(in_plane as f32);
                    let r = fx.b.ins().fdiv(s, d);
                    fx.store_f(r, yc, 0);
                    return;
                }
                fx.for_const(0, oh, 1, |fx, o| {
                    let ht = fx.addr(hw);
                    let hp = fx.elem_scaled(ht, o, 2);
                    let hs = fx.load_i32(hp, 0);
                    let he = fx.load_i32(hp, 1);
                    fx.for_const(0, ow, 1, |fx, q| {
                        let wt = fx.addr(ww);
                        let wp = fx.elem_scaled(wt, q, 2);
                        let ws = fx.load_i32(wp, 0);
                        let we = fx.load_i32(wp, 1);
                        let zero = fx.f(0.0);
                        let acc = fx.var(types::F32, zero);
                        fx.for_range(hs, he, 1, |fx, r| {
                            let row = fx.elem_scaled(xc, r, c(iw));
                            fx.for_range(ws, we, 1, |fx, col| {
                                let p = fx.elem(row, col);
                                let v = fx.load_f(p, 0);
                                let a = fx.b.use_var(acc);
                                let s = fx.b.ins().fadd(a, v);
                                fx.b.def_var(acc, s);
                            });
                        });
                        let dh = fx.b.ins().isub(he, hs);
                        let dw = fx.b.ins().isub(we, ws);
                        let cnt = fx.b.ins().imul(dh, dw);
                        let cnt = fx.b.ins().fcvt_from_sint(types::F32, cnt);
                        let s = fx.b.use_var(acc);
                        let r = fx.b.ins().fdiv(s, cnt);
                        let oi = fx.muli(o, c(ow));
                        let oi = fx.add(oi, q);
                        let yp = fx.elem(yc, oi);
                        fx.store_f(r, yp, 0);
                    });
                });
            });
        });
    })?;
    Ok(())
}
