//! `DataRecord`: one data record to encode (the simulators' and tests' slave answers).

use super::*;

/// One data record to encode (DIF/DIFE/VIF/VIFE and data as sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataRecord {
    /// DIF (the extension bit is set by the encoder when `dife` is not empty).
    pub dif: u8,
    /// DIFEs (extension bits set by the encoder).
    pub dife: Vec<u8>,
    /// VIF (the extension bit is set by the encoder when `vife` is not empty).
    pub vif: u8,
    /// VIFEs (extension bits set by the encoder).
    pub vife: Vec<u8>,
    /// Data bytes, little-endian, as sent.
    pub data: Vec<u8>,
}

impl DataRecord {
    /// A 32-bit integer record (DIF 04) with the given VIF, e.g. VIF 0x13 = volume in litres.
    pub fn int32(vif: u8, value: i32) -> Self {
        Self::raw(0x04, vif, value.to_le_bytes().to_vec())
    }

    /// A 16-bit integer record (DIF 02).
    pub fn int16(vif: u8, value: i16) -> Self {
        Self::raw(0x02, vif, value.to_le_bytes().to_vec())
    }

    /// An 8-digit BCD record (DIF 0C); negative values use the F sign digit.
    pub fn bcd8(vif: u8, value: i64) -> Self {
        Self::raw(0x0C, vif, bcd_bytes(value, 4))
    }

    /// A date-time type F record (DIF 04, VIF 6D).
    pub fn date_time(t: time::PrimitiveDateTime) -> Self {
        Self::raw(0x04, 0x6D, type_f(t).to_vec())
    }

    /// A date type G record (DIF 02, VIF 6C).
    pub fn date(d: time::Date) -> Self {
        let year = u8::try_from(d.year().rem_euclid(100)).unwrap_or(0);
        let b0 = (d.day() & 0x1F) | ((year & 0x07) << 5);
        let b1 = (u8::from(d.month()) & 0x0F) | ((year & 0x78) << 1);
        Self::raw(0x02, 0x6C, vec![b0, b1])
    }

    /// A record from its parts.
    pub fn raw(dif: u8, vif: u8, data: Vec<u8>) -> Self {
        Self {
            dif,
            dife: Vec::new(),
            vif,
            vife: Vec::new(),
            data,
        }
    }

    /// Sets the VIFE chain (extension bits are set by the encoder).
    pub fn vife_chain(mut self, vife: &[u8]) -> Self {
        self.vife = vife.to_vec();
        self
    }

    /// Sets the storage number (DIF bit 6 + DIFEs as needed).
    pub fn storage(mut self, storage: u32) -> Self {
        self.dif = (self.dif & !0x40) | (u8::from(storage & 1 != 0) << 6);
        let mut rest = storage >> 1;
        let mut i = 0usize;
        while rest != 0 {
            self.ensure_dife(i);
            if let Some(d) = self.dife.get_mut(i) {
                *d = (*d & 0xF0) | (rest & 0x0F) as u8;
            }
            rest >>= 4;
            i = i.saturating_add(1);
        }
        self
    }

    /// Sets the tariff (2 bits per DIFE).
    pub fn tariff(mut self, tariff: u32) -> Self {
        let mut rest = tariff;
        let mut i = 0usize;
        while rest != 0 {
            self.ensure_dife(i);
            if let Some(d) = self.dife.get_mut(i) {
                *d = (*d & !0x30) | (((rest & 3) as u8) << 4);
            }
            rest >>= 2;
            i = i.saturating_add(1);
        }
        self
    }

    /// Sets the subunit (1 bit per DIFE).
    pub fn subunit(mut self, subunit: u32) -> Self {
        let mut rest = subunit;
        let mut i = 0usize;
        while rest != 0 {
            self.ensure_dife(i);
            if let Some(d) = self.dife.get_mut(i) {
                *d = (*d & !0x40) | (((rest & 1) as u8) << 6);
            }
            rest >>= 1;
            i = i.saturating_add(1);
        }
        self
    }

    /// Sets the function field.
    pub fn function(mut self, function: Function) -> Self {
        let f = match function {
            Function::Instantaneous => 0,
            Function::Maximum => 1,
            Function::Minimum => 2,
            Function::ValueDuringError => 3,
        };
        self.dif = (self.dif & !0x30) | (f << 4);
        self
    }

    fn ensure_dife(&mut self, i: usize) {
        while self.dife.len() <= i {
            self.dife.push(0);
        }
    }

    /// Appends the encoded record to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let ext = |b: u8, more: bool| if more { b | 0x80 } else { b & 0x7F };
        out.push(ext(self.dif, !self.dife.is_empty()));
        for (i, d) in self.dife.iter().enumerate() {
            out.push(ext(*d, i.saturating_add(1) < self.dife.len()));
        }
        out.push(ext(self.vif, !self.vife.is_empty()));
        for (i, v) in self.vife.iter().enumerate() {
            out.push(ext(*v, i.saturating_add(1) < self.vife.len()));
        }
        out.extend_from_slice(&self.data);
    }
}

pub(super) fn bcd_bytes(value: i64, n: usize) -> Vec<u8> {
    let mut raw = value.unsigned_abs();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let two = (raw % 100) as u8;
        out.push(((two / 10) << 4) | (two % 10));
        raw /= 100;
    }
    if let (true, Some(last)) = (value < 0, out.last_mut()) {
        *last = (*last & 0x0F) | 0xF0;
    }
    out
}

pub(super) fn type_f(t: time::PrimitiveDateTime) -> [u8; 4] {
    let year = u8::try_from(t.year().rem_euclid(100)).unwrap_or(0);
    [
        t.minute() & 0x3F,
        t.hour() & 0x1F,
        (t.day() & 0x1F) | ((year & 0x07) << 5),
        (u8::from(t.month()) & 0x0F) | ((year & 0x78) << 1),
    ]
}
