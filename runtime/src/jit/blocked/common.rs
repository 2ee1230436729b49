//! What the blocked convolutions (direct and Winograd) share: the zero-padded staged copy
//! of a conv's operand ([`Stage`]), and the split of output channel blocks into groups;
//! and, for the GEMM-form gradients, a blocked operand unpacked into plain rows
//! ([`unblock_rows`]).

use crate::error::Result;
use crate::jit::codegen::{Count, Fx, Jit, c, part_range};
use crate::jit::cx::NodeCx;
use crate::jit::eltwise::copy_run;
use crate::jit::plan::BLOCK;
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{InstBuilder, Value};

/// Splits `blocks` into runs of at most `max` blocks, as even as possible.
pub(in crate::jit) fn split_even(blocks: usize, max: usize) -> Vec<usize> {
    let n = blocks.div_ceil(max.max(1)).max(1);
    (0..n).map(|i| blocks / n + usize::from(i < blocks % n)).filter(|&b| b > 0).collect()
}

/// Packed weights from which a layer's packing is shared by the model's threads (each a
/// run of whole items; VGG-11's 411 MB first classifier layer packs ~2× faster on two).
const PARALLEL_PACK_BYTES: usize = 256 << 10;

/// Fills `out`, the packed weights of `starts.len()` items (item `i` from float `starts[i]`
/// on, in order, the last to the end), with `fill(part, items)`: `part` the floats of the
/// items `items`, from the first one's start. Large ones ([`PARALLEL_PACK_BYTES`]) are
/// filled by up to `threads` threads at once, each a run of whole items.
pub(in crate::jit) fn fill_by_items(
    out: &mut [f32],
    starts: &[usize],
    threads: usize,
    fill: impl Fn(&mut [f32], std::ops::Range<usize>) + Sync,
) {
    let n = starts.len();
    let threads = if 4 * out.len() >= PARALLEL_PACK_BYTES { threads.clamp(1, n.max(1)) } else { 1 };
    if threads == 1 {
        return fill(out, 0..n);
    }
    let start = |i: usize| starts.get(i).copied().unwrap_or(out.len());
    let ends: Vec<usize> = (0..threads).map(|i| n * (i + 1) / threads).collect();
    let lens: Vec<usize> = ends.iter().scan(0, |t0, &t1| Some(start(t1) - start(std::mem::replace(t0, t1)))).collect();
    let fill = &fill;
    std::thread::scope(|scope| {
        let mut rest = out;
        let mut t0 = 0;
        for (&t1, &len) in ends.iter().zip(&lens) {
            let (mine, more) = std::mem::take(&mut rest).split_at_mut(len);
            rest = more;
            let items = t0..t1;
            scope.spawn(move || fill(mine, items));
            t0 = t1;
        }
    });
}

/// The layout of a staged copy: zero-padded planes of `lane` floats per pixel (the channel
/// blocks of a blocked operand, or the channels of a plain one), or pixel-major `[h′][w′][c]`
/// from a plain operand.
#[derive(Clone, Copy, Debug)]
pub(in crate::jit) enum Form {
    Planes { planes: usize, lane: usize },
    PixelMajor { cin: usize },
}

/// A staged copy of a conv's operand (see [`crate::jit::plan::staged_input`]): slot `from` copied
/// into slot `to` with rows and columns of zeros around each `ih × iw` plane, the plane at
/// row `pt`, column `pl` of its `ph × pw` copy; `out_sample` floats per sample in `to`.
/// [`Stage::emit`] writes any range of its rows, so the copy can be a kernel of its own or
/// part of the conv's kernel.
#[derive(Clone, Copy, Debug)]
pub(in crate::jit) struct Stage {
    from: usize,
    to: usize,
    in_size: usize,
    /// Address of a row of zeros (`pw · lane` floats, or `pw · cin`).
    zeros: i64,
    form: Form,
    ih: usize,
    iw: usize,
    pt: usize,
    pl: usize,
    ph: usize,
    pw: usize,
    out_sample: usize,
}

impl Stage {
    /// The staged copy of a conv's operand into slot `to`, `(pt, pb, pl, pr)` rows and
    /// columns of zeros around it: blocked `[c/16][h′][w′][16]` from a blocked operand,
    /// pixel-major `[h′][w′][c]` from a plain one.
    pub(in crate::jit) fn of_conv(
        jit: &mut Jit,
        cx: &NodeCx<'_>,
        to: usize,
        (cin, ih, iw): (usize, usize, usize),
        (pt, pb, pl, pr): (usize, usize, usize, usize),
        blocked: bool,
    ) -> Stage {
        let (ph, pw) = (ih + pt + pb, iw + pl + pr);
        let (form, per_pixel) = if blocked {
            let planes = cin.div_ceil(BLOCK);
            (Form::Planes { planes, lane: BLOCK }, planes * BLOCK)
        } else {
            (Form::PixelMajor { cin }, cin)
        };
        Stage::new(jit, cx, to, form, (ih, iw), (pt, pl, ph, pw), ph * pw * per_pixel)
    }

    /// Zero-padded copies of the operand's `planes` planes of `ih × iw` pixels of `lane`
    /// floats each, `[planes][ph][pw][lane]` per sample, `out_sample` floats apart (any rest
    /// slack).
    pub(in crate::jit) fn planes(
        jit: &mut Jit,
        cx: &NodeCx<'_>,
        to: usize,
        (planes, lane): (usize, usize),
        (ih, iw): (usize, usize),
        pads: (usize, usize, usize, usize),
        out_sample: usize,
    ) -> Stage {
        Stage::new(jit, cx, to, Form::Planes { planes, lane }, (ih, iw), pads, out_sample)
    }

    /// A copy of `form` with the given plane size, padding and sample stride.
    fn new(
        jit: &mut Jit,
        cx: &NodeCx<'_>,
        to: usize,
        form: Form,
        (ih, iw): (usize, usize),
        (pt, pl, ph, pw): (usize, usize, usize, usize),
        out_sample: usize,
    ) -> Stage {
        // One row of zeros: the widest run a copy writes from it.
        let lane = match form {
            Form::Planes { lane, .. } => lane,
            Form::PixelMajor { cin } => cin,
        };
        let zeros = jit.consts.f32s(vec![0.0; pw * lane]);
        let (from, in_size) = (cx.inputs[0], cx.in_lens[0]);
        Stage { from, to, in_size, zeros, form, ih, iw, pt, pl, ph, pw, out_sample }
    }

    /// Rows of the copy per sample (the units [`Stage::emit`] counts).
    pub(in crate::jit) fn rows(&self) -> usize {
        match self.form {
            Form::Planes { planes, .. } => planes * self.ph,
            Form::PixelMajor { .. } => self.ph,
        }
    }

    /// Its work in the units of the thread split (FLOP): a float moved counts as 8, so a
    /// copy worth splitting is split — which also puts the rows each thread's part of the
    /// convolution reads mostly in that thread's cache.
    pub(in crate::jit) fn work(&self) -> u64 {
        8 * self.out_sample as u64
    }

    /// Emits the copy of rows `[lo, hi)` of the chunk (`rows()` per sample, the samples'
    /// rows one after another).
    pub(in crate::jit) fn emit(&self, fx: &mut Fx<'_>, lo: Value, hi: Value) {
        let Stage { ih, iw, pt, pl, ph, pw, in_size, out_sample, zeros, .. } = *self;
        let x = fx.slot(self.from);
        let y = fx.slot(self.to);
        let rows = self.rows();
        fx.for_range(lo, hi, 1, |fx, u| {
            // u = n·rows + local.
            let n = fx.b.ins().udiv_imm_u(u, c(rows));
            let local = fx.b.ins().urem_imm_u(u, c(rows));
            let yn = fx.elem_scaled(y, n, c(out_sample));
            let xn = fx.elem_scaled(x, n, c(in_size));
            let z = fx.i(zeros);
            match self.form {
                Form::Planes { planes, lane } => {
                    // local = row·planes + plane: the rows of every plane in order, so a
                    // thread's share of the copy is the rows its share of a row-split
                    // conv reads (and the rows a row-split producer wrote from it).
                    let r = fx.b.ins().udiv_imm_u(local, c(planes));
                    let plane = fx.b.ins().urem_imm_u(local, c(planes));
                    let at = fx.muli(plane, c(ph));
                    let at = fx.add(at, r);
                    let yr = fx.elem_scaled(yn, at, c(pw * lane));
                    let (inside, sr) = source_row(fx, r, pt, ih);
                    let xp = fx.elem_scaled(xn, plane, c(ih * iw * lane));
                    let xr = fx.elem_scaled(xp, sr, c(iw * lane));
                    // A row outside the operand copies zeros instead.
                    let src = fx.b.ins().select(inside, xr, z);
                    copy_run(fx, z, yr, pl * lane);
                    let mid = fx.addi(yr, c(4 * pl * lane));
                    copy_run(fx, src, mid, iw * lane);
                    let right = fx.addi(yr, c(4 * (pl + iw) * lane));
                    copy_run(fx, z, right, (pw - pl - iw) * lane);
                }
                Form::PixelMajor { cin } => {
                    let yr = fx.elem_scaled(yn, local, c(pw * cin));
                    let (inside, sr) = source_row(fx, local, pt, ih);
                    copy_run(fx, z, yr, pl * cin);
                    let right = fx.addi(yr, c(4 * (pl + iw) * cin));
                    copy_run(fx, z, right, (pw - pl - iw) * cin);
                    let mid = fx.addi(yr, c(4 * pl * cin));
                    let body = fx.b.create_block();
                    let outside = fx.b.create_block();
                    let done = fx.b.create_block();
                    fx.b.ins().brif(inside, body, &[], outside, &[]);
                    fx.b.switch_to_block(outside);
                    copy_run(fx, z, mid, iw * cin);
                    fx.b.ins().jump(done, &[]);
                    fx.b.switch_to_block(body);
                    // Pixel-major from planes: row `sr`; `cin` strided loads per pixel.
                    let xr = fx.elem_scaled(xn, sr, c(iw));
                    fx.loop_n(Count::Const(iw), [xr, mid], [4, c(4 * cin)], |fx, [xp, yp]| {
                        for ch in 0..cin {
                            let v = fx.load_f(xp, c(ch * ih * iw));
                            fx.store_f(v, yp, c(ch));
                        }
                    });
                    fx.b.ins().jump(done, &[]);
                    fx.b.switch_to_block(done);
                }
            }
        });
    }

    /// In a conv kernel's unit loop: when the call is not split (it then does every unit, in
    /// order) and `pos` (the unit's first row or tile row) is 0, copies samples `n .. n +
    /// cnt` — so a sample's copy is made right before the first unit that reads it.
    pub(in crate::jit) fn emit_before_first(&self, fx: &mut Fx<'_>, n: Value, cnt: Value, pos: Value) {
        let single = fx.b.ins().icmp_imm_s(IntCC::Equal, fx.parts, 1);
        let first = fx.b.ins().icmp_imm_s(IntCC::Equal, pos, 0);
        let now = fx.b.ins().band(single, first);
        let copy = fx.b.create_block();
        let go = fx.b.create_block();
        fx.b.ins().brif(now, copy, &[], go, &[]);
        fx.b.switch_to_block(copy);
        let lo = fx.muli(n, c(self.rows()));
        let len = fx.muli(cnt, c(self.rows()));
        let hi = fx.add(lo, len);
        self.emit(fx, lo, hi);
        fx.b.ins().jump(go, &[]);
        fx.b.switch_to_block(go);
    }

    /// Emits the copy as a kernel of its own, named after the node, its rows split
    /// between threads. `work` decides when it is split (see [`Stage::work`]); with
    /// `lazy`, a call that is not split copies nothing: the conv then copies each sample
    /// itself right before reading it (see [`conv`]), so the copy is still in cache.
    pub(in crate::jit) fn kernel(&self, jit: &mut Jit, cx: &NodeCx<'_>, work: u64, lazy: bool) -> Result<()> {
        let name = format!("{}.stage", cx.node.name);
        let st = *self;
        jit.parallel_data_kernel(&name, work, |fx| {
            let copy = fx.b.create_block();
            let done = fx.b.create_block();
            if lazy {
                let split = fx.b.ins().icmp_imm_s(IntCC::NotEqual, fx.parts, 1);
                fx.b.ins().brif(split, copy, &[], done, &[]);
            } else {
                fx.b.ins().jump(copy, &[]);
            }
            fx.b.switch_to_block(copy);
            let units = fx.muli(fx.nb, c(st.rows()));
            let (lo, hi) = part_range(fx, units);
            st.emit(fx, lo, hi);
            fx.b.ins().jump(done, &[]);
            fx.b.switch_to_block(done);
        })?;
        Ok(())
    }
}

/// Whether padded row `r` lies in the operand, and the operand row it copies (row 0 when
/// it does not, so the address stays in bounds).
fn source_row(fx: &mut Fx<'_>, r: Value, pt: usize, ih: usize) -> (Value, Value) {
    let src_row = fx.b.ins().iadd_imm_s(r, -(pt as i64));
    let inside_lo = fx.b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, src_row, 0);
    let inside_hi = fx.b.ins().icmp_imm_s(IntCC::SignedLessThan, src_row, c(ih));
    let inside = fx.b.ins().band(inside_lo, inside_hi);
    let zero = fx.i(0);
    (inside, fx.b.ins().select(inside, src_row, zero))
}

/// The inverse of [`unblock_rows`]: `o` rows of `p` floats at `src`, `ld` floats apart, as
/// `p` pixels at `dst`, `dpx` floats apart, channel `c` of a pixel at `(c / 16)·dblk + c %
/// 16` (a blocked tensor: `dpx` = 16, `dblk` = a block's floats; the channels side by side
/// in one row per pixel: `dblk` = 16, `dpx` the row's length): four channels' four pixels at a time (a
/// 4×4 transpose), the last `p % 4` pixels one value at a time. Lanes past `o` up to the
/// next multiple of four are written as zeros, and with `pad` those up to the end of the
/// last block too.
pub(in crate::jit) fn block_rows(
    fx: &mut Fx<'_>,
    src: Value,
    dst: Value,
    o: usize,
    (p, dblk, dpx): (usize, usize, usize),
    ld: usize,
    pad: bool,
) {
    const B: usize = BLOCK;
    let quads = p / 4;
    for blk in 0..o.div_ceil(B) {
        let d = fx.addi(dst, c(4 * blk * dblk));
        let nq = if pad { B / 4 } else { (o - blk * B).min(B).div_ceil(4) };
        for q in 0..nq {
            let ch0 = blk * B + 4 * q;
            let valid = o.saturating_sub(ch0).min(4);
            let s = fx.addi(src, c(4 * ch0.min(o - 1) * ld));
            let d = fx.addi(d, c(4 * 4 * q));
            fx.loop_n(Count::Const(quads), [s, d], [16, c(16 * dpx)], |fx, [s, d]| {
                let zero = fx.vf(0.0);
                let v = std::array::from_fn(|j| if j < valid { fx.load_v(s, c(j * ld)) } else { zero });
                let px = fx.transpose4(v);
                for (k, r) in px.into_iter().enumerate() {
                    fx.store_v(r, d, c(k * dpx));
                }
            });
            for px in quads * 4..p {
                for j in 0..4 {
                    let v = if j < valid { fx.load_f(s, c(j * ld + px)) } else { fx.f(0.0) };
                    fx.store_f(v, d, c(px * dpx + j));
                }
            }
        }
    }
}

/// `p` consecutive pixels of a blocked tensor at `src` (its blocks `sblk` floats apart:
/// `[⌈o/16⌉][…p…][16]`) as `o` rows of `p` floats at `dst`, `ld` floats apart: four
/// pixels' four channels at a time (a 4×4 transpose), the last `p % 4` pixels one value at
/// a time; the padding lanes of the last block are not read.
pub(in crate::jit) fn unblock_rows(
    fx: &mut Fx<'_>,
    src: Value,
    dst: Value,
    o: usize,
    (p, sblk): (usize, usize),
    ld: usize,
) {
    const B: usize = BLOCK;
    let quads = p / 4;
    for blk in 0..o.div_ceil(B) {
        let s = fx.addi(src, c(4 * blk * sblk));
        for q in 0..(o - blk * B).min(B).div_ceil(4) {
            let ch0 = blk * B + 4 * q;
            let valid = (o - ch0).min(4);
            let d = fx.addi(dst, c(4 * ch0 * ld));
            let s = fx.addi(s, c(4 * 4 * q));
            fx.loop_n(Count::Const(quads), [s, d], [c(16 * B), 16], |fx, [s, d]| {
                let v = std::array::from_fn(|k| fx.load_v(s, c(k * B)));
                let rows = fx.transpose4(v);
                for (j, r) in rows.into_iter().enumerate().take(valid) {
                    fx.store_v(r, d, c(j * ld));
                }
            });
            for px in quads * 4..p {
                for j in 0..valid {
                    let v = fx.load_f(s, c(px * B + j));
                    fx.store_f(v, d, c(j * ld + px));
                }
            }
        }
    }
}
