//! Grad-CAM on the digits LeNet: which pixels make the net see each digit. Loads the LeNet
//! PyTorch trained on the embedded digits (`tests/fixtures/digits/`), explains its
//! prediction for the first held-out images at its second convolution's activations
//! (layer `4`, the Sigmoid after `Conv2d(6, 16, 5)`, 10×10), prints where each map peaks,
//! and writes the overlays (jet over the digit, 0.5/0.5, each pixel enlarged 8×) side by
//! side to a PNG.
//!
//! ```text
//! cargo run --release --example gradcam                       # writes gradcam_digits.png
//! cargo run --release --example gradcam -- docs/gradcam_digits.png 6
//! ```

#[path = "zoo/mod.rs"]
mod zoo;

use cnnc::images;
use cnnc::prelude::*;
use cnnc::runtime::gradcam::{normalize, overlay, upsample};
use ndarray::{Array3, Array4, Axis, s};
use safetensors::SafeTensors;
use std::error::Error;

const WEIGHTS: &[u8] = include_bytes!("../tests/fixtures/digits/lenet.safetensors");
const HELDOUT: &[u8] = include_bytes!("../tests/fixtures/digits/heldout.safetensors");

/// Each pixel repeated `k`×`k` (for a visible picture of a 28×28 image).
fn enlarge(img: &Array3<u8>, k: usize) -> Array3<u8> {
    let (h, w, c) = img.dim();
    Array3::from_shape_fn((h * k, w * k, c), |(y, x, ch)| img[[y / k, x / k, ch]])
}

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let out = args.next().unwrap_or_else(|| "gradcam_digits.png".into());
    let count: usize = args.next().map_or(Ok(6), |a| a.parse())?;
    let graph = zoo::LeNet::graph();
    let weights = Weights::from_safetensors(&graph, WEIGHTS)?;
    let st = SafeTensors::deserialize(HELDOUT)?;
    let t = st.tensor("images")?;
    let data: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let all = Array4::from_shape_vec((t.shape()[0], 1, 28, 28), data)?;
    let x = all.slice(s![..count, .., .., ..]).to_owned().into_dyn();
    let cam = grad_cam(&graph, &weights, x.view(), "4", None)?;
    let mut tiles = vec![];
    for (i, raw) in cam.raw.outer_iter().enumerate() {
        let mask = normalize(upsample(raw, (28, 28)).view());
        let (py, px) =
            mask.indexed_iter().fold(((0, 0), f32::NEG_INFINITY), |b, (p, v)| if *v > b.1 { (p, *v) } else { b }).0;
        println!(
            "image {i}: predicted {} (logit {:.2}); the map peaks at row {py}, column {px} of 28×28",
            cam.class[i], cam.score[i]
        );
        let digit: Array3<f32> = x.index_axis(Axis(0), i).to_owned().into_dimensionality()?;
        let rgb = images::denormalize(digit.view(), &[0.0], &[1.0])?;
        tiles.push(enlarge(&overlay(rgb.view(), mask.view())?, 8));
    }
    images::save_png(std::path::Path::new(&out), &images::row(&tiles))?;
    println!("wrote {out} ({count} overlays, layer `4` of LeNet)");
    Ok(())
}
