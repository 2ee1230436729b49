//! The seed networks declared with `cnn!` (in `examples/zoo`): parameter counts, PyTorch
//! `state_dict` keys, the torchinfo table of ResNet-18, and equality with the run-time parser.

#[path = "../examples/zoo/mod.rs"]
mod zoo;

use cnnc::compiler::dsl::compile_str;
use cnnc::compiler::ops::Op;
use cnnc::{Graph, Net, Summary};
use zoo::*;

// Parameter counts are compile-time constants equal to PyTorch's `sum(p.numel())`.
const _: () = assert!(LeNet::PARAMS == 61_706);
const _: () = assert!(Cifar10::PARAMS == 145_578);
const _: () = assert!(AlexNet::PARAMS == 46_764_746);
const _: () = assert!(Vgg11::PARAMS == 128_806_154);
const _: () = assert!(ResNet18::PARAMS == 11_689_512);
const _: () = assert!(SeedResNet::PARAMS == 11_173_761);
const _: () = assert!(NoneLinearModel::PARAMS == 76_938);
const _: () = assert!(Conv1x2::PARAMS == 2);

fn fixture(path: &str) -> String {
    std::fs::read_to_string(format!("{}/tests/fixtures/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

#[test]
fn parameter_counts_equal_pytorch_for_every_seed_net() {
    let counts: serde_json::Value = serde_json::from_str(&fixture("param_counts.json")).unwrap();
    for (key, params) in [
        ("lenet", LeNet::PARAMS),
        ("cifar10", Cifar10::PARAMS),
        ("alexnet", AlexNet::PARAMS),
        ("vgg11", Vgg11::PARAMS),
        ("resnet18", ResNet18::PARAMS),
        ("seed_resnet", SeedResNet::PARAMS),
        ("nonlinear", NoneLinearModel::PARAMS),
        ("conv1x2", Conv1x2::PARAMS),
    ] {
        assert_eq!(counts[key].as_u64(), Some(params as u64), "{key}");
    }
}

/// `key\tshape\tdtype` lines as PyTorch's `state_dict()` lists them.
fn check_keys<N: Net>(file: &str) {
    let g = N::graph();
    let ours: Vec<String> = g
        .params
        .iter()
        .map(|p| {
            let shape: Vec<String> = p.spec.shape.iter().map(|d| d.to_string()).collect();
            let dtype = match p.spec.dtype {
                cnnc::compiler::ops::DType::F32 => "float32",
                cnnc::compiler::ops::DType::I64 => "int64",
            };
            format!("{}\t{}\t{dtype}", p.name, shape.join(","))
        })
        .collect();
    let theirs: Vec<String> = fixture(file).lines().map(str::to_string).collect();
    assert_eq!(ours, theirs, "{} state_dict differs from PyTorch's ({file})", N::NAME);
}

#[test]
fn state_dict_keys_equal_pytorch() {
    check_keys::<LeNet>("keys/lenet.txt");
    check_keys::<Cifar10>("keys/cifar10.txt");
    check_keys::<ResNet18>("keys/resnet18.txt");
    assert_eq!(LeNet::STATE_DICT_KEYS.len(), 10);
    assert_eq!(ResNet18::STATE_DICT_KEYS[0], "conv1.weight");
}

#[test]
fn resnet18_table_matches_torchinfo() {
    let info: serde_json::Value = serde_json::from_str(&fixture("resnet18_torchinfo.json")).unwrap();
    let summary = Summary::of(&ResNet18::graph());
    // torchinfo lists module calls; cnnc also lists the functional ops of forward (the
    // residual `+`, flatten), whose names end in `()`.
    let rows: Vec<_> = summary.rows.iter().filter(|r| !r.name.ends_with("()")).collect();
    let expected = info["rows"].as_array().unwrap();
    assert_eq!(rows.len(), expected.len());
    for (ours, theirs) in rows.iter().zip(expected) {
        let shape: Vec<usize> =
            theirs["output_shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(ours.name, theirs["name"].as_str().unwrap());
        assert_eq!(ours.kind, theirs["type"].as_str().unwrap(), "{}", ours.name);
        assert_eq!(ours.output_dims, shape, "{}", ours.name);
        // torchinfo counts a module's parameters at each call; a module called twice (relu)
        // has none, so first-use counting agrees.
        assert_eq!(ours.params, theirs["params"].as_u64().unwrap() as usize, "{}", ours.name);
    }
    assert_eq!(summary.total_params as u64, info["total_params"].as_u64().unwrap());
    println!("{summary}");
}

fn same_ir<N: Net>(file: &str) {
    let path = format!("{}/examples/nets/{file}", env!("CARGO_MANIFEST_DIR"));
    let out = compile_str(&std::fs::read_to_string(path).unwrap());
    assert!(!out.has_errors(), "{file}");
    let text: &Graph = out.net(N::NAME).unwrap();
    let macro_graph = N::graph();
    assert_eq!(text.to_string(), macro_graph.to_string(), "{file}: IR text differs");
    assert_eq!(text.params, macro_graph.params, "{file}: parameter tables differ");
}

#[test]
fn run_time_parsing_gives_the_macros_ir() {
    same_ir::<LeNet>("lenet.cnn");
    same_ir::<Cifar10>("cifar10.cnn");
    same_ir::<AlexNet>("alexnet.cnn");
    same_ir::<Vgg11>("vgg11.cnn");
    same_ir::<ResNet18>("resnet18.cnn");
    same_ir::<SeedResNet>("seed_resnet.cnn");
    same_ir::<NoneLinearModel>("nonlinear.cnn");
    same_ir::<Conv1x2>("conv1x2.cnn");
}

#[test]
fn multiple_named_outputs() {
    assert_eq!(NoneLinearModel::OUTPUTS.len(), 2);
    assert_eq!(NoneLinearModel::OUTPUTS[0].name, "output");
    assert_eq!(NoneLinearModel::OUTPUTS[0].dims, &[10]);
    assert_eq!(NoneLinearModel::OUTPUTS[1].name, "features");
    assert_eq!(NoneLinearModel::OUTPUTS[1].dims, &[128, 28, 28]);
    assert_eq!(NoneLinearModel::INPUTS[0].batch, None);
}

#[test]
fn applying_a_layer_twice_shares_its_weights() {
    cnnc::cnn! {
        net Shared(x: [N, 8, 10, 10]) {
            conv = Conv2d(8, 8, 3, padding = 1);
            fn forward(self, x) {
                self.conv(relu(self.conv(x)))
            }
        }
    }
    assert_eq!(Shared::PARAMS, 8 * 8 * 9 + 8);
    let g = Shared::graph();
    let convs: Vec<_> = g.node_ids().into_iter().filter(|id| matches!(g.node(*id).op, Op::Conv2d(_))).collect();
    assert_eq!(convs.len(), 2);
    assert_eq!(g.node(convs[0]).params, g.node(convs[1]).params);
    assert_eq!(Shared::STATE_DICT_KEYS, &["conv.weight", "conv.bias"]);
}

#[test]
fn seed_alexnet_module_style_fixed() {
    // conv1..conv5, dense1..3 registered in declaration order; relu/max_pool applied often.
    assert_eq!(SeedAlexNet::PARAMS, AlexNet::PARAMS);
    assert_eq!(SeedAlexNet::STATE_DICT_KEYS[0], "conv1.weight");
    assert_eq!(SeedAlexNet::OUTPUTS[0].dims, &[10]);
}
