//! The `onnx` runtime: a model served natively through ONNX Runtime, loaded at run time
//! (the `ort` crate's `load-dynamic`) from `libonnxruntime.so` — the one of the `onnxruntime`
//! wheel on PyPI (installed `--no-deps` into a cached environment by the deploy's environment
//! step, see [`RUNTIME_REQUIREMENT`]) unless the server's `[models] onnxruntime_lib` or the
//! node's `ORT_DYLIB_PATH` names one. The library is
//! checked with `dlopen` before `ort` sees it, so a missing or wrong one is a clear error, never
//! a panic.
//!
//! Inputs: `data` as rows (a list of lists: the model's single input), or records / columns
//! whose keys are the model's input names (each input gets its column, as `[n, 1]` or `[n]`
//! by its declared rank); element types float, double, int64, int32, string and bool. Outputs:
//! one output as its JSON (tensors as nested lists, a ZipMap's sequence of maps as a list of
//! objects); several as an object by output name.

use crate::{Error, Result};
use ort::session::Session;
use ort::tensor::TensorElementType;
use ort::value::{DynValue, Tensor, ValueType};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// What the environment step installs (`pip install --no-deps`) to get `libonnxruntime.so`.
pub const RUNTIME_REQUIREMENT: &str = "onnxruntime==1.32.0";

/// The key of the environment that notes a library named by path (`onnx-lib-<hash>`): one per
/// path, so versions deployed under different settings each keep theirs.
pub fn library_env_key(lib: &Path) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(lib.as_os_str().as_encoded_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("onnx-lib-{hex}")
}

/// `libonnxruntime.so*` under an environment made of [`RUNTIME_REQUIREMENT`].
pub fn find_library(env_dir: &Path) -> Option<PathBuf> {
    let lib = std::fs::read_dir(env_dir.join("lib")).ok()?;
    for py in lib.flatten() {
        let capi = py.path().join("site-packages/onnxruntime/capi");
        let Ok(entries) = std::fs::read_dir(&capi) else {
            continue;
        };
        let mut found: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libonnxruntime.so"))
            })
            .collect();
        found.sort();
        if let Some(p) = found.pop() {
            return Some(p);
        }
    }
    None
}

/// Checks that `lib` loads and is ONNX Runtime (it exports `OrtGetApiBase`).
fn check_library(lib: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let bad = |why: String| {
        Error::Start(format!(
            "the ONNX Runtime library {} cannot be used: {why} (set [models] onnxruntime_lib or ORT_DYLIB_PATH to a libonnxruntime.so, or leave both unset for the onnxruntime wheel)",
            lib.display()
        ))
    };
    if !lib.is_file() {
        return Err(bad("no such file".into()));
    }
    let c = std::ffi::CString::new(lib.as_os_str().as_bytes())
        .map_err(|_| bad("a NUL in its path".into()))?;
    // SAFETY: dlopen/dlsym/dlerror with a valid C string; the handle is kept open on purpose
    // (ort opens the same library next, and it stays for the process's life).
    unsafe {
        let h = libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if h.is_null() {
            let e = libc::dlerror();
            let msg = if e.is_null() {
                "dlopen failed".to_string()
            } else {
                std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()
            };
            return Err(bad(msg));
        }
        let sym = libc::dlsym(h, c"OrtGetApiBase".as_ptr());
        if sym.is_null() {
            return Err(bad("it does not export OrtGetApiBase".into()));
        }
    }
    Ok(())
}

/// Loads ONNX Runtime from `lib` (once per process).
pub fn init(lib: &Path) -> Result<()> {
    check_library(lib)?;
    let lib = lib.to_path_buf();
    let res = std::panic::catch_unwind(move || {
        ort::init_from(lib.to_string_lossy())
            .with_name("muster")
            .commit()
    });
    match res {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(Error::Start(format!("ONNX Runtime did not start: {e}"))),
        Err(_) => Err(Error::Start(
            "ONNX Runtime did not start (the library is not a usable version)".into(),
        )),
    }
}

/// A model's input as declared.
#[derive(Clone, Debug)]
struct InputSpec {
    name: String,
    ty: TensorElementType,
    rank: usize,
    /// The last dimension when fixed (features per row).
    width: Option<i64>,
}

/// A loaded model: a few sessions (one per concurrent call).
pub struct OnnxModel {
    sessions: Mutex<Vec<Session>>,
    ready: std::sync::Condvar,
    inputs: Vec<InputSpec>,
    outputs: Vec<String>,
}

/// An input problem (the caller's: a 4xx).
fn bad(msg: impl Into<String>) -> Error {
    Error::Model {
        kind: "InputError".into(),
        message: msg.into(),
    }
}

impl OnnxModel {
    /// Loads `model` into `sessions` sessions (ONNX Runtime must be [`init`]ed).
    pub fn load(model: &Path, sessions: usize) -> Result<OnnxModel> {
        let mut all = Vec::new();
        for _ in 0..sessions.max(1) {
            let s = Session::builder()
                .and_then(|b| b.with_intra_threads(1))
                .and_then(|b| b.commit_from_file(model))
                .map_err(|e| {
                    Error::Start(format!(
                        "{} is not a model ONNX Runtime can load: {e}",
                        model.display()
                    ))
                })?;
            all.push(s);
        }
        let first = &all[0];
        let mut inputs = Vec::new();
        for i in &first.inputs {
            match &i.input_type {
                ValueType::Tensor { ty, shape, .. } => inputs.push(InputSpec {
                    name: i.name.clone(),
                    ty: *ty,
                    rank: shape.len(),
                    width: shape.last().copied().filter(|d| *d > 0 && shape.len() > 1),
                }),
                other => {
                    return Err(Error::Start(format!(
                        "input {:?} is a {other:?}: only tensor inputs are served",
                        i.name
                    )))
                }
            }
        }
        let outputs = first.outputs.iter().map(|o| o.name.clone()).collect();
        Ok(OnnxModel {
            sessions: Mutex::new(all),
            ready: std::sync::Condvar::new(),
            inputs,
            outputs,
        })
    }

    /// The declared inputs, as `name: type[rank]`, for messages.
    pub fn describe(&self) -> String {
        self.inputs
            .iter()
            .map(|i| format!("{} ({:?}, rank {})", i.name, i.ty, i.rank))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// One call: `data` (JSON text) in, the result as JSON text. Blocking.
    pub fn call(&self, data: &str) -> Result<String> {
        let data: Value =
            serde_json::from_str(data).map_err(|e| bad(format!("the data is not JSON: {e}")))?;
        let columns = self.columns(&data)?;
        let mut feeds: Vec<(String, DynValue)> = Vec::new();
        for (spec, cells) in self.inputs.iter().zip(columns) {
            feeds.push((spec.name.clone(), tensor(spec, cells)?));
        }
        let mut session = {
            let mut g = self.sessions.lock().unwrap();
            loop {
                if let Some(s) = g.pop() {
                    break s;
                }
                g = self.ready.wait(g).unwrap();
            }
        };
        let res = (|| -> Result<Value> {
            let outs = session
                .run(feeds)
                .map_err(|e| bad(format!("the model refused the input: {e}")))?;
            let mut m = Map::new();
            for name in &self.outputs {
                let v = outs
                    .get(name)
                    .ok_or_else(|| Error::Protocol(format!("no output {name}")))?;
                m.insert(name.clone(), to_json(v)?);
            }
            Ok(if m.len() == 1 {
                m.into_iter().next().map(|(_, v)| v).unwrap_or(Value::Null)
            } else {
                Value::Object(m)
            })
        })();
        self.sessions.lock().unwrap().push(session);
        self.ready.notify_one();
        Ok(res?.to_string())
    }

    /// The rows of each input: per input, one list of cells (a row's values) per row.
    fn columns(&self, data: &Value) -> Result<Vec<Vec<Vec<Value>>>> {
        let names = || self.describe();
        match data {
            Value::Array(rows) if rows.iter().all(|r| r.is_array()) => {
                if self.inputs.len() != 1 {
                    return Err(bad(format!(
                        "rows (lists) fit a model of one input; this one has {}: send records or columns by input name",
                        names()
                    )));
                }
                Ok(vec![rows
                    .iter()
                    .map(|r| r.as_array().cloned().unwrap_or_default())
                    .collect()])
            }
            Value::Array(rows) if rows.iter().all(|r| r.is_object()) => {
                self.check_names(rows.iter().filter_map(|r| r.as_object()))?;
                Ok(self
                    .inputs
                    .iter()
                    .map(|i| rows.iter().map(|r| cells(&r[&i.name])).collect::<Vec<_>>())
                    .collect())
            }
            Value::Object(cols) => {
                self.check_names(std::iter::once(cols))?;
                let mut out = Vec::new();
                for i in &self.inputs {
                    let Value::Array(vals) = &cols[&i.name] else {
                        return Err(bad(format!("column {} must be a list", i.name)));
                    };
                    out.push(vals.iter().map(cells).collect());
                }
                Ok(out)
            }
            _ => Err(bad(format!(
                "data must be rows (lists), records or columns; the model's inputs: {}",
                names()
            ))),
        }
    }

    fn check_names<'a>(&self, objs: impl Iterator<Item = &'a Map<String, Value>>) -> Result<()> {
        for o in objs {
            for k in o.keys() {
                if !self.inputs.iter().any(|i| &i.name == k) {
                    let k: String = k.chars().take(40).collect();
                    return Err(bad(format!(
                        "{k:?} is not an input of the model; its inputs: {}",
                        self.describe()
                    )));
                }
            }
            for i in &self.inputs {
                if !o.contains_key(&i.name) {
                    return Err(bad(format!("input {} is missing", i.name)));
                }
            }
        }
        Ok(())
    }
}

/// A record's value as a row's cells (a list stays a list; a scalar is one cell).
fn cells(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a.clone(),
        other => vec![other.clone()],
    }
}

/// The tensor of one input from its rows.
fn tensor(spec: &InputSpec, rows: Vec<Vec<Value>>) -> Result<DynValue> {
    let n = rows.len();
    let width = rows
        .first()
        .map_or(spec.width.unwrap_or(1) as usize, Vec::len);
    if let Some(w) = spec.width {
        if width as i64 != w {
            return Err(bad(format!(
                "input {} takes {w} values per row, got {width}",
                spec.name
            )));
        }
    }
    if rows.iter().any(|r| r.len() != width) {
        return Err(bad(format!(
            "input {}: every row must have {width} values",
            spec.name
        )));
    }
    let shape: Vec<i64> = if spec.rank <= 1 {
        if width != 1 {
            return Err(bad(format!("input {} takes one value per row", spec.name)));
        }
        vec![n as i64]
    } else {
        vec![n as i64, width as i64]
    };
    let flat = rows.into_iter().flatten();
    let wrong = |what: &str| bad(format!("input {} takes {what} values", spec.name));
    let err = |e: ort::Error| Error::Protocol(format!("input {}: {e}", spec.name));
    Ok(match spec.ty {
        TensorElementType::Float32 => {
            let v: Option<Vec<f32>> = flat.map(|c| c.as_f64().map(|f| f as f32)).collect();
            Tensor::from_array((shape, v.ok_or_else(|| wrong("numeric"))?))
                .map_err(err)?
                .into_dyn()
        }
        TensorElementType::Float64 => {
            let v: Option<Vec<f64>> = flat.map(|c| c.as_f64()).collect();
            Tensor::from_array((shape, v.ok_or_else(|| wrong("numeric"))?))
                .map_err(err)?
                .into_dyn()
        }
        TensorElementType::Int64 => {
            let v: Option<Vec<i64>> = flat.map(|c| c.as_i64()).collect();
            Tensor::from_array((shape, v.ok_or_else(|| wrong("integer"))?))
                .map_err(err)?
                .into_dyn()
        }
        TensorElementType::Int32 => {
            let v: Option<Vec<i32>> = flat
                .map(|c| c.as_i64().and_then(|i| i32::try_from(i).ok()))
                .collect();
            Tensor::from_array((shape, v.ok_or_else(|| wrong("32-bit integer"))?))
                .map_err(err)?
                .into_dyn()
        }
        TensorElementType::Bool => {
            let v: Option<Vec<bool>> = flat.map(|c| c.as_bool()).collect();
            Tensor::from_array((shape, v.ok_or_else(|| wrong("boolean"))?))
                .map_err(err)?
                .into_dyn()
        }
        TensorElementType::String => {
            let v: Vec<String> = flat
                .map(|c| match c {
                    Value::String(s) => s,
                    other => other.to_string(),
                })
                .collect();
            Tensor::from_string_array((shape, v.as_slice()))
                .map_err(err)?
                .into_dyn()
        }
        other => {
            return Err(Error::Start(format!(
                "input {} is of type {other:?}, which is not served",
                spec.name
            )))
        }
    })
}

/// Nests a flat tensor by its shape.
fn nest(shape: &[i64], flat: Vec<Value>) -> Value {
    if shape.len() <= 1 {
        return Value::Array(flat);
    }
    let inner: usize = shape[1..]
        .iter()
        .map(|d| *d as usize)
        .product::<usize>()
        .max(1);
    let mut out = Vec::with_capacity(flat.len() / inner);
    let mut it = flat.into_iter();
    loop {
        let chunk: Vec<Value> = it.by_ref().take(inner).collect();
        if chunk.is_empty() {
            break;
        }
        out.push(nest(&shape[1..], chunk));
    }
    Value::Array(out)
}

fn f32_json(f: f32) -> Value {
    // Through the shortest decimal of the f32 (0.9815729, not 0.9815728664398193).
    format!("{f}")
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

fn f64_json(f: f64) -> Value {
    serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
}

/// An output as JSON.
fn to_json(v: &DynValue) -> Result<Value> {
    let proto = |e: ort::Error| Error::Protocol(format!("reading an output: {e}"));
    match v.dtype() {
        ValueType::Tensor { ty, .. } => {
            let (shape, flat): (Vec<i64>, Vec<Value>) = match ty {
                TensorElementType::Float32 => {
                    let (s, d) = v.try_extract_tensor::<f32>().map_err(proto)?;
                    (s.to_vec(), d.iter().map(|x| f32_json(*x)).collect())
                }
                TensorElementType::Float64 => {
                    let (s, d) = v.try_extract_tensor::<f64>().map_err(proto)?;
                    (s.to_vec(), d.iter().map(|x| f64_json(*x)).collect())
                }
                TensorElementType::Int64 => {
                    let (s, d) = v.try_extract_tensor::<i64>().map_err(proto)?;
                    (s.to_vec(), d.iter().map(|x| json!(x)).collect())
                }
                TensorElementType::Int32 => {
                    let (s, d) = v.try_extract_tensor::<i32>().map_err(proto)?;
                    (s.to_vec(), d.iter().map(|x| json!(x)).collect())
                }
                TensorElementType::Bool => {
                    let (s, d) = v.try_extract_tensor::<bool>().map_err(proto)?;
                    (s.to_vec(), d.iter().map(|x| json!(x)).collect())
                }
                TensorElementType::String => {
                    let (s, d) = v.try_extract_strings().map_err(proto)?;
                    (s.to_vec(), d.into_iter().map(Value::String).collect())
                }
                other => {
                    return Err(Error::Protocol(format!(
                        "an output of type {other:?} is not served"
                    )))
                }
            };
            Ok(nest(&shape, flat))
        }
        ValueType::Sequence(_) => {
            let alloc = ort::memory::Allocator::default();
            let items = v
                .try_extract_sequence::<ort::value::DynValueTypeMarker>(&alloc)
                .map_err(proto)?;
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                out.push(to_json(&item)?);
            }
            Ok(Value::Array(out))
        }
        ValueType::Map { key, value } => {
            let mut m = Map::new();
            match (key, value) {
                (TensorElementType::Int64, TensorElementType::Float32) => {
                    for (k, x) in v.try_extract_key_values::<i64, f32>().map_err(proto)? {
                        m.insert(k.to_string(), f32_json(x));
                    }
                }
                (TensorElementType::String, TensorElementType::Float32) => {
                    for (k, x) in v.try_extract_key_values::<String, f32>().map_err(proto)? {
                        m.insert(k, f32_json(x));
                    }
                }
                (TensorElementType::Int64, TensorElementType::Float64) => {
                    for (k, x) in v.try_extract_key_values::<i64, f64>().map_err(proto)? {
                        m.insert(k.to_string(), f64_json(x));
                    }
                }
                (TensorElementType::String, TensorElementType::Float64) => {
                    for (k, x) in v.try_extract_key_values::<String, f64>().map_err(proto)? {
                        m.insert(k, f64_json(x));
                    }
                }
                other => {
                    return Err(Error::Protocol(format!(
                        "a map output of {other:?} is not served"
                    )))
                }
            }
            Ok(Value::Object(m))
        }
        other => Err(Error::Protocol(format!(
            "an output of type {other:?} is not served"
        ))),
    }
}
