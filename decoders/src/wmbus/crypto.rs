//! AES primitives of OMS security: CBC (TPL modes 5 and 7), CTR (ELL session encryption), CCM
//! (TPL mode 10) and the mode-7/10 CMAC key derivation. CBC/CTR are written over the block cipher directly so one expanded
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

/// Nonce length of TPL mode 10: M(2) ‖ ID(4) ‖ version ‖ type ‖ 00 ‖ message counter (4),
/// which leaves a 2-byte block counter (CCM L = 2).
pub(crate) const CCM_NONCE: usize = 13;

/// AES-CCM (NIST SP 800-38C, RFC 3610) with a 13-byte nonce: decrypts `data` in place and
/// returns whether `tag` (4 to 16 bytes, even) authenticates `aad` and the plaintext. On a
/// wrong tag `data` holds garbage and must not be used.
pub(crate) fn ccm_decrypt(
    cipher: &Aes128,
    nonce: &[u8; CCM_NONCE],
    aad: &[u8],
    data: &mut [u8],
    tag: &[u8],
) -> bool {
    let tag_len = tag.len();
    // Lengths CCM defines; the message length must fit the 2-byte length field (L = 2).
    let (Ok(tag_code), Ok(msg_len), Ok(aad_len)) = (
        u8::try_from(tag_len.saturating_sub(2) / 2),
        u16::try_from(data.len()),
        u16::try_from(aad.len()),
    ) else {
        return false;
    };
    if !(4..=16).contains(&tag_len) || !tag_len.is_multiple_of(2) || aad_len >= 0xFF00 {
        return false;
    }
    let counter_block = |i: u16| {
        let mut a = [0u8; BLOCK];
        let (flags, rest) = a.split_at_mut(1);
        let (n, ctr) = rest.split_at_mut(CCM_NONCE);
        flags.copy_from_slice(&[0x01]); // L - 1
        n.copy_from_slice(nonce);
        ctr.copy_from_slice(&i.to_be_bytes());
        a
    };
    let encrypt = |block: [u8; BLOCK]| {
        let mut b = GenericArray::from(block);
        cipher.encrypt_block(&mut b);
        <[u8; BLOCK]>::from(b)
    };
    // Decrypt: keystream blocks A_1, A_2, ...
    for (i, chunk) in (1u16..).zip(data.chunks_mut(BLOCK)) {
        let keystream = encrypt(counter_block(i));
        for (b, k) in chunk.iter_mut().zip(keystream.iter()) {
            *b ^= k;
        }
    }
    // CBC-MAC over B_0, the length-prefixed AAD (zero padded) and the plaintext (zero padded).
    let mut b0 = counter_block(msg_len);
    if let Some(flags) = b0.first_mut() {
        *flags = (u8::from(!aad.is_empty()) << 6) | (tag_code << 3) | 0x01;
    }
    let mut mac = encrypt(b0);
    let mut absorb = |bytes: &[u8]| {
        for chunk in bytes.chunks(BLOCK) {
            for (m, b) in mac.iter_mut().zip(chunk) {
                *m ^= b;
            }
            mac = encrypt(mac);
        }
    };
    if !aad.is_empty() {
        let mut prefixed = Vec::with_capacity(aad.len().saturating_add(2));
        prefixed.extend_from_slice(&aad_len.to_be_bytes());
        prefixed.extend_from_slice(aad);
        absorb(&prefixed);
    }
    absorb(data);
    let s0 = encrypt(counter_block(0));
    mac.iter()
        .zip(s0.iter())
        .map(|(m, s)| m ^ s)
        .zip(tag)
        .fold(0u8, |diff, (expected, got)| diff | (expected ^ got))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 3610 packet vector #1: 13-byte nonce, 8-byte AAD, 23-byte payload, 8-byte tag.
    #[test]
    fn ccm_matches_rfc3610_packet_vector_1() {
        let key = hex::decode("C0C1C2C3C4C5C6C7C8C9CACBCCCDCECF").unwrap();
        let c = cipher(&key.try_into().unwrap());
        let nonce: [u8; CCM_NONCE] = hex::decode("00000003020100A0A1A2A3A4A5")
            .unwrap()
            .try_into()
            .unwrap();
        let aad = hex::decode("0001020304050607").unwrap();
        let mut data = hex::decode("588C979A61C663D2F066D0C2C0F989806D5F6B61DAC384").unwrap();
        let tag = hex::decode("17E8D12CFDF926E0").unwrap();
        assert!(ccm_decrypt(&c, &nonce, &aad, &mut data, &tag));
        assert_eq!(
            hex::encode_upper(&data),
            "08090A0B0C0D0E0F101112131415161718191A1B1C1D1E"
        );
        let mut again = hex::decode("588C979A61C663D2F066D0C2C0F989806D5F6B61DAC384").unwrap();
        let mut bad = tag.clone();
        bad[0] ^= 1;
        assert!(!ccm_decrypt(&c, &nonce, &aad, &mut again, &bad));
    }

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
