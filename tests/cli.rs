//! End-to-end tests of the `cnnc` binary: every command on the example nets, the digits
//! LeNet reproducing the `digits` example's and PyTorch's predictions, and broken or hostile
//! inputs (written into a temp dir) giving one `error: …` line and the documented exit
//! status, never a panic.

#[path = "../examples/zoo/mod.rs"]
mod zoo;

use ndarray::{Array, ArrayD, Axis, IxDyn};
use ndarray_npy::{read_npy, write_npy};
use safetensors::SafeTensors;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Runs `cnnc` from the workspace root.
fn cnnc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cnnc"))
        .args(args)
        .current_dir(ROOT)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("the cnnc binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the exit status, showing both streams on failure.
#[track_caller]
fn status(o: &Output, code: i32) {
    assert_eq!(o.status.code(), Some(code), "exit status\n--- stdout:\n{}\n--- stderr:\n{}", stdout(o), stderr(o));
}

/// Asserts a clean failure: the status, `error: ` on stderr containing `needle`, no panic.
#[track_caller]
fn fails(o: &Output, code: i32, needle: &str) {
    status(o, code);
    let err = stderr(o);
    assert!(err.contains("error: "), "no `error: ` in:\n{err}");
    assert!(err.contains(needle), "`{needle}` not in:\n{err}");
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE") && !err.contains("internal error"), "{err}");
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

fn fixture(name: &str) -> PathBuf {
    Path::new(ROOT).join("tests/fixtures/digits").join(name)
}

/// An f32 tensor of the held-out digits file.
fn heldout(key: &str) -> ArrayD<f32> {
    let bytes = std::fs::read(fixture("heldout.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(key).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{key}");
    let data: Vec<f32> = t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    ArrayD::from_shape_vec(IxDyn(t.shape()), data).unwrap()
}

fn argmax(row: ndarray::ArrayView1<'_, f32>) -> usize {
    row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0
}

#[test]
fn help_lists_every_command_with_examples() {
    let o = cnnc(&["--help"]);
    status(&o, 0);
    let out = stdout(&o);
    for cmd in ["check", "summary", "dot", "fuse-report", "run", "bench", "train", "Examples:"] {
        assert!(out.contains(cmd), "`{cmd}` missing from --help:\n{out}");
    }
    for cmd in ["check", "summary", "dot", "fuse-report", "run", "bench", "train"] {
        let o = cnnc(&[cmd, "--help"]);
        status(&o, 0);
        assert!(stdout(&o).contains("Examples:"), "{cmd} --help:\n{}", stdout(&o));
    }
}

#[test]
fn usage_errors_exit_2() {
    fails(&cnnc(&["frobnicate"]), 2, "unrecognized subcommand");
    fails(&cnnc(&["summary"]), 2, "required");
    fails(&cnnc(&["run", "examples/nets/lenet.cnn"]), 2, "--input");
    fails(&cnnc(&["summary", "examples/nets/lenet.cnn", "--input", "1,two,28,28"]), 2, "invalid input shape");
    fails(&cnnc(&["summary", "examples/nets/lenet.cnn", "--net", "Nope"]), 2, "no net named `Nope`");
    fails(&cnnc(&["summary", "examples/nets/lenet.cnn", "--input", "y=1,1,28,28"]), 2, "no input `y`");
    fails(&cnnc(&["bench", "examples/nets/lenet.cnn", "--iters", "0"]), 2, "--iters");
}

#[test]
fn check_accepts_every_example_net() {
    let nets = [
        ("alexnet", "AlexNet"),
        ("cifar10", "Cifar10"),
        ("conv1x2", "Conv1x2"),
        ("lenet", "LeNet"),
        ("nonlinear", "NoneLinearModel"),
        ("resnet18", "ResNet18"),
        ("seed_resnet", "SeedResNet"),
        ("vgg11", "Vgg11"),
    ];
    let files: Vec<String> = nets.iter().map(|(f, _)| format!("examples/nets/{f}.cnn")).collect();
    let args: Vec<&str> = std::iter::once("check").chain(files.iter().map(String::as_str)).collect();
    let o = cnnc(&args);
    status(&o, 0);
    let out = stdout(&o);
    for (file, net) in nets {
        assert!(out.contains(&format!("examples/nets/{file}.cnn: ok: {net}(")), "{file}:\n{out}");
    }
    assert!(out.contains("LeNet(x: [N, 1, 28, 28]) -> (output: [N, 10]); 61,706 params"), "{out}");
    // AlexNet's floor() warnings are shown, but do not fail the check.
    let err = stderr(&o);
    assert!(err.contains("warning: Conv2d(1, 96") && err.contains("--> examples/nets/alexnet.cnn:3:5"), "{err}");
    assert!(err.contains("warnings emitted"), "{err}");
}

#[test]
fn check_reports_every_error_rustc_style() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.cnn");
    std::fs::write(
        &bad,
        "/// Three mistakes.\n\
         net Bad(x: [N, 1, 28, 28]) = Sequential(\n\
         \x20   Conv2d(1, 6, kernel_size = 5), ReLU,\n\
         \x20   Conv2d(8, 16, kernel_size = 5), ReLU,\n\
         \x20   Flatten,\n\
         \x20   Linear(16 * 4 * 4, 10),\n\
         \x20   MaxPool2D(2),\n\
         );\n",
    )
    .unwrap();
    let o = cnnc(&["check", path_str(&bad)]);
    fails(&o, 1, "aborting due to 3 previous errors");
    let err = stderr(&o);
    let expected = format!(
        "error: layer `2`: Conv2d(8, 16, kernel_size=(5, 5)) expects 8 input channels, but `1` (ReLU) gives 6 \
         channels ([N, 6, 24, 24])\n \
         --> {}:4:5\n  |\n4 |     Conv2d(8, 16, kernel_size = 5), ReLU,\n  |     ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n",
        bad.display()
    );
    assert!(err.contains(&expected), "expected\n{expected}\nin\n{err}");
    assert!(err.contains("16×20×20 = 6400"), "the arithmetic:\n{err}");
    assert!(err.contains(&format!("{}:6:5", bad.display())), "{err}");
    assert!(err.contains("did you mean `MaxPool2d`?"), "{err}");
    assert!(stdout(&o).is_empty(), "{}", stdout(&o));

    // A file that does not tokenize, one that is not UTF-8, and one that does not exist.
    let trunc = dir.path().join("trunc.cnn");
    std::fs::write(&trunc, "net A(x: [N, 1]) = Sequential(\n").unwrap();
    fails(&cnnc(&["check", path_str(&trunc)]), 1, &format!("--> {}:1:", trunc.display()));
    let binary = dir.path().join("binary.cnn");
    std::fs::write(&binary, [0xff, 0xfe, 0x00]).unwrap();
    fails(&cnnc(&["check", path_str(&binary)]), 1, "valid UTF-8");
    let missing = dir.path().join("missing.cnn");
    fails(&cnnc(&["check", path_str(&missing)]), 1, &format!("cannot read `{}`", missing.display()));
    fails(&cnnc(&["summary", path_str(&missing)]), 1, "cannot read");
}

#[test]
fn summary_table_and_json() {
    let o = cnnc(&["summary", "examples/nets/lenet.cnn"]);
    status(&o, 0);
    let out = stdout(&o);
    for needle in ["Layer (type)", "0 (Conv2d)", "[N, 6, 28, 28]", "Total params: 61,706", "MACs per sample: 416,520"] {
        assert!(out.contains(needle), "`{needle}` not in\n{out}");
    }
    let o = cnnc(&["summary", "examples/nets/lenet.cnn", "--json"]);
    status(&o, 0);
    let j: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(j["net"], "LeNet");
    assert_eq!(j["total_params"], 61_706);
    assert_eq!(j["total_macs"], 416_520);
    assert_eq!(j["layers"].as_array().unwrap().len(), 12);
    assert_eq!(j["layers"][0]["op"], "Conv2d");
    assert_eq!(j["layers"][0]["params"], 156);
    assert_eq!(j["outputs"][0]["shape"], "[N, 10]");
}

#[test]
fn summary_input_override_rebuilds_the_net() {
    let o = cnnc(&["summary", "examples/nets/resnet18.cnn", "--input", "1,3,64,64", "--json"]);
    status(&o, 0);
    let j: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(j["inputs"][0]["shape"], "[1, 3, 64, 64]");
    assert_eq!(j["outputs"][0]["dims"], serde_json::json!([1, 1000]));
    assert_eq!(j["total_params"], 11_689_512);
    assert_eq!(j["total_macs"], 148_760_576);
    assert!(stderr(&o).contains("compiled with --input x: [1, 3, 64, 64]"), "{}", stderr(&o));
    // A shape LeNet's Linear cannot take: a shape error on the faulty layer.
    let o = cnnc(&["summary", "examples/nets/lenet.cnn", "--input", "N,1,32,32"]);
    fails(&o, 1, "Linear(400, 120) expects 400 input features, but `6` (Flatten) gives 16×6×6 = 576");
    assert!(stderr(&o).contains("--> examples/nets/lenet.cnn:8:5"), "{}", stderr(&o));
}

#[test]
fn summary_picks_a_net_of_a_multi_net_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("two.cnn");
    std::fs::write(
        &file,
        "net Small(x: [N, 4]) = Sequential(Linear(4, 2));\nnet Large(x: [N, 4]) = Sequential(Linear(4, 8), ReLU, Linear(8, 3));\n",
    )
    .unwrap();
    let json = |extra: &[&str]| -> Value {
        let mut args = vec!["summary", path_str(&file), "--json"];
        args.extend_from_slice(extra);
        let o = cnnc(&args);
        status(&o, 0);
        serde_json::from_str(&stdout(&o)).unwrap()
    };
    assert_eq!(json(&[])["net"], "Large");
    assert_eq!(json(&["--net", "Small"])["net"], "Small");
    assert_eq!(json(&["--net", "Small"])["total_params"], 10);
    assert_eq!(json(&["--net", "Small", "--input", "x=2,4"])["inputs"][0]["shape"], "[2, 4]");
    fails(&cnnc(&["summary", path_str(&file), "--net", "Medium"]), 2, "it declares: Small, Large");
    let blocks = dir.path().join("blocks.cnn");
    std::fs::write(&blocks, "block b(c) = Sequential(ReLU);\n").unwrap();
    fails(&cnnc(&["summary", path_str(&blocks)]), 1, "declares no net");
}

#[test]
fn dot_writes_graphviz() {
    let o = cnnc(&["dot", "examples/nets/nonlinear.cnn"]);
    status(&o, 0);
    let out = stdout(&o);
    assert!(out.starts_with("digraph \"NoneLinearModel\" {"), "{out}");
    assert!(out.contains("out_features") && out.contains("out_output"), "{out}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lenet.dot");
    let o = cnnc(&["dot", "examples/nets/lenet.cnn", "-o", path_str(&file)]);
    status(&o, 0);
    assert!(std::fs::read_to_string(&file).unwrap().starts_with("digraph \"LeNet\""));
    // `--svg` renders with Graphviz when it is installed, and says so clearly when not.
    let svg = dir.path().join("lenet.svg");
    let o = cnnc(&["dot", "examples/nets/lenet.cnn", "--svg", "-o", path_str(&svg)]);
    if Command::new("dot").arg("-V").output().is_ok() {
        status(&o, 0);
        assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
    } else {
        fails(&o, 2, "Graphviz");
    }
    let o = cnnc(&["dot", "examples/nets/lenet.cnn", "--svg", "--png"]);
    fails(&o, 2, "cannot be used with");
}

#[test]
fn dot_fused_and_fuse_report() {
    let o = cnnc(&["fuse-report", "examples/nets/seed_resnet.cnn"]);
    status(&o, 0);
    let out = stdout(&o);
    assert!(out.starts_with("Fusion report: SeedResNet\n"), "{out}");
    assert!(out.contains("1.0.bn1 (BatchNorm2d, folded into weights)"), "{out}");
    let o = cnnc(&["dot", "examples/nets/seed_resnet.cnn", "--fused"]);
    status(&o, 0);
    let fused = stdout(&o);
    let plain = stdout(&cnnc(&["dot", "examples/nets/seed_resnet.cnn"]));
    assert!(fused.starts_with("digraph \"SeedResNet\""), "{fused}");
    assert!(plain.contains("BatchNorm2d") && !fused.contains("BatchNorm2d"), "BatchNorms are folded away");
    assert!(fused.lines().count() < plain.lines().count(), "fusion removes nodes");
    // With real weights and the numeric check.
    let weights = fixture("lenet.safetensors");
    let o = cnnc(&["fuse-report", "examples/nets/lenet.cnn", "--weights", path_str(&weights), "--check"]);
    status(&o, 0);
    let out = stdout(&o);
    assert!(out.contains("kernels             11 → 7") && out.contains("Numeric check: final error"), "{out}");
    fails(&cnnc(&["fuse-report", "examples/nets/conv1x2.cnn", "--weights", path_str(&weights)]), 1, "do not match");
}

/// The acceptance test: the digits LeNet reproduces PyTorch's logits on the 360 held-out
/// images (same argmax everywhere, max |diff| ≤ 1e-4 · max |logit|).
#[test]
fn run_lenet_reproduces_pytorch_on_heldout_digits() {
    let images = heldout("images");
    let logits = heldout("logits");
    assert_eq!(images.shape(), [360, 1, 28, 28]);
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("digits.npy");
    let y = dir.path().join("logits.npy");
    write_npy(&x, &images).unwrap();
    let weights = fixture("lenet.safetensors");
    let o = cnnc(&[
        "run",
        "examples/nets/lenet.cnn",
        "--weights",
        path_str(&weights),
        "--input",
        path_str(&x),
        "--output",
        path_str(&y),
    ]);
    status(&o, 0);
    assert!(stdout(&o).is_empty(), "--output prints nothing on stdout");
    let ours: ArrayD<f32> = read_npy(&y).unwrap();
    assert_eq!(ours.shape(), [360, 10]);
    let scale = logits.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = ours.iter().zip(&logits).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff <= 1e-4 * scale, "max |diff| {diff} > 1e-4 · {scale}");
    for (i, (a, b)) in ours.axis_iter(Axis(0)).zip(logits.axis_iter(Axis(0))).enumerate() {
        let (a, b) = (a.into_dimensionality().unwrap(), b.into_dimensionality().unwrap());
        assert_eq!(argmax(a), argmax(b), "sample {i}");
    }
    // The `digits` example's own path: the `cnn!` LeNet, the same weights, the JIT in-process.
    let graph = zoo::LeNet::graph();
    let w = cnnc::runtime::weights::Weights::load(&graph, &weights).unwrap();
    let model = cnnc::runtime::Compiled::new(&graph, &w, &cnnc::runtime::Options::default()).unwrap();
    let example = model.run(&[images.view()]).unwrap().remove(0);
    let predictions = |y: &ArrayD<f32>| -> Vec<usize> {
        y.axis_iter(Axis(0)).map(|r| argmax(r.into_dimensionality().unwrap())).collect()
    };
    assert_eq!(predictions(&ours), predictions(&example), "cnnc run and the digits example disagree");
    // …and the accuracy the fixtures record (97.22 %, 350 of 360).
    let bytes = std::fs::read(fixture("heldout.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let labels: Vec<usize> = st
        .tensor("labels")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as usize)
        .collect();
    let correct = predictions(&ours).iter().zip(&labels).filter(|(p, l)| p == l).count();
    assert_eq!(correct, 350, "held-out accuracy");
}

#[test]
fn run_prints_top_k_and_the_interpreter_agrees() {
    let images = heldout("images");
    let logits = heldout("logits");
    let dir = tempfile::tempdir().unwrap();
    // float64 input is accepted and converted.
    let x = dir.path().join("four.npy");
    write_npy(&x, &images.slice_axis(Axis(0), (0..4).into()).mapv(f64::from)).unwrap();
    let weights = fixture("lenet.safetensors");
    let args =
        ["run", "examples/nets/lenet.cnn", "--weights", path_str(&weights), "--input", path_str(&x), "--top", "3"];
    let o = cnnc(&args);
    status(&o, 0);
    let out = stdout(&o);
    assert!(out.starts_with("output [4, 10]: top 3 of 10 classes per sample"), "{out}");
    for i in 0..4 {
        let best = argmax(logits.index_axis(Axis(0), i).into_dimensionality().unwrap());
        assert!(out.contains(&format!("  [{i}] {best}: ")), "sample {i} should be {best}:\n{out}");
    }
    for extra in [&["--interp"][..], &["--fused"], &["--fused", "--interp"]] {
        let mut variant = args.to_vec();
        variant.extend_from_slice(extra);
        let o = cnnc(&variant);
        status(&o, 0);
        assert_eq!(stdout(&o), out, "{extra:?} prints the same top-3");
    }
}

#[test]
fn run_random_weights_and_several_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x.npy");
    write_npy(&x, &Array::from_shape_fn((2, 3, 32, 32), |(n, c, h, w)| ((n + c * h + w) % 7) as f32 / 7.0)).unwrap();
    let y = dir.path().join("y.npy");
    let run = |seed: &str| {
        let o = cnnc(&[
            "run",
            "examples/nets/nonlinear.cnn",
            "--input",
            path_str(&x),
            "--output",
            path_str(&y),
            "--seed",
            seed,
            "--threads",
            "2",
        ]);
        status(&o, 0);
        assert!(stderr(&o).contains(&format!("random weights (PyTorch's default initialisation, seed {seed}")));
        let out: ArrayD<f32> = read_npy(&y).unwrap();
        let features: ArrayD<f32> = read_npy(dir.path().join("y.features.npy")).unwrap();
        assert_eq!(out.shape(), [2, 10]);
        assert_eq!(features.shape(), [2, 128, 28, 28]);
        out
    };
    let a = run("1");
    assert_eq!(a, run("1"), "the same seed gives the same weights");
    assert_ne!(a, run("2"));
    // Without --output every output is printed.
    let o = cnnc(&["run", "examples/nets/nonlinear.cnn", "--input", path_str(&x)]);
    status(&o, 0);
    assert!(stdout(&o).contains("output [2, 10]: top 5") && stdout(&o).contains("features [2, 128, 28, 28]:"));
}

#[test]
fn run_rejects_broken_inputs_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let lenet_w = fixture("lenet.safetensors");
    write_npy(p("digits.npy"), &Array::<f32, _>::zeros((2, 1, 28, 28))).unwrap();
    write_npy(p("no_batch.npy"), &Array::<f32, _>::zeros((1, 28, 28))).unwrap();
    write_npy(p("wrong.npy"), &Array::<f32, _>::zeros((2, 3, 28, 28))).unwrap();
    write_npy(p("labels.npy"), &Array::<i64, _>::zeros((2, 1, 28, 28))).unwrap();
    write_npy(p("edge.npy"), &Array::<f32, _>::zeros((1, 1, 6, 8))).unwrap();
    std::fs::write(p("junk.npy"), "not an array\n").unwrap();
    let npy = std::fs::read(p("digits.npy")).unwrap();
    std::fs::write(p("short.npy"), &npy[..npy.len() - 100]).unwrap();
    let st = std::fs::read(&lenet_w).unwrap();
    std::fs::write(p("short.safetensors"), &st[..st.len() / 2]).unwrap();
    std::fs::write(p("junk.safetensors"), "{}").unwrap();

    let run = |net: &str, input: &str, weights: Option<&Path>| {
        let net = format!("examples/nets/{net}.cnn");
        let input = p(input);
        let mut args = vec!["run", net.as_str(), "--input", path_str(&input)];
        if let Some(w) = weights {
            args.extend(["--weights", path_str(w)]);
        }
        cnnc(&args)
    };
    // Weights of another net: every mismatched key is named.
    let o = run("conv1x2", "edge.npy", Some(&lenet_w));
    fails(&o, 1, "weights do not match net `Conv1x2`");
    assert!(stderr(&o).contains("0.weight: expected [1, 1, 1, 2], found [6, 1, 5, 5]"), "{}", stderr(&o));
    assert!(stderr(&o).contains("unexpected: 11.weight"), "{}", stderr(&o));
    fails(
        &run("lenet", "wrong.npy", Some(&lenet_w)),
        1,
        "has shape [2, 3, 28, 28], but input `x` of net `LeNet` is [N, 1, 28, 28]",
    );
    fails(&run("lenet", "no_batch.npy", Some(&lenet_w)), 1, "add the batch dimension");
    fails(&run("lenet", "labels.npy", Some(&lenet_w)), 1, "holds int64 ('<i8') data, but cnnc needs float32");
    fails(&run("lenet", "junk.npy", Some(&lenet_w)), 1, "junk.npy` is not a valid .npy file");
    fails(&run("lenet", "short.npy", Some(&lenet_w)), 1, "short.npy` is not a valid .npy file");
    fails(&run("lenet", "missing.npy", Some(&lenet_w)), 1, "missing.npy`: No such file");
    fails(&run("lenet", "digits.npy", Some(&p("short.safetensors"))), 1, "malformed safetensors data");
    fails(&run("lenet", "digits.npy", Some(&p("junk.safetensors"))), 1, "junk.safetensors");
    fails(&run("lenet", "digits.npy", Some(&p("missing.safetensors"))), 1, "missing.safetensors");
    // Two inputs for a one-input net is a usage error.
    let x = p("digits.npy");
    let o = cnnc(&["run", "examples/nets/lenet.cnn", "--input", path_str(&x), "--input", path_str(&x)]);
    fails(&o, 2, "takes 1 input(s)");
    // The output file cannot be created.
    let o =
        cnnc(&["run", "examples/nets/lenet.cnn", "--input", path_str(&x), "--output", path_str(&p("no/dir/y.npy"))]);
    fails(&o, 1, "cannot create");
}

#[test]
fn bench_measures_a_tiny_run() {
    let o = cnnc(&[
        "bench",
        "examples/nets/lenet.cnn",
        "--batch",
        "1,4",
        "--threads",
        "1,2",
        "--iters",
        "3",
        "--warmup",
        "1",
        "--json",
    ]);
    status(&o, 0);
    let j: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(j["net"], "LeNet");
    assert_eq!(j["macs_per_sample"], 416_520);
    // Measured on this machine (an FMA loop) when `--peak` is not given.
    assert!(j["peak_gflops_per_core"].as_f64().is_some_and(|p| p > 1.0), "{j}");
    assert_eq!(j["fused"], true, "fused unless --unfused");
    let rows = j["results"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    for r in rows {
        assert_eq!(r["iters"], 3);
        for key in ["compile_ms", "p50_ms", "p90_ms", "p99_ms", "samples_per_s", "gflops", "percent_of_peak"] {
            assert!(r[key].as_f64().is_some_and(|v| v > 0.0), "{key} in {r}");
        }
        assert!(r["p50_ms"].as_f64() <= r["p99_ms"].as_f64());
    }
    let o = cnnc(&["bench", "examples/nets/conv1x2.cnn", "--iters", "2", "--warmup", "0", "--peak", "10", "--fused"]);
    status(&o, 0);
    let out = stdout(&o);
    assert!(out.contains("Conv1x2 (fused)") && out.contains("peak 10 GFLOP/s per core"), "{out}");
    let o = cnnc(&["bench", "examples/nets/conv1x2.cnn", "--iters", "2", "--warmup", "0", "--unfused"]);
    status(&o, 0);
    assert!(stdout(&o).starts_with("Conv1x2: "), "{}", stdout(&o));
    fails(&cnnc(&["bench", "examples/nets/conv1x2.cnn", "--fused", "--unfused"]), 2, "cannot be used with");
    assert!(out.contains("p50 ms") && out.contains("% peak"), "{out}");
    fails(&cnnc(&["bench", "examples/nets/lenet.cnn", "--batch", "0"]), 2, "at least 1");
    // Each convolution on the micro-kernels, with its algorithm and why.
    let convs = j["convolutions"].as_array().unwrap();
    assert!(
        convs.iter().any(|c| c["reason"] == "plain operand (a net's first layer)" && c["algorithm"] == "Direct"),
        "{j}"
    );
}

/// `--conv` forces the 3×3 and 5×5 convolutions' algorithm; `bench` lists the choices.
#[test]
fn conv_algorithm_is_chosen_per_layer_or_forced() {
    let dir = tempfile::tempdir().unwrap();
    let net = dir.path().join("w.cnn");
    std::fs::write(
        &net,
        "net W(x: [N, 16, 12, 12]) = Sequential(Conv2d(16, 32, 3, padding = 1), ReLU(), Conv2d(32, 32, 3, stride = 2));",
    )
    .unwrap();
    let net = net.to_str().unwrap();
    let algos = |extra: &[&str]| -> Vec<String> {
        let mut args = vec!["bench", net, "--iters", "1", "--warmup", "0", "--json"];
        args.extend_from_slice(extra);
        let o = cnnc(&args);
        status(&o, 0);
        let j: Value = serde_json::from_str(&stdout(&o)).unwrap();
        j["convolutions"].as_array().unwrap().iter().map(|c| c["algorithm"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(algos(&[]), ["Winograd", "Direct"]);
    assert_eq!(algos(&["--conv", "direct"]), ["Direct", "Direct"]);
    assert_eq!(algos(&["--conv", "winograd"]), ["Winograd", "Direct"]);
    fails(&cnnc(&["bench", net, "--conv", "fft"]), 2, "invalid value");
    let o = cnnc(&["bench", net, "--iters", "1", "--warmup", "0"]);
    assert!(stdout(&o).contains("Winograd  3×3, 16→32 channels at 12×12: 2.25× fewer FMAs"), "{}", stdout(&o));
}

/// Sources a fuzzer would try: each is one clean error (status 1), never a panic, an
/// overflow, a stack overflow or a hang.
#[test]
fn check_survives_hostile_sources() {
    let dir = tempfile::tempdir().unwrap();
    let check = |name: &str, text: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        cnnc(&["check", path_str(&path)])
    };
    // An empty file declares nothing: clean for `check`, an input error for `summary`.
    let o = check("empty.cnn", b"");
    status(&o, 0);
    assert!(stdout(&o).contains("ok (no nets"), "{}", stdout(&o));
    let empty = dir.path().join("empty.cnn");
    fails(&cnnc(&["summary", path_str(&empty)]), 1, "declares no net");
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    fails(&check("garbage.cnn", &garbage), 1, "valid UTF-8");
    fails(&check("ascii.cnn", b"@@@ ### $$$ \\ ``"), 1, "cannot tokenize");
    fails(
        &check("huge.cnn", b"net A(x: [N, 1, 99999999999, 99999999999]) = Sequential(Conv2d(1, 6, 5));"),
        1,
        "dimension 99999999999 is too large (the limit is 4,294,967,295)",
    );
    fails(
        &check("zero.cnn", b"net A(x: [N, 1, 8, 8]) = Sequential(Conv2d(0, 0, 0));"),
        1,
        "aborting due to 3 previous errors",
    );
    fails(
        &check("negative.cnn", b"net A(x: [N, 1, 8, 8]) = Sequential(Conv2d(-1, 6, 3, stride = -2));"),
        1,
        "`stride` must be positive, found -2",
    );
    fails(&check("negdim.cnn", b"net A(x: [N, -1, 8, 8]) = Sequential(ReLU);"), 1, "invalid digit");
    let deep = format!("net A(x: [N, 4]) = Sequential(Linear(4, {}2{}));", "(".repeat(20_000), ")".repeat(20_000));
    fails(&check("deep.cnn", deep.as_bytes()), 1, "nests too deeply");
    let chain = format!("net A(x: [N, 4]) {{ fn forward(self, x) {{ x{} }} }}", ".relu()".repeat(20_000));
    fails(&check("chain.cnn", chain.as_bytes()), 1, "nests too deeply");
    fails(
        &check("overflow.cnn", b"net A(x: [N, 4]) = Sequential(Linear(4, 9223372036854775807 * 2));"),
        1,
        "integer overflow",
    );
    fails(
        &check("loops.cnn", b"block b() { for i in 0..4096 { for j in 0..4096 { ReLU(); } } } net A(x: [N, 4]) = b();"),
        1,
        "expands to more than 100,000",
    );
    fails(
        &check("inside.cnn", b"net A(x: [N, 4]) { fn forward(self, x) { Linear(4, 2)(x) } }"),
        1,
        "is created inside forward",
    );
}

/// A batch whose largest tensor alone exceeds the machine's memory is refused up front
/// (Linux: the limit is read from /proc/meminfo), instead of an allocation abort.
#[cfg(target_os = "linux")]
#[test]
fn batches_that_cannot_fit_in_memory_are_refused() {
    let o = cnnc(&["bench", "examples/nets/lenet.cnn", "--batch", "99999999999", "--iters", "1", "--warmup", "0"]);
    fails(&o, 2, "a batch of 99999999999 does not fit in memory: `1` (Sigmoid) alone is 4704 f32 values per sample");
    // `run`: a 4 KB input whose 1024 outputs of 2^32 − 1 values each need 16 TiB.
    let dir = tempfile::tempdir().unwrap();
    let net = dir.path().join("wide.cnn");
    std::fs::write(&net, "net Wide(x: [N, 1]) = Sequential(Linear(1, 4294967295));\n").unwrap();
    let x = dir.path().join("x.npy");
    write_npy(&x, &Array::<f32, _>::zeros((1024, 1))).unwrap();
    let o = cnnc(&["run", path_str(&net), "--input", path_str(&x)]);
    fails(&o, 1, "a batch of 1024 does not fit in memory: `0` (Linear) alone is 4294967295 f32 values per sample");
    assert!(stderr(&o).contains("16.0 TiB for the batch"), "{}", stderr(&o));
}

// ---- cnnc train --------------------------------------------------------------------------

/// Writes an `.npz` with `x` (f32) and `y` (f32 or i64).
fn write_npz(path: &Path, x: &ArrayD<f32>, y: Result<&ArrayD<f32>, &ArrayD<i64>>) {
    let mut npz = ndarray_npy::NpzWriter::new(std::fs::File::create(path).unwrap());
    npz.add_array("x", x).unwrap();
    match y {
        Ok(y) => npz.add_array("y", y).unwrap(),
        Err(y) => npz.add_array("y", y).unwrap(),
    }
    npz.finish().unwrap();
}

fn edge_data() -> (ArrayD<f32>, ArrayD<f32>) {
    let x = ArrayD::from_shape_fn(IxDyn(&[1, 1, 6, 8]), |i| if (2..6).contains(&i[3]) { 0f32 } else { 1.0 });
    let y = ArrayD::from_shape_fn(IxDyn(&[1, 1, 6, 7]), |i| x[[0, 0, i[2], i[3]]] - x[[0, 0, i[2], i[3] + 1]]);
    (x, y)
}

#[test]
fn train_seed_004_edge_kernel_gives_pytorchs_losses_and_saves() {
    let dir = tempfile::tempdir().unwrap();
    let (x, y) = edge_data();
    let data = dir.path().join("edge.npz");
    write_npz(&data, &x, Ok(&y));
    // PyTorch's initial weight (torch.manual_seed(0)) as the --weights file.
    let f: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(ROOT).join("tests/fixtures/train/edge_kernel.json")).unwrap(),
    )
    .unwrap();
    let init: Vec<f32> = f["initial_weight"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    let graph = cnnc::compiler::dsl::compile_str(
        &std::fs::read_to_string(Path::new(ROOT).join("examples/nets/conv1x2.cnn")).unwrap(),
    )
    .nets[0]
        .clone();
    let mut w = cnnc::runtime::weights::Weights::random(&graph, 0);
    w.set(
        cnnc::compiler::ParamId(0),
        cnnc::runtime::weights::ParamData::F32(ArrayD::from_shape_vec(IxDyn(&[1, 1, 1, 2]), init).unwrap()),
    )
    .unwrap();
    let init_path = dir.path().join("init.safetensors");
    w.save(&graph, &init_path).unwrap();
    // On the interpreter (the default) and JIT-compiled.
    for engine in ["--interp", "--jit"] {
        let out = dir.path().join("edge.safetensors");
        let o = cnnc(&[
            "train",
            "examples/nets/conv1x2.cnn",
            "--data",
            path_str(&data),
            "--weights",
            path_str(&init_path),
            "--loss",
            "mse",
            "--reduction",
            "sum",
            "--optimizer",
            "sgd",
            "--lr",
            "0.03",
            "--batch-size",
            "1",
            "--epochs",
            "20",
            "--no-shuffle",
            "--json",
            "--save",
            path_str(&out),
            engine,
        ]);
        status(&o, 0);
        let lines: Vec<Value> = stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 21, "20 steps and a summary");
        for (line, want) in lines.iter().zip(f["losses"].as_array().unwrap()) {
            let (got, want) = (line["loss"].as_f64().unwrap(), want.as_f64().unwrap());
            assert!((got - want).abs() <= 1e-5 * want.abs().max(1e-6) + 1e-9, "{engine}: {got} vs PyTorch {want}");
        }
        assert_eq!(lines[20]["steps"], 20);
        assert!(stderr(&o).contains("epoch 20: loss"));
        let saved = std::fs::read(&out).unwrap();
        let st = SafeTensors::deserialize(&saved).unwrap();
        let wt: Vec<f32> = st
            .tensor("0.weight")
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        for (g, want) in wt.iter().zip(f["final_weight"].as_array().unwrap()) {
            assert!((f64::from(*g) - want.as_f64().unwrap()).abs() < 1e-5);
        }
    }
    // The write went through a temporary file that is gone.
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");
}

#[test]
fn train_lenet_on_digits_with_validation() {
    let dir = tempfile::tempdir().unwrap();
    let x = heldout("images");
    let bytes = std::fs::read(fixture("heldout.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("labels").unwrap();
    let labels: ArrayD<i64> = ArrayD::from_shape_vec(
        IxDyn(t.shape()),
        t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect(),
    )
    .unwrap();
    let (train, val) = (dir.path().join("train.npz"), dir.path().join("val.npz"));
    let xs = x.slice_axis(Axis(0), ndarray::Slice::from(0..200)).to_owned();
    let ys = labels.slice_axis(Axis(0), ndarray::Slice::from(0..200)).to_owned();
    write_npz(&train, &xs, Err(&ys));
    write_npz(
        &val,
        &x.slice_axis(Axis(0), ndarray::Slice::from(200..360)).to_owned(),
        Err(&labels.slice_axis(Axis(0), ndarray::Slice::from(200..360)).to_owned()),
    );
    let out = dir.path().join("lenet.safetensors");
    let o = cnnc(&[
        "train",
        "examples/nets/lenet.cnn",
        "--data",
        path_str(&train),
        "--val",
        path_str(&val),
        "--optimizer",
        "adam",
        "--lr",
        "3e-3",
        "--batch-size",
        "64",
        "--epochs",
        "2",
        "--save",
        path_str(&out),
    ]);
    status(&o, 0);
    let err = stderr(&o);
    for needle in ["epoch 1: loss", "epoch 2: loss", "accuracy", "val loss", "saved"] {
        assert!(err.contains(needle), "`{needle}` not in:\n{err}");
    }
    // The saved state_dict runs.
    let npy = dir.path().join("x.npy");
    write_npy(&npy, &xs).unwrap();
    status(&cnnc(&["run", "examples/nets/lenet.cnn", "--weights", path_str(&out), "--input", path_str(&npy)]), 0);
}

#[test]
fn train_rejects_bad_data_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let x = ArrayD::<f32>::zeros(IxDyn(&[4, 1, 28, 28]));
    let lenet = "examples/nets/lenet.cnn";
    // Float targets for cross-entropy.
    write_npz(&p("f.npz"), &x, Ok(&ArrayD::zeros(IxDyn(&[4]))));
    fails(&cnnc(&["train", lenet, "--data", path_str(&p("f.npz"))]), 1, "int64");
    // A class index past the last class.
    write_npz(&p("c.npz"), &x, Err(&ArrayD::from_elem(IxDyn(&[4]), 10i64)));
    fails(&cnnc(&["train", lenet, "--data", path_str(&p("c.npz"))]), 1, "class index 10");
    // Targets of the wrong shape.
    write_npz(&p("s.npz"), &x, Err(&ArrayD::zeros(IxDyn(&[3]))));
    fails(&cnnc(&["train", lenet, "--data", path_str(&p("s.npz"))]), 1, "samples");
    // x of the wrong shape for the net.
    write_npz(&p("x.npz"), &ArrayD::zeros(IxDyn(&[4, 3, 28, 28])), Err(&ArrayD::zeros(IxDyn(&[4]))));
    fails(&cnnc(&["train", lenet, "--data", path_str(&p("x.npz"))]), 1, "[N, 1, 28, 28]");
    // BCE targets outside [0, 1].
    let (ex, ey) = edge_data();
    write_npz(&p("b.npz"), &ex, Ok(&ey));
    fails(
        &cnnc(&["train", "examples/nets/conv1x2.cnn", "--data", path_str(&p("b.npz")), "--loss", "bce_with_logits"]),
        1,
        "[0, 1]",
    );
    // A net with nothing to learn.
    std::fs::write(p("relu.cnn"), "net R(x: [N, 1, 6, 8]) = Sequential(AvgPool2d((1, 2), stride = 1), ReLU());\n")
        .unwrap();
    fails(
        &cnnc(&["train", path_str(&p("relu.cnn")), "--data", path_str(&p("b.npz")), "--loss", "mse"]),
        1,
        "no learnable parameter",
    );
    // A loss that blows up names the step and the first non-finite tensor.
    let o = cnnc(&[
        "train",
        "examples/nets/conv1x2.cnn",
        "--data",
        path_str(&p("b.npz")),
        "--loss",
        "mse",
        "--lr",
        "1e30",
        "--batch-size",
        "1",
        "--epochs",
        "50",
    ]);
    fails(&o, 1, "is not finite; the first non-finite tensor is `");
    assert!(stderr(&o).contains("step "), "{}", stderr(&o));
    // Not an npz; missing arrays; usage errors.
    std::fs::write(p("junk.npz"), b"not a zip").unwrap();
    fails(&cnnc(&["train", lenet, "--data", path_str(&p("junk.npz"))]), 1, "not a valid .npz");
    let mut npz = ndarray_npy::NpzWriter::new(std::fs::File::create(p("nox.npz")).unwrap());
    npz.add_array("images", &x).unwrap();
    npz.finish().unwrap();
    fails(&cnnc(&["train", lenet, "--data", path_str(&p("nox.npz"))]), 1, "no array `x`");
    fails(&cnnc(&["train", lenet, "--data", path_str(&p("c.npz")), "--batch-size", "0"]), 2, "--batch-size");
    fails(
        &cnnc(&["train", lenet, "--data", path_str(&p("c.npz")), "--optimizer", "adam", "--betas", "0.9"]),
        2,
        "--betas",
    );
    fails(&cnnc(&["train", lenet, "--data", path_str(&p("c.npz")), "--nesterov"]), 2, "Nesterov");
    // Nothing was written for a failed run.
    let o = cnnc(&["train", lenet, "--data", path_str(&p("c.npz")), "--save", path_str(&p("never.safetensors"))]);
    status(&o, 1);
    assert!(!p("never.safetensors").exists());
}

fn onnx_fixture(name: &str) -> PathBuf {
    Path::new(ROOT).join("tests/fixtures/onnx/small").join(name)
}

fn max_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter().zip(b.iter()).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// `cnnc import` writes `.cnn` text and a state_dict that `cnnc run` runs to PyTorch's numbers,
/// as `cnnc run model.onnx` does directly.
#[test]
fn import_writes_cnn_text_and_weights_that_run_like_the_onnx_file() {
    let dir = tempfile::tempdir().unwrap();
    let (cnn, st) = (dir.path().join("lenet.cnn"), dir.path().join("lenet.safetensors"));
    let model = onnx_fixture("lenet.onnx");
    let o = cnnc(&["import", path_str(&model), "-o", path_str(&cnn), "--weights", path_str(&st)]);
    status(&o, 0);
    assert!(stderr(&o).contains("imported `Lenet` (pytorch"), "{}", stderr(&o));
    assert!(stderr(&o).contains("61,706 params"), "{}", stderr(&o));
    let text = std::fs::read_to_string(&cnn).unwrap();
    assert!(text.contains("net Lenet(x: [N, 1, 28, 28])"), "{text}");
    assert!(text.contains("flatten("), "x.view(x.size(0), -1) became a flatten:\n{text}");
    let want: ArrayD<f32> = read_npy(onnx_fixture("lenet_y.npy")).unwrap();
    let x = onnx_fixture("lenet_x.npy");
    for (net, weights) in [(model.clone(), None), (cnn.clone(), Some(st.clone()))] {
        let y = dir.path().join("y.npy");
        let mut args = vec!["run", path_str(&net), "--input", path_str(&x), "--output", path_str(&y)];
        if let Some(w) = &weights {
            args.extend(["--weights", path_str(w)]);
        }
        let o = cnnc(&args);
        status(&o, 0);
        let got: ArrayD<f32> = read_npy(&y).unwrap();
        assert!(max_diff(&got, &want) < 1e-5, "{net:?}: {}", max_diff(&got, &want));
    }
    // The other commands take the model too.
    for cmd in ["summary", "fuse-report", "dot"] {
        status(&cnnc(&[cmd, path_str(&model)]), 0);
    }
    // Grad-CAM with the model's own weights (a `.cnn` net needs --weights).
    let cam = dir.path().join("cam.png");
    let o = cnnc(&["gradcam", path_str(&model), "--input", path_str(&x), "--layer", "c2", "-o", path_str(&cam)]);
    status(&o, 0);
    assert!(cam.exists() && stdout(&o).contains("the map peaks at"), "{}", stdout(&o));
    let o = cnnc(&["gradcam", path_str(&cnn), "--input", path_str(&x), "--layer", "c2", "-o", path_str(&cam)]);
    fails(&o, 2, "--weights is required for a .cnn net");
    let o = cnnc(&["check", path_str(&model)]);
    status(&o, 0);
    assert!(stdout(&o).contains("ok: Lenet(x: [N, 1, 28, 28]) -> (output: [N, 10]); 61,706 params"), "{}", stdout(&o));
}

#[test]
fn import_notes_what_it_folded() {
    let o = cnnc(&["import", path_str(&onnx_fixture("rewrites.onnx"))]);
    status(&o, 0);
    let err = stderr(&o);
    assert!(err.contains("folded into the conv's padding (reflect)"), "{err}");
    assert!(err.contains("(MatMul) + `/Add` (Add) → one Linear"), "{err}");
    assert!(stdout(&o).contains("padding_mode = \"reflect\""), "{}", stdout(&o));
}

#[test]
fn onnx_errors_list_every_unsupported_node_and_name_the_file() {
    let o = cnnc(&["check", path_str(&onnx_fixture("unsupported.onnx"))]);
    fails(&o, 1, "2 unsupported nodes");
    let err = stderr(&o);
    assert!(err.contains("node `/HardSwish` (HardSwish, opset 17)"), "{err}");
    assert!(err.contains("node `/Elu` (Elu, opset 17)"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.onnx");
    std::fs::write(&junk, b"\x08\x07not a protobuf at all \xff\xff\xff").unwrap();
    fails(&cnnc(&["run", path_str(&junk), "--input", "x.npy"]), 1, "not an ONNX model");
    fails(&cnnc(&["import", path_str(&dir.path().join("missing.onnx"))]), 1, "missing.onnx");
}
