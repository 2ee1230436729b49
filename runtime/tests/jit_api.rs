//! The `Compiled` API: sharing across threads, thread counts, batch sizes beyond one chunk,
//! and errors on bad graphs, weights and inputs.

mod jit_common;

use cnnc_compiler::ops::{Epilogue, Op};
use cnnc_compiler::{Graph, GraphBuilder, TensorType};
use cnnc_runtime::{Compiled, Error, Kernels, Options};
use jit_common::*;
use ndarray::{ArrayD, Axis, IxDyn};

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Compiled>();
};

/// A small residual CNN: conv–bn–relu, conv with a fused residual and ReLU, pool, linear.
fn small_net() -> Graph {
    let mut g = GraphBuilder::new("small");
    let x = g.input("x", TensorType::new(vec![3, 12, 12]));
    let c1 = g.layer("c1", layer("Conv2d", &[int(3), int(8), int(3)], &[("padding", int(1))]), &[x]).unwrap();
    let bn = g.layer("bn", layer("BatchNorm2d", &[int(8)], &[]), &[c1]).unwrap();
    let r = g.layer("r", layer("ReLU", &[], &[]), &[bn]).unwrap();
    let fused = with_epilogue(
        layer("Conv2d", &[int(8), int(8), int(3)], &[("padding", int(1))]),
        Epilogue { scale_shift: true, residual: true, act: Some(cnnc_compiler::ops::Activation::Relu) },
    );
    let c2 = g.layer("c2", fused, &[r, r]).unwrap();
    let p = g.layer("p", layer("AdaptiveAvgPool2d", &[pair(2, 2)], &[]), &[c2]).unwrap();
    let f = g.layer("f", layer("Flatten", &[], &[]), &[p]).unwrap();
    let y = g.layer("fc", layer("Linear", &[int(32), int(5)], &[]), &[f]).unwrap();
    g.output("y", y);
    g.finish()
}

#[test]
fn matches_interpreter_across_chunks_and_thread_counts() {
    let g = small_net();
    let w = weights(&g, 3);
    for n in [1, 2, 3, 65, 130] {
        let xs = inputs(&g, n, 4);
        for threads in [1, 2, 3] {
            for portable in [false, true] {
                let e = jit_vs_interp(&g, &w, &xs, &Options { threads, portable, fuse: false, ..Default::default() });
                assert!(e <= TOL, "batch {n}, threads {threads}, portable {portable}: worst error {e:e}");
            }
        }
    }
}

#[test]
fn thread_count_does_not_change_results() {
    let g = small_net();
    let w = weights(&g, 5);
    let x = random(&[37, 3, 12, 12], 6);
    let one =
        Compiled::new(&g, &w, &Options { threads: 1, portable: false, fuse: false, ..Default::default() }).unwrap();
    let two =
        Compiled::new(&g, &w, &Options { threads: 2, portable: false, fuse: false, ..Default::default() }).unwrap();
    let all = Compiled::new(&g, &w, &Options { fuse: false, ..Options::default() }).unwrap();
    let a = one.run(&[x.view()]).unwrap();
    assert_eq!(a, two.run(&[x.view()]).unwrap());
    assert_eq!(a, all.run(&[x.view()]).unwrap());
    // The default (fused) model: also one result whatever the threads, and within rounding
    // of the graph as written.
    let fused1 = Compiled::new(&g, &w, &Options { threads: 1, ..Options::default() }).unwrap();
    let fused = Compiled::new(&g, &w, &Options::default()).unwrap().run(&[x.view()]).unwrap();
    assert_eq!(fused, fused1.run(&[x.view()]).unwrap());
    assert!(error(&fused[0], &a[0]) <= TOL, "fused vs unfused: {}", error(&fused[0], &a[0]));
    // Each sample computed alone gives the same bits as within the batch.
    for i in [0, 17, 36] {
        let xi = x.index_axis(Axis(0), i).insert_axis(Axis(0)).to_owned();
        let yi = one.run(&[xi.view()]).unwrap().remove(0);
        assert_eq!(yi.index_axis(Axis(0), 0), a[0].index_axis(Axis(0), i));
    }
}

#[test]
fn one_compiled_model_shared_by_four_threads() {
    let g = small_net();
    let w = weights(&g, 7);
    let net =
        Compiled::new(&g, &w, &Options { threads: 2, portable: false, fuse: false, ..Default::default() }).unwrap();
    let batches: Vec<ArrayD<f32>> = (0..4).map(|t| random(&[1 + 5 * t, 3, 12, 12], 100 + t as u64)).collect();
    let expected: Vec<ArrayD<f32>> = batches.iter().map(|x| net.run(&[x.view()]).unwrap().remove(0)).collect();
    std::thread::scope(|s| {
        for (x, want) in batches.iter().zip(&expected) {
            let net = &net;
            s.spawn(move || {
                for _ in 0..25 {
                    assert_eq!(&net.run(&[x.view()]).unwrap()[0], want);
                }
            });
        }
    });
}

#[test]
fn nan_and_inf_inputs_propagate() {
    let g = small_net();
    let w = weights(&g, 8);
    let mut x = random(&[2, 3, 12, 12], 9);
    x[[0, 1, 5, 5]] = f32::NAN;
    x[[1, 2, 0, 0]] = f32::INFINITY;
    let e = jit_vs_interp(&g, &w, &[x], &Options::default());
    assert!(e <= TOL, "worst error {e:e}");
}

#[test]
fn bad_inputs_are_errors() {
    let g = small_net();
    let w = weights(&g, 1);
    let net = Compiled::new(&g, &w, &Options::default()).unwrap();
    let x = random(&[2, 3, 12, 12], 1);
    assert!(matches!(net.run(&[]), Err(Error::InputCount { expected: 1, got: 0, .. })));
    assert!(matches!(net.run(&[x.view(), x.view()]), Err(Error::InputCount { .. })));
    let wrong = random(&[2, 3, 12, 11], 1);
    assert!(matches!(net.run(&[wrong.view()]), Err(Error::InputShape { .. })));
    let flat = random(&[2, 432], 1);
    assert!(matches!(net.run(&[flat.view()]), Err(Error::InputShape { .. })));
    let empty = ArrayD::<f32>::zeros(IxDyn(&[0, 3, 12, 12]));
    assert!(matches!(net.run(&[empty.view()]), Err(Error::Batch { batch: 0, .. })));
    let t = random(&[12, 12, 3, 2], 1);
    let transposed = t.view().reversed_axes();
    assert!(matches!(net.run(&[transposed]), Err(Error::NonContiguous { .. })));
}

#[test]
fn bad_graphs_and_weights_are_errors() {
    let g = small_net();
    let other = one_layer(&[3], layer("Linear", &[int(3), int(2)], &[]));
    let w_other = weights(&other, 1);
    assert!(matches!(Compiled::new(&g, &w_other, &Options::default()), Err(Error::Weights(_))));
    // A node whose recorded type disagrees with its shape rule fails verification.
    let mut gb = GraphBuilder::new("broken");
    let x = gb.input("x", TensorType::new(vec![4]));
    let y =
        gb.push("relu", Op::Activation(cnnc_compiler::ops::Activation::Relu), TensorType::new(vec![5]), vec![], &[x]);
    gb.output("y", y);
    let broken = gb.finish();
    let wb = weights(&broken, 0);
    assert!(matches!(Compiled::new(&broken, &wb, &Options::default()), Err(Error::Graph(_))));
}

#[test]
fn reports_kernels_and_compile_time() {
    let g = small_net();
    let w = weights(&g, 0);
    let net =
        Compiled::new(&g, &w, &Options { threads: 1, portable: true, fuse: false, ..Default::default() }).unwrap();
    // conv, bn, relu, fused conv, pool, linear (Flatten is an alias).
    assert_eq!(net.kernel_count(), 6);
    assert_eq!(net.data_movement_count(), 0, "the portable code is all plain NCHW");
    assert!(net.compile_time() > std::time::Duration::ZERO);
    // Peak of two live 8×12×12 buffers, reused down the chain.
    assert_eq!(net.arena_per_sample(), 2 * 8 * 12 * 12);
    // With micro-kernels both convs (3 → 8 and 8 → 8 channels, stride 1) put pixels in the
    // vector lanes and keep the plain layout, each reading a zero-padded copy of its
    // operand.
    let unfused = Options { fuse: false, ..Options::default() };
    if let Ok(net) = Compiled::with_kernels(&g, &w, &unfused, cnnc_runtime::Kernels::Avx2) {
        assert_eq!((net.kernel_count(), net.data_movement_count()), (6, 2));
        // Peak at the fused conv: its operand (8×12×12), its padded copy (8×14×14 and a
        // vector's slack for the last row's loads) and its result (8×12×12).
        assert_eq!(net.arena_per_sample(), 8 * 12 * 12 + (8 * 14 * 14 + 64) + 8 * 12 * 12);
    }
}

#[test]
fn fixed_batch_nets() {
    use cnnc_compiler::Batch;
    let mut gb = GraphBuilder::new("fixed");
    let x = gb.input("x", TensorType { batch: Batch::Fixed(2), dims: vec![3, 6, 6] });
    let c = gb.layer("c", layer("Conv2d", &[int(3), int(4), int(3)], &[("padding", int(1))]), &[x]).unwrap();
    gb.output("y", c);
    let g = gb.finish();
    check("fixed batch", &g, 2, 1);
    let net = Compiled::new(&g, &weights(&g, 1), &Options::default()).unwrap();
    let wrong = random(&[3, 3, 6, 6], 1);
    assert!(matches!(net.run(&[wrong.view()]), Err(Error::InputShape { .. })));

    // A fixed batch next to a symbolic one cannot share one per-sample plan.
    let mut gb = GraphBuilder::new("mixed");
    let a = gb.input("a", TensorType { batch: Batch::Fixed(2), dims: vec![4] });
    let b2 = gb.input("b", TensorType::new(vec![4]));
    let ra = gb.layer("ra", layer("ReLU", &[], &[]), &[a]).unwrap();
    let rb = gb.layer("rb", layer("ReLU", &[], &[]), &[b2]).unwrap();
    gb.output("ra", ra);
    gb.output("rb", rb);
    let g = gb.finish();
    assert!(matches!(Compiled::new(&g, &weights(&g, 0), &Options::default()), Err(Error::Unsupported(_))));
}

/// `Compiled::from_owned` packs Linear weights in their own memory where the packed layout
/// has their size (a flattened blocked map of 32 channels: the features permuted; 64 or
/// 48 outputs) and copies them otherwise (20 channels: padding lanes; 70 or 10 outputs);
/// every case gives what `Compiled::new` gives, bit for bit, on each micro-kernel ISA the
/// host has, fused or not, on one thread or two (big layers are packed on the threads).
#[test]
fn owned_weights_are_packed_in_place_bit_for_bit() {
    let mut cases = vec![];
    for (c2, o1, o2) in [(32, 64, 48), (20, 70, 10), (32, 70, 16), (16, 48, 10)] {
        let src = format!(
            "net Owned(x: [N, 3, 6, 6]) = Sequential(Conv2d(3, {c2}, 3, padding = 1), ReLU(), Flatten(), Linear({}, {o1}), ReLU(), Linear({o1}, {o2}));",
            c2 * 36
        );
        cases.push(src);
    }
    cases.push("net Plain(x: [N, 100]) = Sequential(Linear(100, 64), ReLU(), Linear(64, 10));".to_string());
    for src in &cases {
        let out = cnnc_compiler::dsl::compile_str(src);
        assert!(!out.has_errors(), "{src}");
        let g = out.nets[0].clone();
        let w = weights(&g, 11);
        let x = inputs(&g, 5, 12);
        let views: Vec<_> = x.iter().map(|a| a.view()).collect();
        for kernels in [Kernels::Avx512, Kernels::Avx2, Kernels::Portable] {
            for (threads, fuse) in [(1, true), (2, true), (1, false)] {
                let o = Options { threads, fuse, ..Options::default() };
                let Ok(borrowed) = Compiled::with_kernels(&g, &w, &o, kernels) else { continue };
                let owned = Compiled::from_owned_with_kernels(&g, w.clone(), &o, kernels).unwrap();
                let (a, b) = (borrowed.run(&views).unwrap(), owned.run(&views).unwrap());
                assert_eq!(a, b, "{src}: {kernels:?}, {threads} thread(s), fuse {fuse}");
                if !fuse {
                    // New weights reach the in-place buffers too.
                    let w2 = weights(&g, 13);
                    let mut owned = owned;
                    owned.set_weights(&w2).unwrap();
                    let fresh = Compiled::with_kernels(&g, &w2, &o, kernels).unwrap();
                    assert_eq!(owned.run(&views).unwrap(), fresh.run(&views).unwrap(), "{src}: set_weights");
                }
            }
        }
    }
}
