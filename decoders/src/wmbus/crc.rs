//! CRC-16/EN-13757 (poly 0x3D65, init 0, no reflection, xor-out 0xFFFF), used by the DLL block
//! CRCs, the ELL payload CRC and compact-frame format signatures.

/// Lookup table for poly 0x3D65, built at compile time.
const TABLE: [u16; 256] = build_table();

// Evaluated at compile time only: an out-of-range index or overflow would fail the build.
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
const fn build_table() -> [u16; 256] {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x3D65
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

/// Returns the CRC-16/EN-13757 of `data`.
pub(crate) fn crc16(data: &[u8]) -> u16 {
    let mut crc = Crc16::default();
    crc.update(data);
    crc.finish()
}

/// Incremental CRC-16/EN-13757 over several slices.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Crc16(u16);

impl Crc16 {
    /// Feeds `data`.
    pub(crate) fn update(&mut self, data: &[u8]) {
        for &byte in data {
            let idx = usize::from(self.0.to_be_bytes()[0] ^ byte);
            let entry = TABLE.get(idx).copied().unwrap_or(0);
            self.0 = (self.0 << 8) ^ entry;
        }
    }

    /// The CRC of everything fed.
    pub(crate) fn finish(self) -> u16 {
        !self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_value_matches_catalogue() {
        // CRC-16/EN-13757 catalogue check value for "123456789".
        assert_eq!(crc16(b"123456789"), 0xC2B7);
    }
}
