//! Stage 5: on error, `compile_error!` at the user's span plus the original item, so
//! that no cascade of follow-on errors appears (the item still defines its names).

use proc_macro2::TokenStream;
use quote::quote;

pub fn with_error(error: syn::Error, item: TokenStream) -> TokenStream {
    let error = error.to_compile_error();
    quote! {
        #error
        #item
    }
}
