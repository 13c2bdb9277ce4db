//! Passwords, tokens and the setup code (the minimal account model; SPEC §13).
//!
//! Tokens are 256 random bits with a visible prefix (`mst_`), kept only as their SHA-256, so a
//! request costs one hash, never a password hash. Password hashing runs off the async threads.

use crate::blobs::hex;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// `n` random bytes from the OS-seeded generator, as hex.
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::rng().fill_bytes(&mut b);
    hex(&b)
}

/// The stored form of a token or a setup code.
pub fn sha256_hex(s: &str) -> String {
    hex(&Sha256::digest(s.as_bytes()))
}

/// A new API token: `mst_` + 64 hex digits (256 bits).
pub fn new_token() -> String {
    format!("mst_{}", random_hex(32))
}

/// Hashes a password as an argon2id PHC string.
pub fn hash_password(password: &str) -> Result<String, String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Checks a password against a stored PHC string.
pub fn verify_password(password: &str, phc: &str) -> bool {
    match argon2::password_hash::phc::PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// The password rule: at least 12 characters, not the user name.
pub fn check_password(user: &str, password: &str) -> Result<(), String> {
    if password.chars().count() < 12 {
        return Err("the password must have at least 12 characters".into());
    }
    if password.eq_ignore_ascii_case(user) {
        return Err("the password must not be the user name".into());
    }
    Ok(())
}

/// Compares two secrets without leaking where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_tokens() {
        let h = hash_password("correct horse battery").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse battery", &h));
        assert!(!verify_password("wrong horse battery", &h));
        assert!(!verify_password("x", "not a phc"));
        let t = new_token();
        assert_eq!(t.len(), 4 + 64);
        assert_ne!(t, new_token());
        assert!(check_password("admin", "short").is_err());
        assert!(check_password("administrator1", "Administrator1").is_err());
        assert!(check_password("admin", "a long enough one").is_ok());
        assert!(constant_time_eq(b"abc", b"abc") && !constant_time_eq(b"abc", b"abd"));
    }
}
