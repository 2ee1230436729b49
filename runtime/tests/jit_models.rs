//! Whole models through the JIT: LeNet-5 and a ResNet basic block (unfused, and with
//! BatchNorm, residual and ReLU fused into the convolutions' epilogues), checked against the
//! interpreter. With `--nocapture` the tests print compile time and the best run time per
//! batch (meaningful in `--release`).

mod jit_common;

use cnnc_compiler::ops::{Activation, Epilogue, Op};
use cnnc_compiler::{Graph, GraphBuilder, TensorType};
use cnnc_runtime::{Compiled, Options, interp};
use jit_common::*;
use std::time::{Duration, Instant};

fn lenet() -> Graph {
    let mut g = GraphBuilder::new("lenet5");
    let x = g.input("x", TensorType::new(vec![1, 28, 28]));
    let c1 = g.layer("c1", layer("Conv2d", &[int(1), int(6), int(5)], &[("padding", int(2))]), &[x]).unwrap();
    let r1 = g.layer("r1", layer("ReLU", &[], &[]), &[c1]).unwrap();
    let p1 = g.layer("p1", layer("MaxPool2d", &[int(2)], &[]), &[r1]).unwrap();
    let c2 = g.layer("c2", layer("Conv2d", &[int(6), int(16), int(5)], &[]), &[p1]).unwrap();
    let r2 = g.layer("r2", layer("ReLU", &[], &[]), &[c2]).unwrap();
    let p2 = g.layer("p2", layer("MaxPool2d", &[int(2)], &[]), &[r2]).unwrap();
    let f = g.layer("f", layer("Flatten", &[], &[]), &[p2]).unwrap();
    let f1 = g.layer("f1", layer("Linear", &[int(400), int(120)], &[]), &[f]).unwrap();
    let r3 = g.layer("r3", layer("ReLU", &[], &[]), &[f1]).unwrap();
    let f2 = g.layer("f2", layer("Linear", &[int(120), int(84)], &[]), &[r3]).unwrap();
    let r4 = g.layer("r4", layer("ReLU", &[], &[]), &[f2]).unwrap();
    let f3 = g.layer("f3", layer("Linear", &[int(84), int(10)], &[]), &[r4]).unwrap();
    g.output("logits", f3);
    g.finish()
}

/// ResNet-18's `layer1` block on a 56×56 map: conv–bn–relu–conv–bn, + x, relu.
fn resnet_block(c: usize, hw: usize, fused: bool) -> Graph {
    let mut g = GraphBuilder::new(if fused { "block_fused" } else { "block" });
    let x = g.input("x", TensorType::new(vec![c, hw, hw]));
    let ci = c as i64;
    let conv = || layer("Conv2d", &[int(ci), int(ci), int(3)], &[("padding", int(1)), ("bias", b(false))]);
    let y = if fused {
        let e1 = Epilogue { scale_shift: true, residual: false, act: Some(Activation::Relu) };
        let e2 = Epilogue { scale_shift: true, residual: true, act: Some(Activation::Relu) };
        let a = g.layer("conv1", with_epilogue(conv(), e1), &[x]).unwrap();
        g.layer("conv2", with_epilogue(conv(), e2), &[a, x]).unwrap()
    } else {
        let a = g.layer("conv1", conv(), &[x]).unwrap();
        let a = g.layer("bn1", layer("BatchNorm2d", &[int(ci)], &[]), &[a]).unwrap();
        let a = g.layer("relu1", layer("ReLU", &[], &[]), &[a]).unwrap();
        let a = g.layer("conv2", conv(), &[a]).unwrap();
        let a = g.layer("bn2", layer("BatchNorm2d", &[int(ci)], &[]), &[a]).unwrap();
        let a = g.layer("add", Op::Add(Default::default()), &[a, x]).unwrap();
        g.layer("relu2", layer("ReLU", &[], &[]), &[a]).unwrap()
    };
    g.output("y", y);
    g.finish()
}

/// Best of several runs (the machine may be shared).
fn time(f: impl Fn()) -> Duration {
    f();
    (0..7)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn measure(g: &Graph, batches: &[usize], threads: usize, macs_per_sample: f64) {
    let w = weights(g, 1);
    let net = Compiled::new(g, &w, &Options { threads, portable: false, fuse: false, ..Default::default() }).unwrap();
    println!(
        "{} (threads {threads}): {} kernels, compiled in {:.1} ms, arena {} KiB/sample, chunk {}",
        g.name,
        net.kernel_count(),
        net.compile_time().as_secs_f64() * 1e3,
        net.arena_per_sample() * 4 / 1024,
        net.chunk()
    );
    for &n in batches {
        let xs = inputs(g, n, 2);
        let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
        let t = time(|| {
            net.run(&views).unwrap();
        });
        let gflops = 2.0 * macs_per_sample * n as f64 / t.as_secs_f64() / 1e9;
        println!("  batch {n:>4}: {:>9.3} ms  ({:.1} GFLOP/s)", t.as_secs_f64() * 1e3, gflops);
    }
}

fn macs(g: &Graph) -> f64 {
    g.node_ids()
        .into_iter()
        .map(|id| {
            let node = g.node(id);
            let ins: Vec<_> = g.operands(id).into_iter().map(|o| &g.node(o).ty).collect();
            node.op.def().macs(&ins, &node.ty) as f64
        })
        .sum()
}

#[test]
fn lenet_matches_interpreter() {
    let g = lenet();
    check("LeNet-5", &g, 5, 1);
    measure(&g, &[1, 64, 1000], 1, macs(&g));
    measure(&g, &[1000], 0, macs(&g));
}

#[test]
fn resnet_block_matches_interpreter() {
    for fused in [false, true] {
        // Small enough for the interpreter in a debug build.
        let g = resnet_block(16, 14, fused);
        check(&g.name, &g, 2, 3);
        let g = resnet_block(64, 56, fused);
        let w = weights(&g, 4);
        let xs = inputs(&g, 1, 5);
        let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
        let t = Instant::now();
        let want = interp::run(&g, &w, &views).unwrap();
        let interp_time = t.elapsed();
        let net = Compiled::new(&g, &w, &Options::default()).unwrap();
        let got = net.run(&views).unwrap();
        let e = error(&got[0], &want[0]);
        assert!(e <= TOL, "{}: worst error {e:e}", g.name);
        println!("{}: interpreter {:.1} ms for one sample", g.name, interp_time.as_secs_f64() * 1e3);
        measure(&g, &[1, 8], 1, macs(&g));
        measure(&g, &[8], 0, macs(&g));
    }
}
