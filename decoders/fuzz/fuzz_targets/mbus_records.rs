#![no_main]
// The application layer alone, as wM-Bus feeds it (from CI on) and as raw record payloads.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = decoders::mbus::decode_application(data);
    for record in decoders::mbus::records(data) {
        match record {
            Ok(r) => {
                let _ = r.number();
                let _ = r.to_record();
            }
            Err(_) => break,
        }
    }
});
