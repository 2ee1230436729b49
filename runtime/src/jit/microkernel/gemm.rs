//! The GEMM tile of Linear ([`gemm_tile`]): `MR` rows × `NV` vectors of columns of
//! `C = A·Bᵀ`, `B` packed, the epilogue applied in registers.

use super::epilogue::{Act, activate, affine};
use super::isa::Isa;
use super::simd::Simd;

/// Constants of one Linear's tiles.
#[derive(Debug)]
#[repr(C)]
pub(in crate::jit) struct GemmTile {
    pub isa: Isa,
    /// Reduction length.
    pub k: usize,
    /// Row strides of `A`, and of `C` (and the residual).
    pub lda: usize,
    pub ldc: usize,
    /// Rows of `A` in groups of `group` rows `lda` apart, group `g` starting `g·lda_group`
    /// floats after the first (0: every row `lda` after the last). The shifted-row weight
    /// gradient stacks several input rows' shifted taps into one taller tile so.
    pub group: usize,
    pub lda_group: usize,
    /// Per-column `scale` and `shift` (padded to whole tiles), or null.
    pub scale: *const f32,
    pub shift: *const f32,
    pub act: Act,
}

// SAFETY: as for `ConvTile`.
unsafe impl Send for GemmTile {}
// SAFETY: as for `ConvTile`.
unsafe impl Sync for GemmTile {}

/// Reduction step `k` of a tile: `B`'s row at `bp` times column `k` of the `A` rows.
///
/// # Safety
/// As [`gemm_body`], whose loop calls it (inlined, so it runs with the caller's target
/// feature — a closure would not inherit it).
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn gemm_step<V: Simd, const MR: usize, const NV: usize>(
    rows: &[*const f32; MR],
    k: usize,
    bp: *const f32,
    acc: &mut [[V; NV]; MR],
) {
    unsafe {
        let mut bv = [V::zero(); NV];
        for j in 0..NV {
            bv[j] = V::load(bp.add(j * V::L));
        }
        for i in 0..MR {
            let av = V::splat(rows[i].add(k));
            for j in 0..NV {
                acc[i][j] = V::fma(av, bv[j], acc[i][j]);
            }
        }
    }
}

/// One Linear tile and its epilogue (see [`gemm_tile`]).
///
/// # Safety
/// As [`gemm_tile`]; inlined only into a function with `V`'s target feature.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_body<V: Simd, const MR: usize, const NV: usize>(
    d: &GemmTile,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    r: *const f32,
    col0: usize,
    valid: usize,
    kspan: u64,
) {
    unsafe {
        let kn = ((kspan >> 32) & ((1 << 30) - 1)) as usize;
        let (first, last) = (kspan & (1 << 62) != 0, kspan & (1 << 63) != 0);
        let mut acc = [[V::zero(); NV]; MR];
        if !first {
            // The partial sums of the earlier chunks.
            for j in 0..NV {
                let n = valid.saturating_sub(j * V::L).min(V::L);
                for i in 0..MR {
                    if n == V::L {
                        acc[i][j] = V::load(c.add(i * d.ldc + j * V::L));
                    } else if n > 0 {
                        let mut tmp = [0f32; 16];
                        std::ptr::copy_nonoverlapping(c.add(i * d.ldc + j * V::L), tmp.as_mut_ptr(), n);
                        acc[i][j] = V::load(tmp.as_ptr());
                    }
                }
            }
        }
        // Row `i` is row `i mod group` of group `i / group` (all one group when `group` is 0).
        let mut rows = [a; MR];
        for (i, row) in rows.iter_mut().enumerate() {
            let (g, r) = i.checked_div(d.group).map_or((0, i), |g| (g, i - g * d.group));
            *row = a.add(g * d.lda_group + r * d.lda);
        }
        let mut bp = b;
        // Two reduction steps per iteration (half the loop's bookkeeping per FMA).
        let mut k = 0;
        while k + 2 <= kn {
            gemm_step::<V, MR, NV>(&rows, k, bp, &mut acc);
            gemm_step::<V, MR, NV>(&rows, k + 1, bp.add(NV * V::L), &mut acc);
            bp = bp.add(2 * NV * V::L);
            k += 2;
        }
        if k < kn {
            gemm_step::<V, MR, NV>(&rows, k, bp, &mut acc);
        }
        for j in 0..NV {
            let col = col0 + j * V::L;
            let s = if d.scale.is_null() { None } else { Some(V::load(d.scale.add(col))) };
            let t = if d.shift.is_null() { None } else { Some(V::load(d.shift.add(col))) };
            let n = valid.saturating_sub(j * V::L).min(V::L);
            if n == 0 {
                break;
            }
            for i in 0..MR {
                let mut v = acc[i][j];
                let o = i * d.ldc + j * V::L;
                if !last {
                    if n == V::L {
                        v.store(c.add(o));
                    } else {
                        v.store_first(c.add(o), n);
                    }
                    continue;
                }
                v = affine(v, s, t);
                if !r.is_null() {
                    // Only the valid lanes of the residual exist.
                    let res = if n == V::L { V::load(r.add(o)) } else { V::load_first(r.add(o), n) };
                    v = V::add(v, res);
                }
                v = activate(v, d.act);
                if n == V::L {
                    v.store(c.add(o));
                } else {
                    v.store_first(c.add(o), n);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::jit::microkernel::simd::x86::{Ymm, Zmm};

    /// Instantiates the Linear tiles of one ISA: `$name::<MR, NV>` with `NV` vectors per pixel.
    macro_rules! entry_points {
        ($feature:literal, $v:ty, $gemm:ident) => {
            /// # Safety
            /// The CPU has the feature; arguments as for [`super::gemm_tile`].
            #[target_feature(enable = $feature)]
            #[allow(clippy::too_many_arguments)]
            pub unsafe fn $gemm<const MR: usize, const NV: usize>(
                d: &super::GemmTile,
                a: *const f32,
                b: *const f32,
                c: *mut f32,
                r: *const f32,
                col0: usize,
                valid: usize,
                kspan: u64,
            ) {
                unsafe { super::gemm_body::<$v, MR, NV>(d, a, b, c, r, col0, valid, kspan) }
            }
        };
    }

    entry_points!("avx512f", Zmm, gemm512);
    entry_points!("avx2,fma", Ymm, gemm256);
}

/// Computes one Linear tile: rows `a .. a + mr·lda` of `A` times the packed column tile `b`
/// (`K × W`, `W` = `valid` rounded up to whole vectors, at most `isa.gemm_nr()`) into `c`
/// (stride `ldc`), columns `col0 .. col0 + valid` of the result (lanes past `valid` are
/// neither read from `r` nor stored). `kspan` = `k0 | kn << 32 | first << 62 | last <<
/// 63`: the tile sums reduction steps `k0 .. k0 + kn` (`a` and `b` already point at step
/// `k0`), starting from zero if `first`, else from the partial sums in `c`; only the
/// `last` chunk applies the epilogue, the others store their partial sums.
///
/// # Safety
/// `d.isa` is available on the host; `a` holds `mr` rows of `K` at stride `lda` (in groups
/// `lda_group` apart where `d.group` is not 0), `b` a
/// whole packed tile, `c` (and `r`, if not null) `mr` rows of `valid` at stride `ldc`;
/// `1 ≤ mr ≤ isa.gemm_mr_for(valid)`; the scale/shift arrays are padded to whole tiles.
pub(in crate::jit) unsafe extern "C" fn gemm_tile(
    d: *const GemmTile,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    r: *const f32,
    shape: usize,
    kspan: u64,
) {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        use x86::{gemm256, gemm512};
        let d = &*d;
        let (mr, valid, col0) = (shape & 0xff, (shape >> 8) & 0xff, shape >> 16);
        debug_assert!((1..=d.isa.gemm_nr()).contains(&valid) && (1..=d.isa.gemm_mr_for(valid)).contains(&mr));
        match (d.isa, valid.div_ceil(16)) {
            (Isa::Avx512, 1) => {
                by_mr!(gemm512, 1, mr, (d, a, b, c, r, col0, valid, kspan); 1 2 3 4 5 6 7 8 9 10 11 12)
            }
            (Isa::Avx512, 2) => {
                by_mr!(gemm512, 2, mr, (d, a, b, c, r, col0, valid, kspan); 1 2 3 4 5 6 7 8 9 10 11 12)
            }
            (Isa::Avx512, 3) => by_mr!(gemm512, 3, mr, (d, a, b, c, r, col0, valid, kspan); 1 2 3 4 5 6 7 8),
            (Isa::Avx512, _) => by_mr!(gemm512, 4, mr, (d, a, b, c, r, col0, valid, kspan); 1 2 3 4 5 6),
            (Isa::Avx2, _) if valid <= 8 => by_mr!(gemm256, 1, mr, (d, a, b, c, r, col0, valid, kspan); 1 2 3 4 5 6),
            (Isa::Avx2, _) => by_mr!(gemm256, 2, mr, (d, a, b, c, r, col0, valid, kspan); 1 2 3 4 5 6),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (d, a, b, c, r, shape, kspan);
        unreachable!("no micro-kernel ISA is detected off x86-64")
    }
}

/// Packing's transpose: `dst[to[q] + j] = rows[j·k + i0 + q]` for `j < valid`, `q <
/// to.len()` — columns `i0 ..` of `valid` rows of length `k`, each written as `valid`
/// consecutive floats at its own offset of `dst` (a GEMM tile's packed row). 8×8 blocks
/// go through AVX registers when the host has AVX, the edges one float at a time.
///
/// # Panics
/// If a column or a destination row is out of bounds (every index is checked up front).
pub(in crate::jit) fn transpose_columns(
    rows: &[f32],
    k: usize,
    valid: usize,
    i0: usize,
    dst: &mut [f32],
    to: &[usize],
) {
    let len = to.len();
    if valid == 0 || len == 0 {
        return;
    }
    assert!(i0 + len <= k && (valid - 1) * k + i0 + len <= rows.len(), "columns out of the rows");
    assert!(to.iter().all(|&d| d + valid <= dst.len()), "a destination row out of bounds");
    let (mut q0, mut j_done) = (0, 0);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: AVX is present; every 8×8 block read and written lies within the bounds
        // checked above (j0 + 8 ≤ valid, q0 + 8 ≤ len).
        unsafe { x86_transpose::blocks(rows.as_ptr(), k, valid, i0, dst.as_mut_ptr(), to) };
        (q0, j_done) = (len / 8 * 8, valid / 8 * 8);
    }
    // Edges (everything without AVX): the rows past the 8×8 blocks for the blocks'
    // columns, then every row for the remaining columns.
    for (q, &d) in to.iter().enumerate() {
        let from = if q < q0 { j_done } else { 0 };
        for j in from..valid {
            dst[d + j] = rows[j * k + i0 + q];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86_transpose {
    use std::arch::x86_64::*;

    /// The 8×8 blocks of [`super::transpose_columns`]: rows `0 .. valid / 8 · 8`, columns
    /// `0 .. to.len() / 8 · 8`.
    ///
    /// # Safety
    /// AVX is present; the bounds of [`super::transpose_columns`] hold.
    #[target_feature(enable = "avx")]
    pub unsafe fn blocks(rows: *const f32, k: usize, valid: usize, i0: usize, dst: *mut f32, to: &[usize]) {
        unsafe {
            for q0 in (0..to.len() / 8 * 8).step_by(8) {
                for j0 in (0..valid / 8 * 8).step_by(8) {
                    let r = |a: usize| _mm256_loadu_ps(rows.add((j0 + a) * k + i0 + q0));
                    let (r0, r1, r2, r3, r4, r5, r6, r7) = (r(0), r(1), r(2), r(3), r(4), r(5), r(6), r(7));
                    let t0 = _mm256_unpacklo_ps(r0, r1);
                    let t1 = _mm256_unpackhi_ps(r0, r1);
                    let t2 = _mm256_unpacklo_ps(r2, r3);
                    let t3 = _mm256_unpackhi_ps(r2, r3);
                    let t4 = _mm256_unpacklo_ps(r4, r5);
                    let t5 = _mm256_unpackhi_ps(r4, r5);
                    let t6 = _mm256_unpacklo_ps(r6, r7);
                    let t7 = _mm256_unpackhi_ps(r6, r7);
                    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                    let out = [
                        _mm256_permute2f128_ps::<0x20>(s0, s4),
                        _mm256_permute2f128_ps::<0x20>(s1, s5),
                        _mm256_permute2f128_ps::<0x20>(s2, s6),
                        _mm256_permute2f128_ps::<0x20>(s3, s7),
                        _mm256_permute2f128_ps::<0x31>(s0, s4),
                        _mm256_permute2f128_ps::<0x31>(s1, s5),
                        _mm256_permute2f128_ps::<0x31>(s2, s6),
                        _mm256_permute2f128_ps::<0x31>(s3, s7),
                    ];
                    for (b, v) in out.into_iter().enumerate() {
                        _mm256_storeu_ps(dst.add(to[q0 + b] + j0), v);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::transpose_columns;

    #[test]
    fn transpose_columns_matches_the_definition() {
        for (k, valid, i0, len) in [(40, 17, 3, 21), (64, 64, 0, 64), (9, 3, 1, 8), (100, 8, 92, 8), (5, 1, 4, 1)] {
            let rows: Vec<f32> = (0..valid * k).map(|i| i as f32 * 0.5 - 3.0).collect();
            // Destination rows permuted and spaced, with gaps that must stay untouched.
            let width = valid + 3;
            let to: Vec<usize> = (0..len).map(|q| ((q * 5) % len) * width + 1).collect();
            let mut dst = vec![f32::NAN; len * width + 4];
            transpose_columns(&rows, k, valid, i0, &mut dst, &to);
            for (q, &d) in to.iter().enumerate() {
                for j in 0..valid {
                    assert_eq!(dst[d + j], rows[j * k + i0 + q], "k {k} valid {valid} column {q} row {j}");
                }
            }
            let written: usize = dst.iter().filter(|v| !v.is_nan()).count();
            assert_eq!(written, valid * len, "nothing else written");
        }
    }
}
