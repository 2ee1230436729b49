//! The Winograd F(2×2, 3×3) and F(2×2, 5×5) unit ([`wino_unit`]): a few rows of 2×2
//! output tiles of a stride-1 3×3 or 5×5 convolution × `NB` blocks of 16 output channels,
//! in element-wise products of transformed tiles — 16 instead of 36 multiplications per 2×2
//! outputs and channel pair for 3×3 (2.25× fewer FMAs), 36 instead of 100 for 5×5 (2.78×).
//!
//! With `d` an `n×n` input patch (`n = k + 1`: rows `2i .. 2i + n`, columns `2t .. 2t + n`
//! of the zero-padded operand) and `g` a `k×k` kernel, the 2×2 outputs are (Lavin & Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2016; a correlation, as PyTorch's
//! conv):
//!
//! ```text
//! Y = Aᵀ [ Σ_c (G g_c Gᵀ) ⊙ (Bᵀ d_c B) ] A
//! F(2, 3), points 0, 1, −1, ∞:
//!   Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1]   G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1]
//!   Aᵀ = [1 1 1 0; 0 1 −1 −1]
//! F(2, 5), points 0, 1, −1, 2, −2, ∞ (the Bᵀ of F(4, 3), which has the same points):
//!   Bᵀ = [4 0 −5 0 1 0; 0 −4 −4 1 1 0; 0 4 −4 −1 1 0; 0 −2 −1 2 1 0; 0 2 −1 −2 1 0; 0 4 0 −5 0 1]
//!   G = [¼ 0 0 0 0; −⅙ −⅙ −⅙ −⅙ −⅙; −⅙ ⅙ −⅙ ⅙ −⅙; 1/24 1/12 ⅙ ⅓ ⅔; 1/24 −1/12 ⅙ −⅓ ⅔; 0 0 0 0 1]
//!   Aᵀ = [1 1 1 1 1 0; 0 1 −1 2 −2 1]
//! ```
//!
//! `U = G g Gᵀ` is computed once at compile time (in f64), packed per channel group as
//! `[ξ][c][NB·16]` for the `n²` positions `ξ` of the transform. A call handles one unit in
//! passes over the input channels (`Transform::PASS` at a time) and, within a pass, chunks
//! of `MR` tiles: the input transform of the chunk's patches (channels in the lanes, so
//! every add is a whole vector) into a scratch buffer `[ξ][tile][c]`, then for each `ξ` one
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
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(in crate::jit) struct WinoTile {
    pub isa: Isa,
    /// The kernel's size `k` (3 or 5): F(2×2, k×k).
    pub k: usize,
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

/// One Winograd algorithm F(2×2, k×k): its sizes and the transforms of one patch.
pub(super) trait Transform {
    /// The kernel's size `k`, the transform's `n = k + 1` and its `n²` positions.
    const K: usize;
    const N: usize;
    const P: usize = Self::N * Self::N;
    /// Input channels per pass of a unit's reduction: a channel group's transformed weights
    /// for one pass (`P · PASS · 64` floats) stay in L2 while every tile of the unit reads
    /// them.
    const PASS: usize;
    /// `Bᵀ d B` of an `n×n` patch (`d[row][column]`, rows and columns below `n`), the
    /// positions row-major.
    unsafe fn input<V: Simd>(d: &[[V; 6]; 6]) -> [V; 36];
    /// `Aᵀ m A` of an `n×n` product (row-major), row-major 2×2.
    unsafe fn output<V: Simd>(m: &[V; 36]) -> [V; 4];
}

/// F(2×2, 3×3).
pub(super) struct F23;
/// F(2×2, 5×5).
pub(super) struct F25;

/// `t = Bᵀ d` of one column (or `Bᵀ` applied to a row), for `T`.
#[inline(always)]
unsafe fn bt<V: Simd, T: Transform>(d: [V; 6]) -> [V; 6] {
    unsafe {
        if T::K == 3 {
            [V::sub(d[0], d[2]), V::add(d[1], d[2]), V::sub(d[2], d[1]), V::sub(d[1], d[3]), V::zero(), V::zero()]
        } else {
            let (c2, c4, c5) = (V::constant(2.0), V::constant(4.0), V::constant(-5.0));
            let s12 = V::add(d[1], d[2]);
            let d12 = V::sub(d[1], d[2]);
            let s34 = V::add(d[3], d[4]);
            let d43 = V::sub(d[4], d[3]);
            let d31 = V::sub(d[3], d[1]);
            let d42 = V::sub(d[4], d[2]);
            [
                V::fma(c4, d[0], V::fma(c5, d[2], d[4])),
                V::sub(s34, V::mul(c4, s12)),
                V::fma(c4, d12, d43),
                V::fma(c2, d31, d42),
                V::sub(d42, V::mul(c2, d31)),
                V::fma(c4, d[1], V::fma(c5, d[3], d[5])),
            ]
        }
    }
}

/// `Aᵀ m` of one column (or `Aᵀ` applied to a row) of products, for `T`.
#[inline(always)]
unsafe fn at<V: Simd, T: Transform>(m: [V; 6]) -> [V; 2] {
    unsafe {
        if T::K == 3 {
            [V::add(V::add(m[0], m[1]), m[2]), V::sub(V::sub(m[1], m[2]), m[3])]
        } else {
            let c2 = V::constant(2.0);
            [
                V::add(V::add(V::add(m[1], m[2]), V::add(m[3], m[4])), m[0]),
                V::fma(c2, V::sub(m[3], m[4]), V::add(V::sub(m[1], m[2]), m[5])),
            ]
        }
    }
}

/// Both transforms in two passes of the one-dimensional ones (columns, then rows).
macro_rules! transforms {
    ($t:ty, $k:literal, $pass:literal) => {
        impl Transform for $t {
            const K: usize = $k;
            const N: usize = $k + 1;
            const PASS: usize = $pass;
            #[inline(always)]
            unsafe fn input<V: Simd>(d: &[[V; 6]; 6]) -> [V; 36] {
                unsafe {
                    let n = Self::N;
                    let mut t = [[V::zero(); 6]; 6];
                    for c in 0..n {
                        let col = bt::<V, Self>(std::array::from_fn(|r| d[r][c]));
                        for r in 0..n {
                            t[r][c] = col[r];
                        }
                    }
                    let mut v = [V::zero(); 36];
                    for r in 0..n {
                        let row = bt::<V, Self>(t[r]);
                        v[n * r..n * r + n].copy_from_slice(&row[..n]);
                    }
                    v
                }
            }
            #[inline(always)]
            unsafe fn output<V: Simd>(m: &[V; 36]) -> [V; 4] {
                unsafe {
                    let n = Self::N;
                    let mut s = [[V::zero(); 6]; 2];
                    for c in 0..n {
                        let col = at::<V, Self>(std::array::from_fn(|r| if r < n { m[n * r + c] } else { V::zero() }));
                        s[0][c] = col[0];
                        s[1][c] = col[1];
                    }
                    let y0 = at::<V, Self>(s[0]);
                    let y1 = at::<V, Self>(s[1]);
                    [y0[0], y0[1], y1[0], y1[1]]
                }
            }
        }
    };
}

// 3×3: a pass's transformed weights for a group of 64 channels (`16 · 128 · 64` floats,
// 512 KB) stay in L2; with the whole reduction in one pass, 512-channel convs (2 MB of
// weights per group) ran at 0.56–0.89× the direct convolution, 64- and 128-channel ones at
// 1.53×. 5×5: 36 positions, so 64 channels (576 KB).
transforms!(F23, 3, 128);
transforms!(F25, 5, 64);

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
unsafe fn chunk<V: Simd, T: Transform, const M: usize, const NV: usize>(
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
        let side = T::N;
        let (b0, b1) = (pass.c0 / 16, (pass.c0 + T::PASS).min(d.c).div_ceil(16));
        let cp = (b1 - b0) * 16;
        let cn = (pass.c0 + T::PASS).min(d.c) - pass.c0;
        // Input transform.
        for p in 0..M {
            let q = q0 + p;
            let (n, r0, c0) = tile_at(d, pass.ti0, q);
            let rows_in = d.ih.saturating_sub(r0).min(side);
            let cols_in = d.iw.saturating_sub(c0).min(side);
            for b in b0..b1 {
                let xb = x.add(n * d.x_sample + b * d.x_icb + (r0 * d.iw + c0) * 16);
                for h in 0..per_blk {
                    let at = |rr: usize, cc: usize| xb.add((rr * d.iw + cc) * 16 + h * V::L);
                    let mut dv = [[V::zero(); 6]; 6];
                    if rows_in == side && cols_in == side {
                        for rr in 0..side {
                            for cc in 0..side {
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
                    let v = T::input(&dv);
                    for (k, vk) in v[..T::P].iter().enumerate() {
                        vk.store(vs.add((k * M + p) * cp + (b - b0) * 16 + h * V::L));
                    }
                }
            }
        }
        // The `n²` register tiles.
        let w = NV * V::L;
        for k in 0..T::P {
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
            let ahead = if k + 1 < T::P { d.c * w } else { 0 };
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
unsafe fn outputs<V: Simd, T: Transform, const NV: usize>(
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
                let mut m = [V::zero(); 36];
                for (k, mk) in m[..T::P].iter_mut().enumerate() {
                    *mk = V::load(ms.add((k * pass.tiles + q) * w + j * V::L));
                }
                let out = T::output(&m);
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

    /// Instantiates the Winograd chunks and output passes of one ISA: `$chunk::<T, M, NV>`,
    /// `$out::<T, NV>`.
    macro_rules! entry_points {
        ($feature:literal, $v:ty, $chunk:ident, $out:ident) => {
            /// # Safety
            /// The CPU has the feature; arguments as for [`super::chunk`].
            #[target_feature(enable = $feature)]
            pub unsafe fn $chunk<T: super::Transform, const M: usize, const NV: usize>(
                d: &super::WinoTile,
                x: *const f32,
                u: *const f32,
                pass: super::Pass,
                q0: usize,
                vs: *mut f32,
                ms: *mut f32,
            ) {
                unsafe { super::chunk::<$v, T, M, NV>(d, x, u, pass, q0, vs, ms) }
            }

            /// # Safety
            /// The CPU has the feature; arguments as for [`super::outputs`].
            #[target_feature(enable = $feature)]
            pub unsafe fn $out<T: super::Transform, const NV: usize>(
                d: &super::WinoTile,
                pass: super::Pass,
                ms: *const f32,
                y: *mut f32,
                r: *const f32,
                ocb0: usize,
            ) {
                unsafe { super::outputs::<$v, T, NV>(d, pass, ms, y, r, ocb0) }
            }
        };
    }

    entry_points!("avx512f", Zmm, wino512, out512);
    entry_points!("avx2,fma", Ymm, wino256, out256);
}

/// Computes one unit — tile rows `i .. i + d.rows` (fewer at the bottom), output rows `2i ..`;
/// or, with `samples > 1`, every tile of that many samples from `x` on — for one channel
/// group of `nb` blocks of 16 output channels: `shape` = `i | nb << 32 | samples << 36 |
/// ocb0 << 44`. The reduction runs in passes of input channels (`Transform::PASS`) over all
/// the unit's tiles, the products kept in a per-thread scratch buffer, then the output
/// transform.
///
/// - `x`: the (zero-padded) operand of this sample, blocked `[icb][ih][iw][16]`;
/// - `u`: the group's transformed weights, `[n²][c][nb·16]`;
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
    // SAFETY: as this function's.
    unsafe { if (*d).k == 5 { unit::<F25>(&*d, x, u, y, r, shape) } else { unit::<F23>(&*d, x, u, y, r, shape) } }
}

/// `by_mr!` with the transform as the first generic argument.
macro_rules! by_m {
    ($f:ident, $t:ty, $nv:literal, $mr:expr, $args:tt; $($m:literal)*) => {
        match $mr {
            $($m => $f::<$t, $m, $nv> $args,)*
            _ => {}
        }
    };
}

/// [`wino_unit`] for the transform `T`.
///
/// # Safety
/// As [`wino_unit`]'s.
#[allow(clippy::needless_return)]
unsafe fn unit<T: Transform>(d: &WinoTile, x: *const f32, u: *const f32, y: *mut f32, r: *const f32, shape: usize) {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        use x86::{out256, out512, wino256, wino512};
        let (ti0, nb, samples, ocb0) = (shape & 0xffff_ffff, (shape >> 32) & 0xf, (shape >> 36) & 0xff, shape >> 44);
        debug_assert!((1..=d.isa.conv_nb()).contains(&nb) && ti0 < d.th && samples >= 1 && d.k == T::K);
        let mr = wino_mr(d.isa, nb);
        // A unit of several samples starts at row 0 and has all their tiles.
        let tiles = if samples > 1 { samples * d.th * d.tw } else { d.rows.min(d.th - ti0) * d.tw };
        let vs_len = T::P * mr * T::PASS.min(d.icb * 16);
        let need = vs_len + T::P * tiles * nb * 16;
        let mut buf = SCRATCH.take();
        if buf.len() < need {
            buf.resize(need, 0.0);
        }
        let vs = buf.as_mut_ptr();
        let ms = vs.add(vs_len);
        for c0 in (0..d.c).step_by(T::PASS) {
            let pass = Pass { ti0, tiles, c0, first: c0 == 0 };
            let mut q0 = 0;
            while q0 < tiles {
                let m = mr.min(tiles - q0);
                match (d.isa, nb) {
                    (Isa::Avx512, 4) => by_m!(wino512, T, 4, m, (d, x, u, pass, q0, vs, ms); 1 2 3 4 5 6),
                    (Isa::Avx512, 3) => by_m!(wino512, T, 3, m, (d, x, u, pass, q0, vs, ms); 1 2 3 4 5 6 7 8),
                    (Isa::Avx512, 2) => {
                        by_m!(wino512, T, 2, m, (d, x, u, pass, q0, vs, ms); 1 2 3 4 5 6 7 8 9 10 11 12)
                    }
                    (Isa::Avx512, _) => {
                        by_m!(wino512, T, 1, m, (d, x, u, pass, q0, vs, ms); 1 2 3 4 5 6 7 8 9 10 11 12 13 14)
                    }
                    (Isa::Avx2, _) => by_m!(wino256, T, 2, m, (d, x, u, pass, q0, vs, ms); 1 2 3 4 5 6),
                }
                q0 += m;
            }
        }
        let pass = Pass { ti0, tiles, c0: 0, first: true };
        match (d.isa, nb) {
            (Isa::Avx512, 4) => out512::<T, 4>(d, pass, ms, y, r, ocb0),
            (Isa::Avx512, 3) => out512::<T, 3>(d, pass, ms, y, r, ocb0),
            (Isa::Avx512, 2) => out512::<T, 2>(d, pass, ms, y, r, ocb0),
            (Isa::Avx512, _) => out512::<T, 1>(d, pass, ms, y, r, ocb0),
            (Isa::Avx2, _) => out256::<T, 2>(d, pass, ms, y, r, ocb0),
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

/// `G` of F(2×2, 3×3) (4 × 3) and of F(2×2, 5×5) (6 × 5), row-major.
pub(super) const G3: [f64; 12] = [1.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, -0.5, 0.5, 0.0, 0.0, 1.0];
#[rustfmt::skip]
pub(super) const G5: [f64; 30] = [
    1.0 / 4.0, 0.0, 0.0, 0.0, 0.0,
    -1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0,
    -1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0,
    1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0, 1.0 / 3.0, 2.0 / 3.0,
    1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0, -1.0 / 3.0, 2.0 / 3.0,
    0.0, 0.0, 0.0, 0.0, 1.0,
];

/// `G g Gᵀ` of `n` `k×k` kernels side by side (`k` 3 or 5): `g[tap·n + j]` is tap `tap`
/// (row-major) of kernel `j`, `u[ξ·n + j]` position `ξ` (row-major `(k+1)×(k+1)`) of its
/// transform, in f64; each step runs over all `n` kernels at once. `n` is at most 64 (a
/// channel group's width).
pub(in crate::jit) fn weight_transform_rows(k: usize, g: &[f64], u: &mut [f64], n: usize, t: &mut Vec<f64>) {
    assert!(n <= 64, "at most 64 kernels at a time");
    let (gm, m) = match k {
        3 => (&G3[..], 4),
        5 => (&G5[..], 6),
        _ => panic!("no Winograd transform for {k}×{k} kernels"),
    };
    // t = G g: m rows × k columns, each a run of `n`, in the caller's scratch `t` (this runs
    // once per input channel and group of every pack, and a zeroed 15 KB array per call
    // cost more than the arithmetic; each run below is zeroed before it is summed into).
    if t.len() < m * k * n {
        t.resize(m * k * n, 0.0);
    }
    // `dst = Σ_a coeffs[a] · src[a·stride..][..n]` over the nonzero coefficients.
    let combine = |dst: &mut [f64], coeffs: &[f64], src: &[f64], stride: usize| {
        dst.fill(0.0);
        for (a, &f) in coeffs.iter().enumerate().filter(|(_, f)| **f != 0.0) {
            for (d, s) in dst.iter_mut().zip(&src[a * stride..][..n]) {
                *d += f * s;
            }
        }
    };
    for row in 0..m {
        for col in 0..k {
            combine(&mut t[(row * k + col) * n..][..n], &gm[row * k..][..k], &g[col * n..], k * n);
        }
    }
    // u = t Gᵀ: each row of t transformed the same way.
    for row in 0..m {
        for col in 0..m {
            combine(&mut u[(row * m + col) * n..][..n], &gm[col * k..][..k], &t[row * k * n..], n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::weight_transform_rows;

    /// `y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A` for one `n×n` patch `d` (row-major) and `k×k` kernel
    /// `g`, in f64, with the module's matrices.
    fn winograd(k: usize, bt: &[&[f64]], at: &[&[f64]], d: &[f64], g: &[f64]) -> [f64; 4] {
        let n = k + 1;
        let mut u = vec![0.0; n * n];
        weight_transform_rows(k, g, &mut u, 1, &mut vec![]);
        let v = |i: usize, j: usize| -> f64 {
            (0..n).flat_map(|a| (0..n).map(move |b| (a, b))).map(|(a, b)| bt[i][a] * d[n * a + b] * bt[j][b]).sum()
        };
        std::array::from_fn(|o| {
            let (a, b) = (o / 2, o % 2);
            (0..n)
                .flat_map(|i| (0..n).map(move |j| (i, j)))
                .map(|(i, j)| at[a][i] * u[n * i + j] * v(i, j) * at[b][j])
                .sum()
        })
    }

    /// The direct 2×2 correlation of the same patch.
    fn direct(k: usize, d: &[f64], g: &[f64]) -> [f64; 4] {
        let n = k + 1;
        std::array::from_fn(|o| {
            let (a, b) = (o / 2, o % 2);
            (0..k).flat_map(|i| (0..k).map(move |j| (i, j))).map(|(i, j)| d[n * (a + i) + b + j] * g[k * i + j]).sum()
        })
    }

    /// F(2, 3) and F(2, 5) in one dimension twice: the transforms reproduce a direct 2×2
    /// correlation, in f64.
    #[test]
    fn transforms_compute_the_correlation() {
        let bt3: [&[f64]; 4] =
            [&[1.0, 0.0, -1.0, 0.0], &[0.0, 1.0, 1.0, 0.0], &[0.0, -1.0, 1.0, 0.0], &[0.0, 1.0, 0.0, -1.0]];
        let at3: [&[f64]; 2] = [&[1.0, 1.0, 1.0, 0.0], &[0.0, 1.0, -1.0, -1.0]];
        let bt5: [&[f64]; 6] = [
            &[4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
            &[0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
            &[0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
            &[0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
            &[0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
            &[0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
        ];
        let at5: [&[f64]; 2] = [&[1.0, 1.0, 1.0, 1.0, 1.0, 0.0], &[0.0, 1.0, -1.0, 2.0, -2.0, 1.0]];
        for (k, bt, at) in [(3, &bt3[..], &at3[..]), (5, &bt5[..], &at5[..])] {
            let n = k + 1;
            let d: Vec<f64> = (0..n * n).map(|i| ((i * 7 % 11) as f64 - 5.0) / 3.0).collect();
            let g: Vec<f64> = (0..k * k).map(|i| ((i * 5 % 7) as f64 - 3.0) / 2.0).collect();
            let (w, e) = (winograd(k, bt, at, &d, &g), direct(k, &d, &g));
            for o in 0..4 {
                assert!((w[o] - e[o]).abs() < 1e-12, "F(2, {k}) output {o}: {} vs {}", w[o], e[o]);
            }
        }
    }
}
