//! AES primitives of OMS security: CBC (TPL modes 5 and 7), CTR (ELL session encryption) and the
//! mode-7 CMAC key derivation. CBC/CTR are written over the block cipher directly so one expanded
//! key can be reused for many telegrams.

use aes::Aes128;
use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use cmac::{Cmac, Mac};

/// AES block size.
pub(crate) const BLOCK: usize = 16;

/// Expands a key.
pub(crate) fn cipher(key: &[u8; 16]) -> Aes128 {
    Aes128::new(GenericArray::from_slice(key))
}

/// Decrypts `data` (a whole number of blocks) in place with AES-128-CBC.
pub(crate) fn cbc_decrypt(cipher: &Aes128, iv: [u8; 16], data: &mut [u8]) {
    let mut prev = iv;
    for chunk in data.chunks_exact_mut(BLOCK) {
        let mut saved = [0u8; BLOCK];
        saved.copy_from_slice(chunk);
        cipher.decrypt_block(GenericArray::from_mut_slice(chunk));
        for (b, p) in chunk.iter_mut().zip(prev.iter()) {
            *b ^= p;
        }
        prev = saved;
    }
}

/// Encrypts `data` (a whole number of blocks) in place with AES-128-CBC.
pub(crate) fn cbc_encrypt(cipher: &Aes128, iv: [u8; 16], data: &mut [u8]) {
    let mut prev = iv;
    for chunk in data.chunks_exact_mut(BLOCK) {
        for (b, p) in chunk.iter_mut().zip(prev.iter()) {
            *b ^= p;
        }
        cipher.encrypt_block(GenericArray::from_mut_slice(chunk));
        prev.copy_from_slice(chunk);
    }
}

/// Applies AES-128-CTR to `data` in place; the counter is the last IV byte (OMS ELL block
/// counter), starting at the IV's value.
pub(crate) fn ctr_apply(cipher: &Aes128, iv: [u8; 16], data: &mut [u8]) {
    let mut counter = iv;
    for chunk in data.chunks_mut(BLOCK) {
        let mut keystream = GenericArray::from(counter);
        cipher.encrypt_block(&mut keystream);
        for (b, k) in chunk.iter_mut().zip(keystream.iter()) {
            *b ^= k;
        }
        if let Some(last) = counter.last_mut() {
            *last = last.wrapping_add(1);
        }
    }
}

/// AES-CMAC of the concatenated `parts`.
pub(crate) fn cmac(key: &[u8; 16], parts: &[&[u8]]) -> [u8; 16] {
    let mut mac = <Cmac<Aes128> as KeyInit>::new(GenericArray::from_slice(key));
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// OMS mode 7 key derivation (OMS Vol.2 9.5.3): `CMAC(K, DC ‖ MCR ‖ ID ‖ 07×7)` with
/// DC 00 for the encryption key and 01 for the MAC key.
pub(crate) fn mode7_key(key: &[u8; 16], dc: u8, mcr: [u8; 4], id: [u8; 4]) -> [u8; 16] {
    let mut input = [0x07u8; 16];
    let (head, _) = input.split_at_mut(9);
    let (dc_slot, rest) = head.split_at_mut(1);
    let (mcr_slot, id_slot) = rest.split_at_mut(4);
    dc_slot.copy_from_slice(&[dc]);
    mcr_slot.copy_from_slice(&mcr);
    id_slot.copy_from_slice(&id);
    cmac(key, &[&input])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cbc_round_trip() {
        let c = cipher(&[7u8; 16]);
        let mut data = *b"0123456789abcdef0123456789abcdef";
        cbc_encrypt(&c, [1u8; 16], &mut data);
        assert_ne!(&data, b"0123456789abcdef0123456789abcdef");
        cbc_decrypt(&c, [1u8; 16], &mut data);
        assert_eq!(&data, b"0123456789abcdef0123456789abcdef");
    }

    #[test]
    fn cmac_matches_rfc4493_example_2() {
        let key = [
            0x2b, 0x7e, 0x15, 0x16, 0x28, 0xae, 0xd2, 0xa6, 0xab, 0xf7, 0x15, 0x88, 0x09, 0xcf,
            0x4f, 0x3c,
        ];
        let msg = [
            0x6b, 0xc1, 0xbe, 0xe2, 0x2e, 0x40, 0x9f, 0x96, 0xe9, 0x3d, 0x7e, 0x11, 0x73, 0x93,
            0x17, 0x2a,
        ];
        assert_eq!(
            hex::encode(cmac(&key, &[&msg])),
            "070a16b46b4d4144f79bdd9dd04a287c"
        );
    }
}
