//! Stage 1: the attribute's arguments.

use proc_macro2::{Span, TokenStream};
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::{Expr, ExprLit, Lit, Meta, Token};

/// What `#[memscope::instrument(…)]` was asked for.
#[derive(Default)]
pub struct Args {
    /// `name = "…"`: the scope's name, with the span of the string for errors.
    pub name: Option<(String, Span)>,
    /// `skip_vars`: do not register `let` bindings.
    pub skip_vars: bool,
}

pub fn parse(tokens: TokenStream) -> syn::Result<Args> {
    let metas = Punctuated::<Meta, Token![,]>::parse_terminated.parse2(tokens)?;
    let mut args = Args::default();
    for meta in metas {
        match &meta {
            Meta::Path(p) if p.is_ident("skip_vars") => args.skip_vars = true,
            Meta::NameValue(nv) if nv.path.is_ident("name") => match &nv.value {
                Expr::Lit(ExprLit {
                    lit: Lit::Str(s), ..
                }) if !s.value().is_empty() => args.name = Some((s.value(), s.span())),
                other => {
                    return Err(syn::Error::new_spanned(
                        other,
                        "`name` takes a non-empty string literal: `name = \"load config\"`",
                    ))
                }
            },
            other => return Err(syn::Error::new_spanned(
                other,
                "unknown argument; `#[memscope::instrument]` takes `name = \"…\"` and `skip_vars`",
            )),
        }
    }
    Ok(args)
}
