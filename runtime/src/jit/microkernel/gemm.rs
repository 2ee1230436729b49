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
    /// Per-column `scale` and `shift` (padded to whole tiles), or null.
    pub scale: *const f32,
    pub shift: *const f32,
    pub act: Act,
}

// SAFETY: as for `ConvTile`.
unsafe impl Send for GemmTile {}
// SAFETY: as for `ConvTile`.
unsafe impl Sync for GemmTile {}

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
        let mut rows = [a; MR];
        for i in 1..MR {
            rows[i] = rows[i - 1].add(d.lda);
        }
        let mut bp = b;
        for k in 0..kn {
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
            bp = bp.add(NV * V::L);
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
/// `d.isa` is available on the host; `a` holds `mr` rows of `K` at stride `lda`, `b` a
/// whole packed tile, `c` (and `r`, if not null) `mr` rows of `valid` at stride `ldc`;
/// `1 ≤ mr ≤ isa.gemm_mr()`; the scale/shift arrays are padded to whole tiles.
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
        debug_assert!((1..=d.isa.gemm_mr()).contains(&mr) && (1..=d.isa.gemm_nr()).contains(&valid));
        match (d.isa, valid.div_ceil(16)) {
            (Isa::Avx512, 1) => by_mr!(gemm512, 1, mr, (d, a, b, c, r, col0, valid, kspan); 1 2 3 4 5 6),
            (Isa::Avx512, 2) => by_mr!(gemm512, 2, mr, (d, a, b, c, r, col0, valid, kspan); 1 2 3 4 5 6),
            (Isa::Avx512, 3) => by_mr!(gemm512, 3, mr, (d, a, b, c, r, col0, valid, kspan); 1 2 3 4 5 6),
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
