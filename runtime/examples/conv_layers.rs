//! Single-layer throughput of the JIT on the convolutions that dominate ResNet-18, VGG, the
//! CIFAR-10 net and AlexNet, at batch 1 (or `--batch B`) on one thread, for each kernel
//! choice this CPU supports and, for the 3×3 and 5×5 ones on the micro-kernels, both
//! algorithms (direct and Winograd F(2×2, 3×3) or F(2×2, 5×5), timed in alternating
//! rounds): the median time of the conv kernel itself, from
//! `Compiled::profile`, and its throughput in the direct convolution's FLOPs.
//!
//! ```text
//! cargo run --release -p cnnc-runtime --example conv_layers [-- --rounds 5] [--errors] [--batch B] [--size HW]
//! ```
//!
//! `--errors` also prints each variant's largest difference from the reference
//! interpreter's output (f64 sums), relative to the largest output magnitude.

use cnnc_compiler::ops::{Conv2d, Epilogue, Op, PaddingMode, PaddingSpec};
use cnnc_compiler::{GraphBuilder, TensorType};
use cnnc_runtime::weights::Weights;
use cnnc_runtime::{Compiled, ConvAlgorithm, Kernels, Options};
use ndarray::{ArrayD, IxDyn};

fn main() {
    let peak = cnnc_runtime::jit::peak_gflops().unwrap_or(f64::NAN);
    println!("one core's measured peak: {peak:.1} GFLOP/s");
    let args: Vec<String> = std::env::args().collect();
    // The number after a flag, if given.
    let value = |flag: &str| -> Option<usize> {
        args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)?.parse().ok())
    };
    let rounds = value("--rounds").unwrap_or(3);
    let errors = args.iter().any(|a| a == "--errors");
    let only = value("--size");
    let batch = value("--batch").unwrap_or(1);
    // (in, out, kernel, pad, size): ResNet-18's 3×3 convs and a 1×1, then VGG-11's.
    for (ci, co, k, pad, hw) in [
        (64, 64, 3, 1, 56),
        (128, 128, 3, 1, 28),
        (256, 256, 3, 1, 14),
        (512, 512, 3, 1, 7),
        (256, 512, 1, 0, 14),
        (64, 128, 3, 1, 112),
        (128, 256, 3, 1, 56),
        (256, 256, 3, 1, 56),
        (256, 512, 3, 1, 28),
        (512, 512, 3, 1, 28),
        (512, 512, 3, 1, 14),
        (16, 32, 3, 1, 32),
        (32, 32, 3, 1, 16),
        // The CIFAR-10 net's 5×5 convs (second and third) and AlexNet's second.
        (32, 32, 5, 2, 16),
        (32, 64, 5, 2, 8),
        (96, 256, 5, 2, 26),
        // AlexNet's 3×3 convs.
        (256, 384, 3, 1, 12),
        (384, 384, 3, 1, 12),
    ] {
        if only.is_some_and(|s| s != hw) {
            continue;
        }
        let conv = Conv2d {
            in_channels: ci,
            out_channels: co,
            kernel: (k, k),
            stride: (1, 1),
            padding: PaddingSpec::Explicit(pad, pad),
            dilation: (1, 1),
            groups: 1,
            bias: true,
            padding_mode: PaddingMode::Zeros,
            epilogue: Epilogue::default(),
        };
        let mut b = GraphBuilder::new("conv");
        let x = b.input("x", TensorType::new(vec![ci, hw, hw]));
        let y = b.layer("conv", Op::Conv2d(conv), &[x]).expect("a valid conv");
        b.output("y", y);
        let g = b.finish();
        let w = Weights::random(&g, 0);
        let input =
            ArrayD::from_shape_fn(IxDyn(&[batch, ci, hw, hw]), |i| (i[1] + i[2] * 3 + i[3] * 7) as f32 % 5.0 - 2.0);
        let flops = 2.0 * (batch * ci * co * k * k * hw * hw) as f64;
        let mut cases = vec![];
        for kernels in [Kernels::Avx512, Kernels::Avx2, Kernels::Portable] {
            let algos: &[ConvAlgorithm] = if (k == 3 || k == 5) && kernels != Kernels::Portable {
                &[ConvAlgorithm::Direct, ConvAlgorithm::Winograd]
            } else {
                &[ConvAlgorithm::Direct]
            };
            for &conv in algos {
                let opts = Options { threads: 1, portable: false, fuse: false, conv };
                if let Ok(net) = Compiled::with_kernels(&g, &w, &opts, kernels) {
                    cases.push((kernels, conv, net, vec![]));
                }
            }
        }
        // Rounds alternate the variants, so a busy minute slows them alike.
        for _ in 0..rounds {
            for (_, _, net, times) in cases.iter_mut() {
                // The conv kernel alone (a plain input with whole blocks of channels is first
                // reordered to the blocked layout, and the blocked result back: not counted).
                let prof = net.profile(&[input.view()], 40).expect("runs");
                times.push(prof.iter().find(|k| k.name == "conv").expect("a conv kernel").median.as_secs_f64());
            }
        }
        let reference =
            errors.then(|| cnnc_runtime::interp::run(&g, &w, &[input.view()]).expect("interprets").remove(0));
        let mut direct = f64::NAN;
        for (kernels, conv, net, times) in &mut cases {
            times.sort_by(f64::total_cmp);
            let t = times[times.len() / 2];
            let gf = flops / t / 1e9;
            let vs = if *conv == ConvAlgorithm::Direct {
                direct = t;
                String::new()
            } else {
                format!(" {:.2}× direct", direct / t)
            };
            let err = match &reference {
                Some(want) => {
                    let got = net.run(&[input.view()]).expect("runs").remove(0);
                    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let e = got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    format!(" error {:.1e}", e / scale)
                }
                None => String::new(),
            };
            println!(
                "{k}x{k} {ci:>3}->{co:<3} at {hw:>3}x{hw:<3} {:<9} {:<8} {:>9.1} µs {gf:>6.1} GFLOP/s ({:>5.1}% of peak){vs}{err}",
                format!("{kernels:?}"),
                format!("{conv:?}"),
                t * 1e6,
                100.0 * gf / peak
            );
        }
    }
}
