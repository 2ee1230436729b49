//! The runtime's typed errors. Every variant names what was expected and what was found.

use thiserror::Error;

/// Errors from loading weights, compiling or running a net.
#[derive(Debug, Error)]
pub enum Error {
    /// Wrong number of inputs.
    #[error("net `{net}` takes {expected} input(s), got {got}")]
    InputCount {
        /// Net name.
        net: String,
        /// Declared inputs.
        expected: usize,
        /// Given.
        got: usize,
    },
    /// An input has the wrong shape.
    #[error("input `{name}`: expected shape {expected}, found {found:?}")]
    InputShape {
        /// Input name.
        name: String,
        /// Declared type, e.g. `[N, 1, 28, 28]`.
        expected: String,
        /// The array's shape.
        found: Vec<usize>,
    },
    /// An input is not in standard (C-contiguous) layout.
    #[error(
        "input `{name}` with shape {shape:?} is not C-contiguous: expected strides {:?}, found {strides:?}; use `.as_standard_layout()`",
        standard_strides(.shape)
    )]
    NonContiguous {
        /// Input name.
        name: String,
        /// Shape.
        shape: Vec<usize>,
        /// Strides (elements).
        strides: Vec<isize>,
    },
    /// A batch of size zero or one too large to index.
    #[error("input `{name}`: batch size {batch} is not supported ({why})")]
    Batch {
        /// Input name.
        name: String,
        /// Batch size.
        batch: usize,
        /// Reason.
        why: String,
    },
    /// Weights do not fit the net.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// The graph failed verification.
    #[error("invalid graph: {0}")]
    Graph(#[from] cnnc_compiler::graph::VerifyError),
    /// Code generation failed for a node.
    #[error("JIT compilation of `{node}` failed: {message}")]
    Jit {
        /// Node name.
        node: String,
        /// Cranelift's message.
        message: String,
    },
    /// An op or configuration this backend does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A training graph could not be built.
    #[error(transparent)]
    Autodiff(#[from] cnnc_compiler::autodiff::AutodiffError),
    /// A training step produced a NaN or infinity.
    #[error("step {step}: {what} is not finite; the first non-finite tensor is `{tensor}`")]
    NonFinite {
        /// The step (1-based).
        step: u64,
        /// What went non-finite (`the loss`, `a gradient`).
        what: String,
        /// The first tensor, in the order computed, with a NaN or infinity.
        tensor: String,
    },
    /// A training step that cannot be taken (e.g. BatchNorm over one value per channel).
    #[error("training: {0}")]
    Train(String),
    /// Optimizer state that does not fit the optimizer or the net.
    #[error("optimizer state: {0}")]
    OptimizerState(String),
    /// A training target that does not fit the loss (a class index out of range, a BCE
    /// target outside [0, 1]).
    #[error("target: {0}")]
    Target(String),
    /// A fusion pass failed (a bug in the pass: the unfused graph still compiles, with
    /// `Options::fuse` off).
    #[error("fusion of `{net}` failed: {message}")]
    Fusion {
        /// Net name.
        net: String,
        /// What went wrong.
        message: String,
    },
}

/// Errors about weights files and their fit to a net.
#[derive(Debug, Error)]
pub enum WeightsError {
    /// Keys missing, unexpected or mis-shaped, all listed.
    #[error("weights do not match net `{net}`:{}", list_mismatch(.missing, .unexpected, .misshaped))]
    Mismatch {
        /// Net name.
        net: String,
        /// Keys the net declares that the file lacks.
        missing: Vec<String>,
        /// Keys in the file the net does not declare.
        unexpected: Vec<String>,
        /// `(key, expected, found)`.
        misshaped: Vec<(String, Vec<usize>, Vec<usize>)>,
    },
    /// A tensor has an unsupported dtype.
    #[error("`{key}`: expected dtype {expected}, found {found}")]
    DType {
        /// Key.
        key: String,
        /// Wanted.
        expected: String,
        /// Found.
        found: String,
    },
    /// The file is not valid safetensors.
    #[error("malformed safetensors data{}: {message}", .path.as_ref().map(|p| format!(" in {p}")).unwrap_or_default())]
    Format {
        /// File, if known.
        path: Option<String>,
        /// Parser message.
        message: String,
    },
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
}

/// The strides (in elements) of a C-contiguous array of this shape.
fn standard_strides(shape: &[usize]) -> Vec<isize> {
    let mut strides = vec![1isize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1] as isize;
    }
    strides
}

fn list_mismatch(missing: &[String], unexpected: &[String], misshaped: &[(String, Vec<usize>, Vec<usize>)]) -> String {
    let mut s = String::new();
    for (k, e, f) in misshaped {
        s += &format!("\n  {k}: expected {e:?}, found {f:?}");
    }
    for k in missing {
        s += &format!("\n  missing: {k}");
    }
    for k in unexpected {
        s += &format!("\n  unexpected: {k}");
    }
    s
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
