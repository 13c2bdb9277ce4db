//! A model bundle: a directory holding `bundle.json` (SPEC §8) and the model's files.
//!
//! [`Bundle::load`] reads `bundle.json` and validates it strictly: every key known, each value of
//! its type and range, the entrypoint file inside the directory and — for Python — its class
//! defined there. Errors name the key at fault and quote at most a short piece of the input
//! ([`muster_core::names::quote`]), since a bundle comes from an upload.

use crate::{Error, Result};
use muster_core::names::{check_name, quote};
use muster_core::process::{parse_memory, Limits};
use muster_core::spec::{MAX_LABEL_BYTES, MAX_SELECTOR_LABELS};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

/// The largest `bundle.json` read.
pub const MAX_BUNDLE_JSON: u64 = 1 << 20;
/// The most `requirements` lines, and characters of each.
pub const MAX_REQUIREMENTS: usize = 500;
pub const MAX_REQUIREMENT_CHARS: usize = 200;
/// The most replicas and workers (per replica) a bundle may ask for.
pub const MAX_REPLICAS: u32 = 64;
pub const MAX_WORKERS: u32 = 64;

/// Every key `bundle.json` may hold.
pub const KEYS: &[&str] = &[
    "name",
    "runtime",
    "entrypoint",
    "model",
    "requirements",
    "replicas",
    "workers",
    "node_selector",
    "limits",
    "example",
    "python",
    "compat",
];

/// How the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// Persistent Python workers calling `execute(self, data)` on the entrypoint's class.
    Python,
    /// An ONNX model served natively (`model`).
    Onnx,
    /// Persistent R workers calling `execute(data)` from the entrypoint script.
    R,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Python => "python",
            Runtime::Onnx => "onnx",
            Runtime::R => "r",
        }
    }
}

/// Where the model's code is: a file of the bundle and, for Python, the class in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entrypoint {
    /// A relative path inside the bundle directory, e.g. `model.py`.
    pub file: String,
    /// The class the worker instantiates (Python only).
    pub class: Option<String>,
}

/// Which client's conventions a bundle follows beyond muster's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compat {
    /// Made from a `yhat` client deploy: its environment also holds the `yhat` and `terragon`
    /// packages the bundle's code imports.
    Yhat,
}

/// A validated bundle.
#[derive(Clone, Debug, PartialEq)]
pub struct Bundle {
    /// The bundle's directory.
    pub dir: PathBuf,
    pub name: String,
    pub runtime: Runtime,
    /// Python and R: the code to load.
    pub entrypoint: Option<Entrypoint>,
    /// ONNX: the model file, a relative path.
    pub model: Option<String>,
    /// Python: pip requirement strings; R: Debian `r-cran-*` package names.
    pub requirements: Vec<String>,
    /// How many predictor processes (default 1).
    pub replicas: u32,
    /// Worker processes per replica (default 1).
    pub workers: u32,
    pub node_selector: BTreeMap<String, String>,
    /// Per replica: memory (bytes) and CPU (cores).
    pub limits: Limits,
    /// The `data` of the request used as health check and warm-up.
    pub example: Option<Value>,
    /// Which interpreter versions the model runs on (Python only).
    pub python: Option<PythonConstraint>,
    pub compat: Option<Compat>,
}

impl Bundle {
    /// Reads and validates `dir/bundle.json` and the files it names.
    pub fn load(dir: &Path) -> Result<Bundle> {
        let path = dir.join("bundle.json");
        let meta = std::fs::metadata(&path).map_err(|e| {
            Error::Bundle(match e.kind() {
                std::io::ErrorKind::NotFound => "the bundle has no bundle.json".to_string(),
                _ => format!("bundle.json cannot be read: {e}"),
            })
        })?;
        if !meta.is_file() {
            return Err(Error::Bundle("bundle.json is not a file".into()));
        }
        if meta.len() > MAX_BUNDLE_JSON {
            return Err(Error::Bundle(format!(
                "bundle.json is {} bytes, more than the {} allowed",
                meta.len(),
                MAX_BUNDLE_JSON
            )));
        }
        let text = std::fs::read(&path).map_err(Error::io("reading bundle.json"))?;
        let bundle = Bundle::parse(&text, dir)?;
        bundle.check_files()?;
        Ok(bundle)
    }

    /// Validates the text of a `bundle.json` (not the files it names: see [`Bundle::load`]).
    pub fn parse(text: &[u8], dir: &Path) -> Result<Bundle> {
        let bad = |m: String| Error::Bundle(format!("bundle.json: {m}"));
        let value: Value = serde_json::from_slice(text).map_err(|e| {
            // serde_json's message names a line and column, never the input.
            bad(format!("not valid JSON ({e})"))
        })?;
        let Value::Object(obj) = value else {
            return Err(bad("must be a JSON object".into()));
        };
        for k in obj.keys() {
            if !KEYS.contains(&k.as_str()) {
                return Err(bad(format!(
                    "unknown key {} (known: {})",
                    quote(k),
                    KEYS.join(", ")
                )));
            }
        }
        let name = string(&obj, "name")?.ok_or_else(|| bad("name is missing".into()))?;
        check_name("name", &name).map_err(bad)?;
        let runtime = match string(&obj, "runtime")?.as_deref() {
            None => return Err(bad("runtime is missing (python, onnx or r)".into())),
            Some("python") => Runtime::Python,
            Some("onnx") => Runtime::Onnx,
            Some("r") => Runtime::R,
            Some(other) => {
                return Err(bad(format!(
                    "runtime {} is not one of python, onnx, r",
                    quote(other)
                )))
            }
        };
        let entrypoint = match (runtime, string(&obj, "entrypoint")?) {
            (Runtime::Onnx, Some(_)) => {
                return Err(bad(
                    "entrypoint is not used by the onnx runtime (name the file in model)".into(),
                ))
            }
            (Runtime::Onnx, None) => None,
            (_, None) => {
                return Err(bad(match runtime {
                    Runtime::Python => "entrypoint is missing, e.g. \"model.py:IrisModel\"".into(),
                    _ => "entrypoint is missing, e.g. \"model.R\"".into(),
                }))
            }
            (Runtime::Python, Some(e)) => {
                let Some((file, class)) = e.rsplit_once(':') else {
                    return Err(bad(format!(
                        "entrypoint {} must be FILE.py:CLASS, e.g. \"model.py:IrisModel\"",
                        quote(&e)
                    )));
                };
                check_relative("entrypoint", file).map_err(bad)?;
                if !file.ends_with(".py") {
                    return Err(bad(format!(
                        "entrypoint file {} must end in .py",
                        quote(file)
                    )));
                }
                if !is_identifier(class) {
                    return Err(bad(format!(
                        "entrypoint class {} is not a Python identifier",
                        quote(class)
                    )));
                }
                Some(Entrypoint {
                    file: file.to_string(),
                    class: Some(class.to_string()),
                })
            }
            (Runtime::R, Some(file)) => {
                check_relative("entrypoint", &file).map_err(bad)?;
                if !file.ends_with(".R") && !file.ends_with(".r") {
                    return Err(bad(format!(
                        "entrypoint {} must be an R file, e.g. \"model.R\"",
                        quote(&file)
                    )));
                }
                Some(Entrypoint { file, class: None })
            }
        };
        let model = match (runtime, string(&obj, "model")?) {
            (Runtime::Onnx, None) => {
                return Err(bad(
                    "model is missing: the onnx runtime needs e.g. \"model.onnx\"".into(),
                ))
            }
            (Runtime::Onnx, Some(m)) => {
                check_relative("model", &m).map_err(bad)?;
                Some(m)
            }
            (_, Some(_)) => {
                return Err(bad(format!(
                    "model is used by the onnx runtime only, not {}",
                    runtime.as_str()
                )))
            }
            (_, None) => None,
        };
        let requirements = match obj.get("requirements") {
            None => Vec::new(),
            Some(Value::Array(items)) => {
                if items.len() > MAX_REQUIREMENTS {
                    return Err(bad(format!(
                        "requirements may hold at most {MAX_REQUIREMENTS} entries"
                    )));
                }
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let Value::String(s) = item else {
                        return Err(bad(format!("requirements[{i}] must be a string")));
                    };
                    check_requirement(s).map_err(|m| bad(format!("requirements[{i}] {m}")))?;
                    if runtime == Runtime::R && !crate::r::is_debian_r_package(s.trim()) {
                        return Err(bad(format!(
                            "requirements[{i}] {} is not a Debian R package: an R bundle names Debian packages such as \"r-cran-randomforest\" (CRAN cannot be reached from these machines)",
                            quote(s)
                        )));
                    }
                    out.push(s.trim().to_string());
                }
                out
            }
            Some(_) => return Err(bad("requirements must be a list of strings".into())),
        };
        let replicas = count(&obj, "replicas", MAX_REPLICAS)?;
        let workers = count(&obj, "workers", MAX_WORKERS)?;
        let node_selector = match obj.get("node_selector") {
            None => BTreeMap::new(),
            Some(Value::Object(m)) => {
                if m.len() > MAX_SELECTOR_LABELS {
                    return Err(bad(format!(
                        "node_selector may name at most {MAX_SELECTOR_LABELS} labels"
                    )));
                }
                let mut out = BTreeMap::new();
                for (k, v) in m {
                    let ok = |t: &str| {
                        !t.is_empty()
                            && t.len() <= MAX_LABEL_BYTES
                            && !t.chars().any(char::is_control)
                    };
                    match v {
                        Value::String(v) if ok(k) && ok(v) => {
                            out.insert(k.clone(), v.clone());
                        }
                        _ => {
                            return Err(bad(format!(
                                "node_selector label {} must have a key and a string value of 1-{MAX_LABEL_BYTES} printable characters",
                                quote(k)
                            )))
                        }
                    }
                }
                out
            }
            Some(_) => return Err(bad("node_selector must be an object of label: value".into())),
        };
        let limits = match obj.get("limits") {
            None => Limits::default(),
            Some(Value::Object(m)) => {
                let mut l = Limits::default();
                for (k, v) in m {
                    match k.as_str() {
                        "memory" => l.memory = Some(parse_memory(v).map_err(bad)?),
                        "cpu" => match v.as_f64() {
                            Some(c) if c > 0.0 && c <= 1024.0 => l.cpu = Some(c),
                            _ => {
                                return Err(bad(
                                    "limits.cpu must be a number of cores above 0".into()
                                ))
                            }
                        },
                        _ => {
                            return Err(bad(format!(
                                "unknown key limits.{} (known: memory, cpu)",
                                quote(k)
                            )))
                        }
                    }
                }
                l
            }
            Some(_) => {
                return Err(bad(
                    "limits must be an object like {\"memory\": \"512M\", \"cpu\": 1}".into(),
                ))
            }
        };
        let example = match obj.get("example") {
            None => None,
            Some(Value::Object(m)) if m.len() == 1 && m.contains_key("data") => {
                Some(m["data"].clone())
            }
            Some(_) => {
                return Err(bad(
                    "example must be a predict request body, {\"data\": ...}".into(),
                ))
            }
        };
        let python = match string(&obj, "python")? {
            None => None,
            Some(_) if runtime != Runtime::Python => {
                return Err(bad(format!(
                    "python is a constraint of the python runtime, not {}",
                    runtime.as_str()
                )))
            }
            Some(p) => Some(PythonConstraint::parse(&p).map_err(|m| bad(format!("python {m}")))?),
        };
        let compat = match string(&obj, "compat")?.as_deref() {
            None => None,
            Some("yhat") if runtime == Runtime::Python => Some(Compat::Yhat),
            Some(other) => {
                return Err(bad(format!(
                    "compat {} is not known (the python runtime knows \"yhat\")",
                    quote(other)
                )))
            }
        };
        Ok(Bundle {
            dir: dir.to_path_buf(),
            name,
            runtime,
            entrypoint,
            model,
            requirements,
            replicas,
            workers,
            node_selector,
            limits,
            example,
            python,
            compat,
        })
    }

    /// Checks that the files `bundle.json` names are regular files inside the directory and, for
    /// Python, that the entrypoint file defines its class.
    pub fn check_files(&self) -> Result<()> {
        let root = self.dir.canonicalize().map_err(Error::io(format!(
            "opening the bundle {}",
            self.dir.display()
        )))?;
        let file_inside = |key: &str, rel: &str| -> Result<PathBuf> {
            let missing = || {
                Error::Bundle(format!(
                    "bundle.json: {key} file {} is not in the bundle",
                    quote(rel)
                ))
            };
            let p = root.join(rel).canonicalize().map_err(|_| missing())?;
            if !p.starts_with(&root) {
                return Err(Error::Bundle(format!(
                    "bundle.json: {key} file {} leads out of the bundle",
                    quote(rel)
                )));
            }
            if !p.is_file() {
                return Err(missing());
            }
            Ok(p)
        };
        if let Some(m) = &self.model {
            file_inside("model", m)?;
        }
        if let Some(e) = &self.entrypoint {
            let p = file_inside("entrypoint", &e.file)?;
            if let Some(class) = &e.class {
                let text = std::fs::read(&p).map_err(Error::io("reading the entrypoint"))?;
                if !defines(&String::from_utf8_lossy(&text), class) {
                    return Err(Error::Bundle(format!(
                        "bundle.json: entrypoint class {} is not defined in {} (no top-level `class {}`)",
                        quote(class),
                        quote(&e.file),
                        class
                    )));
                }
            }
        }
        Ok(())
    }
}

/// A key's string value, if present; an error naming the key if it is not a string.
fn string(obj: &Map<String, Value>, key: &str) -> Result<Option<String>> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(Error::Bundle(format!(
            "bundle.json: {key} must be a string"
        ))),
    }
}

/// A count from 1 to `max`, 1 when absent.
fn count(obj: &Map<String, Value>, key: &str, max: u32) -> Result<u32> {
    match obj.get(key) {
        None => Ok(1),
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 && n <= max as u64 => Ok(n as u32),
            _ => Err(Error::Bundle(format!(
                "bundle.json: {key} must be a whole number from 1 to {max}"
            ))),
        },
    }
}

/// A relative path that stays inside the bundle: no `..`, not absolute, not empty.
fn check_relative(key: &str, path: &str) -> Result<(), String> {
    let p = Path::new(path);
    let inside = !path.is_empty()
        && path.len() <= 1024
        && !path.chars().any(char::is_control)
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !inside {
        return Err(format!(
            "{key} {} must be a relative path inside the bundle",
            quote(path)
        ));
    }
    Ok(())
}

/// A pip requirement string: printable, short, and not an option (`-e`, `--index-url`, …) that
/// would change where pip looks.
fn check_requirement(s: &str) -> Result<(), String> {
    let t = s.trim();
    if t.is_empty() || s.chars().count() > MAX_REQUIREMENT_CHARS || s.chars().any(char::is_control)
    {
        return Err(format!(
            "{} must be 1-{MAX_REQUIREMENT_CHARS} printable characters",
            quote(s)
        ));
    }
    if t.starts_with('-') {
        return Err(format!("{} is a pip option, not a requirement", quote(s)));
    }
    if !t.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(format!("{} must start with a package name", quote(s)));
    }
    Ok(())
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_alphabetic())
        && chars.all(|c| c == '_' || c.is_alphanumeric())
        && s.len() <= 200
}

/// Whether Python source defines `name` at the top level: `class name`, an assignment
/// `name = …`, or an import that names it.
fn defines(source: &str, name: &str) -> bool {
    let word_at = |s: &str, i: usize| {
        s[i..].starts_with(name)
            && !s[i + name.len()..].starts_with(|c: char| c == '_' || c.is_alphanumeric())
            && (i == 0 || !s[..i].ends_with(|c: char| c == '_' || c.is_alphanumeric()))
    };
    source.lines().any(|line| {
        if let Some(rest) = line.strip_prefix("class ") {
            return word_at(rest.trim_start(), 0);
        }
        if line.starts_with(name) && word_at(line, 0) {
            return line[name.len()..].trim_start().starts_with(['=', ':']);
        }
        if line.starts_with("from ") || line.starts_with("import ") {
            return line.match_indices(name).any(|(i, _)| word_at(line, i));
        }
        false
    })
}

/// A Python version constraint (PEP 440 specifiers on the interpreter's version): clauses
/// separated by commas, each `==3.11`, `==3.11.*`, `!=3.12.0`, `>=3.9`, `<3.13`, `~=3.10`, or a
/// bare version meaning that release series (`3.11` is `==3.11.*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PythonConstraint {
    text: String,
    clauses: Vec<(Op, Vec<u32>)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Eq,
    EqPrefix,
    Ne,
    NePrefix,
    Ge,
    Gt,
    Le,
    Lt,
    Compatible,
}

impl PythonConstraint {
    /// Parses a constraint; the error is a phrase that follows the key's name.
    pub fn parse(text: &str) -> Result<PythonConstraint, String> {
        let bad = || {
            format!(
                "{} must be a version constraint like \">=3.9,<3.13\" or \"3.11\"",
                quote(text)
            )
        };
        if text.trim().is_empty() || text.len() > 100 {
            return Err(bad());
        }
        let mut clauses = Vec::new();
        for clause in text.split(',') {
            let c = clause.trim();
            let ops = [
                ("~=", Op::Compatible),
                ("==", Op::Eq),
                ("!=", Op::Ne),
                (">=", Op::Ge),
                ("<=", Op::Le),
                (">", Op::Gt),
                ("<", Op::Lt),
            ];
            let (mut op, rest) = ops
                .iter()
                .find_map(|(p, op)| c.strip_prefix(p).map(|r| (*op, r.trim())))
                .unwrap_or((Op::EqPrefix, c));
            let (version, star) = match rest.strip_suffix(".*") {
                Some(v) => (v, true),
                None => (rest, false),
            };
            let parts: Vec<u32> = version
                .split('.')
                .map(|p| p.parse::<u32>().map_err(|_| bad()))
                .collect::<Result<_, _>>()?;
            if parts.is_empty() || parts.len() > 3 {
                return Err(bad());
            }
            op = match (op, star) {
                (Op::Eq, true) | (Op::EqPrefix, _) => Op::EqPrefix,
                (Op::Ne, true) => Op::NePrefix,
                (Op::Compatible, false) if parts.len() >= 2 => Op::Compatible,
                (op, false) if op != Op::Compatible => op,
                _ => return Err(bad()),
            };
            clauses.push((op, parts));
        }
        Ok(PythonConstraint {
            text: text.trim().to_string(),
            clauses,
        })
    }

    /// Whether an interpreter of `version` (major, minor, micro) satisfies every clause.
    pub fn matches(&self, version: [u32; 3]) -> bool {
        self.clauses.iter().all(|(op, parts)| {
            let mut padded = [0u32; 3];
            padded[..parts.len()].copy_from_slice(parts);
            let prefix = version[..parts.len()] == parts[..];
            match op {
                Op::Eq => version == padded,
                Op::EqPrefix => prefix,
                Op::Ne => version != padded,
                Op::NePrefix => !prefix,
                Op::Ge => version >= padded,
                Op::Gt => version > padded,
                Op::Le => version <= padded,
                Op::Lt => version < padded,
                Op::Compatible => {
                    version >= padded && version[..parts.len() - 1] == parts[..parts.len() - 1]
                }
            }
        })
    }

    /// The constraint as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests;
