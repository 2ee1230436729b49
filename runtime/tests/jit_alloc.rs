//! The memory plan's promise: once a compiled model has run at a batch size, running it
//! again allocates only the outputs — no arena, no per-kernel scratch, no copies of the
//! inputs. A counting global allocator (this test binary's own) measures the bytes that one
//! `Compiled::run` on the calling thread (`threads: 1` never spawns) allocates.

mod jit_common;

use cnnc_compiler::ops::{Activation, Epilogue, Op, Reduce, ReduceKind};
use cnnc_compiler::{Graph, GraphBuilder, TensorType};
use cnnc_runtime::{Compiled, Options};
use jit_common::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts what the current thread allocates while its flag is on.
struct Counting;

static BYTES: AtomicUsize = AtomicUsize::new(0);
static CALLS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static ON: Cell<bool> = const { Cell::new(false) };
}

fn count(size: usize) {
    if ON.try_with(Cell::get).unwrap_or(false) {
        BYTES.fetch_add(size, Ordering::Relaxed);
        CALLS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; counting touches only
// atomics and a const-initialised thread-local `Cell`, neither of which allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's contract for `alloc` is passed through.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: as for `alloc`; `ptr` and `layout` come from this allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// `(bytes, calls)` allocated on this thread by `f`.
fn allocations(f: impl FnOnce()) -> (usize, usize) {
    BYTES.store(0, Ordering::Relaxed);
    CALLS.store(0, Ordering::Relaxed);
    ON.with(|on| on.set(true));
    f();
    ON.with(|on| on.set(false));
    (BYTES.load(Ordering::Relaxed), CALLS.load(Ordering::Relaxed))
}

/// Conv–BN–ReLU, a conv with a fused residual and ReLU, pooling, a Linear head, and a
/// second output from a reduction: every kind of kernel and several intermediates.
fn net() -> Graph {
    let mut g = GraphBuilder::new("plan");
    let x = g.input("x", TensorType::new(vec![3, 16, 16]));
    let c1 = g.layer("c1", layer("Conv2d", &[int(3), int(16), int(3)], &[("padding", int(1))]), &[x]).unwrap();
    let bn = g.layer("bn", layer("BatchNorm2d", &[int(16)], &[]), &[c1]).unwrap();
    let r = g.layer("r", layer("ReLU", &[], &[]), &[bn]).unwrap();
    let fused = with_epilogue(
        layer("Conv2d", &[int(16), int(16), int(3)], &[("padding", int(1))]),
        Epilogue { scale_shift: false, residual: true, act: Some(Activation::Relu) },
    );
    let c2 = g.layer("c2", fused, &[r, r]).unwrap();
    let p = g.layer("p", layer("MaxPool2d", &[int(2)], &[]), &[c2]).unwrap();
    let a = g.layer("a", layer("AvgPool2d", &[int(2)], &[]), &[p]).unwrap();
    let f = g.layer("f", layer("Flatten", &[], &[]), &[a]).unwrap();
    let fc = g.layer("fc", layer("Linear", &[int(16 * 4 * 4), int(10)], &[]), &[f]).unwrap();
    let m =
        g.layer("m", Op::Reduce(Reduce { kind: ReduceKind::Max, dims: vec![2, 3], keepdim: false }), &[c2]).unwrap();
    g.output("logits", fc);
    g.output("peak", m);
    g.finish()
}

#[test]
fn a_steady_state_run_allocates_only_its_outputs() {
    let g = net();
    let w = weights(&g, 1);
    for portable in [false, true] {
        let model =
            Compiled::new(&g, &w, &Options { threads: 1, portable, fuse: false, ..Default::default() }).unwrap();
        for n in [1usize, 5, 64] {
            let x = random(&[n, 3, 16, 16], 2);
            model.run(&[x.view()]).unwrap();
            let mut outputs = vec![];
            let (bytes, calls) = allocations(|| outputs = model.run(&[x.view()]).unwrap());
            let out_bytes: usize = outputs.iter().map(|y| 4 * y.len()).sum();
            // The outputs, the `Vec` holding them, and small bookkeeping (shapes) — far
            // below one intermediate (16×16×16 floats = 16 KiB per sample).
            let slack = 1024;
            assert!(
                bytes <= out_bytes + slack,
                "portable {portable}, batch {n}: a run allocated {bytes} bytes in {calls} calls; the outputs are {out_bytes}"
            );
            assert!(calls <= 4 * outputs.len() + 4, "portable {portable}, batch {n}: {calls} allocations");
        }
    }
}
