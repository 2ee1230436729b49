//! Conv2d and Linear on the micro-kernel tiles ([`super::microkernel`]): the loop nests,
//! packing, border tables and activation passes the generated code wraps around each
//! hand-written register tile.
//!
//! **Conv2d** (result in the blocked layout; operand blocked, or plain for a net's first
//! layer). Output channels are cut into *channel groups* of at most `isa.conv_nb()` blocks
//! of 16, as evenly as possible; each group's weights are packed once as
//! `[icb][kh][kw][c][nb·16]`. The work is a list of units — one output row of one channel
//! group of one sample, ordered group → sample → row so a group's weights stay in cache —
//! and part `p` of `P` of a call does units `[p·U/P, (p+1)·U/P)`. A unit is a few tile
//! calls along the row: the interior columns, where every tap reads a real input column,
//! go `MR` pixels at a time with one shared column table; the border columns one pixel at
//! a time, each with its own table (zero padding drops taps, the other modes remap them).
//! Each output row's table lists the kernel rows it reads the same way. So there is no
//! padded copy of the input for any padding mode. The whole epilogue — bias, BatchNorm's
//! scale and shift, the residual, the activation — runs in the tile, on the accumulators.
//!
//! **Linear**. Weights are packed once per tile of `isa.gemm_nr()` output features as
//! `[K][width]` (the last tile only as wide as it needs), with the columns permuted when the
//! operand is a flattened blocked image so that the kernel reads it as it lies. Units are
//! column tiles; within one, row blocks of `isa.gemm_mr()` go through the tile, the last
//! block with the remaining rows. At batch 1 that is a GEMV that streams the weights once,
//! split between threads by columns.

use super::codegen::{Count, Fx, Jit, c};
use super::conv::axis_table;
use super::lower::NodeCx;
use super::microkernel::{self, Act, ConvTile, GemmTile, Isa};
use super::plan::{BLOCK, Layout};
use crate::error::{Error, Result};
use cnnc_compiler::ops::{Conv2d, Epilogue, Linear, PaddingMode};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{InstBuilder, Value};

/// Optional per-channel scale and shift.
type ScaleShift = (Option<Vec<f32>>, Option<Vec<f32>>);

/// Per-channel `(scale, shift)` of an epilogue with the bias folded in (`(acc + b)·s + t =
/// acc·s + (b·s + t)`, in f64), each padded with zeros to `padded` channels; `None` where
/// the factor is absent.
fn affine(cx: &NodeCx<'_>, bias: bool, e: &Epilogue, channels: usize, padded: usize) -> Result<ScaleShift> {
    let b = if bias { Some(cx.param("bias")?) } else { None };
    let pad = |mut v: Vec<f32>| {
        v.resize(padded, 0.0);
        v
    };
    if e.scale_shift {
        let (s, t) = (cx.param("scale")?, cx.param("shift")?);
        let shift: Vec<f32> = (0..channels)
            .map(|k| {
                let bk = b.as_ref().map_or(0.0, |b| f64::from(b[k]));
                (bk * f64::from(s[k]) + f64::from(t[k])) as f32
            })
            .collect();
        Ok((Some(pad(s)), Some(pad(shift))))
    } else {
        Ok((None, b.map(pad)))
    }
}

/// One channel group of a conv: first block (global), blocks, and where its weights and
/// its input channels start.
#[derive(Clone, Copy, Debug)]
struct Group {
    ocb0: usize,
    nb: usize,
    /// Offset of the packed weights, in floats.
    w_off: usize,
    /// Offset of the group's input channels in a sample, in floats.
    x_off: usize,
}

/// Splits `blocks` into runs of at most `max` blocks, as even as possible.
fn split_even(blocks: usize, max: usize) -> Vec<usize> {
    let n = blocks.div_ceil(max.max(1)).max(1);
    (0..n).map(|i| blocks / n + usize::from(i < blocks % n)).filter(|&b| b > 0).collect()
}

/// The valid taps of one output position: `(first tap, input indices)`. Zero padding keeps
/// the contiguous range of taps inside the input; the other modes keep every tap, remapped.
fn taps(table: &[i32], mode: PaddingMode) -> Result<(usize, Vec<i32>)> {
    if mode != PaddingMode::Zeros {
        return Ok((0, table.to_vec()));
    }
    let lo = table.iter().position(|&i| i >= 0).unwrap_or(table.len());
    let hi = table.iter().rposition(|&i| i >= 0).map_or(lo, |p| p + 1);
    if table[lo..hi].contains(&-1) {
        return Err(Error::Unsupported("conv taps inside the input are not contiguous".into()));
    }
    Ok((lo, table[lo..hi].to_vec()))
}

/// Appends one tap table `[count, first, offsets…]` (padded to `2 + taps` entries) and
/// returns its index in entries.
fn push_entry(t: &mut Vec<i64>, len: usize, first: usize, offs: impl Iterator<Item = i64>) -> usize {
    let start = t.len();
    t.push(0);
    t.push(first as i64);
    let mut n = 0;
    for o in offs {
        t.push(o);
        n += 1;
    }
    t[start] = n;
    t.resize(start + 2 + len, 0);
    start / (2 + len)
}

/// Lowers a Conv2d node whose result is blocked.
pub(super) fn conv(jit: &mut Jit, cx: &NodeCx<'_>, conv: &Conv2d) -> Result<()> {
    let isa = jit.isa.ok_or_else(|| Error::Unsupported("blocked conv without a micro-kernel ISA".into()))?;
    let (cin, ih, iw) = cx.in_chw(0)?;
    let (cout, oh, ow) = cx.out_chw()?;
    let (kh, kw) = conv.kernel;
    let (sh, sw) = conv.stride;
    let (dh, dw) = conv.dilation;
    let (pt, _, pl, _) = conv.pads();
    let groups = conv.groups;
    let (icg, ocg) = (cin / groups, cout / groups);
    let blocked_in = cx.in_layouts[0].is_blocked();
    // Element strides of the operand: a column, a row, a channel block, a channel.
    let (col, row, x_icb, x_c) = if blocked_in { (BLOCK, iw * BLOCK, ih * iw * BLOCK, 1) } else { (1, iw, 0, ih * iw) };
    let (icb, c_full) = if blocked_in { (icg.div_ceil(BLOCK), BLOCK) } else { (1, icg) };
    let c_last = icg - (icb - 1) * c_full;
    let ocbg = ocg.div_ceil(BLOCK);

    // Channel groups and their packed weights.
    let w = cx.param("weight")?;
    let mut packed = vec![];
    let mut gs = vec![];
    for g in 0..groups {
        let x_off = if blocked_in { g * icb * x_icb } else { g * icg * x_c };
        let mut ocb = g * ocbg;
        for nb in split_even(ocbg, isa.conv_nb()) {
            let w_off = packed.len();
            let width = nb * BLOCK;
            packed.resize(w_off + icb * kh * kw * c_full * width, 0.0);
            for b in 0..icb {
                for a in 0..kh {
                    for t in 0..kw {
                        for ch in 0..c_full {
                            let ic = b * c_full + ch;
                            if ic >= icg {
                                continue;
                            }
                            for j in 0..width {
                                let oc = ocb * BLOCK + j;
                                if oc >= (g + 1) * ocg.max(1) || oc >= cout {
                                    continue;
                                }
                                let dst = w_off + (((b * kh + a) * kw + t) * c_full + ch) * width + j;
                                packed[dst] = w[((oc * icg + ic) * kh + a) * kw + t];
                            }
                        }
                    }
                }
            }
            gs.push(Group { ocb0: ocb, nb, w_off, x_off });
            ocb += nb;
        }
    }

    // Row tables (one per output row) and column tables (one for the interior, one per
    // border column).
    let mode = conv.padding_mode;
    let rows = axis_table(oh, kh, sh, dh, pt, ih, mode)?;
    let mut row_tab = vec![];
    for r in rows.chunks(kh) {
        let (first, ins) = taps(r, mode)?;
        push_entry(&mut row_tab, kh, first, ins.iter().map(|&i| c(i as usize * row)));
    }
    let cols = axis_table(ow, kw, sw, dw, pl, iw, mode)?;
    let mut col_tab = vec![];
    let interior = push_entry(&mut col_tab, kw, 0, (0..kw).map(|t| c(t * dw * col)));
    // Interior columns: every tap's column `o·sw + t·dw − pl` lies in `[0, iw)`.
    let lo = pl.div_ceil(sw);
    let reach = (iw + pl) as i64 - 1 - ((kw - 1) * dw) as i64;
    let hi = if reach < 0 { 0 } else { (reach as usize / sw + 1).min(ow) };
    let (lo, hi) = if lo < hi { (lo, hi) } else { (ow, ow) };
    let mut border = vec![];
    for o in (0..lo).chain(hi..ow) {
        let (first, ins) = taps(&cols[o * kw..(o + 1) * kw], mode)?;
        border.push((o, push_entry(&mut col_tab, kw, first, ins.iter().map(|&i| c(i as usize * col)))));
    }

    let (scale, shift) = affine(cx, conv.bias, &conv.epilogue, cout, cout.div_ceil(BLOCK) * BLOCK)?;
    let tile = ConvTile {
        isa,
        icb,
        c_full,
        c_last,
        x_icb: x_icb as isize,
        x_c: x_c as isize,
        x_px: (sw * col) as isize,
        kh,
        kw,
        y_blk: (oh * ow * BLOCK) as isize,
        channels: cout,
        scale: scale.map_or(std::ptr::null(), |v| jit.consts.f32s_aligned(&v) as usize as *const f32),
        shift: shift.map_or(std::ptr::null(), |v| jit.consts.f32s_aligned(&v) as usize as *const f32),
        act: Act::of(conv.epilogue.act),
    };
    let bytes = 4 * packed.len() + 8 * (row_tab.len() + col_tab.len());
    let w_addr = jit.consts.f32s_aligned(&packed);
    let desc = jit.consts.keep(tile, bytes);
    let rows_addr = jit.consts.i64s(row_tab);
    let cols_addr = jit.consts.i64s(col_tab);
    let (xs, ys) = (cx.inputs[0], cx.output);
    let res = conv.epilogue.residual.then(|| cx.inputs[1]);
    let (in_size, out_size) = (cx.in_lens[0], cx.out_len);
    let row_entry = 8 * (2 + kh);
    let col_entry = 8 * (2 + kw);
    let work = 2 * (cout * oh * ow * icg * kh * kw) as u64;
    let fmr = |nb: usize| isa.conv_mr(nb);
    jit.parallel_kernel(&cx.node.name, work, |fx| {
        let x = fx.slot(xs);
        let y = fx.slot(ys);
        let r = match res {
            Some(s) => fx.slot(s),
            None => fx.i(0),
        };
        let d = fx.i(desc);
        let units = fx.muli(fx.nb, c(gs.len() * oh));
        let (lo_u, hi_u) = part_range(fx, units);
        for (gi, g) in gs.iter().enumerate() {
            // This group's units are `[gi·nb·oh, (gi + 1)·nb·oh)`.
            let seg = fx.muli(fx.nb, c(oh));
            let seg0 = fx.muli(seg, c(gi));
            let seg1 = fx.add(seg0, seg);
            let a = max(fx, lo_u, seg0);
            let b = min(fx, hi_u, seg1);
            let wg = fx.i(w_addr + c(4 * g.w_off));
            let mr = fmr(g.nb);
            fx.for_range(a, b, 1, |fx, u| {
                let local = fx.b.ins().isub(u, seg0);
                let n = fx.b.ins().udiv_imm_u(local, c(oh));
                let orow = fx.b.ins().urem_imm_u(local, c(oh));
                let xn0 = fx.elem_scaled(x, n, c(in_size));
                let xn = fx.addi(xn0, c(4 * g.x_off));
                let yo = fx.muli(orow, c(4 * ow * BLOCK));
                let yn = fx.elem_scaled(y, n, c(out_size));
                let yu0 = fx.add(yn, yo);
                let yu = fx.addi(yu0, c(4 * g.ocb0 * oh * ow * BLOCK));
                let ru = if res.is_some() {
                    let rn = fx.elem_scaled(r, n, c(out_size));
                    let ru0 = fx.add(rn, yo);
                    fx.addi(ru0, c(4 * g.ocb0 * oh * ow * BLOCK))
                } else {
                    r
                };
                let rtab0 = fx.i(rows_addr);
                let roff = fx.muli(orow, c(row_entry));
                let rtab = fx.add(rtab0, roff);
                let call = |fx: &mut Fx<'_>, xp: Value, yp: Value, rp: Value, entry: usize, m: usize| {
                    let ctab = fx.i(cols_addr + c(entry * col_entry));
                    let shape = fx.i(microkernel::conv_shape(m, g.nb, g.ocb0));
                    fx.call(microkernel::conv_tile as *const () as usize, &[d, xp, wg, yp, rp, rtab, ctab, shape]);
                };
                let at = |fx: &mut Fx<'_>, p: Value, o: usize| fx.addi(p, c(4 * o * BLOCK));
                for &(o, entry) in border.iter().filter(|(o, _)| *o < lo) {
                    let (yp, rp) = (at(fx, yu, o), if res.is_some() { at(fx, ru, o) } else { ru });
                    call(fx, xn, yp, rp, entry, 1);
                }
                if hi > lo {
                    let full = (hi - lo) / mr;
                    let xp = fx.addi(xn, c(4 * (lo * sw - pl) * col));
                    let yp = at(fx, yu, lo);
                    let rp = if res.is_some() { at(fx, ru, lo) } else { ru };
                    let steps =
                        [c(4 * mr * sw * col), c(4 * mr * BLOCK), if res.is_some() { c(4 * mr * BLOCK) } else { 0 }];
                    fx.loop_n(Count::Const(full), [xp, yp, rp], steps, |fx, [xp, yp, rp]| {
                        call(fx, xp, yp, rp, interior, mr);
                    });
                    let rem = (hi - lo) % mr;
                    if rem > 0 {
                        let o = lo + full * mr;
                        let xp = fx.addi(xn, c(4 * (o * sw - pl) * col));
                        let (yp, rp) = (at(fx, yu, o), if res.is_some() { at(fx, ru, o) } else { ru });
                        call(fx, xp, yp, rp, interior, rem);
                    }
                }
                for &(o, entry) in border.iter().filter(|(o, _)| *o >= hi) {
                    let (yp, rp) = (at(fx, yu, o), if res.is_some() { at(fx, ru, o) } else { ru });
                    call(fx, xn, yp, rp, entry, 1);
                }
            });
        }
    })?;
    Ok(())
}

/// `[part·n/parts, (part + 1)·n/parts)` of `n` units.
pub(super) fn part_range(fx: &mut Fx<'_>, n: Value) -> (Value, Value) {
    let (part, parts) = (fx.part, fx.parts);
    let a = fx.b.ins().imul(n, part);
    let lo = fx.b.ins().udiv(a, parts);
    let p1 = fx.b.ins().iadd_imm_s(part, 1);
    let b = fx.b.ins().imul(n, p1);
    let hi = fx.b.ins().udiv(b, parts);
    (lo, hi)
}

fn max(fx: &mut Fx<'_>, a: Value, b: Value) -> Value {
    let gt = fx.b.ins().icmp(IntCC::SignedGreaterThan, a, b);
    fx.b.ins().select(gt, a, b)
}

fn min(fx: &mut Fx<'_>, a: Value, b: Value) -> Value {
    let lt = fx.b.ins().icmp(IntCC::SignedLessThan, a, b);
    fx.b.ins().select(lt, a, b)
}

/// Lowers a Linear node onto the GEMM tiles.
pub(super) fn linear(jit: &mut Jit, cx: &NodeCx<'_>, lin: &Linear, isa: Isa) -> Result<()> {
    let (k, o) = (lin.in_features, lin.out_features);
    // The operand's element holding feature `f` of a row.
    let (lda, feature_at): (usize, Box<dyn Fn(usize) -> usize>) = match cx.in_layouts[0] {
        Layout::Blocked { c: ch, h, w } => {
            let plane = h * w;
            (
                cx.in_lens[0],
                Box::new(move |f: usize| {
                    let (cc, p) = (f / plane, f % plane);
                    debug_assert!(cc < ch);
                    ((cc / BLOCK) * plane + p) * BLOCK + cc % BLOCK
                }),
            )
        }
        Layout::Plain => (k, Box::new(|f| f)),
    };
    let rows = if cx.in_layouts[0].is_blocked() { 1 } else { cx.in_tys[0].numel_per_sample() / k.max(1) };
    let kk = if cx.in_layouts[0].is_blocked() { lda } else { k };
    let w = cx.param("weight")?;
    let nr = isa.gemm_nr();
    let lanes = nr / if isa == Isa::Avx512 { 4 } else { 2 };
    let tiles = o.div_ceil(nr);
    let mut packed = vec![];
    let mut tile_off = vec![];
    for t in 0..tiles {
        let valid = (o - t * nr).min(nr);
        let width = valid.next_multiple_of(lanes);
        let base = packed.len();
        tile_off.push(base);
        packed.resize(base + kk * width, 0.0);
        for j in 0..valid {
            let row = &w[(t * nr + j) * k..][..k];
            for (f, v) in row.iter().enumerate() {
                packed[base + feature_at(f) * width + j] = *v;
            }
        }
    }
    let (scale, shift) = affine(cx, lin.bias, &lin.epilogue, o, tiles * nr)?;
    let tile = GemmTile {
        isa,
        k: kk,
        lda: kk,
        ldc: o,
        scale: scale.map_or(std::ptr::null(), |v| jit.consts.f32s_aligned(&v) as usize as *const f32),
        shift: shift.map_or(std::ptr::null(), |v| jit.consts.f32s_aligned(&v) as usize as *const f32),
        act: Act::of(lin.epilogue.act),
    };
    let w_addr = jit.consts.f32s_aligned(&packed);
    let desc = jit.consts.keep(tile, 4 * packed.len());
    let (xs, ys) = (cx.inputs[0], cx.output);
    let res = lin.epilogue.residual.then(|| cx.inputs[1]);
    let mr = isa.gemm_mr();
    let work = 2 * (rows * k * o) as u64;
    jit.parallel_kernel(&cx.node.name, work, |fx| {
        let x = fx.slot(xs);
        let y = fx.slot(ys);
        let r = match res {
            Some(s) => fx.slot(s),
            None => fx.i(0),
        };
        let d = fx.i(desc);
        let m = fx.muli(fx.nb, c(rows));
        let full = fx.b.ins().udiv_imm_u(m, c(mr));
        let rem = fx.b.ins().urem_imm_u(m, c(mr));
        let n_tiles = fx.i(c(tiles));
        let (lo, hi) = part_range(fx, n_tiles);
        // Tiles are unrolled (their widths and offsets are constants); each runs if in range.
        for (t, &off) in tile_off.iter().enumerate() {
            let valid = (o - t * nr).min(nr);
            let ti = fx.i(c(t));
            let ge = fx.b.ins().icmp(IntCC::SignedGreaterThanOrEqual, ti, lo);
            let lt = fx.b.ins().icmp(IntCC::SignedLessThan, ti, hi);
            let mine = fx.b.ins().band(ge, lt);
            let body = fx.b.create_block();
            let next = fx.b.create_block();
            fx.b.ins().brif(mine, body, &[], next, &[]);
            fx.b.switch_to_block(body);
            let bt = fx.i(w_addr + c(4 * off));
            let yt = fx.addi(y, c(4 * t * nr));
            let rt = if res.is_some() { fx.addi(r, c(4 * t * nr)) } else { r };
            let call = |fx: &mut Fx<'_>, xp: Value, yp: Value, rp: Value, shape: Value| {
                fx.call(microkernel::gemm_tile as *const () as usize, &[d, xp, bt, yp, rp, shape]);
            };
            let shape_full = fx.i(microkernel::gemm_shape(mr, valid, t * nr));
            let rstep = if res.is_some() { c(4 * mr * o) } else { 0 };
            let (xe, ye, re) = (c(4 * mr * kk), c(4 * mr * o), rstep);
            let after = {
                let mut out = (x, yt, rt);
                fx.loop_n(Count::Dyn(full), [x, yt, rt], [xe, ye, re], |fx, [xp, yp, rp]| {
                    call(fx, xp, yp, rp, shape_full);
                });
                // Pointers to the remaining rows.
                let xo = fx.b.ins().imul_imm_s(full, xe);
                let yo = fx.b.ins().imul_imm_s(full, ye);
                out.0 = fx.add(x, xo);
                out.1 = fx.add(yt, yo);
                if res.is_some() {
                    let ro = fx.b.ins().imul_imm_s(full, re);
                    out.2 = fx.add(rt, ro);
                }
                out
            };
            let has_rem = fx.b.ins().icmp_imm_s(IntCC::SignedGreaterThan, rem, 0);
            let tail = fx.b.create_block();
            let done = fx.b.create_block();
            fx.b.ins().brif(has_rem, tail, &[], done, &[]);
            fx.b.switch_to_block(tail);
            let base = fx.i(microkernel::gemm_shape(0, valid, t * nr));
            let shape = fx.b.ins().bor(base, rem);
            call(fx, after.0, after.1, after.2, shape);
            fx.b.ins().jump(done, &[]);
            fx.b.switch_to_block(done);
            fx.b.ins().jump(next, &[]);
            fx.b.switch_to_block(next);
        }
    })?;
    Ok(())
}
