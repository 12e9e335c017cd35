//! `--instrument PATTERN`: which functions of the user's crates get
//! `#[memscope::instrument]` in the scratch copy, so that reports name their scopes
//! and variables without the user editing a file.
//!
//! A pattern is either
//!
//! - a **path** (no `/`, not ending in `.rs`): a module, a type or a function, as
//!   `::`-separated names inside a crate: `book`, `book::OrderBook`,
//!   `book::OrderBook::match_orders`. It selects every function whose path starts with
//!   it, so a module brings the modules inside it (as the attribute on an inline `mod`
//!   does) and a type brings the methods of its `impl` blocks. `crate::book` is the
//!   same as `book`; `crate` alone is the whole crate; `mylib::cache` names a module
//!   of the workspace crate `mylib`. Paths are looked up in every workspace crate that
//!   the command builds (the program and the workspace libraries it links; for
//!   `test`, every crate tested).
//! - a **file** (contains `/` or ends in `.rs`): `src/book.rs`, relative to the current
//!   directory or to the workspace root, or absolute; a directory stands for the files
//!   under it. It selects the functions written in that file (not in the files of its
//!   `mod name;` children).
//!
//! In both, `*` matches any run of characters, `::` and `/` included (the globs of the
//! suppressions file): `*::tests`, `src/*.rs`.
//!
//! The functions are free functions, methods and associated functions in `impl`
//! blocks, and default methods of traits. Left alone: functions under an attribute of
//! their own or inside an annotated `impl` or `mod` (they are instrumented already),
//! `const fn`s (they may run at compile time), `extern` blocks (no bodies), functions
//! written by macros (`macro_rules!` bodies and macro calls are not code before
//! expansion), and functions nested in function bodies (the attribute leaves those
//! alone too). A pattern that selects nothing instrumentable is an error that says
//! what is there.
//!
//! The attribute goes in front of the function's own attributes, on the same line, so
//! line numbers stay those of the user's file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::bail;
use quote::ToTokens;

use crate::gate::glob;
use crate::modules::{normalize, LineColumn, SourceFile};

/// What is inserted in front of a selected function.
pub const ATTRIBUTE: &str = "#[::memscope::instrument] ";

/// One `--instrument` pattern, as the user wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    is_file: bool,
}

impl Pattern {
    /// Parses a pattern (clap's value parser).
    pub fn parse(text: &str) -> Result<Pattern, String> {
        let is_file = text.contains('/') || text.ends_with(".rs");
        let valid = is_file
            || text.trim_start_matches("::").split("::").all(|s| {
                !s.is_empty() && s.chars().all(|c| c.is_alphanumeric() || "_*".contains(c))
            });
        if text.is_empty() || !valid {
            return Err(format!(
                "`{text}` is neither a path (`book`, `crate::book::OrderBook`) nor a file (`src/book.rs`)"
            ));
        }
        Ok(Pattern {
            text: text.to_owned(),
            is_file,
        })
    }
}

/// A workspace crate the command builds, with its files.
pub struct Crate<'a> {
    /// Its crate name (`-` replaced by `_`).
    pub name: String,
    pub files: &'a [SourceFile],
}

/// Where the attribute goes: file → positions.
pub type Insertions = BTreeMap<PathBuf, BTreeSet<LineColumn>>;

/// The functions of `crates` that `patterns` select; an error for a pattern that
/// selects none that can be instrumented. File patterns are relative to `cwd` or
/// `ws_root`; files outside `ws_root` are never selected.
pub fn plan(
    patterns: &[Pattern],
    crates: &[Crate],
    ws_root: &Path,
    cwd: &Path,
) -> anyhow::Result<Insertions> {
    let mut functions = Vec::new();
    let mut modules: BTreeSet<(usize, Vec<String>)> = BTreeSet::new();
    for (c, krate) in crates.iter().enumerate() {
        for file in krate.files.iter().filter(|f| f.path.starts_with(ws_root)) {
            modules.insert((c, file.module.clone()));
            let mut walk = Walk {
                krate: c,
                file: &file.path,
                module: file.module.clone(),
                functions: &mut functions,
                modules: &mut modules,
            };
            walk.items(&file.syntax.items, false);
        }
    }

    let mut insertions = Insertions::new();
    for pattern in patterns {
        let bases: Vec<String> = [cwd, ws_root]
            .iter()
            .map(|base| {
                normalize(&base.join(&pattern.text))
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        let selects = |f: &Function| {
            if pattern.is_file {
                file_matches(&bases, f.file)
            } else {
                path_matches(&pattern.text, &crates[f.krate].name, &f.path)
            }
        };
        let selected: Vec<&Function> = functions.iter().filter(|f| selects(f)).collect();
        if selected.iter().any(|f| f.status != Status::Skipped) {
            for f in selected.iter().filter(|f| f.status == Status::Instrument) {
                insertions
                    .entry(f.file.to_path_buf())
                    .or_default()
                    .insert(f.at);
            }
            continue;
        }
        if !selected.is_empty() {
            bail!(
                "--instrument {}: selects only const fns, which cannot be instrumented (they may run at compile time)",
                pattern.text
            );
        }
        let what = if pattern.is_file { "file" } else { "module" };
        let matched_place = if pattern.is_file {
            crates
                .iter()
                .flat_map(|c| c.files)
                .any(|f| file_matches(&bases, &f.path))
        } else {
            modules
                .iter()
                .any(|(c, m)| path_matches(&pattern.text, &crates[*c].name, m))
        };
        if matched_place {
            bail!(
                "--instrument {}: the {what} it names has no function to instrument (functions made by macros are not seen)",
                pattern.text
            );
        }
        let known = if pattern.is_file {
            let files: BTreeSet<String> = crates
                .iter()
                .flat_map(|c| c.files)
                .filter_map(|f| f.path.strip_prefix(ws_root).ok())
                .map(|p| p.display().to_string())
                .collect();
            format!("files there: {}", list(files))
        } else {
            let names: BTreeSet<String> = modules
                .iter()
                .filter(|(_, m)| !m.is_empty())
                .map(|(_, m)| m.join("::"))
                .collect();
            if names.is_empty() {
                "they have no modules; `crate` selects every function".to_owned()
            } else {
                format!("modules there: {}", list(names))
            }
        };
        let names: Vec<&str> = crates.iter().map(|c| c.name.as_str()).collect();
        bail!(
            "--instrument {}: no {what} of the crates built ({}) matches it; {known}",
            pattern.text,
            names.join(", ")
        );
    }
    Ok(insertions)
}

/// At most eight names, comma-separated.
fn list(names: BTreeSet<String>) -> String {
    const SHOWN: usize = 8;
    let mut shown: Vec<String> = names.iter().take(SHOWN).cloned().collect();
    if names.len() > SHOWN {
        shown.push(format!("… ({} more)", names.len() - SHOWN));
    }
    shown.join(", ")
}

/// Whether `pattern` selects the item at `path` (module names, then maybe a type and
/// a function name) of crate `krate`: it matches the path or one of its prefixes.
fn path_matches(pattern: &str, krate: &str, path: &[String]) -> bool {
    let pattern = pattern.trim_start_matches("::");
    if pattern == "crate" {
        return true;
    }
    let (pattern, anchored) = match pattern.strip_prefix("crate::") {
        Some(rest) => (rest, true),
        None => (pattern, false),
    };
    let mut relative = String::new();
    if !anchored && glob(pattern, krate) {
        return true;
    }
    for segment in path {
        if !relative.is_empty() {
            relative.push_str("::");
        }
        relative.push_str(segment);
        if glob(pattern, &relative) || (!anchored && glob(pattern, &format!("{krate}::{relative}")))
        {
            return true;
        }
    }
    false
}

/// Whether one of the pattern's resolved forms matches `file` or a directory above it.
fn file_matches(bases: &[String], file: &Path) -> bool {
    let file = file.to_string_lossy();
    bases
        .iter()
        .any(|p| glob(p, &file) || glob(&format!("{p}/*"), &file))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Instrument,
    /// Under `#[memscope::instrument]` already.
    Annotated,
    /// Cannot be instrumented (`const fn`).
    Skipped,
}

#[derive(Debug)]
struct Function<'a> {
    krate: usize,
    file: &'a Path,
    /// Module names, then the type or trait for a method, then the function's name.
    path: Vec<String>,
    /// Where the attribute goes.
    at: LineColumn,
    status: Status,
}

/// Collects the functions of one file.
struct Walk<'a, 'f> {
    krate: usize,
    file: &'a Path,
    module: Vec<String>,
    functions: &'f mut Vec<Function<'a>>,
    modules: &'f mut BTreeSet<(usize, Vec<String>)>,
}

impl<'a> Walk<'a, '_> {
    fn items(&mut self, items: &[syn::Item], annotated: bool) {
        for item in items {
            match item {
                syn::Item::Fn(f) => {
                    let at = start(&f.attrs, &f.vis, &f.sig);
                    self.function(&f.attrs, &f.sig, None, at, annotated);
                }
                syn::Item::Impl(i) => {
                    let annotated = annotated || has_instrument(&i.attrs);
                    let owner = type_name(&i.self_ty);
                    for item in &i.items {
                        if let syn::ImplItem::Fn(f) = item {
                            let at = start(&f.attrs, &f.vis, &f.sig);
                            self.function(&f.attrs, &f.sig, Some(&owner), at, annotated);
                        }
                    }
                }
                syn::Item::Trait(t) => {
                    let owner = t.ident.to_string();
                    for item in &t.items {
                        if let syn::TraitItem::Fn(f) = item {
                            if f.default.is_some() {
                                let at = start(&f.attrs, &syn::Visibility::Inherited, &f.sig);
                                self.function(&f.attrs, &f.sig, Some(&owner), at, annotated);
                            }
                        }
                    }
                }
                syn::Item::Mod(m) => {
                    let Some((_, inner)) = &m.content else {
                        continue; // its file is walked on its own
                    };
                    self.module.push(m.ident.to_string());
                    self.modules.insert((self.krate, self.module.clone()));
                    self.items(inner, annotated || has_instrument(&m.attrs));
                    self.module.pop();
                }
                // `extern` blocks have no bodies; macro calls are not code yet.
                _ => {}
            }
        }
    }

    fn function(
        &mut self,
        attrs: &[syn::Attribute],
        sig: &syn::Signature,
        owner: Option<&str>,
        at: LineColumn,
        annotated: bool,
    ) {
        let status = if annotated || has_instrument(attrs) {
            Status::Annotated
        } else if sig.constness.is_some() {
            Status::Skipped
        } else {
            Status::Instrument
        };
        let mut path = self.module.clone();
        path.extend(owner.map(str::to_owned));
        path.push(sig.ident.to_string());
        self.functions.push(Function {
            krate: self.krate,
            file: self.file,
            path,
            at,
            status,
        });
    }
}

/// Where a function item begins: its first outer attribute (doc comments included),
/// else its visibility, else its signature.
fn start(attrs: &[syn::Attribute], vis: &syn::Visibility, sig: &syn::Signature) -> LineColumn {
    let span = match attrs
        .iter()
        .find(|a| matches!(a.style, syn::AttrStyle::Outer))
    {
        Some(attr) => attr.pound_token.span,
        None => match vis {
            syn::Visibility::Public(p) => p.span,
            syn::Visibility::Restricted(r) => r.pub_token.span,
            syn::Visibility::Inherited => {
                let first = sig.constness.map(|t| t.span);
                let first = first.or(sig.asyncness.map(|t| t.span));
                let first = first.or(sig.unsafety.map(|t| t.span));
                let first = first.or(sig.abi.as_ref().map(|a| a.extern_token.span));
                first.unwrap_or(sig.fn_token.span)
            }
        },
    };
    let at = span.start();
    (at.line, at.column)
}

/// `#[memscope::instrument]` under any path that names memscope (`::memscope::…`,
/// `memscope::…`, a renamed `ms::instrument` is not recognised).
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

/// The name a method's path uses for the type of its `impl` block: the last segment
/// of a path type (`Book` for `impl<T> crate::Book<T>`), through references.
fn type_name(ty: &syn::Type) -> String {
    match ty {
        syn::Type::Path(p) => p
            .path
            .segments
            .last()
            .map_or_else(String::new, |s| s.ident.to_string()),
        syn::Type::Reference(r) => type_name(&r.elem),
        syn::Type::Paren(p) => type_name(&p.elem),
        syn::Type::Group(g) => type_name(&g.elem),
        other => other.to_token_stream().to_string().replace(' ', ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(path: &str, module: &[&str], text: &str) -> SourceFile {
        SourceFile {
            path: PathBuf::from(path),
            module: module.iter().map(|s| s.to_string()).collect(),
            syntax: syn::parse_file(text).unwrap(),
        }
    }

    /// The lines that get the attribute, per file, for `patterns`.
    fn lines(patterns: &[&str], files: &[SourceFile]) -> anyhow::Result<Vec<(String, usize)>> {
        let patterns: Vec<Pattern> = patterns
            .iter()
            .map(|p| Pattern::parse(p).unwrap())
            .collect();
        let crates = [Crate {
            name: "app".into(),
            files,
        }];
        let plan = plan(&patterns, &crates, Path::new("/ws"), Path::new("/ws"))?;
        Ok(plan
            .into_iter()
            .flat_map(|(file, at)| {
                let file = file.display().to_string();
                at.into_iter().map(move |(line, _)| (file.clone(), line))
            })
            .collect())
    }

    const BOOK: &str = "\
pub struct Book;
impl Book {
    pub fn new() -> Book { Book }
    const fn capacity() -> usize { 4 }
    #[memscope::instrument]
    fn annotated(&self) {}
}
/// Doc.
#[inline]
pub(crate) fn free() { fn nested() {} }
extern \"C\" { fn abs(x: i32) -> i32; }
macro_rules! make { () => { fn made() {} } }
make!();
trait Describe {
    fn describe(&self) -> String { String::new() }
    fn required(&self);
}
mod inner {
    unsafe extern \"C\" fn callback() {}
}
#[memscope::instrument(skip_vars)]
mod done {
    fn already() {}
}
";

    fn files() -> Vec<SourceFile> {
        vec![
            source("/ws/src/main.rs", &[], "mod book;\nfn main() {}\n"),
            source("/ws/src/book.rs", &["book"], BOOK),
        ]
    }

    #[test]
    fn a_module_selects_its_functions_but_not_const_annotated_foreign_macro_or_nested_ones() {
        let got = lines(&["book"], &files()).unwrap();
        let book = |line| ("/ws/src/book.rs".to_string(), line);
        // new, free (at its doc comment), describe, callback.
        assert_eq!(got, [book(3), book(8), book(15), book(19)]);
    }

    #[test]
    fn types_functions_files_and_globs_select_what_they_name() {
        let main = || ("/ws/src/main.rs".to_string(), 2);
        let new = || ("/ws/src/book.rs".to_string(), 3);
        assert_eq!(lines(&["book::Book"], &files()).unwrap(), [new()]);
        assert_eq!(
            lines(&["crate::book::Book::new"], &files()).unwrap(),
            [new()]
        );
        assert_eq!(lines(&["app::*::new"], &files()).unwrap(), [new()]);
        assert_eq!(lines(&["src/main.rs"], &files()).unwrap(), [main()]);
        assert_eq!(
            lines(&["./src/../src/main.rs"], &files()).unwrap(),
            [main()]
        );
        assert_eq!(lines(&["main"], &files()).unwrap(), [main()]);
        assert_eq!(lines(&["src/"], &files()).unwrap().len(), 5);
        assert_eq!(lines(&["crate"], &files()).unwrap().len(), 5);
        assert_eq!(lines(&["book", "book::Book"], &files()).unwrap().len(), 4);
    }

    #[test]
    fn a_pattern_that_selects_nothing_is_a_one_line_error_naming_what_is_there() {
        let err = lines(&["bok"], &files()).unwrap_err().to_string();
        assert_eq!(
            err,
            "--instrument bok: no module of the crates built (app) matches it; modules there: book, book::done, book::inner"
        );
        let err = lines(&["src/bok.rs"], &files()).unwrap_err().to_string();
        assert_eq!(
            err,
            "--instrument src/bok.rs: no file of the crates built (app) matches it; files there: src/book.rs, src/main.rs"
        );
        let err = lines(&["book::Book::capacity"], &files())
            .unwrap_err()
            .to_string();
        assert!(err.contains("selects only const fns"), "{err}");
        // Already annotated: nothing to add, and nothing wrong.
        assert_eq!(lines(&["book::done"], &files()).unwrap(), []);
    }

    #[test]
    fn patterns_are_paths_or_files() {
        assert!(Pattern::parse("book::*").is_ok());
        assert!(Pattern::parse("src/book.rs").unwrap().is_file);
        assert!(Pattern::parse("lib.rs").unwrap().is_file);
        for bad in ["", "book::", "a b", "book.x"] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
    }
}
