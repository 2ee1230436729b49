//! Grad-CAM: which pixels a layer's activations make a class's score depend on, as
//! pytorch-grad-cam's `GradCAM` with `ClassifierOutputTarget` computes it.
//!
//! In eval mode, run the forward; take the target class's raw logit per sample (the
//! predicted class, or a given one); back-propagate it to the output `A` (`[N, C, h, w]`) of
//! a layer named by its module path; weight each channel by the mean of its gradient over
//! `h×w`; sum over channels; ReLU. The result is the raw map `[N, h, w]`
//! ([`grad_cam`]). The backward is a training graph ([`cnnc_compiler::autodiff`]) seeded
//! with the one-hot class vector, with no parameter gradients; the tapped layer is an
//! output of that graph, so nothing fuses across it. Both run JIT-compiled ([`grad_cam`];
//! an op the JIT does not run falls back to the interpreter), or on the reference
//! interpreter ([`grad_cam_on`] with `None`).
//!
//! Helpers turn a raw map into a picture: [`normalize`] (per-image min-max with eps 1e-7,
//! as `scale_cam_image`), [`upsample`] (bilinear, `align_corners=False`), [`jet`] (the
//! colormap) and [`overlay`] (`show_cam_on_image`: the jet heat map blended 0.5/0.5 over
//! an RGB image in [0, 1], rescaled by its maximum).

use crate::error::{Error, Result};
use crate::interp;
use crate::jit::{Compiled, Options};
use crate::weights::Weights;
use cnnc_compiler::autodiff::{self, GradSpec, Mode, Seed};
use cnnc_compiler::graph::Graph;
use ndarray::{Array2, Array3, ArrayD, ArrayView2, ArrayView3, ArrayViewD, Axis, IxDyn};

/// A Grad-CAM result.
#[derive(Clone, Debug, PartialEq)]
pub struct Cam {
    /// The raw maps `[N, h, w]` at the layer's resolution (before any resizing).
    pub raw: Array3<f32>,
    /// The class each map explains, per sample.
    pub class: Vec<usize>,
    /// That class's logit, per sample.
    pub score: Vec<f32>,
}

/// Grad-CAM of `layer` (a module path: `layer4`, `features.6`, `conv1`, a ReLU or a pool)
/// for `class` (per sample; `None`: each sample's predicted class) on the net's only input.
///
/// Errors: an unknown layer ([`Error::Autodiff`] with a `did you mean`), a layer whose
/// output is not `[N, C, H, W]` or a net whose output is not `[N, classes]`
/// ([`Error::Unsupported`]), a class out of range or a class list of the wrong length
/// ([`Error::Target`]), inputs that do not fit the net.
pub fn grad_cam(
    graph: &Graph,
    weights: &Weights,
    input: ArrayViewD<'_, f32>,
    layer: &str,
    class: Option<&[usize]>,
) -> Result<Cam> {
    grad_cam_on(graph, weights, input, layer, class, Some(&Options { fuse: false, ..Options::default() }))
}

/// As [`grad_cam`], JIT-compiled with `options`, or on the reference interpreter (`None`).
///
/// Errors: as [`grad_cam`].
pub fn grad_cam_on(
    graph: &Graph,
    weights: &Weights,
    input: ArrayViewD<'_, f32>,
    layer: &str,
    class: Option<&[usize]>,
    options: Option<&Options>,
) -> Result<Cam> {
    // A graph on the chosen engine; the interpreter for what the JIT does not run.
    let run = |g: &Graph, inputs: &[ArrayViewD<'_, f32>]| match options {
        Some(o) => match Compiled::new(g, weights, o) {
            Ok(c) => c.run(inputs),
            Err(Error::Unsupported(_)) => interp::run(g, weights, inputs),
            Err(e) => Err(e),
        },
        None => interp::run(g, weights, inputs),
    };
    let node = autodiff::resolve_node(graph, layer)?;
    let ty = &graph.node(node).ty;
    if ty.chw().is_none() {
        return Err(Error::Unsupported(format!(
            "Grad-CAM needs a layer with an [N, C, H, W] output, but `{layer}` ({}) gives {ty}",
            graph.node(node).op.kind()
        )));
    }
    let out_ty = &graph
        .node(graph.outputs.first().map(|o| o.1).ok_or_else(|| Error::Unsupported("a net without outputs".into()))?)
        .ty;
    let Some(&classes) = out_ty.dims.first().filter(|_| out_ty.dims.len() == 1) else {
        return Err(Error::Unsupported(format!(
            "Grad-CAM needs a classifier output [N, classes], but the net gives {out_ty}"
        )));
    };
    // The forward, for the predicted classes and the scores.
    let logits = run(graph, &[input.view()])?.swap_remove(0);
    let n = logits.shape()[0];
    let chosen: Vec<usize> = match class {
        Some(c) if c.len() != n => {
            return Err(Error::Target(format!("{} classes given for {n} samples", c.len())));
        }
        Some(c) => {
            if let Some(bad) = c.iter().find(|k| **k >= classes) {
                return Err(Error::Target(format!(
                    "class {bad} is out of range: the net has {classes} classes (0..{})",
                    classes - 1
                )));
            }
            c.to_vec()
        }
        None => logits
            .outer_iter()
            .map(|row| {
                row.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, v)| if *v > b.1 { (i, *v) } else { b }).0
            })
            .collect(),
    };
    let score: Vec<f32> = chosen.iter().enumerate().map(|(s, k)| logits[[s, *k]]).collect();
    let spec = GradSpec {
        seed: Seed::OutputGrad,
        output: None,
        mode: Mode::Eval,
        params: false,
        wrt: vec![layer.to_string()],
    };
    let tg = autodiff::build(graph, &spec)?;
    let seed = ArrayD::from_shape_fn(IxDyn(&[n, classes]), |i| if chosen[i[0]] == i[1] { 1f32 } else { 0.0 });
    let outs = run(&tg.graph, &crate::train::assemble(&tg, &[input.view()], &seed.view(), &[])?)?;
    let grad = &outs[tg.node_grads[0].1];
    let act = &outs[tg.node_values[0].1];
    let &[_, c, h, w] = act.shape() else {
        return Err(Error::Unsupported(format!("`{layer}` did not give an [N, C, H, W] value")));
    };
    let mut raw = Array3::<f32>::zeros((n, h, w));
    for s in 0..n {
        for ch in 0..c {
            let g = grad.index_axis(Axis(0), s);
            let g = g.index_axis(Axis(0), ch);
            let weight = g.iter().map(|v| f64::from(*v)).sum::<f64>() / (h * w).max(1) as f64;
            let a = act.index_axis(Axis(0), s);
            let a = a.index_axis(Axis(0), ch);
            for ((y, x), v) in a.indexed_iter().map(|(i, v)| ((i[0], i[1]), v)) {
                raw[[s, y, x]] += (weight * f64::from(*v)) as f32;
            }
        }
    }
    raw.mapv_inplace(|v| v.max(0.0));
    Ok(Cam { raw, class: chosen, score })
}

/// Per-image min-max scaling to [0, 1]: `(m − min) / (max − min + 1e-7)`.
pub fn normalize(map: ArrayView2<'_, f32>) -> Array2<f32> {
    let lo = map.iter().fold(f32::INFINITY, |a, b| a.min(*b));
    let shifted = map.mapv(|v| v - lo);
    let hi = shifted.iter().fold(0f32, |a, b| a.max(*b));
    shifted.mapv(|v| v / (1e-7 + hi))
}

/// Bilinear resizing with half-pixel centres (`align_corners=False`, no antialias), as
/// `F.interpolate(..., mode="bilinear")` and torchvision's `Resize(antialias=False)`.
pub fn upsample(map: ArrayView2<'_, f32>, (oh, ow): (usize, usize)) -> Array2<f32> {
    let (h, w) = map.dim();
    let coord = |o: usize, out: usize, inp: usize| {
        let s = ((o as f64 + 0.5) * inp as f64 / out as f64 - 0.5).max(0.0);
        let i0 = (s.floor() as usize).min(inp.saturating_sub(1));
        let i1 = (i0 + 1).min(inp.saturating_sub(1));
        (i0, i1, (s - i0 as f64) as f32)
    };
    Array2::from_shape_fn((oh, ow), |(y, x)| {
        let (y0, y1, ly) = coord(y, oh, h);
        let (x0, x1, lx) = coord(x, ow, w);
        let top = (1.0 - lx) * map[[y0, x0]] + lx * map[[y0, x1]];
        let bottom = (1.0 - lx) * map[[y1, x0]] + lx * map[[y1, x1]];
        (1.0 - ly) * top + ly * bottom
    })
}

/// The jet colormap (OpenCV's `COLORMAP_JET`) of `v` in [0, 1] as RGB in [0, 1], sampled at
/// `round(255·v)` as `applyColorMap(uint8(255·mask))` does.
pub fn jet(v: f32) -> [f32; 3] {
    let q = (255.0 * v.clamp(0.0, 1.0)).round() / 255.0;
    let ramp = |x: f32| x.clamp(0.0, 1.0);
    [ramp(1.5 - (4.0 * q - 3.0).abs()), ramp(1.5 - (4.0 * q - 2.0).abs()), ramp(1.5 - (4.0 * q - 1.0).abs())]
}

/// `show_cam_on_image`: the jet heat map of `mask` (`[H, W]` in [0, 1]) blended 0.5/0.5 over
/// `image` (`[H, W, 3]` RGB in [0, 1]), divided by its maximum, as 8-bit RGB `[H, W, 3]`.
///
/// Errors: [`Error::InputShape`] when the two sizes differ or `image` is not RGB.
pub fn overlay(image: ArrayView3<'_, f32>, mask: ArrayView2<'_, f32>) -> Result<ndarray::Array3<u8>> {
    let (h, w) = mask.dim();
    if image.dim() != (h, w, 3) {
        return Err(Error::InputShape {
            name: "image".into(),
            expected: format!("[{h}, {w}, 3] (the map's size, RGB)"),
            found: image.shape().to_vec(),
        });
    }
    let mut cam = Array3::<f32>::zeros((h, w, 3));
    for ((y, x), m) in mask.indexed_iter() {
        let c = jet(*m);
        for k in 0..3 {
            // The colormap is applied to an 8-bit image, so its values are multiples of 1/255.
            let heat = (c[k] * 255.0).round() / 255.0;
            cam[[y, x, k]] = 0.5 * heat + 0.5 * image[[y, x, k]];
        }
    }
    let max = cam.iter().fold(0f32, |a, b| a.max(*b)).max(1e-12);
    Ok(cam.mapv(|v| (255.0 * v / max) as u8))
}
