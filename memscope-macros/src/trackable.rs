//! `#[derive(Trackable)]`: a value owns what its fields own. Each field goes through
//! the same autoref probe as a `let` binding, so fields whose types are not
//! `Trackable` need no bound and own nothing.

use proc_macro2::TokenStream;
use quote::{format_ident, quote};
use syn::{Data, DeriveInput, Fields};

pub fn derive(input: &DeriveInput) -> TokenStream {
    let name = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let body = match &input.data {
        Data::Struct(s) => {
            let (pattern, bindings) = destructure(quote!(Self), &s.fields);
            let probes = probes(&bindings);
            quote! { let #pattern = self; #probes }
        }
        Data::Enum(e) => {
            let arms = e.variants.iter().map(|v| {
                let ident = &v.ident;
                let (pattern, bindings) = destructure(quote!(Self::#ident), &v.fields);
                let probes = probes(&bindings);
                quote! { #pattern => { #probes } }
            });
            quote! {
                #[allow(unreachable_patterns)]
                match self { #(#arms)* _ => {} }
            }
        }
        Data::Union(u) => return syn::Error::new(
            u.union_token.span,
            "`Trackable` cannot be derived for a union: memscope cannot know which field is live",
        )
        .to_compile_error(),
    };
    quote! {
        impl #impl_generics ::memscope::Trackable for #name #ty_generics #where_clause {
            fn memscope_blocks(&self, __memscope_out: &mut ::memscope::Blocks) {
                #[allow(unused_imports)]
                use ::memscope::__private::{ViaNothing as _, ViaTrackable as _};
                #body
            }
        }
    }
}

/// A pattern binding every field by reference, and the bindings.
fn destructure(path: TokenStream, fields: &Fields) -> (TokenStream, Vec<syn::Ident>) {
    match fields {
        Fields::Named(named) => {
            let idents: Vec<_> = named.named.iter().filter_map(|f| f.ident.clone()).collect();
            let bindings: Vec<_> = (0..idents.len())
                .map(|i| format_ident!("__f{}", i))
                .collect();
            (quote!(#path { #(#idents: #bindings),* }), bindings)
        }
        Fields::Unnamed(unnamed) => {
            let bindings: Vec<_> = (0..unnamed.unnamed.len())
                .map(|i| format_ident!("__f{}", i))
                .collect();
            (quote!(#path ( #(#bindings),* )), bindings)
        }
        Fields::Unit => (quote!(#path), Vec::new()),
    }
}

fn probes(bindings: &[syn::Ident]) -> TokenStream {
    quote! {
        #( (&::memscope::__private::Probe(#bindings)).__memscope_blocks(__memscope_out); )*
    }
}
