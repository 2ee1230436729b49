//! Seed 000's training loop in cnnc: the d2l ResNet (`examples/nets/seed_resnet.cnn`, with the
//! `Linear(512, 1)` head) trained with `BCEWithLogitsLoss` and Adam on a real binary task —
//! telling handwritten 0s from 1s in the embedded digits, upsampled to 16×16, one channel —
//! then saved as a PyTorch `state_dict`, reloaded, and evaluated in eval mode (BatchNorm with
//! the running statistics it learned) by the JIT.
//!
//! ```python
//! loss = nn.BCEWithLogitsLoss()
//! for epoch in range(epochs):
//!     res_net.train()
//!     for X, y in train_loader:
//!         l = loss(res_net(X), y.reshape(-1, 1).float())
//!         optimizer.zero_grad(); l.backward(); optimizer.step()
//! ```
//!
//! ```text
//! cargo run --release --example resnet_binary
//! ```
//!
//! The training graph runs JIT-compiled (about 18 s on a 2-core Intel Xeon with AVX-512; about
//! two minutes on the reference interpreter).

use cnnc::compiler::dsl::compile_str;
use cnnc::compiler::ops::train::{Loss, Reduction};
use cnnc::prelude::*;
use cnnc::runtime::train::{Optimizer, Trainer};
use ndarray::{Array1, Array4, ArrayD, Axis};
use safetensors::SafeTensors;
use std::error::Error;
use std::time::Instant;

const SOURCE: &str = include_str!("nets/seed_resnet.cnn");
const DIGITS: &[u8] = include_bytes!("../tests/fixtures/digits/digits8.safetensors");
const SIZE: usize = 16;

/// Bilinear upsampling of 8×8 digits (0..16) to `SIZE`×`SIZE` (`align_corners=False`),
/// keeping only the 0s and 1s; the label is the digit.
fn zeros_and_ones(st: &SafeTensors<'_>, which: &str) -> Result<(Array4<f32>, Array1<f32>), Box<dyn Error>> {
    let images = st.tensor(&format!("{which}_images8"))?;
    let labels: Vec<i64> = st
        .tensor(&format!("{which}_labels"))?
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    let keep: Vec<usize> = (0..labels.len()).filter(|i| labels[*i] <= 1).collect();
    let raw = images.data();
    let scale = 8.0 / SIZE as f32;
    let coord = |o: usize| {
        let s = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (s.floor() as usize).min(7);
        (i0, (i0 + 1).min(7), s - i0 as f32)
    };
    let x = Array4::from_shape_fn((keep.len(), 1, SIZE, SIZE), |(b, _, y, xx)| {
        let ((y0, y1, ly), (x0, x1, lx)) = (coord(y), coord(xx));
        let p = |r: usize, c: usize| f32::from(raw[(keep[b] * 8 + r) * 8 + c]) / 16.0;
        (1.0 - ly) * ((1.0 - lx) * p(y0, x0) + lx * p(y0, x1)) + ly * ((1.0 - lx) * p(y1, x0) + lx * p(y1, x1))
    });
    Ok((x, keep.iter().map(|i| labels[*i] as f32).collect()))
}

fn accuracy(logits: &ArrayD<f32>, y: &Array1<f32>) -> f64 {
    logits.iter().zip(y).filter(|(l, t)| (**l > 0.0) == (**t > 0.5)).count() as f64 / y.len() as f64
}

fn main() -> Result<(), Box<dyn Error>> {
    let epochs: usize = std::env::args().nth(1).map_or(Ok(3), |a| a.parse())?;
    let source = SOURCE.replace("[N, 1, 224, 224]", &format!("[N, 1, {SIZE}, {SIZE}]"));
    let compiled = compile_str(&source);
    let graph = compiled.net("SeedResNet").ok_or("SeedResNet does not compile")?.clone();
    let st = SafeTensors::deserialize(DIGITS)?;
    let (x_train, y_train) = zeros_and_ones(&st, "train")?;
    let (x_test, y_test) = zeros_and_ones(&st, "heldout")?;
    println!(
        "seed 000's ResNet ({} parameters) on {SIZE}×{SIZE} digits: {} training / {} held-out 0s and 1s, BCEWithLogitsLoss, Adam lr 1e-3, batch 16",
        graph.param_count(),
        y_train.len(),
        y_test.len()
    );
    let loss = Loss::BceWithLogits { reduction: Reduction::Mean, pos_weight: None };
    let mut trainer = Trainer::new(&graph, Weights::random(&graph, 0), loss, Optimizer::adam(1e-3))?;
    let start = Instant::now();
    for epoch in 1..=epochs {
        let t = Instant::now();
        trainer.train();
        let (mut total, mut n) = (0f64, 0usize);
        // Samples interleave 0s and 1s by a fixed stride (the split is stratified).
        let order: Vec<usize> = (0..y_train.len()).map(|i| (i * 37 + epoch * 11) % y_train.len()).collect();
        for chunk in order.chunks(16) {
            let x = x_train.select(Axis(0), chunk).into_dyn();
            let y = y_train.select(Axis(0), chunk).insert_axis(Axis(1)).into_dyn();
            total += f64::from(trainer.step(x.view(), y.view())?.loss) * chunk.len() as f64;
            n += chunk.len();
        }
        println!("epoch {epoch}: train loss {:.4} ({:.1} s)", total / n as f64, t.elapsed().as_secs_f64());
    }
    println!("trained in {:.1} s", start.elapsed().as_secs_f64());

    // Save as a state_dict, reload, evaluate in eval mode with the JIT.
    let path = std::env::temp_dir().join(format!("resnet_binary_{}.safetensors", std::process::id()));
    trainer.weights().save(&graph, &path)?;
    let reloaded = Weights::load(&graph, &path)?;
    std::fs::remove_file(&path)?;
    let model = Compiled::new(&graph, &reloaded, &Options::default())?;
    let logits = model.run(&[x_test.view().into_dyn()])?;
    println!(
        "reloaded, eval mode (running statistics), JIT: held-out accuracy {:.2}% ({} images)",
        100.0 * accuracy(&logits[0], &y_test),
        y_test.len()
    );
    Ok(())
}
