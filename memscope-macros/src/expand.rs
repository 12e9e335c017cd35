//! Stage 4: the instrumented code.
//!
//! A function's body becomes `{ <its site>; <enter the scope>; <the body> }`, where the
//! site is a `static` interned on first use and the scope guard leaves the scope when
//! the function returns or unwinds. An `async fn`'s body becomes a task wrapped around
//! `async move { <the body> }`, awaited. Each `let` with an initializer is followed by
//! a registration of the names it binds (unless `skip_vars`). Nested items are not the
//! function's code and are left alone.

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned, ToTokens};
use syn::visit_mut::VisitMut;
use syn::{Block, ImplItem, Item, Pat, ReturnType, Signature, Stmt};

use crate::args::Args;
use crate::model::Model;

pub fn item(model: Model, args: &Args) -> TokenStream {
    match model {
        Model::Fn(mut f) => {
            instrument_fn(&f.sig, &mut f.block, args);
            f.into_token_stream()
        }
        Model::Impl(mut i) => {
            instrument_impl(&mut i, args);
            i.into_token_stream()
        }
        Model::Mod(mut m) => {
            instrument_mod(&mut m, args);
            m.into_token_stream()
        }
        Model::Other(item) => item.into_token_stream(),
    }
}

fn instrument_impl(imp: &mut syn::ItemImpl, args: &Args) {
    for item in &mut imp.items {
        if let ImplItem::Fn(f) = item {
            if eligible(&f.sig, &f.attrs) {
                instrument_fn(&f.sig, &mut f.block, args);
            }
        }
    }
}

fn instrument_mod(m: &mut syn::ItemMod, args: &Args) {
    let Some((_, items)) = &mut m.content else {
        return;
    };
    for item in items {
        match item {
            Item::Fn(f) if eligible(&f.sig, &f.attrs) => instrument_fn(&f.sig, &mut f.block, args),
            Item::Impl(i) if !has_instrument(&i.attrs) => instrument_impl(i, args),
            Item::Mod(inner) if !has_instrument(&inner.attrs) => instrument_mod(inner, args),
            _ => {}
        }
    }
}

/// Inside an `impl` or `mod`: `const fn`s are skipped, and so are items with an
/// attribute of their own (it expands by itself).
fn eligible(sig: &Signature, attrs: &[syn::Attribute]) -> bool {
    sig.constness.is_none() && !has_instrument(attrs)
}

fn has_instrument(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        let segments: Vec<String> = a
            .path()
            .segments
            .iter()
            .map(|s| s.ident.to_string())
            .collect();
        segments.last().is_some_and(|s| s == "instrument")
            && segments.iter().any(|s| s == "memscope")
    })
}

fn instrument_fn(sig: &Signature, block: &mut Block, args: &Args) {
    if !args.skip_vars {
        Lets { nested: 0 }.visit_block_mut(block);
    }
    let span = sig.ident.span();
    let name = args.name.as_ref().map(|(n, _)| n.as_str()).unwrap_or("");
    let ctor = if sig.asyncness.is_some() {
        quote!(task)
    } else {
        quote!(function)
    };
    let site = quote_spanned! {span=>
        fn __memscope_here() -> &'static str {
            ::memscope::__private::type_name_of(&__memscope_here)
        }
        static __MEMSCOPE_SITE: ::memscope::__private::Site = ::memscope::__private::Site::#ctor(
            #name,
            __memscope_here,
            ::core::module_path!(),
            ::core::file!(),
            ::core::line!(),
            ::core::column!(),
        );
    };
    let stmts = &block.stmts;
    let body = if sig.asyncness.is_some() {
        let fake = fake_return(&sig.output);
        quote! {
            #site
            ::memscope::__private::Task::new(&__MEMSCOPE_SITE, async move {
                #fake
                #[allow(unused_variables)]
                let __memscope_on = ::memscope::__private::enabled();
                #(#stmts)*
            })
            .await
        }
    } else {
        quote! {
            #site
            let __memscope_scope = ::memscope::__private::enter(&__MEMSCOPE_SITE);
            // The one check of memscope's state per call: registrations below test this.
            #[allow(unused_variables)]
            let __memscope_on = __memscope_scope.entered();
            #(#stmts)*
        }
    };
    let brace = block.brace_token;
    *block = syn::parse_quote_spanned!(brace.span.join()=> { #body });
}

/// An unreachable `return` of the declared type, so that `?` and `return` inside the
/// wrapped `async move` block infer the function's own return type (the technique of
/// tracing-attributes). Skipped for `impl Trait` types, which a `let` cannot name.
fn fake_return(output: &ReturnType) -> TokenStream {
    let ReturnType::Type(_, ty) = output else {
        return TokenStream::new();
    };
    if ty.to_token_stream().to_string().contains("impl") {
        return TokenStream::new();
    }
    quote! {
        #[allow(unreachable_code, clippy::diverging_sub_expression, clippy::needless_return)]
        if false {
            let __memscope_return: #ty = ::core::unreachable!();
            return __memscope_return;
        }
    }
}

/// Adds a registration after each `let` that binds names.
struct Lets {
    /// Depth of closures and async blocks around the statement: there, the function's
    /// `__memscope_on` is not used (capturing it could change what the closure borrows),
    /// and the registration asks memscope's state itself.
    nested: usize,
}

impl VisitMut for Lets {
    fn visit_expr_closure_mut(&mut self, closure: &mut syn::ExprClosure) {
        self.nested += 1;
        syn::visit_mut::visit_expr_closure_mut(self, closure);
        self.nested -= 1;
    }

    fn visit_expr_async_mut(&mut self, block: &mut syn::ExprAsync) {
        self.nested += 1;
        syn::visit_mut::visit_expr_async_mut(self, block);
        self.nested -= 1;
    }

    fn visit_block_mut(&mut self, block: &mut Block) {
        for stmt in &mut block.stmts {
            self.visit_stmt_mut(stmt);
        }
        let mut out = Vec::with_capacity(block.stmts.len() * 2);
        for stmt in block.stmts.drain(..) {
            let registration = match &stmt {
                Stmt::Local(local) if local.init.is_some() && type_is_known(local) => {
                    let mut names = Vec::new();
                    bound_names(&local.pat, &mut names);
                    let local = self.nested == 0;
                    names
                        .into_iter()
                        .map(|name| registration(name, local))
                        .collect::<Vec<_>>()
                }
                _ => Vec::new(),
            };
            out.push(stmt);
            out.extend(registration);
        }
        block.stmts = out;
    }

    fn visit_item_mut(&mut self, _: &mut Item) {}
}

/// Method and function names whose result type usually comes from a later use
/// (`let n = s.parse()?; takes_u32(n)`). Where the registration follows such a `let`,
/// the type is not known yet and the autoref probe would commit to `Trackable` too
/// early, so bindings of these without a type annotation are not registered.
const INFERRED_LATER: &[&str] = &[
    "parse",
    "collect",
    "into",
    "try_into",
    "sum",
    "product",
    "default",
    "from_str",
    "from_slice",
    "from_reader",
    "from_value",
    "from_bytes",
    "deserialize",
    "decode",
    "from_iter",
    "read",
    "get",
    "extract",
    "unwrap_or_default",
];

/// Whether the bound value's type is known where the `let` ends (see
/// [`INFERRED_LATER`]).
fn type_is_known(local: &syn::Local) -> bool {
    if matches!(local.pat, Pat::Type(_)) {
        return true;
    }
    let Some(init) = &local.init else {
        return false;
    };
    let mut expr = &*init.expr;
    loop {
        expr = match expr {
            syn::Expr::Try(e) => &e.expr,
            syn::Expr::Await(e) => &e.base,
            syn::Expr::Paren(e) => &e.expr,
            syn::Expr::MethodCall(m)
                if ["unwrap", "expect", "unwrap_or_else", "unwrap_or"]
                    .contains(&m.method.to_string().as_str()) =>
            {
                &m.receiver
            }
            syn::Expr::MethodCall(m) => {
                return m.turbofish.is_some()
                    || !INFERRED_LATER.contains(&m.method.to_string().as_str())
            }
            syn::Expr::Call(c) => {
                let syn::Expr::Path(p) = &*c.func else {
                    return true;
                };
                let Some(last) = p.path.segments.last() else {
                    return true;
                };
                return !last.arguments.is_empty()
                    || !INFERRED_LATER.contains(&last.ident.to_string().as_str());
            }
            _ => return true,
        }
    }
}

/// The names a pattern binds by value (not `ref` bindings, not constants or unit
/// variants, which look like names but start with a capital).
fn bound_names(pat: &Pat, out: &mut Vec<syn::Ident>) {
    match pat {
        Pat::Ident(p) => {
            let text = p.ident.to_string();
            if p.by_ref.is_none() && !text.starts_with(|c: char| c.is_uppercase()) {
                out.push(p.ident.clone());
            }
            if let Some((_, sub)) = &p.subpat {
                bound_names(sub, out);
            }
        }
        Pat::Tuple(t) => t.elems.iter().for_each(|p| bound_names(p, out)),
        Pat::TupleStruct(t) => t.elems.iter().for_each(|p| bound_names(p, out)),
        Pat::Struct(s) => s.fields.iter().for_each(|f| bound_names(&f.pat, out)),
        Pat::Slice(s) => s.elems.iter().for_each(|p| bound_names(p, out)),
        Pat::Type(t) => bound_names(&t.pat, out),
        Pat::Paren(p) => bound_names(&p.pat, out),
        Pat::Reference(r) => bound_names(&r.pat, out),
        // Every alternative binds the same names.
        Pat::Or(o) => {
            if let Some(first) = o.cases.first() {
                bound_names(first, out);
            }
        }
        _ => {}
    }
}

/// Registers `name` (a binding just made) with its type and the blocks it owns; spans
/// point at the binding, so `line!()` and `column!()` are its location. With `local`,
/// it tests the function's `__memscope_on` instead of asking memscope's state again.
fn registration(name: syn::Ident, local: bool) -> Stmt {
    let span: Span = name.span();
    let text = name.to_string();
    let on = if local {
        quote!(__memscope_on)
    } else {
        quote!(::memscope::__private::enabled())
    };
    syn::parse_quote_spanned! {span=>
        #[allow(unreachable_code)]
        {
            static __MEMSCOPE_VAR: ::memscope::__private::Site =
                ::memscope::__private::Site::variable(#text, ::core::file!(), ::core::line!(), ::core::column!());
            if #on {
                #[allow(unused_imports)]
                use ::memscope::__private::{ViaNothing as _, ViaTrackable as _};
                (&::memscope::__private::Probe(&#name)).__memscope_bind(&__MEMSCOPE_VAR);
            }
        }
    }
}
