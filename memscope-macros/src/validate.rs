//! Stage 3: what cannot be instrumented, with an error at the user's code that says
//! what to do instead.

use syn::spanned::Spanned;

use crate::args::Args;
use crate::model::Model;

pub fn check(model: &Model, args: &Args) -> syn::Result<()> {
    match model {
        Model::Fn(f) => {
            if let Some(constness) = &f.sig.constness {
                return Err(syn::Error::new(
                    constness.span,
                    "`#[memscope::instrument]` cannot instrument a `const fn`: it may run at \
                     compile time, where nothing is recorded; remove the attribute or the `const`",
                ));
            }
        }
        Model::Mod(m) if m.content.is_none() => {
            return Err(syn::Error::new(
                m.span(),
                format!(
                    "`#[memscope::instrument]` cannot see inside `mod {0};`, whose code is in \
                     another file; put the attribute on the functions or `impl` blocks of that \
                     file, write the module inline, or run `cargo memscope run --instrument {0}`",
                    m.ident
                ),
            ));
        }
        Model::Other(item) => {
            return Err(syn::Error::new(
                item.span(),
                "`#[memscope::instrument]` goes on a function, an `impl` block or an inline `mod`",
            ));
        }
        Model::Impl(_) | Model::Mod(_) => {}
    }
    if let (Some((_, span)), Model::Impl(_) | Model::Mod(_)) = (&args.name, model) {
        return Err(syn::Error::new(
            *span,
            "`name` names one function's scope; put it on that function's own attribute",
        ));
    }
    Ok(())
}
