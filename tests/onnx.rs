//! ONNX import, checked against ONNX's own tests and ONNX Runtime.
//!
//! - `tests/fixtures/onnx/node/`: ONNX's backend node tests for the imported ops, and
//!   `pytorch-converted/`: the `onnx` wheel's converted PyTorch layer tests. Weights arrive
//!   as graph inputs there, so every input but the first is bound as a constant (or, where
//!   that import fails, every input stays a run-time input: `Add(x, y)`). Each test runs on
//!   the JIT and on the interpreter, within ONNX's own runner tolerance
//!   `|got − want| ≤ 1e-7 + 1e-3·|want|` (some expected outputs are given to 4 digits).
//!   `node/EXCLUDED.txt` lists the tests cnnc does not run, each with its reason; an excluded
//!   test that starts passing fails this suite, so the list stays true.
//! - `tests/fixtures/onnx/models/`: torchvision models exported by PyTorch (opset 17,
//!   dynamic batch) with generated weights (`weight_values`, as `make.py` writes them) in
//!   external data written beside a copy of the model — or, for the two largest, bound as
//!   constants so no large file is written — run by the JIT against ONNX Runtime's output on
//!   the same file, within 1e-4 of the output's largest magnitude.

use cnnc::onnx::{self, Const, Data, Options};
use cnnc::prelude::*;
use cnnc::runtime::interp;
use ndarray::{ArrayD, IxDyn};
use prost::Message;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx")
}

fn array(c: &Const) -> ArrayD<f32> {
    let v: Vec<f32> = match &c.data {
        Data::F32(v) => v.clone(),
        Data::I64(_) => c.floats().expect("a numeric tensor"),
    };
    ArrayD::from_shape_vec(IxDyn(&c.dims), v).expect("shape")
}

fn close(got: &ArrayD<f32>, want: &ArrayD<f32>, rtol: f32, atol: f32) -> Result<(), String> {
    if got.shape() != want.shape() {
        return Err(format!("shape {:?}, expected {:?}", got.shape(), want.shape()));
    }
    for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
        let ok = (g.is_nan() && w.is_nan()) || g == w || (g - w).abs() <= atol + rtol * w.abs();
        if !ok {
            return Err(format!("element {i}: {g}, expected {w}"));
        }
    }
    Ok(())
}

/// Runs one ONNX test directory; `Err` says why it does not pass.
fn run_case(dir: &Path) -> Result<(), String> {
    let bytes = std::fs::read(dir.join("model.onnx")).map_err(|e| e.to_string())?;
    let model = cnnc_onnx::proto::ModelProto::decode(bytes.as_slice()).map_err(|e| e.to_string())?;
    let graph = model.graph.as_ref().ok_or("no graph")?;
    let mut sets: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    sets.sort();
    if sets.is_empty() {
        return Err("no test data set".into());
    }
    for set in sets {
        let read = |name: String| -> Result<Const, String> {
            let b = std::fs::read(set.join(&name)).map_err(|e| format!("{name}: {e}"))?;
            onnx::read_tensor(&b).map_err(|e| e.to_string())
        };
        // Initializers are not inputs to feed.
        let inits: Vec<&str> = graph.initializer.iter().filter_map(|t| t.name.as_deref()).collect();
        let names: Vec<String> =
            graph.input.iter().filter_map(|i| i.name.clone()).filter(|n| !inits.contains(&n.as_str())).collect();
        let mut bind = vec![];
        for (j, name) in names.iter().enumerate().skip(1) {
            bind.push((name.clone(), read(format!("input_{j}.pb"))?));
        }
        let mut xs = vec![array(&read("input_0.pb".into())?)];
        let opts = Options { bind, ..Options::default() };
        let imported = match onnx::import_bytes(&bytes, Some(dir), &opts) {
            Ok(m) => m,
            Err(first) => {
                for j in 1..names.len() {
                    xs.push(array(&read(format!("input_{j}.pb"))?));
                }
                onnx::import_bytes(&bytes, Some(dir), &Options::default())
                    .map_err(|e| format!("import: {first}\nwith every input at run time: {e}"))?
            }
        };
        let w = onnx::weights(&imported).map_err(|e| format!("weights: {e}"))?;
        let jit = Compiled::new(&imported.graph, &w, &cnnc::runtime::Options::default())
            .map_err(|e| format!("compile: {e}"))?;
        let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
        let got = jit.run(&views).map_err(|e| format!("run: {e}"))?;
        let reference = interp::run(&imported.graph, &w, &views).map_err(|e| format!("interpreter: {e}"))?;
        for (j, (g, r)) in got.iter().zip(&reference).enumerate() {
            let want = array(&read(format!("output_{j}.pb"))?);
            close(g, &want, 1e-3, 1e-7).map_err(|e| format!("{}: JIT output {j}: {e}", set.display()))?;
            close(r, &want, 1e-3, 1e-7).map_err(|e| format!("{}: interpreter output {j}: {e}", set.display()))?;
        }
    }
    Ok(())
}

fn excluded(dir: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(dir.join("EXCLUDED.txt")).unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (name, why) = l.split_once(':').unwrap_or_else(|| panic!("EXCLUDED.txt: `{l}` has no `: reason`"));
            assert!(!why.trim().is_empty(), "EXCLUDED.txt: {name} has no reason");
            (name.trim().to_string(), why.trim().to_string())
        })
        .collect()
}

fn run_suite(sub: &str) {
    let dir = fixtures().join(sub);
    let skip = excluded(&dir);
    let mut cases: Vec<PathBuf> =
        std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_dir()).collect();
    cases.sort();
    assert!(cases.len() >= 20, "{sub}: only {} cases", cases.len());
    let (mut failed, mut passed, mut stale) = (vec![], 0, vec![]);
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let r = run_case(case);
        match (r, skip.contains_key(&name)) {
            (Ok(()), false) => passed += 1,
            (Ok(()), true) => stale.push(name),
            (Err(e), false) => failed.push(format!("{name}: {e}")),
            (Err(_), true) => {}
        }
    }
    for name in skip.keys() {
        assert!(cases.iter().any(|c| c.ends_with(name)), "{sub}/EXCLUDED.txt names `{name}`, which is not a test");
    }
    println!("{sub}: {passed} passed, {} excluded", skip.len());
    assert!(failed.is_empty(), "{sub}: {} failed:\n{}", failed.len(), failed.join("\n"));
    assert!(stale.is_empty(), "{sub}: excluded but passing (remove from EXCLUDED.txt): {stale:?}");
}

#[test]
fn onnx_backend_node_tests() {
    run_suite("node");
}

#[test]
fn onnx_pytorch_converted_tests() {
    run_suite("pytorch-converted");
}

/// splitmix64's finaliser.
fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `values` of `make.py`: element i is `(2u − 1)·scale` with `u` the top 24 bits of
/// `splitmix64(seed·φ₁ + 1 + (i + 1)·φ₂) / 2^24`, scale `sqrt(6 / fan_in)` (0.1 for 1-D).
fn weight_values(seed: u64, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let fan_in: usize = if shape.len() >= 2 { shape[1..].iter().product() } else { 0 };
    let scale = if fan_in > 0 { (6.0 / fan_in as f64).sqrt() } else { 0.1 };
    let base = seed.wrapping_mul(0x632B_E59B_D9B4_E019).wrapping_add(1);
    (1..=n as u64)
        .map(|i| {
            let u = (splitmix(base.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15))) >> 40) as f64 / 16_777_216.0;
            ((2.0 * u - 1.0) * scale) as f32
        })
        .collect()
}

/// Copies a fixture model into a temporary folder with its generated weights: written there as
/// its external data file (`on_disk`), or returned as constants to bind (the large models —
/// AlexNet 244 MB, VGG-11 531 MB — so the suite writes no large files).
fn materialise_with(name: &str, on_disk: bool) -> (tempfile::TempDir, PathBuf, Vec<(String, Const)>) {
    let src = fixtures().join("models").join(name);
    let bytes = std::fs::read(src.join("model.onnx")).unwrap();
    let model = cnnc_onnx::proto::ModelProto::decode(bytes.as_slice()).unwrap();
    let mut blob: Vec<u8> = vec![];
    let mut bind = vec![];
    let mut next = 0usize;
    for t in &model.graph.as_ref().unwrap().initializer {
        let Some(off) = t.external_data.iter().find(|e| e.key.as_deref() == Some("offset")) else { continue };
        let offset: usize = off.value.as_deref().unwrap().parse().unwrap();
        assert_eq!(offset, next, "tensors are laid out in order");
        let dims: Vec<usize> = t.dims.iter().map(|d| *d as usize).collect();
        let values = weight_values(offset as u64, &dims);
        next += 4 * values.len();
        if on_disk {
            for v in &values {
                blob.extend_from_slice(&v.to_le_bytes());
            }
        } else {
            bind.push((t.name.clone().unwrap(), Const { dims, data: Data::F32(values) }));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    if on_disk {
        std::fs::write(dir.path().join("weights.bin"), &blob).unwrap();
    }
    let path = dir.path().join(format!("{name}.onnx"));
    std::fs::write(&path, &bytes).unwrap();
    (dir, path, bind)
}

fn materialise(name: &str) -> (tempfile::TempDir, PathBuf) {
    let (dir, path, _) = materialise_with(name, true);
    (dir, path)
}

fn check_model(name: &str, batch: usize) {
    let on_disk = !matches!(name, "alexnet" | "vgg11");
    let (_dir, path, bind) = materialise_with(name, on_disk);
    let imported =
        onnx::import_file(&path, &Options { bind, ..Options::default() }).unwrap_or_else(|e| panic!("{name}: {e}"));
    let w = onnx::weights(&imported).unwrap();
    let x = ArrayD::from_shape_vec(IxDyn(&[batch, 3, 224, 224]), weight_values(12345, &[batch, 3, 224, 224]))
        .unwrap()
        .mapv(|v| v * 10.0);
    let want = array(
        &onnx::read_tensor(&std::fs::read(fixtures().join("models").join(name).join("output.pb")).unwrap()).unwrap(),
    );
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for threads in [1, 2] {
        let opts = cnnc::runtime::Options { threads, ..cnnc::runtime::Options::default() };
        let net = Compiled::new(&imported.graph, &w, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        let y = net.run(&[x.view()]).unwrap().remove(0);
        close(&y, &want, 0.0, 1e-4 * scale)
            .unwrap_or_else(|e| panic!("{name} ({threads} threads) vs ONNX Runtime: {e}"));
    }
    // The `.cnn` text declares the same net: same keys and shapes, so the same weights load.
    let out = cnnc::compiler::dsl::compile_str(&imported.source);
    let errors: Vec<String> = out.errors().map(|d| d.full_message()).collect();
    assert!(errors.is_empty(), "{name}: the .cnn text does not compile: {errors:?}\n{}", imported.source);
    let g = out.nets.last().unwrap();
    assert_eq!(g.params, imported.graph.params, "{name}: keys and shapes of the .cnn text");
    assert_eq!(g.to_string().lines().count(), imported.graph.to_string().lines().count());
}

#[test]
fn torchvision_resnet18_matches_onnx_runtime() {
    check_model("resnet18", 2);
}

#[test]
fn torchvision_squeezenet1_1_matches_onnx_runtime() {
    check_model("squeezenet1_1", 2);
}

#[test]
fn torchvision_mobilenet_v2_matches_onnx_runtime() {
    check_model("mobilenet_v2", 2);
}

#[test]
fn torchvision_alexnet_matches_onnx_runtime() {
    check_model("alexnet", 1);
}

#[test]
fn torchvision_vgg11_matches_onnx_runtime() {
    check_model("vgg11", 1);
}

fn small(name: &str) -> PathBuf {
    fixtures().join("small").join(name)
}

/// PyTorch exports with shape arithmetic (`x.view(x.size(0), -1)`), a reflect Pad folded into
/// a conv, a zero Pad alone, ReLU6, a one-sided clamp, `x @ W + b`, and per-channel
/// `(x − mean) / std`, `y·0.5 + 2`, `1 − relu(y)` (PyTorch's outputs),
/// and TensorFlow-style SAME_UPPER and asymmetric pooling (ONNX Runtime's): on the JIT and the
/// interpreter, at the exported batch and another.
#[test]
fn small_exports_match_their_reference() {
    for name in ["lenet", "rewrites", "same_upper", "normalize"] {
        let m = onnx::import_file(&small(&format!("{name}.onnx")), &Options::default()).unwrap();
        let w = onnx::weights(&m).unwrap();
        let x: ArrayD<f32> = ndarray_npy::read_npy(small(&format!("{name}_x.npy"))).unwrap();
        let want: ArrayD<f32> = ndarray_npy::read_npy(small(&format!("{name}_y.npy"))).unwrap();
        let net = Compiled::new(&m.graph, &w, &cnnc::runtime::Options::default()).unwrap();
        close(&net.run(&[x.view()]).unwrap()[0], &want, 1e-5, 1e-6).unwrap_or_else(|e| panic!("{name} JIT: {e}"));
        close(&interp::run(&m.graph, &w, &[x.view()]).unwrap()[0], &want, 1e-5, 1e-6)
            .unwrap_or_else(|e| panic!("{name} interpreter: {e}"));
        // The batch is symbolic: one sample gives that sample's row.
        let one = x.slice_axis(ndarray::Axis(0), ndarray::Slice::from(1..2)).to_owned();
        let row = want.slice_axis(ndarray::Axis(0), ndarray::Slice::from(1..2)).to_owned();
        close(&net.run(&[one.view()]).unwrap()[0], &row, 1e-5, 1e-6).unwrap_or_else(|e| panic!("{name} b1: {e}"));
    }
    let m = onnx::import_file(&small("rewrites.onnx"), &Options::default()).unwrap();
    assert!(m.notes.iter().any(|n| n.contains("folded into the conv's padding (reflect)")), "{:?}", m.notes);
    assert!(m.notes.iter().any(|n| n.contains("1×1 depthwise conv")), "{:?}", m.notes);
    assert!(m.notes.iter().any(|n| n.contains("one Linear")), "{:?}", m.notes);
    assert_eq!(m.opset, 11);
    let m = onnx::import_file(&small("same_upper.onnx"), &Options::default()).unwrap();
    // SAME_UPPER on 9×10 with a 3×3 window, stride 2: rows padded (1, 1), columns (0, 1).
    assert!(m.source.contains("MaxPool2d((3, 3), stride = (2, 2), padding = (1, 1, 0, 1))"), "{}", m.source);
    assert!(m.source.contains("AvgPool2d((2, 3), stride = (2, 2), padding = (0, 1, 0, 1)"), "{}", m.source);
}

#[test]
fn unsupported_models_list_every_node_with_its_opset() {
    let e = onnx::import_file(&small("unsupported.onnx"), &Options::default()).unwrap_err();
    let onnx::ImportError::Unsupported(list) = &e else { panic!("{e}") };
    let ops: Vec<(&str, &str, i64)> = list.iter().map(|u| (u.node.as_str(), u.op.as_str(), u.opset)).collect();
    assert_eq!(ops, [("/HardSwish", "HardSwish", 17), ("/Elu", "Elu", 17)]);
}

/// Malformed files are errors, never panics: junk, every truncation of a real model, and
/// external data that is missing, short, or outside the model's folder.
#[test]
fn malformed_models_are_errors() {
    assert!(matches!(
        onnx::import_bytes(b"\xff\xff\xff\xff", None, &Options::default()),
        Err(onnx::ImportError::Decode(_))
    ));
    let bytes = std::fs::read(small("lenet.onnx")).unwrap();
    for cut in (0..bytes.len()).step_by(997) {
        let _ = onnx::import_bytes(&bytes[..cut], None, &Options::default());
    }
    let (dir, path) = materialise("squeezenet1_1");
    let model_bytes = std::fs::read(&path).unwrap();
    // External data read through the model's folder, not given as bytes without one.
    let e = onnx::import_bytes(&model_bytes, None, &Options::default()).unwrap_err().to_string();
    assert!(e.contains("external file"), "{e}");
    // A short data file.
    let blob = std::fs::read(dir.path().join("weights.bin")).unwrap();
    std::fs::write(dir.path().join("weights.bin"), &blob[..blob.len() / 2]).unwrap();
    let e = onnx::import_file(&path, &Options::default()).unwrap_err().to_string();
    assert!(e.contains("but the tensor asks for"), "{e}");
    // A location outside the folder.
    let mut model = cnnc_onnx::proto::ModelProto::decode(model_bytes.as_slice()).unwrap();
    let k = model.graph.as_ref().unwrap().initializer.iter().position(|t| !t.external_data.is_empty()).unwrap();
    for bad in ["../weights.bin", "/etc/passwd", ""] {
        for e in &mut model.graph.as_mut().unwrap().initializer[k].external_data {
            if e.key.as_deref() == Some("location") {
                e.value = Some(bad.into());
            }
        }
        let e =
            onnx::import_bytes(&model.encode_to_vec(), Some(dir.path()), &Options::default()).unwrap_err().to_string();
        assert!(e.contains("must be a relative path inside the model's folder"), "{bad}: {e}");
    }
}

/// Per-sample input shapes, by name or in order; a name the model lacks, or more shapes than
/// inputs, is an error naming the inputs.
#[test]
fn input_shapes_by_name_or_position() {
    let path = small("lenet.onnx");
    for dims in [vec![(None, vec![1, 28, 28])], vec![(Some("x".to_string()), vec![1, 28, 28])]] {
        let m = onnx::import_file(&path, &Options { dims, ..Options::default() }).unwrap();
        assert_eq!(m.graph.node(m.graph.inputs[0].1).ty.dims, [1, 28, 28]);
    }
    let bad = |dims| onnx::import_file(&path, &Options { dims, ..Options::default() }).unwrap_err().to_string();
    assert!(bad(vec![(Some("y".into()), vec![1, 28, 28])]).contains("no input `y`; the model's inputs: x"));
    assert!(bad(vec![(None, vec![1, 28, 28]), (None, vec![1, 28, 28])]).contains("2 input shapes given for 1"));
    assert!(bad(vec![(None, vec![28, 28])]).contains("has rank 4, but 2 per-sample dimensions"));
}
