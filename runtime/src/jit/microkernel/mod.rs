//! The hand-written register tiles that Conv2d and Linear kernels call: per-ISA FMA
//! micro-kernels (AVX-512F with zmm vectors, AVX2+FMA with ymm), written once over a small
//! vector abstraction (`simd.rs`) and instantiated per ISA and tile shape.
//!
//! The generated code owns everything around a tile — the loop nest over samples, output
//! channel groups, rows and pixels, the split between threads, the choice of tap tables at
//! the borders, and activations that need `exp` — and calls one of the two entry points
//! here for each tile, with a descriptor of constants that the compiled model owns:
//!
//! - [`conv_tile`]: `MR` consecutive output pixels of one output row × `NB` blocks of 16
//!   output channels of the blocked layout (see `crate::jit::plan::Layout`), the whole
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
//! (`crate::jit::math`), on the wide vectors.
//!
//! The ISA is chosen when the net is compiled ([`Isa::detect`]), and a descriptor is only
//! ever built for an ISA the CPU has, which is what makes calling the `target_feature`
//! functions sound.
//!
//! Files: `isa.rs` (which ISA the host has and the tile shapes each allows), `simd.rs` (the vector trait and its AVX-512/AVX2 implementations), `epilogue.rs`
//! (the fused epilogue and activations), one file per tile kind — `conv.rs`, `plane.rs`,
//! `gemm.rs`, `pool.rs`, `winograd.rs` and, for training, `winograd_grad.rs` (the Winograd
//! weight gradient) — each with its descriptor, its generic body and its
//! `target_feature` entry points. All of the JIT's micro-kernel `unsafe` is in this folder.

/// Dispatches `$f::<MR, NV>` over the tile shapes an ISA has (`mr` in `1..=max`).
macro_rules! by_mr {
    ($f:ident, $nv:literal, $mr:expr, $args:tt; $($m:literal)*) => {
        match $mr {
            $($m => $f::<$m, $nv> $args,)*
            _ => {}
        }
    };
}

mod conv;
mod epilogue;
mod gemm;
mod isa;
mod plane;
mod pool;
mod simd;
mod winograd;
mod winograd_grad;

pub(in crate::jit) use conv::{ConvTile, conv_shape, conv_tile};
pub(in crate::jit) use epilogue::Act;
pub(in crate::jit) use gemm::{GemmTile, gemm_tile, transpose_columns};
pub(in crate::jit) use isa::Isa;
pub use isa::Kernels;
pub(in crate::jit) use plane::{PlaneTile, plane_nv, plane_tile};
pub(in crate::jit) use pool::{PoolRow, pool_row};
pub(in crate::jit) use winograd::{
    MAX_BLOCKS as WINO_MAX_BLOCKS, WinoTile, weight_transform_rows, wino_shape, wino_unit,
};
pub(in crate::jit) use winograd_grad::{WgradScratch, WgradTile, wgrad_shape, wino_wgrad};

/// Measures one core's f32 FMA throughput with the widest micro-kernel ISA the host has
/// (GFLOP/s; `None` without one): a register-only loop of independent FMAs, about 20 ms,
/// best of three.
pub(in crate::jit) fn measure_peak() -> Option<f64> {
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
