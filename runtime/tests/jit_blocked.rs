//! Nets whose values change layout between the plain NCHW of inputs and outputs and the
//! blocked NCHW16c of the micro-kernels: chains of convolutions with channel counts that
//! leave padding lanes, pooling, BatchNorm, adds, concatenations (aligned and not),
//! flattening into a Linear or into anything else, grouped convolutions, reductions, values
//! that are both an output and an operand — each against the reference interpreter, with
//! every micro-kernel ISA the host has, at batch 1 and 3, on one thread and on two threads
//! splitting every kernel that can be split.

mod jit_common;

use cnnc_compiler::ops::{Epilogue, Op};
use cnnc_compiler::{Graph, GraphBuilder, NodeId, TensorType};
use cnnc_runtime::{Kernels, Options, interp};
use jit_common::*;

/// Compares the JIT with the interpreter; returns how many micro-kernel ISAs ran.
fn check_blocked(what: &str, g: &Graph) -> usize {
    let w = weights(g, 11);
    let mut ran = 0;
    for n in [1, 3] {
        let xs = inputs(g, n, 5);
        let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
        let want = interp::run(g, &w, &views).unwrap();
        for kernels in [Kernels::Avx512, Kernels::Avx2] {
            for threads in [1, 2] {
                let opts = Options { threads, portable: false, fuse: false, ..Default::default() };
                let Some(net) = compile_split(what, g, &w, &opts, kernels) else { continue };
                ran += 1;
                let got = net.run(&views).unwrap();
                for (a, b) in got.iter().zip(&want) {
                    let e = error(a, b);
                    assert!(e <= TOL, "{what} (batch {n}, {kernels:?}, {threads} threads): error {e:e}\n{g}");
                }
            }
        }
    }
    ran
}

fn conv(
    b: &mut GraphBuilder,
    name: &str,
    x: NodeId,
    cin: usize,
    cout: usize,
    k: usize,
    kw: &[(&str, cnnc_compiler::ops::args::ArgValue)],
) -> NodeId {
    b.layer(name, layer("Conv2d", &[int(cin as i64), int(cout as i64), int(k as i64)], kw), &[x]).unwrap()
}

fn op(b: &mut GraphBuilder, name: &str, o: Op, xs: &[NodeId]) -> NodeId {
    b.layer(name, o, xs).unwrap()
}

#[test]
fn a_chain_through_every_blocked_kernel() {
    let mut gb = GraphBuilder::new("chain");
    let x = gb.input("x", TensorType::new(vec![3, 23, 21]));
    let c1 = conv(&mut gb, "c1", x, 3, 6, 3, &[("padding", int(1))]);
    let s1 = op(&mut gb, "s1", layer("Sigmoid", &[], &[]), &[c1]);
    let p1 = op(
        &mut gb,
        "p1",
        layer("MaxPool2d", &[int(3)], &[("stride", int(2)), ("padding", int(1)), ("ceil_mode", b(true))]),
        &[s1],
    );
    let c2 = conv(&mut gb, "c2", p1, 6, 20, 3, &[("dilation", int(2)), ("padding", int(2))]);
    let bn = op(&mut gb, "bn", layer("BatchNorm2d", &[int(20)], &[]), &[c2]);
    let r = op(&mut gb, "r", layer("ReLU", &[], &[]), &[bn]);
    let p2 = op(
        &mut gb,
        "p2",
        layer(
            "AvgPool2d",
            &[int(3)],
            &[("stride", int(2)), ("padding", int(1)), ("ceil_mode", b(true)), ("count_include_pad", b(false))],
        ),
        &[r],
    );
    let c3 = conv(&mut gb, "c3", p2, 20, 40, 3, &[("padding", int(1)), ("padding_mode", s("reflect"))]);
    let t = op(&mut gb, "t", layer("Tanh", &[], &[]), &[c3]);
    let a = op(&mut gb, "a", layer("AdaptiveAvgPool2d", &[pair(3, 2)], &[]), &[t]);
    let f = op(&mut gb, "f", layer("Flatten", &[], &[]), &[a]);
    let y = op(&mut gb, "fc", layer("Linear", &[int(240), int(7)], &[]), &[f]);
    gb.output("y", y);
    assert!(check_blocked("chain", &gb.finish()) > 0 || !cfg!(target_arch = "x86_64"));
}

#[test]
fn adds_concats_outputs_and_reshapes() {
    let mut gb = GraphBuilder::new("dag");
    let x = gb.input("x", TensorType::new(vec![16, 12, 12]));
    let c1 = conv(&mut gb, "c1", x, 16, 16, 3, &[("padding", int(1))]);
    let c2 = conv(&mut gb, "c2", x, 16, 16, 1, &[]);
    let sum = op(&mut gb, "sum", Op::Add(cnnc_compiler::ops::Add), &[c1, c2]);
    let c3 = conv(&mut gb, "c3", sum, 16, 5, 3, &[("padding", int(1)), ("padding_mode", s("circular"))]);
    // Aligned (16 + 16 + 5): stays blocked.
    let cat = op(&mut gb, "cat", cnnc_compiler::ops::Op::Concat(cnnc_compiler::ops::Concat { dim: 1 }), &[c1, c2, c3]);
    let c4 = conv(
        &mut gb,
        "c4",
        cat,
        37,
        24,
        3,
        &[("stride", int(2)), ("padding", int(1)), ("padding_mode", s("replicate"))],
    );
    // Unaligned (5 + 5): plain.
    let cat2 = op(&mut gb, "cat2", cnnc_compiler::ops::Op::Concat(cnnc_compiler::ops::Concat { dim: 1 }), &[c3, c3]);
    // Blocked + plain: the plain input is reordered.
    let mixed = op(&mut gb, "mixed", Op::Add(cnnc_compiler::ops::Add), &[c1, x]);
    let f = op(&mut gb, "f", layer("Flatten", &[], &[]), &[c4]);
    let act = op(&mut gb, "act", layer("ReLU", &[], &[]), &[f]);
    let m = op(
        &mut gb,
        "m",
        cnnc_compiler::ops::Op::Reduce(cnnc_compiler::ops::Reduce {
            kind: cnnc_compiler::ops::ReduceKind::Mean,
            dims: vec![2, 3],
            keepdim: false,
        }),
        &[c4],
    );
    gb.output("flat", act);
    gb.output("cat2", cat2);
    gb.output("mixed", mixed);
    gb.output("mean", m);
    gb.output("c1", c1);
    check_blocked("dag", &gb.finish());
}

#[test]
fn grouped_convolutions_block_only_whole_blocks() {
    let mut gb = GraphBuilder::new("groups");
    let x = gb.input("x", TensorType::new(vec![32, 10, 10]));
    let g2 = conv(&mut gb, "g2", x, 32, 48, 3, &[("groups", int(2)), ("padding", int(1))]);
    // Not whole blocks per group: the plain code, fed by a reorder.
    let dw = conv(&mut gb, "dw", g2, 48, 48, 3, &[("groups", int(48)), ("padding", int(1))]);
    let c = conv(&mut gb, "c", dw, 48, 64, 1, &[]);
    gb.output("y", c);
    check_blocked("groups", &gb.finish());
}

#[test]
fn fused_epilogues_on_blocked_tiles() {
    use cnnc_compiler::ops::Activation;
    for e in [
        Epilogue { scale_shift: true, residual: true, act: Some(Activation::Relu) },
        Epilogue { scale_shift: false, residual: true, act: Some(Activation::Sigmoid) },
        Epilogue { scale_shift: true, residual: false, act: Some(Activation::Tanh) },
    ] {
        let mut gb = GraphBuilder::new("fused");
        let x = gb.input("x", TensorType::new(vec![20, 9, 30]));
        let c1 = conv(&mut gb, "c1", x, 20, 70, 3, &[("padding", int(1))]);
        let o = with_epilogue(
            layer("Conv2d", &[int(70), int(70), int(3)], &[("padding", int(1)), ("bias", b(false))]),
            e.clone(),
        );
        let xs: Vec<NodeId> = if e.residual { vec![c1, c1] } else { vec![c1] };
        let c2 = op(&mut gb, "c2", o, &xs);
        let f = op(&mut gb, "f", layer("Flatten", &[], &[]), &[c2]);
        let lin = with_epilogue(
            layer("Linear", &[int(70 * 9 * 30), int(33)], &[]),
            Epilogue { act: e.act, ..Epilogue::default() },
        );
        let y = op(&mut gb, "fc", lin, &[f]);
        gb.output("y", y);
        check_blocked(&format!("{e:?}"), &gb.finish());
    }
}

#[test]
fn few_filters_on_a_plain_input_put_pixels_in_the_lanes() {
    use cnnc_compiler::ops::Activation;
    // (input, in → out, kernel, keywords): LeNet's first layer, a dilated one, the seed's
    // 1×2 edge detector, rows wider than one call, every output channel count to 8.
    type Case = (Vec<usize>, usize, usize, usize, Vec<(&'static str, cnnc_compiler::ops::args::ArgValue)>);
    let cases: Vec<Case> = vec![
        (vec![1, 28, 28], 1, 6, 5, vec![("padding", int(2))]),
        (vec![3, 13, 11], 3, 8, 3, vec![("padding", int(2)), ("dilation", int(2))]),
        (vec![2, 9, 100], 2, 7, 3, vec![("padding", int(1))]),
        (vec![5, 6, 7], 5, 1, 2, vec![]),
        (vec![4, 6, 33], 4, 3, 3, vec![("padding", s("same")), ("bias", b(false))]),
    ];
    for (dims, cin, cout, k, kw) in cases {
        for e in [
            Epilogue::default(),
            Epilogue { act: Some(Activation::Sigmoid), ..Epilogue::default() },
            Epilogue { scale_shift: true, residual: true, act: Some(Activation::Relu) },
        ] {
            let op =
                with_epilogue(layer("Conv2d", &[int(cin as i64), int(cout as i64), int(k as i64)], &kw), e.clone());
            let g = if e.residual { one_layer_residual(&dims, op) } else { one_layer(&dims, op) };
            check_blocked(&format!("Conv2d({cin}, {cout}, {k}) {kw:?} {e:?} on {dims:?}"), &g);
        }
    }
}
