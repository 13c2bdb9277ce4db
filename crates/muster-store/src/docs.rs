//! Typed documents over the versioned document API of [`Store`]: a [`Docs<T>`] names one kind and
//! keeps its documents as JSON, so callers handle values and versions, never strings.
//!
//! ```
//! use muster_store::{Docs, MemoryStore};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Counter {
//!     n: u64,
//! }
//! const COUNTERS: Docs<Counter> = Docs::new("counter");
//!
//! let store = MemoryStore::new();
//! let (c, _version) = COUNTERS
//!     .update(&store, "hits", |c| Some(Counter { n: c.map_or(0, |c| c.n) + 1 }))
//!     .unwrap()
//!     .unwrap();
//! assert_eq!(c.n, 1);
//! ```

use crate::{DocCond, DocWrite, Result, Store, StoreError, Version};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::marker::PhantomData;

/// How many conflicting writes in a row [`Docs::update`] retries before giving up. Each conflict
/// means another writer succeeded, so this bound is never reached in practice; it only stops an
/// engine that wrongly reports conflicts forever from hanging its caller.
const UPDATE_ATTEMPTS: usize = 10_000;

/// The documents of one kind, typed: values of `T` stored as JSON. A `const` of this type is the
/// usual way to name a kind (`const TOKENS: Docs<JoinToken> = Docs::new("join_token");`).
pub struct Docs<T> {
    kind: &'static str,
    // `fn() -> T`: the handle owns no `T`, so it is `Send`, `Sync` and `Copy` whatever `T` is.
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for Docs<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Docs<T> {}

impl<T> std::fmt::Debug for Docs<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Docs").field("kind", &self.kind).finish()
    }
}

fn encode<T: Serialize>(kind: &str, value: &T) -> Result<String> {
    serde_json::to_string(value)
        .map_err(|e| StoreError::Other(format!("cannot encode a {kind} document: {e}")))
}

fn decode<T: DeserializeOwned>(kind: &str, key: &str, text: &str) -> Result<T> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Other(format!("bad stored {kind} document {key:?}: {e}")))
}

impl<T: Serialize + DeserializeOwned> Docs<T> {
    /// The documents of `kind`.
    pub const fn new(kind: &'static str) -> Docs<T> {
        Docs {
            kind,
            _t: PhantomData,
        }
    }

    /// The kind these documents are stored under.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// The document under `key` and its version; `None` when there is none. A document that
    /// does not decode as `T` is an error ([`StoreError::Other`]).
    pub fn get(&self, store: &dyn Store, key: &str) -> Result<Option<(T, Version)>> {
        store
            .doc(self.kind, key)?
            .map(|d| Ok((decode(self.kind, key, &d.value)?, d.version)))
            .transpose()
    }

    /// Every document whose key starts with `prefix`, sorted by key, with its version.
    pub fn list(&self, store: &dyn Store, prefix: &str) -> Result<Vec<(String, T, Version)>> {
        store
            .docs(self.kind, prefix)?
            .into_iter()
            .map(|(key, d)| {
                let value = decode(self.kind, &key, &d.value)?;
                Ok((key, value, d.version))
            })
            .collect()
    }

    /// Stores `value` under `key` whatever is there; returns the new version.
    pub fn put(&self, store: &dyn Store, key: &str, value: &T) -> Result<Version> {
        let text = encode(self.kind, value)?;
        self.expect_version(store.write_doc(self.kind, key, Some(&text), DocCond::Any)?)
    }

    /// Stores `value` only if `key` is free; returns its version, or `None` (nothing written)
    /// when a document exists.
    pub fn create(&self, store: &dyn Store, key: &str, value: &T) -> Result<Option<Version>> {
        let text = encode(self.kind, value)?;
        self.written(store.write_doc(self.kind, key, Some(&text), DocCond::Absent)?)
    }

    /// Replaces the document only if it is at `expected` (compare-and-set); returns the new
    /// version, or `None` (nothing written) when it is at another version or absent.
    pub fn put_if(
        &self,
        store: &dyn Store,
        key: &str,
        value: &T,
        expected: Version,
    ) -> Result<Option<Version>> {
        let text = encode(self.kind, value)?;
        self.written(store.write_doc(self.kind, key, Some(&text), DocCond::At(expected))?)
    }

    /// Deletes the document whatever its version (nothing happens when there is none).
    pub fn delete(&self, store: &dyn Store, key: &str) -> Result<()> {
        store.put_doc(self.kind, key, None)
    }

    /// Deletes the document only if it is at `expected`; `false` (nothing deleted) when it is
    /// at another version or absent.
    pub fn delete_if(&self, store: &dyn Store, key: &str, expected: Version) -> Result<bool> {
        store.delete_doc_if(self.kind, key, expected)
    }

    /// Read-modify-write: reads the document, gives it (`None`: absent) to `f`, and writes what
    /// `f` returns (`None`: delete) on the condition that nobody wrote it meanwhile; on a
    /// conflict it reads again and calls `f` again, so `f` must not have effects it cannot
    /// repeat (assigning to a captured variable is fine: the last call is the one that counts).
    /// A result that encodes exactly as the stored text is not written. Returns the document as
    /// the update left it.
    pub fn update(
        &self,
        store: &dyn Store,
        key: &str,
        mut f: impl FnMut(Option<T>) -> Option<T>,
    ) -> Result<Option<(T, Version)>> {
        for _ in 0..UPDATE_ATTEMPTS {
            let current = store.doc(self.kind, key)?;
            let old = current
                .as_ref()
                .map(|d| decode(self.kind, key, &d.value))
                .transpose()?;
            let new = f(old);
            let (text, cond) = match (&new, &current) {
                (None, None) => return Ok(None),
                (Some(v), cur) => {
                    let text = encode(self.kind, v)?;
                    match cur {
                        Some(d) if d.value == text => return Ok(new.map(|v| (v, d.version))),
                        Some(d) => (Some(text), DocCond::At(d.version)),
                        None => (Some(text), DocCond::Absent),
                    }
                }
                (None, Some(d)) => (None, DocCond::At(d.version)),
            };
            match store.write_doc(self.kind, key, text.as_deref(), cond)? {
                DocWrite::Done(Some(version)) => return Ok(new.map(|v| (v, version))),
                DocWrite::Done(None) => return Ok(None),
                // Someone wrote it since it was read: start over from what is stored now.
                DocWrite::Conflict(_) => continue,
            }
        }
        Err(StoreError::Other(format!(
            "{} document {key:?} kept changing: gave up after {UPDATE_ATTEMPTS} conflicting writes",
            self.kind
        )))
    }

    fn written(&self, w: DocWrite) -> Result<Option<Version>> {
        match w {
            DocWrite::Done(Some(v)) => Ok(Some(v)),
            DocWrite::Conflict(_) => Ok(None),
            DocWrite::Done(None) => Err(StoreError::Other(format!(
                "a {} document was stored without a version",
                self.kind
            ))),
        }
    }

    fn expect_version(&self, w: DocWrite) -> Result<Version> {
        self.written(w)?.ok_or_else(|| {
            StoreError::Other(format!(
                "an unconditional {} write reported a conflict",
                self.kind
            ))
        })
    }
}
