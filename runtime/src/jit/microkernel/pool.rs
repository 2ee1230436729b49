//! The pooling row ([`pool_row`]): one output row of max or average pooling on blocked
//! tensors, NaN propagated as PyTorch does.

use super::isa::Isa;
use super::simd::Simd;

/// Constants of one pooling layer on blocked tensors (see [`pool_row`]).
#[derive(Debug)]
#[repr(C)]
pub(in crate::jit) struct PoolRow {
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
pub(in crate::jit) unsafe extern "C" fn pool_row(
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

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::jit::microkernel::simd::x86::{Ymm, Zmm};

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
