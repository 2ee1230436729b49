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

/// The `cnn! { … }` examples of `docs/dsl.md`, in order, each with the `text` block that
/// follows it if that block lists `key [shape]` lines.
fn doc_examples() -> Vec<(String, Option<String>)> {
    let path = format!("{}/../docs/dsl.md", env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(path).expect("docs/dsl.md exists");
    let mut blocks: Vec<(String, String)> = vec![];
    let mut rest = doc.as_str();
    while let Some(open) = rest.find("```") {
        let after = &rest[open + 3..];
        let (lang, body) = after.split_once('\n').expect("fence line");
        let close = body.find("\n```").expect("closed fence");
        blocks.push((lang.trim().to_string(), body[..close].to_string()));
        rest = &body[close + 4..];
    }
    let mut out = vec![];
    for (i, (lang, body)) in blocks.iter().enumerate() {
        let Some(start) = body.find("cnn! {") else { continue };
        assert_eq!(lang, "rust", "a cnn! example is fenced as rust");
        let inner = &body[start + "cnn! {".len()..body.rfind('}').expect("closing brace")];
        let keys = blocks.get(i + 1).filter(|(l, b)| l == "text" && b.contains(" [")).map(|(_, b)| b.clone());
        out.push((inner.to_string(), keys));
    }
    out
}

#[test]
fn dsl_doc_examples_compile_and_list_their_keys() {
    let examples = doc_examples();
    assert!(examples.len() >= 7, "{} examples", examples.len());
    let mut nets = 0;
    for (src, keys) in examples {
        // `// …` marks an excerpt of a larger net.
        if src.contains("// …") {
            continue;
        }
        let out = compile_str(&src);
        let errors: Vec<String> = out.errors().map(|d| d.full_message()).collect();
        assert!(errors.is_empty(), "{errors:?} in\n{src}");
        nets += out.nets.len();
        if let Some(keys) = keys {
            let g = out.nets.last().expect("a net before its key list");
            let ours: Vec<String> = g.params.iter().map(|p| format!("{} {:?}", p.name, p.spec.shape)).collect();
            let doc: Vec<String> = keys
                .lines()
                .map(|l| {
                    let (k, shape) = l.split_once(' ').expect("`key [shape]`");
                    format!("{k} {}", shape.trim())
                })
                .collect();
            assert_eq!(ours, doc, "the key list after {}", g.name);
        }
    }
    assert!(nets >= 6, "{nets} nets");
    // The keys stated in prose for the nested-Sequential example.
    let stages = doc_examples().into_iter().find(|(s, _)| s.contains("net Stages")).expect("Stages example");
    let g = compile_str(&stages.0).nets.remove(0);
    assert_eq!(
        g.state_dict_keys(),
        [
            "0.0.weight",
            "0.0.bias",
            "0.1.weight",
            "0.1.bias",
            "0.1.running_mean",
            "0.1.running_var",
            "0.1.num_batches_tracked",
            "1.conv.weight",
            "1.conv.bias",
            "4.weight",
            "4.bias"
        ]
    );
}
