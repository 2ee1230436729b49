//! Property tests: random Conv2d, pooling and Linear configurations (kernel 1–5, stride 1–3,
//! padding 0–2, dilation 1–2, groups dividing the channels, every padding mode, sizes 1–12,
//! batch 1–3), AdaptiveAvgPool2d output sizes (smaller, equal, larger than the input, or
//! `None`) and mean/max reductions over random dims, with random inputs; the JIT must match
//! the interpreter. Configurations the layer or its shape rule rejects are skipped.

mod jit_common;

use cnnc_compiler::ops::args::ArgValue;
use cnnc_compiler::ops::{Activation, Epilogue, Op, Reduce, ReduceKind};
use cnnc_runtime::Options;
use jit_common::*;
use proptest::prelude::*;

const CASES: u32 = 64;

fn compare(g: &cnnc_compiler::Graph, n: usize, seed: u64, portable: bool, threads: usize) -> Result<(), TestCaseError> {
    let w = weights(g, seed);
    let xs = inputs(g, n, seed ^ 0xabc);
    let e = jit_vs_interp(g, &w, &xs, &Options { threads, portable, fuse: false, ..Default::default() });
    prop_assert!(e <= TOL, "worst error {e:e} > {TOL:e} at batch {n}\n{g}");
    Ok(())
}

fn act(i: u8) -> Option<Activation> {
    [
        None,
        Some(Activation::Relu),
        Some(Activation::Sigmoid),
        Some(Activation::Tanh),
        Some(Activation::hardtanh(-0.5, 0.75)),
        Some(Activation::LeakyRelu(cnnc_compiler::ops::Limit::new(0.1))),
    ][usize::from(i % 6)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn conv_matches_interpreter(
        groups in 1usize..=3, icg in 1usize..=3, ocg in 1usize..=6,
        kh in 1usize..=5, kw in 1usize..=5, sh in 1usize..=3, sw in 1usize..=3,
        ph in 0usize..=2, pw in 0usize..=2, dh in 1usize..=2, dw in 1usize..=2,
        mode in 0usize..4, same in any::<bool>(), bias in any::<bool>(),
        h in 1usize..=12, w in 1usize..=12, n in 1usize..=3,
        scale_shift in any::<bool>(), a in 0u8..4,
        seed in any::<u64>(), portable in any::<bool>(),
    ) {
        let (cin, cout) = (groups * icg, groups * ocg);
        let modes = ["zeros", "reflect", "replicate", "circular"];
        let padding = if same && (sh, sw) == (1, 1) { s("same") } else { pair(ph as i64, pw as i64) };
        let op = try_layer(
            "Conv2d",
            &[int(cin as i64), int(cout as i64), pair(kh as i64, kw as i64)],
            &[
                ("stride", pair(sh as i64, sw as i64)),
                ("padding", padding),
                ("dilation", pair(dh as i64, dw as i64)),
                ("groups", int(groups as i64)),
                ("bias", b(bias)),
                ("padding_mode", s(modes[mode])),
            ],
        );
        prop_assume!(op.is_some());
        let op = with_epilogue(op.unwrap(), Epilogue { scale_shift, residual: false, act: act(a) });
        let g = try_one_layer(&[cin, h, w], op);
        prop_assume!(g.is_some());
        compare(&g.unwrap(), n, seed, portable, 1 + n % 2)?;
    }

    #[test]
    fn pooling_matches_interpreter(
        max in any::<bool>(), kh in 1usize..=5, kw in 1usize..=5, sh in 1usize..=3, sw in 1usize..=3,
        ph in 0usize..=2, pw in 0usize..=2, dh in 1usize..=2, dw in 1usize..=2,
        ceil in any::<bool>(), cip in any::<bool>(),
        c in 1usize..=3, h in 1usize..=12, w in 1usize..=12, n in 1usize..=3, seed in any::<u64>(),
    ) {
        let mut kwargs: Vec<(&str, ArgValue)> = vec![
            ("stride", pair(sh as i64, sw as i64)),
            ("padding", pair(ph as i64, pw as i64)),
            ("ceil_mode", b(ceil)),
        ];
        if max {
            kwargs.push(("dilation", pair(dh as i64, dw as i64)));
        } else {
            kwargs.push(("count_include_pad", b(cip)));
        }
        let op = try_layer(if max { "MaxPool2d" } else { "AvgPool2d" }, &[pair(kh as i64, kw as i64)], &kwargs);
        prop_assume!(op.is_some());
        let g = try_one_layer(&[c, h, w], op.unwrap());
        prop_assume!(g.is_some());
        compare(&g.unwrap(), n, seed, false, 1)?;
    }

    #[test]
    fn adaptive_avg_pool_matches_interpreter(
        c in 1usize..=3, h in 1usize..=12, w in 1usize..=12,
        oh in prop::option::of(1usize..=9), ow in prop::option::of(1usize..=9),
        n in 1usize..=3, seed in any::<u64>(),
    ) {
        let size = |v: Option<usize>| v.map_or(ArgValue::None, |v| int(v as i64));
        let op = try_layer("AdaptiveAvgPool2d", &[ArgValue::Tuple(vec![size(oh), size(ow)])], &[]);
        prop_assume!(op.is_some());
        let g = try_one_layer(&[c, h, w], op.unwrap());
        prop_assume!(g.is_some());
        compare(&g.unwrap(), n, seed, seed % 2 == 0, 1 + n % 2)?;
    }

    #[test]
    fn reductions_match_interpreter(
        dims in prop::collection::btree_set(1usize..=3, 1..=3), keepdim in any::<bool>(), max in any::<bool>(),
        c in 1usize..=5, h in 1usize..=9, w in 1usize..=9, n in 1usize..=3, seed in any::<u64>(),
    ) {
        let kind = if max { ReduceKind::Max } else { ReduceKind::Mean };
        let op = Op::Reduce(Reduce { kind, dims: dims.into_iter().collect(), keepdim });
        let g = try_one_layer(&[c, h, w], op);
        prop_assume!(g.is_some());
        compare(&g.unwrap(), n, seed, seed % 2 == 0, 1)?;
    }

    #[test]
    fn linear_matches_interpreter(
        k in 1usize..=40, o in 1usize..=20, rows in 1usize..=3, bias in any::<bool>(),
        scale_shift in any::<bool>(), a in 0u8..4, n in 1usize..=7, seed in any::<u64>(), portable in any::<bool>(),
    ) {
        let op = with_epilogue(
            layer("Linear", &[int(k as i64), int(o as i64)], &[("bias", b(bias))]),
            Epilogue { scale_shift, residual: false, act: act(a) },
        );
        let dims = if rows == 1 { vec![k] } else { vec![rows, k] };
        compare(&one_layer(&dims, op), n, seed, portable, 1)?;
    }
}
