//! Grad-CAM against a PyTorch hooks-based Grad-CAM (`tests/fixtures/make.py gradcam`), the
//! image preprocessing against torchvision, the overlay's colours, and `cnnc gradcam`.

use cnnc::Graph;
use cnnc::compiler::dsl::compile_str;
use cnnc::images;
use cnnc::runtime::gradcam::{grad_cam, grad_cam_on, jet, normalize, overlay};
use cnnc::runtime::weights::Weights;
use ndarray::{Array2, Array3, ArrayD, IxDyn};
use safetensors::SafeTensors;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn fixture(name: &str) -> PathBuf {
    Path::new(ROOT).join("tests/fixtures/gradcam").join(name)
}

fn tensors(name: &str) -> HashMap<String, ArrayD<f32>> {
    let bytes = std::fs::read(fixture(name)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.iter()
        .map(|(k, t)| {
            let v = t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            (k.to_string(), ArrayD::from_shape_vec(IxDyn(t.shape()), v).unwrap())
        })
        .collect()
}

fn cases() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("cases.json")).unwrap()).unwrap()
}

fn camnet() -> Graph {
    let out = compile_str(cases()["source"].as_str().unwrap());
    assert!(!out.has_errors());
    out.nets[0].clone()
}

/// Largest |a − b| over max |b|.
fn rel_err(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn raw_maps_match_pytorch_hooks_grad_cam() {
    let graph = camnet();
    let weights = Weights::load(&graph, fixture("camnet.weights.safetensors")).unwrap();
    let t = tensors("camnet.io.safetensors");
    for case in cases()["cases"].as_array().unwrap() {
        let layer = case["layer"].as_str().unwrap();
        let given: Option<Vec<usize>> =
            case["given"].as_array().map(|a| a.iter().map(|v| v.as_u64().unwrap() as usize).collect());
        let cam = grad_cam(&graph, &weights, t["x"].view(), layer, given.as_deref()).unwrap();
        let want = &t[&format!("{}.cam", case["key"].as_str().unwrap())];
        let err = rel_err(&cam.raw.clone().into_dyn(), want);
        assert!(err <= 1e-4, "{layer} {given:?}: relative error {err:e}");
        // The reference interpreter gives the same maps.
        let on_interp = grad_cam_on(&graph, &weights, t["x"].view(), layer, given.as_deref(), None).unwrap();
        let err = rel_err(&on_interp.raw.clone().into_dyn(), want);
        assert!(err <= 1e-4, "{layer} {given:?} (interpreter): relative error {err:e}");
        assert_eq!(on_interp.class, cam.class);
        let classes: Vec<usize> =
            case["classes"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(cam.class, classes);
        for (s, want) in cam.score.iter().zip(case["scores"].as_array().unwrap()) {
            assert!((f64::from(*s) - want.as_f64().unwrap()).abs() < 1e-4);
        }
    }
}

#[test]
fn grad_cam_errors_are_clear() {
    let graph = camnet();
    let weights = Weights::random(&graph, 0);
    let x = ArrayD::<f32>::zeros(IxDyn(&[2, 3, 12, 12]));
    let e = grad_cam(&graph, &weights, x.view(), "feature.6", None).unwrap_err().to_string();
    assert!(e.contains("did you mean `features.6`"), "{e}");
    let e = grad_cam(&graph, &weights, x.view(), "fc", None).unwrap_err().to_string();
    assert!(e.contains("[N, C, H, W]"), "{e}");
    let e = grad_cam(&graph, &weights, x.view(), "features", Some(&[5, 0])).unwrap_err().to_string();
    assert!(e.contains("class 5 is out of range"), "{e}");
    // `features` names the Sequential's output, its last ReLU.
    let a = grad_cam(&graph, &weights, x.view(), "features", None).unwrap();
    let b = grad_cam(&graph, &weights, x.view(), "features.6", None).unwrap();
    assert_eq!(a, b);
}

#[test]
fn image_preprocessing_matches_torchvision() {
    let want = tensors("rgb.expected.safetensors");
    let img = images::load(&fixture("rgb.png"), 3).unwrap();
    assert!(rel_err(&img.clone().into_dyn(), &want["tensor"]) <= 1e-7);
    let resized = images::resize(img.view(), (16, 12));
    assert!(rel_err(&resized.clone().into_dyn(), &want["resized"]) <= 1e-5);
    let mean = [0.485, 0.456, 0.406];
    let std = [0.229, 0.224, 0.225];
    let normed = images::normalize(resized.view(), &mean, &std).unwrap();
    assert!(rel_err(&normed.clone().into_dyn(), &want["normalized"]) <= 1e-5);
    let back = images::denormalize(normed.view(), &mean, &std).unwrap();
    assert!((back[[3, 4, 1]] - resized[[1, 3, 4]]).abs() < 1e-5);
    let gray = images::resize(images::load(&fixture("rgb.png"), 1).unwrap().view(), (16, 12));
    assert!(rel_err(&gray.into_dyn(), &want["gray_resized"]) <= 1e-5);
    assert!(images::load(&fixture("cases.json"), 3).unwrap_err().to_string().contains("cannot read image"));
    assert!(images::load(&fixture("rgb.png"), 2).is_err());
}

#[test]
fn overlay_has_the_colormaps_colours_at_peak_and_minimum() {
    let raw = Array2::from_shape_fn((4, 5), |(y, x)| (y * 5 + x) as f32);
    let mask = normalize(raw.view());
    assert_eq!(mask[[0, 0]], 0.0);
    assert!((mask[[3, 4]] - 1.0).abs() < 1e-6);
    assert_eq!(jet(0.0), [0.0, 0.0, 0.5]);
    assert_eq!(jet(1.0), [0.5, 0.0, 0.0]);
    assert_eq!(jet(0.5).map(|v| (v * 100.0).round()), [51.0, 100.0, 49.0].map(|v: f32| v.round()));
    let black = Array3::<f32>::zeros((4, 5, 3));
    let o = overlay(black.view(), mask.view()).unwrap();
    // Over black, the blend is half the colormap, rescaled by its maximum (jet's full green
    // at 0.5 → 0.5): jet(1) = dark red and jet(0) = dark blue come out as 128 in one channel.
    assert_eq!([o[[3, 4, 0]], o[[3, 4, 1]], o[[3, 4, 2]]], [128, 0, 0], "dark red at the peak");
    assert_eq!([o[[0, 0, 0]], o[[0, 0, 1]], o[[0, 0, 2]]], [0, 0, 128], "dark blue at the minimum");
    assert!(overlay(Array3::<f32>::zeros((4, 4, 3)).view(), mask.view()).is_err());
}

fn cnnc(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cnnc")).args(args).current_dir(ROOT).output().unwrap()
}

#[test]
fn cnnc_gradcam_end_to_end_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let net = dir.path().join("camnet.cnn");
    std::fs::write(&net, cases()["source"].as_str().unwrap()).unwrap();
    let x = dir.path().join("x.npy");
    let t = tensors("camnet.io.safetensors");
    ndarray_npy::write_npy(&x, &t["x"]).unwrap();
    let (png, raw) = (dir.path().join("cam.png"), dir.path().join("cam.npy"));
    let w = fixture("camnet.weights.safetensors");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let o = cnnc(&[
        "gradcam",
        &s(&net),
        "--weights",
        &s(&w),
        "--input",
        &s(&x),
        "--layer",
        "features.3",
        "-o",
        &s(&png),
        "--raw",
        &s(&raw),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out.lines().count(), 3, "{out}");
    assert!(out.contains("class") && out.contains("peaks at row"));
    let got: ArrayD<f32> = ndarray_npy::read_npy(&raw).unwrap();
    assert!(rel_err(&got, &t["features.3.predicted.cam"]) <= 1e-4);
    let img = image::open(&png).unwrap();
    assert_eq!((img.width(), img.height()), (36, 12), "three 12×12 overlays in a row");
    // Pictures, resized to the input, with a given class.
    let o = cnnc(&[
        "gradcam",
        &s(&net),
        "--weights",
        &s(&w),
        "--image",
        &s(&fixture("rgb.png")),
        "--layer",
        "features.6",
        "--class",
        "2",
        "--mean",
        "0.5,0.5,0.5",
        "--std",
        "0.25,0.25,0.25",
        "-o",
        &s(&png),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("class 2"));
    // `cnnc run` classifies pictures directly, with class names.
    let labels = dir.path().join("labels.txt");
    std::fs::write(&labels, "ant\nbee\ncat\ndog\nemu\n").unwrap();
    let o = cnnc(&[
        "run",
        &s(&net),
        "--weights",
        &s(&w),
        "--image",
        &s(&fixture("rgb.png")),
        "--image",
        &s(&fixture("rgb.png")),
        "--mean",
        "0.5,0.5,0.5",
        "--std",
        "0.25,0.25,0.25",
        "--labels",
        &s(&labels),
        "--top",
        "2",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("[1]") && ["ant:", "bee:", "cat:", "dog:", "emu:"].iter().any(|l| out.contains(l)), "{out}");
    // Errors: one line, exit 1 (2 for the command line), no panic.
    for (args, code, needle) in [
        (vec!["--input", &s(&x), "--layer", "feature.3"][..].to_vec(), 1, "did you mean `features.3`"),
        (vec!["--input", &s(&x), "--layer", "fc"], 1, "[N, C, H, W]"),
        (vec!["--input", &s(&x), "--layer", "features.3", "--class", "9"], 1, "out of range"),
        (vec!["--image", &s(&fixture("cases.json")), "--layer", "features.3"], 1, "cannot read image"),
        (vec!["--image", &s(&fixture("rgb.png")), "--layer", "features.3", "--mean", "0.5"], 2, "--mean and --std"),
    ] {
        let mut all = vec!["gradcam", s(&net).leak(), "--weights", s(&w).leak()];
        all.extend(args.iter().map(|a| &**a));
        let o = cnnc(&all);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(code), "{all:?}: {err}");
        assert!(err.contains("error: ") && err.contains(needle) && !err.contains("panicked"), "{err}");
    }
}
