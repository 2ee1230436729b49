//! Hostile and malformed sources: each gives diagnostics (an error naming the problem), never
//! a panic, an integer overflow, a stack overflow or an endless expansion. Every case runs on
//! a thread with a 2 MiB stack, a quarter of what `cnnc` and rustc give the compiler.

use cnnc_compiler::dsl::ast::MAX_NESTING;
use cnnc_compiler::dsl::compile_str;

/// Compiles `src` on a small-stack thread; returns the number of nets that checked clean and
/// every error message. A panic fails the test.
fn compile(src: String) -> (usize, Vec<String>) {
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            let out = compile_str(&src);
            (out.nets.len(), out.errors().map(|d| d.full_message()).collect())
        })
        .expect("thread starts")
        .join()
        .unwrap_or_else(|_| panic!("the compiler panicked"))
}

/// Asserts that `src` fails with an error containing `needle`.
#[track_caller]
fn rejects(src: impl Into<String>, needle: &str) {
    let src = src.into();
    let (nets, errors) = compile(src.clone());
    assert!(errors.iter().any(|e| e.contains(needle)), "`{needle}` not among the errors {errors:?} of\n{src}");
    assert_eq!(nets, 0, "{src}");
}

/// Asserts that `src` compiles clean.
#[track_caller]
fn accepts(src: impl Into<String>) {
    let src = src.into();
    let (nets, errors) = compile(src.clone());
    assert!(errors.is_empty() && nets == 1, "{errors:?} for\n{src}");
}

#[test]
fn text_that_is_not_a_net() {
    let (nets, errors) = compile(String::new());
    assert_eq!((nets, errors.len()), (0, 0), "an empty file declares nothing");
    rejects("\u{1}\u{2}@@@ ### $$$", "cannot tokenize");
    rejects("net A(x: [N, 4]) = Sequential(((((ReLU);", "cannot tokenize");
    rejects("/* unterminated", "cannot tokenize");
    rejects("\"unterminated", "cannot tokenize");
    rejects("}", "cannot tokenize");
    rejects("fn main() {}", "expected `net Name(x: [N, C, H, W]) …`");
    rejects("net A(x: [N, 4]) { println!(\"hi\"); fn forward(self, x) { x } }", "macros are not supported");
}

#[test]
fn nonsensical_layer_arguments() {
    rejects("net A(x: [N, 1, 8, 8]) = Sequential(Conv2d(0, 0, 0));", "`in_channels` must be positive, found 0");
    rejects("net A(x: [N, 1, 8, 8]) = Sequential(Conv2d(0, 0, 0));", "`kernel_size` must be positive, found 0");
    rejects(
        "net A(x: [N, 1, 8, 8]) = Sequential(Conv2d(-1, -6, -3, stride = -2, padding = -1));",
        "`padding` must be non-negative, found -1",
    );
    rejects("net A(x: [N, 4, 8, 8]) = Sequential(Conv2d(4, 4, 3, groups = 0));", "`groups` must be positive, found 0");
    rejects("net A(x: [N, 1, 8, 8]) = Sequential(BatchNorm2d(0));", "`num_features` must be positive, found 0");
    rejects("net A(x: [N, 4]) = Sequential(Dropout(0.0 / 0.0));", "p must be in [0, 1], found NaN");
    rejects("net A(x: [N, 4]) = Sequential(Dropout(1e999));", "found inf");
    rejects("net A(x: [N, 1, 8, 8]) = Sequential(AdaptiveAvgPool2d(0));", "output sizes must be positive");
    rejects("net A(x: [N, -1, 8, 8]) = Sequential(ReLU);", "invalid digit");
    rejects("net A(x: [0, 4]) = Sequential(ReLU);", "the batch size must be positive");
    rejects("net A(x: [N, 1, 999999999999999999999999, 4]) = Sequential(ReLU);", "number too large");
}

#[test]
fn huge_sizes_are_errors_not_overflows() {
    let limit = "the limit is 4,294,967,295";
    rejects("net A(x: [N, 1, 99999999999, 99999999999]) = Sequential(Conv2d(1, 6, 5));", limit);
    rejects("net A(x: [N, 99999, 99999, 99999]) = Sequential(ReLU);", "input `x` has 99999×99999×99999 elements");
    rejects("net A(x: [N, 65536, 65536]) = Sequential(Flatten, Linear(4, 2));", "65536×65536 elements");
    rejects("net A(x: [N, 1, 8, 8]) = Sequential(Conv2d(1, 99999999999, 3));", "`out_channels` = 99999999999");
    rejects("net A(x: [N, 1, 8, 8]) = Sequential(Conv2d(1, 1, 3, padding = 9223372036854775807));", limit);
    rejects("net A(x: [N, 1, 8, 8]) = Sequential(Conv2d(1, 1, 3, dilation = 9223372036854775807));", limit);
    rejects("net A(x: [N, 1, 8, 8]) = Sequential(AdaptiveAvgPool2d(99999999999));", "output size 99999999999");
    // Within the per-argument limit, but the weight or the output is too large.
    rejects("net A(x: [N, 100000]) = Sequential(Linear(100000, 100000));", "`weight` of 100000×100000 elements");
    rejects("net A(x: [N, 1, 65536, 2]) = Sequential(Conv2d(1, 65536, 1));", "output has 65536×65536×2 elements");
    rejects("net A(x: [N, 1, 8, 8]) = Sequential(AdaptiveAvgPool2d((65536, 65536)));", "output has 1×65536×65536");
    // The largest window extent (dilation × (kernel − 1) + 1) still prints exact arithmetic.
    rejects(
        "net A(x: [N, 1, 8, 8]) = Sequential(MaxPool2d(3, stride = 1, dilation = 4294967295));",
        "the output height would be -8589934582 ≤ 0",
    );
}

#[test]
fn integer_arithmetic_overflow_is_an_error() {
    let overflow = "does not fit in 64 bits";
    for expr in [
        "9223372036854775807 * 2",
        "9223372036854775807 + 1",
        "-9223372036854775807 - 2",
        "-(-9223372036854775807 - 1)",
        "(-9223372036854775807 - 1) / -1",
        "(-9223372036854775807 - 1) % -1",
    ] {
        rejects(format!("net A(x: [N, 4]) = Sequential(Linear(4, {expr}));"), overflow);
    }
    rejects("net A(x: [N, 4]) = Sequential(Linear(4, 2 / 0));", "division by zero");
    rejects(
        "block b() { for i in -9223372036854775807..9223372036854775807 { ReLU(); } } net A(x: [N, 4]) = b();",
        "loop of 18446744073709551614 iterations is too long to unroll",
    );
    rejects("block b() { for i in 0..=9223372036854775807 { ReLU(); } } net A(x: [N, 4]) = b();", "too long to unroll");
}

/// Makes a source nested `n` levels deep.
type Maker = fn(usize) -> String;

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    let too_deep = "nests too deeply";
    // Shapes of recursion: brackets, prefix operators, operator chains, method chains,
    // calls, nested Sequentials, else-if chains and blocks.
    let shapes: [(&str, Maker); 8] = [
        ("parens", |n| format!("net A(x: [N, 4]) = Sequential(Linear(4, {}2{}));", "(".repeat(n), ")".repeat(n))),
        ("neg", |n| format!("net A(x: [N, 4]) = Sequential(Linear(4, {}2));", "- - ".repeat(n / 2))),
        ("add", |n| format!("net A(x: [N, 4]) = Sequential(Linear(4, 1{}));", " + 0".repeat(n))),
        ("seq", |n| format!("net A(x: [N, 4]) = {}ReLU{};", "Sequential(".repeat(n), ")".repeat(n))),
        ("methods", |n| format!("net A(x: [N, 4]) {{ fn forward(self, x) {{ x{} }} }}", ".relu()".repeat(n))),
        ("calls", |n| {
            format!("net A(x: [N, 4]) {{ fn forward(self, x) {{ {}x{} }} }}", "relu(".repeat(n), ")".repeat(n))
        }),
        ("else-if", |n| {
            format!(
                "block b() {{ if False {{ ReLU(); }} {} ReLU(); }} net A(x: [N, 4]) = b();",
                "else if False {} ".repeat(n)
            )
        }),
        ("braces", |n| {
            format!("block b() {{ {} ReLU(); {} }} net A(x: [N, 4]) = b();", "{ ".repeat(n), "} ".repeat(n))
        }),
    ];
    for (name, make) in shapes {
        // The deepest source the limit lets through compiles on the small stack…
        let mut n = 1;
        while compile(make(n + 1)).1.iter().all(|e| !e.contains(too_deep)) {
            n += 1;
        }
        assert!(n >= MAX_NESTING / 5, "{name}: only {n} levels pass");
        accepts(make(n));
        // …and one a hundred times deeper is refused before it is parsed.
        rejects(make(100 * MAX_NESTING), too_deep);
    }
    // Blocks that expand into themselves stop at a fixed depth.
    rejects("block b(n) = Sequential(b(n + 1)); net A(x: [N, 4]) = b(0);", "expands too deeply");
    accepts(
        "block b(n) { if n > 0 { c = b(n - 1); } fn forward(self, x) { if n > 0 { x = self.c(x); } relu(x) } } net A(x: [N, 4]) = b(60);",
    );
}

#[test]
fn endless_expansion_is_cut_off() {
    let budget = "the file expands to more than 100,000";
    rejects("block b() { for i in 0..4000 { for j in 0..4000 { ReLU(); } } } net A(x: [N, 4]) = b();", budget);
    // Blocks and forwards that double at each level: 2^40 layers or calls.
    rejects(
        "block b(n) = if n > 0 { Sequential(b(n - 1), b(n - 1)) } else { ReLU() }; net A(x: [N, 4]) = b(40);",
        budget,
    );
    rejects(
        "block b(n) { if n > 0 { c = b(n - 1); } fn forward(self, x) { if n > 0 { x = self.c(self.c(x)); } relu(x) } } \
         net A(x: [N, 4]) = b(40);",
        budget,
    );
    // The same shapes, small, are fine.
    accepts("block b(n) = if n > 0 { Sequential(b(n - 1), b(n - 1)) } else { ReLU() }; net A(x: [N, 4]) = b(8);");
}

#[test]
fn misuse_inside_forward_is_explained() {
    rejects(
        "net A(x: [N, 4]) { fn forward(self, x) { Linear(4, 2)(x) } }",
        "`Linear(4, 2)` is created inside forward; declare it before `fn forward` (`layer = Linear(4, 2);`)",
    );
    rejects(
        "block b() { fn forward(self, x) { b()(x) } } net A(x: [N, 4]) = b();",
        "`b` is created inside forward; declare it before `fn forward` (`layer = …;`)",
    );
    rejects(
        "net A(x: [N, 1, 8, 8]) { fn forward(self, x) { cat([], dim = 1) } }",
        "takes at least 1 tensor input(s), got 0",
    );
    rejects("net A(x: [N, 1, 8, 8]) { fn forward(self, x) { cat([x, x], dim = 99999999999) } }", "out of range");
    rejects("net A(x: [N, 1, 8, 8]) { fn forward(self, x) { x.max(dim = 2)[5] } }", "index 5 out of range");
    rejects("net A(x: [N, 1, 8, 8]) = Sequential(Flatten(start_dim = 3, end_dim = 1));", "out of range");
    rejects("net A(x: [N, 4]) { fn forward(self, x) { (x, (x, x)) } }", "returns a tuple where a tensor is expected");
}
