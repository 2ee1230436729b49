//! Every backward op of the interpreter against central finite differences.
//!
//! For a net `f` and a random cotangent `w`, the scalar `L = Σ w ⊙ f(x, θ)` (or the loss
//! itself, for the losses) is differentiated two ways: by the training graph the autodiff
//! pass builds (`∂L/∂x`, `∂L/∂θ` for every learnable parameter), and by central differences
//! `(L(v + h) − L(v − h)) / 2h` of the forward, with `L` summed in f64 over the f32 outputs,
//! `h = 1e-2` on inputs of magnitude ~1 (truncation error ~h²/6·|f'''|, rounding error
//! ~6e-8·|L|/h). Inputs keep away from kinks and ties by ≥ 0.05 (ReLU at 0, max-pool
//! windows), so `L` is smooth within ±h. Up to 12 coordinates of every tensor are checked,
//! each within `2e-3 · max(1, max |analytic|)`.

use cnnc_compiler::Graph;
use cnnc_compiler::autodiff::{self, GradSpec, Mode, Seed};
use cnnc_compiler::dsl::compile_str;
use cnnc_compiler::ops::ParamKind;
use cnnc_compiler::ops::train::{Loss, Reduction};
use cnnc_runtime::interp;
use cnnc_runtime::weights::{ParamData, Weights};
use ndarray::{ArrayD, IxDyn};

const H: f64 = 1e-2;
const TOL: f64 = 2e-3;

/// A small deterministic generator.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64) / ((1u64 << 53) as f64)
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.next().max(1e-12), self.next());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }
}

fn graph(src: &str) -> Graph {
    let out = compile_str(src);
    assert!(!out.has_errors(), "{src}: {:?}", out.errors().map(|d| d.full_message()).collect::<Vec<_>>());
    out.nets.last().unwrap().clone()
}

/// Distinct values at least 0.05 apart and at least 0.025 from 0, in random order.
fn spread_input(shape: &[usize], rng: &mut Rng) -> ArrayD<f32> {
    let n: usize = shape.iter().product();
    let mut vals: Vec<f32> = (0..n).map(|i| (i as f32 - n as f32 / 2.0 + 0.5) * 0.05).collect();
    for i in (1..n).rev() {
        let j = (rng.next() * (i + 1) as f64) as usize;
        vals.swap(i, j.min(i));
    }
    ArrayD::from_shape_vec(IxDyn(shape), vals).unwrap()
}

fn normal(shape: &[usize], rng: &mut Rng) -> ArrayD<f32> {
    ArrayD::from_shape_simple_fn(IxDyn(shape), || rng.normal())
}

struct Case<'a> {
    src: &'a str,
    shape: &'a [usize],
    mode: Mode,
    loss: Option<Loss>,
    spread: bool,
}

fn scalar(g: &Graph, tg_out: &ArrayD<f32>, w: &ArrayD<f32>) -> f64 {
    let _ = g;
    tg_out.iter().zip(w.iter()).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum()
}

fn check(case: &Case<'_>, seed: u64) {
    let g = graph(case.src);
    let mut rng = Rng(seed);
    let mut weights = Weights::random(&g, seed);
    weights.randomize_batchnorm(&g, seed);
    let x = if case.spread { spread_input(case.shape, &mut rng) } else { normal(case.shape, &mut rng) };
    let out_ty = &g.node(g.outputs[0].1).ty;
    let out_shape = out_ty.concrete(case.shape[0]);
    let (seed_kind, seed_value) = match &case.loss {
        Some(l @ Loss::CrossEntropy { .. }) => {
            let classes = out_shape[1];
            let t = ArrayD::from_shape_fn(IxDyn(&[case.shape[0]]), |i| ((i[0] * 7 + 3) % classes) as f32);
            (Seed::Loss(l.clone()), t)
        }
        Some(l @ Loss::BceWithLogits { .. }) => {
            let t = ArrayD::from_shape_simple_fn(IxDyn(&out_shape), || rng.next() as f32);
            (Seed::Loss(l.clone()), t)
        }
        Some(l) => (Seed::Loss(l.clone()), normal(&out_shape, &mut rng)),
        None => (Seed::OutputGrad, normal(&out_shape, &mut rng)),
    };
    let spec = GradSpec { seed: seed_kind, output: None, mode: case.mode, params: true, wrt: vec!["x".into()] };
    let tg = autodiff::build(&g, &spec).unwrap_or_else(|e| panic!("{}: {e}", case.src));
    // L(x, θ) through the same training graph's forward part (so train-mode BatchNorm is the
    // function being differentiated).
    let eval_l = |w: &Weights, x: &ArrayD<f32>| -> f64 {
        let outs = interp::run(&tg.graph, w, &[x.view(), seed_value.view()]).unwrap();
        match tg.loss {
            Some(i) => f64::from(outs[i][0]),
            None => scalar(&g, &outs[tg.prediction], &seed_value),
        }
    };
    let outs = interp::run(&tg.graph, &weights, &[x.view(), seed_value.view()]).unwrap();
    let mut checked = 0;
    // ∂L/∂x
    let dx = &outs[tg.node_grads[0].1];
    let scale = dx.iter().fold(1f64, |m, v| m.max(f64::from(v.abs())));
    let n = x.len();
    for k in 0..n.min(12) {
        let i = if n <= 12 { k } else { (rng.next() * n as f64) as usize % n };
        let (mut xp, mut xm) = (x.clone(), x.clone());
        xp.as_slice_mut().unwrap()[i] += H as f32;
        xm.as_slice_mut().unwrap()[i] -= H as f32;
        let fd = (eval_l(&weights, &xp) - eval_l(&weights, &xm)) / (2.0 * H);
        let an = f64::from(dx.as_slice().unwrap()[i]);
        assert!((fd - an).abs() <= TOL * scale, "{}: dx[{i}] analytic {an} vs finite difference {fd}", case.src);
        checked += 1;
    }
    // ∂L/∂θ
    for (pid, out) in &tg.param_grads {
        let p = g.param(*pid);
        assert_ne!(p.spec.kind, ParamKind::Buffer);
        let grad = &outs[*out];
        let scale = grad.iter().fold(1f64, |m, v| m.max(f64::from(v.abs())));
        let base = weights.f32(*pid).unwrap().clone();
        let n = base.len();
        for k in 0..n.min(12) {
            let i = if n <= 12 { k } else { (rng.next() * n as f64) as usize % n };
            let perturbed = |d: f32| {
                let mut w = weights.clone();
                let mut t = base.clone();
                t.as_slice_mut().unwrap()[i] += d;
                w.set(*pid, ParamData::F32(t)).unwrap();
                w
            };
            let fd = (eval_l(&perturbed(H as f32), &x) - eval_l(&perturbed(-H as f32), &x)) / (2.0 * H);
            let an = f64::from(grad.as_slice().unwrap()[i]);
            assert!(
                (fd - an).abs() <= TOL * scale,
                "{}: ∂{}[{i}] analytic {an} vs finite difference {fd}",
                case.src,
                p.name
            );
            checked += 1;
        }
    }
    assert!(checked > 0);
}

fn case(src: &str, shape: &[usize]) -> Case<'static> {
    Case {
        src: Box::leak(src.to_string().into_boxed_str()),
        shape: Box::leak(shape.to_vec().into_boxed_slice()),
        mode: Mode::Train,
        loss: None,
        spread: false,
    }
}

fn layer(text: &str, shape: &[usize]) -> Case<'static> {
    let dims: Vec<String> = shape[1..].iter().map(|d| d.to_string()).collect();
    case(&format!("net L(x: [N, {}]) = Sequential({text});", dims.join(", ")), shape)
}

#[test]
fn conv_backward_matches_finite_differences() {
    for text in [
        "Conv2d(2, 3, 3)",
        "Conv2d(2, 3, 3, stride = 2, padding = 1)",
        "Conv2d(2, 3, (2, 3), stride = (1, 2), padding = (2, 1), bias = False)",
        "Conv2d(2, 3, 3, padding = \"same\", dilation = 2)",
        "Conv2d(2, 3, 3, stride = 2, padding = (0, 1, 2, 1))",
        "Conv2d(2, 3, 2, padding = \"same\")",
        "Conv2d(4, 6, 3, groups = 2)",
        "Conv2d(4, 4, 3, groups = 4, padding = 1)",
        "Conv2d(2, 3, 3, padding = 2, padding_mode = \"reflect\")",
        "Conv2d(2, 3, 3, stride = 2, padding = (1, 2), padding_mode = \"replicate\")",
        "Conv2d(2, 3, 3, padding = 2, dilation = 2, padding_mode = \"circular\")",
    ] {
        let c = if text.starts_with("Conv2d(4") { layer(text, &[2, 4, 5, 6]) } else { layer(text, &[2, 2, 5, 6]) };
        check(&c, 1);
    }
}

#[test]
fn pool_backward_matches_finite_differences() {
    for text in [
        "MaxPool2d(2)",
        "MaxPool2d(3, stride = 2, padding = 1)",
        "MaxPool2d(3, stride = 2, ceil_mode = True)",
        "MaxPool2d(2, dilation = 2, padding = 1)",
        "AvgPool2d(3, stride = 2, padding = 1)",
        "AvgPool2d(3, stride = 2, padding = 1, count_include_pad = False, ceil_mode = True)",
        "AvgPool2d(2, divisor_override = 3)",
        "AdaptiveAvgPool2d((3, 2))",
        "MaxPool2d(3, stride = 2, padding = (0, 1, 1, 1))",
        "AvgPool2d(3, stride = 2, padding = (1, 0, 0, 1), count_include_pad = False)",
    ] {
        let mut c = layer(text, &[2, 2, 7, 8]);
        c.spread = true;
        check(&c, 2);
    }
}

#[test]
fn batchnorm_linear_activations_reshapes_match_finite_differences() {
    let mut cases = vec![
        layer("BatchNorm2d(3)", &[3, 3, 2, 3]),
        layer("BatchNorm2d(3, affine = False, momentum = None)", &[3, 3, 2, 3]),
        layer("BatchNorm2d(3, track_running_stats = False)", &[3, 3, 2, 3]),
        layer("Linear(4, 3)", &[3, 4]),
        layer("Linear(4, 3, bias = False)", &[2, 3, 4]),
        layer("Sigmoid()", &[2, 3, 4]),
        layer("Tanh()", &[2, 3, 4]),
        layer("Flatten(start_dim = 2)", &[2, 3, 2, 2]),
    ];
    for text in ["BatchNorm2d(3)", "BatchNorm2d(3, track_running_stats = False)"] {
        let mut eval = layer(text, &[3, 3, 2, 3]);
        eval.mode = Mode::Eval;
        cases.push(eval);
    }
    // Spread inputs stay at least 0.025 from every kink.
    for text in ["ReLU()", "Hardtanh(-0.3, 0.4)", "LeakyReLU(0.2)"] {
        let mut c = layer(text, &[2, 3, 4]);
        c.spread = true;
        cases.push(c);
    }
    for c in &cases {
        check(c, 3);
    }
}

#[test]
fn cat_add_mean_amax_match_finite_differences() {
    let src = "net B(x: [N, 2, 4, 5]) {
        a = Conv2d(2, 3, 3, padding = 1);
        c = Conv2d(5, 5, 1);
        bn = BatchNorm2d(5);
        fc = Linear(5, 2);
        fn forward(self, x) {
            let y = cat([tanh(self.a(x)), x], dim = 1);
            let z = self.bn(self.c(y)) + y;
            self.fc(z.mean(dim = [2, 3]) + z.mean(dim = 3, keepdim = True).mean(dim = [2, 3]))
        }
    }";
    check(&case(src, &[3, 2, 4, 5]), 4);
    // amax on its own input, whose values are spread, so no maximum changes within ±h (a
    // conv before it would move maxima across each other).
    for body in ["x.amax(dim = (2, 3))", "x.amax(dim = 1, keepdim = True)"] {
        let src = format!("net M(x: [N, 3, 4, 5]) {{ fn forward(self, x) {{ {body} }} }}");
        let mut c = case(&src, &[2, 3, 4, 5]);
        c.spread = true;
        check(&c, 6);
    }
}

#[test]
fn losses_match_finite_differences() {
    let src = "net P(x: [N, 6]) = Sequential(Linear(6, 4));";
    for loss in [
        Loss::Mse { reduction: Reduction::Mean },
        Loss::Mse { reduction: Reduction::Sum },
        Loss::CrossEntropy { reduction: Reduction::Mean, label_smoothing: 0.0 },
        Loss::CrossEntropy { reduction: Reduction::Sum, label_smoothing: 0.2 },
        Loss::BceWithLogits { reduction: Reduction::Mean, pos_weight: None },
        Loss::BceWithLogits { reduction: Reduction::Sum, pos_weight: Some(vec![0.5, 1.0, 2.0, 3.0]) },
    ] {
        let mut c = case(src, &[5, 6]);
        c.loss = Some(loss);
        check(&c, 5);
    }
}

/// Softmax has no backward: building a training graph through one is an error that says what
/// to do instead, never a silently missing gradient.
#[test]
fn softmax_is_refused_by_autodiff_with_a_hint() {
    let g = compile_str("net S(x: [N, 4]) = Sequential(Linear(4, 3), Softmax(dim = 1));").nets.remove(0);
    let spec = GradSpec { seed: Seed::OutputGrad, output: None, mode: Mode::Train, params: true, wrt: vec![] };
    let e = autodiff::build(&g, &spec).unwrap_err().to_string();
    assert!(e.contains("Softmax has no backward") && e.contains("CrossEntropyLoss"), "{e}");
}
