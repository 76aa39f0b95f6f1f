#![no_main]
// Whatever parses must re-encode to a frame that parses to the same value.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = decoders::cjt188::parse(data) {
        let again = decoders::cjt188::parse(&decoders::cjt188::encode(&frame));
        assert_eq!(again.as_ref(), Ok(&frame));
    }
});
