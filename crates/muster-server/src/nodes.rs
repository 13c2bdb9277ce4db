//! Joining nodes (SPEC §5): join tokens (a TTL and a use count) are exchanged for a node's own
//! credential, which `DELETE /api/v1/nodes/{id}` revokes. Like API tokens, both are random and
//! kept only as their SHA-256.

use crate::auth::{random_hex, sha256_hex};
use muster_core::Ts;
use muster_store::{Docs, Store, StoreError};
use muster_wire::util::now;
use serde::{Deserialize, Serialize};

/// Node credentials: the SHA-256 of the credential → the node id, as plain text (not JSON,
/// as it always was stored).
const CRED: &str = "node_cred";

#[derive(Serialize, Deserialize)]
struct JoinToken {
    expires_at: Ts,
    uses_left: u32,
}

/// Join tokens by the SHA-256 of their text. Spent through [`Docs::update`], so servers
/// sharing a store cannot overspend one between them.
const JOIN_TOKENS: Docs<JoinToken> = Docs::new("join_token");

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
        muster_wire::util::hex(server_key)
    );
    let expires_at = now().plus_ms(ttl_ms);
    JOIN_TOKENS.put(
        store,
        &sha256_hex(&text),
        &JoinToken {
            expires_at,
            uses_left: uses,
        },
    )?;
    Ok((text, expires_at))
}

/// Spends one use of a join token; `Err` says why it is refused. A compare-and-set on the
/// token's document: a racing redemption (on this server or another sharing the store) makes
/// this one read again, so `uses` redemptions succeed at most, and the document is deleted with
/// its last use (or once found expired).
pub fn redeem_join_token(store: &dyn Store, text: &str) -> Result<Result<(), String>, StoreError> {
    let at = now();
    // Set by every run of the closure; the run whose write landed is the last one.
    let mut verdict = Ok(());
    JOIN_TOKENS.update(store, &sha256_hex(text), |token| {
        let Some(mut t) = token.filter(|t| t.uses_left > 0) else {
            verdict = Err("the join token is not valid".to_string());
            return None;
        };
        if t.expires_at <= at {
            verdict = Err(
                "the join token has expired: make a new one with `muster nodes join-token`"
                    .to_string(),
            );
            return None;
        }
        verdict = Ok(());
        t.uses_left -= 1;
        (t.uses_left > 0).then_some(t)
    })?;
    Ok(verdict)
}

/// A node's own credential: `mnc_` + 256 random bits.
pub fn issue_credential(store: &dyn Store, node_id: &str) -> Result<String, StoreError> {
    let text = format!("mnc_{}", random_hex(32));
    store.put_doc(CRED, &sha256_hex(&text), Some(node_id))?;
    Ok(text)
}

/// The node a credential belongs to.
pub fn node_of_credential(store: &dyn Store, text: &str) -> Result<Option<String>, StoreError> {
    Ok(store.doc(CRED, &sha256_hex(text))?.map(|d| d.value))
}

/// Revokes every credential of a node.
pub fn revoke_node(store: &dyn Store, node_id: &str) -> Result<(), StoreError> {
    for (key, d) in store.docs(CRED, "")? {
        if d.value == node_id {
            store.put_doc(CRED, &key, None)?;
        }
    }
    Ok(())
}
