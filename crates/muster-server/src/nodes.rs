//! Joining nodes (SPEC §5): join tokens (a TTL and a use count) are exchanged for a node's own
//! credential, which `DELETE /api/v1/nodes/{id}` revokes. Like API tokens, both are random and
//! kept only as their SHA-256.

use crate::auth::{random_hex, sha256_hex};
use crate::manager::now;
use muster_core::Ts;
use muster_store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use std::sync::Mutex;

const JOIN: &str = "join_token";
const CRED: &str = "node_cred";

#[derive(Serialize, Deserialize)]
struct JoinToken {
    expires_at: Ts,
    uses_left: u32,
}

/// Serializes redemptions in this process, so a token's use count cannot be overspent.
static REDEEM: Mutex<()> = Mutex::new(());

/// A new join token: `mjt_` + 128 random bits, `.` the server's Ed25519 public key, `.` the
/// SHA-256 fingerprint of the cluster CA, both in hex. An agent with no `--server` trusts only
/// server beacons signed by that key (see [`crate::discovery`]), and only servers whose TLS
/// certificate chains to that CA (see [`crate::tls`]). Only the SHA-256 of the whole text is
/// stored.
pub fn create_join_token(
    store: &dyn Store,
    ttl_ms: i64,
    uses: u32,
    server_key: &[u8; 32],
    ca_fingerprint: &str,
) -> Result<(String, Ts), StoreError> {
    let text = format!(
        "mjt_{}.{}.{ca_fingerprint}",
        random_hex(16),
        crate::discovery::hex(server_key)
    );
    let expires_at = now().plus_ms(ttl_ms);
    let doc = serde_json::to_string(&JoinToken {
        expires_at,
        uses_left: uses,
    })
    .expect("serializable");
    store.put_doc(JOIN, &sha256_hex(&text), Some(&doc))?;
    Ok((text, expires_at))
}

/// Spends one use of a join token; `Err` says why it is refused.
pub fn redeem_join_token(store: &dyn Store, text: &str) -> Result<Result<(), String>, StoreError> {
    let _g = REDEEM.lock().unwrap_or_else(|e| e.into_inner());
    let key = sha256_hex(text);
    let Some(doc) = store.doc(JOIN, &key)? else {
        return Ok(Err("the join token is not valid".into()));
    };
    let Ok(mut t) = serde_json::from_str::<JoinToken>(&doc) else {
        return Ok(Err("the join token is not valid".into()));
    };
    if t.expires_at <= now() {
        store.put_doc(JOIN, &key, None)?;
        return Ok(Err(
            "the join token has expired: make a new one with `muster nodes join-token`".into(),
        ));
    }
    t.uses_left = t.uses_left.saturating_sub(1);
    if t.uses_left == 0 {
        store.put_doc(JOIN, &key, None)?;
    } else {
        store.put_doc(
            JOIN,
            &key,
            Some(&serde_json::to_string(&t).expect("serializable")),
        )?;
    }
    Ok(Ok(()))
}

/// A node's own credential: `mnc_` + 256 random bits.
pub fn issue_credential(store: &dyn Store, node_id: &str) -> Result<String, StoreError> {
    let text = format!("mnc_{}", random_hex(32));
    store.put_doc(CRED, &sha256_hex(&text), Some(node_id))?;
    Ok(text)
}

/// The node a credential belongs to.
pub fn node_of_credential(store: &dyn Store, text: &str) -> Result<Option<String>, StoreError> {
    store.doc(CRED, &sha256_hex(text))
}

/// Revokes every credential of a node.
pub fn revoke_node(store: &dyn Store, node_id: &str) -> Result<(), StoreError> {
    for (key, id) in store.docs(CRED, "")? {
        if id == node_id {
            store.put_doc(CRED, &key, None)?;
        }
    }
    Ok(())
}
