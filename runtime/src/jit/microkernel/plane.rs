//! The plane tile ([`plane_tile`]): for a net's first layer with at most 8 filters,
//! pixels in the lanes × every output channel, weights broadcast, plain NCHW result.

use super::epilogue::{Act, activate, affine};
use super::isa::Isa;
use super::simd::Simd;

/// Constants of one plane convolution (see [`plane_tile`]): few output channels, pixels in
/// the vector lanes, plain (NCHW) result. Strides in elements.
#[derive(Debug)]
#[repr(C)]
pub(in crate::jit) struct PlaneTile {
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
pub(in crate::jit) fn plane_nv(oc: usize) -> usize {
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
pub(in crate::jit) unsafe extern "C" fn plane_tile(
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

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::jit::microkernel::simd::x86::{Ymm, Zmm};

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
}
