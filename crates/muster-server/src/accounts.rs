//! Accounts and access (SPEC §13): users, workspaces, memberships with roles, and the rules that
//! say who may do what. Pure domain functions over the store; the API maps their errors.
//!
//! Every user gets a personal workspace named after them, where they are `admin`; a tree's
//! `workspace` tag defaults to it. Cluster admins (`User::admin`) may do everything everywhere.

use muster_core::names::check_name;
use muster_core::Ts;
use muster_store::{Store, StoreError, User};
use muster_wire::util::now;
use serde::{Deserialize, Serialize};

/// A member's role in a workspace; each includes the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads the workspace's trees, logs, services and models.
    Viewer,
    /// Also runs and aborts jobs, deploys.
    Operator,
    /// Also manages the workspace's members.
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "viewer" => Role::Viewer,
            "operator" => Role::Operator,
            "admin" => Role::Admin,
            _ => return None,
        })
    }
}

/// A workspace as stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Workspace {
    pub name: String,
    pub created_at: Ts,
    pub created_by: String,
}

/// Why an account operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

const WORKSPACE: &str = "workspace";
const MEMBER: &str = "member";

fn member_key(ws: &str, user: &str) -> String {
    format!("{ws}/{user}")
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("serializable")
}

/// Creates a workspace owned by `creator` (its first admin).
pub fn create_workspace(
    store: &dyn Store,
    name: &str,
    creator: &str,
) -> Result<Workspace, AccountError> {
    check_name("workspace", name).map_err(AccountError::Invalid)?;
    let ws = Workspace {
        name: name.to_string(),
        created_at: now(),
        created_by: creator.to_string(),
    };
    if !store.create_doc(WORKSPACE, name, &json(&ws))? {
        return Err(AccountError::Conflict(format!("workspace {name:?} exists")));
    }
    store.put_doc(
        MEMBER,
        &member_key(name, creator),
        Some(&json(&Role::Admin)),
    )?;
    Ok(ws)
}

pub fn workspace(store: &dyn Store, name: &str) -> Result<Option<Workspace>, AccountError> {
    Ok(match store.doc(WORKSPACE, name)? {
        Some(d) => serde_json::from_str(&d.value).ok(),
        None => None,
    })
}

pub fn workspaces(store: &dyn Store) -> Result<Vec<Workspace>, AccountError> {
    Ok(store
        .docs(WORKSPACE, "")?
        .into_iter()
        .filter_map(|(_, d)| serde_json::from_str(&d.value).ok())
        .collect())
}

/// The members of a workspace and their roles.
pub fn members(store: &dyn Store, ws: &str) -> Result<Vec<(String, Role)>, AccountError> {
    let prefix = format!("{ws}/");
    Ok(store
        .docs(MEMBER, &prefix)?
        .into_iter()
        .filter_map(|(k, d)| {
            Some((
                k.strip_prefix(&prefix)?.to_string(),
                serde_json::from_str(&d.value).ok()?,
            ))
        })
        .collect())
}

/// Every workspace `user` belongs to, with their role.
pub fn memberships(store: &dyn Store, user: &str) -> Result<Vec<(String, Role)>, AccountError> {
    Ok(store
        .docs(MEMBER, "")?
        .into_iter()
        .filter_map(|(k, d)| {
            let (ws, u) = k.split_once('/')?;
            (u == user).then(|| Some((ws.to_string(), serde_json::from_str(&d.value).ok()?)))?
        })
        .collect())
}

/// Sets (`Some`) or removes (`None`) a member's role. The last admin of a workspace stays.
pub fn set_member(
    store: &dyn Store,
    ws: &str,
    user: &str,
    role: Option<Role>,
) -> Result<(), AccountError> {
    if workspace(store, ws)?.is_none() {
        return Err(AccountError::NotFound(format!("workspace {ws:?}")));
    }
    if store.user(user)?.is_none() {
        return Err(AccountError::NotFound(format!("user {user:?}")));
    }
    if role != Some(Role::Admin) {
        let admins: Vec<String> = members(store, ws)?
            .into_iter()
            .filter(|(_, r)| *r == Role::Admin)
            .map(|(u, _)| u)
            .collect();
        if admins == [user.to_string()] {
            return Err(AccountError::Conflict(format!(
                "{user:?} is the last admin of {ws:?}"
            )));
        }
    }
    store.put_doc(
        MEMBER,
        &member_key(ws, user),
        role.map(|r| json(&r)).as_deref(),
    )?;
    Ok(())
}

/// Creates a user with a personal workspace of the same name.
pub fn create_user(
    store: &dyn Store,
    name: &str,
    password_hash: String,
    admin: bool,
) -> Result<User, AccountError> {
    check_name("user name", name).map_err(AccountError::Invalid)?;
    if store.user(name)?.is_some() {
        return Err(AccountError::Conflict(format!("user {name:?} exists")));
    }
    if workspace(store, name)?.is_some() {
        return Err(AccountError::Conflict(format!(
            "a workspace named {name:?} exists; choose another user name"
        )));
    }
    let user = User {
        name: name.to_string(),
        password_hash,
        admin,
        created_at: now(),
    };
    store.put_user(&user)?;
    ensure_personal_workspace(store, name)?;
    store.put_doc(MEMBER, &member_key(name, name), Some(&json(&Role::Admin)))?;
    Ok(user)
}

/// The user's own workspace (made for the first admin, who is created by the setup code path).
pub fn ensure_personal_workspace(store: &dyn Store, name: &str) -> Result<(), AccountError> {
    if workspace(store, name)?.is_none() {
        match create_workspace(store, name, name) {
            Ok(_) | Err(AccountError::Conflict(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Deletes a user, their tokens and memberships (their workspace stays, with its trees).
pub fn delete_user(store: &dyn Store, name: &str) -> Result<(), AccountError> {
    let Some(user) = store.user(name)? else {
        return Err(AccountError::NotFound(format!("user {name:?}")));
    };
    if user.admin && store.users()?.iter().filter(|u| u.admin).count() == 1 {
        return Err(AccountError::Conflict(format!(
            "{name:?} is the last cluster admin"
        )));
    }
    for t in store.tokens(Some(name))? {
        store.delete_token(&t.id)?;
    }
    for (ws, _) in memberships(store, name)? {
        store.put_doc(MEMBER, &member_key(&ws, name), None)?;
    }
    store.delete_user(name)?;
    Ok(())
}

/// A token for the jobs of one tree (`MUSTER_TOKEN`): `read` and `operate` in the tree's
/// workspace only, as the tree's creator, for at most `ttl_ms`. Returns its id and text.
pub fn issue_job_token(
    store: &dyn Store,
    user: &str,
    workspace: &str,
    tree: &str,
    ttl_ms: i64,
) -> Result<(String, String), StoreError> {
    let text = crate::auth::new_token();
    let t = muster_store::Token {
        id: muster_core::Uuid::now_v7().to_string(),
        hash: crate::auth::sha256_hex(&text),
        prefix: text[..12].to_string(),
        user: user.to_string(),
        name: format!("jobs of tree {tree}"),
        scopes: vec!["read".into(), "operate".into()],
        created_at: now(),
        expires_at: Some(now().plus_ms(ttl_ms)),
        workspace: Some(workspace.to_string()),
    };
    store.put_token(&t)?;
    Ok((t.id, text))
}
