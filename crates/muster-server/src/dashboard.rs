//! The dashboards (SPEC §10), served by the binary itself: one HTML page and its script and
//! style, embedded at build time (no CDN, no network at run time). The page is the setup form
//! while no user exists, then the admin dashboard (login, nodes, jobs, processes, a tree with live states,
//! a live log, the run form, workspaces and tokens). Everything it shows comes from `/api/v1`
//! with the session cookie (and the CSRF token on writes); live updates from
//! `/api/v1/events/ws`. It offers only what `/api/v1/me` says the caller may do.

use crate::App;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

const INDEX_HTML: &str = include_str!("../assets/index.html");

/// The embedded assets: (file name, content type, bytes).
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("../assets/app.css"),
    ),
    (
        "favicon.svg",
        "image/svg+xml",
        include_bytes!("../assets/favicon.svg"),
    ),
];

/// The page's script may talk only to this server (`'self'` covers same-origin websockets),
/// runs no inline code, and cannot be framed.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

fn secure(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// `GET /`: the page, in setup mode while no user exists.
pub async fn index(State(app): State<Arc<App>>) -> Response {
    let store = app.store.clone();
    let users = tokio::task::spawn_blocking(move || store.users().map(|u| u.len())).await;
    let mode = match users {
        Ok(Ok(0)) => "setup",
        Ok(Ok(_)) => "app",
        _ => {
            return secure(
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                    "muster: the store is unavailable; try again shortly\n",
                )
                    .into_response(),
            )
        }
    };
    let body = INDEX_HTML
        .replace("{{MODE}}", mode)
        .replace("{{VERSION}}", env!("CARGO_PKG_VERSION"));
    secure(
        (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            body,
        )
            .into_response(),
    )
}

/// `GET /assets/{file}`: an embedded script, style or icon.
pub async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, ct, bytes)) => secure(
            (
                [
                    (header::CONTENT_TYPE, *ct),
                    // Revalidated each load: the binary may have been upgraded.
                    (header::CACHE_CONTROL, "no-cache"),
                ],
                *bytes,
            )
                .into_response(),
        ),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(serde_json::json!({"error": {"code": "not_found", "message": format!("asset {file:?} not found")}})),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_refers_only_to_embedded_assets() {
        for part in INDEX_HTML.split("/assets/").skip(1) {
            let name: String = part
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '.' || *c == '-')
                .collect();
            assert!(
                ASSETS.iter().any(|(n, _, _)| *n == name),
                "index.html refers to a missing asset {name:?}"
            );
        }
        assert!(!INDEX_HTML.contains("http://") && !INDEX_HTML.contains("https://"));
        let js = std::str::from_utf8(ASSETS[0].2).unwrap();
        assert!(
            !js.contains("http://") && !js.contains("https://"),
            "no network but this server"
        );
    }
}
