//! # cnnc-onnx
//!
//! ONNX import: an `.onnx` file becomes a cnnc [`Graph`] (every op through the op table's
//! shape rules, as if declared in the DSL), its weights in the graph's parameter order, and
//! readable `.cnn` source that compiles to the same graph.
//!
//! - Parsing: prost types generated once from the vendored `onnx.proto` (`proto.rs`; no
//!   `protoc` needed to build). Initializers inline or in external data files (paths confined
//!   to the model's folder). Opsets 6–25 of the default domain, with the opset-dependent forms
//!   (`Clip`/`Pad`/`Squeeze`/`Unsqueeze`/`Slice`/`ReduceMean`/`ReduceMax` arguments as
//!   attributes or inputs).
//! - Folding: constant subgraphs (`Constant`, `Shape`, `Gather`, `Unsqueeze`, `Squeeze`,
//!   `Concat`, `Cast`, `Identity`, `ConstantOfShape`, `Slice`, `Reshape`, integer
//!   `Add`/`Sub`/`Mul`/`Div`, `Transpose`) fold at import with the batch size kept symbolic, so
//!   `x.view(x.size(0), -1)` becomes a Flatten; `MatMul` + `Add` becomes one `Linear`; a `Pad`
//!   feeding a `Conv` becomes the conv's padding (and `padding_mode`); any other zero, reflect,
//!   edge or wrap `Pad` runs as a 1×1 depthwise conv of weight 1 with that padding.
//! - Ops: see [`SUPPORTED_OPS`]; `Add`/`Sub`/`Mul`/`Div` with a per-channel (or single)
//!   constant on an NCHW tensor become a 1×1 depthwise conv. A model with anything else is refused with one error that lists
//!   every unsupported node (name, op, opset, why); nothing panics on a malformed file.
//!
//! The batch dimension of every graph input becomes the IR's symbolic batch `N` (a model
//! exported at batch 1 runs at any batch); other dimensions must be fixed, or given in
//! [`Options::dims`].
#![warn(missing_docs)]

mod import;
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto;
pub mod tensor;

use cnnc_compiler::Graph;
use prost::Message;
use std::fmt;
use std::path::Path;

pub use tensor::{Const, Data, Sym};

/// The ops the importer maps (default domain).
pub const SUPPORTED_OPS: &[&str] = &[
    "Conv",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "BatchNormalization",
    "Gemm",
    "MatMul",
    "Relu",
    "Sigmoid",
    "Tanh",
    "Clip",
    "LeakyRelu",
    "Softmax",
    "Flatten",
    "Reshape",
    "Squeeze",
    "Add",
    "Concat",
    "ReduceMean",
    "ReduceMax",
    "Pad",
    "Dropout",
    "Identity",
    // Folded when their inputs are constants (or shapes):
    "Constant",
    "Shape",
    "Gather",
    "Unsqueeze",
    "Cast",
    "ConstantOfShape",
    "Slice",
    "Sub",
    "Mul",
    "Div",
    "Transpose",
];

/// One node the importer cannot map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsupported {
    /// The node's name (or `#index` if it has none).
    pub node: String,
    /// Its op type (with the domain if not the default one).
    pub op: String,
    /// The opset the model imports.
    pub opset: i64,
    /// Why.
    pub reason: String,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node `{}` ({}, opset {}): {}", self.node, self.op, self.opset, self.reason)
    }
}

/// Why a model could not be imported.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The bytes are not a protobuf `ModelProto`.
    #[error("not an ONNX model: {0}")]
    Decode(String),
    /// The file could not be read.
    #[error("cannot read `{path}`: {message}")]
    Io {
        /// The path.
        path: String,
        /// The OS error.
        message: String,
    },
    /// The model is well-formed but uses what cnnc does not run.
    #[error("{} unsupported node{}:\n  {}\n(cnnc imports {})", .0.len(), if .0.len() == 1 { "" } else { "s" },
        .0.iter().map(|u| u.to_string()).collect::<Vec<_>>().join("\n  "), SUPPORTED_OPS.join(", "))]
    Unsupported(Vec<Unsupported>),
    /// A tensor's data is malformed.
    #[error("tensor `{name}`: {message}")]
    Tensor {
        /// The tensor's name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// The model itself is malformed (a missing input, a bad attribute, a shape error).
    #[error("{0}")]
    Invalid(String),
}

/// Import options.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The net's name in the `.cnn` source (default: from the file name, else the graph's).
    pub name: Option<String>,
    /// Graph inputs (or initializers) to bind to constants: ONNX node tests pass weights as
    /// inputs; a bound initializer's values in the file are not read.
    pub bind: Vec<(String, Const)>,
    /// Per-sample dimensions for inputs whose dimensions are symbolic (or to override them):
    /// by input name, or (`None`) for the data inputs in order.
    pub dims: Vec<(Option<String>, Vec<usize>)>,
}

/// A parameter's values, in the order of [`Graph::params`].
#[derive(Clone, Debug, PartialEq)]
pub enum ParamValue {
    /// A float tensor, row-major.
    F32(Vec<f32>),
    /// An integer tensor (`num_batches_tracked`).
    I64(Vec<i64>),
}

/// An imported model.
#[derive(Clone, Debug)]
pub struct Imported {
    /// The graph (symbolic batch; parameters keyed `<layer>.weight`, …).
    pub graph: Graph,
    /// One value per entry of `graph.params`.
    pub values: Vec<ParamValue>,
    /// `.cnn` source declaring the same net (same layers, keys and shapes).
    pub source: String,
    /// What the importer folded or rewrote, one line each.
    pub notes: Vec<String>,
    /// The default-domain opset the model imports.
    pub opset: i64,
    /// `producer_name producer_version` from the file.
    pub producer: String,
}

/// Imports the model at `path` (external data is read relative to its folder).
pub fn import_file(path: &Path, opts: &Options) -> Result<Imported, ImportError> {
    let bytes = std::fs::read(path)
        .map_err(|e| ImportError::Io { path: path.display().to_string(), message: e.to_string() })?;
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
    let dir = path.parent().map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p });
    // Owned bytes: the tensors' data is decoded as views of this buffer, not copies.
    import_buffer(prost::bytes::Bytes::from(bytes), dir, opts, stem.as_deref())
}

/// Imports a model from its bytes; `dir` is where external data lives (`None` refuses it).
pub fn import_bytes(bytes: &[u8], dir: Option<&Path>, opts: &Options) -> Result<Imported, ImportError> {
    import_buffer(prost::bytes::Bytes::copy_from_slice(bytes), dir, opts, None)
}

fn import_buffer(
    bytes: prost::bytes::Bytes,
    dir: Option<&Path>,
    opts: &Options,
    default_name: Option<&str>,
) -> Result<Imported, ImportError> {
    let model = proto::ModelProto::decode(bytes).map_err(|e| ImportError::Decode(e.to_string()))?;
    import::import(&model, dir, opts, default_name)
}

/// Reads a serialized `TensorProto` (the `.pb` files of ONNX's test data sets).
pub fn read_tensor(bytes: &[u8]) -> Result<Const, ImportError> {
    let t = proto::TensorProto::decode(bytes).map_err(|e| ImportError::Decode(e.to_string()))?;
    tensor::decode(&t, None)
}
