//! `cnnc gradcam`: Grad-CAM heat maps of a layer for images or an `.npy` batch, written as
//! an overlay PNG (a grid for several inputs) and optionally the raw maps as `.npy`.

use crate::fail::{Fail, input, usage};
use crate::npy;
use crate::source::{self, NetFile};
use clap::Args;
use cnnc::images;
use cnnc::runtime::gradcam::{grad_cam, normalize, overlay, upsample};
use ndarray::{Array3, Axis};
use std::path::PathBuf;

/// Arguments of `cnnc gradcam`.
#[derive(Args, Debug)]
pub struct GradcamArgs {
    #[command(flatten)]
    pub net: NetFile,
    /// Weights (a `state_dict` in safetensors); required for a `.cnn` net, optional for an
    /// `.onnx` model (its own weights).
    #[arg(long, value_name = "W.safetensors")]
    pub weights: Option<PathBuf>,
    /// PNG or JPEG pictures (resized to the net's input, normalised by --mean/--std).
    #[arg(long = "image", value_name = "IMG", conflicts_with = "input", required_unless_present = "input")]
    pub images: Vec<PathBuf>,
    /// An already-preprocessed `.npy` batch `[N, C, H, W]`.
    #[arg(long, value_name = "X.npy")]
    pub input: Option<PathBuf>,
    /// The layer whose activations to explain, by module path (`features.6`, `layer4`).
    #[arg(long, value_name = "NAME")]
    pub layer: String,
    /// The class to explain [default: each input's predicted class].
    #[arg(long, value_name = "K")]
    pub class: Option<usize>,
    /// Per-channel mean of Normalize [default: 0 for every channel].
    #[arg(long, value_name = "M1,M2,M3", value_delimiter = ',')]
    pub mean: Vec<f32>,
    /// Per-channel std of Normalize [default: 1 for every channel].
    #[arg(long, value_name = "S1,S2,S3", value_delimiter = ',')]
    pub std: Vec<f32>,
    /// The overlay PNG (a row of overlays for several inputs).
    #[arg(short, long, value_name = "CAM.png", default_value = "cam.png")]
    pub output: PathBuf,
    /// Also write the raw maps `[N, h, w]` (float32, before resizing) to this `.npy`.
    #[arg(long, value_name = "CAM.npy")]
    pub raw: Option<PathBuf>,
}

pub fn run(args: &GradcamArgs) -> Result<(), Fail> {
    let (_, graph) = source::load_net(&args.net, &[])?;
    let Some((c, h, w)) = graph.inputs.first().map(|(_, id)| graph.node(*id).ty.clone()).and_then(|t| t.chw()) else {
        return Err(input(format!("net `{}` has no [N, C, H, W] input for pictures", graph.name)));
    };
    let mean = if args.mean.is_empty() { vec![0.0; c] } else { args.mean.clone() };
    let std = if args.std.is_empty() { vec![1.0; c] } else { args.std.clone() };
    if mean.len() != c || std.len() != c {
        return Err(usage(format!(
            "--mean and --std need {c} value(s) each, one per input channel of `{}`",
            graph.name
        )));
    }
    let x = match &args.input {
        Some(p) => npy::read(p)?,
        None => images::batch(&args.images, c, (h, w), &mean, &std).map_err(|e| input(e.to_string()))?.into_dyn(),
    };
    let weights = match &args.weights {
        Some(p) => crate::run::weights(&graph, Some(p), 0)?,
        None => crate::import::imported_weights(&graph).ok_or_else(|| {
            usage("--weights is required for a .cnn net: Grad-CAM of random weights explains nothing")
        })?,
    };
    let n = x.shape().first().copied().unwrap_or(0);
    let classes = args.class.map(|k| vec![k; n]);
    let cam = grad_cam(&graph, &weights, x.view(), &args.layer, classes.as_deref())?;
    let names: Vec<String> = if args.images.is_empty() {
        (0..n).map(|i| format!("[{i}]")).collect()
    } else {
        args.images.iter().map(|p| p.display().to_string()).collect()
    };
    let mut tiles = vec![];
    for (i, raw) in cam.raw.outer_iter().enumerate() {
        let mask = normalize(upsample(raw, (h, w)).view());
        let (py, px) =
            mask.indexed_iter().fold(((0, 0), f32::NEG_INFINITY), |b, (i, v)| if *v > b.1 { (i, *v) } else { b }).0;
        println!(
            "{}: class {} (score {:.4}); the map peaks at row {py}, column {px} of {h}×{w}",
            names[i], cam.class[i], cam.score[i]
        );
        let x3: Array3<f32> =
            x.index_axis(Axis(0), i).to_owned().into_dimensionality().map_err(|e| input(e.to_string()))?;
        let img = images::denormalize(x3.view(), &mean, &std).map_err(|e| input(e.to_string()))?;
        tiles.push(overlay(img.view(), mask.view())?);
    }
    images::save_png(&args.output, &images::row(&tiles)).map_err(|e| input(e.to_string()))?;
    eprintln!("wrote {}", args.output.display());
    if let Some(p) = &args.raw {
        npy::write(p, &cam.raw.clone().into_dyn())?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}
