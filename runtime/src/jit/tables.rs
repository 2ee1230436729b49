//! Index tables and window arithmetic shared by the kernel tiers: where each tap of a
//! convolution or pooling window reads along one axis (with PyTorch's padding modes), the
//! columns where vector loads stay inside a row, and ATen's average-pool divisors. Plain
//! integer code, computed at compile time; no code generation.

use super::codegen::LANES;
use crate::error::{Error, Result};
use cnnc_compiler::ops::PaddingMode;

/// Maps an input coordinate that may lie in the padding to the element PyTorch reads: the
/// remapped index, or −1 for a zero.
fn remap(i: i64, n: usize, mode: PaddingMode) -> i64 {
    let n = n as i64;
    match mode {
        PaddingMode::Zeros if (0..n).contains(&i) => i,
        PaddingMode::Zeros => -1,
        PaddingMode::Reflect if i < 0 => -i,
        PaddingMode::Reflect if i >= n => 2 * (n - 1) - i,
        PaddingMode::Reflect => i,
        PaddingMode::Replicate => i.clamp(0, n - 1),
        PaddingMode::Circular => i.rem_euclid(n),
    }
}

/// One spatial axis: for every output position and tap, the input index it reads (or −1).
pub(in crate::jit) fn axis_table(
    out: usize,
    taps: usize,
    stride: usize,
    dilation: usize,
    pad: usize,
    input: usize,
    mode: PaddingMode,
) -> Result<Vec<i32>> {
    let mut t = Vec::with_capacity(out * taps);
    for o in 0..out {
        for k in 0..taps {
            let i = (o * stride + k * dilation) as i64 - pad as i64;
            let r = remap(i, input, mode);
            if r < -1 || r >= input as i64 || (r == -1 && mode != PaddingMode::Zeros) {
                return Err(Error::Unsupported(format!(
                    "{} padding reaches index {i} of an axis of size {input}",
                    mode.name()
                )));
            }
            t.push(r as i32);
        }
    }
    Ok(t)
}

/// The interior output columns `[lo, end)` where 4-pixel vector loads of every tap stay inside
/// the input row (`None` if there are none).
pub(in crate::jit) fn vector_columns(
    out_w: usize,
    in_w: usize,
    kw: usize,
    stride: usize,
    dilation: usize,
    pad: usize,
) -> Option<(usize, usize)> {
    let extra = usize::from(stride == 2);
    let lo = pad.div_ceil(stride);
    // Largest start s with (s + 3)·stride − pad + (kw − 1)·dilation + extra ≤ in_w − 1.
    let reach = (in_w + pad) as i64 - 1 - extra as i64 - ((kw - 1) * dilation) as i64;
    if reach < 0 {
        return None;
    }
    let s_max = reach / stride as i64 - 3;
    let end = (s_max + 4).min(out_w as i64);
    (end >= lo as i64 + LANES as i64).then_some((lo, end as usize))
}

/// ATen's average-pool divisor factor along one axis for output `o`.
pub(in crate::jit) fn avg_factor(o: usize, k: usize, s: usize, p: usize, input: usize, count_include_pad: bool) -> f32 {
    let start = (o * s) as i64 - p as i64;
    let end = (start + k as i64).min((input + p) as i64);
    let pool = end - start;
    let valid = end.min(input as i64) - start.max(0);
    (if count_include_pad { pool } else { valid }) as f32
}

/// One axis of the vectorised max-pool backward (`portable/pool_grad.rs`), which scans the
/// windows of 4 neighbouring outputs at once on a padded copy of each input plane (real
/// cells at `pad..pad + input`, −∞ around them): the padded length, which every window of
/// the outputs rounded up to whole vectors reads inside (and one cell more for stride-2
/// loads), and per output (rounded up) the offset, along this axis, of its window's first
/// tap inside the input — ATen's first candidate. `None` when some window has no tap
/// inside the input (the general form handles it).
pub(in crate::jit) fn max_pool_axis(
    out: usize,
    k: usize,
    s: usize,
    d: usize,
    pad: usize,
    input: usize,
) -> Option<(usize, Vec<i32>)> {
    let rounded = out.div_ceil(LANES) * LANES;
    let need = (rounded - 1) * s + (k - 1) * d + 1 + usize::from(s == 2);
    let len = need.max(pad + input);
    let mut first = Vec::with_capacity(rounded);
    for o in 0..rounded {
        let tap = (0..k).find(|t| (pad..pad + input).contains(&(o * s + t * d)));
        match tap {
            Some(t) => first.push(i32::try_from(t * d).ok()?),
            None if o < out => return None,
            None => first.push(0),
        }
    }
    Some((len, first))
}

/// One axis of the blocked max-pool backward with overlapping or padded windows
/// (`blocked/pool.rs`): per output position and tap, the input position the tap reads as a byte
/// offset (`unit` bytes per position; a tap outside the input reads the window's first tap
/// inside it, an address in bounds, and is masked out of the scan), and whether it is
/// inside (−1) or not (0). `None` if a window has no tap inside the input.
pub(in crate::jit) fn max_pool_taps(
    out: usize,
    k: usize,
    s: usize,
    d: usize,
    p: usize,
    n: usize,
    unit: usize,
) -> Option<(Vec<i64>, Vec<i32>)> {
    let (mut t, mut m) = (Vec::with_capacity(out * k), Vec::with_capacity(out * k));
    for o in 0..out {
        let at = |j: usize| (o * s + j * d).checked_sub(p).filter(|&i| i < n);
        let first = (0..k).find_map(at)?;
        t.extend((0..k).map(|j| (at(j).unwrap_or(first) * unit) as i64));
        m.extend((0..k).map(|j| if at(j).is_some() { -1 } else { 0 }));
    }
    Some((t, m))
}

/// The padded plane `(rows, columns)` of the vectorised max-pool backward of a pool with
/// this geometry on an `input` plane with `out` outputs, if it applies.
pub(in crate::jit) fn max_pool_plane(
    (kh, kw): (usize, usize),
    (sh, sw): (usize, usize),
    (dh, dw): (usize, usize),
    (ph, pw): (usize, usize),
    input: (usize, usize),
    out: (usize, usize),
) -> Option<(usize, usize)> {
    let (rows, _) = max_pool_axis(out.0, kh, sh, dh, ph, input.0)?;
    let (cols, _) = max_pool_axis(out.1, kw, sw, dw, pw, input.1)?;
    Some((rows, cols))
}
