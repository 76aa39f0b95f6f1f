//! [`SmallString`]: the text fields of a decoded frame without a heap allocation for the
//! short ones (meter ids, manufacturer codes, dates, short hex), which are nearly all of them.

use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;

use serde::Serialize;

/// Bytes kept inline: with the tag this makes the type as large as a `String` (24 bytes).
pub(crate) const INLINE: usize = 22;

/// An immutable string that keeps up to 22 bytes inline and borrows static names, so that
/// decoding a frame allocates only for long texts (manufacturer data as hex, long plain text).
///
/// It reads as a `&str` (`Deref`), compares equal to `str`/`&str`/`String`, and its `Debug`,
/// `Display` and serde forms are those of the text, so it stands in for the `String`s the
/// frame types had.
#[derive(Clone)]
pub struct SmallString(Repr);

#[derive(Clone)]
enum Repr {
    /// `len` bytes of `buf` are valid UTF-8 (only ever copied from a `&str`).
    Inline {
        len: u8,
        buf: [u8; INLINE],
    },
    Static(&'static str),
    Heap(Box<str>),
}

impl SmallString {
    /// The empty string (no allocation).
    pub const fn new() -> Self {
        Self(Repr::Static(""))
    }

    /// A borrowed static string (no allocation, no copy).
    pub const fn from_static(text: &'static str) -> Self {
        Self(Repr::Static(text))
    }

    /// A copy of `text`: inline when it is short, on the heap otherwise.
    pub fn copy_of(text: &str) -> Self {
        let bytes = text.as_bytes();
        match (u8::try_from(bytes.len()), bytes.len() <= INLINE) {
            (Ok(len), true) => {
                let mut buf = [0u8; INLINE];
                if let Some(slot) = buf.get_mut(..bytes.len()) {
                    slot.copy_from_slice(bytes);
                }
                Self(Repr::Inline { len, buf })
            }
            _ => Self(Repr::Heap(text.into())),
        }
    }

    /// ASCII bytes as a string (inline when short); `None` when a byte is not ASCII.
    #[cfg(test)]
    pub(crate) fn from_ascii(bytes: &[u8]) -> Option<Self> {
        if !bytes.is_ascii() {
            return None;
        }
        std::str::from_utf8(bytes).ok().map(Self::copy_of)
    }

    /// The first `len` bytes of `buf`, which the decoders filled with ASCII (digits, hex,
    /// text they checked): taken as they are, not validated here, since [`Self::as_str`]
    /// validates on every read (a non-UTF-8 buffer reads as empty, it cannot be unsound).
    /// Building is the hot path, reading is not.
    pub(crate) fn from_ascii_buf(buf: [u8; INLINE], len: usize) -> Self {
        Self(Repr::Inline {
            len: u8::try_from(len.min(INLINE)).unwrap_or(0),
            buf,
        })
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Inline { len, buf } => buf
                .get(..usize::from(*len))
                .and_then(|b| std::str::from_utf8(b).ok())
                .unwrap_or(""),
            Repr::Static(s) => s,
            Repr::Heap(s) => s,
        }
    }
}

impl Default for SmallString {
    fn default() -> Self {
        Self::new()
    }
}

impl Deref for SmallString {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for SmallString {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for SmallString {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for SmallString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for SmallString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for SmallString {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl PartialEq for SmallString {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for SmallString {}

impl Hash for SmallString {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl PartialOrd for SmallString {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SmallString {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl PartialEq<str> for SmallString {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for SmallString {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for SmallString {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other.as_str()
    }
}

impl PartialEq<SmallString> for &str {
    fn eq(&self, other: &SmallString) -> bool {
        *self == other.as_str()
    }
}

impl PartialEq<SmallString> for String {
    fn eq(&self, other: &SmallString) -> bool {
        self.as_str() == other.as_str()
    }
}

impl From<&str> for SmallString {
    fn from(text: &str) -> Self {
        Self::copy_of(text)
    }
}

impl From<String> for SmallString {
    fn from(text: String) -> Self {
        if text.len() <= INLINE {
            Self::copy_of(&text)
        } else {
            Self(Repr::Heap(text.into_boxed_str()))
        }
    }
}

impl From<&String> for SmallString {
    fn from(text: &String) -> Self {
        Self::copy_of(text)
    }
}

impl From<SmallString> for String {
    fn from(text: SmallString) -> Self {
        match text.0 {
            Repr::Heap(s) => s.into_string(),
            _ => text.as_str().to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_inline_long_text_on_the_heap_and_both_read_back() {
        let short = SmallString::from("2026-11-24T10:43:05");
        assert!(matches!(short.0, Repr::Inline { len: 19, .. }));
        assert_eq!(short, "2026-11-24T10:43:05");
        let edge = SmallString::from("a".repeat(INLINE).as_str());
        assert!(matches!(edge.0, Repr::Inline { .. }));
        assert_eq!(edge.len(), INLINE);
        let long = SmallString::from("b".repeat(INLINE + 1));
        assert!(matches!(long.0, Repr::Heap(_)));
        assert_eq!(long.as_str(), "b".repeat(INLINE + 1));
        assert_eq!(SmallString::from("ü€").as_str(), "ü€");
        assert_eq!(std::mem::size_of::<SmallString>(), 24);
    }

    #[test]
    fn debug_display_and_json_are_the_text() {
        let s = SmallString::from_static("water");
        assert_eq!(format!("{s:?}"), format!("{:?}", "water"));
        assert_eq!(format!("{:?}", Some(s.clone())), "Some(\"water\")");
        assert_eq!(s.to_string(), "water");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"water\"");
        assert_eq!(SmallString::from("x"), SmallString::from(String::from("x")));
    }

    #[test]
    fn from_ascii_refuses_non_ascii() {
        assert_eq!(SmallString::from_ascii(b"KAM").unwrap(), "KAM");
        assert!(SmallString::from_ascii(&[0x4B, 0xC3, 0xA4]).is_none());
    }
}
