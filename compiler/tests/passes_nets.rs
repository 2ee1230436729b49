//! The pipeline on every example net (`examples/nets/*.cnn`), with the verifier after every
//! pass: kernel counts before and after, what fused, what did not, and that the net's
//! signature is unchanged. Values come from a [`VecStore`]; the numeric equality of fused
//! and unfused nets is tested in the runtime (`tests/fusion.rs`).

use cnnc_compiler::dsl::compile_str;
use cnnc_compiler::graph::Graph;
use cnnc_compiler::ops::Op;
use cnnc_compiler::passes::{FusionReport, How, PIPELINE, VecStore, run_pipeline};

fn compile(file: &str) -> Graph {
    let path = format!("{}/../examples/nets/{file}", env!("CARGO_MANIFEST_DIR"));
    let src = std::fs::read_to_string(&path).expect("example net exists");
    let out = compile_str(&src);
    assert!(!out.has_errors(), "{file} has errors");
    out.nets.into_iter().next().expect("one net")
}

fn fuse(g: &Graph) -> (Graph, FusionReport) {
    let mut h = g.clone();
    let mut store = VecStore::filled(g, |i, j| 0.5 + ((i * 7 + j * 3) % 10) as f32 / 10.0);
    let logs = run_pipeline(PIPELINE, &mut h, &mut store, true).unwrap_or_else(|e| panic!("{}: {e}", g.name));
    let report = FusionReport::new(g, &h, &logs);
    (h, report)
}

fn count(g: &Graph, pred: impl Fn(&Op) -> bool) -> usize {
    g.node_ids().into_iter().filter(|id| pred(&g.node(*id).op)).count()
}

#[test]
fn kernel_counts_before_and_after_for_every_example_net() {
    for (file, before, after) in [
        ("lenet.cnn", 11, 7),
        ("cifar10.cnn", 8, 7),
        ("alexnet.cnn", 18, 11),
        ("vgg11.cnn", 26, 16),
        ("resnet18.cnn", 68, 23),
        ("seed_resnet.cnn", 65, 23),
        ("nonlinear.cnn", 9, 7),
        ("conv1x2.cnn", 1, 1),
    ] {
        let g = compile(file);
        let (h, report) = fuse(&g);
        assert_eq!((report.before.kernels, report.after.kernels), (before, after), "{file}\n{report}");
        // What the user sees is unchanged.
        let sig = |g: &Graph| {
            let ins: Vec<_> = g.inputs.iter().map(|(n, id)| (n.clone(), g.node(*id).ty.clone())).collect();
            let outs: Vec<_> = g.outputs.iter().map(|(n, id)| (n.clone(), g.node(*id).ty.clone())).collect();
            (ins, outs)
        };
        assert_eq!(sig(&h), sig(&g), "{file}");
        assert!(report.after.activation_traffic() <= report.before.activation_traffic(), "{file}");
        assert_eq!(count(&h, |op| matches!(op, Op::Dropout(_))), 0, "{file}");
    }
}

#[test]
fn resnet18_every_batchnorm_folds_and_every_block_is_two_or_three_kernels() {
    let g = compile("resnet18.cnn");
    let (h, report) = fuse(&g);
    assert_eq!((report.before.kernels, report.after.kernels), (68, 23));
    assert_eq!(count(&h, |op| matches!(op, Op::BatchNorm2d(_) | Op::Add(_) | Op::Activation(_))), 0);
    assert!(report.not_fused.is_empty(), "{report}");

    let absorbed = |k: &cnnc_compiler::passes::FusedKernel| k.absorbed.iter().map(|a| a.how).collect::<Vec<_>>();
    let folded: usize =
        report.kernels.iter().flat_map(|k| &k.absorbed).filter(|a| a.how == How::FoldedIntoWeights).count();
    assert_eq!(folded, 20, "every BatchNorm folds");
    // conv + bn + relu: the stem and every block's conv1.
    let conv_bn_relu: Vec<&str> = report
        .kernels
        .iter()
        .filter(|k| absorbed(k) == [How::FoldedIntoWeights, How::Activation])
        .map(|k| k.name.as_str())
        .collect();
    assert_eq!(conv_bn_relu.len(), 9);
    assert_eq!(conv_bn_relu[..2], ["conv1", "layer1.0.conv1"]);
    // conv + bn + add + relu: every block's conv2.
    let conv_bn_add_relu: Vec<&str> = report
        .kernels
        .iter()
        .filter(|k| absorbed(k) == [How::FoldedIntoWeights, How::Residual, How::Activation])
        .map(|k| k.name.as_str())
        .collect();
    assert_eq!(conv_bn_add_relu.len(), 8);
    assert!(conv_bn_add_relu.iter().all(|n| n.ends_with(".conv2")), "{conv_bn_add_relu:?}");
    // conv + bn: the three projections.
    let projections = report.kernels.iter().filter(|k| absorbed(k) == [How::FoldedIntoWeights]).count();
    assert_eq!(projections, 3);

    // The table lists what the kernels read, state_dict-style.
    assert_eq!(
        h.state_dict_keys()[..4],
        ["conv1.weight", "conv1.bias", "layer1.0.conv1.weight", "layer1.0.conv1.bias"]
    );
    assert_eq!(h.params.len(), 20 * 2 + 2);
    // One activation write per conv instead of up to four (conv, bn, add, relu).
    assert!(report.after.activation_traffic() * 2 < report.before.activation_traffic());
}

#[test]
fn resnet18_report_reads_well() {
    let (_, report) = fuse(&compile("resnet18.cnn"));
    let text = report.to_string();
    let head: Vec<&str> = text.lines().take(4).collect();
    assert_eq!(head[0], "Fusion report: ResNet18");
    assert_eq!(head[1], "  kernels             68 → 23");
    assert!(head[2].starts_with("  activation traffic  "), "{text}");
    assert!(text.contains(
        "  layer1.0.conv2: Conv2d(64, 64, kernel_size=(3, 3), padding=(1, 1)) ⇒ +residual ⇒ relu\n      ⇐ layer1.0.bn2 (BatchNorm2d, folded into weights), layer1.0.add() (Add, residual epilogue), layer1.0.relu (ReLU, activation epilogue)\n"
    ), "{text}");
    assert!(!text.contains("digraph"), "DOT only with {{:#}}");
    let full = format!("{report:#}");
    assert!(full.contains("digraph \"ResNet18\""));
    assert!(report.dot_after.contains("⇒ +residual ⇒ relu"));
    assert!(report.dot_before.matches(" -> ").count() > report.dot_after.matches(" -> ").count());
}

#[test]
fn nonlinear_model_says_why_its_add_does_not_fuse() {
    let (_, report) = fuse(&compile("nonlinear.cnn"));
    let reasons: Vec<String> = report.not_fused.iter().map(|n| format!("{}: {}", n.name, n.reason)).collect();
    assert_eq!(
        reasons,
        ["add(): `mean()` is a Mean, not a Conv2d or Linear; `max()` is a Max, not a Conv2d or Linear"]
    );
}
