//! Batch scoring (SPEC §8): a whole CSV through a model, in chunks, in bounded memory.
//!
//! - [`split`]: the upload's body, read as a stream (never whole in memory), parsed as CSV and
//!   cut into chunks of `chunk_rows` records, each written to the blob store as it fills; the
//!   batch's document ([`BATCHES`], keyed by its tree's id) records the header, the chunks and
//!   the options.
//! - [`tree_spec`]: the job tree: one job per chunk (`muster models batch-step WS MODEL ID
//!   chunk I`, retried per the job rules) and a `merge` job that needs them all. The jobs run
//!   on any node and ask the server to do their part, like a deploy's steps: chunks run in
//!   parallel as the nodes' slots allow, and each call goes to the replica with the fewest calls
//!   in flight.
//! - [`score_chunk`]: one chunk read back from its blob, sent to the model as one predict call
//!   (`{"data": ...}` as rows, records or columns), the answer's predictions written to a
//!   result blob (a row the model refused: with `on_error = "mark"`, the chunk is scored row by
//!   row and the refused rows get the error's type and message in the `errors` column; with
//!   `fail`, the chunk fails). Done once: a chunk run again finds its result recorded.
//! - [`merge`]: the result CSV written to one blob, chunk by chunk in input order, each input
//!   row beside its predictions (or a `row` number with `output = "id"`); the chunk blobs are
//!   removed. `GET /api/v1/jobs/{tree}/result` streams it.
//! - [`reap`]: when the tree expires (`[jobs] retention`), the batch's blobs and document go.
//!
//! Progress (rows done / total) is on the document, in each chunk job's result and on the event
//! feed (`batch` events).

use super::routes::Predicted;
use crate::App;
use muster_core::spec::JobSpec;
use muster_core::{Tags, Ts, Uuid};
use muster_store::{Docs, Event, StoreError};
use muster_wire::util::now;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::Arc;
use std::time::Duration;

/// The batch documents, by tree id.
pub const BATCHES: Docs<Batch> = Docs::new("model_batch");

/// The label that marks a batch tree (`tags.labels.kind`).
pub const KIND_BATCH: &str = "model-batch";

/// The first line of every chunk blob: it makes each one distinct (blobs are named by their
/// content, and a chunk's blob is removed once merged).
const SALT: &str = "muster-batch";

/// What a bad row does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// The chunk fails (and is retried per the job rules; then the batch fails).
    #[default]
    Fail,
    /// The row gets its error in the `errors` column; the batch goes on.
    Mark,
}

/// How each chunk's rows are given to the model as `data`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// A list of rows, each a list of the values in the header's order.
    #[default]
    Rows,
    /// A list of records, each an object of column → value.
    Records,
    /// An object of column → the list of its values.
    Columns,
}

/// What the result CSV holds beside the predictions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Output {
    /// The input's columns.
    #[default]
    Input,
    /// A `row` column: the input row's number, from 1.
    Id,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    /// The blob of its input rows.
    pub input: String,
    pub rows: u64,
    /// The blob of its predictions, once scored.
    #[serde(default)]
    pub result: Option<String>,
    /// The prediction columns of its result.
    #[serde(default)]
    pub columns: Vec<String>,
    /// Rows the model refused (`on_error = "mark"`).
    #[serde(default)]
    pub errors: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// The tree's id.
    pub id: Uuid,
    pub workspace: String,
    pub model: String,
    /// The version asked for (`None`: the live one at each call).
    pub version: Option<u32>,
    pub columns: Vec<String>,
    pub chunk_rows: u64,
    pub on_error: OnError,
    pub shape: Shape,
    pub output: Output,
    pub rows_total: u64,
    pub rows_done: u64,
    pub chunks: Vec<Chunk>,
    /// The result CSV's blob, once merged.
    #[serde(default)]
    pub result: Option<String>,
    #[serde(default)]
    pub result_size: u64,
    pub created_at: Ts,
    pub created_by: String,
}

impl Batch {
    /// `running` or `done` (the tree says whether it failed).
    pub fn state(&self) -> &'static str {
        if self.result.is_some() {
            "done"
        } else {
            "running"
        }
    }

    pub fn errors(&self) -> u64 {
        self.chunks.iter().map(|c| c.errors).sum()
    }

    /// As the API shows it.
    pub fn view(&self) -> Value {
        let scored = self.chunks.iter().filter(|c| c.result.is_some()).count();
        json!({
            "id": self.id, "tree": self.id, "workspace": self.workspace, "model": self.model,
            "version": self.version, "state": self.state(), "columns": self.columns,
            "chunk_rows": self.chunk_rows, "on_error": self.on_error, "shape": self.shape,
            "output": self.output, "rows_total": self.rows_total, "rows_done": self.rows_done,
            "chunks": self.chunks.len(), "chunks_done": scored, "errors": self.errors(),
            "result_size": self.result.as_ref().map(|_| self.result_size),
            "created_at": self.created_at, "created_by": self.created_by,
        })
    }
}

/// The options of a batch, from the route's query.
#[derive(Clone, Debug)]
pub struct Options {
    pub version: Option<u32>,
    pub chunk_rows: u64,
    pub on_error: OnError,
    pub shape: Shape,
    pub output: Output,
}

/// The most chunks one batch may have (each is a job of its tree).
pub const MAX_CHUNKS: usize = 50_000;

/// A `Read` over the chunks of a request body handed over a channel (the blocking side of a
/// streamed upload).
pub struct ChanReader {
    rx: tokio::sync::mpsc::Receiver<Result<axum::body::Bytes, String>>,
    cur: axum::body::Bytes,
}

impl ChanReader {
    pub fn new(rx: tokio::sync::mpsc::Receiver<Result<axum::body::Bytes, String>>) -> ChanReader {
        ChanReader {
            rx,
            cur: axum::body::Bytes::new(),
        }
    }
}

impl Read for ChanReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(std::io::Error::other(e)),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

/// The input split: the header, the chunks (each in the blob store) and the row count.
pub struct Split {
    pub columns: Vec<String>,
    pub chunks: Vec<Chunk>,
    pub rows: u64,
}

/// Why a body is not a batch's CSV (the caller's fault: a 4xx).
#[derive(Debug)]
pub enum SplitError {
    Bad(String),
    Io(String),
}

/// Reads `input` as CSV (a header line, then records) and writes chunks of `chunk_rows`
/// records to the blob store. Blocking; memory bounded by one record (and csv's buffer).
pub fn split(app: &App, id: Uuid, input: impl Read, chunk_rows: u64) -> Result<Split, SplitError> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(input);
    let bad = |e: csv::Error| match e.kind() {
        csv::ErrorKind::Io(_) => SplitError::Io(e.to_string()),
        csv::ErrorKind::UnequalLengths {
            pos,
            expected_len,
            len,
            ..
        } => SplitError::Bad(format!(
            "CSV row {} has {len} fields, the header {expected_len}",
            pos.as_ref().map_or(0, |p| p.record().max(1))
        )),
        csv::ErrorKind::Utf8 { pos, .. } => SplitError::Bad(format!(
            "CSV row {} is not UTF-8",
            pos.as_ref().map_or(0, |p| p.record())
        )),
        _ => SplitError::Bad("the body is not CSV".into()),
    };
    let columns: Vec<String> = rdr
        .headers()
        .map_err(bad)?
        .iter()
        .map(str::to_string)
        .collect();
    if columns.is_empty() || columns.iter().all(|c| c.is_empty()) {
        return Err(SplitError::Bad(
            "the CSV has no header line (the first line names the columns)".into(),
        ));
    }
    let io = |e: std::io::Error| SplitError::Io(e.to_string());
    let mut chunks = Vec::new();
    let mut rows = 0u64;
    let mut cur: Option<(csv::Writer<crate::blobs::BlobWriter>, u64)> = None;
    let mut rec = csv::ByteRecord::new();
    let finish = |w: csv::Writer<crate::blobs::BlobWriter>| -> Result<String, SplitError> {
        let inner = w
            .into_inner()
            .map_err(|e| SplitError::Io(e.error().to_string()))?;
        inner.finish().map_err(io)
    };
    while rdr.read_byte_record(&mut rec).map_err(bad)? {
        if cur.is_none() {
            if chunks.len() >= MAX_CHUNKS {
                return Err(SplitError::Bad(format!(
                    "the CSV makes more than {MAX_CHUNKS} chunks: raise chunk_rows"
                )));
            }
            let mut bw = app.blobs.writer().map_err(io)?;
            writeln!(bw, "{SALT} {id} {}", chunks.len()).map_err(io)?;
            cur = Some((csv::Writer::from_writer(bw), 0));
        }
        let (w, n) = cur.as_mut().expect("just made");
        w.write_byte_record(&rec)
            .map_err(|e| SplitError::Io(e.to_string()))?;
        *n += 1;
        rows += 1;
        if *n >= chunk_rows {
            let (w, n) = cur.take().expect("there");
            chunks.push(Chunk {
                input: finish(w)?,
                rows: n,
                result: None,
                columns: vec![],
                errors: 0,
            });
        }
    }
    if let Some((w, n)) = cur.take() {
        chunks.push(Chunk {
            input: finish(w)?,
            rows: n,
            result: None,
            columns: vec![],
            errors: 0,
        });
    }
    Ok(Split {
        columns,
        chunks,
        rows,
    })
}

/// The batch tree of `b`: a job per chunk, then `merge`.
pub fn tree_spec(b: &Batch) -> JobSpec {
    let mut labels = BTreeMap::new();
    labels.insert("kind".to_string(), KIND_BATCH.to_string());
    let cmd = |what: &str| {
        format!(
            "exec \"$MUSTER_EXE\" models batch-step {} {} {} {what}",
            b.workspace, b.model, b.id
        )
    };
    let mut children: Vec<JobSpec> = (0..b.chunks.len())
        .map(|i| JobSpec {
            name: format!("score {}/{} rows {}", b.workspace, b.model, row_range(b, i)),
            key: Some(format!("chunk-{i}")),
            shell: Some(cmd(&format!("chunk {i}"))),
            timeout_s: Some(3600),
            retries: Some(2),
            ..Default::default()
        })
        .collect();
    children.push(JobSpec {
        name: format!("merge {}/{} results", b.workspace, b.model),
        key: Some("merge".into()),
        shell: Some(cmd("merge")),
        timeout_s: Some(3600),
        retries: Some(2),
        needs: (0..b.chunks.len()).map(|i| format!("chunk-{i}")).collect(),
        ..Default::default()
    });
    JobSpec {
        name: format!("batch {}/{} ({} rows)", b.workspace, b.model, b.rows_total),
        tags: Some(Tags {
            workspace: b.workspace.clone(),
            application: Some(b.model.clone()),
            version: b.version.map(|v| v.to_string()),
            instance: None,
            labels,
        }),
        children,
        ..Default::default()
    }
}

/// Rows `a-b` (from 1) of chunk `i`.
fn row_range(b: &Batch, i: usize) -> String {
    let first: u64 = b.chunks[..i].iter().map(|c| c.rows).sum::<u64>() + 1;
    format!("{first}-{}", first + b.chunks[i].rows - 1)
}

/// Creates batch `b` (its document, then its tree); answers the tree's id.
pub async fn start(app: &Arc<App>, b: Batch, admin: bool) -> Result<Uuid, String> {
    let spec = tree_spec(&b);
    let by = b.created_by.clone();
    let mut first = true;
    let id = b.id;
    let mut new =
        muster_core::spec::build_tree(&spec, &b.workspace, Some(&by), now(), &mut || {
            if std::mem::take(&mut first) {
                id
            } else {
                Uuid::now_v7()
            }
        })?;
    new.tree.admin = admin;
    let a = app.clone();
    tokio::task::spawn_blocking(move || BATCHES.create(a.store.as_ref(), &id.to_string(), &b))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    app.manager
        .create(new, None)
        .await
        .map_err(|e| e.to_string())?;
    Ok(id)
}

/// One batch.
pub fn get(app: &App, id: Uuid) -> Result<Option<Batch>, StoreError> {
    Ok(BATCHES
        .get(app.store.as_ref(), &id.to_string())?
        .map(|(b, _)| b))
}

/// How old a batch whose tree does not exist must be before the reaper removes it (its upload
/// may still be being split: the tree is made after the document).
const ORPHAN_AGE_MS: i64 = 3600 * 1000;

/// The reaper's part (after expired trees are purged): every batch whose tree is gone — in
/// `purged`, or not in the store (never made, or removed otherwise) and older than an hour —
/// loses its chunk blobs, its result blob (unless another batch's result is the same blob:
/// blobs are named by their content) and its document. Answers how many batches it removed.
pub fn reap(app: &App, purged: &[Uuid]) -> Result<usize, StoreError> {
    let all = BATCHES.list(app.store.as_ref(), "")?;
    let purged: std::collections::HashSet<Uuid> = purged.iter().copied().collect();
    let cutoff = now().plus_ms(-ORPHAN_AGE_MS);
    let mut gone = Vec::new();
    let mut kept = Vec::new();
    for (key, b, version) in all {
        let dead =
            purged.contains(&b.id) || (b.created_at < cutoff && app.store.tree(b.id)?.is_none());
        if dead {
            gone.push((key, b, version));
        } else {
            kept.push(b);
        }
    }
    let kept_results: std::collections::HashSet<&str> =
        kept.iter().filter_map(|b| b.result.as_deref()).collect();
    let mut removed = 0;
    for (key, b, version) in &gone {
        let mut blobs: Vec<&str> = Vec::new();
        for c in &b.chunks {
            blobs.push(&c.input);
            blobs.extend(c.result.as_deref());
        }
        blobs.extend(b.result.as_deref().filter(|r| !kept_results.contains(r)));
        for blob in blobs {
            if let Err(e) = app.blobs.delete(blob) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("reaper: cannot delete blob {blob} of batch {key}: {e}");
                }
            }
        }
        if BATCHES.delete_if(app.store.as_ref(), key, *version)? {
            removed += 1;
        }
    }
    Ok(removed)
}

fn publish(app: &App, b: &Batch) {
    app.store.publish(&[Event::Batch {
        id: b.id,
        workspace: b.workspace.clone(),
        model: b.model.clone(),
        rows_done: b.rows_done,
        rows_total: b.rows_total,
        state: b.state().to_string(),
        at: now(),
    }]);
}

/// A CSV cell as a JSON value: a number when it reads as one, null when empty, else text.
fn cell(s: &str) -> Value {
    if s.is_empty() {
        return Value::Null;
    }
    if let Ok(i) = s.parse::<i64>() {
        return json!(i);
    }
    match s.parse::<f64>() {
        Ok(f) if f.is_finite() => json!(f),
        _ => Value::String(s.to_string()),
    }
}

/// Opens a chunk blob past its salt line.
fn open_chunk(app: &App, blob: &str) -> std::io::Result<BufReader<std::fs::File>> {
    let mut r = BufReader::with_capacity(64 << 10, app.blobs.open(blob)?);
    let mut salt = String::new();
    r.read_line(&mut salt)?;
    if !salt.starts_with(SALT) {
        return Err(std::io::Error::other("not a batch chunk"));
    }
    Ok(r)
}

/// The `data` of a predict call for `rows`.
fn data_of(columns: &[String], shape: Shape, rows: &[Vec<String>]) -> Value {
    match shape {
        Shape::Rows => Value::Array(
            rows.iter()
                .map(|r| Value::Array(r.iter().map(|c| cell(c)).collect()))
                .collect(),
        ),
        Shape::Records => Value::Array(
            rows.iter()
                .map(|r| {
                    let m: Map<String, Value> = columns
                        .iter()
                        .zip(r)
                        .map(|(k, c)| (k.clone(), cell(c)))
                        .collect();
                    Value::Object(m)
                })
                .collect(),
        ),
        Shape::Columns => {
            let m: Map<String, Value> = columns
                .iter()
                .enumerate()
                .map(|(i, k)| {
                    (
                        k.clone(),
                        Value::Array(rows.iter().map(|r| cell(&r[i])).collect()),
                    )
                })
                .collect();
            Value::Object(m)
        }
    }
}

/// One prediction as cells: a scalar is the `prediction` column; an object, a column per key;
/// an array, `prediction_0`, `prediction_1`, ...
fn flatten(v: &Value, out: &mut Vec<(String, String)>) {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                out.push((k.clone(), text(x)));
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                out.push((format!("prediction_{i}"), text(x)));
            }
        }
        other => out.push(("prediction".into(), text(other))),
    }
}

/// How a call of the model went.
enum Call {
    Ok(Vec<Value>),
    /// The model refused the input (4xx): the error's type and message.
    Refused(String),
}

async fn call(app: &Arc<App>, b: &Batch, data: Value, rows: usize) -> Result<Call, String> {
    let body = axum::body::Bytes::from(json!({ "data": data }).to_string());
    let timeout = app.config.models.batch_timeout;
    let end = tokio::time::Instant::now() + timeout;
    let mut wait = Duration::from_millis(50);
    loop {
        let answer = app
            .models
            .routes()
            .predict(&b.workspace, &b.model, b.version, body.clone(), timeout)
            .await;
        let busy = match &answer {
            Predicted::Answer { reply, .. } => reply.status == 503,
            Predicted::NoRoute(super::routes::NoRoute::Full(_))
            | Predicted::NoRoute(super::routes::NoRoute::NoReplica(_))
            | Predicted::NoRoute(super::routes::NoRoute::NotLive) => true,
            _ => false,
        };
        if busy && tokio::time::Instant::now() + wait < end {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(2));
            continue;
        }
        return match answer {
            Predicted::Answer { reply, version } if reply.status == 200 => {
                let mut v: Value = serde_json::from_slice(&reply.body)
                    .map_err(|_| format!("v{version} answered something not JSON"))?;
                match v["result"].take() {
                    Value::Array(a) if a.len() == rows => Ok(Call::Ok(a)),
                    // Several outputs (ONNX: a label and probabilities), each one per row:
                    // one object per row.
                    Value::Object(m)
                        if !m.is_empty()
                            && m.values().all(|x| x.as_array().is_some_and(|a| a.len() == rows)) =>
                    {
                        let mut cols: Vec<(String, std::vec::IntoIter<Value>)> = m
                            .into_iter()
                            .map(|(k, x)| match x {
                                Value::Array(a) => (k, a.into_iter()),
                                _ => (k, Vec::new().into_iter()),
                            })
                            .collect();
                        let per_row = (0..rows)
                            .map(|_| {
                                let o: Map<String, Value> = cols
                                    .iter_mut()
                                    .map(|(k, it)| (k.clone(), it.next().unwrap_or(Value::Null)))
                                    .collect();
                                Value::Object(o)
                            })
                            .collect();
                        Ok(Call::Ok(per_row))
                    }
                    Value::Array(a) => Err(format!(
                        "v{version} answered {} predictions for {rows} rows",
                        a.len()
                    )),
                    _ if rows == 1 => Ok(Call::Ok(vec![v["result"].take()])),
                    _ => Err(format!(
                        "v{version} answered no list of predictions (execute must return one per row)"
                    )),
                }
            }
            Predicted::Answer { reply, version } if (400..500).contains(&reply.status) => {
                let v: Value = serde_json::from_slice(&reply.body).unwrap_or_default();
                let e = &v["error"];
                let msg = match e["exception"]["type"].as_str() {
                    Some(t) => format!(
                        "{t}: {}",
                        e["exception"]["message"].as_str().unwrap_or_default()
                    ),
                    None => e["message"].as_str().map_or_else(
                        || format!("v{version} answered {}", reply.status),
                        str::to_string,
                    ),
                };
                Ok(Call::Refused(msg))
            }
            Predicted::Answer { reply, version } => {
                Err(format!("v{version} answered {}", reply.status))
            }
            Predicted::NoRoute(n) => Err(format!("no replica to call: {n:?}")),
            Predicted::Timeout(v) => Err(format!("v{v} did not answer within {timeout:?}")),
            Predicted::Failed(v, e) => Err(format!("v{v} could not be reached: {e}")),
        };
    }
}

/// What a scored chunk reports (its job's result).
#[derive(Debug, Serialize)]
pub struct Scored {
    pub chunk: usize,
    pub rows: u64,
    pub errors: u64,
    pub rows_done: u64,
    pub rows_total: u64,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| e.to_string())?
}

/// The batch `id` of `ws/model`, checked.
async fn load(app: &Arc<App>, ws: &str, model: &str, id: Uuid) -> Result<Batch, String> {
    let a = app.clone();
    let b = blocking(move || get(&a, id).map_err(|e| e.to_string()))
        .await?
        .ok_or_else(|| format!("batch {id} not found"))?;
    if b.workspace != ws || b.model != model {
        return Err(format!("batch {id} is not of {ws}/{model}"));
    }
    Ok(b)
}

/// Scores chunk `i` of batch `id` (once: a chunk already scored answers at once).
pub async fn score_chunk(
    app: &Arc<App>,
    ws: &str,
    model: &str,
    id: Uuid,
    i: usize,
) -> Result<Scored, String> {
    let b = load(app, ws, model, id).await?;
    let chunk = b
        .chunks
        .get(i)
        .cloned()
        .ok_or_else(|| format!("batch {id} has no chunk {i}"))?;
    if chunk.result.is_some() {
        return Ok(Scored {
            chunk: i,
            rows: chunk.rows,
            errors: chunk.errors,
            rows_done: b.rows_done,
            rows_total: b.rows_total,
        });
    }
    // Memory: a bounded number of chunks at once, over every batch of this server.
    let _slot = app.models.batch_slot().await;
    let a = app.clone();
    let blob = chunk.input.clone();
    let rows: Vec<Vec<String>> = blocking(move || {
        let r = open_chunk(&a, &blob).map_err(|e| format!("chunk {i}: {e}"))?;
        let mut rdr = csv::ReaderBuilder::new().has_headers(false).from_reader(r);
        let mut rows = Vec::new();
        for rec in rdr.records() {
            let rec = rec.map_err(|e| format!("chunk {i}: {e}"))?;
            rows.push(rec.iter().map(str::to_string).collect());
        }
        Ok(rows)
    })
    .await?;
    let first_row: u64 = b.chunks[..i].iter().map(|c| c.rows).sum::<u64>() + 1;
    // The predictions of each row, or its error.
    let mut preds: Vec<Result<Value, String>> = Vec::with_capacity(rows.len());
    match call(app, &b, data_of(&b.columns, b.shape, &rows), rows.len()).await? {
        Call::Ok(v) => preds.extend(v.into_iter().map(Ok)),
        Call::Refused(why) if b.on_error == OnError::Fail => {
            return Err(format!(
                "the model refused rows {first_row}-{}: {why}",
                first_row + rows.len() as u64 - 1
            ));
        }
        Call::Refused(_) => {
            // Row by row, to find the bad ones.
            for r in &rows {
                match call(
                    app,
                    &b,
                    data_of(&b.columns, b.shape, std::slice::from_ref(r)),
                    1,
                )
                .await?
                {
                    Call::Ok(mut v) => preds.push(Ok(v.pop().unwrap_or(Value::Null))),
                    Call::Refused(why) => preds.push(Err(why)),
                }
            }
        }
    }
    drop(rows);
    // The prediction columns, in first-seen order; then the rows.
    let mut columns: Vec<String> = Vec::new();
    let mut cells: Vec<Vec<(String, String)>> = Vec::with_capacity(preds.len());
    let mut errors = 0u64;
    for p in &preds {
        let mut c = Vec::new();
        match p {
            Ok(v) => flatten(v, &mut c),
            Err(_) => errors += 1,
        }
        for (k, _) in &c {
            if !columns.contains(k) {
                columns.push(k.clone());
            }
        }
        cells.push(c);
    }
    let mark = b.on_error == OnError::Mark;
    let (a, cols) = (app.clone(), columns.clone());
    let result = blocking(move || {
        let io = |e: std::io::Error| format!("the result of chunk {i}: {e}");
        let mut bw = a.blobs.writer().map_err(io)?;
        writeln!(bw, "{SALT} {id} {i} result").map_err(io)?;
        let mut w = csv::Writer::from_writer(bw);
        let csv_err = |e: csv::Error| format!("the result of chunk {i}: {e}");
        let mut header = cols.clone();
        if mark {
            header.push("errors".into());
        }
        w.write_record(&header).map_err(csv_err)?;
        let mut row: Vec<&str> = Vec::with_capacity(header.len());
        for (c, p) in cells.iter().zip(&preds) {
            row.clear();
            for k in &cols {
                row.push(c.iter().find(|(x, _)| x == k).map_or("", |(_, v)| v));
            }
            if mark {
                row.push(p.as_ref().err().map_or("", String::as_str));
            }
            w.write_record(&row).map_err(csv_err)?;
        }
        let bw = w.into_inner().map_err(|e| io(e.into_error()))?;
        bw.finish().map_err(io)
    })
    .await?;
    let a = app.clone();
    let n = chunk.rows;
    let b = blocking(move || {
        let key = id.to_string();
        let got = BATCHES
            .update(a.store.as_ref(), &key, |cur| {
                let mut b = cur?;
                if let Some(c) = b.chunks.get_mut(i) {
                    if c.result.is_none() {
                        c.result = Some(result.clone());
                        c.columns = columns.clone();
                        c.errors = errors;
                        b.rows_done += n;
                    }
                }
                Some(b)
            })
            .map_err(|e| e.to_string())?
            .map(|(b, _)| b)
            .ok_or_else(|| format!("batch {id} is gone"))?;
        publish(&a, &got);
        Ok(got)
    })
    .await?;
    Ok(Scored {
        chunk: i,
        rows: n,
        errors: b.chunks[i].errors,
        rows_done: b.rows_done,
        rows_total: b.rows_total,
    })
}

/// Writes the result CSV of batch `id` (every chunk scored) to one blob; removes the chunks'.
pub async fn merge(app: &Arc<App>, ws: &str, model: &str, id: Uuid) -> Result<Value, String> {
    let b = load(app, ws, model, id).await?;
    if b.result.is_some() {
        return Ok(b.view());
    }
    if let Some(i) = b.chunks.iter().position(|c| c.result.is_none()) {
        return Err(format!("chunk {i} is not scored yet"));
    }
    let a = app.clone();
    blocking(move || {
        let mut pred_cols: Vec<String> = Vec::new();
        for c in &b.chunks {
            for k in &c.columns {
                if !pred_cols.contains(k) {
                    pred_cols.push(k.clone());
                }
            }
        }
        let mark = b.on_error == OnError::Mark;
        let io = |e: std::io::Error| format!("the result: {e}");
        let csv_err = |e: csv::Error| format!("the result: {e}");
        let bw = a.blobs.writer().map_err(io)?;
        let mut w = csv::Writer::from_writer(bw);
        let mut header: Vec<String> = match b.output {
            Output::Input => b.columns.clone(),
            Output::Id => vec!["row".into()],
        };
        header.extend(pred_cols.iter().cloned());
        if mark {
            header.push("errors".into());
        }
        w.write_record(&header).map_err(csv_err)?;
        let mut row_no = 0u64;
        let mut out = csv::ByteRecord::new();
        let mut inp = csv::ByteRecord::new();
        let mut res = csv::ByteRecord::new();
        for (i, c) in b.chunks.iter().enumerate() {
            let mut ir = csv::ReaderBuilder::new()
                .has_headers(false)
                .from_reader(open_chunk(&a, &c.input).map_err(io)?);
            let rblob = c.result.as_deref().expect("checked");
            let mut rr = csv::ReaderBuilder::new()
                .has_headers(true)
                .from_reader(open_chunk(&a, rblob).map_err(io)?);
            // Where each merged prediction column is in this chunk's result.
            let rh = rr.byte_headers().map_err(csv_err)?.clone();
            let at: Vec<Option<usize>> = pred_cols
                .iter()
                .map(|k| rh.iter().position(|h| h == k.as_bytes()))
                .collect();
            let err_at = rh.iter().position(|h| h == b"errors");
            let mut n = 0u64;
            while ir.read_byte_record(&mut inp).map_err(csv_err)? {
                if !rr.read_byte_record(&mut res).map_err(csv_err)? {
                    return Err(format!("chunk {i}: its result has fewer rows"));
                }
                row_no += 1;
                n += 1;
                out.clear();
                match b.output {
                    Output::Input => {
                        for f in inp.iter() {
                            out.push_field(f);
                        }
                    }
                    Output::Id => out.push_field(row_no.to_string().as_bytes()),
                }
                for p in &at {
                    out.push_field(p.and_then(|p| res.get(p)).unwrap_or(b""));
                }
                if mark {
                    out.push_field(err_at.and_then(|p| res.get(p)).unwrap_or(b""));
                }
                w.write_byte_record(&out).map_err(csv_err)?;
            }
            if n != c.rows {
                return Err(format!("chunk {i}: {n} rows read back, {} written", c.rows));
            }
        }
        let bw = w.into_inner().map_err(|e| io(e.into_error()))?;
        let size = bw.len();
        let blob = bw.finish().map_err(io)?;
        let got = BATCHES
            .update(a.store.as_ref(), &id.to_string(), |cur| {
                let mut b = cur?;
                if b.result.is_none() {
                    b.result = Some(blob.clone());
                    b.result_size = size;
                }
                Some(b)
            })
            .map_err(|e| e.to_string())?
            .map(|(b, _)| b)
            .ok_or_else(|| format!("batch {id} is gone"))?;
        for c in &got.chunks {
            let _ = a.blobs.delete(&c.input);
            if let Some(r) = &c.result {
                let _ = a.blobs.delete(r);
            }
        }
        publish(&a, &got);
        Ok(got.view())
    })
    .await
}
