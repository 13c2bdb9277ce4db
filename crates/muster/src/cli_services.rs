//! `muster services …`: plan and apply HQ's services, list and show them; and `muster services
//! step`, what an apply tree's jobs run on the service's node.

use super::*;
use muster_models::archive;
use std::collections::BTreeMap;
use std::process::{Command, Stdio};

#[path = "cli_services_build.rs"]
mod build;

#[derive(Subcommand)]
pub enum ServicesCmd {
    /// List the services as recorded: status, node, last action, message.
    Ls(SvcListArgs),
    /// The same as `ls`.
    Status(SvcListArgs),
    /// Show one service (PATH: its directory under services/, e.g. demo__env__prod/demo__kv__main).
    Show(SvcPathArgs),
    /// Plan HQ's services at its head: install, reconfigure or reset per service, with the reason.
    Plan(SvcPlanArgs),
    /// Apply a plan (by id; without one: plan now and apply that), and follow its tree.
    Apply(SvcApplyArgs),
    /// Reset a service: stop it, run its reset action, remove its state dir and its record.
    Reset(SvcResetArgs),
    /// Run one action of a service on its node (e.g. `monitor`, `export`), and follow it.
    Action(SvcActionArgs),
    /// Run a service's export action and download the archive it made (-o FILE).
    Export(SvcExportArgs),
    /// Give a .tar.gz to a service's import action (unpacked in MUSTER_IMPORT_DIR on its node).
    Import(SvcImportArgs),
    /// A service's secrets (`${secrets.KEY}` in its service.toml): set from stdin, list, remove.
    #[command(subcommand)]
    Secret(SecretCmd),
    /// One step of an apply tree (run by the tree's jobs, not by hand).
    #[command(hide = true)]
    Step(SvcStepArgs),
}

#[derive(Subcommand)]
pub enum SecretCmd {
    /// Set secret KEY of service PATH to what stdin holds (one trailing newline dropped); the
    /// value is kept encrypted and never shown again.
    Set(SecretKeyArgs),
    /// List the secrets of service PATH (keys and versions, never values).
    Ls(SvcPathArgs),
    /// Remove secret KEY of service PATH.
    Rm(SecretKeyArgs),
}

#[derive(Args)]
pub struct SecretKeyArgs {
    #[command(flatten)]
    server: ServerOpt,
    path: String,
    key: String,
}

fn secret(cmd: SecretCmd) -> Result<()> {
    match cmd {
        SecretCmd::Set(a) => {
            let client = authed_client(&a.server)?;
            let mut value = String::new();
            std::io::stdin()
                .read_to_string(&mut value)
                .context("cannot read the value from stdin")?;
            if value.ends_with('\n') {
                value.pop();
                if value.ends_with('\r') {
                    value.pop();
                }
            }
            let resp = client.put(
                &format!("/api/v1/services/{}/secrets/{}", seg(&a.path), seg(&a.key)),
                &json!({"value": value}),
            )?;
            let v = json_body(resp)?;
            println!(
                "secret {} of {} set (version {})",
                a.key,
                a.path,
                text(&v["version"]).chars().take(12).collect::<String>()
            );
            Ok(())
        }
        SecretCmd::Ls(a) => {
            let client = authed_client(&a.server)?;
            let v = client.get_json(&format!("/api/v1/services/{}/secrets", seg(&a.path)), &[])?;
            for s in v["items"].as_array().into_iter().flatten() {
                println!(
                    "{}\t{}\t{}",
                    text(&s["key"]),
                    text(&s["version"]).chars().take(12).collect::<String>(),
                    text(&s["updated_by"])
                );
            }
            Ok(())
        }
        SecretCmd::Rm(a) => {
            let client = authed_client(&a.server)?;
            client.delete_ok(&format!(
                "/api/v1/services/{}/secrets/{}",
                seg(&a.path),
                seg(&a.key)
            ))?;
            println!("secret {} of {} removed", a.key, a.path);
            Ok(())
        }
    }
}

#[derive(Args)]
pub struct SvcListArgs {
    #[command(flatten)]
    server: ServerOpt,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct SvcPathArgs {
    #[command(flatten)]
    server: ServerOpt,
    path: String,
}

#[derive(Args)]
pub struct SvcPlanArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// Plan only this service (e.g. `demo__app__web`), what is under it and what it waits for.
    #[arg(long, value_name = "PATH")]
    only: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct SvcApplyArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// The plan's id (from `muster services plan`).
    plan: Option<String>,
    /// Answer once the tree is made; do not follow it.
    #[arg(long)]
    no_wait: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct SvcResetArgs {
    #[command(flatten)]
    server: ServerOpt,
    path: String,
    /// Reset the services that depend on it first (leaf-first).
    #[arg(long)]
    cascade: bool,
    /// Keep its dependencies even when nothing else uses them.
    #[arg(long)]
    keep_deps: bool,
    #[arg(long)]
    no_wait: bool,
}

#[derive(Args)]
pub struct SvcActionArgs {
    #[command(flatten)]
    server: ServerOpt,
    path: String,
    verb: String,
    #[arg(long)]
    no_wait: bool,
}

#[derive(Args)]
pub struct SvcExportArgs {
    #[command(flatten)]
    server: ServerOpt,
    path: String,
    /// Where to write the archive.
    #[arg(short, long)]
    output: PathBuf,
}

#[derive(Args)]
pub struct SvcImportArgs {
    #[command(flatten)]
    server: ServerOpt,
    path: String,
    /// A .tar.gz.
    archive: PathBuf,
}

#[derive(Args)]
pub struct SvcStepArgs {
    #[command(flatten)]
    server: ServerOpt,
    plan: String,
    key: String,
}

pub fn run(cmd: ServicesCmd) -> Result<()> {
    match cmd {
        ServicesCmd::Ls(a) | ServicesCmd::Status(a) => ls(a),
        ServicesCmd::Show(a) => show(a),
        ServicesCmd::Plan(a) => plan(a),
        ServicesCmd::Apply(a) => apply(a),
        ServicesCmd::Reset(a) => {
            let client = authed_client(&a.server)?;
            let (_, p) = client.post_json(
                &format!("/api/v1/services/{}/reset", seg(&a.path)),
                &json!({"cascade": a.cascade, "keep_deps": a.keep_deps}),
                &[],
            )?;
            run_tree(&client, &p, a.no_wait)
        }
        ServicesCmd::Action(a) => {
            let client = authed_client(&a.server)?;
            let (_, p) = client.post_json(
                &format!("/api/v1/services/{}/actions/{}", seg(&a.path), seg(&a.verb)),
                &json!({}),
                &[],
            )?;
            run_tree(&client, &p, a.no_wait)
        }
        ServicesCmd::Export(a) => export(a),
        ServicesCmd::Import(a) => {
            let client = authed_client(&a.server)?;
            let data = std::fs::read(&a.archive)
                .with_context(|| format!("cannot read {}", a.archive.display()))?;
            let req = ureq::http::Request::builder()
                .method("POST")
                .uri(client.url(&format!("/api/v1/services/{}/import", seg(&a.path))))
                .header("Content-Type", "application/gzip")
                .header(
                    "Authorization",
                    format!("Bearer {}", client.token.clone().unwrap_or_default()),
                )
                .body(data)?;
            let resp = client
                .agent
                .run(req)
                .map_err(|e| client.transport_error(e))?;
            let p = json_body(resp)?;
            run_tree(&client, &p, false)
        }
        ServicesCmd::Secret(c) => secret(c),
        ServicesCmd::Step(a) => step(a),
    }
}

fn export(a: SvcExportArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let (_, p) = client.post_json(
        &format!("/api/v1/services/{}/actions/export", seg(&a.path)),
        &json!({}),
        &[],
    )?;
    run_tree(&client, &p, false)?;
    // The export this tree's job made.
    let rec = client.get_json(&format!("/api/v1/services/{}", seg(&a.path)), &[])?;
    let tree = text(&p["tree"]);
    let jobs = client.get_json(&format!("/api/v1/jobs/{}/tree", seg(&tree)), &[])?;
    let mine: Vec<String> = all_jobs(&jobs).iter().map(|j| text(&j["id"])).collect();
    let e = rec["exports"]
        .as_array()
        .and_then(|x| x.iter().rev().find(|e| mine.contains(&text(&e["job"]))))
        .ok_or_else(|| anyhow!("the export's archive was not recorded"))?;
    let mut resp = client.get(
        &format!(
            "/api/v1/services/{}/exports/{}",
            seg(&a.path),
            seg(&text(&e["id"]))
        ),
        &[],
    )?;
    if !resp.status().is_success() {
        return Err(http_error(resp));
    }
    let mut f = std::fs::File::create(&a.output)
        .with_context(|| format!("cannot write {}", a.output.display()))?;
    std::io::copy(&mut resp.body_mut().as_reader(), &mut f)?;
    println!(
        "export {} written to {}",
        text(&e["id"]),
        a.output.display()
    );
    Ok(())
}

/// Prints a reset's or an action's steps and follows its tree.
fn run_tree(client: &Client, p: &Value, no_wait: bool) -> Result<()> {
    print_plan(p);
    let tree = text(&p["tree"]);
    println!("in tree {tree}");
    if no_wait {
        return Ok(());
    }
    let state = follow_tree(client, &tree)?;
    finish(&tree, &state)
}

fn ls(a: SvcListArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let v = client.get_json("/api/v1/services", &[])?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let mut rows = vec![vec![
        "PATH".into(),
        "STATUS".into(),
        "NODE".into(),
        "LAST".into(),
        "UPDATED".into(),
        "MESSAGE".into(),
    ]];
    for s in items(&v) {
        rows.push(vec![
            text(&s["path"]),
            text(&s["status"]),
            text(&s["node"]),
            text(&s["last_action"]),
            short_time(&s["updated_at"]),
            text(&s["message"]),
        ]);
    }
    print_table(&rows);
    Ok(())
}

fn show(a: SvcPathArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let v = client.get_json(&format!("/api/v1/services/{}", seg(&a.path)), &[])?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

fn print_plan(p: &Value) {
    let steps = p["steps"].as_array().map(|s| s.as_slice()).unwrap_or(&[]);
    let commit = p["commit"].as_str().unwrap_or("");
    println!(
        "plan {} at HQ commit {}: {} step(s), {} unchanged",
        text(&p["id"]),
        &commit[..commit.len().min(12)],
        steps.len(),
        p["unchanged"].as_array().map_or(0, |u| u.len())
    );
    if steps.is_empty() {
        return;
    }
    let mut rows = vec![vec![
        "ACTION".into(),
        "PATH".into(),
        "NODE".into(),
        "REASON".into(),
    ]];
    for s in steps {
        let mut reason = text(&s["reason"]);
        if let Some(b) = s["build"].as_str() {
            reason.push_str(&format!(" (build: {b})"));
        }
        rows.push(vec![
            text(&s["action"]),
            text(&s["path"]),
            text(&s["node"]),
            reason,
        ]);
    }
    print_table(&rows);
}

fn plan(a: SvcPlanArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let body = match &a.only {
        Some(p) => json!({ "only": p }),
        None => json!({}),
    };
    let (_, p) = client.post_json("/api/v1/services/plan", &body, &[])?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else {
        print_plan(&p);
    }
    Ok(())
}

fn apply(a: SvcApplyArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let id = match &a.plan {
        Some(id) => id.clone(),
        None => {
            let (_, p) = client.post_json("/api/v1/services/plan", &json!({}), &[])?;
            if !a.json {
                print_plan(&p);
            }
            text(&p["id"])
        }
    };
    let (_, p) = client.post_json("/api/v1/services/apply", &json!({"plan": id}), &[])?;
    let Some(tree) = p["tree"].as_str().map(str::to_string) else {
        if a.json {
            println!("{}", serde_json::to_string_pretty(&p)?);
        } else {
            println!("nothing to do");
        }
        return Ok(());
    };
    if a.no_wait {
        if a.json {
            println!("{}", serde_json::to_string_pretty(&p)?);
        } else {
            println!("applying in tree {tree}");
        }
        return Ok(());
    }
    let state = if a.json {
        wait_tree(&client, &tree)?
    } else {
        println!("applying in tree {tree}");
        follow_tree(&client, &tree)?
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"plan": p, "tree_state": state}))?
        );
    }
    finish(&tree, &state)
}

// ---------------------------------------------------------------------------------------------
// step: on the node

/// The shim that runs one function of an `actions.py` (the source design's own form).
const PY_SHIM: &str = r#"
import builtins, importlib.util, json, sys
class RetryLater(Exception):
    pass
builtins.RetryLater = RetryLater
path, verb = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location("actions", path)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
ctx = json.load(sys.stdin)
try:
    out = getattr(mod, verb)(ctx)
except RetryLater as e:
    print("retry later: %s" % e, file=sys.stderr)
    sys.exit(75)
if out is not None:
    print(json.dumps(out))
"#;

/// How an action ended.
enum Ran {
    /// No action for the verb.
    Missing,
    /// Exit 0; its last stdout line if that was a JSON object.
    Done(Option<Value>),
}

/// Tries to exit 75 this many times before the step fails.
const RETRIES: u32 = 6;

/// What the job log must never show: the secret values a step was given, each replaced by
/// `***` (as given, and as JSON would escape it).
#[derive(Clone, Default)]
struct Mask(Vec<String>);

impl Mask {
    fn new(values: impl IntoIterator<Item = String>) -> Mask {
        let mut v: Vec<String> = Vec::new();
        for s in values {
            if s.is_empty() {
                continue;
            }
            let escaped = serde_json::to_string(&s).unwrap_or_default();
            let escaped = escaped[1..escaped.len().saturating_sub(1).max(1)].to_string();
            if escaped != s && !escaped.is_empty() {
                v.push(escaped);
            }
            v.push(s);
        }
        // Longest first, so a value containing another is masked whole.
        v.sort_by_key(|s| std::cmp::Reverse(s.len()));
        v.dedup();
        Mask(v)
    }

    fn apply(&self, line: &str) -> String {
        let mut out = line.to_string();
        for s in &self.0 {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "***");
            }
        }
        out
    }
}

/// `v` with each `${secrets.KEY}` in its strings replaced by the value (a string that is
/// exactly one reference becomes the value).
fn fill_secrets(v: &mut Value, values: &BTreeMap<String, String>) {
    match v {
        Value::String(s) if s.contains("${") => {
            let mut out = String::new();
            let mut rest = s.as_str();
            while let Some(i) = rest.find("${") {
                out.push_str(&rest[..i]);
                let after = &rest[i + 2..];
                let Some(j) = after.find('}') else {
                    out.push_str(&rest[i..]);
                    rest = "";
                    break;
                };
                let r = after[..j].trim();
                match r.strip_prefix("secrets.").and_then(|k| values.get(k)) {
                    Some(val) => out.push_str(val),
                    None => out.push_str(&rest[i..i + 2 + j + 1]),
                }
                rest = &after[j + 1..];
            }
            out.push_str(rest);
            *s = out;
        }
        Value::Array(a) => a.iter_mut().for_each(|x| fill_secrets(x, values)),
        Value::Object(m) => m.values_mut().for_each(|x| fill_secrets(x, values)),
        _ => {}
    }
}

fn run_action(
    dir: &Path,
    verb: &str,
    ctx: &Value,
    env: &[(String, String)],
    mask: &Mask,
) -> Result<Ran> {
    let file = dir.join("actions").join(verb);
    let py = dir.join("actions.py");
    let mut cmd = if file.is_file() {
        Command::new(&file)
    } else if py.is_file()
        && std::fs::read_to_string(&py)
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with(&format!("def {verb}(")))
    {
        let mut c = Command::new("python3");
        c.arg("-c").arg(PY_SHIM).arg(&py).arg(verb);
        c
    } else {
        return Ok(Ran::Missing);
    };
    cmd.current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(if mask.0.is_empty() {
            Stdio::inherit()
        } else {
            Stdio::piped()
        });
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.env("MUSTER_ACTION", verb);
    let mut delay = Duration::from_secs(1);
    for attempt in 1..=RETRIES {
        println!("action {verb}: run (attempt {attempt})");
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot run action {verb}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            let text = serde_json::to_string(ctx)?;
            // An action that reads nothing closes its stdin early: that is fine.
            let _ = stdin.write_all(text.as_bytes());
        }
        // Stderr masked on a thread of its own (when piped: there are secrets).
        let errs = child.stderr.take().map(|err| {
            let m = mask.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(err).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("{}", m.apply(&line));
                }
            })
        });
        let mut last = String::new();
        if let Some(out) = child.stdout.take() {
            for line in std::io::BufReader::new(out).lines() {
                let line = mask.apply(&line.unwrap_or_default());
                println!("{line}");
                if !line.trim().is_empty() {
                    last = line;
                }
            }
        }
        let status = child.wait()?;
        if let Some(t) = errs {
            let _ = t.join();
        }
        match status.code() {
            Some(0) => {
                let v = serde_json::from_str::<Value>(last.trim())
                    .ok()
                    .filter(|v| v.is_object());
                return Ok(Ran::Done(v));
            }
            Some(75) if attempt < RETRIES => {
                println!(
                    "action {verb}: asks to retry later (exit 75); again in {}s",
                    delay.as_secs()
                );
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(30));
            }
            Some(75) => bail!("action {verb} still asked to retry later after {RETRIES} attempts"),
            Some(c) => bail!("action {verb} failed with exit code {c}"),
            None => bail!("action {verb} was killed by a signal"),
        }
    }
    unreachable!("the loop returns or fails")
}

/// Downloads the `.tar.gz` at `path` and unpacks it into `dir` (no path or link out of it,
/// bounded sizes).
fn fetch_unpack(client: &Client, path: &str, dir: &Path) -> Result<archive::Unpacked> {
    let mut resp = client.get(path, &[])?;
    if !resp.status().is_success() {
        return Err(http_error(resp));
    }
    archive::unpack(
        resp.body_mut().with_config().limit(u64::MAX).reader(),
        dir,
        &archive::Limits::default(),
    )
    .map_err(anyhow::Error::msg)
}

/// Uploads a `.tar.gz` to `path`; the JSON answer.
fn post_gzip(client: &Client, path: &str, packed: Vec<u8>) -> Result<Value> {
    let req = ureq::http::Request::builder()
        .method("POST")
        .uri(client.url(path))
        .header("Content-Type", "application/gzip")
        .header(
            "Authorization",
            format!("Bearer {}", client.token.clone().unwrap_or_default()),
        )
        .body(packed)?;
    let resp = client
        .agent
        .run(req)
        .map_err(|e| client.transport_error(e))?;
    json_body(resp)
}

fn step(a: SvcStepArgs) -> Result<()> {
    let node_dir = std::env::var_os("MUSTER_NODE_DIR")
        .map(PathBuf::from)
        .context("MUSTER_NODE_DIR is not set: this step runs as a job of an apply tree")?;
    let client = authed_client(&a.server)?;
    let base = format!(
        "/api/v1/services/plans/{}/steps/{}",
        seg(&a.plan),
        seg(&a.key)
    );
    let info = client.get_json(&base, &[])?;
    let path = text(&info["path"]);
    let action = text(&info["action"]);
    println!(
        "service {path}: {action} ({})",
        text(&info["context"]["reason"])
    );
    let root = node_dir.join("services");
    let state_dir = root.join("state").join(path.replace('/', "+"));
    // The service directory: its archive unpacked once per content.
    let dir = match info["archive"].as_str() {
        Some(blob) => {
            let d = root.join("dirs").join(blob);
            if !d.is_dir() {
                std::fs::create_dir_all(root.join("dirs"))?;
                let tmp = root
                    .join("dirs")
                    .join(format!(".{blob}.{}", std::process::id()));
                let _ = std::fs::remove_dir_all(&tmp);
                fetch_unpack(&client, &format!("{base}/archive"), &tmp)?;
                if std::fs::rename(&tmp, &d).is_err() {
                    // Another step unpacked the same content meanwhile.
                    let _ = std::fs::remove_dir_all(&tmp);
                }
                println!("service directory unpacked at {}", d.display());
            }
            Some(d)
        }
        None => None,
    };
    if action != "reset" {
        std::fs::create_dir_all(&state_dir)
            .with_context(|| format!("cannot make {}", state_dir.display()))?;
    }
    let env: Vec<(String, String)> = vec![
        ("MUSTER_SERVICE".into(), path.clone()),
        (
            "MUSTER_STATE_DIR".into(),
            state_dir.to_string_lossy().into_owned(),
        ),
        (
            "MUSTER_SERVICE_DIR".into(),
            dir.as_ref()
                .map(|d| d.to_string_lossy().into_owned())
                .unwrap_or_default(),
        ),
        ("MUSTER_PLAN".into(), a.plan.clone()),
        // Where a [build]'s artifacts are, once installed.
        (
            "MUSTER_ARTIFACTS_DIR".into(),
            state_dir.join("artifacts").to_string_lossy().into_owned(),
        ),
    ];
    let mut ctx = info["context"].clone();
    // Its secrets: asked for with this job's own token, put into the context's params only,
    // and masked in everything the step prints.
    let mut mask = Mask::default();
    if info["secrets"].as_array().is_some_and(|a| !a.is_empty()) {
        let v = client.get_json(&format!("{base}/secrets"), &[])?;
        let values: BTreeMap<String, String> =
            serde_json::from_value(v["secrets"].clone()).unwrap_or_default();
        fill_secrets(&mut ctx["params"], &values);
        mask = Mask::new(values.into_values());
    }
    let mut result = serde_json::Map::new();
    let verbs: Vec<String> = info["verbs"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if info["build"].is_object() && verbs.iter().any(|v| v == "install") {
        build::run(
            &client,
            &base,
            &info["build"],
            dir.as_deref(),
            &ctx,
            &env,
            &mask,
            &root,
            &state_dir.join("artifacts"),
        )?;
    }
    for verb in verbs {
        let Some(d) = &dir else {
            println!("action {verb}: no service directory recorded: built-in default");
            continue;
        };
        ctx["action"] = json!(verb);
        // export and import: a directory of their own, packed after or unpacked before.
        let mut env = env.clone();
        let scratch = root
            .join(format!("{verb}s"))
            .join(format!("{}.{}", a.plan, a.key));
        if verb == "export" || verb == "import" {
            let _ = std::fs::remove_dir_all(&scratch);
            std::fs::create_dir_all(scratch.parent().unwrap_or(&root))?;
        }
        if verb == "export" {
            std::fs::create_dir_all(&scratch)?;
            env.push((
                "MUSTER_EXPORT_DIR".into(),
                scratch.to_string_lossy().into_owned(),
            ));
        }
        if verb == "import" {
            // No path out of the directory, no links out of it, bounded sizes.
            let u = fetch_unpack(&client, &format!("{base}/import"), &scratch)
                .map_err(|e| anyhow!("the import archive is refused: {e}"))?;
            println!("import: {} entries, {} bytes unpacked", u.entries, u.bytes);
            env.push((
                "MUSTER_IMPORT_DIR".into(),
                scratch.to_string_lossy().into_owned(),
            ));
        }
        let mut ran = run_action(d, &verb, &ctx, &env, &mask)?;
        if (verb == "export" || verb == "import") && matches!(ran, Ran::Missing) {
            let _ = std::fs::remove_dir_all(&scratch);
            bail!("service {path} has no {verb} action");
        }
        if verb == "export" {
            let mut packed = Vec::new();
            archive::pack(&scratch, &mut packed).map_err(anyhow::Error::msg)?;
            let v = post_gzip(&client, &format!("{base}/export"), packed)?;
            println!(
                "export kept as {} ({} bytes)",
                text(&v["export"]),
                text(&v["size"])
            );
            let _ = std::fs::remove_dir_all(&scratch);
            if let Ran::Done(r) = &mut ran {
                let mut o = r.clone().unwrap_or_else(|| json!({}));
                o["export"] = v["export"].clone();
                *r = Some(o);
            }
        }
        if verb == "import" {
            let _ = std::fs::remove_dir_all(&scratch);
        }
        let has_process = info["process"].as_bool().unwrap_or(false);
        if matches!(ran, Ran::Missing)
            && has_process
            && ["start", "stop", "restart"].contains(&verb.as_str())
        {
            // The built-in verbs of a [process]: through the server's process layer.
            let (_, v) = client.post_json(&format!("{base}/process/{verb}"), &json!({}), &[])?;
            println!("process {verb}: {}", serde_json::to_string(&v)?);
            continue;
        }
        if matches!(ran, Ran::Missing) && verb == "restart" {
            // restart = stop + start.
            let stopped = run_action(d, "stop", &ctx, &env, &mask)?;
            let started = run_action(d, "start", &ctx, &env, &mask)?;
            ran = match (stopped, started) {
                (_, Ran::Done(v)) => Ran::Done(v),
                (Ran::Done(v), Ran::Missing) => Ran::Done(v),
                _ => Ran::Missing,
            };
        }
        match ran {
            Ran::Missing => println!("action {verb}: none (built-in default: nothing to do)"),
            Ran::Done(Some(v)) => {
                if let Some(p) = v.get("published") {
                    let mut merged = result
                        .get("published")
                        .and_then(|x| x.as_object())
                        .cloned()
                        .unwrap_or_default();
                    if let Some(obj) = p.as_object() {
                        for (k, x) in obj {
                            merged.insert(k.clone(), x.clone());
                        }
                    }
                    result.insert("published".into(), Value::Object(merged));
                }
                for k in ["state", "status", "message"] {
                    if let Some(x) = v.get(k) {
                        result.insert(k.into(), x.clone());
                    }
                }
                if let Some(s) = v.get("state") {
                    ctx["state"] = s.clone();
                }
            }
            Ran::Done(None) => {}
        }
    }
    if action == "reset" {
        if info["process"].as_bool().unwrap_or(false) {
            let (_, v) = client.post_json(&format!("{base}/process/remove"), &json!({}), &[])?;
            println!("process removed: {}", serde_json::to_string(&v)?);
        }
        match std::fs::remove_dir_all(&state_dir) {
            Ok(()) => println!("state directory {} removed", state_dir.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bail!("cannot remove {}: {e}", state_dir.display()),
        }
    }
    println!(
        "{}",
        mask.apply(&serde_json::to_string(&Value::Object(result))?)
    );
    Ok(())
}
