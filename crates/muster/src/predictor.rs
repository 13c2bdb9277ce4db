//! `muster predictor`: one replica of a Python model, serving `POST /predict` through a worker
//! pool (`muster_models::Pool`). The process layer will run it as a supervised process; for now
//! it is started by hand or by tests:
//!
//! ```text
//! muster predictor --bundle DIR --env DIR --listen 127.0.0.1:0
//! ```
//!
//! It prints `listening on ADDR` on stdout once the model has loaded in every worker (port 0
//! picks a free port). `POST /predict` `{"data": ...}` answers `{"result": ...}`; a full queue is
//! 503 with `Retry-After`, no answer within `--timeout` is 504, a Python exception 422 with its
//! type and message; `GET /healthz` is 200 when the bundle's `example` gets an answer (503 with
//! the error if not). SIGTERM or ctrl-c stops it after the calls in flight.

use anyhow::{Context, Result};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use muster_models::pool::Log;
use muster_models::{Bundle, Error, Pool, PoolConfig, PythonEnv};
use serde_json::value::RawValue;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Flags of `muster predictor`.
#[derive(clap::Args, Clone)]
pub struct PredictorArgs {
    /// The bundle directory (holding bundle.json).
    #[arg(long)]
    bundle: PathBuf,
    /// The Python environment the model runs in (a venv made for its requirements).
    #[arg(long)]
    env: PathBuf,
    /// The address to listen on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Worker processes (default: the bundle's `workers`).
    #[arg(long)]
    workers: Option<usize>,
    /// Calls that may wait for a worker before more are refused with 503 (default: 64 per worker).
    #[arg(long)]
    queue: Option<usize>,
    /// Seconds a call may take, queue included (the worker is replaced past it).
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// The largest request body, in bytes.
    #[arg(long, default_value_t = 64 << 20)]
    body_max: usize,
}

/// What answers the calls: a worker pool (python, r) or ONNX Runtime in this process (onnx).
#[derive(Clone)]
enum Backend {
    Pool(Pool),
    Onnx(Arc<muster_models::onnx::OnnxModel>),
}

impl Backend {
    async fn call(&self, data: &str) -> Result<String, Error> {
        match self {
            Backend::Pool(p) => p.call(data).await,
            Backend::Onnx(m) => {
                let (m, data) = (m.clone(), data.to_string());
                tokio::task::spawn_blocking(move || m.call(&data))
                    .await
                    .unwrap_or(Err(Error::Closed))
            }
        }
    }

    async fn stop(&self) {
        if let Backend::Pool(p) = self {
            p.stop().await;
        }
    }
}

/// The ONNX Runtime library: the one the environment step checked and noted (`library` in the
/// environment: `[models] onnxruntime_lib` or the node's `ORT_DYLIB_PATH`), else
/// `ORT_DYLIB_PATH`, else the one it installed (the onnxruntime wheel).
fn onnx_library(env_dir: &std::path::Path) -> Result<PathBuf> {
    if let Ok(p) = std::fs::read_to_string(env_dir.join("library")) {
        return Ok(PathBuf::from(p.trim()));
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    muster_models::onnx::find_library(env_dir).with_context(|| {
        format!(
            "no libonnxruntime.so in {} (set ORT_DYLIB_PATH, or deploy again to install it)",
            env_dir.display()
        )
    })
}

#[derive(Clone)]
struct App {
    pool: Backend,
    timeout: Duration,
    /// The bundle's `example` data, as JSON text: the health check's call.
    example: Option<Arc<str>>,
}

/// Runs the predictor until SIGTERM or ctrl-c.
pub fn main(a: PredictorArgs) -> Result<()> {
    let bundle = Bundle::load(&a.bundle).map_err(anyhow::Error::msg)?;
    let env_dir = a
        .env
        .canonicalize()
        .with_context(|| format!("the environment {} cannot be opened", a.env.display()))?;
    let env = PythonEnv {
        key: env_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        dir: env_dir,
        reused: true,
    };
    // A backtrace per error slows ONNX Runtime's error path (and says nothing to a client).
    // SAFETY: still one thread (the runtime is made below).
    unsafe { std::env::remove_var("RUST_BACKTRACE") };
    let onnx = if bundle.runtime == muster_models::Runtime::Onnx {
        let lib = onnx_library(&env.dir)?;
        muster_models::onnx::init(&lib).map_err(anyhow::Error::msg)?;
        let file = bundle
            .dir
            .join(bundle.model.as_deref().unwrap_or("model.onnx"));
        let sessions = a.workers.unwrap_or(bundle.workers as usize);
        let m =
            muster_models::onnx::OnnxModel::load(&file, sessions).map_err(anyhow::Error::msg)?;
        Some(Arc::new(m))
    } else {
        None
    };
    let timeout = Duration::from_secs_f64(a.timeout.max(0.001));
    let mut config = match &onnx {
        Some(_) => None,
        None => Some(PoolConfig::new(&bundle, &env).map_err(anyhow::Error::msg)?),
    };
    if let Some(config) = config.as_mut() {
        if let Some(w) = a.workers {
            config.workers = w;
        }
        config.queue = a.queue.unwrap_or(64 * config.workers);
        config.timeout = timeout;
        // Worker output and tracebacks go to stderr, the predictor's log.
        config.log = Arc::new(Mutex::new(std::io::stderr())) as Log;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // The model loads first: the port is open only once it can answer (a tcp health
        // check then means "loaded").
        let pool = match (config, onnx) {
            (Some(config), _) => {
                Backend::Pool(Pool::start(config).await.map_err(anyhow::Error::msg)?)
            }
            (None, Some(m)) => Backend::Onnx(m),
            (None, None) => unreachable!("one of the two is made above"),
        };
        let listener = tokio::net::TcpListener::bind(&a.listen)
            .await
            .with_context(|| format!("cannot listen on {}", a.listen))?;
        let addr = listener.local_addr()?;
        {
            use std::io::Write;
            let mut out = std::io::stdout();
            writeln!(out, "listening on {addr}")?;
            out.flush()?;
        }
        tracing::info!(%addr, model = %bundle.name, "predictor ready");
        let app = App {
            pool: pool.clone(),
            timeout,
            example: bundle.example.as_ref().map(|v| Arc::from(v.to_string())),
        };
        axum::serve(listener, router(app, a.body_max))
            .with_graceful_shutdown(stopped())
            .await?;
        pool.stop().await;
        Ok(())
    })
}

async fn stopped() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn router(app: App, body_max: usize) -> Router {
    Router::new()
        .route("/predict", post(predict))
        .route("/healthz", get(healthz))
        .layer(DefaultBodyLimit::max(body_max))
        .with_state(app)
}

/// 200 when the model answers its bundle's `example` (or, without one, when the predictor is
/// up), else 503 with the error: what the deploy's health check asks.
async fn healthz(State(app): State<App>) -> Response {
    let Some(example) = app.example.clone() else {
        return "ok\n".into_response();
    };
    match tokio::time::timeout(app.timeout, app.pool.call(&example)).await {
        Ok(Ok(_)) => "ok\n".into_response(),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, "unhealthy", &e.to_string()),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unhealthy",
            "the example call did not answer in time",
        ),
    }
}

/// The request body: `data` and nothing else.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PredictBody<'a> {
    #[serde(borrow)]
    data: &'a RawValue,
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({"error": {"code": code, "message": message}});
    (status, axum::Json(body)).into_response()
}

async fn predict(State(app): State<App>, body: axum::body::Bytes) -> Response {
    let parsed: PredictBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            let msg = format!("the body must be {{\"data\": ...}} ({e})");
            return error(StatusCode::BAD_REQUEST, "bad_request", &msg);
        }
    };
    match tokio::time::timeout(app.timeout, app.pool.call(parsed.data.get())).await {
        Ok(Ok(result)) => {
            let mut out = String::with_capacity(result.len() + 12);
            out.push_str("{\"result\":");
            out.push_str(&result);
            out.push('}');
            ([(header::CONTENT_TYPE, "application/json")], out).into_response()
        }
        Ok(Err(Error::Overloaded)) => {
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "every worker is busy and the queue is full; retry shortly",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        Ok(Err(Error::Model { kind, message })) => {
            let body = serde_json::json!({"error": {
                "code": "model_error",
                "message": format!("{kind}: {message}"),
                "exception": {"type": kind, "message": message},
            }});
            (StatusCode::UNPROCESSABLE_ENTITY, axum::Json(body)).into_response()
        }
        Ok(Err(e @ Error::Timeout(_))) | Ok(Err(e @ Error::WorkerDied(_))) => {
            let status = if matches!(e, Error::Timeout(_)) {
                StatusCode::GATEWAY_TIMEOUT
            } else {
                StatusCode::BAD_GATEWAY
            };
            error(status, "model_failed", &e.to_string())
        }
        Ok(Err(e)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            &e.to_string(),
        ),
        Err(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            &format!("the model did not answer within {:?}", app.timeout),
        ),
    }
}
