//! The shipped register maps decode hand-computed register vectors, round-trip through the
//! encoder, and map files with mistakes are rejected with file, line and field.

use decoders::RecordValue;
use decoders::modbus::{RegisterFunction, RegisterMap, decode, decode_function, encode};
use edge_config::register_map::{self, RegisterMapError};
use model::{Decimal, Unit};

/// Decodes a block and returns (quantity, subunit, value, unit) per record.
fn rows(
    map: &RegisterMap,
    function: RegisterFunction,
    start: u16,
    words: &[u16],
) -> Vec<(String, u32, Decimal, Option<Unit>)> {
    decode_function(map, function, start, words)
        .unwrap()
        .into_iter()
        .map(|r| match r.value {
            RecordValue::Number(n) => (r.quantity.to_string(), u32::from(r.subunit), n, r.unit),
            other => panic!("not a number: {other:?}"),
        })
        .collect()
}

fn d(text: &str) -> Decimal {
    text.parse().unwrap()
}

fn q(quantity: &str, value: Decimal, unit: Option<Unit>) -> (String, u32, Decimal, Option<Unit>) {
    (quantity.to_owned(), 0, value, unit)
}

/// Asserts the value of the first decoded record of each quantity in `expected` (decimal
/// text), naming the quantity when one is missing or wrong.
#[track_caller]
fn assert_values(got: &[(String, u32, Decimal, Option<Unit>)], expected: &[(&str, &str)]) {
    for (quantity, value) in expected {
        let found = got.iter().find(|r| r.0 == *quantity).map(|r| r.2);
        assert_eq!(found, Some(d(value)), "{quantity}");
    }
}

#[test]
fn every_builtin_map_loads_and_its_file_matches() {
    for name in register_map::builtin_names() {
        let map = register_map::builtin(name).unwrap();
        assert_eq!(map.model, name);
        let path = format!("{}/maps/{name}.toml", env!("CARGO_MANIFEST_DIR"));
        assert_eq!(register_map::load(&path).unwrap(), map, "{path}");
        // The planned reads cover every value.
        let plan = map.read_plan(125, 8);
        for spec in &map.registers {
            assert!(
                plan.iter().any(|b| b.function == spec.function
                    && b.start <= spec.address
                    && u32::from(spec.address) + u32::from(spec.data_type.width())
                        <= u32::from(b.start) + u32::from(b.count)),
                "{name}: {} not covered by {plan:?}",
                spec.name
            );
        }
    }
    assert!(matches!(
        register_map::builtin("nope"),
        Err(RegisterMapError::UnknownBuiltin { .. })
    ));
}

#[test]
fn generic_emf_vector() {
    let map = register_map::builtin("generic-emf").unwrap();
    let words = [
        0x4148, 0x0000, // 0: flow 12.5 m³/h
        0x3F40, 0x0000, // 2: velocity 0.75 m/s
        0x41C8, 0x0000, // 4: 25 % of full scale
        0x0012, 0xD687, // 6: forward 1 234 567 L
        0x0000, 0x037A, // 8: reverse 890 L
        0x0012, 0xD30D, // 10: net 1 233 677 L
        0x3EB3, 0x3333, // 12: pressure 0.35 MPa
        0x0001, // 14: alarm bit 0 (empty pipe)
    ];
    assert_eq!(
        rows(&map, RegisterFunction::Holding, 0, &words),
        vec![
            q("volume_flow", d("12.5"), Some(Unit::CubicMetrePerHour)),
            q("velocity", d("0.75"), None),
            q("flow_percent", d("25"), Some(Unit::Percent)),
            q("volume", d("1234.567"), Some(Unit::CubicMetre)),
            q("volume_reverse", d("0.890"), Some(Unit::CubicMetre)),
            q("volume_net", d("1233.677"), Some(Unit::CubicMetre)),
            q("pressure", d("0.35"), Some(Unit::Megapascal)),
            q("status_word", d("1"), None),
        ]
    );
    // The encoder gives the same registers back.
    let values = [
        ("flow", d("12.5")),
        ("velocity", d("0.75")),
        ("flow_percent", d("25")),
        ("forward_total", d("1234.567")),
        ("reverse_total", d("0.89")),
        ("net_total", d("1233.677")),
        ("pressure", d("0.35")),
        ("alarm", d("1")),
    ];
    assert_eq!(map.register_span(), Some((0, 15)));
    assert_eq!(encode(&map, &values).unwrap(), words);
}

#[test]
fn pressure_transmitter_vector() {
    let map = register_map::builtin("pressure-transmitter").unwrap();
    // Holding 2..5: unit code 1 (MPa), 3 decimals, value 352 → 0.352 MPa.
    assert_eq!(
        rows(
            &map,
            RegisterFunction::Holding,
            2,
            &[0x0001, 0x0003, 0x0160]
        ),
        vec![
            q("unit_code", d("1"), None),
            q("decimal_places", d("3"), None),
            q("pressure", d("0.352"), Some(Unit::Megapascal)),
        ]
    );
    // Below zero (vacuum): 0xFFFB = -5 → -0.005 MPa.
    assert_eq!(
        rows(&map, RegisterFunction::Holding, 4, &[0xFFFB]),
        vec![q("pressure", d("-0.005"), Some(Unit::Megapascal))]
    );
    // Input 0x10..0x15: 3.52 bar, level 35.9 m, 22.5 °C (0x00E1 = 225 × 0.1).
    assert_eq!(
        rows(
            &map,
            RegisterFunction::Input,
            0x10,
            &[0x4061, 0x47AE, 0x420F, 0x999A, 0x00E1]
        ),
        vec![
            q("pressure", d("3.52"), Some(Unit::Bar)),
            q("level", d("35.9"), Some(Unit::Metre)),
            q("temperature", d("22.5"), Some(Unit::DegreeCelsius)),
        ]
    );
}

#[test]
fn tuf_2000m_vector_is_word_swapped() {
    let map = register_map::builtin("tuf-2000m").unwrap();
    let mut words = vec![0u16; 36];
    let mut put = |addr: usize, w: [u16; 2]| {
        words[addr] = w[0];
        words[addr + 1] = w[1];
    };
    put(0, [0xF3B6, 0x3F9D]); // flow 1.234 m³/h (0x3F9DF3B6, low word first)
    put(8, [0x04D2, 0x0000]); // positive total 1234 m³
    put(10, [0x0000, 0x3F00]); // positive fraction 0.5
    put(12, [0x0007, 0x0000]); // negative total 7
    put(14, [0x0000, 0x3E80]); // negative fraction 0.25
    put(24, [0x04CB, 0x0000]); // net total 1227
    put(26, [0x0000, 0x3E80]); // net fraction 0.25
    put(32, [0x0000, 0x4194]); // inlet 18.5 °C
    put(34, [0x0000, 0x4194]); // outlet 18.5 °C
    let got = rows(&map, RegisterFunction::Holding, 0, &words);
    assert_values(
        &got,
        &[
            ("volume_flow", "1.234"),
            ("volume", "1234"),
            ("volume_fraction", "0.5"),
            ("volume_reverse", "7"),
            ("volume_reverse_fraction", "0.25"),
            ("volume_net", "1227"),
            ("flow_temperature", "18.5"),
            ("velocity", "0"),
        ],
    );
    // Error code (REG0072), signal quality (REG0092) and working time (REG0103-0104) in a
    // second block 71..104: 0x0000, quality 87, 3600 s = 0x00000E10 low word first.
    let mut block = vec![0u16; 33];
    block[20] = 87;
    block[31] = 0x0E10;
    let got = rows(&map, RegisterFunction::Holding, 71, &block);
    assert_eq!(
        got,
        vec![
            q("status_word", d("0"), None),
            q("signal_quality", d("87"), None),
            q("operating_time", d("3600"), Some(Unit::Second)),
        ]
    );
}

#[test]
fn xintai_vector_is_little_endian() {
    let map = register_map::builtin("xintai-water-meter").unwrap();
    let mut words = vec![0u16; 0x1E];
    words[1] = 0x0000; // positive total 123.5 m³ = 0x42F70000, bytes 00 00 F7 42
    words[2] = 0xF742;
    words[5] = 0x1F85; // flow 0.545 m³/h = 0x3F0B851F, bytes 1F 85 0B 3F
    words[6] = 0x0B3F;
    words[7] = 0x00AA; // pipe full
    words[0x0A] = 0x6666; // pressure 3.6 MPa = 0x40666666 → bytes 66 66 66 40
    words[0x0B] = 0x6640;
    words[0x1A] = 0x0000; // battery 2.75 V = 0x40300000 → bytes 00 00 30 40
    words[0x1B] = 0x3040;
    words[0x1C] = 0x0001; // valve open
    let got = rows(&map, RegisterFunction::Holding, 0, &words);
    assert_values(
        &got,
        &[
            ("volume", "123.5"),
            ("volume_flow", "0.545"),
            ("pipe_state", "170"),
            ("pressure", "3.6"),
            ("battery_voltage", "2.75"),
            ("status_word", "1"),
        ],
    );
    assert_eq!(got.len(), 10);
}

#[test]
fn concentrator_vector_skips_empty_slots() {
    let map = register_map::builtin("concentrator").unwrap();
    assert_eq!(map.tables.len(), 1);
    // 2 header + 64 rows × 4 columns.
    assert_eq!(map.registers.len(), 2 + 64 * 4);
    let mut words = vec![0xFFFFu16; 30];
    // Row 1: meter 11223344556677, 1 234.567 m³, valve open, read 300 s ago.
    words[..10].copy_from_slice(&[
        0x0011, 0x2233, 0x4455, 0x6677, 0x0012, 0xD687, 0x0000, 0x0000, 0x012C, 0x0000,
    ]);
    // Row 2: empty (all 0xFFFF). Row 3: meter 00000000000042, 0.5 m³, valve closed, 60 s.
    words[20..].copy_from_slice(&[
        0x0000, 0x0000, 0x0000, 0x0042, 0x0000, 0x01F4, 0x0001, 0x0000, 0x003C, 0x0000,
    ]);
    let got = rows(&map, RegisterFunction::Input, 1000, &words);
    let row = |n: u32, quantity: &str, value: Decimal, unit: Option<Unit>| {
        (quantity.to_owned(), n, value, unit)
    };
    assert_eq!(
        got,
        vec![
            row(1, "meter_address", d("11223344556677"), None),
            row(1, "volume", d("1234.567"), Some(Unit::CubicMetre)),
            row(1, "status_word", d("0"), None),
            row(1, "reading_age", d("300"), Some(Unit::Second)),
            row(3, "meter_address", d("42"), None),
            row(3, "volume", d("0.500"), Some(Unit::CubicMetre)),
            row(3, "status_word", d("1"), None),
            row(3, "reading_age", d("60"), Some(Unit::Second)),
        ]
    );
    // The header block decodes separately; `decode` over the header only sees it.
    let header = decode(&map, 0, &[3, 0]).unwrap();
    assert_eq!(header.len(), 2);
    assert_eq!(header[0].value, RecordValue::Number(d("3")));
    // Encoding row 1 gives the same registers.
    let image = decoders::modbus::encode_image(
        &map,
        &[
            ("meter_address[1]", d("11223344556677")),
            ("volume[1]", d("1234.567")),
            ("reading_age[1]", d("300")),
        ],
    )
    .unwrap();
    assert_eq!(
        image.read_words(RegisterFunction::Input, 1000, 10),
        Some(
            words[..10]
                .iter()
                .map(|&w| if w == 0xFFFF { 0 } else { w })
                .collect()
        )
    );
}

fn invalid(text: &str) -> Vec<(usize, String, String)> {
    match register_map::parse("bad.toml", text) {
        Err(RegisterMapError::Invalid { file, issues }) => {
            assert_eq!(file, "bad.toml");
            issues
                .into_iter()
                .map(|i| (i.line, i.field, i.message))
                .collect()
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn invalid_maps_report_every_problem_with_line_and_field() {
    let text = r#"model = "bad"

[[register]]
name = "a"
quantity = "volume"
address = 0
type = "f33"

[[register]]
name = "b"
quantity = "Volume Flow"
address = 70000
type = "u16"

[[register]]
name = "c"
quantity = "pressure"
address = 1
type = "u32"
scale = "abc"
unit = "psi"
byte_order = "ACBD"

[[register]]
name = "d"
quantity = "valve"
function = 1
address = 0
type = "u16"

[[register]]
name = "e"
quantity = "x"
address = 65535
type = "u32"
"#;
    let issues = invalid(text);
    let fields: Vec<(usize, &str)> = issues.iter().map(|(l, f, _)| (*l, f.as_str())).collect();
    assert_eq!(
        fields,
        vec![
            (7, "register[0].type"),
            (12, "register[1].address"),
            (22, "register[2].byte_order"),
            (20, "register[2].scale"),
            (21, "register[2].unit"),
            (29, "register[3].type"),
            (34, "register[4].address"),
        ],
        "{issues:#?}"
    );
    assert!(issues[0].2.contains("f33"));
    assert!(issues[5].2.contains("bool"));
    // The rendered error names file:line:column.
    let err = register_map::parse("bad.toml", text)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.toml:7:8: register[0].type: unknown type"),
        "{err}"
    );
}

#[test]
fn overlapping_and_duplicate_registers_are_rejected() {
    let issues = invalid(
        r#"model = "m"
[[register]]
name = "a"
quantity = "x"
address = 10
type = "u32"
[[register]]
name = "a"
quantity = "x"
address = 11
type = "u16"
[[register]]
name = "c"
quantity = "x"
function = "input"
address = 11
type = "u16"
"#,
    );
    assert_eq!(issues.len(), 2, "{issues:#?}");
    assert_eq!(issues[0].0, 7);
    assert_eq!(issues[0].2, "duplicate name");
    assert_eq!(issues[1].2, "holding address 11 already used by a");
}

#[test]
fn stored_quantities_need_a_unit_of_their_dimension() {
    let issues = invalid(
        r#"model = "m"
[[register]]
name = "a"
quantity = "volume"
address = 0
type = "u32"
unit = "m3/h"
[[register]]
name = "b"
quantity = "volume_flow"
address = 2
type = "f32"
[[register]]
name = "c"
quantity = "status_word"
address = 4
type = "u16"
unit = "bar"
[[register]]
name = "d"
quantity = "pressure"
address = 5
type = "u16"
unit = "kPa"
[[register]]
name = "e"
quantity = "velocity"
address = 6
type = "u16"
"#,
    );
    let got: Vec<(usize, &str, &str)> = issues
        .iter()
        .map(|(l, f, m)| (*l, f.as_str(), m.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                7,
                "register[0].unit",
                "m3/h is not a unit of volume (expected one convertible to m3)"
            ),
            (
                10,
                "register[1].unit",
                "volume_flow needs a unit convertible to m3/h"
            ),
            (
                18,
                "register[2].unit",
                "status_word is a code; it takes no unit (got bar)"
            ),
        ]
    );
}

#[test]
fn table_columns_must_fit_their_row() {
    let issues = invalid(
        r#"model = "m"
[[table]]
name = "t"
start = 0
rows = 4
stride = 2
[[table.column]]
name = "v"
quantity = "x"
address = 1
type = "u32"
"#,
    );
    assert_eq!(issues.len(), 1, "{issues:#?}");
    assert_eq!(issues[0].0, 10);
    assert_eq!(issues[0].1, "table[0].column[0].address");
}

#[test]
fn syntax_and_unknown_fields_name_the_line() {
    let err = register_map::parse("x.toml", "model = \"m\"\n[[register]]\nname = \"a\"\nquantity = \"v\"\naddress = 0\ntype = \"u16\"\nscal = 2\n")
        .unwrap_err();
    match err {
        RegisterMapError::Syntax {
            file,
            line,
            message,
            ..
        } => {
            assert_eq!(file, "x.toml");
            assert_eq!(line, 7);
            assert!(message.contains("scal"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let err = register_map::parse("x.toml", "model = \"m\"\n[[register]\n").unwrap_err();
    assert!(
        matches!(err, RegisterMapError::Syntax { line: 2, .. }),
        "{err:?}"
    );
    let err = register_map::load("/nonexistent/map.toml").unwrap_err();
    assert!(matches!(err, RegisterMapError::Io { .. }));
}

#[test]
fn float_scales_are_taken_by_their_decimal_text() {
    let map = register_map::parse(
        "f.toml",
        "model = \"m\"\n[[register]]\nname = \"a\"\nquantity = \"volume\"\naddress = 0\ntype = \"u16\"\nscale = 0.001\noffset = -1\nunit = \"m3\"\n",
    )
    .unwrap();
    assert_eq!(map.registers[0].scale, d("0.001"));
    assert_eq!(map.registers[0].offset, d("-1"));
    let records = decode(&map, 0, &[1500]).unwrap();
    assert_eq!(records[0].value, RecordValue::Number(d("0.500")));
}
