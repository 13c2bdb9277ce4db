//! Alerts to operators (`[alerts] webhook_url`, SPEC §1): store unavailable and back, node lost,
//! tree failed, each POSTed as one JSON object. A background thread sends them, so nothing
//! waits on the webhook; an alert that cannot be delivered is retried a few times, then logged.

use crate::manager::now;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::mpsc::{channel, Sender};
use std::sync::Mutex;
use std::time::Duration;

/// Where alerts go (none when no webhook is configured).
pub struct Alerts {
    tx: Option<Mutex<Sender<Value>>>,
}

impl Alerts {
    /// Starts the sender for `url` (`http://HOST[:PORT]/PATH`); an empty URL sends nothing.
    pub fn start(url: &str) -> Result<Alerts, String> {
        if url.is_empty() {
            return Ok(Alerts { tx: None });
        }
        let target = Target::parse(url)?;
        let (tx, rx) = channel::<Value>();
        std::thread::Builder::new()
            .name("alerts".into())
            .spawn(move || {
                while let Ok(v) = rx.recv() {
                    let body = v.to_string();
                    let mut delay = Duration::from_millis(200);
                    for attempt in 1..=5 {
                        match target.post(&body) {
                            Ok(()) => break,
                            Err(e) if attempt == 5 => {
                                eprintln!("muster: alert not delivered to the webhook: {e}: {body}")
                            }
                            Err(_) => {
                                std::thread::sleep(delay);
                                delay *= 2;
                            }
                        }
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(Alerts {
            tx: Some(Mutex::new(tx)),
        })
    }

    /// Sends an alert of `kind` with `fields`.
    pub fn send(&self, kind: &str, mut fields: Value) {
        let Some(tx) = &self.tx else { return };
        if let Value::Object(m) = &mut fields {
            m.insert("alert".into(), json!(kind));
            m.insert("at".into(), json!(now()));
        }
        let _ = tx.lock().unwrap_or_else(|e| e.into_inner()).send(fields);
    }
}

struct Target {
    host: String,
    port: u16,
    path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Target, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("alerts.webhook_url {url:?}: only http:// URLs are supported (put a TLS proxy in front)"))?;
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse()
                    .map_err(|_| format!("alerts.webhook_url {url:?}: bad port"))?,
            ),
            None => (hostport.to_string(), 80),
        };
        Ok(Target { host, port, path })
    }

    fn post(&self, body: &str) -> std::io::Result<()> {
        let addr = (self.host.as_str(), self.port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::other("no address"))?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "POST {} HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\nUser-Agent: muster\r\n\r\n{body}",
            self.path,
            self.host,
            self.port,
            body.len()
        )?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head)?;
        let status = std::str::from_utf8(&head[9..12]).unwrap_or("000");
        if status.starts_with('2') {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "the webhook answered {status}"
            )))
        }
    }
}
