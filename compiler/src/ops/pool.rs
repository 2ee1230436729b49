//! Pooling: `nn.MaxPool2d`, `nn.AvgPool2d`, `nn.AdaptiveAvgPool2d`. Stride defaults to the
//! kernel; `ceil_mode` follows ATen's `pooling_output_shape` (the last window must start
//! inside the input or the left padding).

use super::args::{ArgValue, Bound, opt, req};
use super::{Inferred, LayerCtor, Op, OpDef, OpError, Operand, collect, need_nchw, pair_text};
use crate::diag::Diagnostic;
use crate::shape::{MAX_SIZE, Window};
use crate::summary::thousands;

/// `nn.MaxPool2d`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MaxPool2d {
    /// `(kh, kw)`.
    pub kernel: (usize, usize),
    /// `(sh, sw)`.
    pub stride: (usize, usize),
    /// `(ph, pw)`, implicit `-inf` (the top and left padding).
    pub padding: (usize, usize),
    /// The bottom and right padding when they differ from `padding` (ONNX's explicit or
    /// SAME pads; `padding = (top, bottom, left, right)` in the DSL).
    pub padding_end: Option<(usize, usize)>,
    /// `(dh, dw)`.
    pub dilation: (usize, usize),
    /// Ceil instead of floor.
    pub ceil_mode: bool,
}

/// `nn.AvgPool2d`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AvgPool2d {
    /// `(kh, kw)`.
    pub kernel: (usize, usize),
    /// `(sh, sw)`.
    pub stride: (usize, usize),
    /// `(ph, pw)`, implicit zeros (the top and left padding).
    pub padding: (usize, usize),
    /// The bottom and right padding when they differ from `padding` (not with
    /// `count_include_pad`).
    pub padding_end: Option<(usize, usize)>,
    /// Ceil instead of floor.
    pub ceil_mode: bool,
    /// Whether padded zeros count in the divisor.
    pub count_include_pad: bool,
    /// A fixed divisor replacing the window size.
    pub divisor_override: Option<usize>,
}

/// `nn.AdaptiveAvgPool2d((h, w))`; `None` keeps that input dimension.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AdaptiveAvgPool2d {
    /// Output height (`None`: same as input).
    pub out_h: Option<usize>,
    /// Output width (`None`: same as input).
    pub out_w: Option<usize>,
}

/// Windows of a pooling layer with the given settings.
pub(crate) fn pool_windows(
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
    padding_end: Option<(usize, usize)>,
    dilation: (usize, usize),
    ceil_mode: bool,
) -> (Window, Window) {
    let end = padding_end.unwrap_or(padding);
    (
        Window {
            kernel: kernel.0,
            stride: stride.0,
            pad_begin: padding.0,
            pad_end: end.0,
            dilation: dilation.0,
            ceil_mode,
        },
        Window {
            kernel: kernel.1,
            stride: stride.1,
            pad_begin: padding.1,
            pad_end: end.1,
            dilation: dilation.1,
            ceil_mode,
        },
    )
}

impl MaxPool2d {
    /// Vertical and horizontal windows.
    pub fn windows(&self) -> (Window, Window) {
        pool_windows(self.kernel, self.stride, self.padding, self.padding_end, self.dilation, self.ceil_mode)
    }
}

impl AvgPool2d {
    /// Vertical and horizontal windows.
    pub fn windows(&self) -> (Window, Window) {
        pool_windows(self.kernel, self.stride, self.padding, self.padding_end, (1, 1), self.ceil_mode)
    }
}

fn infer_pool(desc: &str, windows: (Window, Window), x: &Operand<'_>) -> Result<Inferred, OpError> {
    let Some((c, h, w)) = x.ty.chw() else {
        return Err(need_nchw(desc, x));
    };
    let mut dims = [0usize; 2];
    let mut warnings = vec![];
    for (i, (win, size, axis)) in [(windows.0, h, "height"), (windows.1, w, "width")].into_iter().enumerate() {
        match win.output(size) {
            Ok(o) => {
                dims[i] = o.out;
                if o.dropped > 0 && !win.ceil_mode {
                    warnings.push(format!(
                        "output {axis} {} = {} drops the last {} input {} (never covered by a window; ceil_mode=True would keep them)",
                        o.out,
                        win.formula(size),
                        o.dropped,
                        if i == 0 { "rows" } else { "columns" }
                    ));
                }
            }
            Err(e) => {
                return Err(OpError::new(format!(
                    "{desc}: window {} is larger than the padded input {axis} {} (input {h}×{w} from {}); the output {axis} would be {} ≤ 0",
                    e.effective_kernel, e.padded, x.producer, e.value
                ))
                .note(format!("output {axis} = {} = {}", e.arithmetic, e.value)));
            }
        }
    }
    Ok(Inferred { ty: x.ty.with_dims(vec![c, dims[0], dims[1]]), warnings })
}

fn check_half(b: &Bound, kernel: (usize, usize), padding: (usize, usize), layer: &str) -> Result<(), Diagnostic> {
    if padding.0 > kernel.0 / 2 || padding.1 > kernel.1 / 2 {
        return Err(Diagnostic::error(
            b.span_of("padding"),
            format!(
                "{layer}: padding {} must be at most half the kernel {} (as in PyTorch)",
                pair_text(padding),
                pair_text(kernel)
            ),
        ));
    }
    Ok(())
}

/// `padding`: an int, `(h, w)`, or `(top, bottom, left, right)` — the begin pair and, when
/// the ends differ, the end pair.
#[allow(clippy::type_complexity)]
fn pool_padding(b: &Bound) -> Result<((usize, usize), Option<(usize, usize)>), Diagnostic> {
    match b.sides("padding") {
        Some(sides) => sides.map(|[t, bo, l, r]| ((t, l), ((t, l) != (bo, r)).then_some((bo, r)))),
        None => b.pair("padding", (0, 0), 0).map(|p| (p, None)),
    }
}

fn padding_text(padding: (usize, usize), end: Option<(usize, usize)>) -> String {
    match end {
        Some((bo, r)) => format!("({}, {bo}, {}, {r})", padding.0, padding.1),
        None => pair_text(padding),
    }
}

fn build_max(b: &Bound) -> Result<Op, Vec<Diagnostic>> {
    let mut errs = vec![];
    let kernel = collect(b.pair("kernel_size", (1, 1), 1), &mut errs);
    let stride = collect(b.pair("stride", kernel.unwrap_or((1, 1)), 1), &mut errs);
    let padding = collect(pool_padding(b), &mut errs);
    let dilation = collect(b.pair("dilation", (1, 1), 1), &mut errs);
    let ceil_mode = collect(b.bool("ceil_mode", false), &mut errs);
    if let Some((v, s)) = b.raw("return_indices")
        && v != &ArgValue::Bool(false)
    {
        errs.push(Diagnostic::error(s, "MaxPool2d: return_indices=True is not supported for inference"));
    }
    let (Some(kernel), Some(stride), Some((padding, padding_end)), Some(dilation), Some(ceil_mode)) =
        (kernel, stride, padding, dilation, ceil_mode)
    else {
        return Err(errs);
    };
    collect(check_half(b, kernel, padding, "MaxPool2d"), &mut errs);
    if let Some(end) = padding_end {
        collect(check_half(b, kernel, end, "MaxPool2d"), &mut errs);
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(Op::MaxPool2d(MaxPool2d { kernel, stride, padding, padding_end, dilation, ceil_mode }))
}

fn build_avg(b: &Bound) -> Result<Op, Vec<Diagnostic>> {
    let mut errs = vec![];
    let kernel = collect(b.pair("kernel_size", (1, 1), 1), &mut errs);
    let stride = collect(b.pair("stride", kernel.unwrap_or((1, 1)), 1), &mut errs);
    let padding = collect(pool_padding(b), &mut errs);
    let ceil_mode = collect(b.bool("ceil_mode", false), &mut errs);
    let count_include_pad = collect(b.bool("count_include_pad", true), &mut errs);
    let divisor_override = match b.raw("divisor_override") {
        None | Some((ArgValue::None, _)) => None,
        Some(_) => collect(b.positive("divisor_override", 1), &mut errs),
    };
    let (Some(kernel), Some(stride), Some((padding, padding_end)), Some(ceil_mode), Some(count_include_pad)) =
        (kernel, stride, padding, ceil_mode, count_include_pad)
    else {
        return Err(errs);
    };
    collect(check_half(b, kernel, padding, "AvgPool2d"), &mut errs);
    if let Some(end) = padding_end {
        collect(check_half(b, kernel, end, "AvgPool2d"), &mut errs);
        if count_include_pad && divisor_override.is_none() {
            errs.push(
                Diagnostic::error(
                    b.span_of("padding"),
                    "AvgPool2d: padding with different ends counts the padding only with count_include_pad=False",
                )
                .help("add count_include_pad = False, or pad evenly"),
            );
        }
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(Op::AvgPool2d(AvgPool2d {
        kernel,
        stride,
        padding,
        padding_end,
        ceil_mode,
        count_include_pad,
        divisor_override,
    }))
}

fn build_adaptive(b: &Bound) -> Result<Op, Vec<Diagnostic>> {
    let span = b.span_of("output_size");
    let one = |v: &ArgValue| -> Result<Option<usize>, Diagnostic> {
        match v {
            ArgValue::Int(i) if *i > 0 && *i as u64 <= MAX_SIZE as u64 => Ok(Some(*i as usize)),
            ArgValue::Int(i) if *i > 0 => Err(Diagnostic::error(
                span,
                format!(
                    "AdaptiveAvgPool2d: output size {i} is too large (the limit is {})",
                    thousands(MAX_SIZE as u64)
                ),
            )),
            ArgValue::None => Ok(None),
            other => Err(Diagnostic::error(
                span,
                format!("AdaptiveAvgPool2d: output sizes must be positive ints or None, found `{other}`"),
            )),
        }
    };
    let (out_h, out_w) = match b.raw("output_size") {
        Some((ArgValue::Tuple(t), _)) if t.len() == 2 => {
            (one(&t[0]).map_err(|e| vec![e])?, one(&t[1]).map_err(|e| vec![e])?)
        }
        Some((v @ ArgValue::Int(_), _)) => {
            let s = one(v).map_err(|e| vec![e])?;
            (s, s)
        }
        Some((v, s)) => {
            return Err(vec![Diagnostic::error(
                s,
                format!("AdaptiveAvgPool2d: output_size must be an int or an (h, w) tuple, found `{v}`"),
            )]);
        }
        None => unreachable!("output_size is required and binding checked it"),
    };
    Ok(Op::AdaptiveAvgPool2d(AdaptiveAvgPool2d { out_h, out_w }))
}

pub(super) const MAX_CTOR: LayerCtor = LayerCtor {
    name: "MaxPool2d",
    sig: &[req("kernel_size"), opt("stride"), opt("padding"), opt("dilation"), opt("return_indices"), opt("ceil_mode")],
    build: build_max,
};

pub(super) const AVG_CTOR: LayerCtor = LayerCtor {
    name: "AvgPool2d",
    sig: &[
        req("kernel_size"),
        opt("stride"),
        opt("padding"),
        opt("ceil_mode"),
        opt("count_include_pad"),
        opt("divisor_override"),
    ],
    build: build_avg,
};

pub(super) const ADAPTIVE_AVG_CTOR: LayerCtor =
    LayerCtor { name: "AdaptiveAvgPool2d", sig: &[req("output_size")], build: build_adaptive };

impl OpDef for MaxPool2d {
    fn kind(&self) -> &'static str {
        "MaxPool2d"
    }
    fn infer(&self, inputs: &[Operand<'_>]) -> Result<Inferred, OpError> {
        infer_pool(&self.describe(), self.windows(), &inputs[0])
    }
    fn describe(&self) -> String {
        let mut s = format!("MaxPool2d(kernel_size={}, stride={}", pair_text(self.kernel), pair_text(self.stride));
        if self.padding != (0, 0) || self.padding_end.is_some() {
            s += &format!(", padding={}", padding_text(self.padding, self.padding_end));
        }
        if self.dilation != (1, 1) {
            s += &format!(", dilation={}", pair_text(self.dilation));
        }
        if self.ceil_mode {
            s += ", ceil_mode=True";
        }
        s + ")"
    }
}

impl OpDef for AvgPool2d {
    fn kind(&self) -> &'static str {
        "AvgPool2d"
    }
    fn infer(&self, inputs: &[Operand<'_>]) -> Result<Inferred, OpError> {
        infer_pool(&self.describe(), self.windows(), &inputs[0])
    }
    fn describe(&self) -> String {
        let mut s = format!("AvgPool2d(kernel_size={}, stride={}", pair_text(self.kernel), pair_text(self.stride));
        if self.padding != (0, 0) || self.padding_end.is_some() {
            s += &format!(", padding={}", padding_text(self.padding, self.padding_end));
        }
        if self.ceil_mode {
            s += ", ceil_mode=True";
        }
        if !self.count_include_pad {
            s += ", count_include_pad=False";
        }
        if let Some(d) = self.divisor_override {
            s += &format!(", divisor_override={d}");
        }
        s + ")"
    }
}

impl OpDef for AdaptiveAvgPool2d {
    fn kind(&self) -> &'static str {
        "AdaptiveAvgPool2d"
    }
    fn infer(&self, inputs: &[Operand<'_>]) -> Result<Inferred, OpError> {
        let x = &inputs[0];
        let Some((c, h, w)) = x.ty.chw() else {
            return Err(need_nchw(&self.describe(), x));
        };
        Ok(Inferred::ok(x.ty.with_dims(vec![c, self.out_h.unwrap_or(h), self.out_w.unwrap_or(w)])))
    }
    fn describe(&self) -> String {
        let f = |v: Option<usize>| v.map_or("None".to_string(), |v| v.to_string());
        format!("AdaptiveAvgPool2d(output_size=({}, {}))", f(self.out_h), f(self.out_w))
    }
}
