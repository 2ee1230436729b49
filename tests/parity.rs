//! Numerical parity with PyTorch, end to end through the DSL: every single-layer case and
//! every reference net in `tests/fixtures/` is compiled from text, loaded with PyTorch's own
//! `state_dict`, and run by both the reference interpreter and the JIT. Both must match
//! PyTorch within 1e-4 of max |output|; the worst error seen is printed.

#[path = "../examples/zoo/mod.rs"]
mod zoo;

use cnnc::Graph;
use cnnc::compiler::dsl::compile_str;
use cnnc::runtime::jit::{Compiled, Options};
use cnnc::runtime::{interp, weights::Weights};
use ndarray::{ArrayD, IxDyn};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::PathBuf;

const TOLERANCE: f32 = 1e-4;

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(path)
}

fn tensors(path: &str) -> HashMap<String, ArrayD<f32>> {
    let bytes = std::fs::read(fixture(path)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.iter()
        .filter(|(_, t)| t.dtype() == safetensors::Dtype::F32)
        .map(|(k, t)| {
            let v = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            (k.to_string(), ArrayD::from_shape_vec(IxDyn(t.shape()), v).unwrap())
        })
        .collect()
}

/// Largest |a − b| relative to max |b|.
fn rel_err(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn compile(src: &str, name: &str) -> Graph {
    let out = compile_str(src);
    assert!(!out.has_errors(), "{name}: {:?}", out.errors().map(|d| d.full_message()).collect::<Vec<_>>());
    out.net(name).unwrap_or_else(|| panic!("net {name}")).clone()
}

/// Runs `graph` with PyTorch weights by interpreter and JIT (the graph as given, and
/// fused as `Compiled::new` does by default); returns the worst relative errors.
fn check(what: &str, graph: &Graph, weights: &str, io: &str, outputs: &[&str]) -> (f32, f32) {
    let w = Weights::load(graph, fixture(weights)).unwrap_or_else(|e| panic!("{what}: {e}"));
    let io = tensors(io);
    let x = &io["input"];
    let reference = interp::run(graph, &w, &[x.view()]).unwrap();
    let (mut wi, mut wj) = (0f32, 0f32);
    for fuse in [false, true] {
        let jit = Compiled::new(graph, &w, &Options { threads: 1, fuse, ..Options::default() }).unwrap();
        let got = jit.run(&[x.view()]).unwrap();
        for (i, name) in outputs.iter().enumerate() {
            let want = &io[*name];
            let (ei, ej) = (rel_err(&reference[i], want), rel_err(&got[i], want));
            assert!(ei <= TOLERANCE, "{what}/{name}: interpreter off by {ei:e} of max |y|");
            assert!(ej <= TOLERANCE, "{what}/{name}: JIT (fuse: {fuse}) off by {ej:e} of max |y|");
            wi = wi.max(ei);
            wj = wj.max(ej);
        }
    }
    (wi, wj)
}

#[test]
fn every_single_layer_case_matches_pytorch() {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("layers/manifest.json")).unwrap()).unwrap();
    let cases = manifest.as_array().unwrap();
    assert!(cases.len() >= 30);
    let (mut wi, mut wj) = (0f32, 0f32);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let shape: Vec<String> = case["input"].as_array().unwrap().iter().map(|v| v.to_string()).collect();
        let src = format!("net case(x: [{}]) = Sequential({});", shape.join(", "), case["layer"].as_str().unwrap());
        let g = compile(&src, "case");
        let (i, j) = check(
            name,
            &g,
            &format!("layers/{name}.weights.safetensors"),
            &format!("layers/{name}.io.safetensors"),
            &["output"],
        );
        wi = wi.max(i);
        wj = wj.max(j);
    }
    println!("{} layer cases: worst error vs PyTorch: interpreter {wi:.2e}, JIT {wj:.2e} (of max |y|)", cases.len());
}

fn net_source(file: &str) -> String {
    std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/nets").join(file)).unwrap()
}

#[test]
fn reference_nets_match_pytorch() {
    let lenet = zoo::LeNet::graph();
    let cifar = zoo::Cifar10::graph();
    // The fixture runs NoneLinearModel on 10×10 images.
    let nonlinear =
        compile(&net_source("nonlinear.cnn").replace("[N, 3, 32, 32]", "[N, 3, 10, 10]"), "NoneLinearModel");
    // A reduced torchvision ResNet: BasicBlocks with BN and a 1×1 downsample, 16×16 input.
    let small = net_source("resnet18.cnn").split("net ResNet18").next().unwrap().to_string()
        + "
net ResNetSmall(x: [N, 3, 16, 16]) {
    conv1 = Conv2d(3, 16, kernel_size = 3, padding = 1, bias = False);
    bn1 = BatchNorm2d(16);
    relu = ReLU();
    layer1 = make_layer(16, 16, 1);
    layer2 = make_layer(16, 32, 1, stride = 2);
    avgpool = AdaptiveAvgPool2d((1, 1));
    fc = Linear(32, 10);
    fn forward(self, x) {
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))));
        self.fc(flatten(self.avgpool(x), 1))
    }
}";
    let small = compile(&small, "ResNetSmall");
    for (what, g, outputs) in [
        ("lenet", &lenet, &["output"][..]),
        ("cifar10", &cifar, &["output"][..]),
        ("nonlinear", &nonlinear, &["output", "features"][..]),
        ("resnet_small", &small, &["output"][..]),
    ] {
        let (i, j) = check(
            what,
            g,
            &format!("nets/{what}.weights.safetensors"),
            &format!("nets/{what}.io.safetensors"),
            outputs,
        );
        println!("{what}: worst error vs PyTorch: interpreter {i:.2e}, JIT {j:.2e} (of max |y|)");
    }
}
