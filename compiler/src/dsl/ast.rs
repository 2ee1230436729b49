//! The DSL's item grammar, parsed with `syn`. Item headers are parsed here; everything inside
//! bodies is ordinary Rust expression/statement syntax (`syn::Expr`, `syn::Stmt`), which the
//! evaluator ([`super::eval`]) gives PyTorch meaning.
//!
//! ```text
//! file   := item*
//! item   := attr* vis? ( net | block | const )
//! net    := "net" Ident "(" Ident ":" "[" dim,* "]" ,* ")" ( "->" ( Ident | "(" Ident,* ")" ) )? body
//! block  := "block" Ident "(" ( Ident ( "=" Expr )? ),* ")" body
//! const  := "const" Ident "=" Expr ";"
//! body   := "=" Expr ";"                    // e.g. = Sequential(...);
//!         | "{" ( Stmt | forward )* "}"      // declarations (+ fn forward = module style)
//! forward:= "fn" "forward" "(" ("self" ",")? Ident,* ")" Block
//! dim    := Ident (symbolic batch, first position only) | integer
//! ```

use proc_macro2::{Span, TokenStream};
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Attribute, Expr, Ident, Token, Visibility, braced, bracketed, parenthesized};

/// A whole `cnn! { … }` body or `.cnn` file.
#[derive(Clone)]
pub struct File {
    /// Items in order.
    pub items: Vec<Item>,
}

/// One item.
#[derive(Clone)]
pub enum Item {
    /// `net Name(x: [N, 3, 32, 32]) -> (out) …`
    Net(NetItem),
    /// `block name(a, b = 1) …`
    Block(BlockItem),
    /// `const NAME = expr;`
    Const(ConstItem),
}

/// A net declaration.
#[derive(Clone)]
pub struct NetItem {
    /// Outer attributes (doc comments, `#[allow(..)]`).
    pub attrs: Vec<Attribute>,
    /// Visibility of the generated type.
    pub vis: Visibility,
    /// Name.
    pub name: Ident,
    /// Inputs.
    pub inputs: Vec<InputDecl>,
    /// Output names, if declared.
    pub outputs: Option<Vec<Ident>>,
    /// Body.
    pub body: Body,
}

/// `x: [N, 1, 28, 28]`.
#[derive(Clone)]
pub struct InputDecl {
    /// Input name.
    pub name: Ident,
    /// Dims as written.
    pub dims: Vec<DimDecl>,
    /// Span of the bracketed shape.
    pub span: Span,
}

/// One dimension of an input declaration.
#[derive(Clone)]
pub enum DimDecl {
    /// A symbolic size (`N`).
    Symbol(Ident),
    /// A fixed size.
    Fixed(usize, Span),
}

/// A reusable block (a parameterised module or sequence).
#[derive(Clone)]
pub struct BlockItem {
    /// Attributes.
    pub attrs: Vec<Attribute>,
    /// Name.
    pub name: Ident,
    /// Parameters with optional defaults.
    pub params: Vec<(Ident, Option<Expr>)>,
    /// Body.
    pub body: Body,
}

/// `const NAME = expr;`
#[derive(Clone)]
pub struct ConstItem {
    /// Name.
    pub name: Ident,
    /// Value.
    pub value: Expr,
}

/// A net or block body.
#[derive(Clone)]
pub enum Body {
    /// `= expr;`
    Expr(Expr),
    /// `{ stmts; fn forward(..) { .. } }`
    Stmts {
        /// Declaration statements in order.
        stmts: Vec<syn::Stmt>,
        /// The forward function, if any (module style).
        forward: Option<Forward>,
        /// Span of the braces.
        span: Span,
    },
}

/// `fn forward(x) { … }`
#[derive(Clone)]
pub struct Forward {
    /// Parameter names (excluding `self`).
    pub params: Vec<Ident>,
    /// The body.
    pub block: syn::Block,
    /// Span of `fn forward`.
    pub span: Span,
}

fn peek_word(input: ParseStream<'_>, word: &str) -> bool {
    input.fork().parse::<Ident>().map(|i| i == word).unwrap_or(false)
}

impl Parse for File {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut items = vec![];
        while !input.is_empty() {
            items.push(input.parse()?);
        }
        Ok(File { items })
    }
}

impl Parse for Item {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let attrs = input.call(Attribute::parse_outer)?;
        let vis: Visibility = input.parse()?;
        if input.peek(Token![const]) {
            input.parse::<Token![const]>()?;
            let name: Ident = input.parse()?;
            input.parse::<Token![=]>()?;
            let value: Expr = input.parse()?;
            input.parse::<Token![;]>()?;
            return Ok(Item::Const(ConstItem { name, value }));
        }
        if peek_word(input, "net") {
            input.parse::<Ident>()?;
            let name: Ident = input.parse()?;
            let content;
            parenthesized!(content in input);
            let inputs: Punctuated<InputDecl, Token![,]> = content.parse_terminated(InputDecl::parse, Token![,])?;
            let outputs = if input.peek(Token![->]) {
                input.parse::<Token![->]>()?;
                if input.peek(syn::token::Paren) {
                    let c;
                    parenthesized!(c in input);
                    let names: Punctuated<Ident, Token![,]> = c.parse_terminated(Ident::parse, Token![,])?;
                    Some(names.into_iter().collect())
                } else {
                    Some(vec![input.parse()?])
                }
            } else {
                None
            };
            let body = input.parse()?;
            return Ok(Item::Net(NetItem { attrs, vis, name, inputs: inputs.into_iter().collect(), outputs, body }));
        }
        if peek_word(input, "block") {
            input.parse::<Ident>()?;
            let name: Ident = input.parse()?;
            let content;
            parenthesized!(content in input);
            let mut params = vec![];
            while !content.is_empty() {
                let p: Ident = content.parse()?;
                let default = if content.peek(Token![=]) {
                    content.parse::<Token![=]>()?;
                    Some(content.parse::<Expr>()?)
                } else {
                    None
                };
                params.push((p, default));
                if content.is_empty() {
                    break;
                }
                content.parse::<Token![,]>()?;
            }
            let body = input.parse()?;
            return Ok(Item::Block(BlockItem { attrs, name, params, body }));
        }
        Err(input.error("expected `net Name(x: [N, C, H, W]) …`, `block name(args) …` or `const NAME = …;`"))
    }
}

impl Parse for InputDecl {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let name: Ident = input.parse()?;
        input.parse::<Token![:]>()?;
        let content;
        let br = bracketed!(content in input);
        let mut dims = vec![];
        while !content.is_empty() {
            if content.peek(Ident) {
                dims.push(DimDecl::Symbol(content.parse()?));
            } else {
                let lit: syn::LitInt = content.parse()?;
                dims.push(DimDecl::Fixed(lit.base10_parse()?, lit.span()));
            }
            if content.is_empty() {
                break;
            }
            content.parse::<Token![,]>()?;
        }
        Ok(InputDecl { name, dims, span: br.span.join() })
    }
}

impl Parse for Body {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        if input.peek(Token![=]) {
            input.parse::<Token![=]>()?;
            let e: Expr = input.parse()?;
            input.parse::<Token![;]>()?;
            return Ok(Body::Expr(e));
        }
        let content;
        let br = braced!(content in input);
        let mut stmts = vec![];
        let mut forward = None;
        while !content.is_empty() {
            if content.peek(Token![fn]) {
                let fn_tok: Token![fn] = content.parse()?;
                let name: Ident = content.parse()?;
                if name != "forward" {
                    return Err(syn::Error::new(name.span(), "the only function a net or block defines is `forward`"));
                }
                let args;
                parenthesized!(args in content);
                let mut params = vec![];
                while !args.is_empty() {
                    if args.peek(Token![self]) {
                        args.parse::<Token![self]>()?;
                    } else {
                        params.push(args.parse::<Ident>()?);
                    }
                    if args.is_empty() {
                        break;
                    }
                    args.parse::<Token![,]>()?;
                }
                let block: syn::Block = content.parse()?;
                let span = fn_tok.span().join(name.span()).unwrap_or(name.span());
                if forward.is_some() {
                    return Err(syn::Error::new(span, "`forward` is defined twice"));
                }
                forward = Some(Forward { params, block, span });
            } else {
                stmts.push(content.parse::<syn::Stmt>()?);
            }
        }
        Ok(Body::Stmts { stmts, forward, span: br.span.join() })
    }
}

/// Parses DSL text (a `.cnn` file or the string form of a `cnn!` body). Sources that nest
/// deeper than [`MAX_NESTING`] are rejected before `syn` sees them (see [`check_nesting`]).
pub fn parse_file(tokens: TokenStream) -> syn::Result<File> {
    check_nesting(&tokens)?;
    syn::parse2(tokens)
}

/// How deeply a source may nest: brackets inside brackets, plus the operators, method calls
/// and prefixes chained between two commas or semicolons. The seed nets stay below 50.
pub const MAX_NESTING: usize = 256;

/// Rejects a token stream whose expressions would nest deeper than [`MAX_NESTING`].
///
/// Parsing, evaluating and dropping an expression all recurse once per level of nesting, so
/// `((((…))))`, `- - - … 1`, `1 + 1 + … + 1` or `x.relu().relu()…` of a few thousand levels
/// would overflow the stack — an abort, not an error. The bound is taken on tokens, without
/// recursion: the cost of a token is the number of tokens before it since the last `,`, `;`
/// or `#` in its group, plus the cost of the group it sits in. Expression depth never
/// exceeds that cost.
pub fn check_nesting(tokens: &TokenStream) -> syn::Result<()> {
    use proc_macro2::{Delimiter, TokenTree};
    struct Level {
        tokens: proc_macro2::token_stream::IntoIter,
        base: usize,
        run: usize,
    }
    let mut stack = vec![Level { tokens: tokens.clone().into_iter(), base: 0, run: 0 }];
    loop {
        let top_level = stack.len() == 1;
        let Some(level) = stack.last_mut() else { break };
        let Some(tt) = level.tokens.next() else {
            stack.pop();
            continue;
        };
        if let TokenTree::Punct(p) = &tt
            && matches!(p.as_char(), ',' | ';' | '#')
        {
            level.run = 0;
            continue;
        }
        level.run += 1;
        let cost = level.base + level.run;
        if cost > MAX_NESTING {
            return Err(syn::Error::new(
                tt.span(),
                format!(
                    "this nests too deeply (more than {MAX_NESTING} levels of brackets, operators and calls); \
                     split it with `let` or a `block`"
                ),
            ));
        }
        if let TokenTree::Group(g) = tt {
            // A `{ … }` at the top level ends an item.
            if top_level && g.delimiter() == Delimiter::Brace {
                level.run = 0;
            }
            stack.push(Level { tokens: g.stream().into_iter(), base: cost, run: 0 });
        }
    }
    Ok(())
}

/// The span of any syntax node.
pub fn span_of<T: Spanned>(t: &T) -> Span {
    t.span()
}
