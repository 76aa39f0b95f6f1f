//! Unique names: parallel tests (and nextest's one process per test) must never share a topic
//! root, a client id or a database.

use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A suffix no other call in any process of this run returns: the process id, a per-process
/// counter and 32 random bits.
pub fn suffix() -> String {
    format!(
        "{}-{}-{:08x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    )
}

/// A topic root no other test uses: `test/{name}/{suffix}`.
pub fn unique_prefix(name: &str) -> String {
    format!("test/{name}/{}", suffix())
}

/// An MQTT client id no other test uses (no `/`, which some brokers refuse in ids).
pub fn client_id(name: &str) -> String {
    format!("{}-{}", name.replace('/', "-"), suffix())
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_differ_and_keep_their_shape() {
        let a = super::unique_prefix("x");
        let b = super::unique_prefix("x");
        assert_ne!(a, b);
        assert!(a.starts_with("test/x/"), "{a}");
        let id = super::client_id("a/b");
        assert!(id.starts_with("a-b-") && !id.contains('/'), "{id}");
    }
}
