use cnnc_compiler::dsl::compile_str;
use cnnc_runtime::fusion_check::{optimize, relative_error};
use cnnc_runtime::weights::Weights;
use cnnc_runtime::interp;
use ndarray::{ArrayD, IxDyn};

#[test]
fn scratch() {
    let src = std::fs::read_to_string("/tmp/scratch/case.cnn").unwrap();
    let g = compile_str(&src).nets[0].clone();
    let seed: u64 = std::env::var("SEED").unwrap().parse().unwrap();
    let batch: usize = std::env::var("BATCH").unwrap().parse().unwrap();
    let mut w = Weights::random(&g, seed);
    w.randomize_batchnorm(&g, seed ^ 1);
    let o = optimize(&g, &w).unwrap();
    let c = 3; let s = 3;
    let x = ArrayD::from_shape_fn(IxDyn(&[batch, c, s, s]), |i| ((i[0] * 131 + i[1] * 17 + i[2] * 7 + i[3]) as f32 * 0.61 + seed as f32).sin());
    let a = interp::run(&g, &w, &[x.view()]).unwrap();
    let b = interp::run(&o.graph, &o.weights, &[x.view()]).unwrap();
    println!("{:?}\n{:?}\nerr {}", a[0], b[0], relative_error(&b[0], &a[0]));
    println!("{}", o.graph);
}
