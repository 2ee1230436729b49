//! Vectorised elementwise math on f32x4, emitted inline (no call per element): `exp`, and
//! the activations built on it.
//!
//! - `exp(x)`: clamp to `[−104, 88]`, range reduction `x = n·ln2 + r` (Cody–Waite, `ln2`
//!   split in two so `n·C1` is exact), `n` rounded with the `1.5·2²³` trick, Cephes' degree-7
//!   polynomial for `e^r` on `|r| ≤ ln2/2`, then `2^n` built in the exponent bits in two
//!   halves so results down to the subnormals (and 0 below `e^−104`) come out right.
//! - `sigmoid(x) = num / (1 + e^−|x|)` with `num = 1` for `x ≥ 0` and `e^−|x|` below: one
//!   correctly rounded division, no overflow at either tail.
//! - `tanh(x)`: Cephes' odd polynomial `x + x³·P(x²)` for `|x| < 0.625` (exact for tiny and
//!   subnormal `x`), `1 − 2/(e^{2|x|} + 1)` above (saturating to 1), sign copied from `x`.
//! - `relu(x) = x < 0 ? 0 : x` (NaN stays NaN).
//!
//! Clamps use compare-and-select, which keeps NaN (a NaN fails every comparison), so NaN
//! propagates through every function and ±inf maps to the right limit. Measured accuracy is
//! in `runtime/tests/jit_math.rs`.

use super::codegen::{Fx, V};
use cnnc_compiler::ops::Activation;
use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::{InstBuilder, Value, types};

/// `mask ? a : b` lane by lane, `mask` an `i32x4` from a vector compare.
pub(super) fn vsel(fx: &mut Fx<'_>, mask: Value, a: Value, b: Value) -> Value {
    let m = fx.bitcast(V, mask);
    fx.b.ins().bitselect(m, a, b)
}

/// `max(acc, v)` that propagates a NaN from either side, as PyTorch's max does: `v` wins
/// if it is greater or NaN. Four instructions on f32x4 (Cranelift's `fmax` needs eight for
/// its stricter ±0 rules); scalars go through a select.
pub(super) fn nan_max(fx: &mut Fx<'_>, acc: Value, v: Value) -> Value {
    let gt = fx.b.ins().fcmp(FloatCC::GreaterThan, v, acc);
    let nan = fx.b.ins().fcmp(FloatCC::Unordered, v, v);
    let take = fx.b.ins().bor(gt, nan);
    if fx.b.func.dfg.value_type(v) == V { vsel(fx, take, v, acc) } else { fx.b.ins().select(take, v, acc) }
}

/// `x < lo ? lo : x` (NaN stays NaN).
fn clamp_below(fx: &mut Fx<'_>, x: Value, lo: f32) -> Value {
    let l = fx.vf(lo);
    let m = fx.b.ins().fcmp(FloatCC::LessThan, x, l);
    vsel(fx, m, l, x)
}

/// `x > hi ? hi : x` (NaN stays NaN).
fn clamp_above(fx: &mut Fx<'_>, x: Value, hi: f32) -> Value {
    let h = fx.vf(hi);
    let m = fx.b.ins().fcmp(FloatCC::GreaterThan, x, h);
    vsel(fx, m, h, x)
}

/// Horner evaluation `((c0·x + c1)·x + c2)…`.
fn horner(fx: &mut Fx<'_>, x: Value, coeffs: &[f32]) -> Value {
    let mut y = fx.vf(coeffs[0]);
    for &c in &coeffs[1..] {
        let cv = fx.vf(c);
        y = fx.fma(y, x, cv);
    }
    y
}

/// `2^n` for integer lanes `n` in `[−127, 127]`, as floats (exponent bits).
fn pow2i(fx: &mut Fx<'_>, n: Value) -> Value {
    let bias = fx.vi(127);
    let e = fx.b.ins().iadd(n, bias);
    let bits = fx.b.ins().ishl_imm_u(e, 23);
    fx.bitcast(V, bits)
}

/// `e^x` lane by lane.
pub(super) fn exp_v(fx: &mut Fx<'_>, x: Value) -> Value {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const MAGIC: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer
    const C1: f32 = 0.693_359_4; // ln2 high part: few bits, so n·C1 is exact
    const C2: f32 = -2.121_944_4e-4; // ln2 − C1
    let x = clamp_above(fx, x, 88.0);
    let x = clamp_below(fx, x, -104.0);
    let log2e = fx.vf(LOG2E);
    let magic = fx.vf(MAGIC);
    let t = fx.fma(x, log2e, magic);
    let n_f = fx.b.ins().fsub(t, magic);
    let c1 = fx.vf(-C1);
    let r = fx.fma(n_f, c1, x);
    let c2 = fx.vf(-C2);
    let r = fx.fma(n_f, c2, r);
    let p = horner(fx, r, &[1.987_569_2e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5]);
    let r2 = fx.b.ins().fmul(r, r);
    let y = fx.fma(p, r2, r);
    let one = fx.vf(1.0);
    let y = fx.b.ins().fadd(y, one);
    // n = bits(t) − bits(MAGIC) (exact for |n| < 2²²); 2^n = 2^(n>>1) · 2^(n − n>>1).
    let tb = fx.bitcast(types::I32X4, t);
    let mb = fx.vi(MAGIC.to_bits() as i32);
    let n = fx.b.ins().isub(tb, mb);
    let n1 = fx.b.ins().sshr_imm_u(n, 1);
    let n2 = fx.b.ins().isub(n, n1);
    let s1 = pow2i(fx, n1);
    let s2 = pow2i(fx, n2);
    let y = fx.b.ins().fmul(y, s1);
    fx.b.ins().fmul(y, s2)
}

/// `1 / (1 + e^−x)` lane by lane.
pub(super) fn sigmoid_v(fx: &mut Fx<'_>, x: Value) -> Value {
    let a = fx.b.ins().fabs(x);
    let na = fx.b.ins().fneg(a);
    let e = exp_v(fx, na);
    let one = fx.vf(1.0);
    let d = fx.b.ins().fadd(one, e);
    let zero = fx.vf(0.0);
    let neg = fx.b.ins().fcmp(FloatCC::LessThan, x, zero);
    // For NaN, `neg` is false and `d` is NaN, so the quotient is NaN.
    let num = vsel(fx, neg, e, one);
    fx.b.ins().fdiv(num, d)
}

/// `tanh(x)` lane by lane.
pub(super) fn tanh_v(fx: &mut Fx<'_>, x: Value) -> Value {
    let a = fx.b.ins().fabs(x);
    // Small |x|: a + a·z·P(z), z = a².
    let z = fx.b.ins().fmul(a, a);
    let p = horner(fx, z, &[-5.704_988_7e-3, 2.063_909e-2, -5.373_971_6e-2, 1.333_144_2e-1, -3.333_328e-1]);
    let pz = fx.b.ins().fmul(p, z);
    let small = fx.fma(pz, a, a);
    // Large |x|: 1 − 2/(e^{2a} + 1), with a capped where tanh is 1 in f32 anyway.
    let capped = clamp_above(fx, a, 10.0);
    let two_a = fx.b.ins().fadd(capped, capped);
    let e = exp_v(fx, two_a);
    let one = fx.vf(1.0);
    let two = fx.vf(2.0);
    let d = fx.b.ins().fadd(e, one);
    let q = fx.b.ins().fdiv(two, d);
    let big = fx.b.ins().fsub(one, q);
    let threshold = fx.vf(0.625);
    let is_small = fx.b.ins().fcmp(FloatCC::LessThan, a, threshold);
    let t = vsel(fx, is_small, small, big);
    // Copy the sign of x.
    let xb = fx.bitcast(types::I32X4, x);
    let sign_mask = fx.vi(i32::MIN);
    let sign = fx.b.ins().band(xb, sign_mask);
    let tb = fx.bitcast(types::I32X4, t);
    let r = fx.b.ins().bor(tb, sign);
    fx.bitcast(V, r)
}

/// `x < 0 ? 0 : x` lane by lane.
pub(super) fn relu_v(fx: &mut Fx<'_>, x: Value) -> Value {
    let zero = fx.vf(0.0);
    let neg = fx.b.ins().fcmp(FloatCC::LessThan, x, zero);
    vsel(fx, neg, zero, x)
}

/// Applies an activation lane by lane.
pub(super) fn act_v(fx: &mut Fx<'_>, act: Activation, x: Value) -> Value {
    match act {
        Activation::Relu => relu_v(fx, x),
        Activation::Sigmoid => sigmoid_v(fx, x),
        Activation::Tanh => tanh_v(fx, x),
        Activation::LeakyRelu(slope) => {
            let (z, k) = (fx.vf(0.0), fx.vf(slope.get()));
            let pos = fx.b.ins().fcmp(FloatCC::GreaterThan, x, z);
            let scaled = fx.b.ins().fmul(x, k);
            vsel(fx, pos, x, scaled)
        }
        Activation::Hardtanh(lo, hi) => {
            // Compare-and-select, so a NaN passes through (as in PyTorch and the tiles).
            let (lo, hi) = (fx.vf(lo.get()), fx.vf(hi.get()));
            let below = fx.b.ins().fcmp(FloatCC::LessThan, x, lo);
            let x = vsel(fx, below, lo, x);
            let above = fx.b.ins().fcmp(FloatCC::GreaterThan, x, hi);
            vsel(fx, above, hi, x)
        }
    }
}

/// Over one line of `len` f32 values (element `j` at `base + 4·at(j)`), widened to f64: the
/// NaN-propagating maximum and `Σ exp(v − max)` in order — the interpreter's arithmetic for
/// the prologue of a softmax or a log-sum-exp.
pub(super) fn max_and_sum_exp<F: Fn(&mut Fx<'_>, Value) -> Value>(
    fx: &mut Fx<'_>,
    base: Value,
    len: usize,
    at: F,
) -> (Value, Value) {
    let ninf = fx.d(f64::NEG_INFINITY);
    let mx = fx.var(types::F64, ninf);
    fx.for_const(0, len, 1, |fx, j| {
        let k = at(fx, j);
        let v = fx.load_d(base, k);
        let cur = fx.b.use_var(mx);
        let m = fx.b.ins().fmax(cur, v);
        fx.b.def_var(mx, m);
    });
    let max = fx.b.use_var(mx);
    let sum = fx.acc_f64();
    fx.for_const(0, len, 1, |fx, j| {
        let k = at(fx, j);
        let v = fx.load_d(base, k);
        let d = fx.b.ins().fsub(v, max);
        let e = fx.call_f64(exp_f64 as *const () as usize, &[d]);
        fx.accumulate(sum, e);
    });
    let sum = fx.b.use_var(sum);
    (max, sum)
}

/// `e^x` in f64, for generated code ([`super::codegen::Fx::call_f64`]).
pub(super) extern "C" fn exp_f64(x: f64) -> f64 {
    x.exp()
}

/// `ln x` in f64, for generated code.
pub(super) extern "C" fn ln_f64(x: f64) -> f64 {
    x.ln()
}

/// `ln(1 + x)` in f64, for generated code.
pub(super) extern "C" fn ln_1p_f64(x: f64) -> f64 {
    x.ln_1p()
}
