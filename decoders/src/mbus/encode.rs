//! Encoders for master requests and slave answers.

use super::{
    ACK, CI_APPLICATION_RESET, CI_DATA_SEND, CI_RSP_LONG, CI_SELECT, DataRecord, RspUdHeader,
    START_LONG, START_SHORT, STOP, checksum, type_f,
};

/// C field SND_NKE (link reset).
pub const C_SND_NKE: u8 = 0x40;
/// C field REQ_UD2 without FCB (FCB adds 0x20).
pub const C_REQ_UD2: u8 = 0x5B;
/// C field SND_UD (send user data to the slave).
pub const C_SND_UD: u8 = 0x53;
/// C field RSP_UD (slave response).
pub const C_RSP_UD: u8 = 0x08;
/// Primary address used for secondary-address selection and network-layer communication.
pub const ADDRESS_NETWORK: u8 = 0xFD;

fn short(control: u8, address: u8) -> Vec<u8> {
    vec![
        START_SHORT,
        control,
        address,
        control.wrapping_add(address),
        STOP,
    ]
}

/// Builds a long frame `68 L L 68 C A CI data CS 16`; data beyond 252 bytes is cut.
pub fn long(control: u8, address: u8, ci: u8, data: &[u8]) -> Vec<u8> {
    let data = data.get(..data.len().min(252)).unwrap_or(&[]);
    let len = u8::try_from(data.len().saturating_add(3)).unwrap_or(u8::MAX);
    let mut out = Vec::with_capacity(data.len().saturating_add(9));
    out.extend_from_slice(&[START_LONG, len, len, START_LONG, control, address, ci]);
    out.extend_from_slice(data);
    let cs = checksum(out.get(4..).unwrap_or(&[]));
    out.push(cs);
    out.push(STOP);
    out
}

/// SND_NKE: link reset `10 40 A CS 16`.
pub fn snd_nke(primary: u8) -> Vec<u8> {
    short(C_SND_NKE, primary)
}

/// REQ_UD2: request class 2 data `10 5B/7B A CS 16`.
pub fn req_ud2(primary: u8, fcb: bool) -> Vec<u8> {
    short(C_REQ_UD2 | if fcb { 0x20 } else { 0 }, primary)
}

/// Selects a slave by secondary address (SND_UD to FD, CI 52).
///
/// `id` is BCD coded (`0x12345678`); F nibbles are wildcards. `None` fields are wildcards.
pub fn select_secondary(
    id: u32,
    man: Option<u16>,
    version: Option<u8>,
    medium: Option<u8>,
) -> Vec<u8> {
    let mut data = Vec::with_capacity(8);
    data.extend_from_slice(&id.to_le_bytes());
    data.extend_from_slice(&man.unwrap_or(0xFFFF).to_le_bytes());
    data.push(version.unwrap_or(0xFF));
    data.push(medium.unwrap_or(0xFF));
    long(C_SND_UD, ADDRESS_NETWORK, CI_SELECT, &data)
}

/// Application reset (SND_UD, CI 50).
pub fn application_reset(primary: u8) -> Vec<u8> {
    long(C_SND_UD, primary, CI_APPLICATION_RESET, &[])
}

/// Sets the slave clock (SND_UD, CI 51, record 04 6D type F), in the slave's local time.
pub fn set_time(primary: u8, t: time::OffsetDateTime) -> Vec<u8> {
    let t = time::PrimitiveDateTime::new(t.date(), t.time());
    let mut data = vec![0x04, 0x6D];
    data.extend_from_slice(&type_f(t));
    long(C_SND_UD, primary, CI_DATA_SEND, &data)
}

/// Single-character acknowledgement E5.
pub fn ack() -> Vec<u8> {
    vec![ACK]
}

/// RSP_UD with CI 72, the long header and `records`.
pub fn rsp_ud(primary: u8, header: &RspUdHeader, records: &[DataRecord]) -> Vec<u8> {
    let mut data = Vec::with_capacity(64);
    data.extend_from_slice(&header.to_wire());
    for r in records {
        r.encode_into(&mut data);
    }
    long(C_RSP_UD, primary, CI_RSP_LONG, &data)
}

/// RSP_UD that ends with DIF 1F: tells the master that more records follow.
pub fn rsp_ud_more(primary: u8, header: &RspUdHeader, records: &[DataRecord]) -> Vec<u8> {
    let mut data = Vec::with_capacity(64);
    data.extend_from_slice(&header.to_wire());
    for r in records {
        r.encode_into(&mut data);
    }
    data.push(0x1F);
    long(C_RSP_UD, primary, CI_RSP_LONG, &data)
}
