//! The hand-written register tiles that Conv2d and Linear kernels call: per-ISA FMA
//! micro-kernels (AVX-512F with zmm vectors, AVX2+FMA with ymm), written once over a small
//! vector abstraction ([`Simd`]) and instantiated per ISA and tile shape.
//!
//! The generated code owns everything around a tile — the loop nest over samples, output
//! channel groups, rows and pixels, the split between threads, the choice of tap tables at
//! the borders, and activations that need `exp` — and calls one of the two entry points
//! here for each tile, with a descriptor of constants that the compiled model owns:
//!
//! - [`conv_tile`]: `MR` consecutive output pixels of one output row × `NB` blocks of 16
//!   output channels of the blocked layout (see [`super::plan::Layout`]), the whole
//!   reduction over input channels and taps in registers. The input is read in place —
//!   blocked, or plain NCHW for a net's first layer — through a row table and a column table
//!   of element offsets, so every stride, dilation and padding mode is the same code: zero
//!   padding leaves taps out of the tables (and skips their weights), the other modes remap
//!   them. Weights are packed once per channel group as `[icb][kh][kw][c][NB·16]`.
//! - [`plane_tile`]: for a net's first layer with at most 8 filters, the other way round —
//!   `NV` vectors of consecutive output pixels of one row (pixels in the lanes) × every
//!   output channel, weights broadcast, plain NCHW result, so no lane is padding;
//! - [`gemm_tile`]: `MR` rows × `NV` vectors of columns of `C = A·Bᵀ` for Linear, `A`
//!   row-major read in place (a row is one sample), `B` packed once as `[⌈O/NR⌉][K][NR]`;
//! - [`pool_row`]: one output row of max or average pooling on blocked tensors.
//!
//! The convolution and GEMM tiles apply the fused epilogue while the accumulators are
//! still in registers:
//! `y = acc·scale[c] + shift[c]` (either optional; a bias is a shift), `+ residual`, the
//! activation, and, for blocked outputs, zero in the padding lanes past the last channel.
//! Sigmoid and Tanh use the same algorithm and constants as the generated code's
//! ([`super::math`]), on the wide vectors.
//!
//! The ISA is chosen when the net is compiled ([`Isa::detect`]), and a descriptor is only
//! ever built for an ISA the CPU has, which is what makes calling the `target_feature`
//! functions sound.

/// Which kernels to compile with: the fastest the CPU supports, a given ISA, or the
/// portable Cranelift code.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kernels {
    /// AVX-512F if the CPU has it, else AVX2+FMA, else the portable code (also what
    /// [`super::Options::portable`] turns off).
    #[default]
    Auto,
    /// The AVX-512F micro-kernels (an error if the CPU lacks AVX-512F).
    Avx512,
    /// The AVX2+FMA micro-kernels (an error if the CPU lacks AVX2 or FMA).
    Avx2,
    /// The portable Cranelift f32x4 code for every op.
    Portable,
}

/// An instruction set the micro-kernels are written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Isa {
    Avx512,
    Avx2,
}

impl Isa {
    /// The ISA `k` asks for, if the host has it; `Err` names a forced ISA the host lacks.
    pub fn detect(k: Kernels) -> Result<Option<Isa>, String> {
        let (a512, a2) = host();
        match k {
            Kernels::Portable => Ok(None),
            Kernels::Auto => Ok(if a512 {
                Some(Isa::Avx512)
            } else if a2 {
                Some(Isa::Avx2)
            } else {
                None
            }),
            Kernels::Avx512 if a512 => Ok(Some(Isa::Avx512)),
            Kernels::Avx2 if a2 => Ok(Some(Isa::Avx2)),
            _ => Err(format!("this CPU cannot run the {k:?} micro-kernels")),
        }
    }

    /// Most blocks of 16 output channels a conv tile holds.
    pub fn conv_nb(self) -> usize {
        match self {
            Isa::Avx512 => 4,
            Isa::Avx2 => 1,
        }
    }

    /// Most output pixels a conv tile of `nb` blocks holds (the accumulators fill the
    /// register file, leaving room for the weights and one broadcast).
    pub fn conv_mr(self, nb: usize) -> usize {
        match (self, nb) {
            (Isa::Avx512, 4) => 6,
            (Isa::Avx512, 3) => 8,
            (Isa::Avx512, 2) => 12,
            (Isa::Avx512, _) => 14,
            (Isa::Avx2, _) => 6,
        }
    }

    /// Rows of a Linear tile.
    pub fn gemm_mr(self) -> usize {
        6
    }

    /// Columns of a Linear tile.
    pub fn gemm_nr(self) -> usize {
        match self {
            Isa::Avx512 => 64,
            Isa::Avx2 => 16,
        }
    }
}

/// Whether the host has (AVX-512F, AVX2+FMA).
fn host() -> (bool, bool) {
    #[cfg(target_arch = "x86_64")]
    {
        (
            std::arch::is_x86_feature_detected!("avx512f"),
            std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        (false, false)
    }
}

/// Constants of one convolution's tiles, built at compile time and owned by the model.
/// Strides are in elements.
#[derive(Debug)]
#[repr(C)]
pub(super) struct ConvTile {
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

/// Constants of one Linear's tiles.
#[derive(Debug)]
#[repr(C)]
pub(super) struct GemmTile {
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

/// The vector operations the tiles are written with.
trait Simd: Copy {
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
mod x86 {
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

    /// Instantiates the conv tiles of one ISA: `$name::<MR, NV>` with `NV` vectors per pixel.
    macro_rules! entry_points {
        ($feature:literal, $v:ty, $conv:ident, $gemm:ident) => {
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

    entry_points!("avx512f", Zmm, conv512, gemm512);
    entry_points!("avx2,fma", Ymm, conv256, gemm256);

    /// # Safety
    /// The CPU has AVX-512F; arguments as for [`super::plane_tile`].
    #[target_feature(enable = "avx512f")]
    pub unsafe fn plane512<const OC: usize, const NV: usize>(
        d: &super::PlaneTile,
        x: *const f32,
        y: *mut f32,
        r: *const f32,
        valid: usize,
    ) {
        unsafe { super::plane_body::<Zmm, OC, NV>(d, x, y, r, valid) }
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; arguments as for [`super::plane_tile`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn plane256<const OC: usize, const NV: usize>(
        d: &super::PlaneTile,
        x: *const f32,
        y: *mut f32,
        r: *const f32,
        valid: usize,
    ) {
        unsafe { super::plane_body::<Ymm, OC, NV>(d, x, y, r, valid) }
    }

    /// # Safety
    /// The CPU has AVX-512F; arguments as for [`super::pool_row`].
    #[target_feature(enable = "avx512f")]
    pub unsafe fn pool512(d: &super::PoolRow, x: *const f32, y: *mut f32, rows: *const isize, div: *const f32) {
        unsafe { super::pool_body::<Zmm, 1>(d, x, y, rows, div) }
    }

    /// # Safety
    /// The CPU has AVX2; arguments as for [`super::pool_row`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn pool256(d: &super::PoolRow, x: *const f32, y: *mut f32, rows: *const isize, div: *const f32) {
        unsafe { super::pool_body::<Ymm, 2>(d, x, y, rows, div) }
    }
}

/// `1.5·2²³`: adding it to a float of magnitude below 2²² rounds it to an integer, which
/// then sits in the low mantissa bits.
const MAGIC: f32 = 12_582_912.0;

/// The activation of a tile's epilogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Act {
    None,
    Relu,
    Sigmoid,
    Tanh,
}

impl Act {
    /// The tile activation for a fused one.
    pub fn of(a: Option<cnnc_compiler::ops::Activation>) -> Act {
        use cnnc_compiler::ops::Activation as A;
        match a {
            None => Act::None,
            Some(A::Relu) => Act::Relu,
            Some(A::Sigmoid) => Act::Sigmoid,
            Some(A::Tanh) => Act::Tanh,
        }
    }
}

/// `e^x`: the algorithm (and constants) of the generated code's `exp` ([`super::math`]):
/// clamp to `[−104, 88]`, Cody–Waite reduction by `ln2`, Cephes' degree-7 polynomial, and
/// `2^n` applied in two halves so subnormal results come out right.
#[inline(always)]
unsafe fn exp_v<V: Simd>(x: V) -> V {
    unsafe {
        let x = V::select_gt(x, V::constant(88.0), V::constant(88.0), x);
        let x = V::select_lt(x, V::constant(-104.0), V::constant(-104.0), x);
        let t = V::fma(x, V::constant(std::f32::consts::LOG2_E), V::constant(MAGIC));
        let n = V::sub(t, V::constant(MAGIC));
        let r = V::fma(n, V::constant(-0.693_359_4), x);
        let r = V::fma(n, V::constant(2.121_944_4e-4), r);
        let mut p = V::constant(1.987_569_2e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
            p = V::fma(p, r, V::constant(c));
        }
        let y = V::fma(p, V::mul(r, r), r);
        let y = V::add(y, V::constant(1.0));
        let (s1, s2) = V::pow2_halves(t);
        V::mul(V::mul(y, s1), s2)
    }
}

/// `1 / (1 + e^−x)` as [`super::math`] computes it: `num / (1 + e^−|x|)`, `num = 1` for
/// `x ≥ 0` and `e^−|x|` below.
#[inline(always)]
unsafe fn sigmoid_v<V: Simd>(x: V) -> V {
    unsafe {
        let e = exp_v(V::sub(V::zero(), x.abs()));
        let d = V::add(V::constant(1.0), e);
        let num = V::select_lt(x, V::zero(), e, V::constant(1.0));
        V::quotient(num, d)
    }
}

/// `tanh(x)` as [`super::math`] computes it.
#[inline(always)]
unsafe fn tanh_v<V: Simd>(x: V) -> V {
    unsafe {
        let a = x.abs();
        let z = V::mul(a, a);
        let mut p = V::constant(-5.704_988_7e-3);
        for c in [2.063_909e-2, -5.373_971_6e-2, 1.333_144_2e-1, -3.333_328e-1] {
            p = V::fma(p, z, V::constant(c));
        }
        let small = V::fma(V::mul(p, z), a, a);
        let capped = V::select_gt(a, V::constant(10.0), V::constant(10.0), a);
        let e = exp_v(V::add(capped, capped));
        let q = V::quotient(V::constant(2.0), V::add(e, V::constant(1.0)));
        let big = V::sub(V::constant(1.0), q);
        let t = V::select_lt(a, V::constant(0.625), small, big);
        V::with_sign_of(t, x)
    }
}

/// `v·s + t`, either factor possibly absent: the per-channel affine step of the epilogues
/// (bias, BatchNorm's scale and shift folded together).
#[inline(always)]
unsafe fn affine<V: Simd>(v: V, s: Option<V>, t: Option<V>) -> V {
    unsafe {
        match (s, t) {
            (Some(s), Some(t)) => V::fma(v, s, t),
            (None, Some(t)) => V::add(v, t),
            (Some(s), None) => V::fma(v, s, V::zero()),
            (None, None) => v,
        }
    }
}

/// Applies a tile activation.
#[inline(always)]
unsafe fn activate<V: Simd>(v: V, act: Act) -> V {
    unsafe {
        match act {
            Act::None => v,
            Act::Relu => v.relu(),
            Act::Sigmoid => sigmoid_v(v),
            Act::Tanh => tanh_v(v),
        }
    }
}

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
                let mut v = acc[p][j];
                v = affine(v, s, t);
                let o = off + (p * 16) as isize;
                if !r.is_null() {
                    v = V::add(v, V::load(r.offset(o)));
                }
                v = activate(v, d.act);
                if valid < V::L {
                    v = v.keep_first(valid);
                }
                v.store(y.offset(o));
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

/// Constants of one plane convolution (see [`plane_tile`]): few output channels, pixels in
/// the vector lanes, plain (NCHW) result. Strides in elements.
#[derive(Debug)]
#[repr(C)]
pub(super) struct PlaneTile {
    pub isa: Isa,
    /// Input channels and kernel size.
    pub ic: usize,
    pub kh: usize,
    pub kw: usize,
    /// Input strides: between channel planes, kernel rows (dilation included) and kernel
    /// columns.
    pub x_c: isize,
    pub x_tr: isize,
    pub x_tc: isize,
    /// Output (and residual) stride between channel planes.
    pub y_c: isize,
    /// Weights `[ic][kh][kw][oc]`.
    pub w: *const f32,
    /// Per-channel `scale` and `shift`, or null.
    pub scale: *const f32,
    pub shift: *const f32,
    pub act: Act,
}

// SAFETY: as for `ConvTile`.
unsafe impl Send for PlaneTile {}
// SAFETY: as for `ConvTile`.
unsafe impl Sync for PlaneTile {}

/// `NV` vectors of consecutive output pixels of one row × `OC` output channels (see
/// [`plane_tile`]).
///
/// # Safety
/// As [`plane_tile`]; inlined only into a function with `V`'s target feature.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn plane_body<V: Simd, const OC: usize, const NV: usize>(
    d: &PlaneTile,
    x: *const f32,
    y: *mut f32,
    r: *const f32,
    valid: usize,
) {
    unsafe {
        let mut acc = [[V::zero(); NV]; OC];
        let mut wp = d.w;
        for c in 0..d.ic {
            let xc = x.offset(c as isize * d.x_c);
            for a in 0..d.kh {
                let xa = xc.offset(a as isize * d.x_tr);
                for b in 0..d.kw {
                    let xb = xa.offset(b as isize * d.x_tc);
                    let mut xv = [V::zero(); NV];
                    for v in 0..NV {
                        xv[v] = V::load(xb.add(v * V::L));
                    }
                    for o in 0..OC {
                        let wv = V::splat(wp.add(o));
                        for v in 0..NV {
                            acc[o][v] = V::fma(wv, xv[v], acc[o][v]);
                        }
                    }
                    wp = wp.add(OC);
                }
            }
        }
        for o in 0..OC {
            let s = if d.scale.is_null() { None } else { Some(V::splat(d.scale.add(o))) };
            let t = if d.shift.is_null() { None } else { Some(V::splat(d.shift.add(o))) };
            let yo = y.offset(o as isize * d.y_c);
            let ro = if r.is_null() { r } else { r.offset(o as isize * d.y_c) };
            for v in 0..NV {
                let mut val = affine(acc[o][v], s, t);
                // The last vector holds `valid` pixels.
                let n = if v + 1 == NV { valid } else { V::L };
                if !ro.is_null() {
                    let res = if n == V::L { V::load(ro.add(v * V::L)) } else { V::load_first(ro.add(v * V::L), n) };
                    val = V::add(val, res);
                }
                val = activate(val, d.act);
                if n == V::L {
                    val.store(yo.add(v * V::L));
                } else {
                    val.store_first(yo.add(v * V::L), n);
                }
            }
        }
    }
}

/// Most vectors of pixels a plane tile of `oc` channels holds (the accumulators, the
/// input vectors and a broadcast fit the register file).
pub(super) fn plane_nv(oc: usize) -> usize {
    (24 / oc.max(1)).min(4)
}

/// Computes `nv` vectors of consecutive output pixels of one output row for all `oc ≤ 8`
/// output channels of a plane convolution (`shape = nv | valid << 8 | oc << 16`, the last
/// vector holding `valid` pixels): `x` is the staged input at the row's first window (the
/// loads of the last vector may read past `valid` pixels, into the slack the staging
/// leaves), `y` and `r` (the residual, or null) the output row start in channel plane 0.
///
/// # Safety
/// `d.isa` is available; the staged input, output and residual hold what the strides name.
pub(super) unsafe extern "C" fn plane_tile(
    d: *const PlaneTile,
    x: *const f32,
    y: *mut f32,
    r: *const f32,
    shape: usize,
) {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        use x86::{plane256 as p2, plane512 as p5};
        let d = &*d;
        let (nv, valid, oc) = (shape & 0xff, (shape >> 8) & 0xff, shape >> 16);
        debug_assert!((1..=8).contains(&oc) && (1..=plane_nv(oc)).contains(&nv));
        macro_rules! by_nv {
            ($f:ident, $oc:literal) => {
                match nv {
                    1 => $f::<$oc, 1>(d, x, y, r, valid),
                    2 => $f::<$oc, 2>(d, x, y, r, valid),
                    3 => $f::<$oc, 3>(d, x, y, r, valid),
                    _ => $f::<$oc, 4>(d, x, y, r, valid),
                }
            };
        }
        macro_rules! by_oc {
            ($f:ident) => {
                match oc {
                    1 => by_nv!($f, 1),
                    2 => by_nv!($f, 2),
                    3 => by_nv!($f, 3),
                    4 => by_nv!($f, 4),
                    5 => by_nv!($f, 5),
                    6 => by_nv!($f, 6),
                    7 => match nv {
                        1 => $f::<7, 1>(d, x, y, r, valid),
                        2 => $f::<7, 2>(d, x, y, r, valid),
                        _ => $f::<7, 3>(d, x, y, r, valid),
                    },
                    _ => match nv {
                        1 => $f::<8, 1>(d, x, y, r, valid),
                        2 => $f::<8, 2>(d, x, y, r, valid),
                        _ => $f::<8, 3>(d, x, y, r, valid),
                    },
                }
            };
        }
        match d.isa {
            Isa::Avx512 => by_oc!(p5),
            Isa::Avx2 => by_oc!(p2),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (d, x, y, r, shape);
        unreachable!("no micro-kernel ISA is detected off x86-64")
    }
}

/// Constants of one pooling layer on blocked tensors (see [`pool_row`]).
#[derive(Debug)]
#[repr(C)]
pub(super) struct PoolRow {
    pub isa: Isa,
    /// Max (else sum, then divide).
    pub max: bool,
    /// Output columns.
    pub ow: usize,
    /// Most taps per column window; per output column, `[count, offset…]` (`1 + kw`
    /// entries each): element offsets of the window's columns from the row start.
    pub kw: usize,
    pub cols: *const isize,
    /// Interior columns `[lo, hi)`, whose window is the full `kw` taps starting at element
    /// `o·step − pad`, `tap` apart.
    pub lo: usize,
    pub hi: usize,
    pub step: isize,
    pub pad: isize,
    pub tap: isize,
}

// SAFETY: as for `ConvTile`.
unsafe impl Send for PoolRow {}
// SAFETY: as for `ConvTile`.
unsafe impl Sync for PoolRow {}

/// One output row of a blocked pooling layer (see [`pool_row`]).
///
/// # Safety
/// As [`pool_row`]; inlined only into a function with `V`'s target feature. `NV = 16 / L`.
#[inline(always)]
unsafe fn pool_body<V: Simd, const NV: usize>(
    d: &PoolRow,
    x: *const f32,
    y: *mut f32,
    rows: *const isize,
    div: *const f32,
) {
    unsafe {
        let nrows = *rows as usize;
        let roff = rows.add(1);
        let init = V::splat(&if d.max { f32::NEG_INFINITY } else { 0.0 });
        let out = |o: usize, acc: [V; NV], nan: [V::Mask; NV]| {
            let yp = y.add(o * 16);
            for j in 0..NV {
                let mut v = acc[j];
                if d.max {
                    v = V::with_nan(v, nan[j]);
                } else {
                    v = V::div(v, V::splat(div.add(o)));
                }
                v.store(yp.add(j * V::L));
            }
        };
        let mut o = 0;
        while o < d.ow {
            let (taps, base, stride, offs): (usize, isize, isize, *const isize) = if o >= d.lo && o < d.hi {
                (d.kw, o as isize * d.step - d.pad, d.tap, std::ptr::null())
            } else {
                let e = d.cols.add(o * (1 + d.kw));
                (*e as usize, 0, 0, e.add(1))
            };
            let mut acc = [init; NV];
            let mut nan = [V::no_lanes(); NV];
            for r in 0..nrows {
                let xr = x.offset(*roff.add(r));
                for t in 0..taps {
                    let off = if offs.is_null() { base + t as isize * stride } else { *offs.add(t) };
                    let p = xr.offset(off);
                    for j in 0..NV {
                        let v = V::load(p.add(j * V::L));
                        if d.max {
                            nan[j] = V::nan_lanes(v, nan[j]);
                            acc[j] = V::max(acc[j], v);
                        } else {
                            acc[j] = V::add(acc[j], v);
                        }
                    }
                }
            }
            out(o, acc, nan);
            o += 1;
        }
    }
}

/// Computes one output row of a pooling layer on blocked tensors: `x` is the input block
/// (`[h][w][16]`), `y` the output row (`[ow][16]`), `rows` `[count, offset…]` the element
/// offsets of the window's input rows, `div` (average only) the row's per-column divisors.
/// Max propagates NaN as PyTorch does.
///
/// # Safety
/// `d.isa` is available; every offset the tables name is inside the input block.
pub(super) unsafe extern "C" fn pool_row(
    d: *const PoolRow,
    x: *const f32,
    y: *mut f32,
    rows: *const isize,
    div: *const f32,
) {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        let d = &*d;
        match d.isa {
            Isa::Avx512 => x86::pool512(d, x, y, rows, div),
            Isa::Avx2 => x86::pool256(d, x, y, rows, div),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (d, x, y, rows, div);
        unreachable!("no micro-kernel ISA is detected off x86-64")
    }
}

/// Dispatches `$f::<MR, NV>` over the tile shapes an ISA has (`mr` in `1..=max`).
macro_rules! by_mr {
    ($f:ident, $nv:literal, $mr:expr, $args:tt; $($m:literal)*) => {
        match $mr {
            $($m => $f::<$m, $nv> $args,)*
            _ => {}
        }
    };
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
pub(super) unsafe extern "C" fn conv_tile(
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
pub(super) fn conv_shape(mr: usize, nb: usize, count: usize, ocb0: usize) -> i64 {
    debug_assert!(count < 1 << 16);
    (mr | (nb << 8) | (count << 16) | (ocb0 << 32)) as i64
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
pub(super) unsafe extern "C" fn gemm_tile(
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

/// Measures one core's f32 FMA throughput with the widest micro-kernel ISA the host has
/// (GFLOP/s; `None` without one): a register-only loop of independent FMAs, about 20 ms,
/// best of three.
pub(super) fn measure_peak() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        let isa = Isa::detect(Kernels::Auto).ok().flatten()?;
        use std::arch::x86_64::*;
        // 24 independent FMA chains (latency × ports of any current core), in registers.
        #[target_feature(enable = "avx512f")]
        unsafe fn run512(n: usize) -> f32 {
            let mut a = [_mm512_set1_ps(std::hint::black_box(1.0)); 24];
            let k = _mm512_set1_ps(std::hint::black_box(0.999_999));
            let t = _mm512_set1_ps(std::hint::black_box(1e-6));
            for _ in 0..n {
                for x in a.iter_mut() {
                    *x = _mm512_fmadd_ps(*x, k, t);
                }
            }
            let mut s = _mm512_setzero_ps();
            for x in a {
                s = _mm512_add_ps(s, x);
            }
            _mm512_reduce_add_ps(s)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn run256(n: usize) -> f32 {
            let mut a = [_mm256_set1_ps(std::hint::black_box(1.0)); 12];
            let k = _mm256_set1_ps(std::hint::black_box(0.999_999));
            let t = _mm256_set1_ps(std::hint::black_box(1e-6));
            for _ in 0..2 * n {
                for x in a.iter_mut() {
                    *x = _mm256_fmadd_ps(*x, k, t);
                }
            }
            let mut s = _mm256_setzero_ps();
            for x in a {
                s = _mm256_add_ps(s, x);
            }
            let mut out = [0f32; 8];
            // SAFETY: `out` holds 8 floats.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
            out[0]
        }
        let lanes = match isa {
            Isa::Avx512 => 16,
            Isa::Avx2 => 8,
        };
        let run = |n: usize| {
            let t = std::time::Instant::now();
            // SAFETY: the ISA was detected on this host.
            let r = unsafe {
                match isa {
                    Isa::Avx512 => run512(n),
                    Isa::Avx2 => run256(n),
                }
            };
            std::hint::black_box(r);
            t.elapsed().as_secs_f64()
        };
        let n = 400_000;
        let best = (0..3).map(|_| run(n)).fold(f64::INFINITY, f64::min);
        Some((n * 24 * lanes * 2) as f64 / best / 1e9)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}
