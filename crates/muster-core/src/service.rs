//! Services (SPEC §6, the AtYourService model): the service directories and interfaces of HQ
//! parsed and checked, the graph between services (parent/child by nesting, producer/consumer by
//! typed interface, every node a producer of `node`), `${...}` references resolved, and an input
//! hash per service. [`crate::service_plan`] compares that with what was recorded.
//!
//! Pure: the caller hands in the files of HQ (`services/...` and `interfaces/...`, by path) and
//! the nodes; nothing here reads a disk.
//!
//! A service directory is `services/<domain__name__instance>[/<child>...]`; each holds a
//! `service.toml`, optional `actions/<verb>` executables (or an `actions.py`) and its children's
//! directories. A service's *path* is its directory under `services/` (`a__b__c/d__e__f`).

use crate::names::{check_name, quote};
use crate::orders::sha256_hex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};

/// The lifecycle verbs an action may be for (`actions/<verb>`).
pub const VERBS: &[&str] = &[
    "build", "install", "reset", "start", "stop", "restart", "monitor", "import", "export",
];

/// The built-in interface every node provides.
pub const NODE_INTERFACE: &str = "node";

/// The most bytes a `service.toml` or interface file may have.
pub const MAX_TOML: usize = 256 << 10;

/// A problem found in HQ: the file (relative to HQ), the line when known, what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub file: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{}: {}", self.file, l, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

fn problem(file: &str, line: Option<usize>, message: impl Into<String>) -> Problem {
    Problem {
        file: file.to_string(),
        line,
        message: message.into(),
    }
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// The line where `needle` first appears in `text`.
fn line_with(text: &str, needle: &str) -> Option<usize> {
    text.find(needle).map(|o| line_of(text, o))
}

/// `[consumes.<role>]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Consume {
    pub interface: String,
    /// The producer: a node's name, a producer's instance, or its path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Keys the producer must match: a node's labels, or a producer service's params.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub select: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
}

impl Consume {
    pub fn min(&self) -> u32 {
        self.min.unwrap_or(1)
    }
    pub fn max(&self) -> u32 {
        self.max.unwrap_or(1).max(self.min())
    }
}

/// `[provides.<role>]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provide {
    pub interface: String,
    #[serde(default)]
    pub data: BTreeMap<String, toml::Value>,
}

/// `[build]`: where the source is, the command, the artifacts it leaves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Build {
    /// A directory in HQ (relative to HQ's root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// A git repository (URL or path) to clone instead, at `rev` (a branch, tag or commit,
    /// resolved to a commit at plan time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<String>,
    /// Run with `sh -c` in the source directory; without it, the service's `actions/build`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Globs relative to the source directory (`*` and `?` within a name, `**` across
    /// directories): what is kept.
    #[serde(default)]
    pub artifacts: Vec<String>,
}

impl Build {
    /// What is wrong with it as written (`has_action`: the service has `actions/build`).
    pub fn check(&self, has_action: bool) -> Result<(), String> {
        match (&self.source, &self.git) {
            (Some(_), Some(_)) => return Err("build: give source or git, not both".into()),
            (None, None) => {
                return Err("build: give source (a directory in HQ) or git (a URL) and rev".into())
            }
            (None, Some(_)) if self.rev.as_deref().is_none_or(str::is_empty) => {
                return Err("build: git needs rev (a branch, tag or commit)".into())
            }
            _ => {}
        }
        if let Some(src) = &self.source {
            relative("build.source", src)?;
        }
        if self.command.as_deref().is_none_or(|c| c.trim().is_empty()) && !has_action {
            return Err("build: give command, or an actions/build".into());
        }
        if self.artifacts.is_empty() {
            return Err("build: artifacts lists no glob: nothing would be kept".into());
        }
        for a in &self.artifacts {
            relative("build.artifacts", a)?;
        }
        Ok(())
    }
}

/// A path relative to a directory and staying in it: not empty, not absolute, no `..`.
fn relative(what: &str, p: &str) -> Result<(), String> {
    let t = p.trim_end_matches('/');
    if t.is_empty() || p.starts_with('/') || t.split('/').any(|seg| seg == ".." || seg.is_empty()) {
        return Err(format!(
            "{what}: {:?} is not a relative path inside the directory",
            p.chars().take(60).collect::<String>()
        ));
    }
    Ok(())
}

/// The keys of every `${secrets.KEY}` in the strings of `v`.
pub fn secret_refs(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::String(s) => {
            let mut rest = s.as_str();
            while let Some(i) = rest.find("${") {
                let after = &rest[i + 2..];
                let Some(j) = after.find('}') else { break };
                if let Some(k) = after[..j].trim().strip_prefix("secrets.") {
                    out.insert(k.to_string());
                }
                rest = &after[j + 1..];
            }
        }
        Value::Array(a) => a.iter().for_each(|x| secret_refs(x, out)),
        Value::Object(m) => m.values().for_each(|x| secret_refs(x, out)),
        _ => {}
    }
}

/// What is wrong with the secrets of a resolved `[process]`: they go in `env` only (arguments
/// show in ps), each as a whole value (`"${secrets.KEY}"`, so the node masks exactly it).
fn process_secrets_problem(v: &Value) -> Option<String> {
    let Value::Object(m) = v else {
        return None;
    };
    let names = |x: &Value| {
        let mut keys = BTreeSet::new();
        secret_refs(x, &mut keys);
        keys
    };
    if m.iter()
        .any(|(k, x)| k.as_str() != "env" && !names(x).is_empty())
    {
        return Some(
            "[process]: ${secrets.KEY} may be used in env only (arguments show in ps)".into(),
        );
    }
    let env = m.get("env").and_then(|e| e.as_object())?;
    for (name, x) in env {
        let keys = names(x);
        let whole = x
            .as_str()
            .map(|t| t.trim())
            .and_then(|t| t.strip_prefix("${"))
            .and_then(|t| t.strip_suffix('}'))
            .is_some_and(|t| !t.contains("${") && t.trim().starts_with("secrets."));
        if !keys.is_empty() && (keys.len() > 1 || !whole) {
            return Some(format!(
                "[process]: env {name}: a secret is a whole value, \"${{secrets.KEY}}\""
            ));
        }
    }
    None
}

/// Whether `path` (relative, `/`-separated) matches glob `pattern`: `*` and `?` within one
/// name, `**` as a whole part any number of directories (none too).
pub fn glob_match(pattern: &str, path: &str) -> bool {
    fn name(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) => name(&p[1..], s) || (!s.is_empty() && name(p, &s[1..])),
            (Some(b'?'), Some(_)) => name(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => name(&p[1..], &s[1..]),
            _ => false,
        }
    }
    fn parts(p: &[&str], s: &[&str]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(&"**"), _) => parts(&p[1..], s) || (!s.is_empty() && parts(p, &s[1..])),
            (Some(a), Some(b)) => name(a.as_bytes(), b.as_bytes()) && parts(&p[1..], &s[1..]),
            _ => false,
        }
    }
    let p: Vec<&str> = pattern.trim_start_matches("./").split('/').collect();
    let s: Vec<&str> = path.split('/').collect();
    parts(&p, &s)
}

/// `service.toml` as written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceToml {
    pub domain: String,
    pub name: String,
    pub instance: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub params: BTreeMap<String, toml::Value>,
    #[serde(default)]
    pub consumes: BTreeMap<String, Consume>,
    #[serde(default)]
    pub provides: BTreeMap<String, Provide>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<Build>,
    /// A process spec (SPEC §5a) without `name`: the server checks it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<toml::Table>,
    /// Secret keys the service uses (`${secrets.KEY}`), each with a description.
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
    /// How often its monitor runs (a duration like `30s`); default every pulse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor_every: Option<String>,
}

/// The type of an interface key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyType {
    String,
    Integer,
    Number,
    Boolean,
    Array,
    Object,
}

impl KeyType {
    fn admits(self, v: &Value) -> bool {
        match self {
            KeyType::String => v.is_string(),
            KeyType::Integer => v.is_i64() || v.is_u64(),
            KeyType::Number => v.is_number(),
            KeyType::Boolean => v.is_boolean(),
            KeyType::Array => v.is_array(),
            KeyType::Object => v.is_object(),
        }
    }
    fn as_str(self) -> &'static str {
        match self {
            KeyType::String => "string",
            KeyType::Integer => "integer",
            KeyType::Number => "number",
            KeyType::Boolean => "boolean",
            KeyType::Array => "array",
            KeyType::Object => "object",
        }
    }
}

/// `interfaces/<name>.toml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub keys: BTreeMap<String, KeyType>,
    #[serde(default)]
    pub optional: Vec<String>,
}

impl Interface {
    /// The built-in `node` interface: `name`, `address`, `labels`.
    pub fn node() -> Interface {
        Interface {
            description: "a node of the fleet".into(),
            keys: [
                ("name".to_string(), KeyType::String),
                ("address".to_string(), KeyType::String),
                ("labels".to_string(), KeyType::Object),
            ]
            .into(),
            optional: vec![],
        }
    }

    /// Why `data` does not fit this interface, if it does not.
    pub fn check(&self, data: &Map<String, Value>) -> Result<(), String> {
        for (k, t) in &self.keys {
            match data.get(k) {
                None if self.optional.contains(k) => {}
                None => return Err(format!("publishes no {}", quote(k))),
                Some(v) if !t.admits(v) => {
                    return Err(format!("publishes {} that is not {}", quote(k), t.as_str()))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

/// One service directory, parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    /// Its directory under `services/`.
    pub path: String,
    /// The parent's path.
    pub parent: Option<String>,
    pub meta: ServiceToml,
    /// `service.toml`'s text (for the lines of later errors).
    pub source: String,
    /// Its own files (children's excluded), relative to its directory, with their SHA-256.
    pub files: BTreeMap<String, String>,
    /// The verbs it has an action for (`actions/<verb>`, or a function of `actions.py`).
    pub actions: BTreeSet<String>,
}

impl Service {
    /// `services/<path>/service.toml`, the file its errors name.
    pub fn file(&self) -> String {
        format!("services/{}/service.toml", self.path)
    }
}

/// Every service and interface of HQ, parsed and checked each on its own.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    pub services: BTreeMap<String, Service>,
    pub interfaces: BTreeMap<String, Interface>,
    /// The version of each stored secret (a hash of its ciphertext, never of its value), by
    /// service path and key, set by the caller after [`load`]: a service's declared secrets'
    /// versions are an input ([`Resolved::parts`] `secrets`), so changing one reconfigures it.
    pub secret_versions: BTreeMap<String, BTreeMap<String, String>>,
    /// What each `[build]`'s source is, by service path, set by the caller after [`load`]:
    /// a hash of an HQ directory's files, or the commit a git rev names. Part of the build's
    /// input hash ([`Resolved::parts`] `build`), which keys its artifacts.
    pub build_sources: BTreeMap<String, String>,
}

/// A node as a producer of `node`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub address: String,
    pub labels: BTreeMap<String, String>,
}

impl NodeInfo {
    pub fn data(&self) -> Value {
        serde_json::json!({"name": self.name, "address": self.address, "labels": self.labels})
    }
}

/// The `(domain, name, instance)` of a directory name, or why not.
pub fn split_dir(name: &str) -> Result<(&str, &str, &str), String> {
    let parts: Vec<&str> = name.split("__").collect();
    if parts.len() != 3 {
        return Err(format!(
            "directory {} is not named domain__name__instance",
            quote(name)
        ));
    }
    for (what, p) in ["domain", "name", "instance"].iter().zip(&parts) {
        check_name(what, p)?;
    }
    Ok((parts[0], parts[1], parts[2]))
}

/// Whether `path` is a well-formed service path (`a__b__c[/d__e__f...]`).
pub fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.len() > 1000 {
        return Err("a service path is 1-1000 characters".into());
    }
    for seg in path.split('/') {
        split_dir(seg)?;
    }
    Ok(())
}

fn parse_toml<T: serde::de::DeserializeOwned>(file: &str, text: &str) -> Result<T, Problem> {
    toml::from_str::<T>(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start));
        let msg: String = e.message().trim().chars().take(200).collect();
        problem(file, line, msg)
    })
}

/// Functions `def NAME(` at the start of a line of `actions.py` that are verbs.
fn python_verbs(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("def "))
        .filter_map(|l| l.split('(').next())
        .map(str::trim)
        .filter(|n| VERBS.contains(n))
        .map(str::to_string)
        .collect()
}

/// Parses the services and interfaces among `files` (HQ paths → contents). Every problem is
/// reported, each with its file and (where it applies) its line.
pub fn load(files: &BTreeMap<String, Vec<u8>>) -> Result<Catalog, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut cat = Catalog::default();
    cat.interfaces
        .insert(NODE_INTERFACE.to_string(), Interface::node());
    // Interfaces.
    for (path, bytes) in files.range("interfaces/".to_string()..) {
        let Some(rest) = path.strip_prefix("interfaces/") else {
            break;
        };
        let Some(name) = rest.strip_suffix(".toml") else {
            continue;
        };
        if rest.contains('/') {
            continue;
        }
        if let Err(e) = check_name("interface", name) {
            problems.push(problem(path, None, e));
            continue;
        }
        if name == NODE_INTERFACE {
            problems.push(problem(path, None, "interface \"node\" is built in"));
            continue;
        }
        let Ok(text) = std::str::from_utf8(bytes) else {
            problems.push(problem(path, None, "not UTF-8"));
            continue;
        };
        if text.len() > MAX_TOML {
            problems.push(problem(path, None, "larger than 256 KiB"));
            continue;
        }
        match parse_toml::<Interface>(path, text) {
            Ok(i) => {
                for o in &i.optional {
                    if !i.keys.contains_key(o) {
                        problems.push(problem(
                            path,
                            line_with(text, "optional"),
                            format!("optional key {} is not among [keys]", quote(o)),
                        ));
                    }
                }
                cat.interfaces.insert(name.to_string(), i);
            }
            Err(p) => problems.push(p),
        }
    }
    // Service directories: every service.toml.
    let svc_files: Vec<(&String, &Vec<u8>)> = files
        .range("services/".to_string()..)
        .take_while(|(p, _)| p.starts_with("services/"))
        .collect();
    let dirs: BTreeSet<String> = svc_files
        .iter()
        .filter_map(|(p, _)| p.strip_suffix("/service.toml"))
        .filter_map(|p| p.strip_prefix("services/"))
        .map(str::to_string)
        .collect();
    for dir in &dirs {
        let file = format!("services/{dir}/service.toml");
        let segs: Vec<&str> = dir.split('/').collect();
        // Each segment a service directory, each prefix a service (the parents).
        let mut bad = false;
        for (i, seg) in segs.iter().enumerate() {
            if let Err(e) = split_dir(seg) {
                problems.push(problem(&file, None, e));
                bad = true;
                break;
            }
            if i + 1 < segs.len() && !dirs.contains(&segs[..=i].join("/")) {
                problems.push(problem(
                    &file,
                    None,
                    format!(
                        "its parent directory services/{} has no service.toml",
                        segs[..=i].join("/")
                    ),
                ));
                bad = true;
                break;
            }
        }
        if bad {
            continue;
        }
        let bytes = &files[&file];
        let Ok(text) = std::str::from_utf8(bytes) else {
            problems.push(problem(&file, None, "not UTF-8"));
            continue;
        };
        if text.len() > MAX_TOML {
            problems.push(problem(&file, None, "larger than 256 KiB"));
            continue;
        }
        let meta = match parse_toml::<ServiceToml>(&file, text) {
            Ok(m) => m,
            Err(p) => {
                problems.push(p);
                continue;
            }
        };
        let (d, n, i) = split_dir(segs[segs.len() - 1]).unwrap_or(("", "", ""));
        if (
            meta.domain.as_str(),
            meta.name.as_str(),
            meta.instance.as_str(),
        ) != (d, n, i)
        {
            problems.push(problem(
                &file,
                line_with(text, "domain").or(Some(1)),
                format!(
                    "domain/name/instance {}/{}/{} do not match the directory name",
                    quote(&meta.domain),
                    quote(&meta.name),
                    quote(&meta.instance)
                ),
            ));
            continue;
        }
        let mut ok = true;
        for role in meta.consumes.keys().chain(meta.provides.keys()) {
            if let Err(e) = check_name("role", role) {
                problems.push(problem(&file, line_with(text, role), e));
                ok = false;
            }
        }
        for (role, c) in &meta.consumes {
            if c.max.is_some_and(|m| m < c.min()) || c.max == Some(0) {
                problems.push(problem(
                    &file,
                    line_with(text, &format!("consumes.{role}")),
                    format!("consumes.{role}: max must be at least 1 and at least min"),
                ));
                ok = false;
            }
        }
        for (role, p) in &meta.provides {
            if p.interface == NODE_INTERFACE {
                problems.push(problem(
                    &file,
                    line_with(text, &format!("provides.{role}")),
                    "only nodes provide interface \"node\"",
                ));
                ok = false;
            }
        }
        for k in meta.secrets.keys() {
            if let Err(e) = check_name("secret", k) {
                problems.push(problem(&file, line_with(text, k), e));
                ok = false;
            }
        }
        if let Some(every) = &meta.monitor_every {
            if crate::process::DurText::Text(every.clone())
                .ms("monitor_every")
                .is_err()
            {
                problems.push(problem(
                    &file,
                    line_with(text, "monitor_every"),
                    "monitor_every is not a duration like 30s, 5m",
                ));
                ok = false;
            }
        }
        if !ok {
            continue;
        }
        // Its own files: under its directory, not under a child's.
        let prefix = format!("services/{dir}/");
        let mut own = BTreeMap::new();
        let mut actions = BTreeSet::new();
        for (p, b) in &svc_files {
            let Some(rel) = p.strip_prefix(&prefix) else {
                continue;
            };
            let first = rel.split('/').next().unwrap_or("");
            if rel.contains('/') && dirs.contains(&format!("{dir}/{first}")) {
                continue;
            }
            if rel.contains('/') && split_dir(first).is_ok() {
                // A child directory without service.toml: reported as its own problem below.
                continue;
            }
            own.insert(rel.to_string(), sha256_hex(b));
            if let Some(verb) = rel.strip_prefix("actions/") {
                if !verb.contains('/') {
                    if let Err(e) = check_name("action", verb) {
                        problems.push(problem(p, None, e));
                        ok = false;
                    }
                    actions.insert(verb.to_string());
                }
            }
            if rel == "actions.py" {
                if let Ok(t) = std::str::from_utf8(b) {
                    actions.extend(python_verbs(t));
                }
            }
        }
        if let Some(b) = &meta.build {
            if let Err(e) = b.check(actions.contains("build")) {
                problems.push(problem(&file, line_with(text, "[build]"), e));
                ok = false;
            }
        }
        if !ok {
            continue;
        }
        cat.services.insert(
            dir.clone(),
            Service {
                path: dir.clone(),
                parent: (segs.len() > 1).then(|| segs[..segs.len() - 1].join("/")),
                meta,
                source: text.to_string(),
                files: own,
                actions,
            },
        );
    }
    // Directories that look like services but have no service.toml.
    let mut orphans = BTreeSet::new();
    for (p, _) in &svc_files {
        let rel = &p["services/".len()..];
        let segs: Vec<&str> = rel.split('/').collect();
        for i in 0..segs.len().saturating_sub(1) {
            let d = segs[..=i].join("/");
            if dirs.contains(&d) {
                continue;
            }
            // Only a directory that stands where a service would: at the top, or right under a
            // service.
            let under_service = i == 0 || dirs.contains(&segs[..i].join("/"));
            if (under_service && split_dir(segs[i]).is_ok()) || i == 0 {
                orphans.insert(d);
            }
            break;
        }
    }
    for d in orphans {
        problems.push(problem(
            &format!("services/{d}"),
            None,
            "a service directory needs a service.toml",
        ));
    }
    if problems.is_empty() {
        Ok(cat)
    } else {
        problems.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
        problems.dedup();
        Err(problems)
    }
}

/// A consumer's role bound to its producers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Binding {
    pub interface: String,
    /// The producers: service paths, or `node:NAME`.
    pub producers: Vec<String>,
    /// More than one allowed (`max > 1`): the context holds a list.
    pub many: bool,
}

/// A service with its relations resolved: what the plan compares and an apply runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Resolved {
    pub path: String,
    pub parent: Option<String>,
    pub version: String,
    /// The node it runs on (a node it consumes); `None`: the server's embedded node.
    pub node: Option<String>,
    /// What must be installed before it: its parent and its producer services, sorted.
    pub deps: Vec<String>,
    pub params: Value,
    pub consumes: BTreeMap<String, Binding>,
    /// Each role's producer data as resolved at plan time (an object, or a list when `many`).
    pub consumed: Map<String, Value>,
    /// Each provided role: `{interface, data}`.
    pub provides: Map<String, Value>,
    pub process: Option<Value>,
    pub build: Option<Value>,
    pub actions: BTreeSet<String>,
    pub secrets: Vec<String>,
    pub monitor_every: Option<String>,
    /// The SHA-256 of each kind of input.
    pub parts: BTreeMap<String, String>,
    /// The SHA-256 of all inputs.
    pub hash: String,
}

/// The whole graph, in dependency order.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    /// Paths, every service after what it depends on.
    pub order: Vec<String>,
    pub services: BTreeMap<String, Resolved>,
}

/// JSON with object keys sorted at every level, so equal values hash equally.
pub fn canonical(v: &Value) -> String {
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let b: BTreeMap<&String, Value> = m.iter().map(|(k, v)| (k, sorted(v))).collect();
                let mut out = Map::new();
                for (k, v) in b {
                    out.insert(k.clone(), v);
                }
                Value::Object(out)
            }
            Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    serde_json::to_string(&sorted(v)).unwrap_or_default()
}

fn hash_of(v: &Value) -> String {
    sha256_hex(canonical(v).as_bytes())
}

fn to_json(v: &toml::Value) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// What `${...}` may name while resolving one value.
#[derive(Clone, Copy)]
struct Scope<'a> {
    params: Option<&'a Value>,
    consumed: &'a Map<String, Value>,
    node: Option<&'a Value>,
    secrets: &'a BTreeMap<String, String>,
    /// Where secrets may not go (`Some(why)`): published data, `[process]`, `[build]`.
    no_secrets: Option<&'static str>,
}

impl Scope<'_> {
    /// The value of reference `r`; `Ok(None)` for a secret (left for the node to resolve).
    fn get(&self, r: &str) -> Result<Option<Value>, String> {
        let parts: Vec<&str> = r.split('.').collect();
        let undefined = || format!("${{{r}}} names nothing");
        match parts.as_slice() {
            ["params", k] => {
                let p = self.params.ok_or_else(|| {
                    format!("${{{r}}}: params cannot refer to params")
                })?;
                p.get(*k).cloned().map(Some).ok_or_else(undefined)
            }
            ["consumes", role, k] => match self.consumed.get(*role) {
                Some(Value::Object(m)) => m.get(*k).cloned().map(Some).ok_or_else(undefined),
                Some(Value::Array(_)) => Err(format!(
                    "${{{r}}}: consumes.{role} may have several producers (max > 1); read it from the context instead"
                )),
                _ => Err(undefined()),
            },
            ["node", k] => self
                .node
                .and_then(|n| n.get(*k))
                .cloned()
                .map(Some)
                .ok_or_else(undefined),
            ["secrets", _] if self.no_secrets.is_some() => Err(format!(
                "${{{r}}}: a secret cannot be used in {}",
                self.no_secrets.unwrap_or_default()
            )),
            ["secrets", k] if self.secrets.contains_key(*k) => Ok(None),
            ["secrets", _] => Err(format!("${{{r}}} is not declared in [secrets]")),
            _ => Err(undefined()),
        }
    }

    /// `v` with every reference resolved: a string that is exactly one reference takes the
    /// referenced value (and its type); references inside longer strings are interpolated.
    fn resolve(&self, v: &Value) -> Result<Value, String> {
        Ok(match v {
            Value::String(s) => {
                if let Some(inner) = s.strip_prefix("${").and_then(|r| r.strip_suffix('}')) {
                    if !inner.contains("${") && !inner.contains('}') {
                        return Ok(self.get(inner.trim())?.unwrap_or_else(|| v.clone()));
                    }
                }
                let mut out = String::new();
                let mut rest = s.as_str();
                while let Some(i) = rest.find("${") {
                    out.push_str(&rest[..i]);
                    let after = &rest[i + 2..];
                    let j = after
                        .find('}')
                        .ok_or_else(|| "an unclosed ${ in a value".to_string())?;
                    let r = after[..j].trim();
                    match self.get(r)? {
                        Some(Value::String(t)) => out.push_str(&t),
                        Some(other) => out.push_str(&other.to_string()),
                        None => out.push_str(&format!("${{{r}}}")),
                    }
                    rest = &after[j + 1..];
                }
                out.push_str(rest);
                Value::String(out)
            }
            Value::Array(a) => Value::Array(
                a.iter()
                    .map(|x| self.resolve(x))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(m) => {
                let mut out = Map::new();
                for (k, x) in m {
                    out.insert(k.clone(), self.resolve(x)?);
                }
                Value::Object(out)
            }
            other => other.clone(),
        })
    }
}

/// The first reference in `v` (for an error's line).
fn first_ref(err: &str) -> Option<String> {
    let i = err.find("${")?;
    let j = err[i..].find('}')?;
    Some(err[i..i + j + 1].to_string())
}

/// Resolves the relations of `cat` over `nodes`: every consumer bound to its producers (the
/// `min`/`max` of each role enforced, an ambiguous choice named), no cycles, every reference
/// resolved, every published key checked against its interface; then each service's input hash.
pub fn resolve(cat: &Catalog, nodes: &[NodeInfo]) -> Result<Graph, Vec<Problem>> {
    let mut problems = Vec::new();
    // Who provides what (the services themselves: a consumer looks at each candidate's
    // instance and params without a lookup by path).
    let mut providers: BTreeMap<&str, Vec<&Service>> = BTreeMap::new();
    for s in cat.services.values() {
        for (role, p) in &s.meta.provides {
            if !cat.interfaces.contains_key(p.interface.as_str()) {
                problems.push(problem(
                    &s.file(),
                    line_with(&s.source, &format!("provides.{role}")),
                    format!(
                        "provides.{role}: no interface {} (interfaces/{}.toml)",
                        quote(&p.interface),
                        p.interface
                    ),
                ));
                continue;
            }
            providers.entry(p.interface.as_str()).or_default().push(s);
        }
    }
    // Bindings.
    let mut bindings: BTreeMap<&str, BTreeMap<String, Binding>> = BTreeMap::new();
    for s in cat.services.values() {
        let mut mine = BTreeMap::new();
        for (role, c) in &s.meta.consumes {
            let line = line_with(&s.source, &format!("consumes.{role}"));
            if !cat.interfaces.contains_key(c.interface.as_str()) {
                problems.push(problem(
                    &s.file(),
                    line,
                    format!(
                        "consumes.{role}: no interface {} (interfaces/{}.toml)",
                        quote(&c.interface),
                        c.interface
                    ),
                ));
                continue;
            }
            let mut cands: Vec<String> = if c.interface == NODE_INTERFACE {
                nodes
                    .iter()
                    .filter(|n| c.instance.as_ref().is_none_or(|i| *i == n.name))
                    .filter(|n| c.select.iter().all(|(k, v)| n.labels.get(k) == Some(v)))
                    .map(|n| format!("node:{}", n.name))
                    .collect()
            } else {
                providers
                    .get(c.interface.as_str())
                    .map(|v| v.as_slice())
                    .unwrap_or(&[])
                    .iter()
                    .filter(|other| other.path != s.path)
                    .filter(|other| {
                        c.instance
                            .as_ref()
                            .is_none_or(|i| *i == other.meta.instance || *i == other.path)
                    })
                    .filter(|other| {
                        c.select
                            .iter()
                            .all(|(k, v)| match other.meta.params.get(k) {
                                Some(toml::Value::String(s)) => s == v,
                                Some(x) => x.to_string() == *v,
                                None => false,
                            })
                    })
                    .map(|other| other.path.clone())
                    .collect()
            };
            cands.sort();
            let n = cands.len() as u32;
            let names = || {
                let shown: Vec<&str> = cands.iter().take(10).map(|s| s.as_str()).collect();
                let more = if cands.len() > 10 {
                    format!(" and {} more", cands.len() - 10)
                } else {
                    String::new()
                };
                format!("{}{more}", shown.join(", "))
            };
            if n < c.min() {
                let found = if n == 0 {
                    String::new()
                } else {
                    format!(": {}", names())
                };
                problems.push(problem(
                    &s.file(),
                    line,
                    format!(
                        "consumes.{role}: missing producer: needs at least {} of interface {}, found {n}{found}",
                        c.min(),
                        quote(&c.interface)
                    ),
                ));
                continue;
            }
            if n > c.max() {
                let how = if c.instance.is_none() && c.select.is_empty() {
                    "ambiguous"
                } else {
                    "too many producers"
                };
                problems.push(problem(
                    &s.file(),
                    line,
                    format!(
                        "consumes.{role}: {how}: at most {} of interface {}, and {n} match: {}; choose with instance or select",
                        c.max(),
                        quote(&c.interface),
                        names()
                    ),
                ));
                continue;
            }
            mine.insert(
                role.clone(),
                Binding {
                    interface: c.interface.clone(),
                    producers: cands,
                    many: c.max() > 1,
                },
            );
        }
        bindings.insert(&s.path, mine);
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    // Dependencies and their order.
    let mut deps: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for s in cat.services.values() {
        let mut d = BTreeSet::new();
        if let Some(p) = &s.parent {
            d.insert(p.clone());
        }
        for b in bindings[s.path.as_str()].values() {
            for p in &b.producers {
                if !p.starts_with("node:") {
                    d.insert(p.clone());
                }
            }
        }
        deps.insert(&s.path, d);
    }
    let order = match topo(&deps) {
        Ok(o) => o,
        Err(cycle) => {
            let first = &cat.services[&cycle[0]];
            return Err(vec![problem(
                &first.file(),
                None,
                format!("a cycle of dependencies: {}", cycle.join(" -> ")),
            )]);
        }
    };
    // Resolve in order.
    let node_data: BTreeMap<&str, Value> =
        nodes.iter().map(|n| (n.name.as_str(), n.data())).collect();
    let mut graph = Graph::default();
    for path in &order {
        let s = &cat.services[path];
        let file = s.file();
        let b = &bindings[path.as_str()];
        let mut consumed = Map::new();
        let mut producer_inputs = Map::new();
        let mut node = None;
        let mut unresolved = false;
        for (role, bind) in b {
            let mut datas = Vec::new();
            let mut inputs = Vec::new();
            for p in &bind.producers {
                if let Some(n) = p.strip_prefix("node:") {
                    let d = node_data.get(n).cloned().unwrap_or(Value::Null);
                    inputs.push(serde_json::json!({"node": n, "data": d}));
                    datas.push(d);
                    if node.is_none() {
                        node = Some(n.to_string());
                    }
                } else {
                    let Some(prod) = graph.services.get(p) else {
                        // The producer has problems of its own (reported).
                        unresolved = true;
                        continue;
                    };
                    let data = prod
                        .provides
                        .values()
                        .find(|v| v["interface"] == Value::String(bind.interface.clone()))
                        .map(|v| v["data"].clone())
                        .unwrap_or(Value::Object(Map::new()));
                    inputs.push(serde_json::json!({"service": p, "hash": prod.hash}));
                    datas.push(data);
                }
            }
            consumed.insert(
                role.clone(),
                if bind.many {
                    Value::Array(datas)
                } else {
                    datas.into_iter().next().unwrap_or(Value::Null)
                },
            );
            producer_inputs.insert(role.clone(), Value::Array(inputs));
        }
        if unresolved {
            continue;
        }
        let unset: Vec<&String> = s
            .meta
            .secrets
            .keys()
            .filter(|k| {
                !cat.secret_versions
                    .get(path)
                    .is_some_and(|m| m.contains_key(*k))
            })
            .collect();
        if !unset.is_empty() {
            for k in unset {
                problems.push(problem(
                    &file,
                    line_with(&s.source, k),
                    format!(
                        "service {path}: secret {k} is not set (muster services secret set {path} {k})"
                    ),
                ));
            }
            continue;
        }
        let node_value = node.as_deref().and_then(|n| node_data.get(n));
        let fail = |e: String| {
            let line = first_ref(&e).and_then(|r| line_with(&s.source, &r));
            problem(&file, line, e)
        };
        // params may refer to what is consumed and to the node, not to params.
        let raw_params: Map<String, Value> = s
            .meta
            .params
            .iter()
            .map(|(k, v)| (k.clone(), to_json(v)))
            .collect();
        let scope = Scope {
            params: None,
            consumed: &consumed,
            node: node_value,
            secrets: &s.meta.secrets,
            no_secrets: None,
        };
        let params = match scope.resolve(&Value::Object(raw_params)) {
            Ok(p) => p,
            Err(e) => {
                problems.push(fail(e));
                continue;
            }
        };
        let scope = Scope {
            params: Some(&params),
            ..scope
        };
        // Secrets resolve only on the node, in the action's context: never in what is
        // published (it reaches consumers and the records) nor in what the server runs.
        let published_scope = Scope {
            no_secrets: Some("published data (consumers and records would see it)"),
            ..scope
        };
        // A [process] may name secrets in its env only (the node puts the values there at
        // each start; arguments and files would show them to other users).
        let process_scope = scope;
        let build_scope = Scope {
            no_secrets: Some("[build]"),
            ..scope
        };
        let mut provides = Map::new();
        let mut bad = false;
        for (role, p) in &s.meta.provides {
            let raw: Map<String, Value> = p
                .data
                .iter()
                .map(|(k, v)| (k.clone(), to_json(v)))
                .collect();
            match published_scope.resolve(&Value::Object(raw)) {
                Ok(Value::Object(data)) => {
                    if let Some(i) = cat.interfaces.get(&p.interface) {
                        if let Err(e) = i.check(&data) {
                            problems.push(problem(
                                &file,
                                line_with(&s.source, &format!("provides.{role}")),
                                format!("provides.{role} (interface {}) {e}", quote(&p.interface)),
                            ));
                            bad = true;
                        }
                    }
                    provides.insert(
                        role.clone(),
                        serde_json::json!({"interface": p.interface, "data": data}),
                    );
                }
                Ok(_) => {}
                Err(e) => {
                    problems.push(fail(e));
                    bad = true;
                }
            }
        }
        let process = match s
            .meta
            .process
            .as_ref()
            .map(|t| process_scope.resolve(&to_json(&toml::Value::Table(t.clone()))))
        {
            Some(Ok(v)) if process_secrets_problem(&v).is_some() => {
                problems.push(problem(
                    &file,
                    line_with(&s.source, "[process]"),
                    process_secrets_problem(&v).unwrap_or_default(),
                ));
                bad = true;
                None
            }
            Some(Ok(v)) => match process_spec(path, &v) {
                Ok(_) => Some(v),
                Err(e) => {
                    problems.push(problem(
                        &file,
                        line_with(&s.source, "[process]"),
                        format!("[process]: {e}"),
                    ));
                    bad = true;
                    None
                }
            },
            Some(Err(e)) => {
                problems.push(fail(e));
                bad = true;
                None
            }
            None => None,
        };
        let build = match s
            .meta
            .build
            .as_ref()
            .map(|b| build_scope.resolve(&serde_json::to_value(b).unwrap_or(Value::Null)))
        {
            Some(Ok(v)) => Some(v),
            Some(Err(e)) => {
                problems.push(fail(e));
                bad = true;
                None
            }
            None => None,
        };
        if bad {
            continue;
        }
        let files = serde_json::to_value(&s.files).unwrap_or(Value::Null);
        let mut parts = BTreeMap::new();
        parts.insert(
            "version".to_string(),
            hash_of(&Value::String(s.meta.version.clone())),
        );
        parts.insert("params".to_string(), hash_of(&params));
        parts.insert("files".to_string(), hash_of(&files));
        parts.insert(
            "producers".to_string(),
            hash_of(&Value::Object(producer_inputs)),
        );
        parts.insert(
            "provides".to_string(),
            hash_of(&Value::Object(provides.clone())),
        );
        parts.insert(
            "process".to_string(),
            hash_of(&process.clone().unwrap_or(Value::Null)),
        );
        // The build's inputs (its spec, its source's content, its action): the key of its
        // artifacts, so that the same inputs never build twice.
        let build_inputs = match &build {
            Some(b) => serde_json::json!({
                "build": b,
                "source": cat.build_sources.get(path),
                "action": s.files.get("actions/build"),
            }),
            None => Value::Null,
        };
        parts.insert("build".to_string(), hash_of(&build_inputs));
        parts.insert("node".to_string(), hash_of(&serde_json::json!(node)));
        if !s.meta.secrets.is_empty() {
            // Only services with secrets have the part, so other hashes stay as they were.
            let versions: Map<String, Value> = s
                .meta
                .secrets
                .keys()
                .map(|k| {
                    let v = cat
                        .secret_versions
                        .get(path)
                        .and_then(|m| m.get(k))
                        .cloned();
                    (k.clone(), serde_json::json!(v))
                })
                .collect();
            parts.insert("secrets".to_string(), hash_of(&Value::Object(versions)));
        }
        let hash = hash_of(&serde_json::to_value(&parts).unwrap_or(Value::Null));
        graph.services.insert(
            path.clone(),
            Resolved {
                path: path.clone(),
                parent: s.parent.clone(),
                version: s.meta.version.clone(),
                node,
                deps: deps[path.as_str()].iter().cloned().collect(),
                params,
                consumes: b.clone(),
                consumed,
                provides,
                process,
                build,
                actions: s.actions.clone(),
                secrets: s.meta.secrets.keys().cloned().collect(),
                monitor_every: s.meta.monitor_every.clone(),
                parts,
                hash,
            },
        );
        graph.order.push(path.clone());
    }
    if problems.is_empty() {
        Ok(graph)
    } else {
        Err(problems)
    }
}

/// The process spec (SPEC §5a) of the resolved `[process]` table of service `path`, checked:
/// named `service PATH`, in workspace `hq`.
pub fn process_spec(path: &str, table: &Value) -> Result<crate::process::ProcessSpec, String> {
    let mut v = table.clone();
    if let Value::Object(m) = &mut v {
        if m.contains_key("name") || m.contains_key("tags") {
            return Err("name and tags are given by muster".into());
        }
        m.insert("name".into(), Value::String(format!("service {path}")));
        // A reference that is a whole argument keeps its type (`"${params.port}"` an
        // integer); in an argv, an env or a health command, it is the text of it.
        fn texts(v: &mut Value) {
            match v {
                Value::Number(_) | Value::Bool(_) => *v = Value::String(v.to_string()),
                Value::Array(a) => a.iter_mut().for_each(texts),
                Value::Object(o) => o.values_mut().for_each(texts),
                _ => {}
            }
        }
        for k in ["exec", "env"] {
            if let Some(x) = m.get_mut(k) {
                texts(x);
            }
        }
        if let Some(x) = m.get_mut("health").and_then(|h| h.get_mut("exec")) {
            texts(x);
        }
    }
    let mut spec: crate::process::ProcessSpec = serde_json::from_value(v)
        .map_err(|e| e.to_string().chars().take(160).collect::<String>())?;
    spec.tags = Some(crate::Tags {
        workspace: "hq".into(),
        ..Default::default()
    });
    crate::process::validate(&spec, "hq", crate::process::Defaults::default())?;
    Ok(spec)
}

/// Kahn's algorithm over `deps` (each key after its dependencies; ties by name); on a cycle,
/// the services on one.
pub fn topo(deps: &BTreeMap<&str, BTreeSet<String>>) -> Result<Vec<String>, Vec<String>> {
    let mut left: BTreeMap<&str, usize> = deps
        .iter()
        .map(|(k, d)| {
            (
                *k,
                d.iter().filter(|x| deps.contains_key(x.as_str())).count(),
            )
        })
        .collect();
    let mut users: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (k, d) in deps {
        for x in d {
            if let Some((x, _)) = deps.get_key_value(x.as_str()) {
                users.entry(x).or_default().push(k);
            }
        }
    }
    let mut ready: BTreeSet<&str> = left
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(k, _)| *k)
        .collect();
    let mut order = Vec::new();
    while let Some(k) = ready.pop_first() {
        order.push(k.to_string());
        for u in users.get(k).map(|v| v.as_slice()).unwrap_or(&[]) {
            let n = left.get_mut(u).expect("every user is a key");
            *n -= 1;
            if *n == 0 {
                ready.insert(u);
            }
        }
    }
    if order.len() == deps.len() {
        return Ok(order);
    }
    // Walk from a service left over along its unfinished dependencies until one repeats.
    let done: BTreeSet<&str> = order.iter().map(|s| s.as_str()).collect();
    let start = left
        .keys()
        .find(|k| !done.contains(*k))
        .copied()
        .unwrap_or_default();
    let mut path = vec![start];
    loop {
        let cur = path[path.len() - 1];
        let next = deps[cur]
            .iter()
            .map(|s| s.as_str())
            .find(|x| deps.contains_key(x) && !done.contains(x))
            .and_then(|x| deps.get_key_value(x).map(|(k, _)| *k))
            .unwrap_or(start);
        if let Some(i) = path.iter().position(|p| *p == next) {
            let mut cycle: Vec<String> = path[i..].iter().map(|s| s.to_string()).collect();
            cycle.push(next.to_string());
            return Err(cycle);
        }
        path.push(next);
    }
}

#[cfg(test)]
mod tests;
