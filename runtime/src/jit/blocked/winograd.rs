//! Winograd F(2×2, 3×3) and F(2×2, 5×5) convolutions on the blocked layout: the loop nest around the
//! Winograd units ([`crate::jit::microkernel::wino_unit`]) and its transformed, packed
//! weights.
//!
//! A Conv2d takes this path when it is a stride-1, dilation-1, single-group 3×3 or 5×5 convolution
//! on a blocked operand whose padding is zeros (read from the conv's zero-padded staged copy,
//! as the direct tiles do) and [`choose`] prefers it, or `Options::conv` forces it. The work
//! is a list of units — a few rows of 2×2 output tiles (at least [`UNIT_TILES`] tiles where
//! the map has them) of one channel group of one sample, ordered group → sample → rows —
//! split between threads like the direct conv's rows.
//! Each group's weights are transformed once (`G g Gᵀ` in f64, rounded once) and packed as
//! `[ξ][c][nb·16]`.

use super::common::{Stage, fill_by_items, split_even};
use crate::ConvAlgorithm;
use crate::error::Result;
use crate::jit::codegen::{Fx, Jit, c, part_range};
use crate::jit::cx::NodeCx;
use crate::jit::microkernel::{self, Act, WinoTile};
use crate::jit::plan::BLOCK;
use cnnc_compiler::ops::Conv2d;
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{InstBuilder, Value};

/// Why the Winograd tiles cannot compute `conv`, if they cannot: they need a stride-1,
/// dilation-1, single-group 3×3 or 5×5 convolution on a blocked operand whose padding, if any, is
/// already in the staged copy the conv reads.
pub(in crate::jit) fn unfit(conv: &Conv2d, blocked_in: bool, padded_copy: bool) -> Option<&'static str> {
    if conv.kernel != (3, 3) && conv.kernel != (5, 5) {
        Some("not a 3×3 or 5×5 kernel")
    } else if conv.stride != (1, 1) {
        Some("stride > 1")
    } else if conv.dilation != (1, 1) {
        Some("dilated")
    } else if conv.groups != 1 {
        Some("grouped")
    } else if !blocked_in {
        Some("plain operand (a net's first layer)")
    } else if !padded_copy && conv.pads() != (0, 0, 0, 0) {
        Some("padding other than zeros")
    } else if conv.out_channels.div_ceil(BLOCK) >= microkernel::WINO_MAX_BLOCKS {
        Some("more output channels than the tiles address")
    } else {
        None
    }
}

/// What the cost model picks for a convolution the Winograd tiles can compute.
pub(in crate::jit) enum Pick {
    Direct(String),
    Winograd(String),
    /// Winograd in units of this many samples when a call has at least that many, the
    /// direct tiles for fewer.
    FromBatch(usize, String),
}

/// What a convolution the Winograd tiles can compute takes, and why: either when forced;
/// otherwise Winograd when it has at least 16 channels on each side and at least
/// [`MIN_TILES`] 2×2 tiles per sample; on smaller maps that its tiles cover with little
/// waste (at most 1.4× the outputs), Winograd on units of several samples — for 3×3 from a
/// batch of that many on, for 5×5 at any batch.
///
/// Measured on one core (`examples/conv_layers`, AVX-512 and AVX2, batch 1, alternating
/// rounds, 2026-12-06), Winograd ran 1.4–1.8× faster than the direct tiles on every 3×3
/// layer of ResNet-18 and VGG-11 and on 16→32 and 32→32 channels at 32×32 and 16×16, except
/// 512→512 at 7×7 (1.04× alone, and 0.7× inside ResNet-18 at batch 1, where its 16 MB of
/// transformed weights — 1.8× the direct conv's — come from memory for 16 tiles). At batch
/// 8 in units of 6 samples (96 tiles per pass over the weights) the same layer ran 1.26×
/// faster than direct (AVX2: 1.50×). F(2×2, 5×5) (same rounds): 1.47× on 32→32 at 16×16,
/// 1.71× on 32→64 at 8×8 at batch 1 (16 tiles; its weights are 36/25 of the direct conv's,
/// not 16/9), 1.99× on AlexNet's 96→256 at 26×26 (AVX2 1.30–1.69×). Below 16 channels the
/// operand is one partial block and the transforms cost as much as the products.
///
/// `repacked` (a training graph, whose weights are packed again after every step): units of
/// several samples, which keep both packings, only where the tiles waste at most 1.2× (6×6,
/// 4×4 maps). On the 224×224 seed ResNet's 7×7 layer4 at batch 8 they ran 3–6% faster than
/// direct while both packings of the four layers' weights, forward and input gradient, took
/// ~55 ms of a 670 ms step to repack; on the 96×96 one's 6×6 layer3 at batch 32, ~45%.
pub(in crate::jit) fn choose(
    algo: ConvAlgorithm,
    k: usize,
    cin: usize,
    cout: usize,
    oh: usize,
    ow: usize,
    repacked: bool,
) -> Pick {
    let shape = format!("{k}×{k}, {cin}→{cout} channels at {oh}×{ow}");
    let tiles = oh.div_ceil(2) * ow.div_ceil(2);
    let units_waste = if repacked { 12 } else { 14 };
    let plural = if tiles == 1 { "" } else { "s" };
    match algo {
        ConvAlgorithm::Direct => Pick::Direct("forced (Options::conv)".into()),
        ConvAlgorithm::Winograd => Pick::Winograd("forced (Options::conv)".into()),
        ConvAlgorithm::Auto if cin < 16 || cout < 16 => Pick::Direct(format!("{shape}: fewer than 16 channels")),
        ConvAlgorithm::Auto if k == 5 && tiles < MIN_TILES && 10 * 4 * tiles <= 14 * oh * ow => {
            let s = unit_samples(oh, ow);
            let why = format!("{tiles} 2×2 tile{plural} per sample, in units of {s} samples: 2.78× fewer FMAs");
            Pick::Winograd(format!("{shape}: {why}"))
        }
        ConvAlgorithm::Auto if tiles < MIN_TILES && 10 * 4 * tiles <= units_waste * oh * ow => {
            let s = unit_samples(oh, ow);
            let why =
                format!("{tiles} 2×2 tile{plural} per sample: in units of {s} samples from batch {s} on, direct below");
            Pick::FromBatch(s, format!("{shape}: {why}"))
        }
        ConvAlgorithm::Auto if tiles < MIN_TILES => {
            let why = format!("{tiles} 2×2 tile{plural} per sample cover {} outputs for {}", 4 * tiles, oh * ow);
            let more =
                if repacked && 10 * 4 * tiles <= 14 * oh * ow { " (too many to repack twice every step)" } else { "" };
            Pick::Direct(format!("{shape}: {why}{more}"))
        }
        ConvAlgorithm::Auto => {
            let fewer = if k == 5 { "2.78" } else { "2.25" };
            Pick::Winograd(format!("{shape}: {fewer}× fewer FMAs"))
        }
    }
}

/// Fewest 2×2 output tiles per sample for which the cost model picks Winograd.
const MIN_TILES: usize = 36;

/// Fewest tiles per unit (more rows per unit on narrow maps): a unit streams its channel
/// group's transformed weights once per pass, so its tiles are what reads them.
const UNIT_TILES: usize = 24;

/// Most tiles of a sample that make one unit.
const SAMPLE_UNIT_TILES: usize = 64;

/// The operand as the tiles read it: its slot, floats per sample and plane size (padding
/// included); and the staged copy to make sample by sample when the call is not split.
pub(in crate::jit) struct Operand {
    pub slot: usize,
    pub size: usize,
    pub ih: usize,
    pub iw: usize,
    pub lazy: Option<Stage>,
}

/// Lowers a Conv2d node (see [`unfit`]) onto the Winograd tiles as a kernel of its own;
/// `ss` are the addresses of its epilogue's per-channel scale and shift (padded to whole
/// blocks; null where absent), `work` its FLOPs.
pub(in crate::jit) fn lower(
    jit: &mut Jit,
    cx: &NodeCx<'_>,
    conv: &Conv2d,
    x: Operand,
    ss: (*const f32, *const f32),
    work: u64,
) -> Result<()> {
    let (_, oh, ow) = cx.out_chw()?;
    let wino = Wino::prepare(jit, cx, conv, x, ss, unit_samples(oh, ow))?;
    jit.parallel_kernel(&cx.node.name, work, |fx| wino.emit(fx))?;
    Ok(())
}

/// Samples per unit: one where a sample has [`MIN_TILES`] tiles, else enough for
/// [`BATCH_UNIT_TILES`] (at most 255).
pub(in crate::jit) fn unit_samples(oh: usize, ow: usize) -> usize {
    let per = oh.div_ceil(2) * ow.div_ceil(2);
    if per >= MIN_TILES { 1 } else { BATCH_UNIT_TILES.div_ceil(per.max(1)).clamp(1, 255) }
}

/// Tiles per unit of several samples: each pass over a channel group's weights serves that
/// many (at batch 8, 512→512 at 7×7: 1.20× the direct tiles' speed in units of 3 samples,
/// 1.26× in units of 6).
const BATCH_UNIT_TILES: usize = 96;

/// A Winograd conv ready to emit: its weights packed, its descriptor built.
pub(in crate::jit) struct Wino {
    w_addr: i64,
    /// `(first block, blocks, offset of the packed weights)` per channel group.
    groups: Vec<(usize, usize, usize)>,
    /// How calls cut their work into units; and, for calls of too few samples to give
    /// every thread a unit that way, of fewer tile rows.
    main: Units,
    small: Option<Units>,
    oh: usize,
    ow: usize,
    xs: usize,
    in_size: usize,
    lazy: Option<Stage>,
    ys: usize,
    res: Option<usize>,
    out_size: usize,
}

/// How a call's work is cut into units: `rows` tile rows of one sample (`per_sample` units
/// per sample), or `samples` whole samples; `desc` the descriptor with those rows.
#[derive(Clone, Copy)]
struct Units {
    desc: i64,
    rows: usize,
    per_sample: usize,
    samples: usize,
}

impl Wino {
    /// Packs the transformed weights and builds the descriptor; `samples` per unit (1:
    /// units of tile rows within a sample).
    pub(in crate::jit) fn prepare(
        jit: &mut Jit,
        cx: &NodeCx<'_>,
        conv: &Conv2d,
        x: Operand,
        (scale, shift): (*const f32, *const f32),
        samples: usize,
    ) -> Result<Wino> {
        let isa =
            jit.isa.ok_or_else(|| crate::Error::Unsupported("Winograd conv without a micro-kernel ISA".into()))?;
        let (cin, _, _) = cx.in_chw(0)?;
        let (cout, oh, ow) = cx.out_chw()?;
        let k = conv.kernel.0;
        let (taps, positions) = (k * k, (k + 1) * (k + 1));
        let icb = cin.div_ceil(BLOCK);
        let ocb = cout.div_ceil(BLOCK);
        let (th, tw) = (oh.div_ceil(2), ow.div_ceil(2));
        // Tile rows per unit: enough tiles for the weights of a pass to be read by many; a
        // small map's whole sample.
        let rows = if th * tw <= SAMPLE_UNIT_TILES { th } else { UNIT_TILES.div_ceil(tw).clamp(1, th) };
        let per_sample = th.div_ceil(rows);
        let samples = if rows == th { samples.max(1) } else { 1 };
        // Channel groups of at most `conv_nb` blocks, as even as possible.
        let mut groups = vec![];
        let mut total = 0;
        let mut ocb0 = 0;
        for nb in split_even(ocb, isa.conv_nb()) {
            groups.push((ocb0, nb, total));
            total += positions * cin * nb * BLOCK;
            ocb0 += nb;
        }
        let w = cx.param_ref("weight")?;
        let flipped = cx.flipped;
        let starts: Vec<usize> = groups.iter().map(|g| g.2).collect();
        let pack_groups = |packed: &mut [f32], items: std::ops::Range<usize>| {
            // Per input channel, the kernels of a group's output channels side by side
            // (`g[tap][j]`, f64), transformed a whole row of channels at a time, each of the
            // `(k+1)²` results written as one packed row.
            let mut g = vec![0f64; taps * BLOCK * isa.conv_nb()];
            let mut u = vec![0f64; positions * BLOCK * isa.conv_nb()];
            let mut scratch = vec![];
            let first = starts.get(items.start).copied().unwrap_or(total);
            for &(ocb0, nb, off) in &groups[items] {
                let off = off - first;
                let width = nb * BLOCK;
                let valid = width.min(cout - ocb0 * BLOCK);
                let o0 = ocb0 * BLOCK;
                for i in 0..cin {
                    // Tap `t` of the k×k kernel of output channel `o0 + j`, input channel `i`:
                    // a flipped weight is the stored `[i][o][k][k]` read backwards.
                    for j in 0..valid {
                        if flipped {
                            let kernel = &w[(i * cout + o0 + j) * taps..][..taps];
                            for (t, v) in kernel.iter().rev().enumerate() {
                                g[t * width + j] = f64::from(*v);
                            }
                        } else {
                            let kernel = &w[((o0 + j) * cin + i) * taps..][..taps];
                            for (t, v) in kernel.iter().enumerate() {
                                g[t * width + j] = f64::from(*v);
                            }
                        }
                    }
                    microkernel::weight_transform_rows(
                        k,
                        &g[..taps * width],
                        &mut u[..positions * width],
                        width,
                        &mut scratch,
                    );
                    for xi in 0..positions {
                        let row = &mut packed[off + (xi * cin + i) * width..][..valid];
                        for (p, v) in row.iter_mut().zip(&u[xi * width..]) {
                            *p = *v as f32;
                        }
                    }
                }
            }
        };
        let threads = jit.threads;
        let pack = |packed: &mut [f32]| fill_by_items(packed, &starts, threads, pack_groups);
        let w_addr = jit.consts.f32s_filled(total, pack);
        drop(w);
        let tile = WinoTile {
            isa,
            k,
            c: cin,
            icb,
            ih: x.ih,
            iw: x.iw,
            x_icb: x.ih * x.iw * BLOCK,
            oh,
            ow,
            th,
            tw,
            rows,
            x_sample: x.size,
            y_sample: cx.out_len,
            channels: cout,
            scale,
            shift,
            act: Act::of(conv.epilogue.act),
        };
        // Whole-sample units and fewer channel groups than threads: a call of fewer samples
        // than threads (batch 1) would leave threads idle; it takes units of fewer rows.
        let small = (jit.threads > 1 && groups.len() < jit.threads && rows == th && th > 1).then(|| {
            let rows = th.div_ceil(jit.threads.div_ceil(groups.len()));
            let desc = jit.consts.keep(WinoTile { rows, ..tile }, 0);
            Units { desc, rows, per_sample: th.div_ceil(rows), samples: 1 }
        });
        let desc = jit.consts.keep(tile, 4 * total);
        Ok(Wino {
            w_addr,
            groups,
            main: Units { desc, rows, per_sample, samples },
            small,
            oh,
            ow,
            xs: x.slot,
            in_size: x.size,
            lazy: x.lazy,
            ys: cx.output,
            res: conv.epilogue.residual.then(|| cx.inputs[1]),
            out_size: cx.out_len,
        })
    }

    /// Emits the loop over this part's units into a kernel body: the main units, or, when a
    /// call has fewer of those than parts, the small ones.
    pub(in crate::jit) fn emit(&self, fx: &mut Fx<'_>) {
        let Some(small) = self.small else { return self.emit_units(fx, self.main) };
        let (_, units) = self.units(fx, self.main);
        let few = fx.b.ins().icmp(IntCC::UnsignedLessThan, units, fx.parts);
        let (few_b, main_b, done) = (fx.b.create_block(), fx.b.create_block(), fx.b.create_block());
        fx.b.ins().brif(few, few_b, &[], main_b, &[]);
        for (block, u) in [(few_b, small), (main_b, self.main)] {
            fx.b.switch_to_block(block);
            self.emit_units(fx, u);
            fx.b.ins().jump(done, &[]);
        }
        fx.b.switch_to_block(done);
    }

    /// Units per channel group and in all, for the call's sample count: `per_sample` per
    /// sample, or one per `samples` samples.
    fn units(&self, fx: &mut Fx<'_>, u: Units) -> (Value, Value) {
        let seg = if u.samples > 1 {
            let n = fx.addi(fx.nb, c(u.samples - 1));
            fx.b.ins().udiv_imm_u(n, c(u.samples))
        } else {
            fx.muli(fx.nb, c(u.per_sample))
        };
        (seg, fx.muli(seg, c(self.groups.len())))
    }

    /// The loop over this part's units cut as `u` says.
    fn emit_units(&self, fx: &mut Fx<'_>, u: Units) {
        let Units { desc, rows, per_sample, samples } = u;
        let Wino { w_addr, oh, ow, xs, in_size, ys, res, out_size, .. } = *self;
        let xb = fx.slot(xs);
        let y = fx.slot(ys);
        let r = match res {
            Some(s) => fx.slot(s),
            None => fx.i(0),
        };
        let d = fx.i(desc);
        let (seg, units) = self.units(fx, u);
        let (lo_u, hi_u) = part_range(fx, units);
        for (gi, &(ocb0, nb, off)) in self.groups.iter().enumerate() {
            // This group's units are `[gi·seg, (gi + 1)·seg)`.
            let seg0 = fx.muli(seg, c(gi));
            let seg1 = fx.add(seg0, seg);
            let a = fx.smax(lo_u, seg0);
            let b = fx.smin(hi_u, seg1);
            let wg = fx.i(w_addr + c(4 * off));
            fx.for_range(a, b, 1, |fx, u| {
                let local = fx.b.ins().isub(u, seg0);
                // The unit's first sample, its sample count and first tile row.
                let (n, cnt, ti) = if samples > 1 {
                    let n = fx.muli(local, c(samples));
                    let left = fx.b.ins().isub(fx.nb, n);
                    let most = fx.i(c(samples));
                    let cnt = fx.smin(left, most);
                    (n, cnt, fx.i(0))
                } else {
                    let n = fx.b.ins().udiv_imm_u(local, c(per_sample));
                    let unit = fx.b.ins().urem_imm_u(local, c(per_sample));
                    (n, fx.i(1), fx.muli(unit, c(rows)))
                };
                if let (0, Some(st)) = (gi, &self.lazy) {
                    // Not split: the first group copies the unit's samples before its first tiles.
                    st.emit_before_first(fx, n, cnt, ti);
                }
                let xn = fx.elem_scaled(xb, n, c(in_size));
                let yn0 = fx.elem_scaled(y, n, c(out_size));
                let yn = fx.addi(yn0, c(4 * ocb0 * oh * ow * BLOCK));
                let rn = if res.is_some() {
                    let rn0 = fx.elem_scaled(r, n, c(out_size));
                    fx.addi(rn0, c(4 * ocb0 * oh * ow * BLOCK))
                } else {
                    r
                };
                let hi_bits = fx.i(microkernel::wino_shape(0, nb, 0, ocb0));
                let cnt_bits = fx.b.ins().ishl_imm_u(cnt, 36);
                let shape = fx.b.ins().bor(hi_bits, ti);
                let shape = fx.b.ins().bor(shape, cnt_bits);
                fx.call(microkernel::wino_unit as *const () as usize, &[d, xn, wg, yn, rn, shape]);
            });
        }
    }
}

/// Lowers a Conv2d's weight gradient (a training graph's `ConvWeightGrad`, inputs `x` and
/// `∂y`, plain) onto [`microkernel::wino_wgrad`] when it fits (`plan::wgrad_winograd_fits`)
/// and the algorithm choice takes it — forced, or, by default, a 3×3 kernel with at least
/// 16 channels each side whose 2×2 tiles cover the output with little waste (at least
/// [`MIN_TILES`] per sample, or at most 1.2× the outputs, as 6×6 and 4×4 maps; small maps
/// are reduced in chunks of several samples — on 7×7 maps (1.31×) the GEMM form was 8–20%
/// faster, on 6×6 Winograd ~15%). F(2×2, 5×5) weight gradients differ from the f64 reference by up to ~1e-5 of
/// the largest gradient (3×3: 2–5e-7, like the GEMM form), so the default leaves 5×5 ones
/// to the GEMM. Records the choice; `false` when the caller lowers the GEMM form instead.
/// Threads share it by groups of output channels (each group reads every sample).
pub(in crate::jit) fn weight_grad(
    jit: &mut Jit,
    cx: &NodeCx<'_>,
    conv: &Conv2d,
    isa: microkernel::Isa,
) -> Result<bool> {
    if !crate::jit::plan::wgrad_winograd_fits(conv) {
        return Ok(false);
    }
    let (cin, h, w) = cx.in_chw(0)?;
    let (o, oh, ow) = cx.in_chw(1)?;
    let k = conv.kernel.0;
    let tiles = oh.div_ceil(2) * ow.div_ceil(2);
    let shape = format!("{k}×{k}, {cin}→{o} channels at {oh}×{ow}");
    let (take, reason) = match jit.conv {
        ConvAlgorithm::Direct => (false, "forced (Options::conv)".to_string()),
        ConvAlgorithm::Winograd => (true, "forced (Options::conv)".to_string()),
        ConvAlgorithm::Auto if cin < 16 || o < 16 => (false, format!("{shape}: fewer than 16 channels")),
        ConvAlgorithm::Auto if k == 5 => {
            (false, format!("{shape}: a 5×5 weight gradient (F(2×2, 5×5)'s error, ~1e-5, only when forced)"))
        }
        ConvAlgorithm::Auto if tiles < MIN_TILES && 10 * 4 * tiles > 12 * oh * ow => {
            (false, format!("{shape}: {tiles} 2×2 tiles per sample cover {} outputs for {}", 4 * tiles, oh * ow))
        }
        ConvAlgorithm::Auto => (true, format!("{shape}: weight gradient, 2.25× fewer FMAs")),
    };
    let algorithm = if take { ConvAlgorithm::Winograd } else { ConvAlgorithm::Direct };
    jit.conv_choices.push(crate::ConvChoice { node: cx.node.name.clone(), algorithm, reason });
    if !take {
        return Ok(false);
    }
    let (pt, _, pl, _) = conv.pads();
    let s = microkernel::WgradScratch::new(k, cin, (h, w), (oh, ow));
    let ocb = o.div_ceil(BLOCK);
    // Groups of at most 4 blocks, at least as many groups as threads where there are blocks.
    let most = ocb.div_ceil(jit.threads.max(1)).clamp(1, 4);
    let mut shapes = vec![];
    let mut ocb0 = 0;
    for nb in split_even(ocb, most) {
        shapes.push(microkernel::wgrad_shape(0, ocb0, nb));
        ocb0 += nb;
    }
    let tile = microkernel::WgradTile {
        isa,
        k,
        c: cin,
        icb: cin.div_ceil(BLOCK),
        h,
        w,
        pt,
        pl,
        oc: o,
        oh,
        ow,
        th: oh.div_ceil(2),
        tw: ow.div_ceil(2),
        s,
        dy_blocked: cx.in_layouts[1].is_blocked(),
        x_blocked: cx.in_layouts[0].is_blocked(),
    };
    let desc = jit.consts.keep(tile, std::mem::size_of::<microkernel::WgradTile>());
    let table = jit.consts.i64s(shapes.clone());
    let groups = shapes.len();
    let (xs, ds, os, ss) = (cx.inputs[0], cx.inputs[1], cx.output, cx.scratch_slot()?);
    let total = crate::jit::plan::GradScratch::of(
        &cnnc_compiler::ops::train::TrainOp::ConvWeightGrad(conv.clone()),
        &cx.in_tys,
        &cx.node.ty,
    )
    .map(|g| g.total)
    .ok_or_else(|| crate::Error::Unsupported(format!("`{}`: no scratch layout", cx.node.name)))?;
    debug_assert!(s.total <= total);
    let work = 2 * (o * cin * k * k * oh * ow) as u64;
    jit.parallel_kernel(&cx.node.name, work, |fx| {
        let (x, dy, dw, scr) = (fx.slot(xs), fx.slot(ds), fx.slot(os), fx.slot(ss));
        // This part's own copy of the scratch (the plan made one per thread).
        let off = fx.b.ins().imul_imm_s(fx.part, c(4 * total));
        let scr = fx.add(scr, off);
        let d = fx.i(desc);
        let tab = fx.i(table);
        let n = fx.i(c(groups));
        let (lo, hi) = part_range(fx, n);
        fx.for_range(lo, hi, 1, |fx, gi| {
            let at = fx.elem_scaled(tab, gi, 2);
            let bits = fx.load_i64(at, 0);
            let shape = fx.b.ins().bor(bits, fx.nb);
            fx.call(microkernel::wino_wgrad as *const () as usize, &[d, x, dy, dw, scr, shape]);
        });
    })?;
    Ok(true)
}
