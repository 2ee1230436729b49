//! The Winograd F(2×2, 3×3) unit ([`wino_unit`]): a few rows of 2×2 output tiles of a
//! stride-1 3×3 convolution × `NB` blocks of 16 output channels, in 16 element-wise
//! products of transformed tiles instead of 36 multiplications per 2×2 outputs and channel
//! pair (2.25× fewer FMAs).
//!
//! With `d` a 4×4 input patch (rows `2i .. 2i + 4`, columns `2t .. 2t + 4` of the
//! zero-padded operand) and `g` a 3×3 kernel, the 2×2 outputs are (Lavin & Gray, "Fast
//! Algorithms for Convolutional Neural Networks", 2016; a correlation, as PyTorch's conv):
//!
//! ```text
//! Y = Aᵀ [ Σ_c (G g_c Gᵀ) ⊙ (Bᵀ d_c B) ] A
//! Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1]   G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1]
//! Aᵀ = [1 1 1 0; 0 1 −1 −1]
//! ```
//!
//! `U = G g Gᵀ` is computed once at compile time (in f64), packed per channel group as
//! `[ξ][c][NB·16]` for the 16 positions `ξ` of the 4×4 transform. A call handles one unit in
//! passes over the input channels ([`PASS_CHANNELS`] at a time) and, within a pass, chunks of
//! `MR` tiles: the input transform of the chunk's patches (channels in the lanes, so every
//! add is a whole vector) into a scratch buffer `[ξ][tile][c]`, then for each `ξ` one
//! register tile, `MR` tiles × `NB` blocks reduced over the pass's channels — the direct
//! conv tile's inner loop (one broadcast, `NB` weight vectors, `MR·NB` FMAs per step) —
//! added to the unit's products. After the last pass, the output transform with the fused
//! epilogue (scale and shift, residual, activation, zero padding lanes) and the stores.
//! Patches reaching past the operand (an odd output size) read zeros there.

use super::epilogue::{Act, finish};
use super::isa::Isa;
use super::simd::Simd;
use std::cell::Cell;

/// Constants of one Winograd convolution's units, built at compile time and owned by the
/// model. Sizes and strides in elements.
#[derive(Debug)]
#[repr(C)]
pub(in crate::jit) struct WinoTile {
    pub isa: Isa,
    /// Input channels summed (the operand's real channels) and its blocks of 16.
    pub c: usize,
    pub icb: usize,
    /// The operand's plane (rows, columns; zero padding included) and the stride between
    /// its channel blocks.
    pub ih: usize,
    pub iw: usize,
    pub x_icb: usize,
    /// Output rows and columns; rows and columns of 2×2 tiles (`⌈oh / 2⌉`, `⌈ow / 2⌉`).
    pub oh: usize,
    pub ow: usize,
    pub th: usize,
    pub tw: usize,
    /// Tile rows per unit (the last unit of a sample may have fewer); on maps too small
    /// for that, the whole sample, and a unit has several samples.
    pub rows: usize,
    /// Floats per sample of the operand and of the output (a unit of several samples
    /// reaches the next one this far on).
    pub x_sample: usize,
    pub y_sample: usize,
    /// Output channels (lanes of the last block past them are set to zero).
    pub channels: usize,
    /// Per-channel `scale` and `shift` (padded to whole blocks), or null.
    pub scale: *const f32,
    pub shift: *const f32,
    pub act: Act,
}

// SAFETY: as for `ConvTile`: constant-pool addresses, never written after compilation.
unsafe impl Send for WinoTile {}
// SAFETY: as above.
unsafe impl Sync for WinoTile {}

/// Input channels per pass of a unit's reduction: a channel group's transformed weights
/// for one pass (`16 · 128 · 64` floats, 512 KB) stay in L2 while every tile of the unit
/// reads them. With the whole reduction in one pass, 512-channel convs (2 MB of weights per
/// group) ran at 0.56–0.89× the direct convolution; 64- and 128-channel ones at 1.53×.
pub(in crate::jit) const PASS_CHANNELS: usize = 128;

/// Most tiles per register tile for `nb` blocks on `isa`: the accumulators (`MR·NB`
/// vectors) leave room for the weights and one broadcast.
pub(in crate::jit) fn wino_mr(isa: Isa, nb: usize) -> usize {
    match (isa, nb) {
        (Isa::Avx512, 4) => 6,
        (Isa::Avx512, 3) => 8,
        (Isa::Avx512, 2) => 12,
        (Isa::Avx512, _) => 14,
        (Isa::Avx2, _) => 6,
    }
}

thread_local! {
    /// Each thread's transformed inputs and products (grown to the largest unit it ran).
    static SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// `Bᵀ x B` of a 4×4 patch, row-major.
#[inline(always)]
unsafe fn input_transform<V: Simd>(d: &[[V; 4]; 4]) -> [V; 16] {
    unsafe {
        let mut t = [[V::zero(); 4]; 4];
        for c in 0..4 {
            t[0][c] = V::sub(d[0][c], d[2][c]);
            t[1][c] = V::add(d[1][c], d[2][c]);
            t[2][c] = V::sub(d[2][c], d[1][c]);
            t[3][c] = V::sub(d[1][c], d[3][c]);
        }
        let mut v = [V::zero(); 16];
        for r in 0..4 {
            v[4 * r] = V::sub(t[r][0], t[r][2]);
            v[4 * r + 1] = V::add(t[r][1], t[r][2]);
            v[4 * r + 2] = V::sub(t[r][2], t[r][1]);
            v[4 * r + 3] = V::sub(t[r][1], t[r][3]);
        }
        v
    }
}

/// `Aᵀ m A` of a 4×4 product, row-major 2×2.
#[inline(always)]
unsafe fn output_transform<V: Simd>(m: &[V; 16]) -> [V; 4] {
    unsafe {
        let mut s = [[V::zero(); 4]; 2];
        for c in 0..4 {
            s[0][c] = V::add(V::add(m[c], m[4 + c]), m[8 + c]);
            s[1][c] = V::sub(V::sub(m[4 + c], m[8 + c]), m[12 + c]);
        }
        let mut y = [V::zero(); 4];
        for r in 0..2 {
            y[2 * r] = V::add(V::add(s[r][0], s[r][1]), s[r][2]);
            y[2 * r + 1] = V::sub(V::sub(s[r][1], s[r][2]), s[r][3]);
        }
        y
    }
}

/// Where tile `q` of a unit starting at tile row `ti0` lies: `(sample, row, column)` of its
/// top-left output, the sample relative to the unit's first (tiles run row by row, then on
/// into the next sample).
#[inline(always)]
fn tile_at(d: &WinoTile, ti0: usize, q: usize) -> (usize, usize, usize) {
    let at = ti0 * d.tw + q;
    let per = d.th * d.tw;
    let (n, t) = (at / per, at % per);
    (n, 2 * (t / d.tw), 2 * (t % d.tw))
}

/// Where one pass of a unit stands: the unit's first tile row and tile count, the pass's
/// first input channel, and whether it is the first pass (products start from zero).
#[derive(Clone, Copy)]
pub(super) struct Pass {
    ti0: usize,
    tiles: usize,
    c0: usize,
    first: bool,
}

/// Tiles `q0 .. q0 + M` of a unit (tile `q` is tile row `ti0 + q / tw`, column `q % tw`)
/// over one pass's input channels: their patches' transforms into `vs` (`[ξ][p][c]`, the
/// pass's blocks of 16), then for each `ξ` one register tile adding `Σ_c vs[ξ][p][c] ·
/// u[ξ][c]` to the products `ms` (`[ξ][q][NV·L]`).
///
/// # Safety
/// As [`wino_unit`]; inlined only into a function with `V`'s target feature.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn chunk<V: Simd, const M: usize, const NV: usize>(
    d: &WinoTile,
    x: *const f32,
    u: *const f32,
    pass: Pass,
    q0: usize,
    vs: *mut f32,
    ms: *mut f32,
) {
    unsafe {
        let per_blk = 16 / V::L;
        let (b0, b1) = (pass.c0 / 16, (pass.c0 + PASS_CHANNELS).min(d.c).div_ceil(16));
        let cp = (b1 - b0) * 16;
        let cn = (pass.c0 + PASS_CHANNELS).min(d.c) - pass.c0;
        // Input transform.
        for p in 0..M {
            let q = q0 + p;
            let (n, r0, c0) = tile_at(d, pass.ti0, q);
            let rows_in = d.ih.saturating_sub(r0).min(4);
            let cols_in = d.iw.saturating_sub(c0).min(4);
            for b in b0..b1 {
                let xb = x.add(n * d.x_sample + b * d.x_icb + (r0 * d.iw + c0) * 16);
                for h in 0..per_blk {
                    let at = |rr: usize, cc: usize| xb.add((rr * d.iw + cc) * 16 + h * V::L);
                    let mut dv = [[V::zero(); 4]; 4];
                    if rows_in == 4 && cols_in == 4 {
                        for rr in 0..4 {
                            for cc in 0..4 {
                                dv[rr][cc] = V::load(at(rr, cc));
                            }
                        }
                    } else {
                        for rr in 0..rows_in {
                            for cc in 0..cols_in {
                                dv[rr][cc] = V::load(at(rr, cc));
                            }
                        }
                    }
                    let v = input_transform(&dv);
                    for (k, vk) in v.iter().enumerate() {
                        vk.store(vs.add((k * M + p) * cp + (b - b0) * 16 + h * V::L));
                    }
                }
            }
        }
        // The 16 register tiles.
        let w = NV * V::L;
        for k in 0..16 {
            let mut acc = [[V::zero(); NV]; M];
            let out = ms.add((k * pass.tiles + q0) * w);
            if !pass.first {
                for p in 0..M {
                    for j in 0..NV {
                        acc[p][j] = V::load(out.add(p * w + j * V::L));
                    }
                }
            }
            let mut wp = u.add((k * d.c + pass.c0) * w);
            // The first chunk of a pass brings the pass's weights in: it fetches the next
            // position's rows as it reads this one's (the later chunks find them in L2).
            let ahead = if k < 15 { d.c * w } else { 0 };
            let mut px = [vs.add(k * M * cp) as *const f32; M];
            for p in 1..M {
                px[p] = px[p - 1].add(cp);
            }
            for _ in 0..cn {
                let mut wv = [V::zero(); NV];
                for j in 0..NV {
                    wv[j] = V::load(wp.add(j * V::L));
                    if q0 == 0 && ahead > 0 && (j * V::L) % 16 == 0 {
                        V::prefetch(wp.wrapping_add(ahead + j * V::L));
                    }
                }
                for p in 0..M {
                    let xv = V::splat(px[p]);
                    for j in 0..NV {
                        acc[p][j] = V::fma(xv, wv[j], acc[p][j]);
                    }
                    px[p] = px[p].add(1);
                }
                wp = wp.add(w);
            }
            for p in 0..M {
                for j in 0..NV {
                    acc[p][j].store(out.add(p * w + j * V::L));
                }
            }
        }
    }
}

/// The output transform of a unit's tiles from the products `ms`, with the epilogue, into
/// `y` (the sample's output at block `ocb0`), `r` the residual there or null.
///
/// # Safety
/// As [`wino_unit`]; inlined only into a function with `V`'s target feature.
#[inline(always)]
unsafe fn outputs<V: Simd, const NV: usize>(
    d: &WinoTile,
    pass: Pass,
    ms: *const f32,
    y: *mut f32,
    r: *const f32,
    ocb0: usize,
) {
    unsafe {
        let per_blk = 16 / V::L;
        let w = NV * V::L;
        let y_blk = d.oh * d.ow * 16;
        for j in 0..NV {
            let ch0 = ocb0 * 16 + j * V::L;
            let s = if d.scale.is_null() { None } else { Some(V::load(d.scale.add(ch0))) };
            let t = if d.shift.is_null() { None } else { Some(V::load(d.shift.add(ch0))) };
            let valid = d.channels.saturating_sub(ch0).min(V::L);
            let off = (j / per_blk) * y_blk + (j % per_blk) * V::L;
            for q in 0..pass.tiles {
                let mut m = [V::zero(); 16];
                for (k, mk) in m.iter_mut().enumerate() {
                    *mk = V::load(ms.add((k * pass.tiles + q) * w + j * V::L));
                }
                let out = output_transform(&m);
                let (n, r0, oc) = tile_at(d, pass.ti0, q);
                let rows_out = (d.oh - r0).min(2);
                let cols_out = (d.ow - oc).min(2);
                for a in 0..rows_out {
                    for bcol in 0..cols_out {
                        let o = n * d.y_sample + off + ((r0 + a) * d.ow + oc + bcol) * 16;
                        finish(out[2 * a + bcol], (s, t), r, y, o as isize, d.act, valid);
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::jit::microkernel::simd::x86::{Ymm, Zmm};

    /// Instantiates the Winograd chunks and output passes of one ISA: `$chunk::<M, NV>`,
    /// `$out::<NV>`.
    macro_rules! entry_points {
        ($feature:literal, $v:ty, $chunk:ident, $out:ident) => {
            /// # Safety
            /// The CPU has the feature; arguments as for [`super::chunk`].
            #[target_feature(enable = $feature)]
            pub unsafe fn $chunk<const M: usize, const NV: usize>(
                d: &super::WinoTile,
                x: *const f32,
                u: *const f32,
                pass: super::Pass,
                q0: usize,
                vs: *mut f32,
                ms: *mut f32,
            ) {
                unsafe { super::chunk::<$v, M, NV>(d, x, u, pass, q0, vs, ms) }
            }

            /// # Safety
            /// The CPU has the feature; arguments as for [`super::outputs`].
            #[target_feature(enable = $feature)]
            pub unsafe fn $out<const NV: usize>(
                d: &super::WinoTile,
                pass: super::Pass,
                ms: *const f32,
                y: *mut f32,
                r: *const f32,
                ocb0: usize,
            ) {
                unsafe { super::outputs::<$v, NV>(d, pass, ms, y, r, ocb0) }
            }
        };
    }

    entry_points!("avx512f", Zmm, wino512, out512);
    entry_points!("avx2,fma", Ymm, wino256, out256);
}

/// Computes one unit — tile rows `i .. i + d.rows` (fewer at the bottom), output rows `2i ..`;
/// or, with `samples > 1`, every tile of that many samples from `x` on — for one channel
/// group of `nb` blocks of 16 output channels: `shape` = `i | nb << 32 | samples << 36 |
/// ocb0 << 44`. The reduction runs in passes of [`PASS_CHANNELS`] input channels over all
/// the unit's tiles, the products kept in a per-thread scratch buffer, then the output
/// transform.
///
/// - `x`: the (zero-padded) operand of this sample, blocked `[icb][ih][iw][16]`;
/// - `u`: the group's transformed weights, `[16][c][nb·16]`;
/// - `y`: the output of this sample at block `ocb0` (row 0, column 0); `r`: the residual at
///   the same place, or null.
///
/// # Safety
/// `d.isa` is available on the host; `x` holds the whole operand, `u` the group's weights,
/// `y` (and `r`, if not null) `nb` blocks of `oh × ow` pixels `oh·ow·16` floats apart, for
/// each of the unit's samples (`x_sample`, `y_sample` floats apart); `i < d.th`, `1 ≤ nb ≤
/// isa.conv_nb()`.
pub(in crate::jit) unsafe extern "C" fn wino_unit(
    d: *const WinoTile,
    x: *const f32,
    u: *const f32,
    y: *mut f32,
    r: *const f32,
    shape: usize,
) {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        use x86::{out256, out512, wino256, wino512};
        let d = &*d;
        let (ti0, nb, samples, ocb0) = (shape & 0xffff_ffff, (shape >> 32) & 0xf, (shape >> 36) & 0xff, shape >> 44);
        debug_assert!((1..=d.isa.conv_nb()).contains(&nb) && ti0 < d.th && samples >= 1);
        let mr = wino_mr(d.isa, nb);
        // A unit of several samples starts at row 0 and has all their tiles.
        let tiles = if samples > 1 { samples * d.th * d.tw } else { d.rows.min(d.th - ti0) * d.tw };
        let vs_len = 16 * mr * PASS_CHANNELS.min(d.icb * 16);
        let need = vs_len + 16 * tiles * nb * 16;
        let mut buf = SCRATCH.take();
        if buf.len() < need {
            buf.resize(need, 0.0);
        }
        let vs = buf.as_mut_ptr();
        let ms = vs.add(vs_len);
        for c0 in (0..d.c).step_by(PASS_CHANNELS) {
            let pass = Pass { ti0, tiles, c0, first: c0 == 0 };
            let mut q0 = 0;
            while q0 < tiles {
                let m = mr.min(tiles - q0);
                match (d.isa, nb) {
                    (Isa::Avx512, 4) => by_mr!(wino512, 4, m, (d, x, u, pass, q0, vs, ms); 1 2 3 4 5 6),
                    (Isa::Avx512, 3) => by_mr!(wino512, 3, m, (d, x, u, pass, q0, vs, ms); 1 2 3 4 5 6 7 8),
                    (Isa::Avx512, 2) => {
                        by_mr!(wino512, 2, m, (d, x, u, pass, q0, vs, ms); 1 2 3 4 5 6 7 8 9 10 11 12)
                    }
                    (Isa::Avx512, _) => {
                        by_mr!(wino512, 1, m, (d, x, u, pass, q0, vs, ms); 1 2 3 4 5 6 7 8 9 10 11 12 13 14)
                    }
                    (Isa::Avx2, _) => by_mr!(wino256, 2, m, (d, x, u, pass, q0, vs, ms); 1 2 3 4 5 6),
                }
                q0 += m;
            }
        }
        let pass = Pass { ti0, tiles, c0: 0, first: true };
        match (d.isa, nb) {
            (Isa::Avx512, 4) => out512::<4>(d, pass, ms, y, r, ocb0),
            (Isa::Avx512, 3) => out512::<3>(d, pass, ms, y, r, ocb0),
            (Isa::Avx512, 2) => out512::<2>(d, pass, ms, y, r, ocb0),
            (Isa::Avx512, _) => out512::<1>(d, pass, ms, y, r, ocb0),
            (Isa::Avx2, _) => out256::<2>(d, pass, ms, y, r, ocb0),
        }
        SCRATCH.set(buf);
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (d, x, u, y, r, shape);
        unreachable!("no micro-kernel ISA is detected off x86-64")
    }
}

/// Packs `(first tile row, nb, samples, ocb0)` into the `shape` argument of [`wino_unit`]
/// (a tile row below 2³², `nb ≤ 4`, at most 255 samples — 0 where the generated code ors the
/// count in at run time —, a block index below 2²⁰).
pub(in crate::jit) fn wino_shape(ti: usize, nb: usize, samples: usize, ocb0: usize) -> i64 {
    debug_assert!(ti < 1 << 32 && (1..=4).contains(&nb) && samples < 256 && ocb0 < MAX_BLOCKS);
    (ti | (nb << 32) | (samples << 36) | (ocb0 << 44)) as i64
}

/// Output channel blocks a Winograd conv may have (the `shape` field's range).
pub(in crate::jit) const MAX_BLOCKS: usize = 1 << 20;

/// `G g Gᵀ` of `n` 3×3 kernels side by side: `g[tap·n + j]` is tap `tap` (row-major) of
/// kernel `j`, `u[ξ·n + j]` position `ξ` (row-major 4×4) of its transform, in f64. With
/// `G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1]`, one row (or column) `(a, b, c)` becomes
/// `(a, (a + b + c)/2, (a − b + c)/2, c)`; each step runs over all `n` kernels at once.
/// `n` is at most 64 (a channel group's width).
pub(in crate::jit) fn weight_transform_rows(g: &[f64], u: &mut [f64], n: usize) {
    assert!(n <= 64, "at most 64 kernels at a time");
    let g = |tap: usize| &g[tap * n..(tap + 1) * n];
    // t = G g: 4 rows × 3 columns, each a run of `n` (on the stack: this runs once per input
    // channel and group while compiling).
    let mut t = [0f64; 12 * 64];
    for col in 0..3 {
        let (a, b, c) = (g(col), g(3 + col), g(6 + col));
        for j in 0..n {
            t[col * n + j] = a[j];
            t[(3 + col) * n + j] = 0.5 * (a[j] + b[j] + c[j]);
            t[(6 + col) * n + j] = 0.5 * (a[j] - b[j] + c[j]);
            t[(9 + col) * n + j] = c[j];
        }
    }
    // u = t Gᵀ: each row of t transformed the same way.
    for row in 0..4 {
        let r = |c: usize| &t[(3 * row + c) * n..(3 * row + c + 1) * n];
        let (a, b, c) = (r(0), r(1), r(2));
        for j in 0..n {
            u[(4 * row) * n + j] = a[j];
            u[(4 * row + 1) * n + j] = 0.5 * (a[j] + b[j] + c[j]);
            u[(4 * row + 2) * n + j] = 0.5 * (a[j] - b[j] + c[j]);
            u[(4 * row + 3) * n + j] = c[j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::weight_transform_rows;

    /// F(2, 3) in one dimension twice: the transforms reproduce a direct 2×2 correlation
    /// of a 4×4 patch, in f64.
    #[test]
    fn transforms_compute_the_correlation() {
        let d: Vec<f64> = (0..16).map(|i| ((i * 7 % 11) as f64 - 5.0) / 3.0).collect();
        let g: [f64; 9] = std::array::from_fn(|i| ((i * 5 % 7) as f64 - 3.0) / 2.0);
        let bt = [[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, -1.0, 1.0, 0.0], [0.0, 1.0, 0.0, -1.0]];
        let at = [[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]];
        let mut v = [[0.0; 4]; 4];
        for i in 0..4 {
            for j in 0..4 {
                v[i][j] = (0..4)
                    .flat_map(|k| (0..4).map(move |l| (k, l)))
                    .map(|(k, l)| bt[i][k] * d[4 * k + l] * bt[j][l])
                    .sum();
            }
        }
        let mut u = [0.0; 16];
        weight_transform_rows(&g, &mut u, 1);
        for a in 0..2 {
            for b in 0..2 {
                let y: f64 = (0..4)
                    .flat_map(|k| (0..4).map(move |l| (k, l)))
                    .map(|(k, l)| at[a][k] * u[4 * k + l] * v[k][l] * at[b][l])
                    .sum();
                let direct: f64 = (0..3)
                    .flat_map(|k| (0..3).map(move |l| (k, l)))
                    .map(|(k, l)| d[4 * (a + k) + b + l] * g[3 * k + l])
                    .sum();
                assert!((y - direct).abs() < 1e-12, "({a}, {b}): {y} vs {direct}");
            }
        }
    }
}
