//! Weights I/O against real PyTorch `state_dict` files (`tests/fixtures/`): keys and shapes
//! match by name, values survive a save/load round trip, and a file that does not fit the
//! net is reported with every missing, unexpected and mis-shaped key at once.

use cnnc_compiler::GraphBuilder;
use cnnc_compiler::graph::{Graph, ParamId};
use cnnc_compiler::ops::{BatchNorm2d, Epilogue, Linear, Op};
use cnnc_compiler::shape::TensorType;
use cnnc_runtime::WeightsError;
use cnnc_runtime::weights::{ParamData, Weights};
use safetensors::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn layer_file(name: &str) -> PathBuf {
    fixtures().join("layers").join(format!("{name}.weights.safetensors"))
}

/// Conv2d's fields for `Conv2d(cin, cout, k)` as the DSL builds it (the padding type is
/// private to the compiler, so start from a constructed op).
fn conv(cin: usize, cout: usize, k: usize, bias: bool) -> Op {
    use cnnc_compiler::diag::SrcSpan;
    use cnnc_compiler::ops::args::{Arg, ArgValue};
    let span: SrcSpan = proc_macro2::Span::call_site().into();
    let arg = |v: i64| Arg { keyword: None, value: ArgValue::Int(v), span };
    let mut args = vec![arg(cin as i64), arg(cout as i64), arg(k as i64)];
    args.push(Arg { keyword: Some("bias".into()), value: ArgValue::Bool(bias), span });
    let ctor = cnnc_compiler::ops::layer_ctor("Conv2d").unwrap();
    cnnc_compiler::ops::construct(ctor, &args, span).unwrap()
}

fn linear(i: usize, o: usize, bias: bool) -> Op {
    Op::Linear(Linear { in_features: i, out_features: o, bias, epilogue: Epilogue::default() })
}

fn bn(c: usize) -> Op {
    Op::BatchNorm2d(BatchNorm2d { num_features: c, eps: 1e-5, momentum: 0.1, affine: true, track_running_stats: true })
}

/// A net of one layer at path `0`.
fn single(op: Op, dims: Vec<usize>) -> Graph {
    let mut b = GraphBuilder::new("single");
    let x = b.input("x", TensorType::new(dims));
    let y = b.layer("0", op, &[x]).unwrap();
    b.output("y", y);
    b.finish()
}

/// Every tensor of a safetensors file: key, dtype, shape, raw bytes (sorted by key).
fn raw(bytes: &[u8]) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    let mut v: Vec<_> =
        st.iter().map(|(k, t)| (k.to_string(), t.dtype(), t.shape().to_vec(), t.data().to_vec())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

struct Owned(Dtype, Vec<usize>, Vec<u8>);

impl View for &Owned {
    fn dtype(&self) -> Dtype {
        self.0
    }
    fn shape(&self) -> &[usize] {
        &self.1
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.2)
    }
    fn data_len(&self) -> usize {
        self.2.len()
    }
}

/// Re-serialises the tensors of `bytes` whose key passes `keep`.
fn filtered(bytes: &[u8], keep: impl Fn(&str) -> bool) -> Vec<u8> {
    let owned: Vec<(String, Owned)> =
        raw(bytes).into_iter().filter(|t| keep(&t.0)).map(|(k, d, s, b)| (k, Owned(d, s, b))).collect();
    safetensors::serialize(owned.iter().map(|(k, t)| (k.as_str(), t)), None).unwrap()
}

#[test]
fn pytorch_files_load_into_hand_built_nets() {
    let cases = [
        ("conv_s1", single(conv(3, 8, 3, true), vec![3, 9, 9])),
        ("batchnorm", single(bn(6), vec![6, 5, 7])),
        ("linear", single(linear(20, 7, true), vec![20])),
        ("linear_no_bias", single(linear(16, 5, false), vec![16])),
    ];
    for (name, g) in cases {
        let path = layer_file(name);
        let bytes = std::fs::read(&path).unwrap();
        let w = Weights::load(&g, &path).unwrap_or_else(|e| panic!("{name}: {e}"));
        // Every value is the file's, under the same key.
        for (key, dtype, shape, data) in raw(&bytes) {
            let p = w.by_name(&g, &key).unwrap_or_else(|| panic!("{name}: {key} not loaded"));
            assert_eq!(p.shape(), shape.as_slice(), "{name}: {key}");
            let loaded: Vec<u8> = match p {
                ParamData::F32(a) => a.iter().flat_map(|v| v.to_le_bytes()).collect(),
                ParamData::I64(a) => a.iter().flat_map(|v| v.to_le_bytes()).collect(),
            };
            assert_eq!(loaded, data, "{name}: {key} ({dtype})");
        }
        // Saving writes the same keys, dtypes, shapes and bytes back.
        let saved = w.to_safetensors(&g).unwrap();
        assert_eq!(raw(&saved), raw(&bytes), "{name}: round trip");
        assert_eq!(Weights::from_safetensors(&g, &saved).unwrap(), w);
    }
}

#[test]
fn batchnorm_counter_is_read_and_may_be_dropped() {
    let g = single(bn(6), vec![6, 5, 7]);
    let bytes = std::fs::read(layer_file("batchnorm")).unwrap();
    let w = Weights::from_safetensors(&g, &bytes).unwrap();
    let counter = w.by_name(&g, "0.num_batches_tracked").and_then(ParamData::as_i64).unwrap();
    assert_eq!(counter.shape(), &[] as &[usize]);
    assert_eq!(counter.sum(), 7);
    // Running statistics are not the defaults (the fixture randomises them).
    assert!(w.by_name(&g, "0.running_var").and_then(ParamData::as_f32).unwrap().iter().all(|v| *v != 1.0));

    let without = filtered(&bytes, |k| !k.ends_with("num_batches_tracked"));
    let w2 = Weights::from_safetensors(&g, &without).unwrap();
    assert_eq!(w2.by_name(&g, "0.num_batches_tracked").and_then(ParamData::as_i64).unwrap().sum(), 0);
    assert_eq!(w2.get(ParamId(3)), w.get(ParamId(3)));
}

#[test]
fn mismatch_lists_missing_unexpected_and_misshaped_together() {
    // conv_s1 holds `0.weight` [8, 3, 3, 3] and `0.bias` [8]. Declare a 5×5 kernel without
    // a bias, plus a BatchNorm the file does not have.
    let mut b = GraphBuilder::new("wrong");
    let x = b.input("x", TensorType::new(vec![3, 9, 9]));
    let y = b.layer("0", conv(3, 8, 5, false), &[x]).unwrap();
    let y = b.layer("1", bn(8), &[y]).unwrap();
    b.output("y", y);
    let g = b.finish();
    let err = Weights::load(&g, layer_file("conv_s1")).unwrap_err();
    let WeightsError::Mismatch { net, missing, unexpected, misshaped } = &err else { panic!("{err}") };
    assert_eq!(net, "wrong");
    assert_eq!(misshaped, &[("0.weight".to_string(), vec![8, 3, 5, 5], vec![8, 3, 3, 3])]);
    // The file has no `num_batches_tracked` at all, which is accepted (exporters drop them).
    assert_eq!(missing, &["1.weight", "1.bias", "1.running_mean", "1.running_var"]);
    assert_eq!(unexpected, &["0.bias"]);
    let text = err.to_string();
    for line in ["0.weight: expected [8, 3, 5, 5], found [8, 3, 3, 3]", "missing: 1.running_var", "unexpected: 0.bias"]
    {
        assert!(text.contains(line), "{line:?} not in:\n{text}");
    }
}

#[test]
fn resnet18_subset_keys_and_shapes() {
    // torchvision resnet18's stem and head, with the classifier declared for 10 classes.
    let mut b = GraphBuilder::new("resnet18");
    let x = b.input("x", TensorType::new(vec![3, 224, 224]));
    let h = b.layer("conv1", conv(3, 64, 7, false), &[x]).unwrap();
    let h = b.layer("bn1", bn(64), &[h]).unwrap();
    b.register_params("layer2.0.downsample.0", &conv(64, 128, 1, false));
    b.register_params("layer2.0.downsample.1", &bn(128));
    b.register_params("fc", &linear(512, 10, true));
    b.output("y", h);
    let g = b.finish();
    let path = fixtures().join("nets/resnet18_subset.safetensors");
    let err = Weights::load(&g, &path).unwrap_err();
    let WeightsError::Mismatch { missing, unexpected, misshaped, .. } = &err else { panic!("{err}") };
    assert_eq!(missing, &["fc.weight"]);
    assert!(unexpected.is_empty(), "{err}");
    assert_eq!(misshaped, &[("fc.bias".to_string(), vec![10], vec![1000])]);

    // Without the head on either side, everything loads, by name.
    let mut b = GraphBuilder::new("resnet18");
    let x = b.input("x", TensorType::new(vec![3, 224, 224]));
    let h = b.layer("conv1", conv(3, 64, 7, false), &[x]).unwrap();
    let h = b.layer("bn1", bn(64), &[h]).unwrap();
    b.register_params("layer2.0.downsample.0", &conv(64, 128, 1, false));
    b.register_params("layer2.0.downsample.1", &bn(128));
    b.output("y", h);
    let g = b.finish();
    let bytes = filtered(&std::fs::read(&path).unwrap(), |k| k != "fc.bias");
    let w = Weights::from_safetensors(&g, &bytes).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(w.len(), 12);
    let conv1 = w.by_name(&g, "conv1.weight").and_then(ParamData::as_f32).unwrap();
    assert_eq!(conv1.shape(), &[64, 3, 7, 7]);
    // kaiming_normal_(fan_out) for 64·7·7 = 3136: std ≈ sqrt(2/3136) ≈ 0.025.
    let std = (conv1.iter().map(|v| v * v).sum::<f32>() / conv1.len() as f32).sqrt();
    assert!((0.02..0.03).contains(&std), "{std}");
    let bn1 = w.by_name(&g, "bn1.running_var").and_then(ParamData::as_f32).unwrap();
    assert!(bn1.iter().all(|v| *v == 1.0));
}

#[test]
fn lenet_keys_match_the_pytorch_listing() {
    let listing = std::fs::read_to_string(fixtures().join("keys/lenet.txt")).unwrap();
    let mut b = GraphBuilder::new("lenet");
    b.register_params("0", &conv(1, 6, 5, true));
    b.register_params("3", &conv(6, 16, 5, true));
    b.register_params("7", &linear(400, 120, true));
    b.register_params("9", &linear(120, 84, true));
    b.register_params("11", &linear(84, 10, true));
    let g = b.finish();
    let ours: Vec<String> = g
        .params
        .iter()
        .map(|p| {
            let dims: Vec<String> = p.spec.shape.iter().map(|d| d.to_string()).collect();
            format!("{}\t{}\tfloat32", p.name, dims.join(","))
        })
        .collect();
    let theirs: Vec<&str> = listing.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(ours, theirs);
    // And the trained weights load into it, by name.
    let w = Weights::load(&g, fixtures().join("digits/lenet.safetensors")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(w.len(), 10);
}

#[test]
fn files_that_are_not_safetensors_name_the_path() {
    let g = single(linear(20, 7, true), vec![20]);
    let path = fixtures().join("keys/lenet.txt");
    let err = Weights::load(&g, &path).unwrap_err();
    assert!(matches!(&err, WeightsError::Format { path: Some(p), .. } if p.ends_with("lenet.txt")), "{err}");
    assert!(err.to_string().contains("lenet.txt"), "{err}");
}
