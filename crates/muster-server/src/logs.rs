//! Reading job logs (SPEC §4): from the blob store once an attempt's log is uploaded, else from
//! the node that runs it — straight from its log endpoint, or relayed over its connection — and
//! followed live until the attempt ends.
//!
//! A reader counts the bytes it has passed on (its *offset*), and every piece it gets starts and
//! ends on a line end, so whatever breaks under it — the agent reconnects, its endpoint goes
//! away, the relay changes, the reader falls behind — it carries on from its offset with a new
//! source, and ends only at the attempt's end, every line once.
//!
//! - **Catching up** reads the log in windows of [`WINDOW`] bytes (`FollowLog` with a `limit`),
//!   one window at a time, so nothing queues up behind a slow reader.
//! - **Following** goes through one [`Hub`] per attempt: one live stream from the node, fanned out
//!   to every follower by a bounded broadcast. A follower that falls behind (the broadcast
//!   laps it) or joins late fills the gap by catching up, then reads the hub again. So a thousand
//!   followers cost one stream on the node, not a thousand.

use crate::links::Piece;
use crate::App;
use muster_core::{JobState, Uuid};
use muster_store::Event;
use muster_wire::protocol::ToAgent;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};

/// The bytes one catch-up window asks for.
pub const WINDOW: u64 = 1 << 20;
/// How many pieces a relayed stream may have in flight before it is dropped (and its reader
/// catches up instead).
const RELAY_CAPACITY: usize = 64;
/// How many pieces a hub keeps for followers that are a little behind (pieces are at most
/// 64 KiB: a hub holds at most 4 MiB).
const HUB_CAPACITY: usize = 64;
/// The whole of dialing a node's log endpoint (TCP, TLS, websocket upgrade) gets this long.
pub const ENDPOINT_DIAL: Duration = Duration::from_secs(3);

/// Why a log cannot be read.
#[derive(Debug)]
pub enum LogError {
    /// No such attempt.
    NotFound(String),
    /// The log lives on a node that is not connected now.
    NodeUnavailable(String),
}

/// What a hub hands its followers.
#[derive(Clone, Debug)]
enum HubMsg {
    /// Log text from byte `start`.
    Data { start: u64, data: Arc<str> },
    /// The attempt's log ends at byte `at`.
    End { at: u64 },
    /// The live stream broke: followers carry on by themselves.
    Cut,
}

/// One live stream of an attempt's log from its node, fanned out to its followers. It stops when
/// the last follower drops it.
struct Hub {
    tx: broadcast::Sender<HubMsg>,
    /// How far (bytes) the hub has handed the log out so far.
    at: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The hubs of the attempts being followed (a handle over private state; the lock is held only
/// for a map lookup or insert, never across an `.await`).
#[derive(Clone, Default)]
pub struct Logs {
    hubs: Arc<Mutex<HubMap>>,
}

/// The live hubs by attempt; a follower holds its hub, the map only a weak reference.
type HubMap = HashMap<(Uuid, u32), Weak<Hub>>;

impl Logs {
    /// How many attempts have a live hub now (for tests and metrics).
    pub fn hubs(&self) -> usize {
        let mut hubs = self.hubs.lock().unwrap_or_else(|e| e.into_inner());
        hubs.retain(|_, h| h.strong_count() > 0);
        hubs.len()
    }
}

/// How reading a source ended.
enum Ended {
    /// The source said it was done (a window full, or the end of what there is).
    Done,
    /// It broke off: read on from the offset with another source.
    Cut,
    /// The reader went away.
    Gone,
}

/// Opens the log of `job`'s `attempt` (the caller checked access): pieces of text, ending with
/// the log (with `follow`, at the attempt's end). The reader's channel closing ends the reading.
pub async fn read(
    app: &Arc<App>,
    job: Uuid,
    attempt: u32,
    follow: bool,
) -> Result<mpsc::Receiver<String>, LogError> {
    let j = load(app, job)
        .await
        .ok_or_else(|| LogError::NotFound("job".into()))?;
    if attempt == 0 || attempt > j.attempt {
        return Err(LogError::NotFound(format!("attempt {attempt}")));
    }
    let stored = blob_of(app, job, attempt).await.is_some();
    let live = !stored && j.state != JobState::Waiting && j.node.is_some();
    if live {
        let node = j.node.clone().unwrap_or_default();
        if !app.links.is_connected(&node) && (!follow || j.state.is_final()) {
            return Err(LogError::NodeUnavailable(format!(
                "the log is on node {node:?}, which is not connected now"
            )));
        }
    }
    let (tx, rx) = mpsc::channel(8);
    let app = app.clone();
    tokio::spawn(async move { reader(app, job, attempt, follow, tx).await });
    Ok(rx)
}

/// A part of a log.
pub struct LogPart {
    /// Where it starts in the log.
    pub start: u64,
    /// How big the whole log is (so far, for a running attempt).
    pub size: u64,
    pub data: Vec<u8>,
}

/// A part of a log, by byte offsets: `Tail(n)` is the last n bytes, `Span` the `limit` bytes
/// (or the rest) from `offset`. A big log opens at its end and pages backwards this way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Range {
    Tail(u64),
    Span { offset: u64, limit: Option<u64> },
}

impl Range {
    /// Where the part starts and ends in a log of `size` bytes.
    pub fn bounds(self, size: u64) -> (u64, u64) {
        match self {
            Range::Tail(n) => (size.saturating_sub(n), size),
            Range::Span { offset, limit } => {
                let start = offset.min(size);
                let end = limit.map_or(size, |l| start.saturating_add(l).min(size));
                (start, end)
            }
        }
    }
}

/// Reads a part of a log (the caller checked access). A stored log is read from the blob at
/// that offset; a live one is read through to its current end, keeping only the part. Either way
/// only the part is held in memory. Its start moves forward and its end back to character
/// boundaries.
pub async fn read_part(
    app: &Arc<App>,
    job: Uuid,
    attempt: u32,
    range: Range,
) -> Result<LogPart, LogError> {
    if let Some(blob) = blob_of(app, job, attempt).await {
        let blobs = app.blobs.clone();
        let part = tokio::task::spawn_blocking(move || -> std::io::Result<LogPart> {
            use std::io::{Read, Seek};
            let mut f = blobs.open(&blob)?;
            let size = f.metadata()?.len();
            let (start, end) = range.bounds(size);
            f.seek(std::io::SeekFrom::Start(start))?;
            let mut data = Vec::with_capacity((end - start) as usize);
            f.take(end - start).read_to_end(&mut data)?;
            Ok(LogPart { start, size, data })
        })
        .await
        .map_err(|e| LogError::NotFound(format!("the log ({e})")))?
        .map_err(|e| LogError::NotFound(format!("the log ({e})")))?;
        return Ok(on_characters(part));
    }
    let mut rx = read(app, job, attempt, false).await?;
    let mut data: Vec<u8> = Vec::new();
    let mut size = 0u64;
    while let Some(text) = rx.recv().await {
        let bytes = text.as_bytes();
        let seen = size;
        size += bytes.len() as u64;
        match range {
            Range::Tail(n) => {
                data.extend_from_slice(bytes);
                // Keep at most twice the tail before trimming, so trimming stays rare.
                if data.len() as u64 > n.saturating_mul(2) {
                    let cut = data.len() - n as usize;
                    data.drain(..cut);
                }
            }
            Range::Span { offset, limit } => {
                let end = limit.map_or(u64::MAX, |l| offset.saturating_add(l));
                let from = offset.saturating_sub(seen).min(bytes.len() as u64) as usize;
                let to = end.saturating_sub(seen).min(bytes.len() as u64) as usize;
                if to > from {
                    data.extend_from_slice(&bytes[from..to]);
                }
            }
        }
    }
    let (start, end) = range.bounds(size);
    if let Range::Tail(_) = range {
        let keep = (end - start) as usize;
        if data.len() > keep {
            data.drain(..data.len() - keep);
        }
    }
    Ok(on_characters(LogPart { start, size, data }))
}

/// Moves a part's start forward and its end back to character boundaries.
fn on_characters(mut p: LogPart) -> LogPart {
    let lead = p.data.iter().take_while(|b| (**b & 0xC0) == 0x80).count();
    p.data.drain(..lead);
    p.start += lead as u64;
    let valid = match std::str::from_utf8(&p.data) {
        Ok(_) => p.data.len(),
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => p.data.len(),
    };
    p.data.truncate(valid);
    p
}

/// The job (`Err`: the store could not say now — busy, away — which is not "no such job").
async fn try_load(app: &Arc<App>, job: Uuid) -> Result<Option<muster_core::Job>, ()> {
    let store = app.store.clone();
    tokio::task::spawn_blocking(move || store.job(job).map_err(|_| ()))
        .await
        .unwrap_or(Err(()))
}

async fn load(app: &Arc<App>, job: Uuid) -> Option<muster_core::Job> {
    try_load(app, job).await.ok().flatten()
}

/// Where the attempt's log was uploaded (`Err`: the store could not say now).
async fn try_blob_of(app: &Arc<App>, job: Uuid, attempt: u32) -> Result<Option<String>, ()> {
    let store = app.store.clone();
    tokio::task::spawn_blocking(move || store.log_blob(job, attempt).map_err(|_| ()))
        .await
        .unwrap_or(Err(()))
}

async fn blob_of(app: &Arc<App>, job: Uuid, attempt: u32) -> Option<String> {
    try_blob_of(app, job, attempt).await.ok().flatten()
}

/// The reader of one log (see the module doc).
async fn reader(app: Arc<App>, job: Uuid, attempt: u32, follow: bool, out: mpsc::Sender<String>) {
    let mut offset = 0u64;
    let mut pause = Duration::from_millis(20);
    let mut events = app.store.subscribe();
    let mut progress = 0u64;
    loop {
        if out.is_closed() {
            return;
        }
        // A source that broke after bringing something is retried soon again.
        if offset > progress {
            progress = offset;
            pause = Duration::from_millis(20);
        }
        // A store that cannot answer now (busy, away) is asked again: only the log's end ends
        // a reader.
        let (blob, j) = match (
            try_blob_of(&app, job, attempt).await,
            try_load(&app, job).await,
        ) {
            (Ok(b), Ok(j)) => (b, j),
            _ => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        if let Some(blob) = blob {
            if send_blob(&app, &blob, offset, &out).await {
                return;
            }
            tokio::time::sleep(pause).await;
            continue;
        }
        let Some(j) = j else {
            return;
        };
        let over = j.attempt > attempt || j.state.is_final();
        if j.state == JobState::Waiting && j.attempt == attempt {
            if !follow {
                return;
            }
            // Not started yet: wait for it to start (or end).
            wait_for_change(&mut events, job, Duration::from_secs(5)).await;
            continue;
        }
        let Some(node) = j.node.clone() else {
            return;
        };
        if !app.links.is_connected(&node) {
            if over {
                // Ended while its node is away: the log comes with the node, if ever.
                if !follow {
                    return;
                }
                wait_for_change(&mut events, job, Duration::from_secs(1)).await;
                if !app.links.is_connected(&node)
                    && blob_of(&app, job, attempt).await.is_none()
                    && load(&app, job).await.is_some_and(|j| j.state.is_final())
                {
                    return;
                }
                continue;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
            continue;
        }
        if follow && !over {
            // Live through the attempt's hub, which also fills any gap before it.
            match live(&app, &node, job, attempt, &mut offset, &out).await {
                Ended::Done | Ended::Gone => return,
                Ended::Cut => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                    continue;
                }
            }
        }
        // Everything there is now (an ended attempt's file is complete).
        match Box::pin(catch_up(&app, &node, job, attempt, &mut offset, &out)).await {
            Ended::Done | Ended::Gone => return,
            Ended::Cut => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Waits for an event about `job` (or `at_most`).
async fn wait_for_change(events: &mut broadcast::Receiver<Event>, job: Uuid, at_most: Duration) {
    let _ = tokio::time::timeout(at_most, async {
        loop {
            match events.recv().await {
                Ok(Event::Job { id, .. }) if id == job => return,
                Ok(Event::Node { .. }) => return,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => return,
                Err(broadcast::error::RecvError::Closed) => {
                    tokio::time::sleep(at_most).await;
                    return;
                }
            }
        }
    })
    .await;
}

/// Sends a stored log from `offset`, in pieces cut on line ends; `false` when the blob cannot be
/// read (the caller tries again).
async fn send_blob(app: &Arc<App>, blob: &str, offset: u64, out: &mpsc::Sender<String>) -> bool {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let Ok(f) = app.blobs.open(blob) else {
        tracing::warn!("cannot open the log blob {blob}");
        return false;
    };
    let mut f = tokio::fs::File::from_std(f);
    if f.seek(std::io::SeekFrom::Start(offset)).await.is_err() {
        return false;
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let n = match f.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        carry.extend_from_slice(&buf[..n]);
        let cut = match std::str::from_utf8(&carry) {
            Ok(_) => carry.len(),
            Err(e) => e.valid_up_to(),
        };
        let rest = carry.split_off(cut);
        let text = String::from_utf8(std::mem::replace(&mut carry, rest)).unwrap_or_default();
        if !text.is_empty() && out.send(text).await.is_err() {
            return true;
        }
    }
    if !carry.is_empty() {
        let _ = out.send(String::from_utf8_lossy(&carry).into_owned()).await;
    }
    true
}

/// Reads what the node has of the log from `offset`, one window at a time.
async fn catch_up(
    app: &Arc<App>,
    node: &str,
    job: Uuid,
    attempt: u32,
    offset: &mut u64,
    out: &mpsc::Sender<String>,
) -> Ended {
    loop {
        // Boxed, like every dial here: a dial's state is big, and a thousand idle followers
        // should not each carry room for one.
        let Some(mut src) = Box::pin(source(
            app,
            node,
            job,
            attempt,
            *offset,
            false,
            Some(WINDOW),
        ))
        .await
        else {
            return Ended::Cut;
        };
        let start = *offset;
        loop {
            match src.recv().await {
                Some(Piece { data, eof }) => {
                    if !data.is_empty() {
                        *offset += data.len() as u64;
                        if out.send(data).await.is_err() {
                            return Ended::Gone;
                        }
                    }
                    if eof {
                        break;
                    }
                }
                None => return Ended::Cut,
            }
        }
        // A window less than full: that was all there is now.
        if *offset - start < WINDOW {
            return Ended::Done;
        }
    }
}

/// Follows the live log through the attempt's hub, from `offset`, until the attempt ends.
async fn live(
    app: &Arc<App>,
    node: &str,
    job: Uuid,
    attempt: u32,
    offset: &mut u64,
    out: &mpsc::Sender<String>,
) -> Ended {
    let (hub, mut rx) = join_hub(app, node, job, attempt, *offset);
    // Behind the hub (it was started by an earlier follower): catch up to it first. Its pieces
    // meanwhile wait in the subscription.
    if hub.at.load(std::sync::atomic::Ordering::SeqCst) > *offset {
        match Box::pin(catch_up(app, node, job, attempt, offset, out)).await {
            Ended::Done => {}
            other => return other,
        }
    }
    loop {
        match rx.recv().await {
            Ok(HubMsg::Data { start, data }) => {
                if start > *offset {
                    // Joined late (the hub started further on): fill the gap from the node.
                    match Box::pin(catch_up(app, node, job, attempt, offset, out)).await {
                        Ended::Done => {}
                        other => return other,
                    }
                }
                let end = start + data.len() as u64;
                if end > *offset {
                    let Some(rest) = data.get((*offset - start) as usize..) else {
                        return Ended::Cut;
                    };
                    if out.send(rest.to_string()).await.is_err() {
                        return Ended::Gone;
                    }
                    *offset = end;
                }
            }
            Ok(HubMsg::End { at }) => {
                drop(hub);
                if at > *offset {
                    return match Box::pin(catch_up(app, node, job, attempt, offset, out)).await {
                        Ended::Cut => Ended::Cut,
                        other => other,
                    };
                }
                return Ended::Done;
            }
            Ok(HubMsg::Cut) | Err(broadcast::error::RecvError::Closed) => return Ended::Cut,
            Err(broadcast::error::RecvError::Lagged(_)) => {
                // Lapped: read what was missed from the node, then the hub again.
                match Box::pin(catch_up(app, node, job, attempt, offset, out)).await {
                    Ended::Done => {}
                    other => return other,
                }
            }
        }
    }
}

/// The attempt's hub (started from `from` when there is none), subscribed.
fn join_hub(
    app: &Arc<App>,
    node: &str,
    job: Uuid,
    attempt: u32,
    from: u64,
) -> (Arc<Hub>, broadcast::Receiver<HubMsg>) {
    let mut hubs = app.logs.hubs.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(hub) = hubs.get(&(job, attempt)).and_then(Weak::upgrade) {
        let rx = hub.tx.subscribe();
        return (hub, rx);
    }
    let (tx, rx) = broadcast::channel(HUB_CAPACITY);
    let at = Arc::new(std::sync::atomic::AtomicU64::new(from));
    let task = tokio::spawn(run_hub(
        app.clone(),
        node.to_string(),
        job,
        attempt,
        at.clone(),
        tx.clone(),
    ));
    let hub = Arc::new(Hub { tx, at, task });
    hubs.insert((job, attempt), Arc::downgrade(&hub));
    (hub, rx)
}

/// A hub's live stream: from `from`, every piece to the broadcast, then the end or the cut.
async fn run_hub(
    app: Arc<App>,
    node: String,
    job: Uuid,
    attempt: u32,
    handed: Arc<std::sync::atomic::AtomicU64>,
    tx: broadcast::Sender<HubMsg>,
) {
    let mut at = handed.load(std::sync::atomic::Ordering::SeqCst);
    let msg = match Box::pin(source(&app, &node, job, attempt, at, true, None)).await {
        None => HubMsg::Cut,
        Some(mut src) => loop {
            match src.recv().await {
                Some(Piece { data, eof }) => {
                    if !data.is_empty() {
                        let start = at;
                        at += data.len() as u64;
                        let _ = tx.send(HubMsg::Data {
                            start,
                            data: data.into(),
                        });
                        handed.store(at, std::sync::atomic::Ordering::SeqCst);
                    }
                    if eof {
                        break HubMsg::End { at };
                    }
                }
                None => break HubMsg::Cut,
            }
        },
    };
    // Gone from the map first, so a follower that comes now starts a fresh hub.
    {
        let mut hubs = app.logs.hubs.lock().unwrap_or_else(|e| e.into_inner());
        if hubs
            .get(&(job, attempt))
            .is_some_and(|h| h.upgrade().is_none_or(|h| h.tx.same_channel(&tx)))
        {
            hubs.remove(&(job, attempt));
        }
    }
    let _ = tx.send(msg);
}

/// A stream of the log from the node: from its log endpoint when it has one that answers, else
/// relayed over its connection. `None` when neither can be had now.
async fn source(
    app: &Arc<App>,
    node: &str,
    job: Uuid,
    attempt: u32,
    from: u64,
    follow: bool,
    limit: Option<u64>,
) -> Option<mpsc::Receiver<Piece>> {
    if let Some(ep) = app.links.endpoint(node) {
        let direct = tokio::time::timeout(
            // Short: a firewalled endpoint must not hold up the reader long (the connection
            // path takes over).
            ENDPOINT_DIAL,
            endpoint_source(app, &ep, job, attempt, from, follow, limit),
        )
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("timed out")));
        match direct {
            Ok(src) => {
                app.links.dialled(node, &ep, true);
                app.metrics.log_stream(true);
                return Some(src);
            }
            Err(e) => {
                let rest = app.links.dialled(node, &ep, false);
                tracing::warn!(
                    node,
                    "cannot reach the log endpoint of node {node:?} at {}: {e}; relaying over its connection for {}s",
                    ep.addr,
                    rest.as_secs()
                );
            }
        }
    }
    let (stream, rx) = app.links.open_stream(node, RELAY_CAPACITY)?;
    app.metrics.log_stream(false);
    if !app.links.send(
        node,
        ToAgent::FollowLog {
            stream,
            job,
            attempt,
            from,
            follow,
            limit,
        },
    ) {
        app.links.close_stream(stream);
        return None;
    }
    Some(relayed(app.clone(), node.to_string(), stream, rx))
}

/// Reads the log of long-running process `id` on `node` (the caller checked access): what its
/// current log file holds, and with `follow`, what comes until its supervisor ends. Relayed
/// over the node's connection (attempt 0 names a process's log on the agent).
pub async fn read_process(
    app: &Arc<App>,
    node: &str,
    id: Uuid,
    follow: bool,
) -> Result<mpsc::Receiver<String>, LogError> {
    let unavailable = || {
        LogError::NodeUnavailable(format!(
            "the log is on node {node:?}, which is not connected now"
        ))
    };
    let (stream, rx) = app
        .links
        .open_stream(node, RELAY_CAPACITY)
        .ok_or_else(unavailable)?;
    app.metrics.log_stream(false);
    if !app.links.send(
        node,
        ToAgent::FollowLog {
            stream,
            job: id,
            attempt: 0,
            from: 0,
            follow,
            limit: None,
        },
    ) {
        app.links.close_stream(stream);
        return Err(unavailable());
    }
    let mut pieces = relayed(app.clone(), node.to_string(), stream, rx);
    let (tx, out) = mpsc::channel(8);
    tokio::spawn(async move {
        while let Some(p) = pieces.recv().await {
            if !p.data.is_empty() && tx.send(p.data).await.is_err() {
                break;
            }
            if p.eof {
                break;
            }
        }
    });
    Ok(out)
}

/// A relayed stream that tells the agent to stop when its reader goes away.
fn relayed(
    app: Arc<App>,
    node: String,
    stream: u64,
    mut rx: mpsc::Receiver<Piece>,
) -> mpsc::Receiver<Piece> {
    let (tx, out) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut ended = false;
        loop {
            tokio::select! {
                p = rx.recv() => match p {
                    Some(p) => {
                        ended = p.eof;
                        if tx.send(p).await.is_err() || ended { break; }
                    }
                    None => break,
                },
                _ = tx.closed() => break,
            }
        }
        app.links.close_stream(stream);
        if !ended {
            app.links.send(&node, ToAgent::StopLog { stream });
        }
    });
    out
}

/// Streams a log straight from the node's own endpoint (TLS both ways under the cluster CA: the
/// node must hold the certificate made for its id, this server shows its own). A close frame
/// ends it; anything else that stops it is a cut.
async fn endpoint_source(
    app: &Arc<App>,
    ep: &crate::links::LogEndpoint,
    job: Uuid,
    attempt: u32,
    from: u64,
    follow: bool,
    limit: Option<u64>,
) -> std::io::Result<mpsc::Receiver<Piece>> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message as TMessage;
    let addr = ep.addr.to_string();
    let tls = muster_wire::pki::dial(
        &addr,
        app.tls.get().dialer.clone(),
        &muster_wire::pki::node_name(&ep.node_id),
        ENDPOINT_DIAL,
    )
    .await?;
    let mut url = format!("wss://{addr}/logs/{job}/{attempt}?follow={follow}&from={from}");
    if let Some(l) = limit {
        url.push_str(&format!("&limit={l}"));
    }
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls)
        .await
        .map_err(std::io::Error::other)?;
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let piece = match ws.next().await {
                Some(Ok(TMessage::Text(t))) => Piece {
                    data: t.to_string(),
                    eof: false,
                },
                Some(Ok(TMessage::Ping(_) | TMessage::Pong(_) | TMessage::Frame(_))) => continue,
                Some(Ok(TMessage::Close(_))) => Piece {
                    data: String::new(),
                    eof: true,
                },
                // An error, or the connection ended without a close: a cut.
                _ => return,
            };
            let eof = piece.eof;
            tokio::select! {
                r = tx.send(piece) => if r.is_err() || eof { return },
                // The reader left: stop reading (dropping the websocket closes it).
                _ = tx.closed() => return,
            }
        }
    });
    Ok(rx)
}
