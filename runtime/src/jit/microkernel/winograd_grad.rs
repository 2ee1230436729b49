//! The Winograd weight gradient of a stride-1, single-group 3×3 or 5×5 convolution
//! ([`wino_wgrad`]): `dW` of one group of output channels, summed over every sample.
//!
//! The forward 2×2 output tile is `Y = Aᵀ [U ⊙ V] A` with `U = G g Gᵀ` and `V = Bᵀ d B`
//! (see [`super::winograd`]), so the gradient of `g` is
//!
//! ```text
//! ∂L/∂g = Gᵀ [ Σ_tiles (A ∂Y Aᵀ) ⊙ (Bᵀ d B) ] G
//! ```
//!
//! — per transform position `ξ` one product summed over tiles, `M_ξ[o][i] = Σ_t D_ξ[t][o] ·
//! V_ξ[t][i]`: `n²` GEMMs whose reduction runs over the tiles of every sample, 2.25× (3×3)
//! or 2.78× (5×5) fewer FMAs than the direct reduction over pixels and taps. Per sample,
//! the input is copied to a zero-padded blocked plane and the group's output gradient to a
//! blocked plane of whole 2×2 tiles (zeros past the map), both read by every tile without
//! bounds checks; per chunk of tiles, the input transform (channels in the lanes, as the
//! forward) and the output-gradient transform go to scratch, then each position's register
//! tile (`MR` output channels × `NV` vectors of input channels, reduced over the chunk's
//! tiles) adds into `M`. After the last sample, `Gᵀ M G` (input channels in the lanes) is
//! stored as the gradient `[o][i][k][k]`.

use super::isa::Isa;
use super::simd::Simd;
use super::winograd::{F23, F25, G3, G5, Transform, wino_mr};

/// Constants of one Winograd weight gradient, built at compile time and owned by the
/// model. Sizes and offsets in floats.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(in crate::jit) struct WgradTile {
    pub isa: Isa,
    /// The kernel's size (3 or 5).
    pub k: usize,
    /// Input channels, their blocks of 16, the input plane and its top and left padding.
    pub c: usize,
    pub icb: usize,
    pub h: usize,
    pub w: usize,
    pub pt: usize,
    pub pl: usize,
    /// Output channels and the output plane; rows and columns of 2×2 tiles.
    pub oc: usize,
    pub oh: usize,
    pub ow: usize,
    pub th: usize,
    pub tw: usize,
    /// The scratch regions (see [`WgradScratch`]).
    pub s: WgradScratch,
    /// Whether `dy` is blocked, `[⌈oc/16⌉][oh][ow][16]` per sample, instead of plain.
    pub dy_blocked: bool,
    /// Whether `x` is blocked, `[icb][h][w][16]` per sample, instead of plain.
    pub x_blocked: bool,
}

/// Tiles per chunk where a sample has at least this many: the transformed inputs and
/// gradients of a chunk (`n² · 64 · (C + 64)` floats) are what each position's register
/// tiles read.
pub(in crate::jit) const CHUNK_TILES: usize = 64;

/// Tiles per chunk of whole samples, where a sample has fewer than [`CHUNK_TILES`]: each
/// register tile adds a chunk's sum into `M`, so a chunk of one small sample would move `M`
/// in and out of cache for a few tiles' work (ResNet's 12×12 maps, 36 tiles: no faster
/// than the GEMM form that way).
const SAMPLES_CHUNK_TILES: usize = 128;

/// Samples per chunk and the most tiles a chunk has, for an `oh × ow` output.
pub(in crate::jit) fn chunking(oh: usize, ow: usize) -> (usize, usize) {
    let tiles = oh.div_ceil(2) * ow.div_ceil(2);
    if tiles >= CHUNK_TILES {
        (1, CHUNK_TILES)
    } else {
        let spc = SAMPLES_CHUNK_TILES.div_ceil(tiles.max(1));
        (spc, spc * tiles)
    }
}

/// Where the scratch regions of one call lie (floats from the scratch's start): the padded
/// blocked input sample, the blocked output-gradient group, the chunk's transformed inputs
/// and gradients, the products `M`; and the whole size.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(in crate::jit) struct WgradScratch {
    pub xb: usize,
    pub yb: usize,
    pub v: usize,
    pub dt: usize,
    pub m: usize,
    pub total: usize,
}

impl WgradScratch {
    /// The layout for a `k×k` convolution of `c` input channels on an `h × w` plane giving
    /// `oh × ow` (one group of at most 64 output channels at a time).
    pub(in crate::jit) fn new(k: usize, c: usize, (h, w): (usize, usize), (oh, ow): (usize, usize)) -> WgradScratch {
        let _ = (h, w);
        let n = k + 1;
        let (th, tw) = (oh.div_ceil(2), ow.div_ceil(2));
        let (spc, ch) = chunking(oh, ow);
        let cp = c.div_ceil(16) * 16;
        let al = |x: usize| x.next_multiple_of(16);
        let xb = 0;
        let yb = xb + al(spc * cp * (2 * th + k - 1) * (2 * tw + k - 1));
        let v = yb + al(spc * 64 * 4 * th * tw);
        let dt = v + al(n * n * ch * cp);
        let m = dt + al(n * n * ch * 64);
        let total = m + al(n * n * 64 * cp);
        WgradScratch { xb, yb, v, dt, m, total }
    }
}

/// `(y0, y1) ↦ A (y0, y1)` for `T`: the output gradient's transform along one axis.
#[inline(always)]
unsafe fn a_col<V: Simd, T: Transform>(y0: V, y1: V) -> [V; 6] {
    unsafe {
        let z = V::zero();
        if T::K == 3 {
            [y0, V::add(y0, y1), V::sub(y0, y1), V::sub(z, y1), z, z]
        } else {
            let two = V::add(y1, y1);
            [y0, V::add(y0, y1), V::sub(y0, y1), V::add(y0, two), V::sub(y0, two), y1]
        }
    }
}

/// `A ∂Y Aᵀ` of a 2×2 output-gradient tile (`y[row][column]`), the positions row-major.
#[inline(always)]
unsafe fn grad_transform<V: Simd, T: Transform>(y: [[V; 2]; 2]) -> [V; 36] {
    unsafe {
        let n = T::N;
        // Along the rows: each of the two rows becomes `n` values.
        let r0 = a_col::<V, T>(y[0][0], y[0][1]);
        let r1 = a_col::<V, T>(y[1][0], y[1][1]);
        let mut out = [V::zero(); 36];
        for c in 0..n {
            let col = a_col::<V, T>(r0[c], r1[c]);
            for r in 0..n {
                out[r * n + c] = col[r];
            }
        }
        out
    }
}

/// One group's gradient (see [`wino_wgrad`]), for the transform `T` on vectors `V`.
///
/// # Safety
/// As [`wino_wgrad`]; inlined only into a function with `V`'s target feature.
#[inline(always)]
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
unsafe fn group<V: Simd, T: Transform, const NV: usize>(
    d: &WgradTile,
    x: *const f32,
    dy: *const f32,
    dw: *mut f32,
    scr: *mut f32,
    samples: usize,
    ocb0: usize,
    nb: usize,
) {
    unsafe {
        let (n, p, k) = (T::N, T::P, d.k);
        let per_blk = 16 / V::L;
        let cp = d.icb * 16;
        let (bh, bw) = (2 * d.th + k - 1, 2 * d.tw + k - 1);
        let (gh, gw) = (2 * d.th, 2 * d.tw);
        let width = nb * 16;
        let (xb, yb, vs, ds, ms) = (scr.add(d.s.xb), scr.add(d.s.yb), scr.add(d.s.v), scr.add(d.s.dt), scr.add(d.s.m));
        std::ptr::write_bytes(ms, 0, p * width * cp);
        let tiles = d.th * d.tw;
        let mr_max = wino_mr(d.isa, NV.div_ceil(per_blk).max(1));
        let (spc, ch) = chunking(d.oh, d.ow);
        let (x_plane, y_plane) = (cp * bh * bw, width * gh * gw);
        for s0 in (0..samples).step_by(spc) {
            let cnt = spc.min(samples - s0);
            for j in 0..cnt {
                // The input sample, blocked and zero-padded to whole patches.
                let xj = xb.add(j * x_plane);
                std::ptr::write_bytes(xj, 0, x_plane);
                if d.x_blocked {
                    // Already blocked: row by row (the padding lanes, finite, only meet
                    // gradient columns of channels that do not exist).
                    let xs = x.add((s0 + j) * d.icb * 16 * d.h * d.w);
                    for b in 0..d.icb {
                        for r in 0..d.h {
                            let src = xs.add((b * d.h + r) * d.w * 16);
                            let dst = xj.add((b * bh * bw + (r + d.pt) * bw + d.pl) * 16);
                            std::ptr::copy_nonoverlapping(src, dst, d.w * 16);
                        }
                    }
                }
                let xs = x.add((s0 + j) * d.c * d.h * d.w);
                for c in (0..d.c).filter(|_| !d.x_blocked) {
                    let plane = xs.add(c * d.h * d.w);
                    let dst = xj.add((c / 16) * bh * bw * 16 + c % 16);
                    for r in 0..d.h {
                        let row = dst.add(((r + d.pt) * bw + d.pl) * 16);
                        for col in 0..d.w {
                            *row.add(col * 16) = *plane.add(r * d.w + col);
                        }
                    }
                }
                // The group's output gradient, blocked, zeros past the map and the channels.
                let yj = yb.add(j * y_plane);
                std::ptr::write_bytes(yj, 0, y_plane);
                let valid = width.min(d.oc - ocb0 * 16);
                if d.dy_blocked {
                    // Already blocked: row by row, whole blocks but for the last one's
                    // padding lanes.
                    let ys = dy.add((s0 + j) * d.oc.div_ceil(16) * 16 * d.oh * d.ow);
                    for b in 0..valid.div_ceil(16) {
                        let lanes = (valid - 16 * b).min(16);
                        let src = ys.add((ocb0 + b) * d.oh * d.ow * 16);
                        let dst = yj.add(b * gh * gw * 16);
                        for r in 0..d.oh {
                            let (sr, dr) = (src.add(r * d.ow * 16), dst.add(r * gw * 16));
                            if lanes == 16 {
                                std::ptr::copy_nonoverlapping(sr, dr, d.ow * 16);
                            } else {
                                for col in 0..d.ow {
                                    std::ptr::copy_nonoverlapping(sr.add(col * 16), dr.add(col * 16), lanes);
                                }
                            }
                        }
                    }
                } else {
                    let ys = dy.add((s0 + j) * d.oc * d.oh * d.ow);
                    for o in 0..valid {
                        let plane = ys.add((ocb0 * 16 + o) * d.oh * d.ow);
                        let dst = yj.add((o / 16) * gh * gw * 16 + o % 16);
                        for r in 0..d.oh {
                            for col in 0..d.ow {
                                *dst.add((r * gw + col) * 16) = *plane.add(r * d.ow + col);
                            }
                        }
                    }
                }
            }
            let all = cnt * tiles;
            let mut q0 = 0;
            while q0 < all {
                let tc = ch.min(all - q0);
                // Transforms of the chunk's tiles: inputs `[ξ][t][cp]`, gradients `[ξ][t][width]`.
                for t in 0..tc {
                    let (j, q) = ((q0 + t) / tiles, (q0 + t) % tiles);
                    let (ti, tj) = (q / d.tw, q % d.tw);
                    for b in 0..d.icb {
                        let at = xb.add(j * x_plane + (b * bh * bw + 2 * ti * bw + 2 * tj) * 16);
                        for hh in 0..per_blk {
                            let mut dv = [[V::zero(); 6]; 6];
                            for rr in 0..n {
                                for cc in 0..n {
                                    dv[rr][cc] = V::load(at.add((rr * bw + cc) * 16 + hh * V::L));
                                }
                            }
                            let v = T::input(&dv);
                            for (xi, vx) in v[..p].iter().enumerate() {
                                vx.store(vs.add((xi * ch + t) * cp + b * 16 + hh * V::L));
                            }
                        }
                    }
                    for b in 0..nb {
                        let at = yb.add(j * y_plane + (b * gh * gw + 2 * ti * gw + 2 * tj) * 16);
                        for hh in 0..per_blk {
                            let ld = |r: usize, c: usize| V::load(at.add((r * gw + c) * 16 + hh * V::L));
                            let g = grad_transform::<V, T>([[ld(0, 0), ld(0, 1)], [ld(1, 0), ld(1, 1)]]);
                            for (xi, gx) in g[..p].iter().enumerate() {
                                gx.store(ds.add((xi * ch + t) * width + b * 16 + hh * V::L));
                            }
                        }
                    }
                }
                // Per position: `M[ξ][o][i] += Σ_t D[ξ][t][o] · V[ξ][t][i]`, `MR` output
                // channels × `NV` vectors of input channels per register tile.
                for xi in 0..p {
                    let vx = vs.add(xi * ch * cp);
                    let dx = ds.add(xi * ch * width);
                    let mx = ms.add(xi * width * cp);
                    let mut o0 = 0;
                    while o0 < width {
                        let m = mr_max.min(width - o0);
                        let mut i0 = 0;
                        while i0 < cp {
                            let nv = (NV * V::L).min(cp - i0) / V::L;
                            if nv == NV {
                                by_m_rows::<V, NV>(m, mx.add(o0 * cp + i0), cp, vx.add(i0), cp, dx.add(o0), width, tc);
                            } else {
                                for j in 0..nv {
                                    by_m_rows::<V, 1>(
                                        m,
                                        mx.add(o0 * cp + i0 + j * V::L),
                                        cp,
                                        vx.add(i0 + j * V::L),
                                        cp,
                                        dx.add(o0),
                                        width,
                                        tc,
                                    );
                                }
                            }
                            i0 += nv * V::L;
                        }
                        o0 += m;
                    }
                }
                q0 += tc;
            }
        }
        // `dW[o][i] = Gᵀ M[·][o][i] G`, input channels in the lanes, stored `[o][i][k][k]`.
        let g: &[f64] = if k == 3 { &G3 } else { &G5 };
        let gc = |r: usize, a: usize| g[r * k + a] as f32;
        for o in 0..width.min(d.oc - ocb0 * 16) {
            for i0 in (0..d.c).step_by(V::L) {
                let mut mv = [V::zero(); 36];
                for xi in 0..p {
                    mv[xi] = V::load(ms.add((xi * width + o) * cp + i0));
                }
                // t = Gᵀ M: k rows × n columns.
                let mut t = [V::zero(); 30];
                for a in 0..k {
                    for c in 0..n {
                        let mut acc = V::zero();
                        for r in 0..n {
                            let f = gc(r, a);
                            if f != 0.0 {
                                acc = V::fma(V::constant(f), mv[r * n + c], acc);
                            }
                        }
                        t[a * n + c] = acc;
                    }
                }
                let lanes = (d.c - i0).min(V::L);
                for a in 0..k {
                    for bcol in 0..k {
                        let mut acc = V::zero();
                        for c in 0..n {
                            let f = gc(c, bcol);
                            if f != 0.0 {
                                acc = V::fma(V::constant(f), t[a * n + c], acc);
                            }
                        }
                        let mut lane = [0f32; 16];
                        acc.store_first(lane.as_mut_ptr(), V::L);
                        for (l, v) in lane[..lanes].iter().enumerate() {
                            *dw.add(((ocb0 * 16 + o) * d.c + i0 + l) * k * k + a * k + bcol) = *v;
                        }
                    }
                }
            }
        }
    }
}

/// `m ≤ 14` rows of `M` (at `mo`, stride `ldm`) += `Σ_t D[t][r] · V[t][..NV·L]` over `tc`
/// tiles (`D` at `dx`, stride `ldd`; `V` at `vx`, stride `ldv`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn by_m_rows<V: Simd, const NV: usize>(
    m: usize,
    mo: *mut f32,
    ldm: usize,
    vx: *const f32,
    ldv: usize,
    dx: *const f32,
    ldd: usize,
    tc: usize,
) {
    unsafe {
        macro_rules! rows {
            ($($r:literal)*) => {
                match m {
                    $($r => rows::<V, $r, NV>(mo, ldm, vx, ldv, dx, ldd, tc),)*
                    _ => unreachable!("at most 14 rows"),
                }
            };
        }
        rows!(1 2 3 4 5 6 7 8 9 10 11 12 13 14)
    }
}

/// The register tile of [`by_m_rows`] for `M` rows.
#[inline(always)]
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
unsafe fn rows<V: Simd, const M: usize, const NV: usize>(
    mo: *mut f32,
    ldm: usize,
    vx: *const f32,
    ldv: usize,
    dx: *const f32,
    ldd: usize,
    tc: usize,
) {
    unsafe {
        let mut acc = [[V::zero(); NV]; M];
        for r in 0..M {
            for j in 0..NV {
                acc[r][j] = V::load(mo.add(r * ldm + j * V::L));
            }
        }
        let (mut vp, mut dp) = (vx, dx);
        for _ in 0..tc {
            let mut wv = [V::zero(); NV];
            for j in 0..NV {
                wv[j] = V::load(vp.add(j * V::L));
            }
            for r in 0..M {
                let b = V::splat(dp.add(r));
                for j in 0..NV {
                    acc[r][j] = V::fma(b, wv[j], acc[r][j]);
                }
            }
            vp = vp.add(ldv);
            dp = dp.add(ldd);
        }
        for r in 0..M {
            for j in 0..NV {
                acc[r][j].store(mo.add(r * ldm + j * V::L));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::jit::microkernel::simd::x86::{Ymm, Zmm};

    /// # Safety
    /// The CPU has AVX-512F; arguments as for [`super::group`].
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn group512<T: super::Transform>(
        d: &super::WgradTile,
        x: *const f32,
        dy: *const f32,
        dw: *mut f32,
        scr: *mut f32,
        samples: usize,
        ocb0: usize,
        nb: usize,
    ) {
        // Four vectors of input channels per register tile, or what the channels fill.
        unsafe {
            match d.icb {
                1 => super::group::<Zmm, T, 1>(d, x, dy, dw, scr, samples, ocb0, nb),
                2 => super::group::<Zmm, T, 2>(d, x, dy, dw, scr, samples, ocb0, nb),
                3 => super::group::<Zmm, T, 3>(d, x, dy, dw, scr, samples, ocb0, nb),
                _ => super::group::<Zmm, T, 4>(d, x, dy, dw, scr, samples, ocb0, nb),
            }
        }
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; arguments as for [`super::group`].
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn group256<T: super::Transform>(
        d: &super::WgradTile,
        x: *const f32,
        dy: *const f32,
        dw: *mut f32,
        scr: *mut f32,
        samples: usize,
        ocb0: usize,
        nb: usize,
    ) {
        unsafe { super::group::<Ymm, T, 2>(d, x, dy, dw, scr, samples, ocb0, nb) }
    }
}

/// The weight gradient `dW[o][i][k][k]` of output channels `16·ocb0 ..` (`nb` blocks of 16,
/// fewer where the channels end) of a stride-1, dilation-1, single-group `k×k` conv,
/// summed over `samples` samples: `shape` = `samples | ocb0 << 24 | nb << 44`.
///
/// - `x`: the input, plain `[samples][c][h][w]`; `dy`: the output gradient, plain (or blocked: `WgradTile::dy_blocked`)
///   `[samples][oc][oh][ow]`;
/// - `dw`: the gradient, `[oc][c][k][k]` (only this group's rows are written);
/// - `scr`: `d.s.total` floats of this call's own scratch.
///
/// # Safety
/// `d.isa` is available on the host; the pointers hold what is said above; `1 ≤ nb ≤ 4`,
/// `16·ocb0 < oc`.
pub(in crate::jit) unsafe extern "C" fn wino_wgrad(
    d: *const WgradTile,
    x: *const f32,
    dy: *const f32,
    dw: *mut f32,
    scr: *mut f32,
    shape: usize,
) {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        use x86::{group256, group512};
        let d = &*d;
        let (samples, ocb0, nb) = (shape & 0xff_ffff, (shape >> 24) & 0xf_ffff, shape >> 44);
        debug_assert!((1..=4).contains(&nb) && ocb0 * 16 < d.oc);
        match (d.isa, d.k) {
            (Isa::Avx512, 5) => group512::<F25>(d, x, dy, dw, scr, samples, ocb0, nb),
            (Isa::Avx512, _) => group512::<F23>(d, x, dy, dw, scr, samples, ocb0, nb),
            (Isa::Avx2, 5) => group256::<F25>(d, x, dy, dw, scr, samples, ocb0, nb),
            (Isa::Avx2, _) => group256::<F23>(d, x, dy, dw, scr, samples, ocb0, nb),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (d, x, dy, dw, scr, shape);
        unreachable!("no micro-kernel ISA is detected off x86-64")
    }
}

/// Packs `(samples, ocb0, nb)` into the `shape` argument of [`wino_wgrad`].
pub(in crate::jit) fn wgrad_shape(samples: usize, ocb0: usize, nb: usize) -> i64 {
    debug_assert!(samples < 1 << 24 && ocb0 < 1 << 20 && (1..=4).contains(&nb));
    (samples | (ocb0 << 24) | (nb << 44)) as i64
}
