//! The automatic numeric check of `cnnc_runtime::fusion_check`: a pass that changes the
//! outputs is refused, naming the pass and the node, while the good fusions still happen;
//! [`verify_fusion`] turns a refusal into an error; the optimised weights fit the
//! optimised graph and run in the interpreter and the JIT.

use cnnc_compiler::dsl::compile_str;
use cnnc_compiler::graph::{Graph, NodeId};
use cnnc_compiler::ops::Op;
use cnnc_compiler::passes::{self, Absorbed, How, Outcome, PIPELINE, ParamStore, Pass, Rewrite, Rule, Skip};
use cnnc_runtime::fusion_check::{
    FusionError, NumericCheck, WeightsStore, optimize, optimize_checked, relative_error, scaled_error, verify_fusion,
};
use cnnc_runtime::weights::Weights;
use cnnc_runtime::{Compiled, Options, interp};
use ndarray::{ArrayD, IxDyn};

fn net(src: &str) -> Graph {
    let out = compile_str(src);
    let errors: Vec<String> = out.errors().map(|d| d.full_message()).collect();
    assert!(errors.is_empty(), "{errors:?}");
    out.nets.into_iter().next().expect("one net")
}

fn weights(g: &Graph, seed: u64) -> Weights {
    let mut w = Weights::random(g, seed);
    w.randomize_batchnorm(g, seed + 1);
    w
}

fn block() -> Graph {
    net("net Block(x: [N, 4, 6, 6]) {
        conv1 = Conv2d(4, 4, 3, padding = 1, bias = False);
        bn1 = BatchNorm2d(4);
        conv2 = Conv2d(4, 4, 3, padding = 1, bias = False);
        bn2 = BatchNorm2d(4);
        fn forward(self, x) { relu(self.bn2(self.conv2(relu(self.bn1(self.conv1(x))))) + x) }
    }")
}

/// A wrong BatchNorm "fold": drops the BatchNorm as if it were the identity.
fn drop_batchnorm(g: &mut Graph, _: &mut dyn ParamStore, id: NodeId) -> Outcome {
    if !matches!(g.node(id).op, Op::BatchNorm2d(_)) {
        return Err(Skip::NoMatch);
    }
    let x = g.operands(id)[0];
    let absorbed = vec![Absorbed { node: id, name: g.node(id).name.clone(), kind: "BatchNorm2d", how: How::Identity }];
    g.replace_uses(id, x);
    g.remove_node(id);
    Ok(Rewrite { kernel: None, absorbed, note: None })
}

/// The pipeline with the wrong fold in front of the real one.
fn broken_pipeline() -> Vec<Pass> {
    let bad = Pass { name: "drop-batchnorm", summary: "wrong on purpose", rule: Rule::EachNode(drop_batchnorm) };
    std::iter::once(bad).chain(PIPELINE.iter().copied()).collect()
}

#[test]
fn a_pass_that_changes_the_outputs_is_refused_by_pass_and_node() {
    let g = block();
    let w = weights(&g, 3);
    let check = NumericCheck { passes: broken_pipeline(), ..NumericCheck::default() };
    let out = optimize_checked(&g, &w, &check).unwrap();
    let c = out.check.as_ref().expect("checked");
    let refused: Vec<(&str, &str)> = c.refused.iter().map(|r| (r.pass, r.name.as_str())).collect();
    assert_eq!(refused, [("drop-batchnorm", "bn1"), ("drop-batchnorm", "bn2")]);
    assert!(c.refused.iter().all(|r| r.error > 1e-3), "{c}");
    // The real passes still fold and fuse everything: one kernel per conv.
    assert_eq!(out.report.after.kernels, 2, "{}", out.report);
    assert!(c.error <= 1e-5, "{c}");
    assert!(out.report.notes.iter().any(|n| n.starts_with("numeric check refused: pass `drop-batchnorm` at `bn1`")));
    assert!(c.to_string().contains("refused: pass `drop-batchnorm` at `bn2` (BatchNorm2d) changes the outputs by"));
}

#[test]
fn the_test_helper_fails_naming_the_pass_and_the_node() {
    let g = block();
    let w = weights(&g, 4);
    let check = NumericCheck { passes: broken_pipeline(), ..NumericCheck::default() };
    let Err(FusionError::Refused(r)) = verify_fusion(&g, &w, &check) else {
        panic!("the wrong fold was not refused");
    };
    assert_eq!((r.pass, r.name.as_str(), r.kind), ("drop-batchnorm", "bn1", "BatchNorm2d"));
    let text = r.to_string();
    assert!(text.starts_with("pass `drop-batchnorm` at `bn1` (BatchNorm2d) changes the outputs by "), "{text}");
    assert!(text.ends_with("more than the tolerance 1e-5"), "{text}");
}

/// A whole-graph pass that scales every parameter.
fn scale_everything(_: &mut Graph, store: &mut dyn ParamStore) -> Outcome {
    for i in 0..store.len() {
        let id = cnnc_compiler::ParamId(i);
        if let Some(v) = store.get(id) {
            let v: Vec<f32> = v.iter().map(|x| x * 1.01).collect();
            store.set(id, v);
        }
    }
    Ok(Rewrite { kernel: None, absorbed: vec![], note: None })
}

#[test]
fn a_whole_graph_pass_is_refused_as_a_whole() {
    let g = block();
    let w = weights(&g, 5);
    let bad = Pass { name: "scale", summary: "wrong on purpose", rule: Rule::WholeGraph(scale_everything) };
    let check = NumericCheck { passes: vec![bad], ..NumericCheck::default() };
    let out = optimize_checked(&g, &w, &check).unwrap();
    let c = out.check.unwrap();
    assert_eq!(c.refused.len(), 1);
    assert_eq!((c.refused[0].pass, c.refused[0].node), ("scale", None));
    assert_eq!(out.weights, w, "nothing was applied");
}

#[test]
fn the_pipeline_passes_its_own_check_and_reaches_the_tolerance() {
    let g = block();
    let w = weights(&g, 6);
    let out = verify_fusion(&g, &w, &NumericCheck::default()).unwrap();
    let c = out.check.unwrap();
    assert!(c.refused.is_empty());
    let passes: Vec<&str> = c.per_pass.iter().map(|(p, _)| *p).collect();
    assert_eq!(passes, ["fold-batchnorm", "residual-epilogue", "activation-epilogue", "compact-params"]);
    assert!(c.error <= 1e-6, "{c}");
}

#[test]
fn optimised_weights_fit_the_optimised_graph_in_both_engines() {
    let g = block();
    let w = weights(&g, 7);
    let out = optimize(&g, &w).unwrap();
    assert!(out.check.is_none());
    out.weights.check(&out.graph).unwrap();
    let keys: Vec<&str> = out.weights.iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"]);

    let x = ArrayD::from_shape_fn(IxDyn(&[3, 4, 6, 6]), |i| ((i[1] * 36 + i[2] * 6 + i[3]) as f32 * 0.37).sin());
    let want = interp::run(&g, &w, &[x.view()]).unwrap();
    let got = interp::run(&out.graph, &out.weights, &[x.view()]).unwrap();
    assert!(relative_error(&got[0], &want[0]) <= 1e-5);
    let jit = Compiled::new(
        &out.graph,
        &out.weights,
        &Options { threads: 1, portable: false, fuse: false, ..Default::default() },
    )
    .unwrap();
    // (With the micro-kernels, also the blocked copy of the skip input and the plain copy
    // of the output: `data_movement_count`.)
    assert_eq!(jit.kernel_count(), 2, "conv1 ⇒ relu, conv2 ⇒ +residual ⇒ relu");
    let y = jit.run(&[x.view()]).unwrap();
    assert!(relative_error(&y[0], &want[0]) <= 1e-5, "{}", relative_error(&y[0], &want[0]));
}

#[test]
fn the_store_round_trips_weights_including_integer_counters() {
    let g = block();
    let w = weights(&g, 8);
    let store = WeightsStore::new(&w);
    assert_eq!(store.len(), g.params.len());
    let nbt = g.params.iter().position(|p| p.name == "bn1.num_batches_tracked").unwrap();
    assert_eq!(store.get(cnnc_compiler::ParamId(nbt)), None, "integers are not f32 values");
    assert_eq!(store.to_weights(&g).unwrap(), w);
    let mut short = store.clone();
    short.select(&[cnnc_compiler::ParamId(0)]);
    assert!(short.to_weights(&g).is_err());
}

#[test]
fn relative_error_is_the_infinity_norm_ratio() {
    let a = ArrayD::from_shape_vec(IxDyn(&[3]), vec![1.0f32, -4.0, 2.0]).unwrap();
    let b = ArrayD::from_shape_vec(IxDyn(&[3]), vec![1.0f32, -4.5, 2.0]).unwrap();
    assert_eq!(relative_error(&a, &b), 0.5 / 4.5);
    assert_eq!(relative_error(&a, &a), 0.0);
    // The scale is the largest reference value, whether or not it differs.
    let c = ArrayD::from_shape_vec(IxDyn(&[3]), vec![1.0f32, -4.0, 2.5]).unwrap();
    assert_eq!(relative_error(&c, &a), 0.5 / 4.0);
    let z = ArrayD::zeros(IxDyn(&[3]));
    assert_eq!(relative_error(&a, &z), 4.0, "all-zero reference: absolute");
    let nan = ArrayD::from_shape_vec(IxDyn(&[3]), vec![f32::NAN, -4.0, 2.0]).unwrap();
    assert_eq!(relative_error(&nan, &a), f64::INFINITY);
    assert_eq!(relative_error(&nan, &nan), 0.0);
    // A floor makes the error absolute for small outputs.
    let small = ArrayD::from_shape_vec(IxDyn(&[2]), vec![0.01f32, 0.0]).unwrap();
    let near = ArrayD::from_shape_vec(IxDyn(&[2]), vec![0.01f32, 1e-7]).unwrap();
    assert!((relative_error(&near, &small) - 1e-5).abs() < 1e-9);
    assert_eq!(scaled_error(&near, &small, 1.0), f64::from(1e-7f32));
    assert_eq!(scaled_error(&b, &a, 1.0), relative_error(&b, &a), "no effect above the floor");
}

#[test]
fn the_compiler_entry_point_works_with_the_runtime_store() {
    let g = block();
    let w = weights(&g, 9);
    let mut store = WeightsStore::new(&w);
    let (h, report) = passes::optimize(&g, &mut store).unwrap();
    assert_eq!((report.before.kernels, report.after.kernels), (7, 2));
    store.to_weights(&h).unwrap().check(&h).unwrap();
}

#[test]
fn a_linear_residual_and_activation_run_in_one_kernel_in_both_engines() {
    let g = net("net Mlp(x: [N, 6]) {
        fc1 = Linear(6, 6, bias = False);
        fc2 = Linear(6, 6);
        fn forward(self, x) { let h = tanh(x + self.fc1(x)); sigmoid(self.fc2(h) + h) }
    }");
    let w = weights(&g, 10);
    let out = verify_fusion(&g, &w, &NumericCheck::default()).unwrap();
    assert_eq!((out.report.before.kernels, out.report.after.kernels), (6, 2), "{}", out.report);
    let ops: Vec<String> = out.report.kernels.iter().map(|k| k.op.clone()).collect();
    assert_eq!(ops, ["Linear(6, 6, bias=False) ⇒ +residual ⇒ tanh", "Linear(6, 6) ⇒ +residual ⇒ sigmoid"]);
    let x = ArrayD::from_shape_fn(IxDyn(&[5, 6]), |i| ((i[0] * 6 + i[1]) as f32 * 0.9).cos());
    let want = interp::run(&g, &w, &[x.view()]).unwrap();
    let jit = Compiled::new(&out.graph, &out.weights, &Options::default()).unwrap();
    let got = jit.run(&[x.view()]).unwrap();
    assert!(relative_error(&got[0], &want[0]) <= 1e-5, "{}", relative_error(&got[0], &want[0]));
}

/// The three ways into the passes agree: `optimize` (a copy), `optimize_owned` (the weights
/// moved in) and `optimize_view` (copy-on-write, what `Compiled::new` packs from) give the
/// same graph and the same values, and the JIT's own fused compile runs like the JIT on
/// `optimize`'s output (a Flatten of a blocked map into a Linear included).
#[test]
fn copied_moved_and_viewed_weights_optimise_alike() {
    let g = net("net N(x: [N, 3, 8, 8]) = Sequential(
        Conv2d(3, 20, 3, padding = 1, bias = False), BatchNorm2d(20), ReLU(),
        MaxPool2d(2), Flatten(), Linear(320, 37), ReLU(), Dropout(), Linear(37, 5));");
    let w = weights(&g, 11);
    let copied = optimize(&g, &w).unwrap();
    let moved = cnnc_runtime::fusion_check::optimize_owned(&g, w.clone()).unwrap();
    assert_eq!(copied.graph.to_string(), moved.graph.to_string());
    assert_eq!(copied.weights, moved.weights);
    let (vg, store, _) = cnnc_runtime::fusion_check::optimize_view(&g, &w).unwrap();
    assert_eq!(vg.to_string(), copied.graph.to_string());
    assert_eq!(store.to_weights(&vg).unwrap(), copied.weights);
    let x = ArrayD::from_shape_fn(IxDyn(&[2, 3, 8, 8]), |i| ((i[1] * 64 + i[2] * 8 + i[3]) as f32 * 0.37).sin());
    let own = Compiled::new(&g, &w, &Options::default()).unwrap().run(&[x.view()]).unwrap().remove(0);
    let unfused = Options { fuse: false, ..Options::default() };
    let of = Compiled::new(&copied.graph, &copied.weights, &unfused).unwrap().run(&[x.view()]).unwrap().remove(0);
    assert_eq!(own, of);
}
