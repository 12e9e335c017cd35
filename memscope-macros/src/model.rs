//! Stage 2: the annotated item as a typed model. The model keeps syn's own syntax
//! trees, so every token keeps its span for errors and for `line!()`.

use proc_macro2::TokenStream;

/// What the attribute was put on.
pub enum Model {
    /// A free function, a method or an associated function.
    Fn(syn::ItemFn),
    Impl(syn::ItemImpl),
    Mod(syn::ItemMod),
    /// Anything else (rejected by `validate`).
    Other(syn::Item),
}

/// `None` when the item does not parse: the caller then passes it through untouched.
pub fn read(tokens: TokenStream) -> syn::Result<Option<Model>> {
    let Ok(item) = syn::parse2::<syn::Item>(tokens) else {
        return Ok(None);
    };
    Ok(Some(match item {
        syn::Item::Fn(f) => Model::Fn(f),
        syn::Item::Impl(i) => Model::Impl(i),
        syn::Item::Mod(m) => Model::Mod(m),
        other => Model::Other(other),
    }))
}
