//! The services' secrets (issue 15 point 9): a value per service path and key, set by an
//! operator (`muster services secret set PATH KEY`), kept in the store only as ChaCha20-Poly1305
//! ciphertext under a key file apart from the store (`[services] secrets_key_file`, default
//! `<data_dir>/secrets.key`, 0600, made on first use; every server of a cluster needs the same
//! file). The associated data is the record's key (`PATH:KEY`), so a ciphertext moved to another
//! service or key does not open.
//!
//! A value leaves the server only for the step that runs the service's actions
//! ([`for_step`], asked with that step's own job token); the plan sees only each secret's
//! *version* (a hash of its ciphertext), so a changed secret reconfigures its service and the
//! plan, the records, the API and HQ never hold the value. The node masks the values in the job
//! log.

use super::ServiceError;
use crate::App;
use muster_core::Ts;
use muster_store::Docs;
use muster_wire::util::{hex, now, unhex};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

type Result<T> = std::result::Result<T, ServiceError>;

/// The stored secrets, by `PATH:KEY`.
pub const SECRETS: Docs<SecretRecord> = Docs::new("service_secret");

/// The largest secret value, in bytes.
pub const MAX_VALUE: usize = 64 << 10;

/// One stored secret: never its value, only its ciphertext.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SecretRecord {
    pub path: String,
    pub key: String,
    /// The nonce, hex.
    pub nonce: String,
    /// The ciphertext with its tag, hex.
    pub ciphertext: String,
    pub updated_at: Ts,
    pub updated_by: String,
}

impl SecretRecord {
    /// What the plan hashes: the SHA-256 of nonce and ciphertext (a new value, even the same
    /// one set again, is a new version).
    pub fn version(&self) -> String {
        muster_core::orders::sha256_hex(format!("{}:{}", self.nonce, self.ciphertext).as_bytes())
    }
}

fn doc_key(path: &str, key: &str) -> String {
    format!("{path}:{key}")
}

/// The key file in use.
pub fn key_file(app: &App) -> PathBuf {
    match app.config.services.secrets_key_file.as_str() {
        "" => app.config.data_dir.join("secrets.key"),
        f => PathBuf::from(f),
    }
}

fn cipher(app: &App) -> Result<LessSafeKey> {
    let file = key_file(app);
    let key = muster_wire::beacon::load_or_create_key(&file).map_err(|e| {
        ServiceError::Internal(format!(
            "the secrets key file {} cannot be read or made: {e}",
            file.display()
        ))
    })?;
    let k = UnboundKey::new(&CHACHA20_POLY1305, &key)
        .map_err(|_| ServiceError::Internal("the secrets key is not usable".into()))?;
    Ok(LessSafeKey::new(k))
}

/// Checks a secret's key name.
pub fn check_key(key: &str) -> std::result::Result<(), String> {
    muster_core::names::check_name("secret", key)
}

/// Stores `value` as secret `key` of service `path` (blocking). Returns the record.
pub fn set(app: &App, path: &str, key: &str, value: &[u8], by: &str) -> Result<SecretRecord> {
    let c = cipher(app)?;
    let nonce_bytes: [u8; NONCE_LEN] = rand::random();
    let mut data = value.to_vec();
    let dk = doc_key(path, key);
    c.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce_bytes),
        Aad::from(dk.as_bytes()),
        &mut data,
    )
    .map_err(|_| ServiceError::Internal("cannot encrypt the secret".into()))?;
    let rec = SecretRecord {
        path: path.to_string(),
        key: key.to_string(),
        nonce: hex(&nonce_bytes),
        ciphertext: hex(&data),
        updated_at: now(),
        updated_by: by.to_string(),
    };
    SECRETS.put(&*app.store, &dk, &rec)?;
    Ok(rec)
}

/// Deletes secret `key` of `path`; false when there was none (blocking).
pub fn delete(app: &App, path: &str, key: &str) -> Result<bool> {
    let dk = doc_key(path, key);
    if SECRETS.get(&*app.store, &dk)?.is_none() {
        return Ok(false);
    }
    SECRETS.delete(&*app.store, &dk)?;
    Ok(true)
}

/// The secrets of `path` (records, no values), by key.
pub fn list(app: &App, path: &str) -> Result<BTreeMap<String, SecretRecord>> {
    Ok(SECRETS
        .list(&*app.store, &format!("{path}:"))?
        .into_iter()
        .filter(|(_, r, _)| r.path == path)
        .map(|(_, r, _)| (r.key.clone(), r))
        .collect())
}

/// Every secret's version, by path and key (what the plan hashes).
pub fn versions(app: &App) -> Result<BTreeMap<String, BTreeMap<String, String>>> {
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (_, r, _) in SECRETS.list(&*app.store, "")? {
        out.entry(r.path.clone())
            .or_default()
            .insert(r.key.clone(), r.version());
    }
    Ok(out)
}

/// The value of one record.
fn open(c: &LessSafeKey, r: &SecretRecord) -> Result<String> {
    let bad = || {
        ServiceError::Internal(format!(
            "secret {} of service {} cannot be decrypted: is this server's secrets key file the one it was set with?",
            r.key, r.path
        ))
    };
    let nonce: [u8; NONCE_LEN] = unhex(&r.nonce)
        .and_then(|n| n.try_into().ok())
        .ok_or_else(bad)?;
    let mut data = unhex(&r.ciphertext).ok_or_else(bad)?;
    let dk = doc_key(&r.path, &r.key);
    let plain = c
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(dk.as_bytes()),
            &mut data,
        )
        .map_err(|_| bad())?;
    String::from_utf8(plain.to_vec()).map_err(|_| bad())
}

/// The values of `keys` of service `path`, for the step that runs its actions. A key not set
/// (deleted since the plan) is a conflict naming it.
pub fn for_step(app: &App, path: &str, keys: &[String]) -> Result<BTreeMap<String, String>> {
    if keys.is_empty() {
        return Ok(BTreeMap::new());
    }
    let c = cipher(app)?;
    let mut out = BTreeMap::new();
    for k in keys {
        let (r, _) = SECRETS
            .get(&*app.store, &doc_key(path, k))?
            .ok_or_else(|| {
                ServiceError::Conflict(format!(
                    "secret {k} of service {path} is no longer set: set it and plan again"
                ))
            })?;
        out.insert(k.clone(), open(&c, &r)?);
    }
    Ok(out)
}
