//! `nn.Conv2d`: signature, shape rule (PyTorch's formula with dilation, `"same"`/`"valid"`
//! padding and the four padding modes), parameters and MACs.

use super::args::{Bound, opt, req};
use super::{
    Arity, Epilogue, Inferred, LayerCtor, Op, OpDef, OpError, Operand, ParamKind, ParamSpec, collect, need_nchw,
    pair_text,
};
use crate::diag::Diagnostic;
use crate::ops::args::ArgValue;
use crate::shape::{Window, same_padding};

/// How the border is filled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PaddingMode {
    /// Zeros (the default).
    Zeros,
    /// Mirror without repeating the edge (`reflect`).
    Reflect,
    /// Repeat the edge value (`replicate`).
    Replicate,
    /// Wrap around (`circular`).
    Circular,
}

impl PaddingMode {
    /// PyTorch's name.
    pub fn name(self) -> &'static str {
        match self {
            PaddingMode::Zeros => "zeros",
            PaddingMode::Reflect => "reflect",
            PaddingMode::Replicate => "replicate",
            PaddingMode::Circular => "circular",
        }
    }
}

/// How padding was written, kept for the repr.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PaddingSpec {
    /// `padding=(h, w)` or an int.
    Explicit(usize, usize),
    /// `padding="same"`.
    Same,
    /// `padding="valid"`.
    Valid,
    /// `padding=(top, bottom, left, right)`: a cnnc extension for asymmetric padding (ONNX's
    /// explicit `pads` and `auto_pad="SAME_UPPER"` on strided convolutions).
    Sides(usize, usize, usize, usize),
}

/// A 2-D convolution, optionally with a fused epilogue.
#[derive(Clone, Debug, PartialEq)]
pub struct Conv2d {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// `(kh, kw)`.
    pub kernel: (usize, usize),
    /// `(sh, sw)`.
    pub stride: (usize, usize),
    /// Padding as written.
    pub padding: PaddingSpec,
    /// `(dh, dw)`.
    pub dilation: (usize, usize),
    /// Groups (`in_channels` for depthwise).
    pub groups: usize,
    /// Whether there is a bias.
    pub bias: bool,
    /// Border fill.
    pub padding_mode: PaddingMode,
    /// Fused epilogue (set by passes, empty as declared).
    pub epilogue: Epilogue,
}

impl Conv2d {
    /// Padding `(top, bottom, left, right)`.
    pub fn pads(&self) -> (usize, usize, usize, usize) {
        match self.padding {
            PaddingSpec::Explicit(h, w) => (h, h, w, w),
            PaddingSpec::Valid => (0, 0, 0, 0),
            PaddingSpec::Sides(t, b, l, r) => (t, b, l, r),
            PaddingSpec::Same => {
                let (t, b) = same_padding(self.kernel.0, self.dilation.0);
                let (l, r) = same_padding(self.kernel.1, self.dilation.1);
                (t, b, l, r)
            }
        }
    }

    /// The vertical and horizontal windows.
    pub fn windows(&self) -> (Window, Window) {
        let (t, b, l, r) = self.pads();
        (
            Window {
                kernel: self.kernel.0,
                stride: self.stride.0,
                pad_begin: t,
                pad_end: b,
                dilation: self.dilation.0,
                ceil_mode: false,
            },
            Window {
                kernel: self.kernel.1,
                stride: self.stride.1,
                pad_begin: l,
                pad_end: r,
                dilation: self.dilation.1,
                ceil_mode: false,
            },
        )
    }

    /// Weight shape `[out, in/groups, kh, kw]`.
    pub fn weight_shape(&self) -> Vec<usize> {
        vec![self.out_channels, self.in_channels / self.groups, self.kernel.0, self.kernel.1]
    }
}

fn build(b: &Bound) -> Result<Op, Vec<Diagnostic>> {
    let mut errs = vec![];
    let in_channels = collect(b.positive("in_channels", 1), &mut errs);
    let out_channels = collect(b.positive("out_channels", 1), &mut errs);
    let kernel = collect(b.pair("kernel_size", (1, 1), 1), &mut errs);
    let stride = collect(b.pair("stride", (1, 1), 1), &mut errs);
    let dilation = collect(b.pair("dilation", (1, 1), 1), &mut errs);
    let groups = collect(b.positive("groups", 1), &mut errs);
    let bias = collect(b.bool("bias", true), &mut errs);
    let padding = match (b.raw("padding"), b.sides("padding")) {
        (_, Some(sides)) => collect(sides, &mut errs).map(|[t, b, l, r]| PaddingSpec::Sides(t, b, l, r)),
        (None, _) => Some(PaddingSpec::Explicit(0, 0)),
        (Some((ArgValue::Str(s), span)), _) => match s.as_str() {
            "same" => Some(PaddingSpec::Same),
            "valid" => Some(PaddingSpec::Valid),
            other => {
                errs.push(
                    Diagnostic::error(span, format!("Conv2d: unknown padding string {other:?}"))
                        .help("padding is an int, an (h, w) tuple, \"same\" or \"valid\""),
                );
                None
            }
        },
        (Some(_), None) => collect(b.pair("padding", (0, 0), 0), &mut errs).map(|(h, w)| PaddingSpec::Explicit(h, w)),
    };
    let padding_mode = match b.raw("padding_mode") {
        None => Some(PaddingMode::Zeros),
        Some((ArgValue::Str(s), span)) => {
            let modes = [PaddingMode::Zeros, PaddingMode::Reflect, PaddingMode::Replicate, PaddingMode::Circular];
            match modes.iter().find(|m| m.name() == s) {
                Some(m) => Some(*m),
                None => {
                    let names: Vec<&str> = modes.iter().map(|m| m.name()).collect();
                    let mut d = Diagnostic::error(span, format!("Conv2d: unknown padding_mode {s:?}"));
                    d = match crate::diag::suggest(s, &names) {
                        Some(g) => d.help(format!("did you mean \"{g}\"?")),
                        None => d.help("padding_mode is one of \"zeros\", \"reflect\", \"replicate\", \"circular\""),
                    };
                    errs.push(d);
                    None
                }
            }
        }
        Some((v, span)) => {
            errs.push(Diagnostic::error(span, format!("Conv2d: `padding_mode` must be a string, found `{v}`")));
            None
        }
    };
    let (
        Some(in_channels),
        Some(out_channels),
        Some(kernel),
        Some(stride),
        Some(dilation),
        Some(groups),
        Some(bias),
        Some(padding),
        Some(padding_mode),
    ) = (in_channels, out_channels, kernel, stride, dilation, groups, bias, padding, padding_mode)
    else {
        return Err(errs);
    };
    let gspan = b.span_of("groups");
    if in_channels % groups != 0 {
        errs.push(
            Diagnostic::error(gspan, format!("Conv2d: groups={groups} does not divide in_channels={in_channels}"))
                .note(format!("{in_channels} % {groups} = {}", in_channels % groups)),
        );
    }
    if out_channels % groups != 0 {
        errs.push(
            Diagnostic::error(gspan, format!("Conv2d: groups={groups} does not divide out_channels={out_channels}"))
                .note(format!("{out_channels} % {groups} = {}", out_channels % groups)),
        );
    }
    if padding == PaddingSpec::Same && stride != (1, 1) {
        errs.push(Diagnostic::error(
            b.span_of("padding"),
            "Conv2d: padding=\"same\" is not supported for strided convolutions (as in PyTorch)",
        ));
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(Op::Conv2d(Conv2d {
        in_channels,
        out_channels,
        kernel,
        stride,
        padding,
        dilation,
        groups,
        bias,
        padding_mode,
        epilogue: Epilogue::default(),
    }))
}

pub(super) const CTOR: LayerCtor = LayerCtor {
    name: "Conv2d",
    sig: &[
        req("in_channels"),
        req("out_channels"),
        req("kernel_size"),
        opt("stride"),
        opt("padding"),
        opt("dilation"),
        opt("groups"),
        opt("bias"),
        opt("padding_mode"),
    ],
    build,
};

impl OpDef for Conv2d {
    fn kind(&self) -> &'static str {
        "Conv2d"
    }

    fn arity(&self) -> Arity {
        Arity::Exactly(if self.epilogue.residual { 2 } else { 1 })
    }

    fn infer(&self, inputs: &[Operand<'_>]) -> Result<Inferred, OpError> {
        let x = &inputs[0];
        let Some((c, h, w)) = x.ty.chw() else {
            return Err(need_nchw(&self.describe(), x));
        };
        let (wh, ww) = self.windows();
        let mut warnings = vec![];
        let mut dims = [0usize; 2];
        let mut first_err: Option<OpError> = None;
        for (i, (win, size, axis)) in [(wh, h, "height"), (ww, w, "width")].into_iter().enumerate() {
            match win.output(size) {
                Ok(o) => {
                    dims[i] = o.out;
                    if o.dropped > 0 {
                        warnings.push(format!(
                            "output {axis} {} = {} drops the last {} input {} (never covered by the kernel)",
                            o.out,
                            win.formula(size),
                            o.dropped,
                            if i == 0 { "rows" } else { "columns" }
                        ));
                    }
                    if self.padding_mode == PaddingMode::Reflect && (win.pad_begin >= size || win.pad_end >= size) {
                        first_err.get_or_insert(OpError::new(format!(
                            "{}: reflect padding {} must be smaller than the input {axis} {size}",
                            self.describe(),
                            win.pad_begin.max(win.pad_end)
                        )));
                    }
                    if self.padding_mode == PaddingMode::Circular && (win.pad_begin > size || win.pad_end > size) {
                        first_err.get_or_insert(OpError::new(format!(
                            "{}: circular padding {} must not exceed the input {axis} {size}",
                            self.describe(),
                            win.pad_begin.max(win.pad_end)
                        )));
                    }
                }
                Err(e) => {
                    let (kh, kw) =
                        (self.dilation.0 * (self.kernel.0 - 1) + 1, self.dilation.1 * (self.kernel.1 - 1) + 1);
                    let (t, bt, l, r) = self.pads();
                    let out = e.value;
                    first_err.get_or_insert(
                        OpError::new(format!(
                            "{}: kernel {kh}×{kw} is larger than the padded input {}×{} (input {h}×{w} from {} plus padding); the output {axis} would be {out} ≤ 0",
                            self.describe(),
                            h + t + bt,
                            w + l + r,
                            x.producer
                        ))
                        .note(format!("output {axis} = {} = {out}", e.arithmetic)),
                    );
                }
            }
        }
        let out_ty = x.ty.with_dims(vec![self.out_channels, dims[0].max(1), dims[1].max(1)]);
        if c != self.in_channels {
            return Err(OpError::new(format!(
                "{} expects {} input channels, but {} gives {c} channels ({})",
                self.describe(),
                self.in_channels,
                x.producer,
                x.ty
            ))
            .recover(out_ty));
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        if self.epilogue.residual {
            let r = &inputs[1];
            if r.ty != &out_ty {
                return Err(OpError::new(format!(
                    "{}: fused residual must be {out_ty}, but {} gives {}",
                    self.describe(),
                    r.producer,
                    r.ty
                )));
            }
        }
        Ok(Inferred { ty: out_ty, warnings })
    }

    fn params(&self) -> Vec<ParamSpec> {
        let mut p = vec![ParamSpec::f32("weight", self.weight_shape(), ParamKind::Weight)];
        if self.bias {
            p.push(ParamSpec::f32("bias", vec![self.out_channels], ParamKind::Bias));
        }
        p.extend(self.epilogue.params(self.out_channels));
        p
    }

    fn macs(&self, _inputs: &[&crate::shape::TensorType], output: &crate::shape::TensorType) -> u64 {
        (output.numel_per_sample() * (self.in_channels / self.groups) * self.kernel.0 * self.kernel.1) as u64
    }

    fn describe(&self) -> String {
        let mut s =
            format!("Conv2d({}, {}, kernel_size={}", self.in_channels, self.out_channels, pair_text(self.kernel));
        if self.stride != (1, 1) {
            s += &format!(", stride={}", pair_text(self.stride));
        }
        match self.padding {
            PaddingSpec::Explicit(0, 0) => {}
            PaddingSpec::Explicit(h, w) => s += &format!(", padding={}", pair_text((h, w))),
            PaddingSpec::Same => s += ", padding=same",
            PaddingSpec::Valid => s += ", padding=valid",
            PaddingSpec::Sides(t, b, l, r) => s += &format!(", padding=({t}, {b}, {l}, {r})"),
        }
        if self.dilation != (1, 1) {
            s += &format!(", dilation={}", pair_text(self.dilation));
        }
        if self.groups != 1 {
            s += &format!(", groups={}", self.groups);
        }
        if !self.bias {
            s += ", bias=False";
        }
        if self.padding_mode != PaddingMode::Zeros {
            s += &format!(", padding_mode={}", self.padding_mode.name());
        }
        s + ")" + &self.epilogue.describe()
    }
}
