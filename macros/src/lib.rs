//! The `cnn!` proc-macro. It parses the net declarations, shape-checks them with the very
//! code the run-time parser uses (`cnnc_compiler::dsl`), and expands every net into a unit
//! struct carrying compile-time constants (parameter count, input/output shapes,
//! `state_dict` keys) and a `graph()` constructor.
//!
//! Pipeline: parse (`syn`) → evaluate and shape-check (`cnnc_compiler::dsl::eval`) → expand.
//! Every error is reported at once, spanned on the offending layer; a net with errors still
//! expands to a stub type so the user sees the real errors, not follow-on "unknown type"
//! errors. Warnings (e.g. floor() dropping input rows) are emitted through a deprecated item
//! spanned on the layer, so `#[allow(deprecated)]` on the net silences them.
//!
//! Use it through the facade crate: `cnnc::cnn!`. The expansion refers to `::cnnc`.

use cnnc_compiler::diag::Level;
use cnnc_compiler::dsl::{ast, eval};
use cnnc_compiler::graph::Graph;
use cnnc_compiler::ops::Op;
use cnnc_compiler::shape::Batch;
use proc_macro::TokenStream;
use proc_macro2::TokenStream as TokenStream2;
use quote::{format_ident, quote, quote_spanned};

/// Declares one or more networks (and the blocks and constants they use).
///
/// (Runnable through the facade crate: see the `cnnc` crate's top-level example.)
///
/// ```text
/// cnnc::cnn! {
///     /// d2l LeNet
///     pub net LeNet(x: [N, 1, 28, 28]) = Sequential(
///         Conv2d(1, 6, 5, padding = 2), Sigmoid, AvgPool2d(2, stride = 2),
///         Conv2d(6, 16, 5), Sigmoid, AvgPool2d(2, stride = 2),
///         Flatten, Linear(400, 120), Sigmoid, Linear(120, 84), Sigmoid, Linear(84, 10),
///     );
/// }
/// assert_eq!(LeNet::PARAMS, 61_706);
/// ```
///
/// See `docs/dsl.md` for the language.
#[proc_macro]
pub fn cnn(input: TokenStream) -> TokenStream {
    expand(input.into()).into()
}

fn expand(input: TokenStream2) -> TokenStream2 {
    let source = input.to_string();
    let file = match ast::parse_file(input) {
        Ok(f) => f,
        Err(e) => return e.to_compile_error(),
    };
    let (results, diags) = eval::evaluate(&file);
    let mut out = TokenStream2::new();
    let mut errors: Option<syn::Error> = None;
    for d in &diags {
        match d.level {
            Level::Error => {
                // Two tokens carrying the first and last span make rustc underline the range.
                let first = proc_macro2::Ident::new("first", d.span.start);
                let last = proc_macro2::Ident::new("last", d.span.end);
                let e = syn::Error::new_spanned(quote!(#first #last), d.full_message());
                match &mut errors {
                    Some(all) => all.combine(e),
                    None => errors = Some(e),
                }
            }
            Level::Warning => out.extend(warning(d.span.start, &d.full_message(), &file)),
        }
    }
    if let Some(e) = errors {
        out.extend(e.to_compile_error());
    }
    for item in &file.items {
        let ast::Item::Net(net) = item else { continue };
        let graph = results.iter().find(|r| net.name == r.name).and_then(|r| r.graph.as_ref());
        out.extend(expand_net(net, graph, &source));
    }
    out
}

/// Warnings have no stable proc-macro API; a deprecated item used at the layer's span gives
/// a real rustc warning there. The nets' `#[allow(..)]` attributes apply to it.
fn warning(span: proc_macro2::Span, msg: &str, file: &ast::File) -> TokenStream2 {
    let allows: Vec<&syn::Attribute> = file
        .items
        .iter()
        .filter_map(|i| if let ast::Item::Net(n) = i { Some(&n.attrs) } else { None })
        .flatten()
        .filter(|a| a.path().is_ident("allow"))
        .collect();
    let use_it = quote_spanned!(span=> let _ = TruncatedOutput;);
    quote! {
        #(#allows)*
        const _: () = {
            #[deprecated(note = #msg)]
            struct TruncatedOutput;
            #[allow(dead_code)]
            fn __cnnc_warning() { #use_it }
        };
    }
}

fn dims_tokens(batch: Batch, dims: &[usize]) -> TokenStream2 {
    let b = match batch {
        Batch::Symbolic => quote!(::core::option::Option::None),
        Batch::Fixed(n) => quote!(::core::option::Option::Some(#n)),
    };
    quote!(#b, dims: &[#(#dims),*])
}

fn expand_net(net: &ast::NetItem, graph: Option<&Graph>, source: &str) -> TokenStream2 {
    let name = &net.name;
    let name_str = name.to_string();
    let attrs = &net.attrs;
    let vis = &net.vis;
    let Some(g) = graph else {
        // Stub: keeps the type and its items so the only errors are the real ones.
        return quote! {
            #(#attrs)*
            #vis struct #name;
            #[allow(dead_code)]
            impl #name {
                pub const NAME: &'static str = #name_str;
                pub const PARAMS: usize = 0;
                pub const BUFFERS: usize = 0;
                pub const MACS: u64 = 0;
                pub const INPUTS: &'static [::cnnc::IoSpec] = &[];
                pub const OUTPUTS: &'static [::cnnc::IoSpec] = &[];
                pub const STATE_DICT_KEYS: &'static [&'static str] = &[];
                pub const SOURCE: &'static str = "";
                pub fn graph() -> ::cnnc::compiler::Graph {
                    ::core::unreachable!("`{}` failed to compile", #name_str)
                }
            }
            impl ::cnnc::Net for #name {
                const NAME: &'static str = #name_str;
                fn graph() -> ::cnnc::compiler::Graph { #name::graph() }
            }
        };
    };
    let params = g.param_count();
    let buffers = g.buffer_count();
    let macs: u64 = cnnc_compiler::Summary::of(g).total_macs;
    let io = |list: &[(String, cnnc_compiler::NodeId)]| {
        let items = list.iter().map(|(n, id)| {
            let ty = &g.node(*id).ty;
            let d = dims_tokens(ty.batch, &ty.dims);
            quote!(::cnnc::IoSpec { name: #n, batch: #d })
        });
        quote!(&[#(#items),*])
    };
    let inputs = io(&g.inputs);
    let outputs = io(&g.outputs);
    let keys = g.state_dict_keys();
    let layer_count = g.node_ids().iter().filter(|id| !matches!(g.node(**id).op, Op::Input)).count();
    let once = format_ident!("__CNNC_GRAPH_{}", name_str.to_uppercase());
    quote! {
        #(#attrs)*
        #vis struct #name;
        #[allow(dead_code)]
        impl #name {
            /// The net's name.
            pub const NAME: &'static str = #name_str;
            /// Learnable parameters, as PyTorch's `sum(p.numel() for p in model.parameters())`.
            pub const PARAMS: usize = #params;
            /// Buffer elements (BatchNorm running statistics), not counted in `PARAMS`.
            pub const BUFFERS: usize = #buffers;
            /// Multiply-accumulates per sample.
            pub const MACS: u64 = #macs;
            /// Number of ops in the graph.
            pub const LAYERS: usize = #layer_count;
            /// Inputs with their shapes (batch `None` = symbolic `N`).
            pub const INPUTS: &'static [::cnnc::IoSpec] = #inputs;
            /// Outputs with their shapes.
            pub const OUTPUTS: &'static [::cnnc::IoSpec] = #outputs;
            /// PyTorch `state_dict` keys, in order.
            pub const STATE_DICT_KEYS: &'static [&'static str] = &[#(#keys),*];
            /// The declaration this net was compiled from.
            pub const SOURCE: &'static str = #source;
            /// The net's graph IR (built once, then cloned).
            pub fn graph() -> ::cnnc::compiler::Graph {
                static #once: ::std::sync::OnceLock<::cnnc::compiler::Graph> = ::std::sync::OnceLock::new();
                #once.get_or_init(|| ::cnnc::__private::net_from_source(#source, #name_str)).clone()
            }
        }
        impl ::cnnc::Net for #name {
            const NAME: &'static str = #name_str;
            fn graph() -> ::cnnc::compiler::Graph { #name::graph() }
        }
    }
}
