//! `muster models …`: deploy a bundle (a directory or a `.tar.gz`) and follow its deploy tree,
//! list and show models, predict; and `muster models step`, what the deploy tree's jobs run.

use super::*;
use muster_models::{archive, Bundle, Envs, Interpreter};

#[derive(Subcommand)]
pub enum ModelsCmd {
    /// Deploy a bundle (a directory with bundle.json, or a .tar.gz of one) as the model's next
    /// version, and follow its deploy tree until it is live or has failed.
    Deploy(DeployArgs),
    /// List models.
    Ls(ModelsLsArgs),
    /// Show a model: its versions, the live one, its replicas.
    Show(ModelArgs),
    /// Call a model's predict: `--data '{"sepal_length": 5.1, ...}'` or `--data @file.json`.
    Predict(PredictArgs),
    /// Switch back to a kept version (its predictors are started again), and follow the tree.
    Revert(RevertArgs),
    /// Delete a model: it serves nothing from now on; the reaper removes its processes and files.
    Rm(ModelArgs),
    /// Print the logs of the live version's predictors (with -f: follow the first replica's).
    Logs(ModelLogsArgs),
    /// Score a whole CSV (a header line, then rows) through a model, in chunks scored in
    /// parallel across its replicas; the result CSV (input order kept) to `-o FILE` or stdout.
    Batch(BatchArgs),
    /// One step of a deploy tree (run by the tree's jobs, not by hand).
    #[command(hide = true)]
    Step(StepArgs),
    /// One job of a batch tree: `chunk I` or `merge` (run by the tree's jobs, not by hand).
    #[command(hide = true)]
    BatchStep(BatchStepArgs),
    /// A yhat batch job (`POST /batch/deploy`): its packed bundle, in base64, on standard input
    /// (run by the job, not by hand).
    #[command(hide = true)]
    YhatBatchRun(YhatBatchArgs),
}

#[derive(Args)]
pub struct YhatBatchArgs {
    /// Where environments are kept (default: $MUSTER_NODE_DIR/models/envs).
    #[arg(long)]
    envs: Option<PathBuf>,
    /// The wheel cache (default: $MUSTER_NODE_DIR/models/wheels).
    #[arg(long)]
    wheels: Option<PathBuf>,
}

#[derive(Args)]
pub struct BatchArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// WORKSPACE/MODEL, or MODEL in your workspace.
    model: String,
    /// The input CSV (`-` for stdin).
    input: PathBuf,
    /// Where the result CSV goes (default: stdout).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Rows per chunk (default: the server's, 10000).
    #[arg(long)]
    chunk_rows: Option<u64>,
    /// A row the model refuses: `fail` the batch, or `mark` it in an `errors` column.
    #[arg(long, default_value = "fail")]
    on_error: String,
    /// How rows are given to the model as `data`: rows (lists), records or columns.
    #[arg(long, default_value = "rows")]
    shape: String,
    /// The result's columns beside the predictions: the `input` ones, or a row number (`id`).
    #[arg(long = "columns", default_value = "input")]
    columns: String,
    /// Score with this version (a kept one whose predictors run) instead of the live one.
    #[arg(long)]
    version: Option<u32>,
    /// Answer once the batch is made (its tree id); do not wait for the result.
    #[arg(long)]
    no_wait: bool,
}

#[derive(Args)]
pub struct BatchStepArgs {
    #[command(flatten)]
    server: ServerOpt,
    workspace: String,
    model: String,
    batch: String,
    /// `chunk` or `merge`.
    what: String,
    /// The chunk's index (for `chunk`).
    chunk: Option<usize>,
}

#[derive(Args)]
pub struct DeployArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// The bundle: a directory holding bundle.json, or a .tar.gz of one.
    bundle: PathBuf,
    /// The workspace (default: the token's, else your user name).
    #[arg(long)]
    workspace: Option<String>,
    /// Answer once the version and its tree are made; do not follow the deploy.
    #[arg(long)]
    no_wait: bool,
    /// Print the model as JSON at the end (no progress bar).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ModelsLsArgs {
    #[command(flatten)]
    server: ServerOpt,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ModelArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// WORKSPACE/MODEL, or MODEL in your workspace.
    model: String,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct PredictArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// WORKSPACE/MODEL, or MODEL in your workspace.
    model: String,
    /// The data: JSON text, or @FILE to read it from a file (@- for stdin).
    #[arg(long)]
    data: String,
    /// Call this version (a kept one whose predictors run) instead of the live one.
    #[arg(long)]
    version: Option<u32>,
}

#[derive(Args)]
pub struct RevertArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// WORKSPACE/MODEL, or MODEL in your workspace.
    model: String,
    /// The kept version to make live again.
    version: u32,
    /// Answer once the tree is made; do not follow it.
    #[arg(long)]
    no_wait: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ModelLogsArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// WORKSPACE/MODEL, or MODEL in your workspace.
    model: String,
    /// A version (default: the live one).
    #[arg(long)]
    version: Option<u32>,
    /// Follow the (first) replica's log.
    #[arg(short, long)]
    follow: bool,
}

#[derive(Args)]
pub struct StepArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// prepare, start, health, switch, drain or stop.
    step: String,
    workspace: String,
    model: String,
    version: u32,
    /// prepare: where environments are kept (default: $MUSTER_NODE_DIR/models/envs).
    #[arg(long)]
    envs: Option<PathBuf>,
    /// prepare: the wheel cache (default: $MUSTER_NODE_DIR/models/wheels).
    #[arg(long)]
    wheels: Option<PathBuf>,
    /// prepare: the ONNX Runtime library an onnx bundle loads (the server's
    /// `[models] onnxruntime_lib`); default: `ORT_DYLIB_PATH`, else the onnxruntime wheel.
    #[arg(long)]
    onnxruntime_lib: Option<PathBuf>,
    /// gc: a bundle or environment directory to remove (only under the node's model dirs).
    #[arg(long)]
    remove: Vec<PathBuf>,
}

pub fn run(cmd: ModelsCmd) -> Result<()> {
    match cmd {
        ModelsCmd::Deploy(a) => deploy(a),
        ModelsCmd::Ls(a) => ls(a),
        ModelsCmd::Show(a) => show(a),
        ModelsCmd::Predict(a) => predict(a),
        ModelsCmd::Revert(a) => revert(a),
        ModelsCmd::Rm(a) => rm(a),
        ModelsCmd::Logs(a) => logs(a),
        ModelsCmd::Step(a) => step(a),
        ModelsCmd::Batch(a) => batch(a),
        ModelsCmd::BatchStep(a) => batch_step(a),
        ModelsCmd::YhatBatchRun(a) => yhat_batch_run(a),
    }
}

/// The caller's default workspace: the token's own (a job's), else the user's name.
fn default_workspace(client: &Client) -> Result<String> {
    let me = client.get_json("/api/v1/me", &[])?;
    if let Some(ws) = me.pointer("/token/workspace").and_then(Value::as_str) {
        return Ok(ws.to_string());
    }
    Ok(text(&me["user"]))
}

/// `WS/MODEL` or `MODEL` (in the default workspace).
fn model_path(client: &Client, model: &str) -> Result<(String, String)> {
    match model.split_once('/') {
        Some((ws, m)) => Ok((ws.to_string(), m.to_string())),
        None => Ok((default_workspace(client)?, model.to_string())),
    }
}

fn model_url(ws: &str, model: &str) -> String {
    format!("/api/v1/models/{}/{}", seg(ws), seg(model))
}

/// The bundle as `.tar.gz` bytes and its model name, checked here first.
fn packed(path: &std::path::Path) -> Result<(Vec<u8>, String)> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("{} cannot be read", path.display()))?;
    if meta.is_dir() {
        let bundle = Bundle::load(path)
            .map_err(|e| anyhow!("{}: {e} (fix bundle.json and deploy again)", path.display()))?;
        let mut out = Vec::new();
        archive::pack(path, &mut out).map_err(anyhow::Error::msg)?;
        return Ok((out, bundle.name));
    }
    let bytes =
        std::fs::read(path).with_context(|| format!("{} cannot be read", path.display()))?;
    let tmp = std::env::temp_dir().join(format!(
        "muster-deploy-{}-{}",
        std::process::id(),
        muster_core::Uuid::now_v7()
    ));
    let res = archive::unpack(&bytes[..], &tmp, &archive::Limits::default())
        .map_err(|e| anyhow!("{}: {e}", path.display()))
        .and_then(|u| Bundle::load(&u.root).map_err(|e| anyhow!("{}: {e}", path.display())));
    let _ = std::fs::remove_dir_all(&tmp);
    Ok((bytes, res?.name))
}

fn deploy(a: DeployArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let (body, name) = packed(&a.bundle)?;
    let ws = match &a.workspace {
        Some(w) => w.clone(),
        None => default_workspace(&client)?,
    };
    let req = ureq::http::Request::builder()
        .method("POST")
        .uri(client.url(&model_url(&ws, &name)))
        .header("Content-Type", "application/gzip")
        .header(
            "Authorization",
            format!("Bearer {}", client.token.clone().unwrap_or_default()),
        )
        .body(body)?;
    let resp = client
        .agent
        .run(req)
        .map_err(|e| client.transport_error(e))?;
    let made = json_body(resp)?;
    let version = made["version"].as_u64().unwrap_or(0);
    let tree = text(&made["tree"]);
    if a.no_wait {
        if a.json {
            println!("{}", serde_json::to_string_pretty(&made)?);
        } else {
            println!("{ws}/{name} v{version}: deploying (tree {tree})");
        }
        return Ok(());
    }
    let ok = follow(&client, &tree, &ws, &name, version, a.json)?;
    let m = client.get_json(&model_url(&ws, &name), &[])?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&m)?);
    }
    let v = m["versions"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["version"].as_u64() == Some(version)))
        .cloned()
        .unwrap_or(Value::Null);
    if ok && v["state"] == "live" {
        if !a.json {
            println!("{ws}/{name} v{version} is live (tree {tree})");
        }
        Ok(())
    } else {
        let why = v["error"]
            .as_str()
            .unwrap_or("the deploy tree did not succeed");
        bail!(
            "the deploy of {ws}/{name} v{version} failed: {why}; the version before it (if any) still serves (see `muster jobs tree {tree}`)"
        )
    }
}

/// Follows a deploy tree to its end with a progress bar of its steps (hidden when stdout is
/// not a terminal, or with `--json`); answers whether it succeeded.
fn follow(
    client: &Client,
    tree: &str,
    ws: &str,
    name: &str,
    version: u64,
    quiet: bool,
) -> Result<bool> {
    let steps = ["prepare", "start", "health", "switch", "drain", "stop"];
    let bar = if quiet || !std::io::stdout().is_terminal() {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new(steps.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{prefix} [{bar:24}] {pos}/{len} {wide_msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b.set_prefix(format!("{ws}/{name} v{version}"));
        b.enable_steady_tick(Duration::from_millis(200));
        b
    };
    loop {
        let t = client.get_json(&format!("/api/v1/jobs/{}/tree", seg(tree)), &[])?;
        let jobs: Vec<&Value> = t["children"]
            .as_array()
            .map(|c| c.iter().collect())
            .unwrap_or_default();
        let done = jobs.iter().filter(|j| j["state"] == "succeeded").count();
        bar.set_position(done as u64);
        if let Some(j) = jobs.iter().find(|j| j["state"] == "running") {
            let key = text(&j["key"]);
            // The running step's last log line: the environment build's progress, say.
            let line = client
                .get(
                    &format!("/api/v1/jobs/{}/log", seg(&text(&j["id"]))),
                    &[("tail", "400".into())],
                )
                .ok()
                .filter(|r| r.status().is_success())
                .and_then(|mut r| read_text(&mut r).ok())
                .and_then(|s| {
                    s.lines()
                        .rev()
                        .find(|l| !l.trim().is_empty())
                        .map(str::to_string)
                })
                .unwrap_or_default();
            bar.set_message(format!(
                "{key}: {}",
                line.chars().take(100).collect::<String>()
            ));
        }
        match t["tree_state"].as_str() {
            Some("running") | None => std::thread::sleep(POLL),
            Some(s) => {
                bar.finish_and_clear();
                return Ok(s == "succeeded");
            }
        }
    }
}

fn ls(a: ModelsLsArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let v = client.get_json("/api/v1/models", &[])?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if items(&v).is_empty() {
        eprintln!("muster: no models (deploy one: muster models deploy DIR)");
        return Ok(());
    }
    let mut rows = vec![["MODEL", "LIVE", "VERSIONS", "REPLICAS", "LAST", "UPDATED"]
        .map(String::from)
        .to_vec()];
    for m in items(&v) {
        rows.push(vec![
            format!("{}/{}", text(&m["workspace"]), text(&m["name"])),
            m["live"].as_u64().map_or("-".into(), |n| format!("v{n}")),
            text(&m["versions"]),
            text(&m["replicas"]),
            format!("v{} {}", text(&m["last_version"]), text(&m["state"])),
            since(&m["updated_at"]),
        ]);
    }
    print_table(&rows);
    Ok(())
}

fn show(a: ModelArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let (ws, name) = model_path(&client, &a.model)?;
    let m = client.get_json(&model_url(&ws, &name), &[])?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&m)?);
        return Ok(());
    }
    println!(
        "{ws}/{name}  runtime {}  live {}",
        text(&m["runtime"]),
        m["live"].as_u64().map_or("-".into(), |n| format!("v{n}"))
    );
    let mut rows = vec![
        ["VERSION", "STATE", "CREATED", "BY", "NODE", "TREE", "ERROR"]
            .map(String::from)
            .to_vec(),
    ];
    for v in m["versions"].as_array().into_iter().flatten() {
        rows.push(vec![
            format!("v{}", text(&v["version"])),
            text(&v["state"]),
            since(&v["created_at"]),
            text(&v["created_by"]),
            text(&v["node"]),
            text(&v["tree"]),
            text(&v["error"]),
        ]);
    }
    print_table(&rows);
    let replicas = m["replicas"].as_array().cloned().unwrap_or_default();
    if !replicas.is_empty() {
        println!();
        let mut rows = vec![[
            "VERSION", "PROCESS", "STATE", "NODE", "ADDRESS", "REQUESTS", "P50", "P99",
        ]
        .map(String::from)
        .to_vec()];
        for r in replicas {
            let ms = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x}ms"));
            rows.push(vec![
                format!("v{}", text(&r["version"])),
                text(&r["process"]),
                text(&r["state"]),
                text(&r["node"]),
                text(&r["address"]),
                text(&r["requests"]),
                ms(&r["p50_ms"]),
                ms(&r["p99_ms"]),
            ]);
        }
        print_table(&rows);
    }
    Ok(())
}

fn predict(a: PredictArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let (ws, name) = model_path(&client, &a.model)?;
    let text = match a.data.strip_prefix('@') {
        Some("-") => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s)?;
            s
        }
        Some(f) => {
            std::fs::read_to_string(f).with_context(|| format!("--data @{f} cannot be read"))?
        }
        None => a.data.clone(),
    };
    let data: Value = serde_json::from_str(&text)
        .map_err(|e| anyhow!("--data is not JSON ({e}): give JSON text or @FILE"))?;
    let mut path = format!("{}/predict", model_url(&ws, &name));
    if let Some(v) = a.version {
        path.push_str(&format!("?version={v}"));
    }
    let (_, out) = client.post_json(&path, &json!({ "data": data }), &[])?;
    println!("{}", serde_json::to_string(&out["result"])?);
    Ok(())
}

fn revert(a: RevertArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let (ws, name) = model_path(&client, &a.model)?;
    let (_, made) = client.post_json(
        &format!("{}/revert", model_url(&ws, &name)),
        &json!({"version": a.version}),
        &[],
    )?;
    let tree = text(&made["tree"]);
    if a.no_wait {
        println!("{ws}/{name}: reverting to v{} (tree {tree})", a.version);
        return Ok(());
    }
    let ok = follow(&client, &tree, &ws, &name, a.version as u64, a.json)?;
    let m = client.get_json(&model_url(&ws, &name), &[])?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&m)?);
    }
    if ok && m["live"].as_u64() == Some(a.version as u64) {
        if !a.json {
            println!("{ws}/{name} v{} is live again (tree {tree})", a.version);
        }
        Ok(())
    } else {
        bail!(
            "the revert of {ws}/{name} to v{} failed (see `muster jobs tree {tree}`)",
            a.version
        )
    }
}

fn rm(a: ModelArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let (ws, name) = model_path(&client, &a.model)?;
    let v = json_body(client.delete(&model_url(&ws, &name))?)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{ws}/{name}: deleted (the reaper removes its processes and files)");
    }
    Ok(())
}

fn logs(a: ModelLogsArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let (ws, name) = model_path(&client, &a.model)?;
    let m = client.get_json(&model_url(&ws, &name), &[])?;
    let Some(n) = a.version.map(u64::from).or_else(|| m["live"].as_u64()) else {
        bail!("{ws}/{name} has no live version: name one with --version N");
    };
    let v = m["versions"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["version"].as_u64() == Some(n)))
        .ok_or_else(|| anyhow!("{ws}/{name} has no version {n}"))?;
    let ids: Vec<String> = v["processes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(text)
        .collect();
    if ids.is_empty() {
        bail!("{ws}/{name} v{n} has no predictors (yet)");
    }
    for (i, id) in ids.iter().enumerate() {
        let path = format!("/api/v1/processes/{}/log", seg(id));
        if a.follow {
            let resp = client.get(&path, &[("follow", "true".into())])?;
            if !resp.status().is_success() {
                return Err(http_error(resp));
            }
            return stream_to_stdout(resp);
        }
        if ids.len() > 1 {
            println!("==> v{n} r{} ({id}) <==", i + 1);
        }
        let resp = client.get(&path, &[])?;
        if !resp.status().is_success() {
            return Err(http_error(resp));
        }
        stream_to_stdout(resp)?;
    }
    Ok(())
}

fn step(a: StepArgs) -> Result<()> {
    if a.step == "prepare" {
        return prepare(a);
    }
    if a.step == "gc" {
        return gc(a);
    }
    let client = authed_client(&a.server)?;
    let path = format!(
        "{}/versions/{}/steps/{}",
        model_url(&a.workspace, &a.model),
        a.version,
        seg(&a.step)
    );
    let mut resp = client.post(&path, &json!({}), &[])?;
    if !resp.status().is_success() {
        return Err(http_error(resp));
    }
    let reader = std::io::BufReader::new(resp.body_mut().as_reader());
    let mut last = String::new();
    for line in reader.lines() {
        let line = line.context("the server's answer broke off")?;
        println!("{line}");
        last = line;
    }
    if last == "ok" {
        Ok(())
    } else {
        bail!(
            "{}",
            last.strip_prefix("error: ")
                .unwrap_or("the server's answer ended before the step did")
        )
    }
}

/// `prepare`: the version's archive fetched and unpacked under the node's data dir, its
/// environment built or reused (progress on stdout, the job's log); the last line is the
/// placement as JSON (the job's result).
fn prepare(a: StepArgs) -> Result<()> {
    let node_dir = std::env::var_os("MUSTER_NODE_DIR")
        .map(PathBuf::from)
        .context("MUSTER_NODE_DIR is not set: this step runs as a job of a deploy tree")?;
    let models = node_dir.join("models");
    let dest = models
        .join("bundles")
        .join(&a.workspace)
        .join(&a.model)
        .join(a.version.to_string());
    let root = match find_bundle(&dest) {
        Some(root) => {
            println!("bundle: already unpacked at {}", root.display());
            root
        }
        None => {
            let _ = std::fs::remove_dir_all(&dest);
            std::fs::create_dir_all(dest.parent().unwrap_or(&models))?;
            let client = authed_client(&a.server)?;
            let path = format!(
                "{}/versions/{}/bundle",
                model_url(&a.workspace, &a.model),
                a.version
            );
            let mut resp = client.get(&path, &[])?;
            if !resp.status().is_success() {
                return Err(http_error(resp));
            }
            let u = archive::unpack(
                resp.body_mut().with_config().limit(u64::MAX).reader(),
                &dest,
                &archive::Limits::default(),
            )
            .map_err(anyhow::Error::msg)?;
            println!(
                "bundle: {} entries, {} bytes unpacked at {}",
                u.entries,
                u.bytes,
                u.root.display()
            );
            u.root
        }
    };
    let bundle = Bundle::load(&root).map_err(anyhow::Error::msg)?;
    let envs = Envs::new(
        a.envs.unwrap_or_else(|| models.join("envs")),
        a.wheels.unwrap_or_else(|| models.join("wheels")),
    );
    let mut out = std::io::stdout();
    let env = if bundle.runtime == muster_models::Runtime::R {
        muster_models::r::ensure(&envs.root, &bundle, &mut out).map_err(anyhow::Error::msg)?
    } else if bundle.runtime == muster_models::Runtime::Onnx {
        onnx_env(&envs, a.onnxruntime_lib.clone(), &mut out)?
    } else {
        let python =
            Interpreter::probe(std::path::Path::new("python3")).map_err(anyhow::Error::msg)?;
        println!(
            "python: {} {}",
            python.executable.display(),
            python.version_text()
        );
        envs.ensure_bundle(&bundle, &python, &mut out)
            .map_err(anyhow::Error::msg)?
    };
    let placement = json!({
        "node": std::env::var("MUSTER_NODE_NAME").unwrap_or_default(),
        "bundle_dir": root, "env_dir": env.dir, "env_key": env.key, "env_reused": env.reused,
    });
    println!("{}", serde_json::to_string(&placement)?);
    Ok(())
}

/// The onnx runtime's environment: the library `[models] onnxruntime_lib` (`--onnxruntime-lib`)
/// or else `ORT_DYLIB_PATH` names (checked now, and noted as `library` in an environment of its
/// own that the predictor reads), else the `onnxruntime` wheel installed `--no-deps` once per
/// node into a cached environment.
fn onnx_env(
    envs: &Envs,
    configured: Option<PathBuf>,
    out: &mut dyn Write,
) -> Result<muster_models::PythonEnv> {
    let named = configured
        .filter(|p| !p.as_os_str().is_empty())
        .map(|p| (p, "[models] onnxruntime_lib"))
        .or_else(|| {
            std::env::var_os("ORT_DYLIB_PATH")
                .filter(|p| !p.is_empty())
                .map(|p| (PathBuf::from(p), "ORT_DYLIB_PATH"))
        });
    if let Some((lib, from)) = named {
        muster_models::onnx::init(&lib)
            .map_err(|e| anyhow::anyhow!("{from} = {}: {e}", lib.display()))?;
        let key = muster_models::onnx::library_env_key(&lib);
        let dir = envs.root.join(&key);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("library"), lib.to_string_lossy().as_bytes())?;
        writeln!(out, "ONNX Runtime: {} ({from})", lib.display())?;
        return Ok(muster_models::PythonEnv {
            key,
            dir,
            reused: true,
        });
    }
    let python = Interpreter::probe(std::path::Path::new("python3")).map_err(anyhow::Error::msg)?;
    let spec = muster_models::EnvSpec {
        requirements: vec![],
        no_deps: vec![muster_models::onnx::RUNTIME_REQUIREMENT.into()],
    };
    let env = envs
        .ensure(&spec, &python, out)
        .map_err(anyhow::Error::msg)?;
    let lib = muster_models::onnx::find_library(&env.dir).with_context(|| {
        format!(
            "the onnxruntime wheel in {} has no libonnxruntime.so",
            env.dir.display()
        )
    })?;
    muster_models::onnx::init(&lib).map_err(anyhow::Error::msg)?;
    writeln!(out, "ONNX Runtime: {}", lib.display())?;
    Ok(env)
}

/// `yhat-batch-run`: unpacks the bundle (base64 of a `.tar.gz` on stdin) into a scratch
/// directory of the node, builds its environment as `prepare` does (cached by hash), and runs its
/// `run.py` once with that Python: its output is the job's log, its exit the job's.
fn yhat_batch_run(a: YhatBatchArgs) -> Result<()> {
    let node_dir = std::env::var_os("MUSTER_NODE_DIR")
        .map(PathBuf::from)
        .context("MUSTER_NODE_DIR is not set: this step runs as a job")?;
    let models = node_dir.join("models");
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
    let text: String = text.split_whitespace().collect();
    let packed = muster_models::yhat::base64_decode(&text)
        .context("the batch job's bundle on standard input is not base64")?;
    let scratch = models.join("tmp");
    std::fs::create_dir_all(&scratch)?;
    let dest = scratch.join(format!("yhat-batch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dest);
    struct Gone(PathBuf);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _gone = Gone(dest.clone());
    let u = archive::unpack(&packed[..], &dest, &archive::Limits::default())
        .map_err(anyhow::Error::msg)?;
    let bundle = Bundle::load(&u.root).map_err(anyhow::Error::msg)?;
    let envs = Envs::new(
        a.envs.unwrap_or_else(|| models.join("envs")),
        a.wheels.unwrap_or_else(|| models.join("wheels")),
    );
    let python = Interpreter::probe(std::path::Path::new("python3")).map_err(anyhow::Error::msg)?;
    let env = envs
        .ensure_bundle(&bundle, &python, &mut std::io::stderr())
        .map_err(anyhow::Error::msg)?;
    println!("yhat batch job {}: running execute()", bundle.name);
    std::io::stdout().flush()?;
    let st = std::process::Command::new(env.python())
        .arg(u.root.join(muster_models::yhat::BATCH_RUNNER))
        .current_dir(&u.root)
        .env("PYTHONUNBUFFERED", "1")
        .status()
        .context("running the batch job's Python")?;
    if !st.success() {
        bail!("the batch job's execute() failed ({st})");
    }
    Ok(())
}

/// `gc` (the reaper's clean-up job): removes each `--remove` directory that lies under this
/// node's model directories (`$MUSTER_NODE_DIR/models`, or `--envs`), and nothing else.
fn gc(a: StepArgs) -> Result<()> {
    let node_dir = std::env::var_os("MUSTER_NODE_DIR")
        .map(PathBuf::from)
        .context("MUSTER_NODE_DIR is not set: this step runs as a job of the reaper")?;
    let mut roots = vec![node_dir.join("models")];
    roots.extend(a.envs.clone());
    let roots: Vec<PathBuf> = roots.iter().filter_map(|r| r.canonicalize().ok()).collect();
    let mut failed = 0;
    for p in &a.remove {
        let Ok(real) = p.canonicalize() else {
            println!("{}: already gone", p.display());
            continue;
        };
        if !roots.iter().any(|r| real.starts_with(r) && real != *r) {
            println!(
                "{}: not under this node's model directories; left alone",
                p.display()
            );
            failed += 1;
            continue;
        }
        match std::fs::remove_dir_all(&real) {
            Ok(()) => println!("{}: removed", p.display()),
            Err(e) => {
                println!("{}: {e}", p.display());
                failed += 1;
            }
        }
    }
    if failed > 0 {
        bail!("{failed} path(s) not removed");
    }
    Ok(())
}

/// The unpacked bundle at `dest`, if a valid one is there.
fn find_bundle(dest: &std::path::Path) -> Option<PathBuf> {
    let root = if dest.join("bundle.json").is_file() {
        dest.to_path_buf()
    } else {
        let mut dirs = std::fs::read_dir(dest).ok()?.flatten();
        let only = dirs.next()?;
        if dirs.next().is_some() {
            return None;
        }
        only.path()
    };
    Bundle::load(&root).ok().map(|_| root)
}

/// A reader that counts what was read into a progress bar.
struct Counting<R> {
    inner: R,
    bar: indicatif::ProgressBar,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

fn bar_style(template: &str) -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template(template)
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ")
}

fn batch(a: BatchArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let (ws, name) = model_path(&client, &a.model)?;
    let show = std::io::stderr().is_terminal();
    let mut query = vec![
        format!("on_error={}", seg(&a.on_error)),
        format!("shape={}", seg(&a.shape)),
        format!("output={}", seg(&a.columns)),
    ];
    if let Some(n) = a.chunk_rows {
        query.push(format!("chunk_rows={n}"));
    }
    if let Some(v) = a.version {
        query.push(format!("version={v}"));
    }
    let url = client.url(&format!(
        "{}/batch?{}",
        model_url(&ws, &name),
        query.join("&")
    ));
    let (input, len): (Box<dyn Read>, Option<u64>) = if a.input.as_os_str() == "-" {
        (Box::new(std::io::stdin()), None)
    } else {
        let f = std::fs::File::open(&a.input)
            .with_context(|| format!("{} cannot be read", a.input.display()))?;
        let len = f.metadata().ok().map(|m| m.len());
        (Box::new(f), len)
    };
    let up = if !show {
        indicatif::ProgressBar::hidden()
    } else if let Some(len) = len {
        let b = indicatif::ProgressBar::new(len);
        b.set_style(bar_style(
            "upload [{bar:24}] {bytes}/{total_bytes} {bytes_per_sec}",
        ));
        b
    } else {
        indicatif::ProgressBar::new_spinner()
    };
    let mut reader = Counting {
        inner: std::io::BufReader::with_capacity(256 << 10, input),
        bar: up.clone(),
    };
    let req = ureq::http::Request::builder()
        .method("POST")
        .uri(url)
        .header("Content-Type", "text/csv")
        .header(
            "Authorization",
            format!("Bearer {}", client.token.clone().unwrap_or_default()),
        )
        .body(ureq::SendBody::from_reader(&mut reader))?;
    let resp = client
        .agent
        .run(req)
        .map_err(|e| client.transport_error(e))?;
    up.finish_and_clear();
    let made = json_body(resp)?;
    let tree = text(&made["tree"]);
    let total = made["batch"]["rows_total"].as_u64().unwrap_or(0);
    if a.no_wait {
        println!("{}", serde_json::to_string_pretty(&made)?);
        return Ok(());
    }
    let bar = if show {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(bar_style(
            "{prefix} [{bar:24}] {pos}/{len} rows {per_sec} {wide_msg}",
        ));
        b.set_prefix(format!("{ws}/{name}"));
        b.enable_steady_tick(Duration::from_millis(200));
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let batch_url = format!("{}/batches/{}", model_url(&ws, &name), seg(&tree));
    loop {
        let b = client.get_json(&batch_url, &[])?;
        bar.set_position(b["rows_done"].as_u64().unwrap_or(0));
        let t = client.get_json(&format!("/api/v1/jobs/{}/tree", seg(&tree)), &[])?;
        match t["tree_state"].as_str() {
            Some("succeeded") => break,
            Some("failed" | "aborted") => {
                bar.finish_and_clear();
                // The first failed job's error says why.
                let why = t["children"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|j| j["state"] == "failed")
                    .map(|j| {
                        let log = client
                            .get(
                                &format!("/api/v1/jobs/{}/log", seg(&text(&j["id"]))),
                                &[("tail", "400".into())],
                            )
                            .ok()
                            .filter(|r| r.status().is_success())
                            .and_then(|mut r| read_text(&mut r).ok())
                            .unwrap_or_default();
                        let last = log
                            .lines()
                            .rev()
                            .find(|l| !l.trim().is_empty())
                            .unwrap_or("")
                            .to_string();
                        format!("{}: {last}", text(&j["name"]))
                    })
                    .unwrap_or_else(|| "the batch tree did not succeed".into());
                bail!("the batch {tree} failed: {why} (see `muster jobs tree {tree}`)");
            }
            _ => std::thread::sleep(POLL),
        }
    }
    bar.finish_and_clear();
    let mut resp = client.get(&format!("/api/v1/jobs/{}/result", seg(&tree)), &[])?;
    if !resp.status().is_success() {
        return Err(http_error(resp));
    }
    let mut body = resp.body_mut().with_config().limit(u64::MAX).reader();
    match &a.output {
        Some(p) => {
            let tmp = p.with_extension("part");
            let mut f = std::fs::File::create(&tmp)
                .with_context(|| format!("{} cannot be written", tmp.display()))?;
            std::io::copy(&mut body, &mut f).context("the result broke off")?;
            f.sync_all()?;
            std::fs::rename(&tmp, p)?;
            eprintln!("{ws}/{name}: {total} rows scored into {}", p.display());
        }
        None => {
            let mut out = std::io::stdout().lock();
            std::io::copy(&mut body, &mut out).context("the result broke off")?;
        }
    }
    Ok(())
}

fn batch_step(a: BatchStepArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let base = format!(
        "{}/batches/{}",
        model_url(&a.workspace, &a.model),
        seg(&a.batch)
    );
    let path = match (a.what.as_str(), a.chunk) {
        ("chunk", Some(i)) => format!("{base}/chunks/{i}"),
        ("merge", None) => format!("{base}/merge"),
        _ => bail!("batch-step takes `chunk I` or `merge`"),
    };
    let (_, v) = client.post_json(&path, &json!({}), &[])?;
    // The last line is the job's result: the rows scored and the batch's progress.
    println!("{v}");
    Ok(())
}
