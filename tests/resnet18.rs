//! ResNet-18 at 224×224: a torchvision-layout `state_dict` (every key and shape of
//! `torchvision.models.resnet18().state_dict()`, values from PyTorch where committed and
//! seeded elsewhere) loads into the `cnn!` ResNet-18 by name, and the JIT equals the
//! reference interpreter on it.

#[path = "../examples/zoo/mod.rs"]
mod zoo;

use cnnc::runtime::jit::{Compiled, Options};
use cnnc::runtime::{interp, weights::Weights};
use ndarray::{ArrayD, IxDyn};
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::BTreeMap;

fn fixture(path: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(path)
}

/// Deterministic values in [lo, hi).
fn seeded(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            lo + (hi - lo) * ((s >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect()
}

/// A safetensors file with torchvision's exact ResNet-18 keys, shapes and dtypes.
fn torchvision_state_dict() -> (Vec<u8>, Vec<(String, Vec<f32>)>) {
    let subset_bytes = std::fs::read(fixture("nets/resnet18_subset.safetensors")).unwrap();
    let subset = SafeTensors::deserialize(&subset_bytes).unwrap();
    let keys = std::fs::read_to_string(fixture("keys/resnet18.txt")).unwrap();
    let mut data: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> = BTreeMap::new();
    let mut from_pytorch = vec![];
    for (i, line) in keys.lines().enumerate() {
        let mut parts = line.split('\t');
        let (key, shape, dtype) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
        let shape: Vec<usize> = shape.split(',').filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect();
        let n: usize = shape.iter().product();
        if dtype == "int64" {
            data.insert(key.into(), (Dtype::I64, shape, 0i64.to_le_bytes().repeat(n)));
            continue;
        }
        let values = match subset.tensor(key) {
            Ok(t) => {
                let v: Vec<f32> =
                    t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                from_pytorch.push((key.to_string(), v.clone()));
                v
            }
            Err(_) if key.ends_with("running_var") => seeded(n, i as u64, 0.5, 2.0),
            Err(_) if key.ends_with("weight") && shape.len() == 1 => seeded(n, i as u64, 0.5, 1.5),
            Err(_) => {
                let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
                let b = 1.0 / (fan_in as f32).sqrt();
                seeded(n, i as u64, -b, b)
            }
        };
        data.insert(key.into(), (Dtype::F32, shape, values.iter().flat_map(|v| v.to_le_bytes()).collect()));
    }
    let views: Vec<(String, TensorView<'_>)> =
        data.iter().map(|(k, (d, s, b))| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    (safetensors::serialize(views, None).unwrap(), from_pytorch)
}

#[test]
fn torchvision_state_dict_loads_and_jit_equals_interpreter() {
    let graph = zoo::ResNet18::graph();
    let (bytes, from_pytorch) = torchvision_state_dict();
    let weights = Weights::from_safetensors(&graph, &bytes).expect("torchvision keys load by name");
    assert!(from_pytorch.len() >= 10);
    for (key, values) in &from_pytorch {
        let got = weights.by_name(&graph, key).and_then(|p| p.as_f32()).unwrap_or_else(|| panic!("{key}"));
        assert_eq!(got.as_slice().unwrap(), values.as_slice(), "{key}");
    }

    let x = ArrayD::from_shape_vec(IxDyn(&[1, 3, 224, 224]), seeded(3 * 224 * 224, 7, -2.0, 2.0)).unwrap();
    let reference = interp::run(&graph, &weights, &[x.view()]).unwrap().remove(0);
    let model = Compiled::new(&graph, &weights, &Options::default()).unwrap();
    let got = model.run(&[x.view()]).unwrap().remove(0);
    assert_eq!(got.shape(), &[1, 1000]);
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = got.iter().zip(&reference).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
    println!("ResNet-18 224×224: JIT vs interpreter, worst error {err:.2e} of max |y| = {scale:.3}");
    assert!(err <= 1e-4, "JIT differs from the interpreter by {err:e} of max |y|");
}

#[test]
fn random_weights_with_batch_two() {
    let graph = zoo::ResNet18::graph();
    let mut weights = Weights::random(&graph, 1);
    weights.randomize_batchnorm(&graph, 2);
    let x = ArrayD::from_shape_vec(IxDyn(&[2, 3, 224, 224]), seeded(2 * 3 * 224 * 224, 9, -1.0, 1.0)).unwrap();
    let reference = interp::run(&graph, &weights, &[x.view()]).unwrap().remove(0);
    let model = Compiled::new(&graph, &weights, &Options { threads: 2, ..Options::default() }).unwrap();
    let got = model.run(&[x.view()]).unwrap().remove(0);
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = got.iter().zip(&reference).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
    assert!(err <= 1e-4, "JIT differs from the interpreter by {err:e} of max |y|");
}
