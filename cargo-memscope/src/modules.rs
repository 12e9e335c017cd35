//! The files of a crate and the module each one holds, found from the crate root the
//! way rustc finds them: `mod name;` is `name.rs` or `name/mod.rs` in the declaring
//! module's directory (a non-`mod.rs` file's children live in a directory named after
//! it), `#[path = "…"]` is relative to the declaring file's directory, and an inline
//! `mod` nests the directory of the modules it declares. Files that are missing or do
//! not parse are left out: rustc reports them.

use std::fs;
use std::path::{Component, Path, PathBuf};

use proc_macro2::{Delimiter, TokenStream, TokenTree};

/// Line (1-based) and column (0-based, in characters), as proc-macro2 reports them.
pub type LineColumn = (usize, usize);

/// One source file of a crate.
pub struct SourceFile {
    pub path: PathBuf,
    /// The module the file is, inside its crate (empty for the crate root).
    pub module: Vec<String>,
    pub syntax: syn::File,
}

/// Which of a crate's files to parse in full.
#[derive(Clone, Copy)]
pub enum Parse<'a> {
    /// Every file (to find functions to instrument).
    Every,
    /// Only files that contain this word; the others get an empty `syntax`. Parsing is
    /// most of the cost, and most files have no use for it: the modules a file
    /// declares are read from its tokens, lexed only when its text may declare one.
    Containing(&'a str),
}

impl Parse<'_> {
    fn wants(self, text: &str) -> bool {
        match self {
            Parse::Every => true,
            Parse::Containing(word) => text.contains(word),
        }
    }
}

/// Whether `text` has `mod`, white space, a name and `;`: the only way to declare a
/// module whose items are in another file (a false positive only costs lexing).
fn declares_module_file(text: &str) -> bool {
    let bytes = text.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80;
    text.match_indices("mod").any(|(at, _)| {
        if at > 0 && ident(bytes[at - 1]) {
            return false;
        }
        let rest = &text[at + 3..];
        let name = rest.trim_start();
        if name.len() == rest.len() {
            return false; // `mode`, `modules`
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        let after = name.trim_start_matches(|c: char| c.is_alphanumeric() || c == '_');
        after.len() < name.len() && after.trim_start().starts_with(';')
    })
}

/// Every file of the crate whose root file is `root`, the root first.
pub fn crate_files(root: &Path, parse: Parse) -> Vec<SourceFile> {
    let mut files = Vec::new();
    let mut queue = vec![(root.to_path_buf(), true, Vec::new())];
    let mut seen: Vec<PathBuf> = Vec::new();
    while let Some((path, mod_rs, module)) = queue.pop() {
        if seen.contains(&path) {
            continue;
        }
        seen.push(path.clone());
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        let full = parse.wants(&text);
        // Most files declare no module in a file of its own: not even lexed.
        let tokens = if full || declares_module_file(&text) {
            let Ok(tokens) = without_shebang(&text).parse::<TokenStream>() else {
                continue;
            };
            tokens
        } else {
            TokenStream::new()
        };
        let syntax = if full {
            let Ok(syntax) = syn::parse2::<syn::File>(tokens.clone()) else {
                continue;
            };
            syntax
        } else {
            syn::File {
                shebang: None,
                attrs: Vec::new(),
                items: Vec::new(),
            }
        };
        let file_dir = path
            .parent()
            .expect("a source file has a directory")
            .to_path_buf();
        let module_dir = if mod_rs {
            file_dir.clone()
        } else {
            file_dir.join(path.file_stem().unwrap_or_default())
        };
        let mut children = Vec::new();
        declared_files(tokens, &file_dir, &module_dir, &module, &mut children);
        // Popped from the end: reversed, the files come in declaration order.
        queue.extend(children.into_iter().rev());
        files.push(SourceFile {
            path,
            module,
            syntax,
        });
    }
    files
}

/// `text` without a byte order mark and a first line `#!…` that is not an inner
/// attribute (what `syn::parse_file` skips); lines keep their numbers.
fn without_shebang(text: &str) -> &str {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    match text.strip_prefix("#!") {
        Some(rest) if !rest.trim_start().starts_with('[') => {
            &text[text.find('\n').unwrap_or(text.len())..]
        }
        _ => text,
    }
}

/// The module files that the items in `tokens` declare with `mod name;`: (path,
/// whether children live beside it like a `mod.rs`'s, module path). Read from tokens,
/// not a syntax tree: at an item's level `mod` can only start a module (it is a
/// keyword), and what a file declares is all that is needed of most files.
fn declared_files(
    tokens: TokenStream,
    file_dir: &Path,
    module_dir: &Path,
    module: &[String],
    out: &mut Vec<(PathBuf, bool, Vec<String>)>,
) {
    // The `#[path = "…"]` among the outer attributes of the item being read.
    let mut explicit: Option<String> = None;
    let mut tokens = tokens.into_iter();
    while let Some(token) = tokens.next() {
        match token {
            TokenTree::Punct(p) if p.as_char() == '#' => match tokens.next() {
                Some(TokenTree::Group(attr)) => {
                    explicit = path_attribute(attr.stream()).or(explicit);
                }
                // `#![…]` is the enclosing module's.
                _ => {
                    tokens.next();
                }
            },
            // The end of an item: its attributes are done with.
            TokenTree::Punct(p) if p.as_char() == ';' => explicit = None,
            TokenTree::Group(g) if g.delimiter() == Delimiter::Brace => explicit = None,
            TokenTree::Ident(keyword) if keyword == "mod" => {
                let path = explicit.take();
                let Some(TokenTree::Ident(name)) = tokens.next() else {
                    continue;
                };
                let name = name.to_string();
                let name = name.strip_prefix("r#").unwrap_or(&name).to_owned();
                let mut child = module.to_vec();
                child.push(name.clone());
                match (tokens.next(), path) {
                    (Some(TokenTree::Punct(p)), Some(path)) if p.as_char() == ';' => {
                        out.push((file_dir.join(path), true, child));
                    }
                    (Some(TokenTree::Punct(p)), None) if p.as_char() == ';' => {
                        let flat = module_dir.join(format!("{name}.rs"));
                        if flat.exists() {
                            out.push((flat, false, child));
                        } else {
                            out.push((module_dir.join(&name).join("mod.rs"), true, child));
                        }
                    }
                    (Some(TokenTree::Group(inner)), path)
                        if inner.delimiter() == Delimiter::Brace =>
                    {
                        let nested = module_dir.join(path.unwrap_or(name));
                        declared_files(inner.stream(), file_dir, &nested, &child, out);
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
}

/// The value of an attribute `path = "…"` (the tokens inside `#[…]`).
fn path_attribute(attr: TokenStream) -> Option<String> {
    // Most attributes are doc comments, `derive`s and `cfg`s: not parsed.
    match attr.clone().into_iter().next() {
        Some(TokenTree::Ident(name)) if name == "path" => {}
        _ => return None,
    }
    match syn::parse2::<syn::Meta>(attr).ok()? {
        syn::Meta::NameValue(nv) if nv.path.is_ident("path") => match nv.value {
            syn::Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Str(s),
                ..
            }) => Some(s.value()),
            _ => None,
        },
        _ => None,
    }
}

/// Resolves `.` and `..` without touching the file system.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The files found from `src/main.rs`, relative to `src`, with their module paths.
    fn found(src: &Path, parse: Parse) -> Vec<(String, String)> {
        crate_files(&src.join("main.rs"), parse)
            .into_iter()
            .map(|f| {
                let path = f.path.strip_prefix(src).unwrap().display().to_string();
                (path, f.module.join("::"))
            })
            .collect()
    }

    fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(p, m)| (p.to_string(), m.to_string()))
            .collect()
    }

    fn write(path: &Path, contents: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, contents).unwrap();
    }

    #[test]
    fn files_are_found_through_mod_declarations_with_their_module_paths() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        write(
            &src.join("main.rs"),
            "mod book;\nmod net;\nmod inline { mod deep; }\n#[path = \"other/x.rs\"]\nmod renamed;\nmod missing;\nfn main() {}\n",
        );
        write(&src.join("book.rs"), "mod orders;\n");
        write(&src.join("book/orders.rs"), "fn f() {}\n");
        write(&src.join("net/mod.rs"), "mod tcp;\n");
        write(&src.join("net/tcp.rs"), "");
        write(&src.join("inline/deep.rs"), "");
        write(&src.join("other/x.rs"), "");

        let files = found(&src, Parse::Every);

        let expected = [
            ("main.rs", ""),
            ("book.rs", "book"),
            ("book/orders.rs", "book::orders"),
            ("net/mod.rs", "net"),
            ("net/tcp.rs", "net::tcp"),
            ("inline/deep.rs", "inline::deep"),
            ("other/x.rs", "renamed"),
        ];
        assert_eq!(files, owned(&expected));
    }

    #[test]
    fn only_files_that_hold_the_word_are_parsed_and_the_others_still_declare_their_modules() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        write(&src.join("lib.rs"), "mod tables;\nmod alloc;\n");
        write(
            &src.join("tables.rs"),
            "pub const T: [u8; 2] = [1, 2];\nmod inline { pub const MODE: u8 = 1; }\n",
        );
        write(
            &src.join("alloc.rs"),
            "#[global_allocator]\nstatic A: std::alloc::System = std::alloc::System;\n",
        );

        let items: Vec<(String, usize)> =
            crate_files(&src.join("lib.rs"), Parse::Containing("global_allocator"))
                .into_iter()
                .map(|f| (f.module.join("::"), f.syntax.items.len()))
                .collect();

        let expected = [("", 0), ("tables", 0), ("alloc", 1)];
        let expected: Vec<(String, usize)> =
            expected.iter().map(|(m, n)| (m.to_string(), *n)).collect();
        assert_eq!(items, expected);
    }

    #[test]
    fn module_declarations_are_read_from_tokens_as_rustc_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        write(
            &src.join("main.rs"),
            "#!/usr/bin/env run-cargo-script\n\
             #![allow(dead_code)]\n\
             #[cfg(test)]\n#[path = \"t/x.rs\"] pub(crate) mod r#type;\n\
             fn f() { mod in_block { } }\n\
             macro_rules! m { () => { mod from_macro; } }\n\
             #[path = \"elsewhere\"]\nmod inline { mod deep; }\n\
             const S: &str = \"mod not_code;\";\n\
             // mod commented;\n\
             mod plain;\n",
        );
        for file in ["t/x.rs", "elsewhere/deep.rs", "plain.rs"] {
            write(&src.join(file), "");
        }

        let files = found(&src, Parse::Containing("global_allocator"));

        let expected = [
            ("main.rs", ""),
            ("t/x.rs", "type"),
            ("elsewhere/deep.rs", "inline::deep"),
            ("plain.rs", "plain"),
        ];
        assert_eq!(files, owned(&expected));
    }

    #[test]
    fn a_module_declared_in_a_file_of_its_own_is_told_from_inline_modules_and_lookalikes() {
        for declares in [
            "mod a;",
            "pub(crate) mod r#type ;",
            "#[cfg(test)]\nmod\n    tests\n;",
            "fn f() {}\nmod inline { mod nested; }",
        ] {
            assert!(declares_module_file(declares), "{declares:?}");
        }
        for inline in [
            "mod a { }",
            "let model;",
            "mode = 1;",
            "mod;",
            "unimod x;",
            "",
        ] {
            assert!(!declares_module_file(inline), "{inline:?}");
        }
    }
}
