#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = decoders::mbus::parse_link(data);
    let _ = decoders::detect(data);
});
