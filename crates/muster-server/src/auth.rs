//! Passwords, tokens and the setup code (the minimal account model; SPEC §13).
//!
//! Tokens are 256 random bits with a visible prefix (`mst_`), kept only as their SHA-256, so a
//! request costs one hash, never a password hash. Password hashing runs off the async threads.

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use muster_wire::util::hex;
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

/// A password hash algorithm (`[auth] password_hash`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algo {
    Argon2id,
    Scrypt,
    Pbkdf2Sha256,
    Bcrypt,
}

impl Algo {
    /// The config name of an algorithm.
    pub fn parse(name: &str) -> Option<Algo> {
        Some(match name {
            "argon2id" => Algo::Argon2id,
            "scrypt" => Algo::Scrypt,
            "pbkdf2-sha256" => Algo::Pbkdf2Sha256,
            "bcrypt" => Algo::Bcrypt,
            _ => return None,
        })
    }

    /// The algorithm of a stored hash, from its PHC or modular-crypt prefix.
    pub fn of(stored: &str) -> Option<Algo> {
        if stored.starts_with("$argon2id$") {
            Some(Algo::Argon2id)
        } else if stored.starts_with("$scrypt$") {
            Some(Algo::Scrypt)
        } else if stored.starts_with("$pbkdf2-sha256$") {
            Some(Algo::Pbkdf2Sha256)
        } else if ["$2a$", "$2b$", "$2y$", "$2x$"]
            .iter()
            .any(|p| stored.starts_with(p))
        {
            Some(Algo::Bcrypt)
        } else {
            None
        }
    }
}

/// scrypt with N = 2^15, r = 8, p = 1 (32 MiB): OWASP's floor, well under a second.
fn scrypt_hasher() -> scrypt::Scrypt {
    scrypt::Scrypt::new_with_params(scrypt::Params::new(15, 8, 1).expect("valid scrypt params"))
}

/// Hashes a password with `algo`: a PHC string (bcrypt: its modular-crypt string).
pub fn hash_password_with(algo: Algo, password: &str) -> Result<String, String> {
    let p = password.as_bytes();
    match algo {
        Algo::Argon2id => Argon2::default()
            .hash_password(p)
            .map(|h| h.to_string())
            .map_err(|e| e.to_string()),
        Algo::Scrypt => scrypt_hasher()
            .hash_password(p)
            .map(|h| h.to_string())
            .map_err(|e| e.to_string()),
        Algo::Pbkdf2Sha256 => pbkdf2::Pbkdf2::SHA256
            .hash_password(p)
            .map(|h| h.to_string())
            .map_err(|e| e.to_string()),
        Algo::Bcrypt => bcrypt::hash(p, bcrypt::DEFAULT_COST).map_err(|e| e.to_string()),
    }
}

/// Hashes a password as an argon2id PHC string.
pub fn hash_password(password: &str) -> Result<String, String> {
    hash_password_with(Algo::Argon2id, password)
}

/// Checks a password against a stored hash of any known format (argon2id/i/d, scrypt,
/// pbkdf2-sha256/sha512, bcrypt).
pub fn verify_password(password: &str, stored: &str) -> bool {
    let p = password.as_bytes();
    if stored.starts_with("$2") {
        return bcrypt::verify(p, stored).unwrap_or(false);
    }
    let Ok(parsed) = argon2::password_hash::phc::PasswordHash::new(stored) else {
        return false;
    };
    match parsed.algorithm.as_str() {
        "argon2id" | "argon2i" | "argon2d" => Argon2::default().verify_password(p, &parsed).is_ok(),
        "scrypt" => scrypt::Scrypt::new().verify_password(p, &parsed).is_ok(),
        "pbkdf2-sha256" | "pbkdf2-sha512" | "pbkdf2" => pbkdf2::Pbkdf2::default()
            .verify_password(p, &parsed)
            .is_ok(),
        _ => false,
    }
}

/// Whether a stored hash should be replaced by one made with `algo` (after a successful login).
pub fn needs_rehash(stored: &str, algo: Algo) -> bool {
    Algo::of(stored) != Some(algo)
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

type HashJob = Box<dyn FnOnce() + Send>;

/// Runs password hashing on one dedicated thread at a low CPU priority (nice 10), off the
/// async threads: logins take their time, but never steal CPU from requests that need it.
pub async fn hashing<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    use std::sync::{mpsc, Mutex, OnceLock};
    static POOL: OnceLock<Mutex<mpsc::Sender<HashJob>>> = OnceLock::new();
    let tx = POOL.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<HashJob>();
        std::thread::Builder::new()
            .name("password-hashing".into())
            .spawn(move || {
                // SAFETY: lowers this thread's own priority (tid 0: the calling thread). Nice 10:
                // requests win the CPU, and hashing still gets a tenth of a busy core.
                unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .expect("a thread for password hashing");
        Mutex::new(tx)
    });
    let (done, wait) = tokio::sync::oneshot::channel();
    let job: HashJob = Box::new(move || {
        let _ = done.send(f());
    });
    let _ = tx.lock().unwrap_or_else(|e| e.into_inner()).send(job);
    wait.await
        .expect("the password hashing thread runs for the life of the process")
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

    #[test]
    fn every_algorithm_hashes_verifies_and_is_recognised() {
        for algo in [
            Algo::Argon2id,
            Algo::Scrypt,
            Algo::Pbkdf2Sha256,
            Algo::Bcrypt,
        ] {
            let h = hash_password_with(algo, "correct horse battery").unwrap();
            assert_eq!(Algo::of(&h), Some(algo), "{h}");
            assert!(verify_password("correct horse battery", &h), "{h}");
            assert!(!verify_password("correct horse batterx", &h), "{h}");
            assert!(!needs_rehash(&h, algo));
        }
        // Known vectors from other tools verify too (passlib's scrypt example).
        let passlib = "$scrypt$ln=16,r=8,p=1$aM15713r3Xsvxbi31lqr1Q$nFNh2CVHVjNldFVKDHDlm4CbdRSCdEBsjjJxD+iCs5E";
        assert!(verify_password("password", passlib));
        assert!(needs_rehash(passlib, Algo::Argon2id));
    }
}
