#![no_main]
// Modbus register maps: an arbitrary map (1-16 specs of any function, data type, byte order,
// scale, offset, table row; optionally a table) built from the input, then the rest of the
// input as a register block at an arbitrary start address, through every decode entry point.
use decoders::modbus::{
    ByteOrder, DataType, RegisterFunction, RegisterMap, RegisterSpec, TableSpec, decode,
    decode_bits, decode_function,
};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use model::Decimal;

const FUNCTIONS: [RegisterFunction; 4] = [
    RegisterFunction::Coil,
    RegisterFunction::DiscreteInput,
    RegisterFunction::Holding,
    RegisterFunction::Input,
];
const ORDERS: [ByteOrder; 4] = [ByteOrder::Abcd, ByteOrder::Cdab, ByteOrder::Badc, ByteOrder::Dcba];

fn data_type(u: &mut Unstructured<'_>) -> Result<DataType> {
    Ok(match u.int_in_range(0u8..=8)? {
        0 => DataType::Bool,
        1 => DataType::U16,
        2 => DataType::I16,
        3 => DataType::U32,
        4 => DataType::I32,
        5 => DataType::U64,
        6 => DataType::F32,
        7 => DataType::F64,
        // Outside 1..=4 too: a map loader should refuse those, the decoder must not panic.
        _ => DataType::Bcd {
            registers: u.int_in_range(0u8..=6)?,
        },
    })
}

fn decimal(u: &mut Unstructured<'_>) -> Result<Decimal> {
    let mantissa: i64 = u.arbitrary()?;
    let scale = u.int_in_range(0u32..=28)?;
    Ok(Decimal::new(mantissa, scale))
}

fn map(u: &mut Unstructured<'_>, base: u16) -> Result<RegisterMap> {
    let n = u.int_in_range(1usize..=16)?;
    let mut specs = Vec::with_capacity(n);
    for i in 0..n {
        let function = *u.choose(&FUNCTIONS)?;
        let address = base.saturating_add(u16::from(u.arbitrary::<u8>()?) % 64);
        let mut spec = RegisterSpec::new(format!("v{i}"), "volume", function, address, data_type(u)?);
        spec.byte_order = *u.choose(&ORDERS)?;
        if u.arbitrary()? {
            spec.scale = decimal(u)?;
            spec.offset = decimal(u)?;
        }
        if u.arbitrary()? {
            spec.row = Some(u.int_in_range(0u16..=8)?);
        }
        specs.push(spec);
    }
    let mut map = RegisterMap::new("fuzz", specs);
    if u.arbitrary()? {
        map.tables.push(TableSpec {
            name: "meters".into(),
            function: *u.choose(&FUNCTIONS)?,
            start: base.saturating_add(u16::from(u.arbitrary::<u8>()?) % 64),
            stride: u.int_in_range(0u16..=8)?,
            rows: u.int_in_range(0u16..=8)?,
        });
    }
    Ok(map)
}

fn run(data: &[u8]) -> Result<()> {
    let mut u = Unstructured::new(data);
    // Near 0 and near 65 535 (address overflow) as often as anywhere else.
    let base: u16 = match u.int_in_range(0u8..=2)? {
        0 => 0,
        1 => u16::MAX - 80,
        _ => u.arbitrary()?,
    };
    let map = map(&mut u, base)?;
    let start = base.saturating_add(u16::from(u.arbitrary::<u8>()?) % 32);
    let count = u.int_in_range(0usize..=130)?;
    let mut registers = Vec::with_capacity(count);
    for _ in 0..count {
        registers.push(u.arbitrary::<u16>()?);
    }
    let _ = decode(&map, start, &registers);
    let _ = decode_function(&map, RegisterFunction::Holding, start, &registers);
    let _ = decode_function(&map, RegisterFunction::Input, start, &registers);
    let bits: Vec<bool> = registers.iter().map(|r| r & 1 == 1).collect();
    let _ = decode_bits(&map, RegisterFunction::Coil, start, &bits);
    let _ = decode_bits(&map, RegisterFunction::DiscreteInput, start, &bits);
    let _ = map.register_span();
    let _ = map.read_plan(125, u.arbitrary()?);
    Ok(())
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
