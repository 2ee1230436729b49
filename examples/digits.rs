//! The main demo: real handwritten digits through a JIT-compiled LeNet.
//!
//! LeNet (`examples/zoo`, declared with `cnn!`) was trained in PyTorch on scikit-learn's UCI
//! 8×8 digits upsampled to 28×28 (`tests/fixtures/make.py`). This program embeds those
//! weights and the 360 held-out images, compiles the net with the Cranelift JIT, classifies
//! every image, and compares with PyTorch's own outputs for the same images.
//!
//! ```text
//! cargo run --release --example digits
//! ```

#[path = "zoo/mod.rs"]
mod zoo;

use cnnc::runtime::jit::{Compiled, Options};
use cnnc::runtime::{interp, weights::Weights};
use ndarray::{Array2, Array4, ArrayD, s};
use safetensors::SafeTensors;
use std::error::Error;
use std::time::{Duration, Instant};

const WEIGHTS: &[u8] = include_bytes!("../tests/fixtures/digits/lenet.safetensors");
const HELDOUT: &[u8] = include_bytes!("../tests/fixtures/digits/heldout.safetensors");

fn f32s(st: &SafeTensors<'_>, key: &str) -> Result<(Vec<usize>, Vec<f32>), Box<dyn Error>> {
    let t = st.tensor(key)?;
    let data = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Ok((t.shape().to_vec(), data))
}

fn argmax(row: ndarray::ArrayView1<'_, f32>) -> usize {
    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// A digit as text, two characters per pixel of the original 8×8 scale.
fn ascii(img: ndarray::ArrayView2<'_, f32>) -> Vec<String> {
    let ramp = [" ", ".", ":", "o", "#"];
    (0..28)
        .step_by(2)
        .map(|y| {
            (0..28)
                .map(|x| {
                    let v = img[[y, x]].clamp(0.0, 0.999);
                    ramp[(v * ramp.len() as f32) as usize]
                })
                .collect()
        })
        .collect()
}

fn main() -> Result<(), Box<dyn Error>> {
    let graph = zoo::LeNet::graph();
    let weights = Weights::from_safetensors(&graph, WEIGHTS)?;

    let st = SafeTensors::deserialize(HELDOUT)?;
    let (shape, pixels) = f32s(&st, "images")?;
    let images = Array4::from_shape_vec((shape[0], shape[1], shape[2], shape[3]), pixels)?;
    let (lshape, logits) = f32s(&st, "logits")?;
    let torch_logits = Array2::from_shape_vec((lshape[0], lshape[1]), logits)?;
    let labels: Vec<i64> = st
        .tensor("labels")?
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect();
    let n = images.shape()[0];

    println!("cnnc digits: LeNet ({} params) on {n} held-out UCI digits (8×8 upsampled to 28×28)", zoo::LeNet::PARAMS);

    let t0 = Instant::now();
    let model = Compiled::new(&graph, &weights, &Options { threads: 1, ..Options::default() })?;
    let compile_time = t0.elapsed();

    let t0 = Instant::now();
    let out: ArrayD<f32> = model.run(&[images.view().into_dyn()])?.remove(0);
    let batch_time = t0.elapsed();
    let out = out.into_dimensionality::<ndarray::Ix2>()?;

    let mut correct = 0;
    let mut agree = 0;
    let mut max_diff = 0f32;
    let max_logit = torch_logits.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, &label) in labels.iter().enumerate() {
        let ours = argmax(out.row(i));
        if ours as i64 == label {
            correct += 1;
        }
        if ours == argmax(torch_logits.row(i)) {
            agree += 1;
        }
        for (a, b) in out.row(i).iter().zip(torch_logits.row(i)) {
            max_diff = max_diff.max((a - b).abs());
        }
    }

    // Per-image latency: batch 1, median of every held-out image.
    let mut single = vec![];
    for i in 0..n {
        let x = images.slice(s![i..i + 1, .., .., ..]);
        let t = Instant::now();
        let _ = model.run(&[x.into_dyn()])?;
        single.push(t.elapsed());
    }
    let t0 = Instant::now();
    let reference = interp::run(&graph, &weights, &[images.view().into_dyn()])?.remove(0);
    let interp_time = t0.elapsed();
    let interp_diff = reference.iter().zip(out.iter()).fold(0f32, |m, (a, b)| m.max((a - b).abs()));

    println!();
    let show: Vec<usize> = (0..3).collect();
    let pics: Vec<Vec<String>> = show.iter().map(|&i| ascii(images.slice(s![i, 0, .., ..]))).collect();
    for row in 0..pics[0].len() {
        let line: Vec<&str> = pics.iter().map(|p| p[row].as_str()).collect();
        println!("    {}", line.join("    "));
    }
    let preds: Vec<String> = show
        .iter()
        .map(|&i| format!("{:<28}", format!("cnnc: {}  label: {}", argmax(out.row(i)), labels[i])))
        .collect();
    println!("    {}", preds.join("    "));
    println!();
    println!("accuracy                 {:.2}% ({correct}/{n})", 100.0 * correct as f64 / n as f64);
    println!("agreement with PyTorch   {:.2}% ({agree}/{n} predictions identical)", 100.0 * agree as f64 / n as f64);
    println!(
        "max |cnnc − PyTorch|     {max_diff:.2e} (max |logit| {max_logit:.2}, relative {:.1e})",
        max_diff / max_logit
    );
    println!("max |JIT − interpreter|  {interp_diff:.2e}");
    println!("JIT compile time         {:.2} ms ({} kernels)", compile_time.as_secs_f64() * 1e3, model.kernel_count());
    println!("latency, batch 1         {:.1} µs per image (median of {n})", median(single).as_secs_f64() * 1e6);
    println!(
        "throughput, batch {n}    {:.1} µs per image ({:.2} ms total)",
        batch_time.as_secs_f64() * 1e6 / n as f64,
        batch_time.as_secs_f64() * 1e3
    );
    println!(
        "reference interpreter    {:.2} ms for the batch ({:.1}× the JIT)",
        interp_time.as_secs_f64() * 1e3,
        interp_time.as_secs_f64() / batch_time.as_secs_f64()
    );
    if agree != n {
        return Err(format!("{} predictions differ from PyTorch's", n - agree).into());
    }
    Ok(())
}
