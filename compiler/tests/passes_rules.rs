//! Each fusion rule on small nets written in the DSL: the IR before and after as text, the
//! folded values, the parameter keys, and the reasons given for what did not fuse. The IR
//! verifier runs after every pass.

use cnnc_compiler::dsl::compile_str;
use cnnc_compiler::graph::{Graph, ParamId};
use cnnc_compiler::ops::Op;
use cnnc_compiler::passes::{
    self, FusionReport, How, PIPELINE, ParamStore, Pass, PassError, PassOptions, Rule, Skip, VecStore, run_pass,
    run_pipeline,
};

fn net(src: &str) -> Graph {
    let out = compile_str(src);
    let errors: Vec<String> = out.errors().map(|d| d.full_message()).collect();
    assert!(errors.is_empty(), "{errors:?}");
    out.nets.into_iter().next().expect("one net")
}

/// Deterministic values in `[0.5, 1.5)` (positive, so every running_var is valid).
fn store_for(g: &Graph) -> VecStore {
    VecStore::filled(g, |i, j| 0.5 + ((i * 7 + j * 3) % 10) as f32 / 10.0)
}

fn set(g: &Graph, store: &mut VecStore, key: &str, values: &[f32]) {
    let i = g.params.iter().position(|p| p.name == key).unwrap_or_else(|| panic!("no key {key}"));
    store.set(ParamId(i), values.to_vec());
}

fn get<'a>(g: &Graph, store: &'a VecStore, key: &str) -> &'a [f32] {
    let i = g.params.iter().position(|p| p.name == key).unwrap_or_else(|| panic!("no key {key}"));
    store.get(ParamId(i)).expect("f32 values")
}

/// Runs the whole pipeline, verifying after every pass.
fn fuse(g: &Graph, store: &mut VecStore) -> (Graph, FusionReport) {
    let mut h = g.clone();
    let logs = run_pipeline(PIPELINE, &mut h, store, true).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(store.len(), h.params.len(), "store aligned with the table");
    let report = FusionReport::new(g, &h, &logs);
    (h, report)
}

fn check_text(g: &Graph, expected: &str) {
    let got = g.to_string();
    assert_eq!(got.trim(), expected.trim(), "\n--- got ---\n{got}");
}

fn reasons(r: &FusionReport) -> Vec<String> {
    r.not_fused.iter().map(|n| format!("{}: {}", n.name, n.reason)).collect()
}

#[test]
fn conv_bn_relu_is_one_kernel_with_folded_weights_and_a_new_bias() {
    let g = net("net T(x: [N, 1, 2, 2]) {
        conv = Conv2d(1, 2, 1, bias = False);
        bn = BatchNorm2d(2, eps = 1.0);
        act = ReLU();
        fn forward(self, x) { self.act(self.bn(self.conv(x))) }
    }");
    let mut store = store_for(&g);
    set(&g, &mut store, "conv.weight", &[2.0, -1.0]);
    set(&g, &mut store, "bn.weight", &[1.0, 3.0]);
    set(&g, &mut store, "bn.bias", &[0.5, 0.0]);
    set(&g, &mut store, "bn.running_mean", &[1.0, 2.0]);
    set(&g, &mut store, "bn.running_var", &[3.0, 15.0]);
    let (h, report) = fuse(&g, &mut store);
    check_text(
        &h,
        "
net T(x: [N, 1, 2, 2]) -> (output) {
  %0 = input x : [N, 1, 2, 2]
  %1 = Conv2d(1, 2, kernel_size=(1, 1)) ⇒ relu(%0) : [N, 2, 2, 2]  # conv
  return output = %1
}",
    );
    // s = weight / sqrt(var + eps) = [1/2, 3/4]; t = bias − mean·s = [0, −1.5].
    assert_eq!(h.state_dict_keys(), ["conv.weight", "conv.bias"]);
    assert_eq!(get(&h, &store, "conv.weight"), [1.0, -0.75]);
    assert_eq!(get(&h, &store, "conv.bias"), [0.0, -1.5]);
    let k = &report.kernels[0];
    assert_eq!(k.name, "conv");
    let how: Vec<(&str, How)> = k.absorbed.iter().map(|a| (a.name.as_str(), a.how)).collect();
    assert_eq!(how, [("bn", How::FoldedIntoWeights), ("act", How::Activation)]);
    assert_eq!(k.notes, ["`conv` gained the bias `conv.bias`"]);
    assert_eq!((report.before.kernels, report.after.kernels), (3, 1));
    assert!(report.not_fused.is_empty());
}

#[test]
fn folding_into_a_conv_with_bias_updates_the_bias() {
    let g = net("net T(x: [N, 1, 2, 2]) = Sequential(Conv2d(1, 1, 1), BatchNorm2d(1, eps = 0.0001, affine = False));");
    let mut store = store_for(&g);
    set(&g, &mut store, "0.weight", &[2.0]);
    set(&g, &mut store, "0.bias", &[1.0]);
    set(&g, &mut store, "1.running_mean", &[3.0]);
    set(&g, &mut store, "1.running_var", &[3.9999]);
    let (h, _) = fuse(&g, &mut store);
    assert_eq!(h.state_dict_keys(), ["0.weight", "0.bias"]);
    assert_eq!(get(&h, &store, "0.weight"), [1.0]);
    assert_eq!(get(&h, &store, "0.bias"), [-1.0]);
}

#[test]
fn batchnorm_after_a_conv_whose_output_is_shared_stays_and_says_why() {
    let g = net("net T(x: [N, 2, 4, 4]) {
        conv1 = Conv2d(2, 2, 3, padding = 1);
        bn1 = BatchNorm2d(2);
        shortcut = Conv2d(2, 2, 1);
        fn forward(self, x) {
            let y = self.conv1(x);
            self.bn1(y) + self.shortcut(y)
        }
    }");
    let (h, report) = fuse(&g, &mut store_for(&g));
    check_text(
        &h,
        "
net T(x: [N, 2, 4, 4]) -> (output) {
  %0 = input x : [N, 2, 4, 4]
  %1 = Conv2d(2, 2, kernel_size=(3, 3), padding=(1, 1))(%0) : [N, 2, 4, 4]  # conv1
  %2 = BatchNorm2d(2)(%1) : [N, 2, 4, 4]  # bn1
  %3 = Conv2d(2, 2, kernel_size=(1, 1)) ⇒ +residual(%1, %2) : [N, 2, 4, 4]  # shortcut
  return output = %3
}",
    );
    assert_eq!(reasons(&report), ["bn1: `conv1`'s output also feeds `shortcut` (Conv2d)"]);
    assert_eq!(report.not_fused[0].passes, ["fold-batchnorm", "batchnorm-epilogue"]);
}

#[test]
fn a_module_applied_twice_keeps_its_weights_and_gets_scale_shift_epilogues() {
    let g = net("net T(x: [N, 2, 3, 3]) {
        conv = Conv2d(2, 2, 3, padding = 1);
        bn1 = BatchNorm2d(2, eps = 1.0);
        bn2 = BatchNorm2d(2);
        fn forward(self, x) { self.bn2(self.conv(self.bn1(self.conv(x)))) }
    }");
    let mut store = store_for(&g);
    set(&g, &mut store, "bn1.weight", &[2.0, 1.0]);
    set(&g, &mut store, "bn1.bias", &[0.0, 1.0]);
    set(&g, &mut store, "bn1.running_mean", &[1.0, 1.0]);
    set(&g, &mut store, "bn1.running_var", &[3.0, 0.0]);
    let weight = get(&g, &store, "conv.weight").to_vec();
    let (h, report) = fuse(&g, &mut store);
    check_text(
        &h,
        "
net T(x: [N, 2, 3, 3]) -> (output) {
  %0 = input x : [N, 2, 3, 3]
  %1 = Conv2d(2, 2, kernel_size=(3, 3), padding=(1, 1)) ⇒ scale_shift(%0) : [N, 2, 3, 3]  # conv
  %3 = Conv2d(2, 2, kernel_size=(3, 3), padding=(1, 1)) ⇒ scale_shift(%1) : [N, 2, 3, 3]  # conv
  return output = %3
}",
    );
    assert_eq!(
        h.state_dict_keys(),
        ["conv.weight", "conv.bias", "conv.scale", "conv.shift", "conv#2.scale", "conv#2.shift"]
    );
    assert_eq!(get(&h, &store, "conv.weight"), weight, "shared weights are left alone");
    assert_eq!(get(&h, &store, "conv.scale"), [1.0, 1.0]);
    assert_eq!(get(&h, &store, "conv.shift"), [-1.0, 0.0]);
    let first = report.kernels.iter().find(|k| k.node == h.outputs[0].1).expect("second conv fused");
    assert_eq!(first.absorbed[0].how, How::ScaleShift);
    assert!(report.not_fused.is_empty(), "the fold's declines are resolved by the epilogue");
}

#[test]
fn two_batchnorms_compose_into_one_scale_shift() {
    let g = net("net T(x: [N, 1, 2, 2]) {
        conv = Conv2d(1, 1, 1);
        a = BatchNorm2d(1, eps = 1.0);
        b = BatchNorm2d(1, eps = 3.0);
        fn forward(self, x) { let y = self.b(self.a(self.conv(x))); self.conv(y) }
    }");
    let mut store = store_for(&g);
    for (k, v) in [("a.weight", 2.0), ("a.bias", 1.0), ("a.running_mean", 0.0), ("a.running_var", 3.0)] {
        set(&g, &mut store, k, &[v]);
    }
    for (k, v) in [("b.weight", 1.0), ("b.bias", 0.0), ("b.running_mean", 2.0), ("b.running_var", 1.0)] {
        set(&g, &mut store, k, &[v]);
    }
    let (h, report) = fuse(&g, &mut store);
    // a: y·1 + 1; b: (y − 2)·0.5 → scale 0.5, shift (1 − 2)·0.5 = −0.5.
    assert_eq!(get(&h, &store, "conv.scale"), [0.5]);
    assert_eq!(get(&h, &store, "conv.shift"), [-0.5]);
    assert_eq!(report.kernels[0].absorbed.len(), 2);
    assert_eq!(report.kernels[0].notes, ["composed into `conv`'s scale/shift"]);
}

#[test]
fn batchnorm_and_activation_without_a_kernel_before_them_stay() {
    let g = net("net T(x: [N, 2, 4, 4]) = Sequential(BatchNorm2d(2), MaxPool2d(2), BatchNorm2d(2), Tanh());");
    let (h, report) = fuse(&g, &mut store_for(&g));
    assert_eq!(h.node_count(), g.node_count());
    assert_eq!(
        reasons(&report),
        [
            "0: its input is the graph input `x`, not a Conv2d",
            "2: its input comes from `1` (MaxPool2d), not a Conv2d",
            "3: its input comes from `2` (BatchNorm2d), not a Conv2d or Linear",
        ]
    );
}

#[test]
fn relu_of_conv_plus_skip_is_one_kernel_even_without_bias() {
    let g = net("net T(x: [N, 2, 4, 4]) {
        conv = Conv2d(2, 2, 3, padding = 1, bias = False);
        fn forward(self, x) { relu(x + self.conv(x)) }
    }");
    let (h, report) = fuse(&g, &mut store_for(&g));
    check_text(
        &h,
        "
net T(x: [N, 2, 4, 4]) -> (output) {
  %0 = input x : [N, 2, 4, 4]
  %1 = Conv2d(2, 2, kernel_size=(3, 3), padding=(1, 1), bias=False) ⇒ +residual ⇒ relu(%0, %0) : [N, 2, 4, 4]  # conv
  return output = %1
}",
    );
    assert_eq!(h.state_dict_keys(), ["conv.weight"]);
    assert_eq!(report.after.kernels, 1);
}

#[test]
fn basic_block_with_a_projection_fuses_into_three_kernels() {
    // The projection (`downsample`) is created after `conv2`, so the fused `conv2` reads a
    // node created after it: the topological order, not creation order, decides.
    let g = net("
block BasicBlock(inplanes, planes, stride = 1) {
    conv1 = Conv2d(inplanes, planes, kernel_size = 3, stride = stride, padding = 1, bias = False);
    bn1 = BatchNorm2d(planes);
    relu = ReLU(inplace = True);
    conv2 = Conv2d(planes, planes, kernel_size = 3, stride = 1, padding = 1, bias = False);
    bn2 = BatchNorm2d(planes);
    downsample = Sequential(
        Conv2d(inplanes, planes, kernel_size = 1, stride = stride, bias = False),
        BatchNorm2d(planes),
    );
    fn forward(self, x) {
        let out = self.relu(self.bn1(self.conv1(x)));
        out = self.bn2(self.conv2(out));
        out += self.downsample(x);
        self.relu(out)
    }
}
net T(x: [N, 2, 6, 6]) = Sequential(BasicBlock(2, 4, 2));
");
    let (h, report) = fuse(&g, &mut store_for(&g));
    check_text(
        &h,
        "
net T(x: [N, 2, 6, 6]) -> (output) {
  %0 = input x : [N, 2, 6, 6]
  %1 = Conv2d(2, 4, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1)) ⇒ relu(%0) : [N, 4, 3, 3]  # 0.conv1
  %6 = Conv2d(2, 4, kernel_size=(1, 1), stride=(2, 2))(%0) : [N, 4, 3, 3]  # 0.downsample.0
  %4 = Conv2d(4, 4, kernel_size=(3, 3), padding=(1, 1)) ⇒ +residual ⇒ relu(%1, %6) : [N, 4, 3, 3]  # 0.conv2
  return output = %4
}",
    );
    assert_eq!(
        h.state_dict_keys(),
        [
            "0.conv1.weight",
            "0.conv1.bias",
            "0.downsample.0.weight",
            "0.downsample.0.bias",
            "0.conv2.weight",
            "0.conv2.bias"
        ]
    );
    let conv2 = report.kernels.iter().find(|k| k.name == "0.conv2").expect("conv2");
    let how: Vec<How> = conv2.absorbed.iter().map(|a| a.how).collect();
    assert_eq!(how, [How::FoldedIntoWeights, How::Residual, How::Activation]);
    assert_eq!((report.before.kernels, report.after.kernels), (9, 3));
}

#[test]
fn residual_declines_say_why() {
    let g = net("net T(x: [N, 2, 4, 4]) -> (output, pre) {
        conv = Conv2d(2, 2, 3, padding = 1);
        other = Conv2d(2, 2, 3, padding = 1);
        fn forward(self, x) {
            let pre = self.conv(x);
            let a = relu(self.other(x)) + pre;
            (a + x, pre)
        }
    }");
    let (_, report) = fuse(&g, &mut store_for(&g));
    assert_eq!(
        reasons(&report),
        [
            "add(): `relu()` is a ReLU, not a Conv2d or Linear; `conv`'s output is also the graph output `pre`",
            "add(): `add()` is an Add, not a Conv2d or Linear; `x` is the graph input, not a Conv2d or Linear",
        ]
    );
}

#[test]
fn an_activation_on_a_conv_that_is_also_an_output_stays() {
    let g = net("net T(x: [N, 2, 4, 4]) -> (output, features) {
        conv = Conv2d(2, 2, 3);
        fn forward(self, x) { let f = self.conv(x); (relu(f), f) }
    }");
    let (_, report) = fuse(&g, &mut store_for(&g));
    assert_eq!(reasons(&report), ["relu(): `conv`'s output is also the graph output `features`"]);
}

#[test]
fn dropout_and_dead_nodes_are_removed_flatten_stays_a_view() {
    let g = net("net T(x: [N, 2, 4, 4]) {
        conv = Conv2d(2, 2, 3);
        drop = Dropout(p = 0.5);
        unused = Conv2d(2, 2, 1);
        head = Linear(8, 3);
        fn forward(self, x) {
            let dead = relu(self.unused(x));
            self.head(flatten(self.drop(self.conv(x)), 1))
        }
    }");
    let (h, report) = fuse(&g, &mut store_for(&g));
    let removed: Vec<(&str, How)> = report.removed.iter().map(|r| (r.name.as_str(), r.how)).collect();
    assert_eq!(removed.len(), 3, "{removed:?}");
    assert!(removed.iter().any(|(_, h)| *h == How::Identity));
    assert_eq!(removed.iter().filter(|(_, h)| *h == How::Dead).count(), 2);
    assert!(h.node_ids().iter().any(|id| matches!(h.node(*id).op, Op::Flatten(_))), "Flatten is kept as a view");
    assert_eq!(report.after.kernels, 2, "conv and head; Flatten is a view");
    assert_eq!(h.state_dict_keys(), ["conv.weight", "conv.bias", "head.weight", "head.bias"]);
}

#[test]
fn a_linear_chain_folds_when_cheaper() {
    let g = net("net T(x: [N, 3]) = Sequential(Linear(3, 2), Linear(2, 1), Sigmoid());");
    let mut store = store_for(&g);
    set(&g, &mut store, "0.weight", &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    set(&g, &mut store, "0.bias", &[1.0, -1.0]);
    set(&g, &mut store, "1.weight", &[1.0, -1.0]);
    set(&g, &mut store, "1.bias", &[0.5]);
    let (h, report) = fuse(&g, &mut store);
    check_text(
        &h,
        "
net T(x: [N, 3]) -> (output) {
  %0 = input x : [N, 3]
  %2 = Linear(3, 1) ⇒ sigmoid(%0) : [N, 1]  # 1
  return output = %2
}",
    );
    assert_eq!(get(&h, &store, "1.weight"), [-3.0, -3.0, -3.0]);
    assert_eq!(get(&h, &store, "1.bias"), [2.5]);
    assert_eq!(h.params[0].spec.shape, [1, 3]);
    assert_eq!(report.kernels[0].absorbed.len(), 2);

    let bottleneck = net("net T(x: [N, 8]) = Sequential(Linear(8, 2), Linear(2, 8));");
    let (_, report) = fuse(&bottleneck, &mut store_for(&bottleneck));
    assert_eq!(
        reasons(&report),
        ["1: the composed 8×8 weight would cost more than `0` and `1` together (64 ≥ 32 MACs)"]
    );
}

fn resnet_block() -> Graph {
    net("net T(x: [N, 2, 4, 4]) {
        conv1 = Conv2d(2, 2, 3, padding = 1);
        bn1 = BatchNorm2d(2);
        conv2 = Conv2d(2, 2, 3, padding = 1);
        bn2 = BatchNorm2d(2);
        fn forward(self, x) { relu(self.bn2(self.conv2(relu(self.bn1(self.conv1(x))))) + x) }
    }")
}

#[test]
fn pass_options_skip_nodes_and_limit_rewrites() {
    let g = resnet_block();
    let fold = PIPELINE.iter().find(|p| p.name == "fold-batchnorm").expect("pass");
    let bns: Vec<_> = g.node_ids().into_iter().filter(|id| matches!(g.node(*id).op, Op::BatchNorm2d(_))).collect();

    let mut h = g.clone();
    let mut store = store_for(&g);
    let log =
        run_pass(fold, &mut h, &mut store, &PassOptions { max_rewrites: Some(1), ..PassOptions::verified() }).unwrap();
    assert_eq!(log.rewrites.len(), 1);
    assert_eq!(log.rewrites[0].0, Some(bns[0]));

    let mut h = g.clone();
    let mut store = store_for(&g);
    let log =
        run_pass(fold, &mut h, &mut store, &PassOptions { skip: vec![bns[0]], ..PassOptions::verified() }).unwrap();
    assert_eq!(log.rewrites.iter().map(|r| r.0).collect::<Vec<_>>(), [Some(bns[1])]);
    assert!(h.contains(bns[0]));
}

#[test]
fn a_store_that_does_not_match_the_table_is_an_error() {
    let g = resnet_block();
    let mut h = g.clone();
    let mut store = VecStore(vec![]);
    let e = run_pipeline(PIPELINE, &mut h, &mut store, true).unwrap_err();
    assert_eq!(e, PassError::Store { pass: "remove-identity-views", store: 0, params: g.params.len() });
}

#[test]
fn unknown_values_decline_folding_and_what_waits_on_it() {
    let g = resnet_block();
    let mut h = g.clone();
    let mut store = VecStore(vec![None; g.params.len()]);
    let logs = run_pipeline(PIPELINE, &mut h, &mut store, true).unwrap();
    let report = FusionReport::new(&g, &h, &logs);
    // Without values the BatchNorms stay, and so does everything they sit in front of.
    assert_eq!(
        reasons(&report),
        [
            "bn1: the values of `bn1.running_mean` are not known",
            "relu(): its input comes from `bn1` (BatchNorm2d), not a Conv2d or Linear",
            "bn2: the values of `bn2.running_mean` are not known",
            "add(): `bn2` is a BatchNorm2d, not a Conv2d or Linear; `x` is the graph input, not a Conv2d or Linear",
            "relu(): its input comes from `add()` (Add), not a Conv2d or Linear",
        ]
    );
    assert_eq!(report.after.kernels, report.before.kernels);
}

/// A rule that breaks the IR: a residual epilogue without the residual operand.
fn broken(g: &mut Graph, _: &mut dyn ParamStore, id: cnnc_compiler::NodeId) -> passes::Outcome {
    match &mut g.node_mut(id).op {
        Op::Conv2d(c) => {
            c.epilogue.residual = true;
            Ok(passes::Rewrite { kernel: Some(id), absorbed: vec![], note: None })
        }
        _ => Err(Skip::NoMatch),
    }
}

#[test]
fn the_verifier_names_the_pass_that_broke_the_ir() {
    let g = resnet_block();
    let pass = Pass { name: "broken", summary: "sets residual without an operand", rule: Rule::EachNode(broken) };
    let mut h = g.clone();
    let e = run_pass(&pass, &mut h, &mut store_for(&g), &PassOptions::verified()).unwrap_err();
    assert!(matches!(e, PassError::Verify { pass: "broken", .. }), "{e}");
    assert!(e.to_string().starts_with("after pass `broken`: conv1 (Conv2d) has 1 inputs"), "{e}");
}

#[test]
fn the_pipeline_is_a_visible_list() {
    let names: Vec<&str> = PIPELINE.iter().map(|p| p.name).collect();
    assert_eq!(
        names,
        [
            "remove-identity-views",
            "remove-dead-nodes",
            "fold-batchnorm",
            "batchnorm-epilogue",
            "fold-linear-chain",
            "residual-epilogue",
            "activation-epilogue",
            "compact-params",
        ]
    );
}
