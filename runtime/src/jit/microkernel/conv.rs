//! The direct-convolution tile ([`conv_tile`]): `MR` output pixels × `NB` blocks of 16
//! output channels, channels in the lanes, the whole reduction over input channels and taps
//! in registers, the epilogue applied before the store.

use super::epilogue::{Act, finish};
use super::isa::Isa;
use super::simd::Simd;

/// Constants of one convolution's tiles, built at compile time and owned by the model.
/// Strides are in elements.
#[derive(Debug)]
#[repr(C)]
pub(in crate::jit) struct ConvTile {
    pub isa: Isa,
    /// Input channel blocks the reduction runs over (1 for a plain input).
    pub icb: usize,
    /// Channels in each block but the last, per tap (16 for a blocked input, all for a
    /// plain one; `kw` times that when a kernel row's columns are folded into one tap).
    pub c_full: usize,
    /// Channels in the last block.
    pub c_last: usize,
    /// Input strides: between channel blocks, channels, and consecutive output pixels.
    pub x_icb: isize,
    pub x_c: isize,
    pub x_px: isize,
    /// Kernel size `(kh, kw)` of the packed weights.
    pub kh: usize,
    pub kw: usize,
    /// Output stride between channel blocks (a residual has the output's layout).
    pub y_blk: isize,
    /// Output channels (lanes of the last block past them are set to zero).
    pub channels: usize,
    /// Per-channel `scale` and `shift` (padded to whole blocks), or null.
    pub scale: *const f32,
    pub shift: *const f32,
    /// The activation applied last.
    pub act: Act,
    /// Whether the tiles prefetch their weights [`PREFETCH_FLOATS`] ahead.
    pub prefetch: bool,
}

// SAFETY: the pointers are addresses of constant-pool data that lives as long as the model
// and is never written after compilation.
unsafe impl Send for ConvTile {}
// SAFETY: as above; shared access only reads.
unsafe impl Sync for ConvTile {}

/// How far ahead of its use a conv tile prefetches its weights, in floats (8 KB), when its
/// descriptor asks for it. A channel group's packed weights are one sequential stream read
/// once per tile; at batch 1 the first row of a group brings them from L3 (ResNet-18's
/// layer4: 0.9 MB per group), which the hardware prefetcher alone does not hide —
/// prefetching made those convolutions ~12% faster in the net.
const PREFETCH_FLOATS: usize = 2048;

/// Channels `c0 .. c0 + C` of one tap: `C` reduction steps, weights from `wp` (`w_c` floats
/// apart), inputs at `px[p] + c0 + ch` (contiguous channels).
///
/// # Safety
/// As [`conv_body`].
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn chans<V: Simd, const MR: usize, const NV: usize, const C: usize, const PF: bool>(
    acc: &mut [[V; NV]; MR],
    px: &[*const f32; MR],
    c0: usize,
    wp: *const f32,
    w_c: usize,
) {
    unsafe {
        for ch in 0..C {
            let w = wp.add(ch * w_c);
            let mut wv = [V::zero(); NV];
            for j in 0..NV {
                wv[j] = V::load(w.add(j * V::L));
                if PF && (j * V::L) % 16 == 0 {
                    // The weights are read once per tile, in order: fetch ahead of use.
                    V::prefetch(w.wrapping_add(PREFETCH_FLOATS + j * V::L));
                }
            }
            for p in 0..MR {
                let xv = V::splat(px[p].add(c0 + ch));
                for j in 0..NV {
                    acc[p][j] = V::fma(xv, wv[j], acc[p][j]);
                }
            }
        }
    }
}

/// The reduction of one conv tile (see [`conv_body`]); `PF`: prefetch the weights.
///
/// # Safety
/// As [`conv_body`].
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn reduce<V: Simd, const MR: usize, const NV: usize, const PF: bool>(
    d: &ConvTile,
    x: *const f32,
    w: *const f32,
    rows: *const isize,
    cols: *const isize,
) -> [[V; NV]; MR] {
    unsafe {
        let (khn, kwn) = (*rows as usize, *cols as usize);
        let w_c = NV * V::L;
        let w_tap = d.c_full * w_c;
        let w_row = d.kw * w_tap;
        let w_icb = d.kh * w_row;
        let w = w.add(*rows.add(1) as usize * w_row + *cols.add(1) as usize * w_tap);
        let (roff, coff) = (rows.add(2), cols.add(2));
        let mut acc = [[V::zero(); NV]; MR];
        let acc = &mut acc;
        for b in 0..d.icb {
            let cn = if b + 1 == d.icb { d.c_last } else { d.c_full };
            let xb = x.offset(b as isize * d.x_icb);
            let wb = w.add(b * w_icb);
            for i in 0..khn {
                let xr = xb.offset(*roff.add(i));
                let wr = wb.add(i * w_row);
                for t in 0..kwn {
                    let xt = xr.offset(*coff.add(t));
                    let mut wp = wr.add(t * w_tap);
                    let mut px = [xt; MR];
                    for p in 1..MR {
                        px[p] = px[p - 1].offset(d.x_px);
                    }
                    if d.x_c == 1 {
                        // Contiguous channels: unrolled chunks of 16, 8, 4, 2, 1, so every
                        // broadcast is a fixed offset from a pixel pointer.
                        let mut c0 = 0;
                        while cn - c0 >= 16 {
                            chans::<V, MR, NV, 16, PF>(acc, &px, c0, wp.add(c0 * w_c), w_c);
                            c0 += 16;
                        }
                        let rest = cn - c0;
                        for chunk in [8, 4, 2, 1] {
                            if rest & chunk != 0 {
                                let wc = wp.add(c0 * w_c);
                                match chunk {
                                    8 => chans::<V, MR, NV, 8, PF>(acc, &px, c0, wc, w_c),
                                    4 => chans::<V, MR, NV, 4, PF>(acc, &px, c0, wc, w_c),
                                    2 => chans::<V, MR, NV, 2, PF>(acc, &px, c0, wc, w_c),
                                    _ => chans::<V, MR, NV, 1, PF>(acc, &px, c0, wc, w_c),
                                }
                                c0 += chunk;
                            }
                        }
                    } else {
                        for ch in 0..cn {
                            let mut wv = [V::zero(); NV];
                            for j in 0..NV {
                                wv[j] = V::load(wp.add(j * V::L));
                            }
                            let off = ch as isize * d.x_c;
                            for p in 0..MR {
                                let xv = V::splat(px[p].offset(off));
                                for j in 0..NV {
                                    acc[p][j] = V::fma(xv, wv[j], acc[p][j]);
                                }
                            }
                            wp = wp.add(w_c);
                        }
                    }
                }
            }
        }
        *acc
    }
}

/// The reduction and epilogue of one conv tile (see [`conv_tile`]); `NV` vectors per pixel
/// (`NB·16 / V::L`).
///
/// # Safety
/// As [`conv_tile`]; inlined only into a function with `V`'s target feature.
#[inline(always)]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
unsafe fn conv_body<V: Simd, const MR: usize, const NV: usize>(
    d: &ConvTile,
    x: *const f32,
    w: *const f32,
    y: *mut f32,
    r: *const f32,
    rows: *const isize,
    cols: *const isize,
    ocb0: usize,
) {
    unsafe {
        // The prefetch is a type parameter, so neither variant tests it per step.
        let acc = if d.prefetch {
            reduce::<V, MR, NV, true>(d, x, w, rows, cols)
        } else {
            reduce::<V, MR, NV, false>(d, x, w, rows, cols)
        };
        // Epilogue. Vector `j` of a pixel covers channels `ocb0·16 + j·L ..`.
        let per_blk = 16 / V::L;
        for j in 0..NV {
            let ch0 = ocb0 * 16 + j * V::L;
            let s = if d.scale.is_null() { None } else { Some(V::load(d.scale.add(ch0))) };
            let t = if d.shift.is_null() { None } else { Some(V::load(d.shift.add(ch0))) };
            let valid = d.channels.saturating_sub(ch0).min(V::L);
            let off = (j / per_blk) as isize * d.y_blk + ((j % per_blk) * V::L) as isize;
            for p in 0..MR {
                finish(acc[p][j], (s, t), r, y, off + (p * 16) as isize, d.act, valid);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::jit::microkernel::simd::x86::{Ymm, Zmm};

    /// Instantiates the conv tiles of one ISA: `$name::<MR, NV>` with `NV` vectors per pixel.
    macro_rules! entry_points {
        ($feature:literal, $v:ty, $conv:ident) => {
            /// # Safety
            /// The CPU has the feature; arguments as for [`super::conv_tile`].
            #[target_feature(enable = $feature)]
            #[allow(clippy::too_many_arguments)]
            pub unsafe fn $conv<const MR: usize, const NV: usize>(
                d: &super::ConvTile,
                x: *const f32,
                w: *const f32,
                y: *mut f32,
                r: *const f32,
                rows: *const isize,
                cols: *const isize,
                ocb0: usize,
                count: usize,
            ) {
                for i in 0..count {
                    // Tile `i` of a run along the row: `MR` pixels further.
                    unsafe {
                        let x = x.offset((i * MR) as isize * d.x_px);
                        let (y, r) = (y.add(i * MR * 16), if r.is_null() { r } else { r.add(i * MR * 16) });
                        super::conv_body::<$v, MR, NV>(d, x, w, y, r, rows, cols, ocb0)
                    }
                }
            }
        };
    }

    entry_points!("avx512f", Zmm, conv512);
    entry_points!("avx2,fma", Ymm, conv256);
}

/// Computes `count` conv tiles side by side along an output row, each `mr` output pixels ×
/// `nb` blocks of 16 output channels (tile `i` starts `i·mr` pixels after the first).
///
/// - `x`: the input of this sample, offset to the first pixel's column base (the element a
///   table offset of 0 would name for channel 0 of block 0);
/// - `w`: the packed weights of this channel group (`nb` blocks);
/// - `y`: the output at block `ocb0`, the first pixel; `r`: the residual at the same place,
///   or null;
/// - `rows`: `[khn, kh0, off_0 … off_{khn−1}]` — how many kernel rows to sum, the first
///   one's index (its weights are the first used), and each row's input offset; `cols`
///   likewise for the kernel columns (`[kwn, kw0, off …]`), the offsets relative to a
///   pixel's base (`x + p·x_px` for pixel `p`).
///
/// # Safety
/// `d.isa` is available on the host; every address the tables and strides name is inside
/// the input, weights, output and residual buffers; `1 ≤ mr ≤ isa.conv_mr(nb)` and
/// `1 ≤ nb ≤ isa.conv_nb()`.
#[allow(clippy::too_many_arguments)]
pub(in crate::jit) unsafe extern "C" fn conv_tile(
    d: *const ConvTile,
    x: *const f32,
    w: *const f32,
    y: *mut f32,
    r: *const f32,
    rows: *const isize,
    cols: *const isize,
    shape: usize,
) {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        use x86::{conv256, conv512};
        let d = &*d;
        let (mr, nb, count, ocb0) = (shape & 0xff, (shape >> 8) & 0xff, (shape >> 16) & 0xffff, shape >> 32);
        debug_assert!((1..=d.isa.conv_nb()).contains(&nb) && (1..=d.isa.conv_mr(nb)).contains(&mr));
        match (d.isa, nb) {
            (Isa::Avx512, 4) => by_mr!(conv512, 4, mr, (d, x, w, y, r, rows, cols, ocb0, count); 1 2 3 4 5 6),
            (Isa::Avx512, 3) => by_mr!(conv512, 3, mr, (d, x, w, y, r, rows, cols, ocb0, count); 1 2 3 4 5 6 7 8),
            (Isa::Avx512, 2) => {
                by_mr!(conv512, 2, mr, (d, x, w, y, r, rows, cols, ocb0, count); 1 2 3 4 5 6 7 8 9 10 11 12)
            }
            (Isa::Avx512, _) => {
                by_mr!(conv512, 1, mr, (d, x, w, y, r, rows, cols, ocb0, count); 1 2 3 4 5 6 7 8 9 10 11 12 13 14)
            }
            (Isa::Avx2, _) => by_mr!(conv256, 2, mr, (d, x, w, y, r, rows, cols, ocb0, count); 1 2 3 4 5 6),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (d, x, w, y, r, rows, cols, shape);
        unreachable!("no micro-kernel ISA is detected off x86-64")
    }
}

/// Packs `(mr, nb, count, ocb0)` into the `shape` argument of [`conv_tile`] (`count <
/// 2¹⁶`).
pub(in crate::jit) fn conv_shape(mr: usize, nb: usize, count: usize, ocb0: usize) -> i64 {
    debug_assert!(count < 1 << 16);
    (mr | (nb << 8) | (count << 16) | (ocb0 << 32)) as i64
}
