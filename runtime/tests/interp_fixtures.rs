//! The reference interpreter against PyTorch: every single-layer case in
//! `tests/fixtures/layers/` (its weights loaded by key from PyTorch's `state_dict`), the
//! reference nets in `tests/fixtures/nets/`, and the trained digits LeNet.

use cnnc_compiler::GraphBuilder;
use cnnc_compiler::diag::SrcSpan;
use cnnc_compiler::graph::{Graph, NodeId};
use cnnc_compiler::ops::args::{Arg, ArgValue};
use cnnc_compiler::ops::{self, Add, Op, Reduce, ReduceKind};
use cnnc_compiler::shape::TensorType;
use cnnc_runtime::interp;
use cnnc_runtime::weights::Weights;
use ndarray::{ArrayD, IxDyn};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

// ---- fixture access -----------------------------------------------------------------------

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// The f32 tensors of a safetensors file.
fn read_f32(path: &Path) -> HashMap<String, ArrayD<f32>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.iter()
        .filter(|(_, v)| v.dtype() == Dtype::F32)
        .map(|(k, v)| {
            let data: Vec<f32> = v.data().as_chunks::<4>().0.iter().map(|c| f32::from_le_bytes(*c)).collect();
            (k.to_string(), ArrayD::from_shape_vec(IxDyn(v.shape()), data).unwrap())
        })
        .collect()
}

/// Asserts `|got − want| ≤ atol + rtol·|want|` everywhere; returns the largest error.
fn assert_close(what: &str, got: &ArrayD<f32>, want: &ArrayD<f32>, atol: f32, rtol: f32) -> f32 {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
        let err = (g - w).abs();
        assert!(err <= atol + rtol * w.abs(), "{what}: element {i}: got {g}, PyTorch {w}");
        worst = worst.max(err);
    }
    worst
}

// ---- a tiny JSON reader (the manifest) ----------------------------------------------------

#[derive(Debug)]
enum Json {
    /// `null`, `true` or `false` (the manifest has none that matter).
    Literal,
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn get(&self, key: &str) -> &Json {
        match self {
            Json::Obj(kv) => kv.iter().find(|(k, _)| k == key).map(|(_, v)| v).unwrap_or(&Json::Literal),
            _ => &Json::Literal,
        }
    }
    fn str(&self) -> &str {
        match self {
            Json::Str(s) => s,
            other => panic!("expected a string, found {other:?}"),
        }
    }
    fn dims(&self) -> Vec<usize> {
        match self {
            Json::Arr(v) => v
                .iter()
                .map(|x| match x {
                    Json::Num(n) => *n as usize,
                    other => panic!("expected a number, found {other:?}"),
                })
                .collect(),
            other => panic!("expected an array, found {other:?}"),
        }
    }
}

struct Reader<'a> {
    s: &'a [u8],
    i: usize,
}

impl Reader<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn peek(&mut self) -> u8 {
        self.ws();
        self.s.get(self.i).copied().unwrap_or(0)
    }
    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == c {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, c: u8) {
        assert!(self.eat(c), "expected `{}` at byte {} of {:?}", c as char, self.i, String::from_utf8_lossy(self.s));
    }
    fn word(&mut self) -> &str {
        self.ws();
        let start = self.i;
        while self.i < self.s.len() && (self.s[self.i].is_ascii_alphanumeric() || b"_.+-".contains(&self.s[self.i])) {
            self.i += 1;
        }
        std::str::from_utf8(&self.s[start..self.i]).unwrap()
    }
    fn string(&mut self) -> String {
        let quote = self.peek();
        self.expect(quote);
        let mut out = String::new();
        while self.s[self.i] != quote {
            if self.s[self.i] == b'\\' {
                self.i += 1;
            }
            out.push(self.s[self.i] as char);
            self.i += 1;
        }
        self.i += 1;
        out
    }

    fn json(&mut self) -> Json {
        match self.peek() {
            b'{' => {
                self.expect(b'{');
                let mut kv = vec![];
                while !self.eat(b'}') {
                    let k = self.string();
                    self.expect(b':');
                    kv.push((k, self.json()));
                    self.eat(b',');
                }
                Json::Obj(kv)
            }
            b'[' => {
                self.expect(b'[');
                let mut v = vec![];
                while !self.eat(b']') {
                    v.push(self.json());
                    self.eat(b',');
                }
                Json::Arr(v)
            }
            b'"' => Json::Str(self.string()),
            _ => match self.word() {
                "null" | "true" | "false" => Json::Literal,
                n => Json::Num(n.parse().unwrap_or_else(|_| panic!("bad JSON token {n:?}"))),
            },
        }
    }

    /// A Python value in a layer call: int, float, string, bool, None or tuple.
    fn py(&mut self) -> ArgValue {
        match self.peek() {
            b'(' | b'[' => {
                let close = if self.eat(b'(') { b')' } else { (self.expect(b'['), b']').1 };
                let mut v = vec![];
                while !self.eat(close) {
                    v.push(self.py());
                    self.eat(b',');
                }
                ArgValue::Tuple(v)
            }
            b'"' | b'\'' => ArgValue::Str(self.string()),
            _ => match self.word() {
                "True" => ArgValue::Bool(true),
                "False" => ArgValue::Bool(false),
                "None" => ArgValue::None,
                w if w.contains(['.', 'e']) => ArgValue::Float(w.parse().unwrap()),
                w => ArgValue::Int(w.parse().unwrap_or_else(|_| panic!("bad value {w:?}"))),
            },
        }
    }
}

/// Builds the op for a constructor call such as `Conv2d(3, 8, 3, stride=2, padding=(1, 2))`.
fn parse_layer(text: &str) -> Op {
    let span: SrcSpan = proc_macro2::Span::call_site().into();
    let mut r = Reader { s: text.as_bytes(), i: 0 };
    let name = r.word().to_string();
    r.expect(b'(');
    let mut args = vec![];
    while !r.eat(b')') {
        let save = r.i;
        let w = r.word().to_string();
        let keyword = if !w.is_empty() && r.eat(b'=') {
            Some(w)
        } else {
            r.i = save;
            None
        };
        args.push(Arg { keyword, value: r.py(), span });
        r.eat(b',');
    }
    let ctor = ops::layer_ctor(&name).unwrap_or_else(|| panic!("unknown layer {name}"));
    ops::construct(ctor, &args, span)
        .unwrap_or_else(|e| panic!("{text}: {:?}", e.iter().map(|d| &d.message).collect::<Vec<_>>()))
}

// ---- single layers ------------------------------------------------------------------------

#[test]
fn every_layer_case_matches_pytorch() {
    let dir = fixtures().join("layers");
    let manifest = std::fs::read_to_string(dir.join("manifest.json")).expect("tests/fixtures/layers/manifest.json");
    let Json::Arr(cases) = (Reader { s: manifest.as_bytes(), i: 0 }).json() else { panic!("manifest is not a list") };
    assert!(cases.len() >= 50, "only {} cases", cases.len());
    let mut report = vec![];
    for case in &cases {
        let name = case.get("name").str();
        let text = case.get("layer").str();
        let input = case.get("input").dims();
        let mut b = GraphBuilder::new(name);
        let x = b.input("x", TensorType::new(input[1..].to_vec()));
        let y = b.layer("0", parse_layer(text), &[x]).unwrap_or_else(|e| panic!("{name}: {}", e.message));
        b.output("y", y);
        let g = b.finish();
        assert_eq!(g.node(y).ty.concrete(input[0]), case.get("output").dims(), "{name}: {text}: shape");

        let w = Weights::load(&g, dir.join(format!("{name}.weights.safetensors")))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let io = read_f32(&dir.join(format!("{name}.io.safetensors")));
        let out = interp::run(&g, &w, &[io["input"].view()]).unwrap_or_else(|e| panic!("{name}: {e}"));
        let worst = assert_close(&format!("{name} ({text})"), &out[0], &io["output"], 1e-5, 1e-5);
        report.push(format!("{name}: max |err| {worst:e}"));
    }
    println!("{}", report.join("\n"));
}

// ---- nets ---------------------------------------------------------------------------------

fn layer(b: &mut GraphBuilder, path: &str, text: &str, input: NodeId) -> NodeId {
    b.layer(path, parse_layer(text), &[input]).unwrap_or_else(|e| panic!("{path}: {}", e.message))
}

/// d2l's sigmoid LeNet, `nn.Sequential` keys `0` … `11`.
fn lenet() -> Graph {
    let mut b = GraphBuilder::new("lenet");
    let mut x = b.input("x", TensorType::new(vec![1, 28, 28]));
    for (i, text) in [
        "Conv2d(1, 6, kernel_size=5, padding=2)",
        "Sigmoid()",
        "AvgPool2d(kernel_size=2, stride=2)",
        "Conv2d(6, 16, kernel_size=5)",
        "Sigmoid()",
        "AvgPool2d(kernel_size=2, stride=2)",
        "Flatten()",
        "Linear(400, 120)",
        "Sigmoid()",
        "Linear(120, 84)",
        "Sigmoid()",
        "Linear(84, 10)",
    ]
    .iter()
    .enumerate()
    {
        x = layer(&mut b, &i.to_string(), text, x);
    }
    b.output("y", x);
    b.finish()
}

fn check_net(g: &Graph, name: &str, outputs: &[&str]) {
    let dir = fixtures().join("nets");
    let w = Weights::load(g, dir.join(format!("{name}.weights.safetensors"))).unwrap_or_else(|e| panic!("{e}"));
    let io = read_f32(&dir.join(format!("{name}.io.safetensors")));
    let out = interp::run(g, &w, &[io["input"].view()]).unwrap_or_else(|e| panic!("{name}: {e}"));
    for (got, key) in out.iter().zip(outputs) {
        assert_close(&format!("{name}.{key}"), got, &io[*key], 1e-4, 1e-4);
    }
}

#[test]
fn lenet_matches_pytorch() {
    check_net(&lenet(), "lenet", &["output"]);
}

#[test]
fn cifar10_matches_pytorch() {
    let mut b = GraphBuilder::new("cifar10");
    let mut x = b.input("x", TensorType::new(vec![3, 32, 32]));
    for (i, text) in [
        "Conv2d(3, 32, 5, padding=2)",
        "MaxPool2d(2)",
        "Conv2d(32, 32, 5, padding=2)",
        "MaxPool2d(2)",
        "Conv2d(32, 64, 5, padding=2)",
        "MaxPool2d(2)",
        "Flatten()",
        "Linear(1024, 64)",
        "Linear(64, 10)",
    ]
    .iter()
    .enumerate()
    {
        x = layer(&mut b, &format!("model1.{i}"), text, x);
    }
    b.output("y", x);
    check_net(&b.finish(), "cifar10", &["output"]);
}

#[test]
fn nonlinear_matches_pytorch() {
    // features = backbone(x); classifier(features.mean(dim=[2, 3]) + features.max(2)[0].max(2)[0])
    let mut b = GraphBuilder::new("nonlinear");
    let x = b.input("x", TensorType::new(vec![3, 10, 10]));
    let h = layer(&mut b, "backbone.0", "Conv2d(3, 64, 3)", x);
    let h = layer(&mut b, "backbone.1", "ReLU()", h);
    let h = layer(&mut b, "backbone.2", "Conv2d(64, 128, 3)", h);
    let features = layer(&mut b, "backbone.3", "ReLU()", h);
    let mean_op = Op::Reduce(Reduce { kind: ReduceKind::Mean, dims: vec![2, 3], keepdim: false });
    let mean = b.layer("mean", mean_op, &[features]).unwrap();
    let max = |dims| Op::Reduce(Reduce { kind: ReduceKind::Max, dims, keepdim: false });
    let m1 = b.layer("max", max(vec![2]), &[features]).unwrap();
    let m2 = b.layer("max_1", max(vec![2]), &[m1]).unwrap();
    let sum = b.layer("add", Op::Add(Add), &[mean, m2]).unwrap();
    let y = layer(&mut b, "classifier", "Linear(128, 10)", sum);
    b.output("output", y);
    b.output("features", features);
    check_net(&b.finish(), "nonlinear", &["output", "features"]);
}

#[test]
fn resnet_small_matches_pytorch() {
    fn block(b: &mut GraphBuilder, path: &str, x: NodeId, cin: usize, cout: usize, stride: usize) -> NodeId {
        let h = layer(
            b,
            &format!("{path}.conv1"),
            &format!("Conv2d({cin}, {cout}, 3, stride={stride}, padding=1, bias=False)"),
            x,
        );
        let h = layer(b, &format!("{path}.bn1"), &format!("BatchNorm2d({cout})"), h);
        let h = layer(b, &format!("{path}.relu"), "ReLU()", h);
        let h = layer(b, &format!("{path}.conv2"), &format!("Conv2d({cout}, {cout}, 3, padding=1, bias=False)"), h);
        let h = layer(b, &format!("{path}.bn2"), &format!("BatchNorm2d({cout})"), h);
        let identity = if stride != 1 || cin != cout {
            let d = layer(
                b,
                &format!("{path}.downsample.0"),
                &format!("Conv2d({cin}, {cout}, 1, stride={stride}, bias=False)"),
                x,
            );
            layer(b, &format!("{path}.downsample.1"), &format!("BatchNorm2d({cout})"), d)
        } else {
            x
        };
        let s = b.layer(&format!("{path}.add"), Op::Add(Add), &[h, identity]).unwrap();
        // The block's one `relu` module, applied a second time.
        layer(b, &format!("{path}.relu"), "ReLU()", s)
    }
    let mut b = GraphBuilder::new("resnet_small");
    let x = b.input("x", TensorType::new(vec![3, 16, 16]));
    let h = layer(&mut b, "conv1", "Conv2d(3, 16, 3, padding=1, bias=False)", x);
    let h = layer(&mut b, "bn1", "BatchNorm2d(16)", h);
    let h = layer(&mut b, "relu", "ReLU()", h);
    let h = block(&mut b, "layer1.0", h, 16, 16, 1);
    let h = block(&mut b, "layer2.0", h, 16, 32, 2);
    let h = layer(&mut b, "avgpool", "AdaptiveAvgPool2d((1, 1))", h);
    let h = layer(&mut b, "flatten", "Flatten()", h);
    let y = layer(&mut b, "fc", "Linear(32, 10)", h);
    b.output("y", y);
    check_net(&b.finish(), "resnet_small", &["output"]);
}

#[test]
fn trained_digits_lenet_reaches_the_recorded_accuracy() {
    let g = lenet();
    let dir = fixtures().join("digits");
    let w = Weights::load(&g, dir.join("lenet.safetensors")).unwrap_or_else(|e| panic!("{e}"));
    let bytes = std::fs::read(dir.join("heldout.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let labels: Vec<i64> =
        st.tensor("labels").unwrap().data().as_chunks::<8>().0.iter().map(|c| i64::from_le_bytes(*c)).collect();
    let io = read_f32(&dir.join("heldout.safetensors"));
    let logits = interp::run(&g, &w, &[io["images"].view()]).unwrap().remove(0);
    assert_close("digits logits", &logits, &io["logits"], 1e-4, 1e-4);
    let correct = logits
        .outer_iter()
        .zip(&labels)
        .filter(|(row, label)| {
            let best =
                row.iter().enumerate().fold((0, f32::NEG_INFINITY), |m, (i, v)| if *v > m.1 { (i, *v) } else { m });
            best.0 as i64 == **label
        })
        .count();
    assert_eq!((correct, labels.len()), (350, 360));
}
