//! The layout of `report.json`: indented like `serde_json`'s pretty printer, except
//! that an array whose first element is a number stays on one line. Stacks are arrays
//! of frame indexes; one per line, a suite's report is a third longer and slower to
//! write, and no easier to read.

use std::io::{self, Write};

use serde::Serialize;
use serde_json::ser::Formatter;

use crate::report::{Report, Site};

/// `serde_json` formatter for the layout above.
#[derive(Default)]
pub struct ReportLayout {
    depth: usize,
    /// Whether the innermost open array or object has a value yet.
    has_value: bool,
    /// Per open array: whether it is laid out on one line, once its first value says.
    arrays: Vec<Option<bool>>,
    /// An array value was begun (`Some(first)`) and not placed yet: where it goes
    /// depends on what it is.
    pending: Option<bool>,
}

impl ReportLayout {
    fn indent<W: ?Sized + Write>(&self, w: &mut W) -> io::Result<()> {
        for _ in 0..self.depth {
            w.write_all(b"  ")?;
        }
        Ok(())
    }

    /// Puts the separator before an array value, now that it is known to be a number
    /// or not.
    fn place<W: ?Sized + Write>(&mut self, w: &mut W, number: bool) -> io::Result<()> {
        let Some(first) = self.pending.take() else {
            return Ok(());
        };
        let one_line = *self
            .arrays
            .last_mut()
            .expect("array values are inside an array")
            .get_or_insert(number);
        match (one_line, first) {
            (true, true) => Ok(()),
            (true, false) => w.write_all(b", "),
            (false, first) => {
                w.write_all(if first { b"\n" } else { b",\n" })?;
                self.indent(w)
            }
        }
    }
}

macro_rules! numbers {
    ($($method:ident: $ty:ty),* $(,)?) => {
        $(
            fn $method<W: ?Sized + Write>(&mut self, w: &mut W, value: $ty) -> io::Result<()> {
                self.place(w, true)?;
                serde_json::ser::CompactFormatter.$method(w, value)
            }
        )*
    };
}

impl Formatter for ReportLayout {
    numbers! {
        write_i8: i8, write_i16: i16, write_i32: i32, write_i64: i64, write_i128: i128,
        write_u8: u8, write_u16: u16, write_u32: u32, write_u64: u64, write_u128: u128,
        write_f32: f32, write_f64: f64, write_number_str: &str,
    }

    fn write_null<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.place(w, false)?;
        w.write_all(b"null")
    }

    fn write_bool<W: ?Sized + Write>(&mut self, w: &mut W, value: bool) -> io::Result<()> {
        self.place(w, false)?;
        w.write_all(if value { b"true" } else { b"false" })
    }

    fn begin_string<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.place(w, false)?;
        w.write_all(b"\"")
    }

    fn write_raw_fragment<W: ?Sized + Write>(&mut self, w: &mut W, raw: &str) -> io::Result<()> {
        self.place(w, false)?;
        w.write_all(raw.as_bytes())
    }

    fn begin_array<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.place(w, false)?;
        self.depth += 1;
        self.has_value = false;
        self.arrays.push(None);
        w.write_all(b"[")
    }

    fn end_array<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.depth -= 1;
        let one_line = self.arrays.pop().flatten() == Some(true);
        if self.has_value && !one_line {
            w.write_all(b"\n")?;
            self.indent(w)?;
        }
        w.write_all(b"]")
    }

    fn begin_array_value<W: ?Sized + Write>(&mut self, _: &mut W, first: bool) -> io::Result<()> {
        self.pending = Some(first);
        Ok(())
    }

    fn end_array_value<W: ?Sized + Write>(&mut self, _: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }

    fn begin_object<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.place(w, false)?;
        self.depth += 1;
        self.has_value = false;
        w.write_all(b"{")
    }

    fn end_object<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.depth -= 1;
        if self.has_value {
            w.write_all(b"\n")?;
            self.indent(w)?;
        }
        w.write_all(b"}")
    }

    fn begin_object_key<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        w.write_all(if first { b"\n" } else { b",\n" })?;
        self.indent(w)
    }

    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }

    fn end_object_value<W: ?Sized + Write>(&mut self, _: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}

/// Writes `value` to `w` in the report's layout.
pub fn write<W: Write, T: serde::Serialize + ?Sized>(w: W, value: &T) -> serde_json::Result<()> {
    let mut serializer = serde_json::Serializer::with_formatter(w, ReportLayout::default());
    value.serialize(&mut serializer)
}

/// Sites below this many are laid out with the rest of the report: starting a thread
/// costs more than it saves.
const SITES_LAID_OUT_APART: usize = 1024;

/// Writes `report` to `w` in the report's layout, byte for byte what [`write`] writes.
/// A report's `sites` are most of it (a suite's tens of thousands of sites and their
/// stacks, three quarters of a 20 MiB file): when there are many, the second half is
/// laid out on another thread while this one lays out the rest, and the parts are
/// joined in place of the empty `sites` array that the rest then has.
pub fn write_report<W: Write>(mut w: W, report: &Report) -> io::Result<()> {
    let sites = &report.sites;
    if sites.len() < SITES_LAID_OUT_APART {
        return Ok(write(w, report)?);
    }
    let (first, second) = sites.split_at(sites.len() / 2);
    let (rest, first, second) = std::thread::scope(|scope| {
        let second = scope.spawn(|| site_elements(second));
        let rest = ELIDE_SITES.with(|elide| {
            elide.set(true);
            let mut rest = Vec::new();
            let laid_out = write(&mut rest, report);
            elide.set(false);
            laid_out.map(|()| rest)
        });
        let first = site_elements(first);
        let second = second
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (rest, first, second)
    });
    let (rest, first, second) = (rest?, first?, second?);
    let at = memchr::memmem::find(&rest, EMPTY_SITES)
        .expect("the report without its sites has an empty `sites` array at depth 1");
    // Up to the empty array's `[`, the sites, then its `]` on a line of its own.
    let close = at + EMPTY_SITES.len() - 1;
    w.write_all(&rest[..close])?;
    w.write_all(elements(&first))?;
    w.write_all(b",")?;
    w.write_all(elements(&second))?;
    w.write_all(b"\n  ")?;
    w.write_all(&rest[close..])?;
    Ok(())
}

/// How the report's `sites` key and its empty array are laid out: keys of the
/// top-level object are the only text indented by exactly two spaces after a line
/// break (a line break inside a string is escaped), so this occurs once.
const EMPTY_SITES: &[u8] = b"\n  \"sites\": []";

thread_local! {
    /// Set while [`write_report`] lays out the report without its sites.
    static ELIDE_SITES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `Report::sites`' serializer: the sites, or none while [`write_report`] lays them
/// out apart.
pub fn sites_unless_laid_out_apart<S: serde::Serializer>(
    sites: &[Site],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    if ELIDE_SITES.with(|elide| elide.get()) {
        serializer.collect_seq(std::iter::empty::<&Site>())
    } else {
        serializer.collect_seq(sites)
    }
}

/// `sites` as an array at the depth of a top-level value, the depth of the report's
/// `sites` array.
fn site_elements(sites: &[Site]) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::new();
    let layout = ReportLayout {
        depth: 1,
        ..ReportLayout::default()
    };
    sites.serialize(&mut serde_json::Serializer::with_formatter(
        &mut out, layout,
    ))?;
    Ok(out)
}

/// The elements of an array laid out by [`site_elements`], without its brackets: each
/// after its line break and indentation, with a comma between them.
fn elements(array: &[u8]) -> &[u8] {
    &array[b"[".len()..array.len() - b"\n  ]".len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn laid_out(value: &serde_json::Value) -> String {
        let mut out = Vec::new();
        write(&mut out, value).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn arrays_of_numbers_stay_on_one_line_and_everything_else_is_indented() {
        let value = serde_json::json!({
            "stack": [3, 1, 4],
            "empty": [],
            "names": ["a", "b"],
            "sites": [{"id": 0, "stack": [2, 7]}, {"share": 0.5, "pids": []}],
            "nested": [[1, 2], [3]],
            "none": null,
        });

        let expected = r#"{
  "empty": [],
  "names": [
    "a",
    "b"
  ],
  "nested": [
    [1, 2],
    [3]
  ],
  "none": null,
  "sites": [
    {
      "id": 0,
      "stack": [2, 7]
    },
    {
      "pids": [],
      "share": 0.5
    }
  ],
  "stack": [3, 1, 4]
}"#;
        assert_eq!(laid_out(&value), expected);
    }

    #[test]
    fn the_layout_reads_back_as_the_same_value() {
        let value = serde_json::json!({
            "a": [1, -2, 3.25, 18446744073709551615u64],
            "b": [{"c": [true, false, null]}, "d\n\"e\""],
            "f": {},
        });

        let text = laid_out(&value);

        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, value);
    }
}
