//! The epilogue the tiles apply in registers: the per-channel affine step and the
//! activations (ReLU, LeakyReLU, Hardtanh by compare-and-select; `e^x`, Sigmoid and Tanh with
//! the algorithm and constants of the generated code's, `crate::jit::math`).

use super::simd::{MAGIC, Simd};

/// The activation of a tile's epilogue.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(in crate::jit) enum Act {
    None,
    Relu,
    Sigmoid,
    Tanh,
    /// `clamp(x, lo, hi)`, NaN passing through.
    Clamp(f32, f32),
    /// `x > 0 ? x : slope·x`.
    Leaky(f32),
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
            Some(A::Hardtanh(lo, hi)) => Act::Clamp(lo.get(), hi.get()),
            Some(A::LeakyRelu(s)) => Act::Leaky(s.get()),
        }
    }
}

/// `e^x`: the algorithm (and constants) of the generated code's `exp` (`crate::jit::math`):
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

/// `1 / (1 + e^−x)` as `crate::jit::math` computes it: `num / (1 + e^−|x|)`, `num = 1` for
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

/// `tanh(x)` as `crate::jit::math` computes it.
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
pub(super) unsafe fn affine<V: Simd>(v: V, s: Option<V>, t: Option<V>) -> V {
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
pub(super) unsafe fn activate<V: Simd>(v: V, act: Act) -> V {
    unsafe {
        match act {
            Act::None => v,
            Act::Relu => v.relu(),
            Act::Sigmoid => sigmoid_v(v),
            Act::Tanh => tanh_v(v),
            Act::Leaky(s) => V::select_gt(v, V::zero(), v, V::mul(v, V::constant(s))),
            Act::Clamp(lo, hi) => {
                let v = V::select_lt(v, V::constant(lo), V::constant(lo), v);
                V::select_gt(v, V::constant(hi), V::constant(hi), v)
            }
        }
    }
}

/// The whole epilogue of one output vector of a blocked result, stored: `acc·s + t`, plus
/// the residual at `r + o` unless `r` is null, the activation, lanes from `valid` on set to
/// zero (the padding channels of the last block), stored at `y + o`.
///
/// # Safety
/// Inlined only into a function with `V`'s target feature; `y + o` (and `r + o`) hold a
/// vector.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn finish<V: Simd>(
    acc: V,
    (s, t): (Option<V>, Option<V>),
    r: *const f32,
    y: *mut f32,
    o: isize,
    act: Act,
    valid: usize,
) {
    unsafe {
        let mut v = affine(acc, s, t);
        if !r.is_null() {
            v = V::add(v, V::load(r.offset(o)));
        }
        v = activate(v, act);
        if valid < V::L {
            v = v.keep_first(valid);
        }
        v.store(y.offset(o));
    }
}
