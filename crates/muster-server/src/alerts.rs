//! Alerts to operators (`[alerts] webhook_url`, SPEC §1): store unavailable and back, node lost,
//! tree failed, each POSTed as one JSON object. A background thread sends them, so nothing
//! waits on the webhook; an alert that cannot be delivered is retried a few times, then logged.

use muster_wire::util::now;
use serde_json::{json, Value};
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
                                tracing::error!("alert not delivered to the webhook: {e}: {body}")
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

/// The webhook, and the HTTP client that posts to it.
struct Target {
    url: String,
    agent: ureq::Agent,
}

impl Target {
    fn parse(url: &str) -> Result<Target, String> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!(
                "alerts.webhook_url {url:?}: give an http:// or https:// URL"
            ));
        }
        url.parse::<ureq::http::Uri>()
            .map_err(|e| format!("alerts.webhook_url {url:?}: {e}"))?;
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .http_status_as_error(false)
            .user_agent("muster")
            .build()
            .into();
        Ok(Target {
            url: url.to_string(),
            agent,
        })
    }

    fn post(&self, body: &str) -> Result<(), String> {
        let resp = self
            .agent
            .post(&self.url)
            .header("content-type", "application/json")
            .send(body)
            .map_err(|e| e.to_string())?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("the webhook answered {}", resp.status()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_urls_are_checked_at_start() {
        assert!(Target::parse("ftp://x").is_err());
        assert!(Target::parse("http://exa mple/").is_err());
        assert!(Target::parse("http://127.0.0.1:9/hook").is_ok());
        assert!(Target::parse("https://hooks.example/x").is_ok());
    }
}
