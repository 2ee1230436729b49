//! Fusion on the seed nets: ResNet-18's kernel counts before and after (every BatchNorm
//! folds, every conv+bn(+relu) and conv+bn+add+relu is one kernel), and, for every example
//! net in `examples/nets/*.cnn`, the fused graph's outputs equal the unfused graph's within
//! 1e-5 relative in the interpreter (checked after every pass), and the JIT running the fused
//! graph matches the unfused graph within its usual `1e-5 · max(1, max|y|)`.
//!
//! The interpreter is the spec but it is slow (ResNet-18 at 224×224 takes seconds per run in
//! a test build), so the large nets get smaller inputs by editing the input shape in the
//! source text (and, for AlexNet and VGG-11, the first Linear that depends on it).

#[path = "../examples/zoo/mod.rs"]
mod zoo;

use cnnc::compiler::dsl::compile_str;
use cnnc::compiler::ops::Op;
use cnnc::compiler::passes::How;
use cnnc::runtime::fusion_check::{NumericCheck, optimize, relative_error, scaled_error, verify_fusion};
use cnnc::runtime::weights::Weights;
use cnnc::runtime::{Compiled, Options, interp};
use cnnc::{Graph, TensorType};
use ndarray::{ArrayD, IxDyn};

fn weights(g: &Graph, seed: u64) -> Weights {
    let mut w = Weights::random(g, seed);
    w.randomize_batchnorm(g, seed ^ 0x5eed);
    w
}

fn count(g: &Graph, pred: impl Fn(&Op) -> bool) -> usize {
    g.node_ids().into_iter().filter(|id| pred(&g.node(*id).op)).count()
}

#[test]
fn resnet18_fuses_into_23_kernels() {
    let g = zoo::ResNet18::graph();
    let w = weights(&g, 18);
    let out = optimize(&g, &w).unwrap();
    let r = &out.report;
    assert_eq!((r.before.kernels, r.after.kernels), (68, 23), "{r}");
    assert_eq!(count(&out.graph, |op| matches!(op, Op::BatchNorm2d(_))), 0, "every BatchNorm folds");
    assert_eq!(count(&out.graph, |op| matches!(op, Op::Add(_) | Op::Activation(_))), 0);
    assert!(r.not_fused.is_empty(), "{r}");
    let shapes: Vec<Vec<How>> = r.kernels.iter().map(|k| k.absorbed.iter().map(|a| a.how).collect()).collect();
    let conv_bn_relu = shapes.iter().filter(|s| **s == [How::FoldedIntoWeights, How::Activation]).count();
    let conv_bn_add_relu =
        shapes.iter().filter(|s| **s == [How::FoldedIntoWeights, How::Residual, How::Activation]).count();
    let conv_bn = shapes.iter().filter(|s| **s == [How::FoldedIntoWeights]).count();
    assert_eq!((conv_bn_relu, conv_bn_add_relu, conv_bn), (9, 8, 3));
    // The JIT generates one kernel per remaining op.
    let opts = Options { threads: 1, portable: false, fuse: false, ..Default::default() };
    assert_eq!(Compiled::new(&out.graph, &out.weights, &opts).unwrap().kernel_count(), 23);
    assert_eq!(Compiled::new(&g, &w, &opts).unwrap().kernel_count(), 68);
}

/// The example net in `file`, with `edits` applied to its source.
fn example(file: &str, edits: &[(&str, &str)]) -> Graph {
    let path = format!("{}/examples/nets/{file}", env!("CARGO_MANIFEST_DIR"));
    let mut src = std::fs::read_to_string(&path).expect("example net exists");
    for (from, to) in edits {
        assert!(src.contains(from), "{file} has no `{from}`");
        src = src.replace(from, to);
    }
    let out = compile_str(&src);
    assert!(!out.has_errors(), "{file}: {:?}", out.errors().map(|d| d.full_message()).collect::<Vec<_>>());
    out.nets.into_iter().next().expect("one net")
}

fn input(ty: &TensorType, batch: usize, seed: u64) -> ArrayD<f32> {
    let mut k = seed * 1_000_003;
    ArrayD::from_shape_simple_fn(IxDyn(&ty.concrete(batch)), || {
        k += 1;
        ((k * 7919 % 10007) as f32 * 0.713).sin()
    })
}

#[test]
fn every_example_net_fused_equals_unfused() {
    let nets: &[(&str, &[(&str, &str)])] = &[
        ("lenet.cnn", &[]),
        ("cifar10.cnn", &[]),
        ("alexnet.cnn", &[("224, 224]", "128, 128]"), ("Linear(6400,", "Linear(1024,")]),
        ("vgg11.cnn", &[("224, 224]", "64, 64]"), ("* 7 * 7", "* 2 * 2")]),
        ("resnet18.cnn", &[("224, 224]", "64, 64]")]),
        ("seed_resnet.cnn", &[("224, 224]", "64, 64]")]),
        ("nonlinear.cnn", &[]),
        ("conv1x2.cnn", &[]),
    ];
    let mut worst = 0f64;
    for (i, (file, edits)) in nets.iter().enumerate() {
        let g = example(file, edits);
        let w = weights(&g, 100 + i as u64);
        // The interpreter, after every pass.
        let fused = verify_fusion(&g, &w, &NumericCheck { batch: 2, seed: i as u64, ..NumericCheck::default() })
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let c = fused.check.as_ref().expect("checked");
        assert!(c.error <= 1e-5, "{file}: {c}");
        worst = worst.max(c.error);
        println!(
            "{file:<16} kernels {:>2} → {:>2}  error {:.2e}",
            fused.report.before.kernels, fused.report.after.kernels, c.error
        );

        // The JIT runs the fused graph; it matches the unfused graph in the interpreter as
        // the JIT tests require (it sums in f32): within 1e-5 · max(1, max|y|).
        let xs: Vec<ArrayD<f32>> =
            g.inputs.iter().enumerate().map(|(k, (_, id))| input(&g.node(*id).ty, 3, k as u64)).collect();
        let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
        let want = interp::run(&g, &w, &views).unwrap();
        let jit = Compiled::new(&fused.graph, &fused.weights, &Options::default()).unwrap();
        let got = jit.run(&views).unwrap();
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(&want) {
            let e = scaled_error(a, b, 1.0);
            assert!(e <= 1e-5, "{file}: JIT on the fused graph differs by {e:e}");
        }
        // And the interpreter on the fused graph, on these inputs too.
        let again = interp::run(&fused.graph, &fused.weights, &views).unwrap();
        for (a, b) in again.iter().zip(&want) {
            assert!(relative_error(a, b) <= 1e-5, "{file}: {:e}", relative_error(a, b));
        }
    }
    println!("worst relative error over the example nets: {worst:.2e}");
}
