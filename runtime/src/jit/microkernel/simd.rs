//! The vector abstraction the register tiles are written with ([`Simd`]) and its two x86
//! implementations (`Zmm`: AVX-512F, 16 lanes; `Ymm`: AVX2+FMA, 8 lanes). Every method is
//! `inline(always)` and only ever inlined into a tile entry point compiled with the
//! matching `target_feature`.

/// The vector operations the tiles are written with.
pub(super) trait Simd: Copy {
    /// Lanes per vector.
    const L: usize;
    unsafe fn zero() -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn splat(p: *const f32) -> Self;
    /// A hint to bring the cache line of `p` into L1; `p` need not be dereferenceable (a
    /// prefetch never faults).
    fn prefetch(p: *const f32);
    unsafe fn store(self, p: *mut f32);
    /// Stores the first `n < L` lanes.
    unsafe fn store_first(self, p: *mut f32, n: usize);
    /// Loads the first `n < L` lanes (the rest zero), reading only those.
    unsafe fn load_first(p: *const f32, n: usize) -> Self;
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self;
    unsafe fn add(a: Self, b: Self) -> Self;
    unsafe fn relu(self) -> Self;
    /// Lanes `n..` set to zero.
    unsafe fn keep_first(self, n: usize) -> Self;
    /// `maxps`: the second operand where either is NaN (pooling tracks NaNs separately).
    unsafe fn max(a: Self, b: Self) -> Self;
    unsafe fn div(a: Self, b: Self) -> Self;
    /// Lanes that are NaN, as a mask.
    type Mask: Copy;
    unsafe fn no_lanes() -> Self::Mask;
    unsafe fn nan_lanes(v: Self, or: Self::Mask) -> Self::Mask;
    /// `v` with NaN in the lanes of `m`.
    unsafe fn with_nan(v: Self, m: Self::Mask) -> Self;
    unsafe fn constant(v: f32) -> Self;
    unsafe fn mul(a: Self, b: Self) -> Self;
    unsafe fn sub(a: Self, b: Self) -> Self;
    unsafe fn abs(self) -> Self;
    /// `x < y ? a : b` lane by lane (false for NaN).
    unsafe fn select_lt(x: Self, y: Self, a: Self, b: Self) -> Self;
    /// `x > y ? a : b` lane by lane (false for NaN).
    unsafe fn select_gt(x: Self, y: Self, a: Self, b: Self) -> Self;
    /// For `t = n + 1.5·2²³` (an integer `n` in the low mantissa bits): `(2^⌊n/2⌋, 2^(n −
    /// ⌊n/2⌋))`, built in the exponent bits.
    unsafe fn pow2_halves(t: Self) -> (Self, Self);
    /// `t` with the sign bit of `x`.
    unsafe fn with_sign_of(t: Self, x: Self) -> Self;
    /// `n / d` to within about an ulp, faster than a division where the ISA allows
    /// (AVX-512: a 14-bit reciprocal refined by one Newton step).
    unsafe fn quotient(n: Self, d: Self) -> Self;
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use super::Simd;
    use std::arch::x86_64::*;

    #[derive(Clone, Copy)]
    pub struct Zmm(__m512);
    #[derive(Clone, Copy)]
    pub struct Ymm(__m256);

    // Every method is `inline(always)` and only ever inlined into a function compiled with
    // the matching `target_feature` (the tile entry points below), which the callers only
    // call on a CPU that has it.
    impl Simd for Zmm {
        const L: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> Self {
            unsafe { Zmm(_mm512_setzero_ps()) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { Zmm(_mm512_loadu_ps(p)) }
        }
        #[inline(always)]
        unsafe fn splat(p: *const f32) -> Self {
            unsafe { Zmm(_mm512_set1_ps(*p)) }
        }
        #[inline(always)]
        fn prefetch(p: *const f32) {
            // SAFETY: a prefetch reads nothing the program sees and never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
        }

        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm512_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn store_first(self, p: *mut f32, n: usize) {
            unsafe { _mm512_mask_storeu_ps(p, ((1u32 << n) - 1) as u16, self.0) }
        }
        #[inline(always)]
        unsafe fn load_first(p: *const f32, n: usize) -> Self {
            unsafe { Zmm(_mm512_maskz_loadu_ps(((1u32 << n) - 1) as u16, p)) }
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            unsafe { Zmm(_mm512_fmadd_ps(a.0, b.0, c.0)) }
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            unsafe { Zmm(_mm512_add_ps(a.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn relu(self) -> Self {
            // `maxps` returns its second operand when either is NaN: NaN stays NaN.
            unsafe { Zmm(_mm512_max_ps(_mm512_setzero_ps(), self.0)) }
        }
        #[inline(always)]
        unsafe fn keep_first(self, n: usize) -> Self {
            unsafe { Zmm(_mm512_maskz_mov_ps(((1u32 << n) - 1) as u16, self.0)) }
        }
        #[inline(always)]
        unsafe fn max(a: Self, b: Self) -> Self {
            unsafe { Zmm(_mm512_max_ps(a.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn div(a: Self, b: Self) -> Self {
            unsafe { Zmm(_mm512_div_ps(a.0, b.0)) }
        }
        type Mask = u16;
        #[inline(always)]
        unsafe fn no_lanes() -> u16 {
            0
        }
        #[inline(always)]
        unsafe fn nan_lanes(v: Self, or: u16) -> u16 {
            unsafe { or | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v.0, v.0) }
        }
        #[inline(always)]
        unsafe fn with_nan(v: Self, m: u16) -> Self {
            unsafe { Zmm(_mm512_mask_mov_ps(v.0, m, _mm512_set1_ps(f32::NAN))) }
        }
        #[inline(always)]
        unsafe fn constant(v: f32) -> Self {
            unsafe { Zmm(_mm512_set1_ps(v)) }
        }
        #[inline(always)]
        unsafe fn mul(a: Self, b: Self) -> Self {
            unsafe { Zmm(_mm512_mul_ps(a.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn sub(a: Self, b: Self) -> Self {
            unsafe { Zmm(_mm512_sub_ps(a.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn abs(self) -> Self {
            unsafe {
                Zmm(_mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(self.0), _mm512_set1_epi32(i32::MAX))))
            }
        }
        #[inline(always)]
        unsafe fn select_lt(x: Self, y: Self, a: Self, b: Self) -> Self {
            unsafe { Zmm(_mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(x.0, y.0), b.0, a.0)) }
        }
        #[inline(always)]
        unsafe fn select_gt(x: Self, y: Self, a: Self, b: Self) -> Self {
            unsafe { Zmm(_mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(x.0, y.0), b.0, a.0)) }
        }
        #[inline(always)]
        unsafe fn pow2_halves(t: Self) -> (Self, Self) {
            unsafe {
                let n = _mm512_sub_epi32(_mm512_castps_si512(t.0), _mm512_set1_epi32(super::MAGIC.to_bits() as i32));
                let n1 = _mm512_srai_epi32::<1>(n);
                let n2 = _mm512_sub_epi32(n, n1);
                let bias = _mm512_set1_epi32(127);
                let p = |k| _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(k, bias)));
                (Zmm(p(n1)), Zmm(p(n2)))
            }
        }
        #[inline(always)]
        unsafe fn with_sign_of(t: Self, x: Self) -> Self {
            unsafe {
                let sign = _mm512_and_si512(_mm512_castps_si512(x.0), _mm512_set1_epi32(i32::MIN));
                Zmm(_mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t.0), sign)))
            }
        }
        #[inline(always)]
        unsafe fn quotient(n: Self, d: Self) -> Self {
            unsafe {
                // r ≈ 1/d to 2⁻¹⁴; r' = r + r·(1 − d·r) to ~2⁻²⁸; q = n·r', then one
                // residual step q' = q + r'·(n − d·q).
                let r = _mm512_rcp14_ps(d.0);
                let e = _mm512_fnmadd_ps(d.0, r, _mm512_set1_ps(1.0));
                let r = _mm512_fmadd_ps(r, e, r);
                let q = _mm512_mul_ps(n.0, r);
                let res = _mm512_fnmadd_ps(d.0, q, n.0);
                Zmm(_mm512_fmadd_ps(res, r, q))
            }
        }
    }

    impl Simd for Ymm {
        const L: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> Self {
            unsafe { Ymm(_mm256_setzero_ps()) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { Ymm(_mm256_loadu_ps(p)) }
        }
        #[inline(always)]
        unsafe fn splat(p: *const f32) -> Self {
            unsafe { Ymm(_mm256_broadcast_ss(&*p)) }
        }
        #[inline(always)]
        fn prefetch(p: *const f32) {
            // SAFETY: a prefetch reads nothing the program sees and never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
        }

        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm256_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn store_first(self, p: *mut f32, n: usize) {
            unsafe { _mm256_maskstore_ps(p, lane_mask(n), self.0) }
        }
        #[inline(always)]
        unsafe fn load_first(p: *const f32, n: usize) -> Self {
            unsafe { Ymm(_mm256_maskload_ps(p, lane_mask(n))) }
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            unsafe { Ymm(_mm256_fmadd_ps(a.0, b.0, c.0)) }
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            unsafe { Ymm(_mm256_add_ps(a.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn relu(self) -> Self {
            unsafe { Ymm(_mm256_max_ps(_mm256_setzero_ps(), self.0)) }
        }
        #[inline(always)]
        unsafe fn keep_first(self, n: usize) -> Self {
            unsafe { Ymm(_mm256_and_ps(self.0, _mm256_castsi256_ps(lane_mask(n)))) }
        }
        #[inline(always)]
        unsafe fn max(a: Self, b: Self) -> Self {
            unsafe { Ymm(_mm256_max_ps(a.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn div(a: Self, b: Self) -> Self {
            unsafe { Ymm(_mm256_div_ps(a.0, b.0)) }
        }
        type Mask = __m256;
        #[inline(always)]
        unsafe fn no_lanes() -> __m256 {
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn nan_lanes(v: Self, or: __m256) -> __m256 {
            unsafe { _mm256_or_ps(or, _mm256_cmp_ps::<_CMP_UNORD_Q>(v.0, v.0)) }
        }
        #[inline(always)]
        unsafe fn with_nan(v: Self, m: __m256) -> Self {
            unsafe { Ymm(_mm256_blendv_ps(v.0, _mm256_set1_ps(f32::NAN), m)) }
        }
        #[inline(always)]
        unsafe fn constant(v: f32) -> Self {
            unsafe { Ymm(_mm256_set1_ps(v)) }
        }
        #[inline(always)]
        unsafe fn mul(a: Self, b: Self) -> Self {
            unsafe { Ymm(_mm256_mul_ps(a.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn sub(a: Self, b: Self) -> Self {
            unsafe { Ymm(_mm256_sub_ps(a.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn abs(self) -> Self {
            unsafe { Ymm(_mm256_and_ps(self.0, _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX)))) }
        }
        #[inline(always)]
        unsafe fn select_lt(x: Self, y: Self, a: Self, b: Self) -> Self {
            unsafe { Ymm(_mm256_blendv_ps(b.0, a.0, _mm256_cmp_ps::<_CMP_LT_OQ>(x.0, y.0))) }
        }
        #[inline(always)]
        unsafe fn select_gt(x: Self, y: Self, a: Self, b: Self) -> Self {
            unsafe { Ymm(_mm256_blendv_ps(b.0, a.0, _mm256_cmp_ps::<_CMP_GT_OQ>(x.0, y.0))) }
        }
        #[inline(always)]
        unsafe fn pow2_halves(t: Self) -> (Self, Self) {
            unsafe {
                let n = _mm256_sub_epi32(_mm256_castps_si256(t.0), _mm256_set1_epi32(super::MAGIC.to_bits() as i32));
                let n1 = _mm256_srai_epi32::<1>(n);
                let n2 = _mm256_sub_epi32(n, n1);
                let bias = _mm256_set1_epi32(127);
                let p = |k| _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(k, bias)));
                (Ymm(p(n1)), Ymm(p(n2)))
            }
        }
        #[inline(always)]
        unsafe fn with_sign_of(t: Self, x: Self) -> Self {
            unsafe {
                let sign = _mm256_and_ps(x.0, _mm256_castsi256_ps(_mm256_set1_epi32(i32::MIN)));
                Ymm(_mm256_or_ps(t.0, sign))
            }
        }
        #[inline(always)]
        unsafe fn quotient(n: Self, d: Self) -> Self {
            unsafe { Ymm(_mm256_div_ps(n.0, d.0)) }
        }
    }

    /// All-ones in lanes `0..n`.
    #[inline(always)]
    unsafe fn lane_mask(n: usize) -> __m256i {
        unsafe {
            let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), idx)
        }
    }
}

/// `1.5·2²³`: adding it to a float of magnitude below 2²² rounds it to an integer, which
/// then sits in the low mantissa bits.
pub(super) const MAGIC: f32 = 12_582_912.0;
