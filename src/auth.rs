//! Proving knowledge of the job token without sending it: HMAC-SHA256 keyed by the token over
//! both sides' random nonces and a role string (so a proof made for one role never passes for
//! another). Used by the store's and the ring's handshakes.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::Read;

pub const NONCE_BYTES: usize = 32;
pub const PROOF_BYTES: usize = 32;

/// A fresh random nonce.
pub fn nonce() -> std::io::Result<[u8; NONCE_BYTES]> {
    let mut n = [0u8; NONCE_BYTES];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut n)?;
    Ok(n)
}

fn mac(token: &str, role: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(token.as_bytes()).expect("HMAC takes keys of any length");
    m.update(role);
    for p in parts {
        m.update(&(p.len() as u64).to_le_bytes());
        m.update(p);
    }
    m
}

/// HMAC(token, role ‖ parts…), each part length-prefixed.
pub fn proof(token: &str, role: &[u8], parts: &[&[u8]]) -> [u8; PROOF_BYTES] {
    mac(token, role, parts).finalize().into_bytes().into()
}

/// Whether `presented` is the proof for these parts (constant time).
pub fn verify(token: &str, role: &[u8], parts: &[&[u8]], presented: &[u8]) -> bool {
    mac(token, role, parts).verify_slice(presented).is_ok()
}

/// 128 random bits as hex, the job token that store and ring connections must present.
pub fn new_job_token() -> std::io::Result<String> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_depend_on_token_role_and_nonces() {
        let (a, b) = (nonce().unwrap(), nonce().unwrap());
        assert_ne!(a, b);
        let p = proof("tok", b"client", &[&a, &b]);
        assert!(verify("tok", b"client", &[&a, &b], &p));
        assert!(!verify("other", b"client", &[&a, &b], &p));
        assert!(!verify("tok", b"server", &[&a, &b], &p));
        assert!(!verify("tok", b"client", &[&b, &a], &p));
        assert!(!verify("tok", b"client", &[&a, &b], &p[..31]));
        // Known answer (RFC 4231 test case 2 style: key "Jefe"), so the construction is HMAC-SHA256.
        let m = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap().chain_update(b"what do ya want for nothing?").finalize().into_bytes();
        assert_eq!(format!("{m:x}"), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }
}
