//! The `yhat` client's deploys (`yhat==1.10.0`, `../shared/yhat/PROTOCOL.md` §3) made into
//! bundles the Python worker runs.
//!
//! `POST /deployer/model/large` carries one multipart part, `model_name`, with no filename and
//! no content type, holding `zlib(JSON bundle)` — the `.yhat` format. [`model_part`] finds that
//! part's raw bytes, [`decompress`] inflates it (bounded), [`YhatBundle::parse`] reads the JSON,
//! and [`YhatBundle::write`] lays out a bundle directory:
//!
//! - `yhat.json`: the client's bundle as sent;
//! - `src/<parent_dir>/<name>`: its local modules (`src` goes on `sys.path`);
//! - `model.py`: generated, as PROTOCOL.md §8 says the original server ran a bundle: the
//!   `future` line first, then every object unpickled (`latin1`, so Python 2 bundles load) into
//!   the module's namespace with `__bundle` and `__terragon`, then the client's `code`, then the
//!   objects again;
//! - `bundle.json`: `entrypoint` `model.py:<className>`, `compat: "yhat"` (so the environment
//!   gets the `yhat` and `terragon` packages), and the requirements from `reqs` — minus the
//!   client's own packages, which muster provides in versions that import on Python 3 — plus
//!   pandas, numpy or scikit-learn when the code imports them or the pickles refer to them.

use crate::bundle::Bundle;
use crate::{Error, Result};
use muster_core::names::quote;
use serde_json::{Map, Value};
use std::io::Read;
use std::path::{Component, Path};

/// The largest inflated bundle accepted by default.
pub const MAX_BUNDLE: u64 = 512 << 20;

/// The script of a batch job's bundle that runs it ([`YhatBundle::write_batch`]).
pub const BATCH_RUNNER: &str = "run.py";

/// Packages of the client itself, left out of the requirements (muster installs its own set).
const CLIENT_PACKAGES: &[&str] = &[
    "yhat",
    "terragon",
    "requests",
    "requests-toolbelt",
    "progressbar2",
    "python-utils",
    "six",
    "future",
    "dill",
];

fn bad(m: impl std::fmt::Display) -> Error {
    Error::Yhat(format!("yhat upload: {m}"))
}

/// The raw bytes of the `model_name` part of a `multipart/form-data` body.
pub fn model_part<'a>(content_type: &str, body: &'a [u8]) -> Result<&'a [u8]> {
    part(content_type, body, "model_name")
}

/// The raw bytes of the part named `name` (a plain name: letters, digits, `_`) of a
/// `multipart/form-data` body.
pub fn part<'a>(content_type: &str, body: &'a [u8], name: &str) -> Result<&'a [u8]> {
    let (mime, params) = content_type.split_once(';').unwrap_or((content_type, ""));
    if !mime.trim().eq_ignore_ascii_case("multipart/form-data") {
        return Err(bad("the body must be multipart/form-data"));
    }
    let boundary = params
        .split(';')
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v.trim().trim_matches('"'))
        .filter(|b| !b.is_empty() && b.len() <= 200)
        .ok_or_else(|| bad("the content type names no multipart boundary"))?;
    let delim = format!("--{boundary}").into_bytes();
    let mut at = find(body, &delim, 0).ok_or_else(|| bad("the body holds no multipart part"))?;
    loop {
        let after = at + delim.len();
        if body[after..].starts_with(b"--") {
            return Err(bad(format!("the body has no part named {name}")));
        }
        let headers_start = after
            + if body[after..].starts_with(b"\r\n") {
                2
            } else {
                return Err(bad("a multipart boundary is not followed by a line end"));
            };
        let headers_end = find(body, b"\r\n\r\n", headers_start)
            .ok_or_else(|| bad("a multipart part has no end of headers"))?;
        let headers = String::from_utf8_lossy(&body[headers_start..headers_end]);
        let content_start = headers_end + 4;
        let mut close = delim.clone();
        close.splice(0..0, *b"\r\n");
        let content_end = find(body, &close, content_start)
            .ok_or_else(|| bad("a multipart part is not closed by its boundary"))?;
        let (quoted, plain) = (format!("name=\"{name}\""), format!("name={name}"));
        let is_model = headers.lines().any(|h| {
            let h = h.to_ascii_lowercase();
            h.starts_with("content-disposition:")
                && h.split(';').any(|p| {
                    let p = p.trim();
                    p == quoted || p == plain
                })
        });
        if is_model {
            return Ok(&body[content_start..content_end]);
        }
        at = content_end + 2;
    }
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if from > hay.len() {
        return None;
    }
    hay[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// Inflates a `.yhat` payload (an RFC 1950 zlib stream), refusing more than `max` bytes.
pub fn decompress(zlib: &[u8], max: u64) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::ZlibDecoder::new(zlib)
        .take(max + 1)
        .read_to_end(&mut out)
        .map_err(|e| bad(format!("the model is not a zlib stream ({e})")))?;
    if out.len() as u64 > max {
        return Err(bad(format!("the model inflates to more than {max} bytes")));
    }
    Ok(out)
}

/// One local module the client shipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    /// The directory relative to the client's cwd (`""`, `"pkgdir/sub"`).
    pub parent_dir: String,
    pub name: String,
    pub source: String,
}

/// A yhat bundle, read and checked.
#[derive(Clone, Debug, PartialEq)]
pub struct YhatBundle {
    pub modelname: String,
    pub class_name: String,
    pub username: String,
    pub code: String,
    pub future: String,
    /// The requirement lines of `reqs`.
    pub reqs: Vec<String>,
    pub objects: Map<String, Value>,
    pub modules: Vec<Module>,
    /// The JSON as sent.
    pub raw: Vec<u8>,
}

impl YhatBundle {
    /// Reads the inflated JSON of a deploy.
    pub fn parse(json: &[u8]) -> Result<YhatBundle> {
        let v: Value = serde_json::from_slice(json)
            .map_err(|e| bad(format!("the model is not a JSON bundle ({e})")))?;
        let Value::Object(o) = v else {
            return Err(bad("the bundle is not a JSON object"));
        };
        let s = |k: &str| -> Result<String> {
            match o.get(k) {
                Some(Value::String(s)) => Ok(s.clone()),
                None | Some(Value::Null) => Ok(String::new()),
                Some(_) => Err(bad(format!("{k} must be a string"))),
            }
        };
        let language = s("language")?;
        if !language.is_empty() && language != "python" {
            return Err(bad(format!("language {} is not python", quote(&language))));
        }
        let modelname = s("modelname")?;
        let name_ok = !modelname.is_empty()
            && modelname
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'_');
        if !name_ok {
            return Err(bad(format!(
                "modelname {} must be letters, digits and '_'",
                quote(&modelname)
            )));
        }
        muster_core::names::check_name("modelname", &modelname).map_err(bad)?;
        let class_name = s("className")?;
        let ident = class_name
            .chars()
            .next()
            .is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
            && class_name
                .chars()
                .all(|c| c == '_' || c.is_ascii_alphanumeric());
        if !ident {
            return Err(bad(format!(
                "className {} is not a Python class name",
                quote(&class_name)
            )));
        }
        let code = s("code")?;
        if code.trim().is_empty() {
            return Err(bad("the bundle holds no code"));
        }
        let objects = match o.get("objects") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) if m.values().all(Value::is_string) => m.clone(),
            Some(_) => return Err(bad("objects must map names to strings")),
        };
        let mut modules = Vec::new();
        if let Some(ms) = o.get("modules") {
            let Value::Array(ms) = ms else {
                return Err(bad("modules must be a list"));
            };
            for m in ms {
                let field = |k: &str| m[k].as_str().unwrap_or("").to_string();
                let module = Module {
                    parent_dir: field("parent_dir"),
                    name: field("name"),
                    source: field("source"),
                };
                let dir_ok = Path::new(&module.parent_dir)
                    .components()
                    .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
                let name_ok = !module.name.is_empty()
                    && !module.name.contains('/')
                    && module.name != ".."
                    && module.name != ".";
                if !dir_ok || !name_ok {
                    return Err(bad(format!(
                        "module {} must be a file name below the bundle",
                        quote(&format!("{}/{}", module.parent_dir, module.name))
                    )));
                }
                modules.push(module);
            }
        }
        let mut reqs = Vec::new();
        for line in s("reqs")?.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if line.starts_with('-')
                || line.chars().count() > crate::bundle::MAX_REQUIREMENT_CHARS
                || !line.starts_with(|c: char| c.is_ascii_alphanumeric())
            {
                return Err(bad(format!(
                    "reqs line {} is not a requirement",
                    quote(line)
                )));
            }
            reqs.push(line.to_string());
        }
        Ok(YhatBundle {
            modelname,
            class_name,
            username: s("username")?,
            code,
            future: s("future")?,
            reqs,
            objects,
            modules,
            raw: json.to_vec(),
        })
    }

    /// A batch job of `yhat.batch.BatchJob` (`POST /batch/deploy`, PROTOCOL.md §5): the
    /// `bundle.json` of its archive (`class_name`, no modelname or reqs) and its
    /// `requirements.txt`, named `job_name`; checked like a deploy's bundle.
    pub fn from_batch(
        job_name: &str,
        bundle_json: &[u8],
        requirements: &str,
    ) -> Result<YhatBundle> {
        let v: Value = serde_json::from_slice(bundle_json)
            .map_err(|e| bad(format!("bundle.json is not JSON ({e})")))?;
        let Value::Object(mut o) = v else {
            return Err(bad("bundle.json is not a JSON object"));
        };
        if !o.contains_key("className") {
            if let Some(c) = o.remove("class_name") {
                o.insert("className".into(), c);
            }
        }
        o.insert("modelname".into(), Value::String(job_name.to_string()));
        let reqs: Vec<&str> = requirements
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        o.insert("reqs".into(), Value::String(reqs.join("\n")));
        let json = serde_json::to_vec(&Value::Object(o)).map_err(|e| bad(e.to_string()))?;
        YhatBundle::parse(&json).map_err(|e| match e {
            Error::Yhat(m) => Error::Yhat(m.replace("modelname", "job_name")),
            e => e,
        })
    }

    /// Lays out a batch job's bundle ([`YhatBundle::write`]) plus `run.py`, which imports
    /// `model.py` and runs `execute()` once on the class made without `__init__` (which wants
    /// the client's credentials), as the original server did.
    pub fn write_batch(&self, dir: &Path) -> Result<Bundle> {
        let b = self.write(dir)?;
        let run = format!(
            "# Made by muster: runs the yhat batch job {name} once.\n\
             import os, sys\n\
             sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))\n\
             import model\n\
             cls = getattr(model, {class:?})\n\
             cls.__new__(cls).execute()\n",
            name = self.modelname,
            class = self.class_name,
        );
        std::fs::write(dir.join(BATCH_RUNNER), run).map_err(Error::io(format!(
            "writing {}",
            dir.join(BATCH_RUNNER).display()
        )))?;
        Ok(b)
    }

    /// The requirements of the bundle made from it (see the module's header).
    pub fn requirements(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .reqs
            .iter()
            .filter(|r| !CLIENT_PACKAGES.contains(&package_name(r).as_str()))
            .cloned()
            .collect();
        let mut pickled = Vec::new();
        for v in self.objects.values() {
            if let Some(bytes) = v.as_str().and_then(base64_decode) {
                pickled.extend(bytes);
            }
        }
        for (module, package) in [
            ("pandas", "pandas"),
            ("numpy", "numpy"),
            ("sklearn", "scikit-learn"),
        ] {
            let imported = self.code.lines().any(|l| {
                let l = l.trim_start();
                (l.starts_with("import ") || l.starts_with("from "))
                    && l.split(|c: char| !(c.is_alphanumeric() || c == '_')).nth(1) == Some(module)
            });
            let global = format!("c{module}");
            let in_pickles = find(&pickled, global.as_bytes(), 0).is_some();
            let listed = out.iter().any(|r| package_name(r) == package);
            if (imported || in_pickles) && !listed {
                out.push(package.to_string());
            }
        }
        out
    }

    /// Lays the bundle out in `dir` (an existing, empty directory) and loads it.
    pub fn write(&self, dir: &Path) -> Result<Bundle> {
        let w = |rel: &Path, text: &[u8]| -> Result<()> {
            let p = dir.join(rel);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(Error::io(format!("creating {}", parent.display())))?;
            }
            std::fs::write(&p, text).map_err(Error::io(format!("writing {}", p.display())))
        };
        w(Path::new("yhat.json"), &self.raw)?;
        for m in &self.modules {
            w(
                &Path::new("src").join(&m.parent_dir).join(&m.name),
                m.source.as_bytes(),
            )?;
        }
        w(Path::new("model.py"), self.model_py().as_bytes())?;
        let bundle = serde_json::json!({
            "name": self.modelname,
            "runtime": "python",
            "entrypoint": format!("model.py:{}", self.class_name),
            "requirements": self.requirements(),
            "compat": "yhat",
        });
        w(
            Path::new("bundle.json"),
            serde_json::to_string_pretty(&bundle)
                .expect("JSON")
                .as_bytes(),
        )?;
        Bundle::load(dir)
    }

    /// The generated entrypoint.
    fn model_py(&self) -> String {
        let mut s = String::new();
        // A __future__ import must come first.
        s.push_str(&self.future);
        s.push('\n');
        s.push_str(LOADER);
        s.push_str("\n# ---- the client's code ----\n");
        s.push_str(&self.code);
        s.push_str("\n# ---- end of the client's code ----\n\nglobals().update(_muster_objects)\n");
        s
    }
}

/// What runs before the client's code in the generated `model.py`.
const LOADER: &str = r#"# Made by muster from a yhat client's deploy; yhat.json is the bundle as the client sent it.
import base64 as _muster_base64
import json as _muster_json
import os as _muster_os
import pickle as _muster_pickle
import sys as _muster_sys

_muster_here = _muster_os.path.dirname(_muster_os.path.abspath(__file__))
_muster_sys.path.insert(0, _muster_os.path.join(_muster_here, "src"))
with open(_muster_os.path.join(_muster_here, "yhat.json")) as _muster_f:
    __bundle = _muster_json.load(_muster_f)
import terragon as __terragon


def _muster_unpickle():
    out = {}
    for name, value in __bundle.get("objects", {}).items():
        if name == "__tensorflow_session":
            continue
        try:
            out[name] = _muster_pickle.loads(_muster_base64.b64decode(value), encoding="latin1")
        except Exception as e:  # an unused object must not stop the model (PROTOCOL.md §9)
            print("muster: object %s could not be unpickled: %s: %s" % (name, type(e).__name__, e),
                  file=_muster_sys.stderr)
    return out


_muster_objects = _muster_unpickle()
globals().update(_muster_objects)
"#;

/// A requirement's package name, normalized (`Scikit_Learn>=1` → `scikit-learn`).
fn package_name(req: &str) -> String {
    req.split(|c: char| "=<>!~[;@ (".contains(c))
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
        .replace(['_', '.'], "-")
}

/// Standard base64 (padding optional); None if it is not.
/// Standard base64 (padding optional; no whitespace).
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' | b'\n' | b'\r' => continue,
            _ => return None,
        } as u32;
        acc = ((acc << 6) | v) & 0xff_ffff;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests;
