//! Helpers shared by the decoders' integration tests.
#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;

/// Locates `../shared` (env `WM_SHARED_DIR`, then `<workspace>/../shared`, then `/work/shared`).
///
/// Panics loudly when the corpus is missing: a conformance test that silently passes on no
/// data would hide regressions.
pub fn shared_dir() -> PathBuf {
    let mut candidates = Vec::new();
    if let Ok(dir) = std::env::var("WM_SHARED_DIR") {
        candidates.push(PathBuf::from(dir));
    }
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    candidates.push(workspace.join("../shared"));
    candidates.push(PathBuf::from("/work/shared"));
    for c in &candidates {
        if c.join("conformance").is_dir() {
            return c.clone();
        }
    }
    panic!(
        "conformance corpus not found: set WM_SHARED_DIR to the shared/ directory (tried {candidates:?})"
    );
}

/// Parses space-separated or contiguous hex.
pub fn hex(s: &str) -> Vec<u8> {
    let clean: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    hex::decode(clean).expect("valid hex")
}

/// Parses space-separated hex tokens leniently (a one-digit token is one byte).
pub fn hex_tokens(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .filter_map(|t| u8::from_str_radix(t, 16).ok())
        .collect()
}
