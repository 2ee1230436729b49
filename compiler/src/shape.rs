//! Tensor types and PyTorch's output-size formulas.
//!
//! A [`TensorType`] is a batch dimension (symbolic `N` or fixed) followed by the per-sample
//! dimensions. Every formula here is PyTorch's, including its corner cases (`ceil_mode`
//! windows must start inside the input, `padding="same"` pads the extra row at the end).
//! This module knows nothing of layers or syntax; the ops in [`crate::ops`] call it.

use std::fmt;

/// The largest size the compiler accepts for one dimension, one layer argument (channels,
/// features, kernel, stride, padding, dilation) and one tensor (elements per sample, and
/// elements of a parameter): `u32::MAX`. Within it, every count the compiler derives — window
/// extents, element counts, a layer's MACs (at most two such factors) — fits in 64 bits, so
/// an absurd declaration is an error rather than an overflow.
pub const MAX_SIZE: usize = u32::MAX as usize;

/// "has A×B×C elements per sample, more than the limit of …".
pub fn too_many_elements(dims: &[usize]) -> String {
    let dims: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    format!(
        "has {} elements per sample, more than the limit of {}",
        dims.join("×"),
        crate::summary::thousands(MAX_SIZE as u64)
    )
}

/// The product of `dims` if it is at most [`MAX_SIZE`].
pub fn checked_numel(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, d| acc.checked_mul(*d)).filter(|n| *n <= MAX_SIZE)
}

/// The batch dimension of a tensor type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Batch {
    /// Symbolic batch (`N`): any size at run time.
    Symbolic,
    /// A fixed batch size.
    Fixed(usize),
}

/// A tensor's static type: a batch dimension and the per-sample dimensions (all f32).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    /// The leading (batch) dimension.
    pub batch: Batch,
    /// The dimensions after the batch, e.g. `[C, H, W]`.
    pub dims: Vec<usize>,
}

impl TensorType {
    /// A symbolic-batch type with the given per-sample dimensions.
    pub fn new(dims: Vec<usize>) -> Self {
        TensorType { batch: Batch::Symbolic, dims }
    }

    /// A type with the same batch and new per-sample dimensions.
    pub fn with_dims(&self, dims: Vec<usize>) -> Self {
        TensorType { batch: self.batch, dims }
    }

    /// Rank counting the batch dimension (PyTorch's `dim()`).
    pub fn rank(&self) -> usize {
        self.dims.len() + 1
    }

    /// Elements per sample.
    pub fn numel_per_sample(&self) -> usize {
        self.dims.iter().product()
    }

    /// The full shape with a concrete batch size.
    pub fn concrete(&self, n: usize) -> Vec<usize> {
        let mut v = Vec::with_capacity(self.dims.len() + 1);
        v.push(match self.batch {
            Batch::Fixed(b) => b,
            Batch::Symbolic => n,
        });
        v.extend_from_slice(&self.dims);
        v
    }

    /// `(C, H, W)` if this is a 4-D (NCHW) type.
    pub fn chw(&self) -> Option<(usize, usize, usize)> {
        match self.dims.as_slice() {
            [c, h, w] => Some((*c, *h, *w)),
            _ => None,
        }
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.batch {
            Batch::Symbolic => write!(f, "[N")?,
            Batch::Fixed(b) => write!(f, "[{b}")?,
        }
        for d in &self.dims {
            write!(f, ", {d}")?;
        }
        write!(f, "]")
    }
}

/// Formats dims as `a×b×c = p`, the arithmetic shown in error messages.
pub fn product_text(dims: &[usize]) -> String {
    let p: usize = dims.iter().product();
    if dims.len() <= 1 {
        return p.to_string();
    }
    let s: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    format!("{} = {p}", s.join("×"))
}

/// One spatial axis of a sliding window (conv or pool).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Kernel extent.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Padding before (top/left).
    pub pad_begin: usize,
    /// Padding after (bottom/right).
    pub pad_end: usize,
    /// Dilation.
    pub dilation: usize,
    /// PyTorch's `ceil_mode` (pooling only).
    pub ceil_mode: bool,
}

/// The result of a window size computation: the output size and whether floor/ceil dropped
/// input rows that no window reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowOut {
    /// Output size.
    pub out: usize,
    /// Real input rows/columns at the end that no window covers (0 when the stride skips
    /// rows between windows anyway).
    pub dropped: usize,
}

/// Why a window does not fit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowError {
    /// The formula, e.g. `floor((3 + 0 + 0 − 5) / 1) + 1`.
    pub arithmetic: String,
    /// Padded input extent.
    pub padded: usize,
    /// Effective kernel extent `dilation×(kernel-1)+1`.
    pub effective_kernel: usize,
    /// The (non-positive) output size the formula gives.
    pub value: i128,
}

impl Window {
    /// Effective kernel extent `dilation × (kernel − 1) + 1`.
    pub fn effective_kernel(&self) -> usize {
        self.dilation * (self.kernel - 1) + 1
    }

    /// The output-size formula with the numbers filled in, e.g.
    /// `floor((224 + 1 + 1 − 11) / 4) + 1`.
    pub fn formula(&self, input: usize) -> String {
        let k = if self.dilation == 1 {
            format!("{}", self.kernel)
        } else {
            format!("{}×({}−1)+1", self.dilation, self.kernel)
        };
        let f = if self.ceil_mode { "ceil" } else { "floor" };
        format!("{f}(({input} + {} + {} − {k}) / {}) + 1", self.pad_begin, self.pad_end, self.stride)
    }

    /// PyTorch's output size for an input of extent `input`.
    ///
    /// Convolution: `floor((in + pb + pe − d·(k−1) − 1) / s) + 1`. Pooling with `ceil_mode`
    /// uses ceil, then drops the last window if it would start in the end padding
    /// (`(out−1)·s ≥ in + pb`), as `pooling_output_shape` does in ATen.
    pub fn output(&self, input: usize) -> Result<WindowOut, WindowError> {
        let padded = input + self.pad_begin + self.pad_end;
        let ek = self.effective_kernel();
        let arithmetic = || self.formula(input);
        if ek > padded {
            // In i128: with sizes up to MAX_SIZE, `ek` may exceed i64::MAX.
            let value = (padded as i128 - ek as i128).div_euclid(self.stride as i128) + 1;
            return Err(WindowError { arithmetic: arithmetic(), padded, effective_kernel: ek, value });
        }
        let span = padded - ek;
        let mut out = if self.ceil_mode { span.div_ceil(self.stride) + 1 } else { span / self.stride + 1 };
        if self.ceil_mode && out > 1 && (out - 1) * self.stride >= input + self.pad_begin {
            out -= 1;
        }
        // Real input rows after the last window. With stride > kernel, rows between windows
        // are skipped anyway; only a floor() that cuts off the end of an otherwise covered
        // input is worth a warning.
        let covered_end = (out - 1) * self.stride + ek;
        let real_end = self.pad_begin + input;
        let dropped = if self.stride > ek { 0 } else { real_end.saturating_sub(covered_end) };
        Ok(WindowOut { out, dropped })
    }
}

/// The `(begin, end)` padding PyTorch uses for `padding="same"`: the total
/// `dilation·(kernel−1)` split with the extra element at the end.
pub fn same_padding(kernel: usize, dilation: usize) -> (usize, usize) {
    let total = dilation * (kernel - 1);
    (total / 2, total - total / 2)
}

/// The adaptive-pooling window `[start, end)` for output index `i` (ATen's rule).
pub fn adaptive_window(i: usize, input: usize, output: usize) -> (usize, usize) {
    let start = (i * input) / output;
    let end = ((i + 1) * input).div_ceil(output);
    (start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(kernel: usize, stride: usize, pad: usize, dilation: usize, ceil_mode: bool) -> Window {
        Window { kernel, stride, pad_begin: pad, pad_end: pad, dilation, ceil_mode }
    }

    #[test]
    fn conv_formula_examples_from_the_notes() {
        // Seed 002: 6×6, k3, s2, p1 -> 3; 5×5, k3, s2, p0 -> 2.
        assert_eq!(w(3, 2, 1, 1, false).output(6).unwrap().out, 3);
        assert_eq!(w(3, 2, 0, 1, false).output(5).unwrap().out, 2);
        // AlexNet conv1: (224 + 2 - 11)/4 + 1 = 54: the last window ends at padded 223, so
        // real columns 222 and 223 (padded 223..225) are never seen.
        let o = w(11, 4, 1, 1, false).output(224).unwrap();
        assert_eq!((o.out, o.dropped), (54, 2));
        // ResNet's 3×3 stride-2 pad-1 conv on 56 only skips a padding row: no warning.
        assert_eq!(w(3, 2, 1, 1, false).output(56).unwrap().dropped, 0);
        // A 1×1 stride-2 conv skips every other row by design: no warning.
        assert_eq!(w(1, 2, 0, 1, false).output(56).unwrap().dropped, 0);
    }

    #[test]
    fn ceil_mode_window_must_start_inside() {
        // Seed 002: 5×5 maxpool k3 -> 1 (floor), 2 (ceil).
        assert_eq!(w(3, 3, 0, 1, false).output(5).unwrap().out, 1);
        assert_eq!(w(3, 3, 0, 1, true).output(5).unwrap().out, 2);
        // in=4, k=2, s=2, p=1, ceil: ceil((4+2-2)/2)+1 = 3; (3-1)*2=4 >= 4+1? no -> 3.
        assert_eq!(w(2, 2, 1, 1, true).output(4).unwrap().out, 3);
        // in=5, k=2, s=2, p=1, ceil: ceil(5/2)+1 = 4; (4-1)*2 = 6 >= 6 -> 3.
        assert_eq!(w(2, 2, 1, 1, true).output(5).unwrap().out, 3);
    }

    #[test]
    fn too_large_kernel_is_an_error() {
        let e = w(5, 1, 0, 1, false).output(3).unwrap_err();
        assert_eq!(e.padded, 3);
        assert_eq!(e.effective_kernel, 5);
    }

    #[test]
    fn same_padding_is_asymmetric_for_even_kernels() {
        assert_eq!(same_padding(3, 1), (1, 1));
        assert_eq!(same_padding(4, 1), (1, 2));
        assert_eq!(same_padding(2, 3), (1, 2));
    }

    #[test]
    fn adaptive_windows_match_aten() {
        assert_eq!(adaptive_window(0, 5, 3), (0, 2));
        assert_eq!(adaptive_window(1, 5, 3), (1, 4));
        assert_eq!(adaptive_window(2, 5, 3), (3, 5));
    }
}
