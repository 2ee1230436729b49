//! Times one training step at batch 64 — forward, cross-entropy, backward, SGD-momentum
//! update — of LeNet (sigmoid, average pooling) or, with `--cifar10`, the CIFAR-10 net of
//! the study notes, on the reference interpreter and on the JIT, interleaved in the same
//! run, and prints the medians and their ratio. With `--resnet`, the seed ResNet
//! (`examples/nets/seed_resnet.cnn`, 1×96×96, BCE with logits) at batch 32 on the JIT only
//! (the interpreter takes minutes per step); with `--resnet224`, the same net at 1×224×224
//! and batch 8, the other ResNet row.
//!
//! `cargo run --release --example train_step_timing [-- [--cifar10 | --resnet | --resnet224] [--profile]
//! [--conv auto|direct|winograd] [--threads T]]` (`--profile`: also the training graph's
//! compile time, the step split into the compiled training graph's run,
//! `Compiled::set_weights` and the rest (optimizer update, checks), and the JIT's time per
//! kernel of the training graph, slowest first, with the sums of its weight gradients and
//! its layout reorders;
//! `--conv`: the convolutions' algorithm, `Options::conv`; `--threads`: the JIT's threads,
//! default 1).

use cnnc::compiler::dsl::compile_str;
use cnnc::compiler::ops::train::{Loss, Reduction};
use cnnc::prelude::*;
use cnnc::runtime::ConvAlgorithm;
use cnnc::runtime::train::{Optimizer, Trainer};
use ndarray::{ArrayD, IxDyn};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let cifar = args.iter().any(|a| a == "--cifar10");
    let r224 = args.iter().any(|a| a == "--resnet224");
    let resnet = r224 || args.iter().any(|a| a == "--resnet");
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).map(String::as_str);
    let conv = match value("--conv") {
        None | Some("auto") => ConvAlgorithm::Auto,
        Some("direct") => ConvAlgorithm::Direct,
        Some("winograd") => ConvAlgorithm::Winograd,
        Some(other) => return Err(format!("--conv {other}: expected auto, direct or winograd").into()),
    };
    let threads: usize = value("--threads").map_or(Ok(1), str::parse)?;
    let opts = Options { threads, conv, ..Options::default() };
    let (src, shape, name) = if resnet {
        let shape = if r224 { [8, 1, 224, 224] } else { [32, 1, 96, 96] };
        (include_str!("nets/seed_resnet.cnn"), shape, "seed ResNet")
    } else if cifar {
        (
            "net Cifar10(x: [N, 3, 32, 32]) = Sequential(
            Conv2d(3, 32, 5, padding = 2), MaxPool2d(2), Conv2d(32, 32, 5, padding = 2), MaxPool2d(2),
            Conv2d(32, 64, 5, padding = 2), MaxPool2d(2), Flatten(), Linear(1024, 64), Linear(64, 10));",
            [64, 3, 32, 32],
            "CIFAR-10 net",
        )
    } else {
        (
            "net LeNet(x: [N, 1, 28, 28]) = Sequential(
            Conv2d(1, 6, 5, padding = 2), Sigmoid(), AvgPool2d(2, stride = 2),
            Conv2d(6, 16, 5), Sigmoid(), AvgPool2d(2, stride = 2), Flatten(),
            Linear(400, 120), Sigmoid(), Linear(120, 84), Sigmoid(), Linear(84, 10));",
            [64, 1, 28, 28],
            "LeNet",
        )
    };
    // The seed ResNet is declared at 224×224; the row trains it at 96×96.
    let src = if r224 { src.to_string() } else { src.replace("[N, 1, 224, 224]", "[N, 1, 96, 96]") };
    let out = compile_str(&src);
    let graph = out.nets.last().ok_or("no net")?.clone();
    let loss = if resnet {
        Loss::BceWithLogits { reduction: Reduction::Mean, pos_weight: None }
    } else {
        Loss::CrossEntropy { reduction: Reduction::Mean, label_smoothing: 0.0 }
    };
    let batch = shape[0];
    let opt = || {
        Optimizer::Sgd(cnnc::runtime::train::Sgd {
            lr: 0.01,
            momentum: 0.9,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        })
    };
    let x = ArrayD::from_shape_fn(IxDyn(&shape), |i| ((i[1] * 7 + i[2] * 28 + i[3]) % 17) as f32 / 17.0);
    let y = if resnet {
        ArrayD::from_shape_fn(IxDyn(&[batch, 1]), |i| (i[0] % 2) as f32)
    } else {
        ArrayD::from_shape_fn(IxDyn(&[batch]), |i| (i[0] % 10) as f32)
    };
    let mut interp = Trainer::new(&graph, Weights::random(&graph, 0), loss.clone(), opt())?;
    interp.use_interpreter();
    let mut jit = Trainer::new(&graph, Weights::random(&graph, 0), loss, opt())?;
    jit.use_jit(opts.clone());
    let (mut ti, mut tj) = (vec![], vec![]);
    for _ in 0..10 {
        if !resnet {
            let s = Instant::now();
            interp.step(x.view(), y.view())?;
            ti.push(s.elapsed().as_secs_f64() * 1e3);
        }
        let s = Instant::now();
        jit.step(x.view(), y.view())?;
        tj.push(s.elapsed().as_secs_f64() * 1e3);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mj = median(&mut tj);
    if resnet {
        println!("{name} b{batch} training step, {threads} thread(s), {conv:?}: JIT {mj:.1} ms");
    } else {
        let mi = median(&mut ti);
        println!(
            "{name} b{batch} training step, {threads} thread(s), {conv:?}: interpreter {mi:.1} ms, JIT {mj:.1} ms ({:.2}x)",
            mi / mj
        );
    }
    if args.iter().any(|a| a == "--profile") {
        let weights = jit.weights().clone();
        let tg = jit.training_graph()?;
        let compiled = Compiled::new(&tg.graph, &weights, &opts)?;
        println!(
            "training graph compiled in {:.0} ms ({} kernels, {} data movements)",
            compiled.compile_time().as_secs_f64() * 1e3,
            compiled.kernel_count(),
            compiled.data_movement_count()
        );
        // Where a step's time goes outside the kernels: the compiled graph's run alone (its
        // kernels, output allocation), taking new weights, and the rest (optimizer, checks).
        let mut compiled = compiled;
        let (mut run, mut set) = (vec![], vec![]);
        for _ in 0..10 {
            let s = Instant::now();
            compiled.run(&[x.view(), y.view()])?;
            run.push(s.elapsed().as_secs_f64() * 1e3);
            let s = Instant::now();
            compiled.set_weights(&weights)?;
            set.push(s.elapsed().as_secs_f64() * 1e3);
        }
        let (mr, ms) = (median(&mut run), median(&mut set));
        println!(
            "step {mj:.1} ms = graph run {mr:.1} ms + set_weights {ms:.1} ms + the rest (optimizer, checks) {:.1} ms",
            mj - mr - ms
        );
        let mut times = compiled.profile(&[x.view(), y.view()], 20)?;
        let total: f64 = times.iter().map(|t| t.median.as_secs_f64()).sum();
        let wgrad: f64 = times.iter().filter(|t| t.name.ends_with("weight.grad")).map(|t| t.median.as_secs_f64()).sum();
        let reorders: Vec<f64> =
            times.iter().filter(|t| t.name == "<reorder>").map(|t| t.median.as_secs_f64()).collect();
        times.sort_by_key(|t| std::cmp::Reverse(t.median));
        println!(
            "kernels of the training graph (sum of medians {:.2} ms; weight gradients {:.2} ms; {} layout reorders {:.2} ms):",
            total * 1e3,
            wgrad * 1e3,
            reorders.len(),
            reorders.iter().sum::<f64>() * 1e3
        );
        for t in times.iter().take(if resnet { 200 } else { 15 }) {
            let gflops = t.flops.map(|f| format!("{:6.1} GFLOP/s", f as f64 / t.median.as_secs_f64() / 1e9));
            println!("  {:>8.3} ms  {}  {}", t.median.as_secs_f64() * 1e3, gflops.unwrap_or_default(), t.name);
        }
    }
    Ok(())
}
