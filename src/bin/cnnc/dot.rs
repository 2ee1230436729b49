//! `cnnc dot`: the graph IR (before or after fusion) as Graphviz DOT, optionally rendered to
//! SVG or PNG by Graphviz's `dot` when it is installed.

use crate::fail::{Fail, input, usage};
use crate::source::{self, NetFile, io_text};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Arguments of `cnnc dot`.
#[derive(Args, Debug)]
pub struct DotArgs {
    #[command(flatten)]
    pub net: NetFile,
    /// Override the declared input shape (as for `cnnc summary`).
    #[arg(long = "input", value_name = "DIMS")]
    pub shapes: Vec<String>,
    /// Show the graph after the fusion passes.
    #[arg(long)]
    pub fused: bool,
    /// Write to this file instead of stdout (required for `--png`; `--svg` and `--png`
    /// default to `<FILE stem>.svg`/`.png` in the current directory).
    #[arg(short, long, value_name = "OUT")]
    pub output: Option<PathBuf>,
    /// Render to SVG with Graphviz's `dot`.
    #[arg(long, conflicts_with = "png")]
    pub svg: bool,
    /// Render to PNG with Graphviz's `dot`.
    #[arg(long)]
    pub png: bool,
}

/// Prints, writes or renders the DOT text.
pub fn run(args: &DotArgs) -> Result<(), Fail> {
    let (_, mut graph) = source::load_net(&args.net, &args.shapes)?;
    if args.fused {
        graph = crate::fusion::fuse(&graph)?;
    }
    let text = graph.to_dot();
    let format = match (args.svg, args.png) {
        (true, _) => Some("svg"),
        (_, true) => Some("png"),
        _ => None,
    };
    let Some(format) = format else {
        return match &args.output {
            Some(path) => {
                std::fs::write(path, &text)
                    .map_err(|e| input(format!("cannot write `{}`: {}", path.display(), io_text(&e))))?;
                eprintln!("wrote {}", path.display());
                Ok(())
            }
            None => {
                print!("{text}");
                Ok(())
            }
        };
    };
    let out = args.output.clone().unwrap_or_else(|| {
        let stem = args.net.file.file_stem().map_or_else(|| "net".into(), |s| s.to_string_lossy().into_owned());
        PathBuf::from(format!("{stem}.{format}"))
    });
    render(&text, format, &out)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// Runs `dot -T<format> -o <out>` on `text`.
fn render(text: &str, format: &str, out: &std::path::Path) -> Result<(), Fail> {
    let mut child = Command::new("dot")
        .arg(format!("-T{format}"))
        .arg("-o")
        .arg(out)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => usage(format!(
                "--{format} needs Graphviz's `dot`, which is not installed (e.g. `apt-get install graphviz`); \
                 without --{format}, cnnc writes the DOT text itself"
            )),
            _ => input(format!("cannot run `dot`: {}", io_text(&e))),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(text.as_bytes()).map_err(|e| input(format!("cannot write to `dot`: {}", io_text(&e))))?;
    }
    let result = child.wait_with_output().map_err(|e| input(format!("`dot` failed: {}", io_text(&e))))?;
    if !result.status.success() {
        return Err(input(format!("`dot` failed: {}", String::from_utf8_lossy(&result.stderr).trim())));
    }
    Ok(())
}
