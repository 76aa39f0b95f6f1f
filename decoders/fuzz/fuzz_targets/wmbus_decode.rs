#![no_main]
// Wireless M-Bus: every layer, with a key (so decryption paths run) and without; the format
// cache is shared across the two calls so compact-frame lookups run too.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut cache = decoders::wmbus::FormatCache::new();
    let _ = decoders::wmbus::decode(data, &Some([0x42u8; 16]), &mut cache);
    let _ = decoders::wmbus::decode(data, &None, &mut cache);
});
