//! Where every key of the configuration file is: the file parsed once more into toml's spanned
//! document tree, so a validation error points at its own field's line (not at the enclosing
//! `[[source]]` header, and without searching the text for section names).

use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// One problem with a field of the configuration: its path, where it is, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field: `uplink.partitions`, `source[2].secret`,
    /// `source[0].devices[1].name`, `keys."mbus:KAM12345678"`.
    pub path: String,
    /// Byte range of the field (or of its nearest enclosing table present in the file);
    /// `None` when nothing of the path is in the file.
    pub span: Option<Range<usize>>,
    /// What is wrong and what was expected.
    pub message: String,
}

impl FieldError {
    /// The field name shown to people: the path without array indices
    /// (`source[2].secret` → `source.secret`).
    pub fn field(&self) -> String {
        let mut out = String::with_capacity(self.path.len());
        let mut in_index = false;
        let mut in_quotes = false;
        for c in self.path.chars() {
            match c {
                '"' => {
                    in_quotes = !in_quotes;
                    out.push(c);
                }
                '[' if !in_quotes => in_index = true,
                ']' if !in_quotes && in_index => in_index = false,
                _ if in_index => {}
                _ => out.push(c),
            }
        }
        out
    }
}

/// A validation error of a sub-configuration that names its field (`devices[2].name`).
pub trait FieldPath: std::fmt::Display {
    /// The field's path relative to the configuration it belongs to.
    fn field_path(&self) -> &str;
}

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

/// Splits `source[2].devices[0]."key.with.dots"` into steps.
fn steps(path: &str) -> Vec<Step> {
    let mut out = Vec::new();
    let mut chars = path.chars().peekable();
    let mut key = String::new();
    let flush = |key: &mut String, out: &mut Vec<Step>| {
        if !key.is_empty() {
            out.push(Step::Key(std::mem::take(key)));
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                for q in chars.by_ref() {
                    if q == '"' {
                        break;
                    }
                    key.push(q);
                }
            }
            '.' => flush(&mut key, &mut out),
            '[' => {
                flush(&mut key, &mut out);
                let mut n = String::new();
                for d in chars.by_ref() {
                    if d == ']' {
                        break;
                    }
                    n.push(d);
                }
                if let Ok(i) = n.parse() {
                    out.push(Step::Index(i));
                }
            }
            _ => key.push(c),
        }
    }
    flush(&mut key, &mut out);
    out
}

/// The spans of a configuration text.
#[derive(Debug)]
pub struct Spans<'t> {
    root: Option<Spanned<DeTable<'t>>>,
}

impl<'t> Spans<'t> {
    /// Indexes `text` (a text that does not parse has no spans; serde reports its error).
    pub fn new(text: &'t str) -> Self {
        Self {
            root: DeTable::parse(text).ok(),
        }
    }

    /// The span of the field at `path`, or of its nearest ancestor present in the file.
    pub fn span(&self, path: &str) -> Option<Range<usize>> {
        let root = self.root.as_ref()?;
        let mut table: Option<&DeTable<'t>> = Some(root.get_ref());
        let mut value: Option<&Spanned<DeValue<'t>>> = None;
        let mut best: Option<Range<usize>> = None;
        for step in steps(path) {
            let next = match (&step, table, value) {
                (Step::Key(k), Some(t), _) => t.get(k.as_str()),
                (Step::Index(i), _, Some(v)) => match v.get_ref() {
                    DeValue::Array(a) => a.get(*i),
                    _ => None,
                },
                _ => None,
            };
            let Some(next) = next else {
                break;
            };
            best = Some(next.span());
            value = Some(next);
            table = match next.get_ref() {
                DeValue::Table(t) => Some(t),
                _ => None,
            };
        }
        best
    }

    /// A [`FieldError`] at `path`, located.
    pub fn error(&self, path: impl Into<String>, message: impl Into<String>) -> FieldError {
        let path = path.into();
        FieldError {
            span: self.span(&path),
            path,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_to_their_own_lines() {
        let text = "a = 1\n[uplink]\npartitions = 0\n[[source]]\nid = \"x\"\n[[source]]\nid = \"y\"\nbaud = 7\n[source.keys]\n\"mbus:K.1\" = \"k\"\n";
        let spans = Spans::new(text);
        let at = |p: &str| {
            let s = spans.span(p).unwrap();
            text[..s.start].matches('\n').count() + 1
        };
        assert_eq!(at("uplink.partitions"), 3);
        assert_eq!(at("source[1].baud"), 8);
        assert_eq!(at("source[1].keys.\"mbus:K.1\""), 10);
        // A field that is not in the file: its table.
        assert_eq!(at("source[1].timeout"), at("source[1]"));
        assert_eq!(spans.span("nothing.here"), None);
        let e = spans.error("source[1].devices[0].name", "x");
        assert_eq!(e.field(), "source.devices.name");
    }
}
