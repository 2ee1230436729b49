//! The study notes' LeNet (sigmoid, average pooling) trained from PyTorch's default
//! initialisation on real handwritten digits, entirely in cnnc: scikit-learn's 8×8 UCI digits
//! (embedded: 1,437 training and 360 held-out images), upsampled bilinearly to 28×28 as
//! `F.interpolate(..., align_corners=False)` does, trained with Adam (lr 3e-3, batch 32,
//! cross-entropy) — the recipe `tests/fixtures/make.py` uses in PyTorch, where it reaches
//! 97.2% — then evaluated on the held-out images by the JIT-compiled eval model.
//!
//! ```text
//! cargo run --release --example digits_train         # PyTorch's 30 epochs
//! cargo run --release --example digits_train -- 10   # fewer
//! ```
//!
//! The training graph and the held-out evaluation run JIT-compiled (about 0.3 s an epoch,
//! 9 s in all, on a 2-core Intel Xeon with AVX-512; `Trainer::use_interpreter` runs the reference
//! interpreter instead, about 3 s an epoch); the eval model is JIT-compiled too.

#[path = "zoo/mod.rs"]
mod zoo;

use cnnc::compiler::ops::train::{Loss, Reduction};
use cnnc::prelude::*;
use cnnc::runtime::train::{Optimizer, Trainer};
use ndarray::{Array1, Array4, ArrayD, Axis};
use safetensors::SafeTensors;
use std::error::Error;
use std::time::Instant;

const DIGITS: &[u8] = include_bytes!("../tests/fixtures/digits/digits8.safetensors");

/// `F.interpolate(x / 16, size=(28, 28), mode="bilinear", align_corners=False)` of 8×8
/// images given as bytes 0..16.
fn upsample(raw: &[u8], n: usize) -> Array4<f32> {
    let (src, dst) = (8usize, 28usize);
    let scale = src as f32 / dst as f32;
    let coord = |o: usize| {
        let s = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (s.floor() as usize).min(src - 1);
        let i1 = (i0 + 1).min(src - 1);
        (i0, i1, s - i0 as f32)
    };
    Array4::from_shape_fn((n, 1, dst, dst), |(b, _, y, x)| {
        let (y0, y1, ly) = coord(y);
        let (x0, x1, lx) = coord(x);
        let p = |yy: usize, xx: usize| f32::from(raw[(b * src + yy) * src + xx]) / 16.0;
        let top = (1.0 - lx) * p(y0, x0) + lx * p(y0, x1);
        let bottom = (1.0 - lx) * p(y1, x0) + lx * p(y1, x1);
        (1.0 - ly) * top + ly * bottom
    })
}

fn split(st: &SafeTensors<'_>, which: &str) -> Result<(Array4<f32>, Array1<f32>), Box<dyn Error>> {
    let images = st.tensor(&format!("{which}_images8"))?;
    let labels = st.tensor(&format!("{which}_labels"))?;
    let n = images.shape()[0];
    let y = labels.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32).collect();
    Ok((upsample(images.data(), n), Array1::from_vec(y)))
}

/// A seeded shuffle (SplitMix64, Fisher–Yates).
fn shuffle(v: &mut [usize], state: &mut u64) {
    for i in (1..v.len()).rev() {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        v.swap(i, ((z ^ (z >> 31)) % (i as u64 + 1)) as usize);
    }
}

fn accuracy(logits: &ArrayD<f32>, y: &Array1<f32>) -> f64 {
    let hits = logits
        .outer_iter()
        .zip(y)
        .filter(|(row, t)| {
            let best =
                row.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, v)| if *v > b.1 { (i, *v) } else { b });
            best.0 as f32 == **t
        })
        .count();
    hits as f64 / y.len() as f64
}

fn main() -> Result<(), Box<dyn Error>> {
    let epochs: usize = std::env::args().nth(1).map_or(Ok(30), |a| a.parse())?;
    let st = SafeTensors::deserialize(DIGITS)?;
    let (x_train, y_train) = split(&st, "train")?;
    let (x_test, y_test) = split(&st, "heldout")?;
    let graph = zoo::LeNet::graph();
    let loss = Loss::CrossEntropy { reduction: Reduction::Mean, label_smoothing: 0.0 };
    let mut trainer = Trainer::new(&graph, Weights::random(&graph, 0), loss, Optimizer::adam(3e-3))?;
    println!(
        "LeNet ({} parameters), {} training / {} held-out digits, Adam lr 3e-3, batch 32",
        graph.param_count(),
        y_train.len(),
        y_test.len()
    );
    let mut order: Vec<usize> = (0..y_train.len()).collect();
    let mut rng = 0u64;
    let start = Instant::now();
    for epoch in 1..=epochs {
        let t = Instant::now();
        shuffle(&mut order, &mut rng);
        let mut total = 0f64;
        trainer.train();
        for chunk in order.chunks(32) {
            let x = x_train.select(Axis(0), chunk).into_dyn();
            let y = y_train.select(Axis(0), chunk).into_dyn();
            total += f64::from(trainer.step(x.view(), y.view())?.loss) * chunk.len() as f64;
        }
        let (_, logits) = trainer.evaluate(&[x_test.view().into_dyn()], y_test.view().into_dyn())?;
        println!(
            "epoch {epoch:>2}: train loss {:.4}, held-out accuracy {:.2}% ({:.1} s)",
            total / y_train.len() as f64,
            100.0 * accuracy(&logits, &y_test),
            t.elapsed().as_secs_f64()
        );
    }
    let training = start.elapsed();
    // The trained weights, JIT-compiled for inference.
    let model = trainer.compile(&Options::default())?;
    let logits = model.run(&[x_test.view().into_dyn()])?;
    println!(
        "trained in {:.1} s; JIT eval model: {:.2}% of {} held-out digits (PyTorch, same recipe, 30 epochs: 97.22%)",
        training.as_secs_f64(),
        100.0 * accuracy(&logits[0], &y_test),
        y_test.len()
    );
    Ok(())
}
