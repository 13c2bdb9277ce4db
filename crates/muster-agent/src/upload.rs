//! Uploading an ended attempt's log to the server, in acknowledged parts: the agent reads a part
//! (at most [`PART`] bytes, cut on a character boundary), sends it as `LogPart`, and sends the
//! next only when the server has stored this one (`LogStored`). Neither side holds more than a
//! part in memory, whatever the log's size, and a slow server slows the upload down instead of
//! filling a queue.
//!
//! An upload belongs to one connection: when it drops, the upload stops, and the next `Hello`
//! starts it again from the beginning (the server drops parts of unfinished uploads).

use muster_core::Uuid;
use muster_wire::protocol::FromAgent;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

/// The largest part.
pub const PART: usize = 256 * 1024;

/// How long a part may wait for its acknowledgement before the upload is given up (the
/// connection is then taken for dead; the next one uploads again).
const ACK_WAIT: Duration = Duration::from_secs(60);

/// Uploads the file `log` (a missing file uploads as empty) over `tx`, reading the server's
/// acknowledgements from `acks`. `Ok(())` once the last part is stored; `Err` when the
/// connection went away or the server stopped answering.
pub async fn upload(
    log: PathBuf,
    job: Uuid,
    attempt: u32,
    tx: UnboundedSender<FromAgent>,
    mut acks: UnboundedReceiver<u64>,
) -> Result<(), String> {
    let mut backoff = Duration::from_millis(100);
    'again: loop {
        let mut file = match tokio::fs::File::open(&log).await {
            Ok(f) => Some(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("cannot read {}: {e}", log.display())),
        };
        let mut offset: u64 = 0;
        let mut carry: Vec<u8> = Vec::new();
        let mut eof = file.is_none();
        loop {
            // What the last part left over (an unfinished character) comes first.
            let mut buf = std::mem::take(&mut carry);
            let mut filled = buf.len();
            if let Some(f) = file.as_mut() {
                buf.resize(PART, 0);
                while !eof && filled < PART {
                    let n = f
                        .read(&mut buf[filled..])
                        .await
                        .map_err(|e| format!("cannot read {}: {e}", log.display()))?;
                    eof = n == 0;
                    filled += n;
                }
            }
            buf.truncate(filled);
            // Cut on a character boundary; what is left goes first into the next part.
            let cut = match std::str::from_utf8(&buf) {
                Ok(_) => buf.len(),
                Err(e) if e.error_len().is_none() => e.valid_up_to(),
                // Not UTF-8 inside (the supervisor writes UTF-8 only): send it lossily.
                Err(_) => buf.len(),
            };
            carry = buf.split_off(cut);
            let last = eof && carry.is_empty();
            let data = String::from_utf8_lossy(&buf).into_owned();
            let end = offset + buf.len() as u64;
            tx.send(FromAgent::LogPart {
                job,
                attempt,
                offset,
                data,
                last,
            })
            .map_err(|_| "the connection closed".to_string())?;
            match tokio::time::timeout(ACK_WAIT, acks.recv()).await {
                Ok(Some(acked)) if acked == end => {}
                // The server lost the earlier parts (or could not store this one): from the
                // start, after a while (a full disk on the server must not make a hot loop).
                Ok(Some(_)) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue 'again;
                }
                Ok(None) => return Err("the connection closed".into()),
                Err(_) => return Err("the server did not acknowledge a log part".into()),
            }
            offset = end;
            if last {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays the server: stores parts, checking offsets; `lose_at` drops what it had once.
    async fn serve(
        mut rx: UnboundedReceiver<FromAgent>,
        acks: UnboundedSender<u64>,
        mut lose_at: Option<u64>,
    ) -> (String, usize) {
        let mut got = String::new();
        let mut parts = 0;
        while let Some(FromAgent::LogPart {
            offset, data, last, ..
        }) = rx.recv().await
        {
            parts += 1;
            assert!(data.len() <= PART);
            if offset != got.len() as u64 {
                got.clear();
                let _ = acks.send(0);
                continue;
            }
            got.push_str(&data);
            if lose_at.is_some_and(|at| got.len() as u64 >= at) {
                lose_at = None;
                got.clear();
                let _ = acks.send(0);
                continue;
            }
            let _ = acks.send(got.len() as u64);
            if last {
                break;
            }
        }
        (got, parts)
    }

    #[tokio::test]
    async fn a_log_goes_up_in_acknowledged_parts_cut_on_characters_and_survives_a_lost_part() {
        let dir = std::env::temp_dir().join(format!("muster-upload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("log");
        // Multi-byte characters across every part boundary.
        let text: String = (0..40_000).map(|i| format!("{i} é€😀\n")).collect();
        std::fs::write(&log, &text).unwrap();
        let job = Uuid::nil();
        for lose in [None, Some(PART as u64 + 1)] {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let (ack_tx, ack_rx) = tokio::sync::mpsc::unbounded_channel();
            let server = tokio::spawn(serve(rx, ack_tx, lose));
            upload(log.clone(), job, 1, tx, ack_rx).await.unwrap();
            let (got, parts) = server.await.unwrap();
            assert_eq!(got, text);
            assert!(parts > text.len() / PART, "{parts} parts");
        }
        // A missing log uploads as one empty last part.
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (ack_tx, ack_rx) = tokio::sync::mpsc::unbounded_channel();
        let server = tokio::spawn(serve(rx, ack_tx, None));
        upload(dir.join("none"), job, 1, tx, ack_rx).await.unwrap();
        assert_eq!(server.await.unwrap(), (String::new(), 1));
        // No server: an error, not a hang.
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        drop(rx);
        let (_ack_tx, ack_rx) = tokio::sync::mpsc::unbounded_channel();
        assert!(upload(log, job, 1, tx, ack_rx).await.is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
