mod jit_common;
use cnnc_runtime::{Compiled, Options};
use jit_common::*;
#[test]
fn scratch() {
    let g = one_layer(
        &[64, 56, 56],
        layer("Conv2d", &[int(64), int(64), int(3)], &[("padding", int(1)), ("bias", b(false))]),
    );
    let w = weights(&g, 1);
    let net = Compiled::new(&g, &w, &Options { threads: 1, portable: false }).unwrap();
    let x = random(&[1, 64, 56, 56], 1);
    for _ in 0..3 {
        net.run(&[x.view()]).unwrap();
    }
    let t = std::time::Instant::now();
    for _ in 0..10 {
        net.run(&[x.view()]).unwrap();
    }
    let dt = t.elapsed().as_secs_f64() / 10.0;
    println!("conv 64x56: {:.3} ms {:.1} GFLOP/s", dt * 1e3, 2.0 * 64.0 * 64.0 * 9.0 * 56.0 * 56.0 / dt / 1e9);
}
