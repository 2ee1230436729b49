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
//! Each output row's table lists the kernel rows it reads the same way. A conv with zero
//! padding reads a zero-padded copy of its operand instead ([`crate::jit::plan::staged_input`],
//! [`Stage`]), so every column is interior and every tile whole; the tables serve the
//! other padding modes. The copy is a kernel of its own when the conv is split between
//! threads, and otherwise part of the conv's kernel, one sample right before its rows.
//! The tile shape (pixels × blocks) is chosen per layer by a cost model
//! ([`choose_tiles`]). The whole epilogue — bias, BatchNorm's scale and shift, the
//! residual, the activation — runs in the tile, on the accumulators.
//!
//! **Plane convolutions** ([`plane_conv`]): a plain operand with few channels and at most 8
//! filters (LeNet's first layer) keeps the plain layout, pixels in the lanes.
//!
//! **Linear**. Weights are packed once per tile of `isa.gemm_nr()` output features as
//! `[K][width]` (the last tile only as wide as it needs), with the columns permuted when the
//! operand is a flattened blocked image so that the kernel reads it as it lies. Units are
//! column tiles; within one, row blocks of `isa.gemm_mr()` go through the tile, the last
//! block with the remaining rows. At batch 1 that is a GEMV that streams the weights once,
//! split between threads by columns.

use super::common::{Stage, fill_by_items, split_even};
use super::winograd::{self, Pick};
use crate::error::{Error, Result};
use crate::jit::codegen::{Count, Fx, Jit, c, part_range};
use crate::jit::cx::NodeCx;
use crate::jit::microkernel::{self, Act, ConvTile, GemmTile, Isa, transpose_columns};
use crate::jit::plan::{BLOCK, Layout};
use crate::jit::tables::axis_table;
use crate::{ConvAlgorithm, ConvChoice};
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

/// The interior output columns `[lo, hi)`: every tap's column `o·sw + t·dw − pl` lies in
/// `[0, iw)` (`(ow, ow)` if there are none).
fn interior_columns(ow: usize, iw: usize, kw: usize, sw: usize, dw: usize, pl: usize) -> (usize, usize) {
    let lo = pl.div_ceil(sw);
    let reach = (iw + pl) as i64 - 1 - ((kw - 1) * dw) as i64;
    let hi = if reach < 0 { 0 } else { (reach as usize / sw + 1).min(ow) };
    if lo < hi { (lo, hi) } else { (ow, ow) }
}

/// What every tile pays per reduction step beyond its ports' time, in cycles: the
/// per-tile share of streaming the group's weights and of the per-tap set-up, which favours
/// wide tiles. Measured (interleaved, 12 rounds, one core): 6 × 4 tiles beat 4 × 4 on
/// 56-pixel rows by 4–6% (3×3 convs 64→64, 128→256 and 256→256), and 6 × 4 beat 4 × 4 on
/// 28-pixel rows in 4 of 5 runs; without this term both were estimated equal or 4 × 4
/// cheaper.
const TILE_STEP_CYCLES: f64 = 1.5;

/// Most pixels per tile of two or more blocks on a pixel-major (plain) operand, measured:
/// the first conv of the CIFAR-10 net (3→32, 5×5) ran 5–25% faster as 8 × 2 than as
/// 12 × 2 in every interleaved round, alone and in the net; single-block tiles keep their
/// width (LeNet's 6→16 conv ran ~25% slower as 7 × 1 than as 10 × 1).
const PLAIN_MR: usize = 8;

/// Output rows up to which a conv's tiles prefetch their weights
/// ([`crate::jit::microkernel::ConvTile::prefetch`]): with few rows per channel group a group's
/// weights come from L3 for a large share of its tiles (ResNet-18's layer4, 7 rows: ~12%
/// faster with the prefetch), while on tall maps they stay in L2 and the prefetches only
/// take load slots (56-row convs 2–4% faster without, 28-row ones even).
const PREFETCH_ROWS: usize = 14;

/// Estimated cycles of one reduction step (one input channel of one tap) of a conv tile of
/// `mr` pixels × `nb` blocks: the most of the FMA ports' time, the load ports' (weights and
/// broadcasts), the FMA latency that every accumulator chain waits once per step, and —
/// when a group's weights do not stay in L1 — streaming them from L2 (~32 bytes a cycle);
/// plus a quarter cycle per pixel, which is what each broadcast costs beyond its load in
/// measurements (at equal estimates, 6 × 4 beats 12 × 2 by ~6%), and
/// [`TILE_STEP_CYCLES`].
fn step_cycles(isa: Isa, mr: usize, nb: usize, l2: bool) -> f64 {
    let vecs = match isa {
        Isa::Avx512 => nb,
        Isa::Avx2 => 2 * nb,
    } as f64;
    let fma = mr as f64 * vecs / 2.0;
    let loads = (mr as f64 + vecs) / 2.0;
    let stream = if l2 { 2.0 * nb as f64 } else { 0.0 };
    fma.max(loads).max(4.0).max(stream) + mr as f64 / 4.0 + TILE_STEP_CYCLES
}

/// Picks the channel-group size (most blocks per group) and, for each group size, the
/// tile width in pixels that make a row of `width` interior pixels cheapest by
/// [`step_cycles`] (a row is whole tiles plus one narrower for the rest; of equally cheap
/// widths the widest; at most [`PLAIN_MR`] for several blocks on a `plain` operand).
/// Returns the group size and `mr[nb]` for `nb ≤` it.
fn choose_tiles(
    isa: Isa,
    blocks: usize,
    width: usize,
    plain: bool,
    group_bytes: impl Fn(usize) -> usize,
) -> (usize, Vec<usize>) {
    const L1_WEIGHTS: usize = 32 << 10;
    let row_cost = |mr: usize, nb: usize| {
        let l2 = group_bytes(nb) > L1_WEIGHTS;
        let (full, rest) = (width / mr, width % mr);
        let mut c = full as f64 * step_cycles(isa, mr, nb, l2);
        if rest > 0 {
            c += step_cycles(isa, rest, nb, l2);
        }
        c
    };
    let best_mr = |nb: usize| {
        let cap = if plain && nb > 1 { PLAIN_MR } else { usize::MAX };
        (1..=isa.conv_mr(nb).min(width.max(1)).min(cap))
            .rev()
            .min_by(|&a, &b| row_cost(a, nb).total_cmp(&row_cost(b, nb)))
            .unwrap_or(1)
    };
    let mrs: Vec<usize> = (0..=isa.conv_nb()).map(|nb| if nb == 0 { 1 } else { best_mr(nb) }).collect();
    // Cycles of one output row of every channel group.
    let cost = |nb_max: usize| -> f64 { split_even(blocks, nb_max).iter().map(|&nb| row_cost(mrs[nb], nb)).sum() };
    let nb_max = (1..=isa.conv_nb().min(blocks.max(1))).min_by(|&a, &b| cost(a).total_cmp(&cost(b))).unwrap_or(1);
    (nb_max, mrs)
}

/// Lowers a Conv2d node whose result is blocked.
pub(in crate::jit) fn conv(jit: &mut Jit, cx: &NodeCx<'_>, conv: &Conv2d) -> Result<()> {
    let isa = jit.isa.ok_or_else(|| Error::Unsupported("blocked conv without a micro-kernel ISA".into()))?;
    let (cin, ih0, iw0) = cx.in_chw(0)?;
    let (cout, oh, ow) = cx.out_chw()?;
    let (kh, kw) = conv.kernel;
    let (sh, sw) = conv.stride;
    let (dh, dw) = conv.dilation;
    let (pt0, pb0, pl0, pr0) = conv.pads();
    let groups = conv.groups;
    let blocked_in = cx.in_layouts[0].is_blocked();
    let zeros = conv.padding_mode == PaddingMode::Zeros;
    // The operand as the tiles read it (see `plan::staged_input`): a zero-padded copy of a
    // blocked operand, a pixel-major copy of a plain one, or the operand itself. `col`,
    // `row`, `x_icb` and `x_c` are its element strides between columns, rows, channel
    // blocks and channels.
    //
    // The copy is a kernel of its own when the conv's work is split between threads (each
    // thread copies the rows it will mostly read); otherwise the conv copies each sample
    // right before its first row, so that at batch > 1 the copy is read back from L2
    // rather than from memory (ResNet-18 b64: the copies took 4% of the net when staged for
    // the whole chunk at once). Both kernels get the conv's work, so they split alike.
    let work = 2 * (cout * oh * ow * (cin / groups) * kh * kw) as u64;
    let mut lazy = None;
    let (xs, in_size, ih, iw, pt, pl) = match cx.scratch {
        Some(t) => {
            let (pt, pb, pl, pr) = if zeros { (pt0, pb0, pl0, pr0) } else { (0, 0, 0, 0) };
            let st = Stage::of_conv(jit, cx, t, (cin, ih0, iw0), (pt, pb, pl, pr), blocked_in);
            st.kernel(jit, cx, work, true)?;
            lazy = Some(st);
            let (ih, iw) = (ih0 + pt + pb, iw0 + pl + pr);
            let c = if blocked_in { cin.div_ceil(BLOCK) * BLOCK } else { cin };
            (t, c * ih * iw, ih, iw, pt0 - pt, pl0 - pl)
        }
        None => (cx.inputs[0], cx.in_lens[0], ih0, iw0, pt0, pl0),
    };
    let pick = match winograd::unfit(conv, blocked_in, cx.scratch.is_some() && zeros) {
        Some(why) => Pick::Direct(why.to_string()),
        None => winograd::choose(jit.conv, kh, cin, cout, oh, ow, jit.repacked),
    };
    let (algorithm, reason) = match &pick {
        Pick::Direct(why) => (ConvAlgorithm::Direct, why.clone()),
        Pick::Winograd(why) | Pick::FromBatch(_, why) => (ConvAlgorithm::Winograd, why.clone()),
    };
    jit.conv_choices.push(ConvChoice { node: cx.node.name.clone(), algorithm, reason });
    // The epilogue's per-channel factors, in the constant pool once for either algorithm.
    let (scale, shift) = affine(cx, conv.bias, &conv.epilogue, cout, cout.div_ceil(BLOCK) * BLOCK)?;
    let scale = scale.map_or(std::ptr::null(), |v| jit.consts.f32s_aligned(&v) as usize as *const f32);
    let shift = shift.map_or(std::ptr::null(), |v| jit.consts.f32s_aligned(&v) as usize as *const f32);
    let operand = || winograd::Operand { slot: xs, size: in_size, ih, iw, lazy };
    // Winograd on units of several samples for calls with that many (see `Pick::FromBatch`),
    // emitted into this kernel ahead of the direct loops.
    let mut batched = None;
    match pick {
        Pick::Direct(_) => {}
        Pick::Winograd(_) => return winograd::lower(jit, cx, conv, operand(), (scale, shift), work),
        Pick::FromBatch(samples, _) => {
            batched = Some((winograd::Wino::prepare(jit, cx, conv, operand(), (scale, shift), samples)?, samples));
        }
    }
    let (icg, ocg) = (cin / groups, cout / groups);
    let (col, row, x_icb, x_c) = if blocked_in {
        (BLOCK, iw * BLOCK, ih * iw * BLOCK, 1)
    } else {
        // Pixel-major: `cin` channels per pixel (a plain operand has one group).
        (cin, iw * cin, 0, 1)
    };
    let (icb, c_full) = if blocked_in { (icg.div_ceil(BLOCK), BLOCK) } else { (1, icg) };
    let c_last = icg - (icb - 1) * c_full;
    let ocbg = ocg.div_ceil(BLOCK);

    // Channel groups and their packed weights.
    let w = cx.param_ref("weight")?;
    let inner = interior_columns(ow, iw, kw, sw, dw, pl);
    let group_bytes = |nb: usize| 4 * icb * kh * kw * c_full * nb * BLOCK;
    let (nb_max, mrs) = choose_tiles(isa, ocbg, inner.1 - inner.0, !blocked_in, group_bytes);
    // The groups first (where each one's packed weights start), then the weights, packed
    // in place in the model's constant pool.
    let ntaps = kh * kw;
    let mut gs = vec![];
    let mut total = 0;
    for g in 0..groups {
        let x_off = if blocked_in { g * icb * x_icb } else { g * icg * x_c };
        let mut ocb = g * ocbg;
        for nb in split_even(ocbg, nb_max) {
            gs.push(Group { ocb0: ocb, nb, w_off: total, x_off });
            total += icb * ntaps * c_full * nb * BLOCK;
            ocb += nb;
        }
    }
    // A flipped weight (`NodeCx::flipped`, one group) is the stored `[ic][oc][kh][kw]`
    // read with both spatial axes reversed.
    let flipped = cx.flipped;
    let starts: Vec<usize> = gs.iter().map(|g| g.w_off).collect();
    let pack_groups = |packed: &mut [f32], items: std::ops::Range<usize>| {
        let first = starts.get(items.start).copied().unwrap_or(total);
        for grp in &gs[items] {
            let width = grp.nb * BLOCK;
            // Written in order, `[icb][tap][c]` rows of `width` output channels, each row
            // gathered from the output channels' `[ic][kh][kw]` weights (a group's blocks
            // never cross into the next group: with several groups each has whole blocks;
            // channels past `cout` stay zero).
            let valid = width.min(cout.saturating_sub(grp.ocb0 * BLOCK));
            let o0 = grp.ocb0 * BLOCK;
            // Weight `(ic, tap)` of output channel `o0 + j` goes to column `j` of row
            // `(ic / c_full, tap, ic % c_full)`: a transpose, 8×8 blocks at a time
            // (`transpose_columns`; reading a row's `width` weights `icg · ntaps` floats
            // apart one at a time cost ~1 ns each, half of `set_weights` in training).
            let base = grp.w_off - first;
            let row = |ic: usize, tap: usize| base + (((ic / c_full) * ntaps + tap) * c_full + ic % c_full) * width;
            if flipped {
                // The stored `[ic][oc][kh][kw]`, both spatial axes reversed: per input
                // channel, the output channels' taps are rows `ntaps` apart.
                let mut to = vec![0; ntaps];
                for ic in 0..icg {
                    for (q, t) in to.iter_mut().enumerate() {
                        *t = row(ic, ntaps - 1 - q);
                    }
                    transpose_columns(&w[(ic * cout + o0) * ntaps..], ntaps, valid, 0, packed, &to);
                }
            } else {
                // `[oc][ic][kh][kw]`: an output channel's `(ic, tap)` weights are one row.
                let to: Vec<usize> = (0..icg * ntaps).map(|q| row(q / ntaps, q % ntaps)).collect();
                transpose_columns(&w[o0 * icg * ntaps..], icg * ntaps, valid, 0, packed, &to);
            }
        }
    };
    let threads = jit.threads;
    let pack = |packed: &mut [f32]| fill_by_items(packed, &starts, threads, pack_groups);
    let w_addr = jit.consts.f32s_filled(total, pack);
    drop(w);

    // Row tables (one per output row) and column tables (one for the interior, one per
    // border column).
    let mode = conv.padding_mode;
    let rows = axis_table(oh, kh, sh, dh, pt, ih, mode)?;
    let mut row_tab = vec![];
    for r in rows.chunks(kh) {
        let (first, ins) = taps(r, mode)?;
        push_entry(&mut row_tab, kh, first, ins.iter().map(|&i| c(i as usize * row)));
    }
    // A kernel row's columns lie side by side in the operand (dilation 1): a pixel-major
    // operand's `c` channels per pixel, and a blocked one's 16 channels of each block. When
    // no column needs a table of its own (and, blocked, every block is whole), the columns
    // fold into the channel loop, `kw · c` contiguous channels of one tap in the packed
    // weights' order — the same sums in the same order, with a third of the per-tap
    // overhead for 3×3 kernels: ResNet-18's and VGG-11's 3×3 convs ran 3–7% faster so, in
    // 10–13 of 12–15 interleaved rounds each.
    let merge = (!blocked_in || c_last == c_full) && dw == 1 && inner == (0, ow);
    let (c_tile, kw_tile) = if merge { (kw * c_full, 1) } else { (c_full, kw) };
    let cols = axis_table(ow, kw, sw, dw, pl, iw, mode)?;
    let mut col_tab = vec![];
    let interior = push_entry(&mut col_tab, kw_tile, 0, (0..kw_tile).map(|t| c(t * dw * col)));
    let (lo, hi) = inner;
    let mut border = vec![];
    for o in (0..lo).chain(hi..ow) {
        let (first, ins) = taps(&cols[o * kw..(o + 1) * kw], mode)?;
        border.push((o, push_entry(&mut col_tab, kw, first, ins.iter().map(|&i| c(i as usize * col)))));
    }

    let tile = ConvTile {
        isa,
        icb,
        c_full: c_tile,
        c_last: if merge { c_tile } else { c_last },
        x_icb: x_icb as isize,
        x_c: x_c as isize,
        x_px: (sw * col) as isize,
        kh,
        kw: kw_tile,
        y_blk: (oh * ow * BLOCK) as isize,
        channels: cout,
        scale,
        shift,
        act: Act::of(conv.epilogue.act),
        prefetch: oh <= PREFETCH_ROWS,
    };
    let bytes = 4 * total + 8 * (row_tab.len() + col_tab.len());
    let desc = jit.consts.keep(tile, bytes);
    let rows_addr = jit.consts.i64s(row_tab);
    let cols_addr = jit.consts.i64s(col_tab);
    let ys = cx.output;
    let res = conv.epilogue.residual.then(|| cx.inputs[1]);
    let out_size = cx.out_len;
    let row_entry = 8 * (2 + kh);
    let col_entry = 8 * (2 + kw_tile);
    let fmr = |nb: usize| mrs[nb];
    jit.parallel_kernel(&cx.node.name, work, |fx| {
        let done = batched.as_ref().map(|(wino, samples)| {
            let many = fx.b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, fx.nb, c(*samples));
            let (wb, db, done) = (fx.b.create_block(), fx.b.create_block(), fx.b.create_block());
            fx.b.ins().brif(many, wb, &[], db, &[]);
            fx.b.switch_to_block(wb);
            wino.emit(fx);
            fx.b.ins().jump(done, &[]);
            fx.b.switch_to_block(db);
            done
        });
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
            let a = fx.smax(lo_u, seg0);
            let b = fx.smin(hi_u, seg1);
            let wg = fx.i(w_addr + c(4 * g.w_off));
            let mr = fmr(g.nb);
            fx.for_range(a, b, 1, |fx, u| {
                let local = fx.b.ins().isub(u, seg0);
                let n = fx.b.ins().udiv_imm_u(local, c(oh));
                let orow = fx.b.ins().urem_imm_u(local, c(oh));
                if let (0, Some(st)) = (gi, lazy) {
                    // Not split: the first group copies each sample before its first row.
                    let one = fx.i(1);
                    st.emit_before_first(fx, n, one, orow);
                }
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
                let call = |fx: &mut Fx<'_>, xp: Value, yp: Value, rp: Value, entry: usize, m: usize, count: usize| {
                    let ctab = fx.i(cols_addr + c(entry * col_entry));
                    let shape = fx.i(microkernel::conv_shape(m, g.nb, count, g.ocb0));
                    fx.call(microkernel::conv_tile as *const () as usize, &[d, xp, wg, yp, rp, rtab, ctab, shape]);
                };
                let at = |fx: &mut Fx<'_>, p: Value, o: usize| fx.addi(p, c(4 * o * BLOCK));
                for &(o, entry) in border.iter().filter(|(o, _)| *o < lo) {
                    let (yp, rp) = (at(fx, yu, o), if res.is_some() { at(fx, ru, o) } else { ru });
                    call(fx, xn, yp, rp, entry, 1, 1);
                }
                if hi > lo {
                    let full = (hi - lo) / mr;
                    let xp = fx.addi(xn, c(4 * (lo * sw - pl) * col));
                    let yp = at(fx, yu, lo);
                    let rp = if res.is_some() { at(fx, ru, lo) } else { ru };
                    if full > 0 {
                        call(fx, xp, yp, rp, interior, mr, full);
                    }
                    let rem = (hi - lo) % mr;
                    if rem > 0 {
                        let o = lo + full * mr;
                        let xp = fx.addi(xn, c(4 * (o * sw - pl) * col));
                        let (yp, rp) = (at(fx, yu, o), if res.is_some() { at(fx, ru, o) } else { ru });
                        call(fx, xp, yp, rp, interior, rem, 1);
                    }
                }
                for &(o, entry) in border.iter().filter(|(o, _)| *o >= hi) {
                    let (yp, rp) = (at(fx, yu, o), if res.is_some() { at(fx, ru, o) } else { ru });
                    call(fx, xn, yp, rp, entry, 1, 1);
                }
            });
        }
        if let Some(done) = done {
            fx.b.ins().jump(done, &[]);
            fx.b.switch_to_block(done);
        }
    })?;
    Ok(())
}

/// Lowers a Linear node onto the GEMM tiles.
pub(in crate::jit) fn linear(jit: &mut Jit, cx: &NodeCx<'_>, lin: &Linear, isa: Isa) -> Result<()> {
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
    // A weight the caller gave away is packed in its own memory where the packed layout
    // has its size; otherwise it is read like a borrowed one.
    let donated = jit.donated.remove(&cx.param_id("weight")?);
    let borrowed = match donated {
        Some(_) => None,
        None => Some(cx.param_ref("weight")?),
    };
    let weight = match (donated, &borrowed) {
        (Some(v), _) => GemmWeight::Donated(v),
        (None, Some(w)) => GemmWeight::Borrowed(w),
        (None, None) => unreachable!("one of the two is set"),
    };
    // Which feature each operand element holds (`None`: a padding channel, weight 0).
    let mut source = vec![None; kk];
    for i in 0..k {
        source[feature_at(i)] = Some(i);
    }
    let tiles = o.div_ceil(isa.gemm_nr());
    let (scale, shift) = affine(cx, lin.bias, &lin.epilogue, o, tiles * isa.gemm_nr())?;
    let res = lin.epilogue.residual.then(|| cx.inputs[1]);
    rows_gemm(
        jit,
        &cx.node.name,
        isa,
        RowsGemm {
            k,
            o,
            rows,
            weight,
            source: &source,
            scale,
            shift,
            act: Act::of(lin.epilogue.act),
            xs: cx.inputs[0],
            ys: cx.output,
            res,
        },
    )
}

/// A row-by-row GEMM `y[r] = W·x[r]` (+ epilogue) over the GEMM tile, the rows split
/// between threads by column tiles.
pub(in crate::jit) struct RowsGemm<'a> {
    /// Features (columns of `weight`) and outputs (its rows).
    pub k: usize,
    pub o: usize,
    /// Rows per sample.
    pub rows: usize,
    /// `[o, k]`, row-major.
    pub weight: GemmWeight<'a>,
    /// Per element of an operand row (its length is the row stride), the feature it holds
    /// (`None`: a padding element, weight 0).
    pub source: &'a [Option<usize>],
    /// Per-column scale and shift (padded to whole tiles), the activation.
    pub scale: Option<Vec<f32>>,
    pub shift: Option<Vec<f32>>,
    pub act: Act,
    /// Operand, result and (optional) residual slots.
    pub xs: usize,
    pub ys: usize,
    pub res: Option<usize>,
}

/// A [`RowsGemm`]'s weight matrix.
pub(in crate::jit) enum GemmWeight<'a> {
    /// Read while packing into new memory.
    Borrowed(&'a [f32]),
    /// Given away: packed in its own memory when the packed layout has its size (every
    /// feature real, no padding channel, and `o` a multiple of the tile's vector width),
    /// else read like a borrowed one and dropped.
    Donated(Vec<f32>),
    /// The matrix's transpose, `[k, o]` row-major (a Linear's weight for its input
    /// gradient): a packed row is then a run of one of its rows, copied.
    Transposed(&'a [f32]),
}

/// Emits a [`RowsGemm`] as one parallel kernel named `name`.
pub(in crate::jit) fn rows_gemm(jit: &mut Jit, name: &str, isa: Isa, g: RowsGemm<'_>) -> Result<()> {
    let RowsGemm { k, o, rows, weight, source, scale, shift, act, xs, ys, res } = g;
    let kk = source.len();
    let nr = isa.gemm_nr();
    let lanes = nr / if isa == Isa::Avx512 { 4 } else { 2 };
    let tiles = o.div_ceil(nr);
    let mut tile_off = vec![];
    let mut total = 0;
    for t in 0..tiles {
        tile_off.push(total);
        total += kk * (o - t * nr).min(nr).next_multiple_of(lanes);
    }
    // Each tile's packed row `p` holds feature `source[p]` of its `valid` output rows. The
    // packed rows are written a chunk of `CHUNK` rows (a few tens of KB) at a time, so the
    // writes stay within a few pages of fresh memory; within a chunk, its features are taken
    // in runs of consecutive features, each run read from every weight row as one contiguous
    // slice, transposed in a small buffer, and written to its (possibly permuted) packed rows
    // as whole rows. Scattering each weight run over the whole packed buffer instead (a
    // Flatten of a blocked map permutes the features) took VGG-11's fused first classifier
    // layer (411 MB) 1.3 s on a VM, where every scattered write is a TLB miss; reading across
    // the rows one float per row per feature took it over a second too.
    const CHUNK: usize = 256;
    const RUN: usize = 64;
    // Per chunk: its (feature, packed row) pairs sorted by feature, cut into runs.
    let chunks: Vec<Vec<(usize, usize)>> = (0..kk)
        .step_by(CHUNK)
        .map(|p0| {
            let mut pairs: Vec<(usize, usize)> =
                (p0..kk.min(p0 + CHUNK)).filter_map(|p| source[p].map(|i| (i, p))).collect();
            pairs.sort_unstable();
            pairs
        })
        .collect();
    // Packs tile `t`'s weight rows `rows` (`valid` of them, `k` long) into `dst` (its
    // packed floats); `to` is room for a run's packed-row offsets.
    let pack_tile = |dst: &mut [f32], rows: &[f32], t: usize, to: &mut Vec<usize>| {
        let valid = (o - t * nr).min(nr);
        let width = valid.next_multiple_of(lanes);
        for pairs in &chunks {
            let mut a = 0;
            while a < pairs.len() {
                let mut b = a + 1;
                while b < pairs.len() && b - a < RUN && pairs[b].0 == pairs[b - 1].0 + 1 {
                    b += 1;
                }
                to.clear();
                to.extend(pairs[a..b].iter().map(|&(_, p)| p * width));
                transpose_columns(rows, k, valid, pairs[a].0, dst, to);
                a = b;
            }
        }
    };
    let valid_rows = |t: usize| (o - t * nr).min(nr);
    // Tiles `ts` into `out`, the packed floats from tile `ts.start` on.
    let pack_tiles = |w: &[f32], out: &mut [f32], ts: std::ops::Range<usize>| {
        let mut buf = Vec::with_capacity(RUN);
        let start = tile_off.get(ts.start).copied().unwrap_or(total);
        for t in ts {
            let base = tile_off[t] - start;
            pack_tile(
                &mut out[base..][..kk * valid_rows(t).next_multiple_of(lanes)],
                &w[t * nr * k..][..valid_rows(t) * k],
                t,
                &mut buf,
            );
        }
    };
    let threads = jit.threads;
    let w_addr = match weight {
        // Tile `t`'s packed floats then occupy exactly its weight rows: each tile is copied
        // aside (one tile, a few MB, per thread) and packed back over itself.
        GemmWeight::Donated(w) if kk == k && o % lanes == 0 && w.len() == total => {
            let in_place = |out: &mut [f32], ts: std::ops::Range<usize>| {
                let mut buf = Vec::with_capacity(RUN);
                let mut aside = vec![0f32; nr * k];
                let start = tile_off.get(ts.start).copied().unwrap_or(total);
                for t in ts {
                    let base = tile_off[t] - start;
                    let n = valid_rows(t) * k;
                    aside[..n].copy_from_slice(&out[base..][..n]);
                    pack_tile(&mut out[base..][..n], &aside[..n], t, &mut buf);
                }
            };
            jit.consts.f32s_in_place(w, |packed| fill_by_items(packed, &tile_off, threads, in_place))
        }
        GemmWeight::Donated(w) => jit
            .consts
            .f32s_filled(total, |packed| fill_by_items(packed, &tile_off, threads, |out, ts| pack_tiles(&w, out, ts))),
        GemmWeight::Borrowed(w) => jit
            .consts
            .f32s_filled(total, |packed| fill_by_items(packed, &tile_off, threads, |out, ts| pack_tiles(w, out, ts))),
        GemmWeight::Transposed(wt) => {
            // Packed row `p` of tile `t`: row `source[p]` of `wt` at the tile's columns
            // (a padding row stays zero).
            let copy_tiles = |out: &mut [f32], ts: std::ops::Range<usize>| {
                let start = tile_off.get(ts.start).copied().unwrap_or(total);
                for t in ts {
                    let (base, valid) = (tile_off[t] - start, valid_rows(t));
                    let width = valid.next_multiple_of(lanes);
                    for (p, f) in source.iter().enumerate() {
                        if let Some(f) = f {
                            out[base + p * width..][..valid].copy_from_slice(&wt[f * o + t * nr..][..valid]);
                        }
                    }
                }
            };
            jit.consts.f32s_filled(total, |packed| fill_by_items(packed, &tile_off, threads, copy_tiles))
        }
    };
    let tile = GemmTile {
        isa,
        k: kk,
        lda: kk,
        ldc: o,
        group: 0,
        lda_group: 0,
        scale: scale.map_or(std::ptr::null(), |v| jit.consts.f32s_aligned(&v) as usize as *const f32),
        shift: shift.map_or(std::ptr::null(), |v| jit.consts.f32s_aligned(&v) as usize as *const f32),
        act,
    };
    let desc = jit.consts.keep(tile, 4 * total);
    let mr = isa.gemm_mr();
    let work = 2 * (rows * k * o) as u64;
    // Tiles but the last are `nr` wide and `kk·nr` floats apart; the reduction runs in
    // chunks of `KC` (a chunk of a tile's weights stays in L2 while every row block uses
    // it; partial sums wait in the output, so the order of the sums, and the result, do not
    // depend on the chunking or the batch).
    const KC: usize = 1024;
    let chunks = kk.div_ceil(KC).max(1);
    let full_tiles = o / nr;
    let last = (o % nr > 0).then(|| (o % nr, tile_off[full_tiles]));
    jit.parallel_kernel(name, work, |fx| {
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
        let rstep = if res.is_some() { c(4 * mr * o) } else { 0 };
        // One tile: its weights at `bt`, its first output column `col`, `valid` columns.
        let tile = |fx: &mut Fx<'_>, bt: Value, col: Value, valid: usize| {
            let width = valid.next_multiple_of(lanes);
            let yt = fx.elem(y, col);
            let rt = if res.is_some() { fx.elem(r, col) } else { r };
            // shape = mr | valid << 8 | col << 16
            let colsh = fx.b.ins().ishl_imm_u(col, 16);
            let base = fx.addi(colsh, c(valid << 8));
            let shape_full = fx.addi(base, c(mr));
            let shape_rem = fx.b.ins().bor(base, rem);
            let zero = fx.i(0);
            fx.loop_n(Count::Const(chunks), [zero, x, bt], [1, c(4 * KC), c(4 * KC * width)], |fx, [ci, xa, bk]| {
                // kspan = k0 | kn << 32 | first << 62 | last << 63
                let k0 = fx.muli(ci, c(KC));
                let first = fx.b.ins().icmp_imm_s(IntCC::Equal, ci, 0);
                let is_last = fx.b.ins().icmp_imm_s(IntCC::Equal, ci, c(chunks - 1));
                let kn_full = fx.i(c(KC) << 32);
                let kn_last = fx.i(c(kk - (chunks - 1) * KC) << 32);
                let kn = fx.b.ins().select(is_last, kn_last, kn_full);
                let f = fx.b.ins().uextend(cranelift_codegen::ir::types::I64, first);
                let l = fx.b.ins().uextend(cranelift_codegen::ir::types::I64, is_last);
                let f = fx.b.ins().ishl_imm_u(f, 62);
                let l = fx.b.ins().ishl_imm_u(l, 63);
                let k1 = fx.b.ins().bor(k0, kn);
                let k2 = fx.b.ins().bor(k1, f);
                let kspan = fx.b.ins().bor(k2, l);
                let call = |fx: &mut Fx<'_>, xp: Value, yp: Value, rp: Value, shape: Value| {
                    fx.call(microkernel::gemm_tile as *const () as usize, &[d, xp, bk, yp, rp, shape, kspan]);
                };
                let (xe, ye) = (c(4 * mr * kk), c(4 * mr * o));
                fx.loop_n(Count::Dyn(full), [xa, yt, rt], [xe, ye, rstep], |fx, [xp, yp, rp]| {
                    call(fx, xp, yp, rp, shape_full);
                });
                let has_rem = fx.b.ins().icmp_imm_s(IntCC::SignedGreaterThan, rem, 0);
                let tail = fx.b.create_block();
                let done = fx.b.create_block();
                fx.b.ins().brif(has_rem, tail, &[], done, &[]);
                fx.b.switch_to_block(tail);
                let xo = fx.b.ins().imul_imm_s(full, xe);
                let yo = fx.b.ins().imul_imm_s(full, ye);
                let xp = fx.add(xa, xo);
                let yp = fx.add(yt, yo);
                let rp = if res.is_some() {
                    let ro = fx.b.ins().imul_imm_s(full, rstep);
                    fx.add(rt, ro)
                } else {
                    rt
                };
                call(fx, xp, yp, rp, shape_rem);
                fx.b.ins().jump(done, &[]);
                fx.b.switch_to_block(done);
            });
        };
        // Full tiles of this part: `[lo, min(hi, full_tiles))`.
        let ft = fx.i(c(full_tiles));
        let lt = fx.b.ins().icmp(IntCC::SignedLessThan, hi, ft);
        let end = fx.b.ins().select(lt, hi, ft);
        fx.for_range(lo, end, 1, |fx, t| {
            let b0 = fx.i(w_addr);
            let bt = fx.elem_scaled(b0, t, c(kk * nr));
            let col = fx.muli(t, c(nr));
            tile(fx, bt, col, nr);
        });
        if let Some((valid, off)) = last {
            // The last, narrower tile, if this part has it.
            let ge = fx.b.ins().icmp(IntCC::SignedGreaterThanOrEqual, ft, lo);
            let lt = fx.b.ins().icmp(IntCC::SignedLessThan, ft, hi);
            let mine = fx.b.ins().band(ge, lt);
            let body = fx.b.create_block();
            let next = fx.b.create_block();
            fx.b.ins().brif(mine, body, &[], next, &[]);
            fx.b.switch_to_block(body);
            let bt = fx.i(w_addr + c(4 * off));
            let col = fx.i(c(full_tiles * nr));
            tile(fx, bt, col, valid);
            fx.b.ins().jump(next, &[]);
            fx.b.switch_to_block(next);
        }
    })?;
    Ok(())
}

/// Lowers a plane convolution (see [`crate::jit::plan::plane_conv`]): a plain operand with few
/// channels, at most 8 output channels, stride 1, zero padding. Pixels go in the vector
/// lanes instead of channels — whole rows of 16 consecutive output pixels of one channel —
/// so none of the lanes is padding; the result is plain NCHW. The operand is first copied
/// with its zero padding (`[c][h′][w′]` planes), then each output row is one call or a few
/// into [`microkernel::plane_tile`], which sums over channels and taps with one broadcast
/// weight per output channel and tap, and applies the whole epilogue in registers.
pub(in crate::jit) fn plane_conv(jit: &mut Jit, cx: &NodeCx<'_>, conv: &Conv2d, isa: Isa) -> Result<()> {
    let (cin, ih, iw) = cx.in_chw(0)?;
    let (cout, oh, ow) = cx.out_chw()?;
    let (kh, kw) = conv.kernel;
    let (dh, dw) = conv.dilation;
    let (pt, pb, pl, pr) = conv.pads();
    let (ph, pw) = (ih + pt + pb, iw + pl + pr);
    let stage_slot = cx.scratch.ok_or_else(|| Error::Unsupported("plane conv without a staging slot".into()))?;
    let staged = crate::jit::plan::plane_staged_input(conv, cx.in_tys[0]);
    let st = Stage::planes(jit, cx, stage_slot, (cin, 1), (ih, iw), (pt, pl, ph, pw), staged);
    st.kernel(jit, cx, st.work(), false)?;

    let w = cx.param_ref("weight")?;
    let taps = kh * kw;
    let w_addr = jit.consts.f32s_filled(cin * taps * cout, |p| {
        // `[ic][kh][kw][oc]` from PyTorch's `[oc][ic][kh][kw]`.
        for (o, filt) in w.chunks_exact((cin * taps).max(1)).enumerate() {
            for (k, v) in filt.iter().enumerate() {
                p[k * cout + o] = *v;
            }
        }
    });
    drop(w);
    let (scale, shift) = affine(cx, conv.bias, &conv.epilogue, cout, cout)?;
    let tile = microkernel::PlaneTile {
        isa,
        ic: cin,
        kh,
        kw,
        x_c: (ph * pw) as isize,
        x_tr: (dh * pw) as isize,
        x_tc: dw as isize,
        y_c: (oh * ow) as isize,
        w: w_addr as usize as *const f32,
        scale: scale.map_or(std::ptr::null(), |v| jit.consts.f32s_aligned(&v) as usize as *const f32),
        shift: shift.map_or(std::ptr::null(), |v| jit.consts.f32s_aligned(&v) as usize as *const f32),
        act: Act::of(conv.epilogue.act),
    };
    let desc = jit.consts.keep(tile, 4 * cin * taps * cout);
    let lanes = match isa {
        Isa::Avx512 => 16,
        Isa::Avx2 => 8,
    };
    let seg = microkernel::plane_nv(cout) * lanes;
    let ys = cx.output;
    let res = conv.epilogue.residual.then(|| cx.inputs[1]);
    let out_size = cx.out_len;
    let work = 2 * (cout * oh * ow * cin * taps) as u64;
    jit.parallel_kernel(&cx.node.name, work, |fx| {
        let x = fx.slot(stage_slot);
        let y = fx.slot(ys);
        let r = match res {
            Some(s) => fx.slot(s),
            None => fx.i(0),
        };
        let d = fx.i(desc);
        let units = fx.muli(fx.nb, c(oh));
        let (lo, hi) = part_range(fx, units);
        fx.for_range(lo, hi, 1, |fx, u| {
            let n = fx.b.ins().udiv_imm_u(u, c(oh));
            let row = fx.b.ins().urem_imm_u(u, c(oh));
            // Output row `row` reads padded rows `row + a·dh`, from column 0.
            let xn = fx.elem_scaled(x, n, c(staged));
            let xr = fx.elem_scaled(xn, row, c(pw));
            let yn = fx.elem_scaled(y, n, c(out_size));
            let yr = fx.elem_scaled(yn, row, c(ow));
            let rr = if res.is_some() {
                let rn = fx.elem_scaled(r, n, c(out_size));
                fx.elem_scaled(rn, row, c(ow))
            } else {
                r
            };
            let mut px0 = 0;
            while px0 < ow {
                let npx = seg.min(ow - px0);
                let nv = npx.div_ceil(lanes);
                let valid = npx - (nv - 1) * lanes;
                let xp = fx.addi(xr, c(4 * px0));
                let yp = fx.addi(yr, c(4 * px0));
                let rp = if res.is_some() { fx.addi(rr, c(4 * px0)) } else { rr };
                let shape = fx.i(c(nv | (valid << 8) | (cout << 16)));
                fx.call(microkernel::plane_tile as *const () as usize, &[d, xp, yp, rp, shape]);
                px0 += npx;
            }
        });
    })?;
    Ok(())
}
