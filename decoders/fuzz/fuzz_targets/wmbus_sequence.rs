#![no_main]
// Wireless M-Bus telegram sequences through one FormatCache: AFL fragments (kept between
// telegrams until the last one), compact frames after full frames, and keyed modes 5/7/10.
// The input is split on the byte pair FF FE into telegrams; the first byte picks the key.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let key = (k & 1 == 1).then_some([k; 16]);
    let mut cache = decoders::wmbus::FormatCache::new();
    let mut start = 0usize;
    let mut i = 0usize;
    while i + 1 < rest.len() {
        if rest[i] == 0xFF && rest[i + 1] == 0xFE {
            let _ = decoders::wmbus::decode(&rest[start..i], &key, &mut cache);
            start = i + 2;
            i += 2;
        } else {
            i += 1;
        }
    }
    let _ = decoders::wmbus::decode(&rest[start..], &key, &mut cache);
});
