//! Every example net in `examples/nets/*.cnn` compiles, verifies, and has PyTorch's
//! parameter count.

use cnnc_compiler::dsl::compile_str;

fn compile(file: &str) -> cnnc_compiler::Graph {
    let path = format!("{}/../examples/nets/{file}", env!("CARGO_MANIFEST_DIR"));
    let src = std::fs::read_to_string(&path).expect("example net exists");
    let out = compile_str(&src);
    for d in &out.diagnostics {
        eprintln!("{}", d.render(file, &src));
    }
    assert!(!out.has_errors(), "{file} has errors");
    assert_eq!(out.nets.len(), 1, "{file} declares one net");
    let g = out.nets.into_iter().next().unwrap();
    g.verify().expect("graph verifies");
    g
}

#[test]
fn parameter_counts_match_pytorch() {
    for (file, params) in [
        ("lenet.cnn", 61_706),
        ("cifar10.cnn", 145_578),
        ("alexnet.cnn", 46_764_746),
        ("vgg11.cnn", 128_806_154),
        ("resnet18.cnn", 11_689_512),
        ("conv1x2.cnn", 2),
    ] {
        let g = compile(file);
        assert_eq!(g.param_count(), params, "{file}");
    }
}

#[test]
fn print_some() {
    let g = compile("nonlinear.cnn");
    println!("{g}");
    let g = compile("seed_resnet.cnn");
    println!("{}", cnnc_compiler::Summary::of(&g));
}
