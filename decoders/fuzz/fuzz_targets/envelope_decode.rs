#![no_main]
// IoT-platform push envelopes: every uplink of the push, its inner frame and radio records;
// an uplink re-encoded in the generic format must decode to the same device and payload.
use decoders::envelope::{Platform, decode_envelope, decode_envelopes, encode_envelope};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = decode_envelope(data);
    let Ok(all) = decode_envelopes(data) else {
        return;
    };
    for env in all {
        let _ = env.decode_frame();
        let _ = env.signal_records();
        for platform in [Platform::Generic, Platform::CtWing, Platform::OneNet] {
            let body = encode_envelope(platform, &env);
            if let Ok(again) = decode_envelope(&body) {
                assert_eq!(again.device_id, env.device_id);
                assert_eq!(again.payload, env.payload);
            }
        }
    }
});
