//! Procedural macros of memscope, re-exported by the runtime (`memscope`):
//! `#[memscope::instrument]` and `#[derive(memscope::Trackable)]`.
//!
//! The attribute works in stages, one module each: [`args`] parses its arguments,
//! [`model`] reads the annotated item into a typed model that keeps the original
//! syntax (for spans), [`validate`] rejects what cannot be instrumented, [`expand`]
//! writes the instrumented code, and [`fallback`] turns any error into
//! `compile_error!` next to the untouched item. Generated code names only
//! `::memscope::__private::…`.

use proc_macro::TokenStream;

mod args;
mod expand;
mod fallback;
mod model;
mod trackable;
mod validate;

/// Names what a function, method, `impl` block or inline `mod` allocates: scopes (the
/// function, as a node of the scope tree), variables (each `let` binding: name, type,
/// location and the heap blocks it owns) and, for an `async fn`, a task.
///
/// Options: `name = "…"` names the scope (a single function only), `skip_vars` does
/// not register `let` bindings. In a build that memscope does not track, annotated
/// code behaves as without the attribute, for the cost of one predictable branch.
#[proc_macro_attribute]
pub fn instrument(args: TokenStream, item: TokenStream) -> TokenStream {
    let item2 = proc_macro2::TokenStream::from(item);
    let result = args::parse(args.into()).and_then(|args| {
        let Some(model) = model::read(item2.clone())? else {
            // The item does not parse: leave it untouched so that rustc reports the
            // user's own syntax error.
            return Ok(item2.clone());
        };
        validate::check(&model, &args)?;
        Ok(expand::item(model, &args))
    });
    match result {
        Ok(tokens) => tokens.into(),
        Err(error) => fallback::with_error(error, item2).into(),
    }
}

/// Implements `memscope::Trackable` for a struct or enum: the value owns what its
/// fields own (fields whose types are not `Trackable` own nothing).
#[proc_macro_derive(Trackable)]
pub fn derive_trackable(item: TokenStream) -> TokenStream {
    let item2 = proc_macro2::TokenStream::from(item);
    match syn::parse2::<syn::DeriveInput>(item2) {
        Ok(input) => trackable::derive(&input).into(),
        Err(error) => error.to_compile_error().into(),
    }
}
