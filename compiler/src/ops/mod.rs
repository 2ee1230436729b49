//! The op table. Every op is declared once, in one file of this module: its PyTorch name and
//! argument signature, its shape rule, its parameters (names and shapes, as in a PyTorch
//! `state_dict`) and its MAC count. The reference semantics of each op live in the runtime's
//! interpreter (`cnnc_runtime::interp`), which is the spec the JIT is tested against.
//!
//! Adding an op: write its struct and [`OpDef`] impl in a file here, add a variant to [`Op`]
//! and a line to [`Op::def`] and [`LAYERS`] (for DSL layers) — nothing else matches on ops to
//! compute shapes or counts.

pub mod args;
mod conv;
mod linear;
mod misc;
mod norm;
mod pool;
pub mod train;

pub use conv::{Conv2d, PaddingMode, PaddingSpec};
pub use linear::Linear;
pub use misc::{Activation, Add, Concat, Dropout, Flatten, Limit, Reduce, ReduceKind, Softmax};
pub use norm::BatchNorm2d;
pub use pool::{AdaptiveAvgPool2d, AvgPool2d, MaxPool2d};
pub use train::{Loss, Reduction, TrainOp};

use crate::diag::Diagnostic;
use crate::diag::SrcSpan as Span;
use crate::shape::TensorType;
use args::{Arg, Bound, ParamSig};

/// What a parameter tensor is, in PyTorch's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamKind {
    /// A learnable weight (`weight`).
    Weight,
    /// A learnable bias (`bias`).
    Bias,
    /// A buffer (`running_mean`, `running_var`, `num_batches_tracked`): saved in the
    /// `state_dict` but not counted by `sum(p.numel() for p in model.parameters())`.
    Buffer,
}

/// Element type of a parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 64-bit integer (`num_batches_tracked`).
    I64,
}

/// A parameter an op owns: the `state_dict` key suffix and its shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    /// Key suffix, e.g. `weight`.
    pub suffix: &'static str,
    /// Shape.
    pub shape: Vec<usize>,
    /// Weight, bias or buffer.
    pub kind: ParamKind,
    /// Element type.
    pub dtype: DType,
}

impl ParamSpec {
    /// An f32 parameter.
    pub fn f32(suffix: &'static str, shape: Vec<usize>, kind: ParamKind) -> Self {
        ParamSpec { suffix, shape, kind, dtype: DType::F32 }
    }
}

/// An input operand as seen by a shape rule: its type, who produced it (for messages) and,
/// when it came out of a Flatten, the dimensions that were multiplied together.
#[derive(Clone, Copy, Debug)]
pub struct Operand<'a> {
    /// The operand's type.
    pub ty: &'a TensorType,
    /// A short description of the producer (`Flatten`, `conv4`, `input x`).
    pub producer: &'a str,
    /// For a flattened operand, the factors of its last dimension.
    pub factors: Option<&'a [usize]>,
}

impl Operand<'_> {
    /// `384×5×5 = 9600` for a flattened operand, else the plain number.
    pub fn last_dim_text(&self) -> String {
        let last = self.ty.dims.last().copied().unwrap_or(0);
        match self.factors {
            Some(f) if f.len() > 1 && f.iter().product::<usize>() == last => crate::shape::product_text(f),
            _ => last.to_string(),
        }
    }
}

/// A successful shape inference.
#[derive(Clone, Debug, PartialEq)]
pub struct Inferred {
    /// The output type.
    pub ty: TensorType,
    /// Warnings, e.g. "floor() drops the last 3 input columns".
    pub warnings: Vec<String>,
}

impl Inferred {
    /// An output type with no warnings.
    pub fn ok(ty: TensorType) -> Self {
        Inferred { ty, warnings: vec![] }
    }
}

/// A shape error: the message states the expected and actual values; notes carry the
/// arithmetic. `recovered` is the output the layer would have produced had its input been
/// right, so checking continues without a cascade of follow-on errors.
#[derive(Clone, Debug, PartialEq)]
pub struct OpError {
    /// Main message.
    pub message: String,
    /// Notes (arithmetic).
    pub notes: Vec<String>,
    /// The output to continue with, if one can be known.
    pub recovered: Option<TensorType>,
}

impl OpError {
    /// A new error with no recovery.
    pub fn new(message: impl Into<String>) -> Self {
        OpError { message: message.into(), notes: vec![], recovered: None }
    }
    /// Adds a note.
    pub fn note(mut self, n: impl Into<String>) -> Self {
        self.notes.push(n.into());
        self
    }
    /// Sets the type to continue with.
    pub fn recover(mut self, ty: TensorType) -> Self {
        self.recovered = Some(ty);
        self
    }
}

/// How many inputs an op takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arity {
    /// Exactly this many.
    Exactly(usize),
    /// At least this many.
    AtLeast(usize),
}

/// The declaration of one op.
pub trait OpDef {
    /// The PyTorch class name (`Conv2d`).
    fn kind(&self) -> &'static str;
    /// Number of tensor inputs.
    fn arity(&self) -> Arity {
        Arity::Exactly(1)
    }
    /// The shape rule.
    fn infer(&self, inputs: &[Operand<'_>]) -> Result<Inferred, OpError>;
    /// Parameters in `state_dict` order.
    fn params(&self) -> Vec<ParamSpec> {
        vec![]
    }
    /// Multiply-accumulates per sample.
    fn macs(&self, _inputs: &[&TensorType], _output: &TensorType) -> u64 {
        0
    }
    /// PyTorch-style repr, e.g. `Conv2d(3, 32, kernel_size=(5, 5), padding=(2, 2))`.
    fn describe(&self) -> String;
}

/// A fused epilogue of a Conv2d or Linear kernel, applied in this order while the result is
/// still in registers: per-channel `scale`/`shift` (an unfolded BatchNorm), a residual add
/// (an extra input), an activation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Epilogue {
    /// Per-output-channel `y = y·scale + shift` (params `scale`, `shift`).
    pub scale_shift: bool,
    /// Adds the op's second input elementwise.
    pub residual: bool,
    /// Activation applied last.
    pub act: Option<Activation>,
}

impl Epilogue {
    /// Whether nothing is fused.
    pub fn is_empty(&self) -> bool {
        !self.scale_shift && !self.residual && self.act.is_none()
    }

    pub(crate) fn describe(&self) -> String {
        let mut parts = vec![];
        if self.scale_shift {
            parts.push("scale_shift".to_string());
        }
        if self.residual {
            parts.push("+residual".to_string());
        }
        if let Some(a) = self.act {
            parts.push(a.kind_name().to_lowercase());
        }
        if parts.is_empty() { String::new() } else { format!(" ⇒ {}", parts.join(" ⇒ ")) }
    }

    pub(crate) fn params(&self, channels: usize) -> Vec<ParamSpec> {
        if self.scale_shift {
            vec![
                ParamSpec::f32("scale", vec![channels], ParamKind::Buffer),
                ParamSpec::f32("shift", vec![channels], ParamKind::Buffer),
            ]
        } else {
            vec![]
        }
    }
}

/// An op in the graph IR.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A graph input.
    Input,
    /// `nn.Conv2d`.
    Conv2d(Conv2d),
    /// `nn.Linear`.
    Linear(Linear),
    /// `nn.MaxPool2d`.
    MaxPool2d(MaxPool2d),
    /// `nn.AvgPool2d`.
    AvgPool2d(AvgPool2d),
    /// `nn.AdaptiveAvgPool2d`.
    AdaptiveAvgPool2d(AdaptiveAvgPool2d),
    /// `nn.BatchNorm2d` (inference).
    BatchNorm2d(BatchNorm2d),
    /// `nn.ReLU`, `nn.Sigmoid`, `nn.Tanh`, `nn.Hardtanh`/`nn.ReLU6`.
    Activation(Activation),
    /// `nn.Dropout` (identity at inference).
    Dropout(Dropout),
    /// `nn.Flatten`.
    Flatten(Flatten),
    /// `a + b`.
    Add(Add),
    /// `torch.cat`.
    Concat(Concat),
    /// `x.mean(dim=…)`, `x.amax(dim=…)`, `x.max(dim=d)[0]`.
    Reduce(Reduce),
    /// `nn.Softmax(dim)` (inference only).
    Softmax(Softmax),
    /// A training op (training-mode forward, loss, backward), made by [`crate::autodiff`].
    Train(TrainOp),
}

struct InputDef;
impl OpDef for InputDef {
    fn kind(&self) -> &'static str {
        "Input"
    }
    fn arity(&self) -> Arity {
        Arity::Exactly(0)
    }
    fn infer(&self, _: &[Operand<'_>]) -> Result<Inferred, OpError> {
        Err(OpError::new("an input's type is declared, not inferred"))
    }
    fn describe(&self) -> String {
        "Input".into()
    }
}

impl Op {
    /// The op's declaration (the one place that dispatches on the variant).
    pub fn def(&self) -> &dyn OpDef {
        match self {
            Op::Input => &InputDef,
            Op::Conv2d(o) => o,
            Op::Linear(o) => o,
            Op::MaxPool2d(o) => o,
            Op::AvgPool2d(o) => o,
            Op::AdaptiveAvgPool2d(o) => o,
            Op::BatchNorm2d(o) => o,
            Op::Activation(o) => o,
            Op::Dropout(o) => o,
            Op::Flatten(o) => o,
            Op::Add(o) => o,
            Op::Concat(o) => o,
            Op::Reduce(o) => o,
            Op::Softmax(o) => o,
            Op::Train(o) => o,
        }
    }

    /// The PyTorch class name.
    pub fn kind(&self) -> &'static str {
        self.def().kind()
    }
}

/// A DSL layer constructor: PyTorch name, signature, and how to build the op from bound
/// arguments.
pub struct LayerCtor {
    /// PyTorch class name.
    pub name: &'static str,
    /// Signature, in PyTorch's positional order.
    pub sig: &'static [ParamSig],
    /// Builds the op, validating arguments that do not depend on the input shape.
    pub build: fn(&Bound) -> Result<Op, Vec<Diagnostic>>,
}

/// Every layer the DSL can construct.
pub const LAYERS: &[LayerCtor] = &[
    conv::CTOR,
    linear::CTOR,
    pool::MAX_CTOR,
    pool::AVG_CTOR,
    pool::ADAPTIVE_AVG_CTOR,
    norm::CTOR,
    misc::RELU_CTOR,
    misc::SIGMOID_CTOR,
    misc::TANH_CTOR,
    misc::RELU6_CTOR,
    misc::HARDTANH_CTOR,
    misc::LEAKY_RELU_CTOR,
    misc::DROPOUT_CTOR,
    misc::FLATTEN_CTOR,
    misc::SOFTMAX_CTOR,
];

/// Looks up a layer constructor by its PyTorch name.
pub fn layer_ctor(name: &str) -> Option<&'static LayerCtor> {
    LAYERS.iter().find(|c| c.name == name)
}

/// Constructs a layer from DSL arguments.
pub fn construct(ctor: &'static LayerCtor, args: &[Arg], span: Span) -> Result<Op, Vec<Diagnostic>> {
    let bound = Bound::bind(ctor.name, ctor.sig, args, span)?;
    let op = (ctor.build)(&bound)?;
    // Each argument is within MAX_SIZE, but a weight multiplies several of them.
    let too_large: Vec<Diagnostic> = op
        .def()
        .params()
        .iter()
        .filter(|p| crate::shape::checked_numel(&p.shape).is_none())
        .map(|p| {
            let dims: Vec<String> = p.shape.iter().map(|d| d.to_string()).collect();
            Diagnostic::error(
                span,
                format!(
                    "{}: its `{}` of {} elements is too large (the limit is {})",
                    op.def().describe(),
                    p.suffix,
                    dims.join("×"),
                    crate::summary::thousands(crate::shape::MAX_SIZE as u64)
                ),
            )
        })
        .collect();
    if too_large.is_empty() { Ok(op) } else { Err(too_large) }
}

/// Collects single-argument results into one list of diagnostics.
pub(crate) fn collect<T>(r: Result<T, Diagnostic>, errs: &mut Vec<Diagnostic>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            errs.push(e);
            None
        }
    }
}

/// Formats an `(h, w)` pair as PyTorch prints it.
pub(crate) fn pair_text(p: (usize, usize)) -> String {
    format!("({}, {})", p.0, p.1)
}

/// The error for an operand that is not NCHW.
pub(crate) fn need_nchw(what: &str, x: &Operand<'_>) -> OpError {
    OpError::new(format!("{what} expects a 4-D input [N, C, H, W], but {} gives {}", x.producer, x.ty))
}
