//! Conv2d and Linear backward as GEMMs over the micro-kernel tile ([`microkernel::gemm_tile`]),
//! on the plain NCHW tensors training graphs are planned in. The generated code does the
//! packing, the loops over tiles and rows, the scatter and the fold; the tile does the FMAs
//! (f32 accumulation, like the forward kernels).
//!
//! - **Weight gradient** of a Conv2d (per group): `dW[oc][j] = Σ_n Σ_q dY[n][oc][q] ·
//!   col_n[j][q]`, `j` a (channel, ky, kx) tap, `q` an output pixel, `col` the input's
//!   im2col (of the padded input, as `F.pad` makes it). Samples go in blocks of
//!   [`conv_grad_block`] so one tile call reduces ≥ 256 steps (≥ 1024 on small maps with a
//!   gradient beyond the L2 cache, one pass over it per batch): `A` is the block's output gradient
//!   (a row per output channel), `B` the block's im2col, gathered one column tile of taps
//!   at a time and reduced while it is in cache, and the partial sums wait in `dW` between
//!   blocks. Threads share it by column tiles, or, with few taps (one or two tiles), by
//!   ranges of sample blocks, each summing into a partial of its own that a second kernel
//!   adds in (the sum's order then depends on the thread count, within f32 rounding).
//! - **Input gradient** of a Conv2d where the blocked tier's convolution does not serve
//!   (`plan::input_grad_conv`: strided, dilated, grouped, padded other than by zeros):
//!   per sample and group, `cols = Wᵀ · dY` (`A` = the transposed weights, packed once
//!   when compiling; `B` = the packed output gradient), in chunks of output rows
//!   (`plan::input_grad_rows`) whose columns `col2im` adds, still in cache, into the padded
//!   input's gradient, which is folded into the input's (zeros dropped; reflect, replicate
//!   and circular pixels added to their source). On small maps (fewer than 64 pixels) the
//!   transposed product `colsᵀ = dYᵀ · W` instead, pixels as rows, for a block of samples
//!   per pass over the weights ([`conv_input_grad_t`]).
//! - **Linear**: the input gradient is the forward GEMM with `Wᵀ` ([`rows_gemm`]); the weight
//!   gradient `dW = Σ_r dyᵀ·x` reduces over rows in blocks like the conv's.
//! - **The forward Conv2d of a training graph** where the blocked tier's kernels do not
//!   apply (few channels, groups) ([`conv_forward`]): per block of samples and group,
//!   `yᵀ = col · Wᵀ` — a row of taps per output pixel times the weights packed once —
//!   then transposed into `y` with the bias (and a fused residual and activation), four pixels at a time.
//!
//! Scratch is one fixed region per kernel and thread ([`GradScratch`]). Results equal the
//! interpreter's f64 sums within f32 rounding (the JIT ≡ interpreter suites bound it).

use super::common::block_rows;
use super::conv::{GemmWeight, RowsGemm, rows_gemm};
use crate::error::{Error, Result};
use crate::jit::codegen::{Count, Fx, Jit, c, part_range};
use crate::jit::cx::NodeCx;
use crate::jit::eltwise::copy_run;
use crate::jit::math::act_v;
use crate::jit::microkernel::{self, Act, GemmTile, Isa};
use crate::jit::plan::{GradScratch, conv_grad_block, input_grad_rows, input_grad_transposed, wgrad_rows};
use crate::jit::tables::axis_table;
use cnnc_compiler::ops::train::TrainOp;
use cnnc_compiler::ops::{Conv2d, Linear};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{InstBuilder, Value, types};

/// One GEMM of static shape, `C[m × n] (+)= A[m × k]·Bᵀ`, over the tile: `A` row-major at
/// stride `lda`; `B` packed by column tiles as `[tile][k][width]` (tile `t` at float
/// `t·kmax·nr`, `width` = its valid columns rounded up to whole vectors); `C` at stride
/// `ldc`. `k ≤ kmax` may vary at run time.
struct Gemm {
    desc: i64,
    m: usize,
    n: usize,
    kmax: usize,
    lda: usize,
    ldc: usize,
    nr: usize,
    lanes: usize,
    mr: usize,
}

impl Gemm {
    fn new(jit: &mut Jit, isa: Isa, m: usize, n: usize, kmax: usize, lda: usize, ldc: usize) -> Gemm {
        Gemm::grouped(jit, isa, (m, n, kmax), (lda, ldc), (0, 0), isa.gemm_mr())
    }

    /// As [`Gemm::new`], `A`'s rows in groups (see [`GemmTile::group`]: `group` rows `lda`
    /// apart, groups `lda_group` apart), `mr` rows per tile (a multiple of `group`, at
    /// most [`Isa::gemm_mr_for`] the widest column tile).
    fn grouped(
        jit: &mut Jit,
        isa: Isa,
        (m, n, kmax): (usize, usize, usize),
        (lda, ldc): (usize, usize),
        (group, lda_group): (usize, usize),
        mr: usize,
    ) -> Gemm {
        let tile = GemmTile {
            isa,
            k: kmax,
            lda,
            ldc,
            group,
            lda_group,
            scale: std::ptr::null(),
            shift: std::ptr::null(),
            act: Act::None,
        };
        let desc = jit.consts.keep(tile, std::mem::size_of::<GemmTile>());
        let nr = isa.gemm_nr();
        let lanes = nr / if isa == Isa::Avx512 { 4 } else { 2 };
        debug_assert!(mr <= isa.gemm_mr_for(n.min(nr)) && (group == 0 || mr.is_multiple_of(group)));
        Gemm { desc, m, n, kmax, lda, ldc, nr, lanes, mr }
    }

    /// Floats per reduction step of tile `t` in the packed `B`.
    fn width(&self, t: usize) -> usize {
        (self.n - t * self.nr).min(self.nr).next_multiple_of(self.lanes)
    }

    /// Column tiles of full width.
    fn full_tiles(&self) -> usize {
        self.n / self.nr
    }

    /// Where tile `t` starts in the packed `B`, in floats.
    fn tile_off(&self, t: usize) -> usize {
        t * self.kmax * self.nr
    }

    /// The tile's `kspan` for a whole reduction of `kn` steps (`a` and `b` point at step 0):
    /// `kn << 32 | first << 62 | last << 63`, `first` (an i64 0 or 1) saying whether `C`
    /// starts from zero, else the sums add to what it holds.
    fn kspan(fx: &mut Fx<'_>, kn: Value, first: Value) -> Value {
        let k = fx.b.ins().ishl_imm_u(kn, 32);
        let f = fx.b.ins().ishl_imm_u(first, 62);
        let k = fx.b.ins().bor(k, f);
        let last = fx.i(i64::MIN);
        fx.b.ins().bor(k, last)
    }

    /// Emits the whole product: `kn` reduction steps (`1 ≤ kn ≤ kmax`), `first` as for
    /// [`Gemm::kspan`].
    fn emit(&self, fx: &mut Fx<'_>, a: Value, b: Value, cp: Value, kn: Value, first: Value) {
        let m = fx.i(c(self.m));
        self.emit_rows(fx, a, b, cp, kn, first, m);
    }

    /// As [`Gemm::emit`] with `m` rows counted at run time (`1 ≤ m ≤ self.m`).
    #[allow(clippy::too_many_arguments)]
    fn emit_rows(&self, fx: &mut Fx<'_>, a: Value, b: Value, cp: Value, kn: Value, first: Value, m: Value) {
        let lo = fx.i(0);
        let nfull = fx.i(c(self.full_tiles()));
        let rem = fx.i(i64::from(!self.n.is_multiple_of(self.nr)));
        let ks = Gemm::kspan(fx, kn, first);
        self.tiles(fx, [a, b, cp, ks, m], (lo, nfull, rem));
    }

    /// As [`Gemm::emit`], for the column tiles `lo..lo + nfull` (all full; `nfull` may be
    /// ≤ 0) and, if `rem` (an i64 0 or 1) is 1, the last, partial tile.
    #[allow(clippy::too_many_arguments)]
    fn emit_range(
        &self,
        fx: &mut Fx<'_>,
        a: Value,
        b: Value,
        cp: Value,
        kn: Value,
        first: Value,
        range: (Value, Value, Value),
    ) {
        let m = fx.i(c(self.m));
        let ks = Gemm::kspan(fx, kn, first);
        self.tiles(fx, [a, b, cp, ks, m], range);
    }

    /// Column tile `t` alone (`valid` columns), its packed `B` at `bt`: every row block.
    #[allow(clippy::too_many_arguments)]
    fn emit_tile(
        &self,
        fx: &mut Fx<'_>,
        a: Value,
        bt: Value,
        cp: Value,
        kn: Value,
        first: Value,
        t: Value,
        valid: usize,
    ) {
        let ks = Gemm::kspan(fx, kn, first);
        let ct = fx.b.ins().imul_imm_s(t, c(4 * self.nr));
        let ct = fx.add(cp, ct);
        let col = fx.b.ins().imul_imm_s(t, c(self.nr));
        let m = fx.i(c(self.m));
        self.rows(fx, [a, bt, ct, col, ks, m], valid);
    }

    /// The column tiles `lo..lo + nfull` (full) and, if `rem` is 1, the partial last one,
    /// each over `m` rows: `[a, b, cp, kspan, m]`.
    fn tiles(&self, fx: &mut Fx<'_>, [a, b, cp, ks, m]: [Value; 5], (lo, nfull, rem): (Value, Value, Value)) {
        let bt = fx.b.ins().imul_imm_s(lo, c(4 * self.kmax * self.nr));
        let bt = fx.add(b, bt);
        let ct = fx.b.ins().imul_imm_s(lo, c(4 * self.nr));
        let ct = fx.add(cp, ct);
        let col = fx.b.ins().imul_imm_s(lo, c(self.nr));
        let steps = [0, c(4 * self.kmax * self.nr), c(4 * self.nr), c(self.nr), 0, 0];
        fx.loop_n(Count::Dyn(nfull), [a, bt, ct, col, ks, m], steps, |fx, v| self.rows(fx, v, self.nr));
        let valid = self.n % self.nr;
        if valid > 0 {
            let full = self.full_tiles();
            let bt = fx.addi(b, c(4 * self.tile_off(full)));
            let ct = fx.addi(cp, c(4 * full * self.nr));
            let col = fx.i(c(full * self.nr));
            fx.loop_n(Count::Dyn(rem), [a, bt, ct, col, ks, m], [0; 6], |fx, v| self.rows(fx, v, valid));
        }
    }

    /// This part's share of the column tiles ([`part_range`] of them): `(lo, nfull, rem)`
    /// as [`Gemm::emit_range`] takes them.
    fn part_tiles(&self, fx: &mut Fx<'_>) -> (Value, Value, Value) {
        let full = self.full_tiles();
        let tiles = fx.i(c(self.n.div_ceil(self.nr)));
        let (lo, hi) = part_range(fx, tiles);
        let fc = fx.i(c(full));
        let over = fx.b.ins().icmp(IntCC::SignedGreaterThan, hi, fc);
        let end = fx.select(over, fc, hi);
        let nfull = fx.b.ins().isub(end, lo);
        let some = fx.b.ins().icmp(IntCC::SignedLessThan, lo, hi);
        let rem = fx.b.ins().band(over, some);
        let rem = fx.b.ins().uextend(types::I64, rem);
        (lo, nfull, rem)
    }

    /// Every row block of one column tile (`valid` columns) over `m` rows:
    /// `[a, bt, ct, col, kspan, m]`.
    fn rows(&self, fx: &mut Fx<'_>, [a, bt, ct, col, ks, m]: [Value; 6], valid: usize) {
        let call = |fx: &mut Fx<'_>, ap: Value, bp: Value, cp: Value, shape: Value, ks: Value| {
            let d = fx.i(self.desc);
            let null = fx.i(0);
            fx.call(microkernel::gemm_tile as *const () as usize, &[d, ap, bp, cp, null, shape, ks]);
        };
        // shape = rows | valid << 8 | col << 16
        let sh = fx.b.ins().ishl_imm_u(col, 16);
        let base = fx.addi(sh, c(valid << 8));
        let full = fx.b.ins().udiv_imm_u(m, c(self.mr));
        let shape = fx.addi(base, c(self.mr));
        let steps = [c(4 * self.mr * self.lda), c(4 * self.mr * self.ldc), 0, 0, 0];
        fx.loop_n(Count::Dyn(full), [a, ct, bt, ks, shape], steps, |fx, [ap, cp, bp, ks, shape]| {
            call(fx, ap, bp, cp, shape, ks);
        });
        let rem = fx.b.ins().urem_imm_u(m, c(self.mr));
        let some = fx.b.ins().icmp_imm_s(IntCC::SignedGreaterThan, rem, 0);
        let some = fx.b.ins().uextend(types::I64, some);
        let done = fx.b.ins().imul_imm_s(full, c(self.mr));
        let ap = fx.b.ins().imul_imm_s(done, c(4 * self.lda));
        let ap = fx.add(a, ap);
        let cp = fx.b.ins().imul_imm_s(done, c(4 * self.ldc));
        let cp = fx.add(ct, cp);
        let shape = fx.add(base, rem);
        fx.loop_n(Count::Dyn(some), [ap, bt, cp, shape, ks], [0; 5], |fx, [ap, bp, cp, shape, ks]| {
            call(fx, ap, bp, cp, shape, ks);
        });
    }
}

/// A Conv2d's geometry as the GEMM forms use it: the padded input `ph × pw` (as `F.pad`
/// makes it), the channels per group, the output pixels `p` and the taps per group `kc`.
struct Geo {
    pads: (usize, usize, usize, usize),
    padded: bool,
    ph: usize,
    pw: usize,
    g: usize,
    cin_g: usize,
    cout_g: usize,
    p: usize,
    kc: usize,
}

impl Geo {
    fn new(conv: &Conv2d, (cin, h, w): (usize, usize, usize), (o, oh, ow): (usize, usize, usize)) -> Geo {
        let pads = conv.pads();
        let (pt, pb, pl, pr) = pads;
        let g = conv.groups.max(1);
        let cin_g = cin / g;
        Geo {
            pads,
            padded: pads != (0, 0, 0, 0),
            ph: h + pt + pb,
            pw: w + pl + pr,
            g,
            cin_g,
            cout_g: o / g,
            p: oh * ow,
            kc: cin_g * conv.kernel.0 * conv.kernel.1,
        }
    }

    /// Per padded row and column, the input index it reads (or −1 for a zero), as
    /// constants — for padding the input; `None` without padding.
    fn pad_tables(&self, jit: &mut Jit, conv: &Conv2d, (h, w): (usize, usize)) -> Result<Option<(i64, i64)>> {
        if !self.padded {
            return Ok(None);
        }
        let (pt, _, pl, _) = self.pads;
        let sy = axis_table(self.ph, 1, 1, 1, pt, h, conv.padding_mode)?;
        let sx = axis_table(self.pw, 1, 1, 1, pl, w, conv.padding_mode)?;
        Ok(Some((jit.consts.i32s(sy), jit.consts.i32s(sx))))
    }

    /// `(top, left)` padding when it is zeros (the fast copy of [`pad_samples`]).
    fn zero_padding(&self, conv: &Conv2d) -> Option<(usize, usize)> {
        (conv.padding_mode == cnnc_compiler::ops::PaddingMode::Zeros).then_some((self.pads.0, self.pads.2))
    }

    /// The row and column preimages ([`preimages`]) of the padding, as constants — for
    /// folding a padded gradient back ([`fold`]); `None` without padding.
    fn fold_tables(&self, jit: &mut Jit, conv: &Conv2d, (h, w): (usize, usize)) -> Result<Option<[i64; 4]>> {
        if !self.padded {
            return Ok(None);
        }
        let (pt, _, pl, _) = self.pads;
        let (ys, yl) = preimages(&sources(conv, pt, h, self.ph)?, h);
        let (xs, xl) = preimages(&sources(conv, pl, w, self.pw)?, w);
        Ok(Some([ys, yl, xs, xl].map(|t| jit.consts.i64s(t))))
    }
}

impl Gemm {
    /// Packs `B` for each of `groups` groups as the tiles read it (`[tile][k][width]`, the
    /// groups `len` floats apart) from a matrix `m` per group (`[rows][ld]` row-major, the
    /// groups `rows · ld` floats apart): `B[k][col] = m[col][k]` if `transposed` (8×8
    /// blocks at a time, [`microkernel::transpose_columns`]), else `m[k][col]` (row copies).
    /// Returns the address and `len`.
    fn pack_b(
        &self,
        jit: &mut Jit,
        groups: usize,
        m: &[f32],
        (rows, ld): (usize, usize),
        transposed: bool,
    ) -> (i64, usize) {
        let (nr, full) = (self.nr, self.full_tiles());
        let len = self.tile_off(full) + if self.n.is_multiple_of(nr) { 0 } else { self.kmax * self.width(full) };
        let addr = jit.consts.f32s_filled(groups * len, |out| {
            let mut to = vec![];
            for gi in 0..groups {
                let mg = &m[gi * rows * ld..][..rows * ld];
                for t in 0..self.n.div_ceil(nr) {
                    let width = self.width(t);
                    let base = gi * len + self.tile_off(t);
                    let valid = (self.n - t * nr).min(nr);
                    if transposed {
                        to.clear();
                        to.extend((0..self.kmax).map(|k| base + k * width));
                        microkernel::transpose_columns(&mg[t * nr * ld..], ld, valid, 0, out, &to);
                    } else {
                        for k in 0..self.kmax {
                            out[base + k * width..][..valid].copy_from_slice(&mg[k * ld + t * nr..][..valid]);
                        }
                    }
                }
            }
        });
        (addr, len)
    }
}

/// The kernel's scratch layout, as the plan made it.
fn scratch_of(cx: &NodeCx<'_>, op: &TrainOp) -> Result<GradScratch> {
    GradScratch::of(op, &cx.in_tys, &cx.node.ty)
        .ok_or_else(|| Error::Unsupported(format!("`{}`: no GEMM form for this op", cx.node.name)))
}

/// This part's copy of a fixed scratch region of `total` floats (the plan makes one per
/// thread; see `plan::plan`).
fn part_scratch(fx: &mut Fx<'_>, scr: Value, total: usize) -> Value {
    let off = fx.b.ins().imul_imm_s(fx.part, c(4 * total));
    fx.add(scr, off)
}

/// The running sample block: `min(block, nb − n0)` samples, and whether it is the first.
fn block_count(fx: &mut Fx<'_>, n0: Value, block: usize) -> (Value, Value) {
    let left = fx.b.ins().isub(fx.nb, n0);
    let b = fx.i(c(block));
    let lt = fx.b.ins().icmp(IntCC::SignedLessThan, left, b);
    let cnt = fx.select(lt, left, b);
    let first = fx.b.ins().icmp_imm_s(IntCC::Equal, n0, 0);
    let first = fx.b.ins().uextend(types::I64, first);
    (cnt, first)
}

/// Blocks of `block` samples: `⌈nb / block⌉`.
fn blocks(fx: &mut Fx<'_>, block: usize) -> Value {
    let n = fx.addi(fx.nb, c(block - 1));
    fx.b.ins().udiv_imm_u(n, c(block))
}

/// The offset in a `[C, H, W]` plane stack of tap `j` = (channel, ky, kx) of a conv, for
/// output pixel 0.
fn tap_offset(fx: &mut Fx<'_>, conv: &Conv2d, j: Value, plane: (usize, usize)) -> Value {
    let (kh, kw) = conv.kernel;
    let (dh, dw) = conv.dilation;
    let ch = fx.b.ins().udiv_imm_u(j, c(kh * kw));
    let r = fx.b.ins().urem_imm_u(j, c(kh * kw));
    let ky = fx.b.ins().udiv_imm_u(r, c(kw));
    let kx = fx.b.ins().urem_imm_u(r, c(kw));
    fx.lin(&[(ch, c(plane.0 * plane.1)), (ky, c(dh * plane.1)), (kx, c(dw))], 0)
}

/// `(x, dy) → ∂/∂weight` of a Conv2d.
pub(in crate::jit) fn conv_weight_grad(
    jit: &mut Jit,
    cx: &NodeCx<'_>,
    op: &TrainOp,
    conv: &Conv2d,
    isa: Isa,
) -> Result<()> {
    let (cin, h, w) = cx.in_chw(0)?;
    let (o, oh, ow) = cx.in_chw(1)?;
    let sc = scratch_of(cx, op)?;
    let geo = Geo::new(conv, (cin, h, w), (o, oh, ow));
    let Geo { ph, pw, g, cin_g, cout_g, p, kc, .. } = geo;
    let (sh, sw) = conv.stride;
    let block = sc.block;
    debug_assert_eq!(block, conv_grad_block(p, cout_g, kc));
    let kmax = block * p;
    let gemm = Gemm::new(jit, isa, cout_g, kc, kmax, kmax, kc);
    let nr = gemm.nr;
    // Per column (tap), its byte offset from the pixel's first tap in the padded input.
    let taps = jit.consts.i64s(tap_bytes(conv, kc, (ph, pw)));
    let tabs = geo.pad_tables(jit, conv, (h, w))?;
    let zeros = geo.zero_padding(conv);
    let (xs, ds, os, ss) = (cx.inputs[0], cx.inputs[1], cx.output, cx.scratch_slot()?);
    // The output gradient may come blocked (from a blocked max-pool or activation backward),
    // and so may the input (a convolution's or a pool's blocked result, the plan allows it
    // with zero padding or none): it is then unblocked into the padded block region.
    let dy_blocked = cx.in_layouts[1].is_blocked();
    let dy_len = cx.in_lens[1];
    let x_blocked = cx.in_layouts[0].is_blocked();
    let x_len = cx.in_lens[0];
    if x_blocked && geo.zero_padding(conv).is_none() && conv.pads() != (0, 0, 0, 0) {
        return Err(Error::Unsupported(format!("`{}`: a blocked input with non-zero padding", cx.node.name)));
    }
    let work = 2 * (o * p * kc) as u64;
    // Few taps (`plan::WGRAD_KSPLIT_MAX_KC`: one or two column tiles, as a stem's 7×7 of
    // one channel): threads share it by ranges of sample blocks instead, each part summing
    // its range into the gradient (part 0) or a partial of its own in its scratch, which a
    // second kernel adds in. Otherwise by column tiles (taps), each part with its own
    // scratch: the padded block and the packed output gradient are copied by every part (a
    // small fraction of the GEMM's work), each im2col tile by the part that owns it.
    let ksplit = kc <= crate::jit::plan::WGRAD_KSPLIT_MAX_KC;
    // Output rows per chunk of a large map's product (0: the whole block at once).
    let chunk_rows = if block == 1 && p > WGRAD_CHUNK_MIN_PIXELS { (WGRAD_CHUNK_PIXELS / ow).max(1) } else { 0 };
    let (head, partial) = (sc.col, sc.col + 16);
    let nout = o * kc;
    jit.parallel_kernel(&cx.node.name, work, |fx| {
        let (x, dy, dw, scr) = (fx.slot(xs), fx.slot(ds), fx.slot(os), fx.slot(ss));
        let scr = part_scratch(fx, scr, sc.total);
        let pad = fx.addi(scr, c(4 * sc.pad));
        let apk = fx.addi(scr, c(4 * sc.a));
        let bpk = fx.addi(scr, c(4 * sc.b));
        let nblk = blocks(fx, block);
        let (lo, nfull, rem, b0, count, dst) = if ksplit {
            let lo = fx.i(0);
            let nfull = fx.i(c(gemm.full_tiles()));
            let rem = fx.i(i64::from(!kc.is_multiple_of(nr)));
            let (b0, b1) = part_range(fx, nblk);
            let count = fx.b.ins().isub(b1, b0);
            // Part 0 sums into the gradient, the others into their partials; each records
            // the parts of this call (the adding kernel reads part 0's record).
            let own = fx.addi(scr, c(4 * partial));
            let is0 = fx.b.ins().icmp_imm_s(IntCC::Equal, fx.part, 0);
            let dst = fx.select(is0, dw, own);
            let hd = fx.addi(scr, c(4 * head));
            let parts = fx.parts;
            fx.store_i64(parts, hd, 0);
            // A part with no blocks zeroes what it would have written.
            let empty = fx.b.ins().icmp_imm_s(IntCC::Equal, count, 0);
            let n = fx.i(c(nout / 4));
            let zero = fx.i(0);
            let nz = fx.select(empty, n, zero);
            let zv = fx.vf(0.0);
            fx.loop_n(Count::Dyn(nz), [dst, zv], [c(16), 0], |fx, [d, zv]| fx.store_v(zv, d, 0));
            for i in nout / 4 * 4..nout {
                let zf = fx.f(0.0);
                let cur = fx.load_f(dst, c(i));
                let v = fx.select(empty, zf, cur);
                fx.store_f(v, dst, c(i));
            }
            (lo, nfull, rem, b0, count, dst)
        } else {
            let (lo, nfull, rem) = gemm.part_tiles(fx);
            let b0 = fx.i(0);
            (lo, nfull, rem, b0, nblk, dw)
        };
        let n0 = fx.b.ins().imul_imm_s(b0, c(block));
        let xb = fx.b.ins().imul_imm_s(n0, c(4 * x_len));
        let xb = fx.add(x, xb);
        let dyb = fx.b.ins().imul_imm_s(n0, c(4 * dy_len));
        let dyb = fx.add(dy, dyb);
        let start = n0;
        let steps = [c(block), c(4 * block * x_len), c(4 * block * dy_len), 0, 0, 0, 0, 0, 0, 0, 0];
        let vals = [n0, xb, dyb, pad, apk, bpk, dst, lo, nfull, rem, start];
        fx.loop_n(Count::Dyn(count), vals, steps, |fx, [n0, xb, dyb, pad, apk, bpk, dw, lo, nfull, rem, start]| {
            let (cnt, _) = block_count(fx, n0, block);
            // The first block of this call's range overwrites, the others add.
            let first = fx.b.ins().icmp(IntCC::Equal, n0, start);
            let first = fx.b.ins().uextend(types::I64, first);
            // The block's padded input.
            let src = match tabs {
                _ if x_blocked => {
                    unblock_samples(fx, xb, pad, cnt, (cin, h, w), (ph, pw), zeros.unwrap_or((0, 0)));
                    pad
                }
                Some((sy, sx)) => {
                    pad_samples(fx, xb, pad, cnt, (cin, h, w), (ph, pw), (sy, sx), zeros);
                    pad
                }
                None => xb,
            };
            // A: a row per output channel, the block's pixels sample after sample (from a
            // blocked gradient, 4×4 transposes of four pixels' four channels).
            fx.loop_n(Count::Dyn(cnt), [dyb, apk], [c(4 * dy_len), c(4 * p)], |fx, [s, d]| {
                if dy_blocked {
                    super::common::unblock_rows(fx, s, d, o, (p, p * crate::jit::plan::BLOCK), kmax);
                } else {
                    fx.loop_n(Count::Const(o), [s, d], [c(4 * p), c(4 * kmax)], |fx, [s, d]| copy_run(fx, s, d, p));
                }
            });
            let kn = fx.b.ins().imul_imm_s(cnt, c(p));
            let steps = [c(4 * cin_g * ph * pw), c(4 * cout_g * kmax), c(4 * cout_g * kc), 0, 0, 0, 0, 0, 0, 0];
            fx.loop_n(
                Count::Const(g),
                [src, apk, dw, bpk, cnt, kn, first, lo, nfull, rem],
                steps,
                |fx, [xg, ag, dwg, bpk, cnt, kn, first, lo, nfull, rem]| {
                    // B: the im2col of the group's channels (column j = tap (channel, ky, kx)),
                    // written pixel by pixel: each pixel's row of a tile is one contiguous run,
                    // its values gathered through the tile's byte-offset table. Only this
                    // part's tiles.
                    let tile =
                        |fx: &mut Fx<'_>, tab: Value, bt: Value, xg: Value, cnt: Value, valid: usize, width: usize| {
                            let geo = Taps { sample: cin * ph * pw, pw, out: (oh, ow), stride: (sh, sw), pixel: width };
                            gather_taps(fx, &geo, xg, bt, Count::Dyn(cnt), tab, valid);
                        };
                    // Tile by tile, each gathered into the one tile region of `B` and
                    // reduced right away, while it is still in cache.
                    // One tile's gather and product; on a large map (one sample per block)
                    // in chunks of output rows, so each chunk of `B` is reduced while it is
                    // in L2 (a 224×224 stem's tile is 3.2 MB whole).
                    let reduce = |fx: &mut Fx<'_>,
                                  [tab, t, xg, cnt, ag, dwg, kn, first, bpk]: [Value; 9],
                                  valid,
                                  width| {
                        if chunk_rows == 0 {
                            tile(fx, tab, bpk, xg, cnt, valid, width);
                            gemm.emit_tile(fx, ag, bpk, dwg, kn, first, t, valid);
                            return;
                        }
                        let one = |fx: &mut Fx<'_>, rows: usize, [xc, ac, fc, tab, bpk, dwg, t]: [Value; 7]| {
                            let geo =
                                Taps { sample: cin * ph * pw, pw, out: (rows, ow), stride: (sh, sw), pixel: width };
                            gather_taps(fx, &geo, xc, bpk, Count::Const(1), tab, valid);
                            let kn = fx.i(c(rows * ow));
                            gemm.emit_tile(fx, ac, bpk, dwg, kn, fc, t, valid);
                        };
                        let r = chunk_rows;
                        let (chunks, last) = (oh / r, oh % r);
                        let zero = fx.i(0);
                        let steps = [c(4 * r * sh * pw), c(4 * r * ow), 1, 0, 0, 0, 0, 0];
                        let vals = [xg, ag, zero, first, tab, bpk, dwg, t];
                        fx.loop_n(Count::Const(chunks), vals, steps, |fx, [xc, ac, ci, first, tab, bpk, dwg, t]| {
                            // Only the map's first chunk of a call's first block overwrites.
                            let is0 = fx.b.ins().icmp_imm_s(IntCC::Equal, ci, 0);
                            let is0 = fx.b.ins().uextend(types::I64, is0);
                            let fc = fx.b.ins().band(first, is0);
                            one(fx, r, [xc, ac, fc, tab, bpk, dwg, t]);
                        });
                        if last > 0 {
                            let xc = fx.addi(xg, c(4 * chunks * r * sh * pw));
                            let ac = fx.addi(ag, c(4 * chunks * r * ow));
                            let fc = if chunks == 0 { first } else { fx.i(0) };
                            one(fx, last, [xc, ac, fc, tab, bpk, dwg, t]);
                        }
                    };
                    let full = gemm.full_tiles();
                    let tab0 = fx.addr(taps);
                    let t0 = fx.b.ins().imul_imm_s(lo, c(8 * nr));
                    let tab = fx.add(tab0, t0);
                    let vals = [tab, lo, xg, cnt, ag, dwg, kn, first, bpk];
                    let steps = [c(8 * nr), 1, 0, 0, 0, 0, 0, 0, 0];
                    fx.loop_n(Count::Dyn(nfull), vals, steps, |fx, v| reduce(fx, v, nr, nr));
                    if !kc.is_multiple_of(nr) {
                        let tab = fx.addi(tab0, c(8 * full * nr));
                        let t = fx.i(c(full));
                        let vals = [tab, t, xg, cnt, ag, dwg, kn, first, bpk];
                        fx.loop_n(Count::Dyn(rem), vals, [0; 9], |fx, v| reduce(fx, v, kc % nr, gemm.width(full)));
                    }
                },
            );
        });
    })?;
    if ksplit {
        // The partials of parts 1.. (as many as part 0 recorded) added into the gradient.
        jit.kernel(&cx.node.name, |fx| {
            let (dw, scr) = (fx.slot(os), fx.slot(ss));
            let hd = fx.addi(scr, c(4 * head));
            let parts = fx.load_i64(hd, 0);
            let more = fx.b.ins().iadd_imm_s(parts, -1);
            let src = fx.addi(scr, c(4 * (sc.total + partial)));
            fx.loop_n(Count::Dyn(more), [src, dw], [c(4 * sc.total), 0], |fx, [s, d]| fx.add_run(s, d, nout));
        })?;
    }
    Ok(())
}

/// `(x, dy) → ∂/∂weight` of a stride-1 Conv2d in the shifted-row form, where
/// [`wgrad_rows`] says it applies (else `Ok(false)`, nothing emitted):
/// `dWᵀ[(c, ky, kx)][oc] = Σ_n Σ_{y, x′} xp[n][c][y + ky][x′ + kx] · dy′[n][oc][y][x′]`, `xp`
/// the padded input, `x′` running over the padded width, `dy′` the output gradient with
/// zeros past the output's width. For one `(c, ky)` the `kw` rows of taps are the padded
/// input from row `ky` of channel `c` on, each shifted by one float, so the tile reads them
/// where they are (`lda` = 1; the columns past the output's width read into the next row
/// and meet zeros) — no im2col. `B` is a sample's `dy′`, a row of output channels per
/// pixel. One tile stacks the rows of taps of several consecutive channels (as many as
/// divide the channels and fit [`Isa::gemm_mr_for`] rows: two for 5×5 kernels on ≤ 32 output
/// channels) — more FMAs per broadcast and per loop step; the CIFAR-10 net's second conv's
/// weight gradient ran ~10% faster with two than with one. The transposed gradient, rows in
/// the order `(ky, c, kx)`, stays in scratch (in L2) across the samples; threads share its
/// `(ky, channel group)` row blocks, each transposing its rows into `dW` at the end.
pub(in crate::jit) fn conv_weight_grad_rows(
    jit: &mut Jit,
    cx: &NodeCx<'_>,
    op: &TrainOp,
    conv: &Conv2d,
    isa: Isa,
) -> Result<bool> {
    let (cin, h, w) = cx.in_chw(0)?;
    let (o, oh, ow) = cx.in_chw(1)?;
    let Some(lay) = wgrad_rows(conv, (cin, h, w), (o, oh, ow)) else { return Ok(false) };
    // With few taps threads share the GEMM form by samples instead: here each would pack
    // every sample's `B` for a handful of row blocks (the CIFAR-10 net's first conv, 3·5
    // of them, ran ~10% slower so at two threads).
    if jit.threads > 1 && cin * conv.kernel.0 * conv.kernel.1 <= crate::jit::plan::WGRAD_KSPLIT_MAX_KC {
        return Ok(false);
    }
    let zeros_or_none = conv.padding_mode == cnnc_compiler::ops::PaddingMode::Zeros || conv.pads() == (0, 0, 0, 0);
    let (x_blocked, dy_blocked) = (cx.in_layouts[0].is_blocked(), cx.in_layouts[1].is_blocked());
    if x_blocked && !zeros_or_none {
        return Ok(false);
    }
    let sc = scratch_of(cx, op)?;
    if sc.total < lay.total {
        return Err(Error::Unsupported(format!("`{}`: the plan's scratch is too small", cx.node.name)));
    }
    let geo = Geo::new(conv, (cin, h, w), (o, oh, ow));
    let Geo { ph, pw, kc, .. } = geo;
    let (kh, kw) = conv.kernel;
    let kn = oh * pw;
    let plane = ph * pw;
    // A tile stacks the rows of taps of `gch` consecutive channels (the same kernel row):
    // as many as divide the channels and fit the tile's rows (the CIFAR-10 net's 5×5
    // convs: two, ten rows × two vectors instead of five × two).
    let most = isa.gemm_mr_for(o.min(isa.gemm_nr())) / kw;
    let gch = (1..=most.max(1)).rev().find(|g| cin.is_multiple_of(*g)).unwrap_or(1);
    let cgroups = cin / gch;
    let gemm = Gemm::grouped(jit, isa, (gch * kw, o, kn), (1, o), (kw, plane), gch * kw);
    let tabs = geo.pad_tables(jit, conv, (h, w))?;
    let zeros = geo.zero_padding(conv);
    let (xs, ds, os, ss) = (cx.inputs[0], cx.inputs[1], cx.output, cx.scratch_slot()?);
    let (x_len, dy_len) = (cx.in_lens[0], cx.in_lens[1]);
    let work = 2 * (o * kc * oh * ow) as u64;
    jit.parallel_kernel(&cx.node.name, work, |fx| {
        let (x, dy, dw, scr) = (fx.slot(xs), fx.slot(ds), fx.slot(os), fx.slot(ss));
        let scr = part_scratch(fx, scr, sc.total);
        let pad = fx.addi(scr, c(4 * lay.pad));
        let bpk = fx.addi(scr, c(4 * lay.b));
        let cbuf = fx.addi(scr, c(4 * lay.c));
        // What the last row's shifted taps read past the padded sample: zeros.
        let zf = fx.f(0.0);
        for i in 0..kw {
            fx.store_f(zf, pad, c(cin * plane + i));
        }
        let units = fx.i(c(cgroups * kh));
        let (lo, hi) = part_range(fx, units);
        let count = fx.b.ins().isub(hi, lo);
        let zero = fx.i(0);
        let vals = [x, dy, zero, pad, bpk, cbuf, lo, count];
        let steps = [c(4 * x_len), c(4 * dy_len), 1, 0, 0, 0, 0, 0];
        fx.loop_n(Count::Dyn(fx.nb), vals, steps, |fx, [xn, dyn_, n, pad, bpk, cbuf, lo, count]| {
            let one = fx.i(1);
            if x_blocked {
                unblock_samples(fx, xn, pad, one, (cin, h, w), (ph, pw), zeros.unwrap_or((0, 0)));
            } else if let Some((sy, sx)) = tabs {
                pad_samples(fx, xn, pad, one, (cin, h, w), (ph, pw), (sy, sx), zeros);
            } else {
                copy_run(fx, xn, pad, cin * h * w);
            }
            zero_padded_columns(fx, &gemm, bpk, (oh, ow, pw));
            pack_dy_rows(fx, &gemm, dyn_, bpk, (oh, ow, pw), dy_blocked);
            // The first sample overwrites the sums, the others add.
            let first = fx.b.ins().icmp_imm_s(IntCC::Equal, n, 0);
            let first = fx.b.ins().uextend(types::I64, first);
            let vals = [lo, pad, bpk, cbuf, first];
            fx.loop_n(Count::Dyn(count), vals, [1, 0, 0, 0, 0], |fx, [u, pad, bpk, cbuf, first]| {
                // Row block `u` = (ky, channel group cg): rows `u·gch·kw ..` of `dWᵀ` in
                // the order (ky, c, kx), read from row `ky` of planes `cg·gch ..`.
                let ky = fx.b.ins().udiv_imm_u(u, c(cgroups));
                let cg = fx.b.ins().urem_imm_u(u, c(cgroups));
                let off = fx.b.ins().imul_imm_s(cg, c(4 * gch * plane));
                let a = fx.add(pad, off);
                let off = fx.b.ins().imul_imm_s(ky, c(4 * pw));
                let a = fx.add(a, off);
                let off = fx.b.ins().imul_imm_s(u, c(4 * gch * kw * o));
                let cp = fx.add(cbuf, off);
                let kv = fx.i(c(kn));
                gemm.emit(fx, a, bpk, cp, kv, first);
            });
        });
        // This part's rows of `dWᵀ` into `dW` (`[O, C·kh·kw]`): row `r` = (ky·C + c)·kw + kx
        // is column (c·kh + ky)·kw + kx.
        let r0 = fx.b.ins().imul_imm_s(lo, c(gch * kw));
        let rows = fx.b.ins().imul_imm_s(count, c(gch * kw));
        let src = fx.b.ins().imul_imm_s(r0, c(4 * o));
        let src = fx.add(cbuf, src);
        fx.loop_n(Count::Dyn(rows), [src, r0], [c(4 * o), 1], |fx, [s, r]| {
            let kx = fx.b.ins().urem_imm_u(r, c(kw));
            let t = fx.b.ins().udiv_imm_u(r, c(kw));
            let ky = fx.b.ins().udiv_imm_u(t, c(cin));
            let ch = fx.b.ins().urem_imm_u(t, c(cin));
            let col = fx.b.ins().imul_imm_s(ch, c(kh * kw));
            let row = fx.b.ins().imul_imm_s(ky, c(kw));
            let col = fx.add(col, row);
            let col = fx.add(col, kx);
            let d = fx.b.ins().imul_imm_s(col, 4);
            let d = fx.add(dw, d);
            fx.loop_n(Count::Const(o), [s, d], [4, c(4 * kc)], |fx, [s, d]| {
                let v = fx.load_f(s, 0);
                fx.store_f(v, d, 0);
            });
        });
    })?;
    Ok(true)
}

/// One sample's output gradient `dy` (`[O, oh, ow]`, or blocked) as the `B` of
/// [`conv_weight_grad_rows`]: per pixel of the padded width `pw` a row of the output
/// channels (`[tile][oh·pw][width]`); the columns past the output's width are not written
/// ([`zero_padded_columns`] zeroes them). From a plain `dy` each output row through
/// [`block_rows`] (4×4 transposes); from a blocked one, a pixel's 16 channels as four
/// vector copies (the padding lanes of the last block are copied into columns the tile
/// computes but does not store).
fn pack_dy_rows(
    fx: &mut Fx<'_>,
    gemm: &Gemm,
    dy: Value,
    bpk: Value,
    (oh, ow, pw): (usize, usize, usize),
    blocked: bool,
) {
    const B: usize = crate::jit::plan::BLOCK;
    let (o, nr) = (gemm.n, gemm.nr);
    let plane = oh * ow;
    for t in 0..o.div_ceil(nr) {
        let width = gemm.width(t);
        let valid = (o - t * nr).min(nr);
        let bt = fx.addi(bpk, c(4 * gemm.tile_off(t)));
        if blocked {
            for blk in 0..valid.div_ceil(B) {
                let src = fx.addi(dy, c(4 * ((t * nr / B + blk) * plane * B)));
                let dst = fx.addi(bt, c(4 * blk * B));
                fx.loop_n(Count::Const(oh), [src, dst], [c(4 * ow * B), c(4 * pw * width)], |fx, [s, d]| {
                    fx.loop_n(Count::Const(ow), [s, d], [c(4 * B), c(4 * width)], |fx, [s, d]| {
                        for k in 0..B / 4 {
                            let v = fx.load_v(s, c(4 * k));
                            fx.store_v(v, d, c(4 * k));
                        }
                    });
                });
            }
        } else {
            let src = fx.addi(dy, c(4 * t * nr * plane));
            fx.loop_n(Count::Const(oh), [src, bt], [c(4 * ow), c(4 * pw * width)], |fx, [s, d]| {
                block_rows(fx, s, d, valid, (ow, B, width), plane, false);
            });
        }
    }
}

/// Zeroes the columns of [`pack_dy_rows`]'s `B` past the output's width (the padded
/// pixels `ow .. pw` of every row), which no sample's packing writes. Done before every
/// sample's packing, not once per call: the CIFAR-10 net's second weight gradient ran ~5%
/// slower with the zeros written once (five alternating pairs).
fn zero_padded_columns(fx: &mut Fx<'_>, gemm: &Gemm, bpk: Value, (oh, ow, pw): (usize, usize, usize)) {
    for t in 0..gemm.n.div_ceil(gemm.nr) {
        let width = gemm.width(t);
        let bt = fx.addi(bpk, c(4 * gemm.tile_off(t)));
        let zv = fx.vf(0.0);
        fx.loop_n(Count::Const(oh), [bt, zv], [c(4 * pw * width), 0], |fx, [r, zv]| {
            for x in ow..pw {
                for v in 0..width / 4 {
                    fx.store_v(zv, r, c(x * width + 4 * v));
                }
            }
        });
    }
}

/// Output pixels of a sample from which a GEMM weight gradient reduces in chunks of output
/// rows, and about how many pixels a chunk has (`B` of one 64-tap tile: 256 KB).
const WGRAD_CHUNK_MIN_PIXELS: usize = 4096;
const WGRAD_CHUNK_PIXELS: usize = 1024;

/// The geometry of an im2col gather: floats per (padded) input sample, the padded row
/// length, the output size, the stride, and the floats between two pixels' rows of the
/// destination.
struct Taps {
    sample: usize,
    pw: usize,
    out: (usize, usize),
    stride: (usize, usize),
    pixel: usize,
}

/// For `cnt` samples from `x` and each of their output pixels, `valid` taps gathered through
/// the byte-offset table `tab` into one contiguous run of the destination (a pixel's run
/// `geo.pixel` floats after the previous one's, a sample's `out.0·out.1` pixels after the
/// previous sample's).
///
/// With stride 1 or 2 the row's pixels go four at a time: a tap's values for four
/// neighbouring pixels are one vector load (two and a shuffle for stride 2), and four taps'
/// vectors are transposed into the four pixels' rows (a quarter of the stores of one value
/// at a time).
fn gather_taps(fx: &mut Fx<'_>, geo: &Taps, x: Value, dst: Value, cnt: Count, tab: Value, valid: usize) {
    let ((oh, ow), (sh, sw), pw, width) = (geo.out, geo.stride, geo.pw, geo.pixel);
    let quads = if (sw == 1 || sw == 2) && valid >= 4 { ow / 4 } else { 0 };
    let steps = [c(4 * geo.sample), c(4 * oh * ow * width), 0];
    fx.loop_n(cnt, [x, dst, tab], steps, |fx, [xs, ds, tab]| {
        let steps = [c(4 * sh * pw), c(4 * ow * width), 0];
        fx.loop_n(Count::Const(oh), [xs, ds, tab], steps, |fx, [xr, dr, tab]| {
            let steps = [c(16 * sw), c(16 * width), 0];
            fx.loop_n(Count::Const(quads), [xr, dr, tab], steps, |fx, [xq, dq, tab]| {
                for j0 in (0..valid - valid % 4).step_by(4) {
                    let mut v = [xq; 4];
                    for (k, v) in v.iter_mut().enumerate() {
                        let o = fx.load_i64(tab, c(j0 + k));
                        let a = fx.add(xq, o);
                        *v = if sw == 1 {
                            fx.load_v(a, 0)
                        } else {
                            // Stride 2: floats 0, 2 of one load and 1, 3 of one three floats
                            // on (no read past the fourth pixel's value).
                            let lo = fx.load_v(a, 0);
                            let hi = fx.load_v(a, 3);
                            fx.lanes_of(lo, hi, [0, 2, 5, 7])
                        };
                    }
                    // v[k] = tap j0 + k at pixels 0..4; rows[p] = pixel p at taps j0..j0 + 4.
                    let rows = fx.transpose4(v);
                    for (p, r) in rows.into_iter().enumerate() {
                        fx.store_v(r, dq, c(p * width + j0));
                    }
                }
                for jj in valid - valid % 4..valid {
                    let o = fx.load_i64(tab, c(jj));
                    let a = fx.add(xq, o);
                    for p in 0..4 {
                        let v = fx.load_f(a, c(p * sw));
                        fx.store_f(v, dq, c(p * width + jj));
                    }
                }
            });
            // The pixels left, one at a time.
            let xr = fx.addi(xr, c(4 * sw * 4 * quads));
            let dr = fx.addi(dr, c(4 * width * 4 * quads));
            let steps = [c(4 * sw), c(4 * width), 0];
            fx.loop_n(Count::Const(ow - 4 * quads), [xr, dr, tab], steps, |fx, [xq, dq, tab]| {
                for jj in 0..valid {
                    let o = fx.load_i64(tab, c(jj));
                    let a = fx.add(xq, o);
                    let v = fx.load_f(a, 0);
                    fx.store_f(v, dq, c(jj));
                }
            });
        });
    });
}

/// Per tap `j` = (channel, ky, kx) of a conv, its byte offset from a pixel's first tap in
/// the (padded) input of `plane` = `(ph, pw)`.
fn tap_bytes(conv: &Conv2d, kc: usize, (ph, pw): (usize, usize)) -> Vec<i64> {
    let (kh, kw) = conv.kernel;
    let (dh, dw) = conv.dilation;
    (0..kc).map(|j| c(4 * ((j / (kh * kw)) * ph * pw + (j % (kh * kw) / kw) * dh * pw + (j % kw) * dw))).collect()
}

/// The forward Conv2d of a training graph (plain NCHW; a fused residual and activation,
/// no scale/shift) as a GEMM per
/// block of samples ([`crate::jit::plan::row_block`]) and group: `yᵀ[(s, q)][oc] = Σ_j
/// col[(s, q)][j] · W[oc][j]` — `A` the block's im2col, a row of taps per output pixel
/// (gathered as for the weight gradient), `B` the weights packed once and read once per
/// block — then transposed into each sample's `y` with the bias, residual and activation applied.
pub(in crate::jit) fn conv_forward(jit: &mut Jit, cx: &NodeCx<'_>, conv: &Conv2d, isa: Isa) -> Result<()> {
    if conv.epilogue.scale_shift {
        return Err(Error::Unsupported(format!("`{}`: a scale/shift epilogue in a training graph", cx.node.name)));
    }
    let (act, residual) = (conv.epilogue.act, conv.epilogue.residual);
    let (cin, h, w) = cx.in_chw(0)?;
    let (o, oh, ow) = cx.out_chw()?;
    let sc = GradScratch::conv_forward(conv, (cin, h, w), (o, oh, ow));
    let geo = Geo::new(conv, (cin, h, w), (o, oh, ow));
    let Geo { ph, pw, g, cin_g, cout_g, p, kc, .. } = geo;
    let block = sc.block;
    let gemm = Gemm::new(jit, isa, block * p, cout_g, kc, kc, cout_g);
    let nr = gemm.nr;
    // B: per group, Wᵀ — W[oc][j] at step j, column oc.
    let weight = cx.param_ref("weight")?;
    let (wp, packed_len) = gemm.pack_b(jit, g, &weight, (cout_g, kc), true);
    let bias = if conv.bias { cx.param("bias")? } else { vec![0.0; o] };
    let bias = jit.consts.f32s(bias);
    let taps = jit.consts.i64s(tap_bytes(conv, kc, (ph, pw)));
    let tabs = geo.pad_tables(jit, conv, (h, w))?;
    let zeros = geo.zero_padding(conv);
    let (xs, ys, ss) = (cx.inputs[0], cx.output, cx.scratch_slot()?);
    // A fused residual has the result's shape and layout; without one, the result is read
    // in its place (and nothing added).
    let rs =
        if residual { *cx.inputs.get(1).ok_or_else(|| Error::Unsupported("residual operand".into()))? } else { ys };
    let (sh, sw) = conv.stride;
    jit.kernel(&cx.node.name, |fx| {
        let (x, y, scr, res) = (fx.slot(xs), fx.slot(ys), fx.slot(ss), fx.slot(rs));
        // Sample-wise: this thread's copy of the scratch (see `lower::samplewise_work`).
        let scr = part_scratch(fx, scr, sc.total);
        let pad = fx.addi(scr, c(4 * sc.pad));
        let col = fx.addi(scr, c(4 * sc.a));
        let out = fx.addi(scr, c(4 * sc.col));
        let nblk = blocks(fx, block);
        let zero = fx.i(0);
        let steps = [c(block), c(4 * block * cin * h * w), c(4 * block * o * p), 0, 0, 0, c(4 * block * o * p)];
        let vals = [zero, x, y, pad, col, out, res];
        fx.loop_n(Count::Dyn(nblk), vals, steps, |fx, [n0, xb, yb, pad, col, out, rb]| {
            let (cnt, _) = block_count(fx, n0, block);
            let (src, sample) = match tabs {
                Some((sy, sx)) => {
                    pad_samples(fx, xb, pad, cnt, (cin, h, w), (ph, pw), (sy, sx), zeros);
                    (pad, cin * ph * pw)
                }
                None => (xb, cin * h * w),
            };
            let m = fx.b.ins().imul_imm_s(cnt, c(p));
            let (wpa, ba) = (fx.addr(wp), fx.addr(bias));
            let steps = [
                c(4 * cin_g * ph * pw),
                c(4 * packed_len),
                c(4 * cout_g * p),
                c(4 * cout_g),
                0,
                0,
                0,
                0,
                c(4 * cout_g * p),
            ];
            let vals = [src, wpa, yb, ba, col, out, cnt, m, rb];
            fx.loop_n(Count::Const(g), vals, steps, |fx, [xg, wg, yg, bg, col, out, cnt, m, rg]| {
                // A: the block's im2col for the group, a row of kc taps per pixel (sample
                // after sample), by runs of nr taps.
                let geo = Taps { sample, pw, out: (oh, ow), stride: (sh, sw), pixel: kc };
                let tab0 = fx.addr(taps);
                let chunks = kc / nr;
                let steps = [c(8 * nr), c(4 * nr), 0, 0];
                fx.loop_n(Count::Const(chunks), [tab0, col, xg, cnt], steps, |fx, [tab, d, xg, cnt]| {
                    gather_taps(fx, &geo, xg, d, Count::Dyn(cnt), tab, nr);
                });
                if !kc.is_multiple_of(nr) {
                    let tab = fx.addi(tab0, c(8 * chunks * nr));
                    let d = fx.addi(col, c(4 * chunks * nr));
                    gather_taps(fx, &geo, xg, d, Count::Dyn(cnt), tab, kc % nr);
                }
                let kn = fx.i(c(kc));
                let first = fx.i(1);
                gemm.emit_rows(fx, col, wg, out, kn, first, m);
                // y[s][oc][q] = out[(s, q)][oc] + bias[oc] (then the fused residual and
                // activation, in the epilogue's order), four pixels at a time: the four
                // rows of `out` read (in cache) across the channels, each channel's four
                // values stored as one vector — not a pass over all of `out` per channel.
                let finish = |fx: &mut Fx<'_>, v: Value, rc: Value| {
                    let v = if residual {
                        let r = fx.load_v(rc, 0);
                        fx.b.ins().fadd(v, r)
                    } else {
                        v
                    };
                    match act {
                        Some(a) => act_v(fx, a, v),
                        None => v,
                    }
                };
                let steps = [c(4 * o * p), c(4 * p * cout_g), 0, c(4 * o * p)];
                fx.loop_n(Count::Dyn(cnt), [yg, out, bg, rg], steps, |fx, [ys, os, bg, rs]| {
                    let quads = p / 4;
                    let steps = [16, c(16 * cout_g), 0, 16];
                    fx.loop_n(Count::Const(quads), [ys, os, bg, rs], steps, |fx, [yq, oq, bg, rq]| {
                        let steps = [c(4 * p), 4, 4, c(4 * p)];
                        fx.loop_n(Count::Const(cout_g), [yq, oq, bg, rq], steps, |fx, [yc, oc, bc, rc]| {
                            let b = fx.load_splat(bc, 0);
                            // Lane by lane (a stride-2 vector load would read past the
                            // last row).
                            let v = match cout_g {
                                1 => fx.load_v(oc, 0),
                                2 => {
                                    let mut v = fx.vf(0.0);
                                    for j in 0..4 {
                                        let x = fx.load_f(oc, c(2 * j));
                                        v = fx.b.ins().insertlane(v, x, j as u8);
                                    }
                                    v
                                }
                                _ => fx.load_strided(oc, 0, cout_g),
                            };
                            let v = fx.b.ins().fadd(v, b);
                            let v = finish(fx, v, rc);
                            fx.store_v(v, yc, 0);
                        });
                    });
                    let done = quads * 4;
                    if done < p {
                        let yq = fx.addi(ys, c(4 * done));
                        let oq = fx.addi(os, c(4 * done * cout_g));
                        let rq = fx.addi(rs, c(4 * done));
                        let steps = [c(4 * p), 4, 4, c(4 * p)];
                        fx.loop_n(Count::Const(cout_g), [yq, oq, bg, rq], steps, |fx, [yc, oc, bc, rc]| {
                            let b = fx.load_f(bc, 0);
                            for q in 0..p - done {
                                let v = fx.load_f(oc, c(q * cout_g));
                                let v = fx.b.ins().fadd(v, b);
                                // The epilogue lane by lane: the value in lane 0.
                                let v = if residual {
                                    let r = fx.load_f(rc, c(q));
                                    fx.b.ins().fadd(v, r)
                                } else {
                                    v
                                };
                                let v = fx.b.ins().scalar_to_vector(types::F32X4, v);
                                let v = match act {
                                    Some(a) => act_v(fx, a, v),
                                    None => v,
                                };
                                let v = fx.b.ins().extractlane(v, 0);
                                fx.store_f(v, yc, c(q));
                            }
                        });
                    }
                });
            });
        });
    })?;
    Ok(())
}

/// Copies `cnt` samples `[C, H, W]` from `x` into `dst` padded to `[C, ph, pw]`, as `F.pad`
/// does (`tabs`: per padded row and column, the source index or −1 for a zero). Zero
/// padding (`zeros`: the top and left padding) copies each row's interior by vectors
/// and zeroes the border instead of going through the tables.
#[allow(clippy::too_many_arguments)]
fn pad_samples(
    fx: &mut Fx<'_>,
    x: Value,
    dst: Value,
    cnt: Value,
    (cin, h, w): (usize, usize, usize),
    (ph, pw): (usize, usize),
    (sy, sx): (i64, i64),
    zeros: Option<(usize, usize)>,
) {
    if let Some((pt, pl)) = zeros {
        let planes = fx.b.ins().imul_imm_s(cnt, c(cin));
        fx.loop_n(Count::Dyn(planes), [x, dst], [c(4 * h * w), c(4 * ph * pw)], |fx, [xc, dc]| {
            zero_floats(fx, dc, pt * pw);
            let db = fx.addi(dc, c(4 * (pt + h) * pw));
            zero_floats(fx, db, (ph - pt - h) * pw);
            let d0 = fx.addi(dc, c(4 * pt * pw));
            fx.loop_n(Count::Const(h), [xc, d0], [c(4 * w), c(4 * pw)], |fx, [s, d]| {
                zero_floats(fx, d, pl);
                let dm = fx.addi(d, c(4 * pl));
                copy_run(fx, s, dm, w);
                let dr = fx.addi(d, c(4 * (pl + w)));
                zero_floats(fx, dr, pw - pl - w);
            });
        });
        return;
    }
    let steps = [c(4 * cin * h * w), c(4 * cin * ph * pw)];
    fx.loop_n(Count::Dyn(cnt), [x, dst], steps, |fx, [xs, ds]| {
        fx.loop_n(Count::Const(cin), [xs, ds], [c(4 * h * w), c(4 * ph * pw)], |fx, [xc, dc]| {
            let zero = fx.i(0);
            fx.loop_n(Count::Const(ph), [zero, xc, dc], [1, 0, c(4 * pw)], |fx, [py, xc, dr]| {
                let tab = fx.addr(sy);
                let iy = fx.load_i32_at(tab, py);
                let vy = fx.b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, iy, 0);
                let row = fx.b.ins().imul_imm_s(iy, c(4 * w));
                let row = fx.add(xc, row);
                let row = fx.select(vy, row, xc);
                let vy = fx.b.ins().uextend(types::I64, vy);
                let zero = fx.i(0);
                fx.loop_n(Count::Const(pw), [zero, dr, row, vy], [1, 4, 0, 0], |fx, [px, d, row, vy]| {
                    let tab = fx.addr(sx);
                    let ix = fx.load_i32_at(tab, px);
                    let vx = fx.b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, ix, 0);
                    let vx = fx.b.ins().uextend(types::I64, vx);
                    let ok = fx.b.ins().band(vx, vy);
                    let off = fx.b.ins().imul_imm_s(ix, 4);
                    let a = fx.add(row, off);
                    let a = fx.select(ok, a, row);
                    let v = fx.load_f(a, 0);
                    let z = fx.f(0.0);
                    let v = fx.b.ins().select(ok, v, z);
                    fx.store_f(v, d, 0);
                });
            });
        });
    });
}

/// As [`pad_samples`] with zero padding (`(pt, pl)`, or none), from a blocked `x`: each
/// sample's plain padded copy zeroed, then its rows unblocked into place.
#[allow(clippy::too_many_arguments)]
fn unblock_samples(
    fx: &mut Fx<'_>,
    x: Value,
    dst: Value,
    cnt: Value,
    (cin, h, w): (usize, usize, usize),
    (ph, pw): (usize, usize),
    (pt, pl): (usize, usize),
) {
    const B: usize = crate::jit::plan::BLOCK;
    let x_len = cin.div_ceil(B) * B * h * w;
    fx.loop_n(Count::Dyn(cnt), [x, dst], [c(4 * x_len), c(4 * cin * ph * pw)], |fx, [xs, ds]| {
        if (ph, pw) != (h, w) {
            zero_floats(fx, ds, cin * ph * pw);
        }
        let d0 = fx.addi(ds, c(4 * (pt * pw + pl)));
        fx.loop_n(Count::Const(h), [xs, d0], [c(4 * w * B), c(4 * pw)], |fx, [s, d]| {
            super::common::unblock_rows(fx, s, d, cin, (w, h * w * B), ph * pw);
        });
    });
}

/// Per padded coordinate, the source index it reads (or −1 for a zero).
fn sources(conv: &Conv2d, pad: usize, input: usize, padded: usize) -> Result<Vec<i32>> {
    axis_table(padded, 1, 1, 1, pad, input, conv.padding_mode)
}

/// The inverse of [`sources`] as CSR: for source `i`, the padded coordinates
/// `list[start[i]..start[i + 1]]` (ascending) that read it.
fn preimages(src: &[i32], input: usize) -> (Vec<i64>, Vec<i64>) {
    let mut start = vec![0i64];
    let mut list = vec![];
    for i in 0..input {
        list.extend(src.iter().enumerate().filter(|(_, s)| **s == i as i32).map(|(p, _)| p as i64));
        start.push(list.len() as i64);
    }
    (start, list)
}

/// Stores zero in `len` floats from `dst`.
fn zero_floats(fx: &mut Fx<'_>, dst: Value, len: usize) {
    let z = fx.vf(0.0);
    fx.loop_n(Count::Const(len / 4), [dst], [16], |fx, [d]| fx.store_v(z, d, 0));
    let zf = fx.f(0.0);
    for i in len / 4 * 4..len {
        fx.store_f(zf, dst, c(i));
    }
}

/// `(dy) → dx` of a Conv2d on an input of `in_hw`; reads `weight`.
pub(in crate::jit) fn conv_input_grad(
    jit: &mut Jit,
    cx: &NodeCx<'_>,
    op: &TrainOp,
    conv: &Conv2d,
    in_hw: (usize, usize),
    isa: Isa,
) -> Result<()> {
    let (o, oh, ow) = cx.in_chw(0)?;
    let (cin, h, w) = cx.out_chw()?;
    if in_hw != (h, w) {
        return Err(Error::Unsupported(format!("`{}`: input size disagrees with the result", cx.node.name)));
    }
    let sc = scratch_of(cx, op)?;
    let geo = Geo::new(conv, (cin, h, w), (o, oh, ow));
    let Geo { padded, ph, pw, g, cin_g, cout_g, p, kc, .. } = geo;
    let (sh, sw) = conv.stride;
    if input_grad_transposed(p, g) {
        return conv_input_grad_t(jit, cx, conv, sc, (cin, h, w), (o, oh, ow), isa);
    }
    // Chunks of `rows` output rows: the GEMM's columns for one chunk stay in cache for the
    // col2im that follows (a whole map's columns are `kc·oh·ow` floats: 7 MB for a 3×3
    // conv of 64 channels at 56×56).
    let rows = input_grad_rows(oh, ow, kc);
    let (chunks, last_rows) = (oh / rows, oh % rows);
    let gemm = Gemm::new(jit, isa, kc, rows * ow, cout_g, cout_g, rows * ow);
    let last = (last_rows > 0).then(|| Gemm::new(jit, isa, kc, last_rows * ow, cout_g, cout_g, last_rows * ow));
    // A: per group, the transposed weights `[kc, cout_g]`.
    let weight = cx.param_ref("weight")?;
    let wt = jit.consts.f32s_filled(g * kc * cout_g, |t| {
        for gi in 0..g {
            for j in 0..kc {
                for oc in 0..cout_g {
                    t[(gi * kc + j) * cout_g + oc] = weight[(gi * cout_g + oc) * kc + j];
                }
            }
        }
    });
    let tabs = geo.fold_tables(jit, conv, (h, w))?;
    let (ds, os, ss) = (cx.inputs[0], cx.output, cx.scratch_slot()?);
    jit.kernel(&cx.node.name, |fx| {
        let (dy, dx, scr) = (fx.slot(ds), fx.slot(os), fx.slot(ss));
        // Sample-wise: this thread's copy of the scratch (see `lower::samplewise_work`).
        let scr = part_scratch(fx, scr, sc.total);
        let dpad = fx.addi(scr, c(4 * sc.pad));
        let bpk = fx.addi(scr, c(4 * sc.b));
        let col = fx.addi(scr, c(4 * sc.col));
        let wta = fx.addr(wt);
        let nb = fx.nb;
        let steps = [c(4 * o * p), c(4 * cin * h * w), 0, 0, 0, 0];
        fx.loop_n(Count::Dyn(nb), [dy, dx, dpad, bpk, col, wta], steps, |fx, [dy, dx, dpad, bpk, col, wta]| {
            let tgt = if padded { dpad } else { dx };
            zero_floats(fx, tgt, cin * ph * pw);
            let steps = [c(4 * cout_g * p), c(4 * kc * cout_g), c(4 * cin_g * ph * pw), 0, 0];
            fx.loop_n(Count::Const(g), [dy, wta, tgt, bpk, col], steps, |fx, [dyg, wg, tg, bpk, col]| {
                // One chunk of `r` output rows starting at `dyc` (the group's output
                // gradient) and, in the padded input's gradient, at `tc`.
                let chunk = |fx: &mut Fx<'_>, gemm: &Gemm, r: usize, [dyc, tc, wg, bpk, col]: [Value; 5]| {
                    let n = r * ow;
                    let (nr, full) = (gemm.nr, gemm.full_tiles());
                    // B: the chunk's output gradient, by tiles of pixels.
                    let steps = [c(4 * nr), c(4 * gemm.tile_off(1))];
                    fx.loop_n(Count::Const(full), [dyc, bpk], steps, |fx, [s, d]| {
                        fx.loop_n(Count::Const(cout_g), [s, d], [c(4 * p), c(4 * nr)], |fx, [s, d]| {
                            copy_run(fx, s, d, nr)
                        });
                    });
                    if !n.is_multiple_of(nr) {
                        let s = fx.addi(dyc, c(4 * full * nr));
                        let d = fx.addi(bpk, c(4 * gemm.tile_off(full)));
                        let steps = [c(4 * p), c(4 * gemm.width(full))];
                        fx.loop_n(Count::Const(cout_g), [s, d], steps, |fx, [s, d]| copy_run(fx, s, d, n % nr));
                    }
                    let kn = fx.i(c(cout_g));
                    let first = fx.i(1);
                    gemm.emit(fx, wg, bpk, col, kn, first);
                    // col2im: each column into the padded input's gradient.
                    let zero = fx.i(0);
                    fx.loop_n(Count::Const(kc), [zero, col, tc], [1, c(4 * n), 0], |fx, [j, cj, tg]| {
                        let off = tap_offset(fx, conv, j, (ph, pw));
                        let d0 = fx.elem(tg, off);
                        fx.loop_n(Count::Const(r), [cj, d0], [c(4 * ow), c(4 * sh * pw)], |fx, [s, d]| {
                            if sw == 1 {
                                fx.add_run(s, d, ow);
                            } else {
                                fx.loop_n(Count::Const(ow), [s, d], [4, c(4 * sw)], |fx, [s, d]| {
                                    let a = fx.load_f(s, 0);
                                    let zero = fx.i(0);
                                    let b = fx.load_f_mut(d, zero);
                                    let v = fx.b.ins().fadd(b, a);
                                    fx.store_f(v, d, 0);
                                });
                            }
                        });
                    });
                };
                let steps = [c(4 * rows * ow), c(4 * rows * sh * pw), 0, 0, 0];
                fx.loop_n(Count::Const(chunks), [dyg, tg, wg, bpk, col], steps, |fx, v| chunk(fx, &gemm, rows, v));
                if let Some(last) = &last {
                    let dyc = fx.addi(dyg, c(4 * chunks * rows * ow));
                    let tc = fx.addi(tg, c(4 * chunks * rows * sh * pw));
                    chunk(fx, last, last_rows, [dyc, tc, wg, bpk, col]);
                }
            });
            if let Some(tabs) = tabs {
                fold(fx, dpad, dx, (cin, h, w), (ph, pw), tabs);
            }
        });
    })?;
    Ok(())
}

/// The input gradient of an ungrouped Conv2d on a small map ([`input_grad_transposed`]),
/// per block of samples ([`crate::jit::plan::row_block`]): `dyᵀ` (a row per pixel, the
/// block's samples one after the other) copied into `A`, `colsᵀ = dyᵀ·W` with the weights
/// packed once by column tiles of taps (read once per block), then, sample by sample, each
/// column of `colsᵀ` added into the padded input's gradient (reading down the column) and
/// folded as in [`conv_input_grad`].
fn conv_input_grad_t(
    jit: &mut Jit,
    cx: &NodeCx<'_>,
    conv: &Conv2d,
    sc: GradScratch,
    (cin, h, w): (usize, usize, usize),
    (o, oh, ow): (usize, usize, usize),
    isa: Isa,
) -> Result<()> {
    let geo = Geo::new(conv, (cin, h, w), (o, oh, ow));
    let Geo { padded, ph, pw, g, cout_g, p, kc, .. } = geo;
    let (sh, sw) = conv.stride;
    let block = sc.block;
    let gemm = Gemm::new(jit, isa, block * p, kc, cout_g, cout_g, kc);
    // B: W itself — W[oc][j] at step oc, column j (one group).
    let weight = cx.param_ref("weight")?;
    let (wp, _) = gemm.pack_b(jit, g, &weight, (cout_g, kc), false);
    let tabs = geo.fold_tables(jit, conv, (h, w))?;
    let taps = jit.consts.i64s(tap_bytes(conv, kc, (ph, pw)));
    let (ds, os, ss) = (cx.inputs[0], cx.output, cx.scratch_slot()?);
    jit.kernel(&cx.node.name, |fx| {
        let (dy, dx, scr) = (fx.slot(ds), fx.slot(os), fx.slot(ss));
        // Sample-wise: this thread's copy of the scratch (see `lower::samplewise_work`).
        let scr = part_scratch(fx, scr, sc.total);
        let dpad = fx.addi(scr, c(4 * sc.pad));
        let apk = fx.addi(scr, c(4 * sc.a));
        let col = fx.addi(scr, c(4 * sc.col));
        let nblk = blocks(fx, block);
        let zero = fx.i(0);
        let steps = [c(block), c(4 * block * o * p), c(4 * block * cin * h * w), 0, 0, 0];
        fx.loop_n(Count::Dyn(nblk), [zero, dy, dx, dpad, apk, col], steps, |fx, [n0, dyb, dxb, dpad, apk, col]| {
            let (cnt, _) = block_count(fx, n0, block);
            let m = fx.b.ins().imul_imm_s(cnt, c(p));
            // A = dyᵀ of the block: a row of channels per pixel, sample after sample.
            let steps = [c(4 * o * p), c(4 * p * o)];
            fx.loop_n(Count::Dyn(cnt), [dyb, apk], steps, |fx, [ds, as_]| {
                fx.loop_n(Count::Const(o), [ds, as_], [c(4 * p), 4], |fx, [s, d]| {
                    fx.loop_n(Count::Const(p), [s, d], [4, c(4 * o)], |fx, [s, d]| {
                        let v = fx.load_f(s, 0);
                        fx.store_f(v, d, 0);
                    });
                });
            });
            let kn = fx.i(c(o));
            let first = fx.i(1);
            let wpa = fx.addr(wp);
            gemm.emit_rows(fx, apk, wpa, col, kn, first, m);
            // col2im and the fold, sample by sample.
            let steps = [c(4 * p * kc), c(4 * cin * h * w), 0, 0];
            fx.loop_n(Count::Dyn(cnt), [col, dxb, dpad, cnt], steps, |fx, [cs, dxs, dpad, _]| {
                let tgt = if padded { dpad } else { dxs };
                zero_floats(fx, tgt, cin * ph * pw);
                let tab = fx.addr(taps);
                col2im_t(fx, tab, cs, tgt, kc, (oh, ow), (sh, sw), pw);
                if let Some(tabs) = tabs {
                    fold(fx, dpad, dxs, (cin, h, w), (ph, pw), tabs);
                }
            });
        });
    })?;
    Ok(())
}

/// Adds column `j` of the transposed columns `colsᵀ` (`[oh·ow, kc]`, row-major) into the
/// padded input's gradient `tg` at tap `j`'s offset (`tab[j]`, bytes), for every `j < kc`.
#[allow(clippy::too_many_arguments)]
fn col2im_t(
    fx: &mut Fx<'_>,
    tab: Value,
    cols: Value,
    tg: Value,
    kc: usize,
    (oh, ow): (usize, usize),
    (sh, sw): (usize, usize),
    pw: usize,
) {
    fx.loop_n(Count::Const(kc), [tab, cols, tg], [8, 4, 0], |fx, [tab, cj, tg]| {
        let off = fx.load_i64(tab, 0);
        let d0 = fx.add(tg, off);
        let steps = [c(4 * ow * kc), c(4 * sh * pw)];
        fx.loop_n(Count::Const(oh), [cj, d0], steps, |fx, [s, d]| {
            fx.loop_n(Count::Const(ow), [s, d], [c(4 * kc), c(4 * sw)], |fx, [s, d]| {
                let a = fx.load_f(s, 0);
                let zero = fx.i(0);
                let b = fx.load_f_mut(d, zero);
                let v = fx.b.ins().fadd(b, a);
                fx.store_f(v, d, 0);
            });
        });
    });
}

/// Adds every padded position of `dpad` (`[C, ph, pw]`) into the input pixel it was read
/// from, giving `dx` (`[C, H, W]`); `tabs`: the row and column preimages as CSR.
fn fold(
    fx: &mut Fx<'_>,
    dpad: Value,
    dx: Value,
    (cin, h, w): (usize, usize, usize),
    (ph, pw): (usize, usize),
    [ys, yl, xs, xl]: [i64; 4],
) {
    fx.loop_n(Count::Const(cin), [dpad, dx], [c(4 * ph * pw), c(4 * h * w)], |fx, [dp, dxc]| {
        let zero = fx.i(0);
        fx.loop_n(Count::Const(h), [zero, dp, dxc], [1, 0, c(4 * w)], |fx, [y, dp, dxr]| {
            let ysa = fx.addr(ys);
            let y0 = fx.load_i64_at(ysa, y);
            let y1i = fx.addi(y, 1);
            let y1 = fx.load_i64_at(ysa, y1i);
            let zero = fx.i(0);
            fx.loop_n(Count::Const(w), [zero, dxr, dp, y0, y1], [1, 4, 0, 0, 0], |fx, [x, d, dp, y0, y1]| {
                let xsa = fx.addr(xs);
                let x0 = fx.load_i64_at(xsa, x);
                let x1i = fx.addi(x, 1);
                let x1 = fx.load_i64_at(xsa, x1i);
                let z = fx.f(0.0);
                let s = fx.var(types::F32, z);
                fx.for_range(y0, y1, 1, |fx, k| {
                    let yla = fx.addr(yl);
                    let py = fx.load_i64_at(yla, k);
                    let row = fx.b.ins().imul_imm_s(py, c(4 * pw));
                    let row = fx.add(dp, row);
                    fx.for_range(x0, x1, 1, |fx, l| {
                        let xla = fx.addr(xl);
                        let px = fx.load_i64_at(xla, l);
                        let a = fx.elem(row, px);
                        let v = fx.load_f(a, 0);
                        let cur = fx.b.use_var(s);
                        let n = fx.b.ins().fadd(cur, v);
                        fx.b.def_var(s, n);
                    });
                });
                let v = fx.b.use_var(s);
                fx.store_f(v, d, 0);
            });
        });
    });
}

/// `(dy) → dx` of a Linear: the forward GEMM with the transposed weight.
pub(in crate::jit) fn linear_input_grad(jit: &mut Jit, cx: &NodeCx<'_>, l: &Linear, isa: Isa) -> Result<()> {
    let (fi, fo) = (l.in_features, l.out_features);
    let rows = cx.in_tys[0].numel_per_sample() / fo.max(1);
    // `W` `[fo, fi]` is the transpose of the product's matrix `Wᵀ` `[fi, fo]`.
    let w = cx.param_ref("weight")?;
    let source: Vec<Option<usize>> = (0..fo).map(Some).collect();
    let spec = RowsGemm {
        k: fo,
        o: fi,
        rows,
        weight: GemmWeight::Transposed(&w),
        source: &source,
        scale: None,
        shift: None,
        act: Act::None,
        xs: cx.inputs[0],
        ys: cx.output,
        res: None,
    };
    rows_gemm(jit, &cx.node.name, isa, spec)
}

/// `(x, dy) → ∂/∂weight` of a Linear, `[out_features, in_features]`.
pub(in crate::jit) fn linear_weight_grad(
    jit: &mut Jit,
    cx: &NodeCx<'_>,
    op: &TrainOp,
    l: &Linear,
    isa: Isa,
) -> Result<()> {
    let (fi, fo) = (l.in_features, l.out_features);
    let rows = cx.in_tys[0].numel_per_sample() / fi.max(1);
    let sc = scratch_of(cx, op)?;
    let block = sc.block;
    let kmax = block * rows;
    let gemm = Gemm::new(jit, isa, fo, fi, kmax, kmax, fi);
    let (xs, ds, os, ss) = (cx.inputs[0], cx.inputs[1], cx.output, cx.scratch_slot()?);
    let work = 2 * (rows * fi * fo) as u64;
    // Threads share it by column tiles (input features), as the conv's weight gradient.
    jit.parallel_kernel(&cx.node.name, work, |fx| {
        let (x, dy, dw, scr) = (fx.slot(xs), fx.slot(ds), fx.slot(os), fx.slot(ss));
        let scr = part_scratch(fx, scr, sc.total);
        let apk = fx.addi(scr, c(4 * sc.a));
        let bpk = fx.addi(scr, c(4 * sc.b));
        let (lo, nfull, rem) = gemm.part_tiles(fx);
        let nblk = blocks(fx, block);
        let zero = fx.i(0);
        let steps = [c(block), c(4 * block * rows * fi), c(4 * block * rows * fo), 0, 0, 0, 0, 0, 0];
        let vals = [zero, x, dy, apk, bpk, dw, lo, nfull, rem];
        fx.loop_n(Count::Dyn(nblk), vals, steps, |fx, [n0, xb, dyb, apk, bpk, dw, lo, nfull, rem]| {
            let (cnt, first) = block_count(fx, n0, block);
            let r = fx.b.ins().imul_imm_s(cnt, c(rows));
            // A = dyᵀ: a row per output feature.
            fx.loop_n(Count::Dyn(r), [dyb, apk], [c(4 * fo), 4], |fx, [s, d]| {
                fx.loop_n(Count::Const(fo), [s, d], [4, c(4 * kmax)], |fx, [s, d]| {
                    let v = fx.load_f(s, 0);
                    fx.store_f(v, d, 0);
                });
            });
            // B: the rows of x, by tiles of features (this part's tiles).
            let nr = gemm.nr;
            let full = gemm.full_tiles();
            let steps = [c(4 * nr), c(4 * gemm.tile_off(1)), 0];
            let s0 = fx.b.ins().imul_imm_s(lo, c(4 * nr));
            let s0 = fx.add(xb, s0);
            let d0 = fx.b.ins().imul_imm_s(lo, c(4 * gemm.tile_off(1)));
            let d0 = fx.add(bpk, d0);
            fx.loop_n(Count::Dyn(nfull), [s0, d0, r], steps, |fx, [s, d, r]| {
                fx.loop_n(Count::Dyn(r), [s, d], [c(4 * fi), c(4 * nr)], |fx, [s, d]| copy_run(fx, s, d, nr));
            });
            if fi % nr > 0 {
                let s = fx.addi(xb, c(4 * full * nr));
                let d = fx.addi(bpk, c(4 * gemm.tile_off(full)));
                let width = gemm.width(full);
                fx.loop_n(Count::Dyn(rem), [s, d, r], [0; 3], |fx, [s, d, r]| {
                    fx.loop_n(Count::Dyn(r), [s, d], [c(4 * fi), c(4 * width)], |fx, [s, d]| {
                        copy_run(fx, s, d, fi % nr)
                    });
                });
            }
            gemm.emit_range(fx, apk, bpk, dw, r, first, (lo, nfull, rem));
        });
    })?;
    Ok(())
}
