//! The shipped tariff files (`tariffs/` at the workspace root) as test fixtures.

use billing_core::{Tariff, TariffBook};
use std::path::PathBuf;

/// The path of shipped tariff file `name` (e.g. `nanan-2025.toml`).
pub fn path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tariffs")
        .join(name)
}

/// The text of shipped tariff file `name`.
///
/// # Panics
/// When the file is missing: the fixture is wrong.
pub fn text(name: &str) -> String {
    let p = path(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Shipped tariff file `name`, parsed (named by its file name, as the golden tests expect).
///
/// # Panics
/// When it does not parse: the fixture is wrong.
pub fn shipped(name: &str) -> Tariff {
    Tariff::parse(name, &text(name)).unwrap_or_else(|e| panic!("{e}"))
}

/// A book of shipped tariff files.
///
/// # Panics
/// When one does not parse or two overlap.
pub fn book(names: &[&str]) -> TariffBook {
    TariffBook::new(names.iter().map(|n| shipped(n))).unwrap_or_else(|e| panic!("{e}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_shipped_book_loads() {
        let b = super::book(&["nanan-2025.toml"]);
        assert_eq!(b.versions().len(), 1);
        assert!(super::text("nanan-2025.toml").contains("[[classes]]"));
    }
}
