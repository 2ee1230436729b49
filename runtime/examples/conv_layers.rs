//! Single-layer throughput of the JIT on the convolutions that dominate ResNet-18 and VGG,
//! at batch 1 on one thread, for each kernel choice this CPU supports (the median time of
//! the conv kernel itself, from `Compiled::profile`).
//!
//! ```text
//! cargo run --release -p cnnc-runtime --example conv_layers
//! ```

use cnnc_compiler::ops::{Conv2d, Epilogue, Op, PaddingMode, PaddingSpec};
use cnnc_compiler::{GraphBuilder, TensorType};
use cnnc_runtime::weights::Weights;
use cnnc_runtime::{Compiled, Kernels, Options};
use ndarray::{ArrayD, IxDyn};

fn main() {
    let peak = cnnc_runtime::jit::peak_gflops().unwrap_or(f64::NAN);
    println!("one core's measured peak: {peak:.1} GFLOP/s");
    // (in, out, kernel, pad, size)
    for (ci, co, k, pad, hw) in
        [(64, 64, 3, 1, 56), (256, 256, 3, 1, 14), (128, 128, 3, 1, 28), (512, 512, 3, 1, 7), (256, 512, 1, 0, 14)]
    {
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
        let input = ArrayD::from_shape_fn(IxDyn(&[1, ci, hw, hw]), |i| (i[1] + i[2] * 3 + i[3] * 7) as f32 % 5.0 - 2.0);
        let flops = 2.0 * (ci * co * k * k * hw * hw) as f64;
        for kernels in [Kernels::Avx512, Kernels::Avx2, Kernels::Portable] {
            let Ok(net) =
                Compiled::with_kernels(&g, &w, &Options { threads: 1, portable: false, fuse: false }, kernels)
            else {
                continue;
            };
            // The conv kernel alone (a plain input with whole blocks of channels is first
            // reordered to the blocked layout, and the blocked result back: not counted).
            let prof = net.profile(&[input.view()], 200).expect("runs");
            let t = prof.iter().find(|k| k.name == "conv").expect("a conv kernel").median.as_secs_f64();
            let gf = flops / t / 1e9;
            println!(
                "{k}x{k} {ci:>3}->{co:<3} at {hw:>2}x{hw:<2} {:<9} {:>9.1} µs {gf:>6.1} GFLOP/s ({:>4.1}% of peak)",
                format!("{kernels:?}"),
                t * 1e6,
                100.0 * gf / peak
            );
        }
    }
}
