//! The client commands: `setup`, `login`, `logout`, `jobs …`, `users …`, `workspaces …` and
//! `tokens …`, speaking the HTTP API of a server; and `perf summary`, which reads the perf logs of
//! a local data dir.
//!
//! The server comes from `--server`, then `MUSTER_URL`, then the saved credentials, then
//! `http://127.0.0.1:7070`. The token comes from `MUSTER_TOKEN`, else from the credentials saved
//! by `login`/`setup` (only when they were saved for the same server, so a token never goes to
//! another one).

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[path = "cli_models.rs"]
mod models;
#[path = "cli_services.rs"]
mod services;

/// The server used when nothing else names one.
const DEFAULT_SERVER: &str = "http://127.0.0.1:7070";

/// What the exit status says, for `--help`.
pub const EXIT_STATUS: &str = "Exit status:
  0  done; with -f (jobs run, jobs tree, jobs logs): the job or tree succeeded
  1  with -f: the job or tree ended failed or aborted; or the command failed (why is on stderr)
  2  bad usage (an unknown flag, a missing argument)";
/// How often `--follow` polls the state of a tree.
const POLL: Duration = Duration::from_millis(200);

#[derive(Subcommand)]
pub enum ClientCmd {
    /// Create the first admin with the one-time setup code, and keep its token.
    Setup(SetupArgs),
    /// Log in to a server and keep the token.
    Login(LoginArgs),
    /// Revoke the saved login's token on its server and forget it.
    Logout(LogoutArgs),
    /// Run, list, inspect, follow and abort jobs.
    ///
    /// A job is named by its id, or by TREE/KEY: the job with that key in the tree whose id is
    /// TREE (keys are unique in a tree); TREE/A/B walks down the tree key by key.
    #[command(after_help = EXIT_STATUS)]
    Jobs {
        #[command(subcommand)]
        cmd: JobsCmd,
    },
    /// Run long-running processes on the fleet: supervised, health-checked, restarted.
    ///
    /// `muster procs run --port http -- python3 -m http.server '$PORT'` starts a web server on
    /// a free port of a fitting node ($PORT in the command is that port).
    Procs {
        #[command(subcommand)]
        cmd: ProcsCmd,
    },
    /// Deploy models (bundles as versions, zero-downtime switches) and call their predict.
    Models {
        #[command(subcommand)]
        cmd: models::ModelsCmd,
    },
    /// Services in HQ (SPEC §6): plan, apply, list, show.
    Services {
        #[command(subcommand)]
        cmd: services::ServicesCmd,
    },
    /// List, add and remove users (adding and removing: cluster admins only).
    Users {
        #[command(subcommand)]
        cmd: UsersCmd,
    },
    /// List and add workspaces; grant and revoke roles in them.
    Workspaces {
        #[command(subcommand)]
        cmd: WorkspacesCmd,
    },
    /// List, create and revoke API tokens.
    Tokens {
        #[command(subcommand)]
        cmd: TokensCmd,
    },
    /// List, inspect, label, drain, wait for and remove nodes; make join tokens for new agents.
    Nodes {
        #[command(subcommand)]
        cmd: NodesCmd,
    },
    /// List node control scripts and run one on every matching node.
    Scripts {
        #[command(subcommand)]
        cmd: ScriptsCmd,
    },
    /// Headquarters, the git repository of desired state: its status, a sync now, the orders
    /// and their outcomes, its history.
    Hq {
        #[command(subcommand)]
        cmd: HqCmd,
    },
    /// Read the perf logs of a data dir on this machine (no server needed).
    Perf {
        #[command(subcommand)]
        cmd: PerfCmd,
    },
}

/// Where the server is.
#[derive(Args, Clone, Default)]
pub struct ServerOpt {
    /// The server URL (env MUSTER_URL; default: the one of the saved login, else http://127.0.0.1:7070).
    #[arg(long, env = "MUSTER_URL", value_name = "URL")]
    server: Option<String>,
}

#[derive(Args)]
pub struct SetupArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// The admin's user name.
    #[arg(long)]
    username: String,
    /// The one-time setup code.
    #[arg(long, conflicts_with = "code_file")]
    code: Option<String>,
    /// A file holding the one-time setup code (the server writes <data-dir>/setup-code at its
    /// first start; a server just started gets a few seconds to write it).
    #[arg(long, value_name = "PATH")]
    code_file: Option<PathBuf>,
    /// Read the password from the first line of stdin (else env MUSTER_PASSWORD, else a prompt).
    #[arg(long)]
    password_stdin: bool,
    /// A name for the cluster.
    #[arg(long)]
    cluster_name: Option<String>,
}

#[derive(Args)]
pub struct LoginArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// The user name.
    #[arg(long)]
    username: String,
    /// Read the password from the first line of stdin (else env MUSTER_PASSWORD, else a prompt).
    #[arg(long)]
    password_stdin: bool,
}

#[derive(Subcommand)]
pub enum JobsCmd {
    /// Submit a job tree: from a JSON or TOML file, or one job from the command line after `--`.
    ///
    /// Prints the tree's id on stdout (and the id of each of its jobs on stderr).
    #[command(after_help = EXIT_STATUS)]
    Run(RunArgs),
    /// List job trees, newest first.
    Ls(LsArgs),
    /// Show one job, with its children.
    Show(ShowArgs),
    /// Draw the tree of a job with the id of every job (with -f: live, until it ends).
    #[command(after_help = EXIT_STATUS)]
    Tree(TreeArgs),
    /// Print the log of a job (with -f: follow it until the job ends).
    ///
    /// A job that has not started has no log yet: it says why it waits; with -f it waits for
    /// the job, saying where it is queued and why.
    #[command(after_help = EXIT_STATUS)]
    Logs(LogsArgs),
    /// Abort the tree a job belongs to.
    Abort(AbortArgs),
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// A job tree in JSON or TOML (by extension: .toml is TOML, anything else JSON).
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// The name of the job (with --file: replaces the root's name).
    #[arg(long)]
    name: Option<String>,
    /// The workspace tag.
    #[arg(long)]
    workspace: Option<String>,
    /// The application tag.
    #[arg(long)]
    application: Option<String>,
    /// The version tag.
    #[arg(long)]
    version: Option<String>,
    /// The instance tag.
    #[arg(long)]
    instance: Option<String>,
    /// Pin the job to a node (by name or id).
    #[arg(long, conflicts_with = "file")]
    node: Option<String>,
    /// Kill the job after this many seconds.
    #[arg(long, value_name = "SECONDS", conflicts_with = "file")]
    timeout: Option<u64>,
    /// How many times to retry a failed job.
    #[arg(long, conflicts_with = "file")]
    retries: Option<u32>,
    /// Run the arguments, joined with spaces, as a shell script instead of a program.
    #[arg(long, conflicts_with = "file")]
    shell: bool,
    /// Submit at most once per key: a second run with the same key gives back the first tree.
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    /// Follow the job (its log when the tree has one job, else the tree) until the tree ends;
    /// exit 0 if it succeeded, 1 otherwise.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Print the server's whole answer as JSON.
    #[arg(long)]
    json: bool,
    /// The command to run (after `--`).
    #[arg(last = true, value_name = "CMD", conflicts_with = "file")]
    cmd: Vec<String>,
}

#[derive(Args)]
pub struct LsArgs {
    #[command(flatten)]
    server: ServerOpt,
    #[arg(long)]
    workspace: Option<String>,
    #[arg(long)]
    application: Option<String>,
    #[arg(long)]
    version: Option<String>,
    #[arg(long)]
    instance: Option<String>,
    /// Trees with a job placed on this node.
    #[arg(long)]
    node: Option<String>,
    /// running, succeeded, failed or aborted.
    #[arg(long)]
    state: Option<String>,
    /// At most this many trees (1-1000; the server's default is 50).
    #[arg(long)]
    limit: Option<usize>,
    /// Continue after this cursor (printed by the previous page).
    #[arg(long)]
    cursor: Option<String>,
    /// Print the server's answer as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ShowArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// The job: its id, or TREE/KEY (the job with that key in tree TREE; TREE/A/B: B under A).
    #[arg(value_name = "JOB")]
    id: String,
    /// Print the job as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct TreeArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// A job: its id (the tree's id is its root's), or TREE/KEY for a part of a tree.
    #[arg(value_name = "JOB")]
    id: String,
    /// Print the nested tree as JSON.
    #[arg(long, conflicts_with = "follow")]
    json: bool,
    /// Redraw as it changes until the tree ends; exit 0 if it succeeded, 1 otherwise.
    #[arg(short = 'f', long)]
    follow: bool,
}

#[derive(Args)]
pub struct LogsArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// The job: its id, or TREE/KEY (the job with that key in tree TREE; TREE/A/B: B under A).
    #[arg(value_name = "JOB")]
    id: String,
    /// Stream the log until the job ends; exit 0 if it succeeded, 1 otherwise.
    #[arg(short = 'f', long)]
    follow: bool,
    /// The attempt (default: the latest).
    #[arg(long)]
    attempt: Option<u32>,
}

#[derive(Args)]
pub struct AbortArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// A job (its id, or TREE/KEY); its whole tree is aborted.
    #[arg(value_name = "JOB")]
    id: String,
}

#[derive(Args)]
pub struct LogoutArgs {
    #[command(flatten)]
    server: ServerOpt,
}

#[derive(Subcommand)]
pub enum UsersCmd {
    /// List users (cluster admins see everyone; others, themselves).
    Ls(ListArgs),
    /// Add a user (with a personal workspace of the same name).
    Add(UserAddArgs),
    /// Remove a user, with their tokens and memberships.
    Rm(NameArgs),
}

#[derive(Subcommand)]
pub enum WorkspacesCmd {
    /// List the workspaces you belong to, your role and their members.
    Ls(ListArgs),
    /// Add a workspace; you become its admin.
    Add(NameArgs),
    /// Give a user a role in a workspace (or change it).
    Grant(GrantArgs),
    /// Take a user out of a workspace.
    Revoke(RevokeArgs),
}

#[derive(Subcommand)]
pub enum TokensCmd {
    /// List your API tokens (with --all: everyone's; cluster admins only).
    Ls(TokensLsArgs),
    /// Create an API token; its secret is printed once, alone on stdout.
    Create(TokenCreateArgs),
    /// Revoke an API token by id.
    Revoke(IdArgs),
}

#[derive(Subcommand)]
pub enum NodesCmd {
    /// List the nodes: state, labels, slots, last seen.
    Ls(ListArgs),
    /// One node (by name or id).
    Show(NodeArgs),
    /// Set labels (KEY=VALUE) or remove them (KEY-) on a node.
    Label(NodeLabelArgs),
    /// Stop giving a node new jobs; its running jobs finish.
    Drain(NodeArgs),
    /// Give a drained node jobs again.
    Undrain(NodeArgs),
    /// Remove a node and revoke its credential (its agent stops).
    Rm(NodeArgs),
    /// Wait until a node has joined and is ready for jobs.
    Wait(NodeWaitArgs),
    /// Make a join token for new agents; prints the command to run on the new node.
    JoinToken(JoinTokenArgs),
}

#[derive(Args)]
pub struct NodeArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// The node's name or id.
    node: String,
    /// Print the JSON answer.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct NodeWaitArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// The node's name or id.
    node: String,
    /// Give up after this many seconds (exit 1).
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    timeout: u64,
}

#[derive(Args)]
pub struct NodeLabelArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// The node's name or id.
    node: String,
    /// KEY=VALUE to set, KEY- to remove.
    #[arg(required = true)]
    labels: Vec<String>,
}

#[derive(Args)]
pub struct JoinTokenArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// How long the token stays valid, in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl: u64,
    /// How many agents may join with it.
    #[arg(long, default_value_t = 1)]
    uses: u32,
    /// Print the JSON answer.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub enum HqCmd {
    /// The repository, head commit, last sync, a conflict, problems and each watcher's last run.
    Status(ListArgs),
    /// Sync with the remote now (runs a pulse) and show the outcome.
    Sync(ListArgs),
    /// The orders of HQ's orders files and their outcomes; `resolve FILE` restarts a stopped file.
    Orders(HqOrdersArgs),
    /// HQ's last commits.
    Log(HqLogArgs),
}

#[derive(Args)]
pub struct HqOrdersArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// `resolve FILE`: an admin accepts an edited orders file (its lines up to where it was
    /// count as processed; later lines run).
    #[arg(num_args = 0..=2, value_names = ["resolve", "FILE"])]
    action: Vec<String>,
    /// Only this orders file (e.g. deployer/orders).
    #[arg(long)]
    file: Option<String>,
    /// Only orders in this state (pending, running, succeeded, failed, rejected).
    #[arg(long)]
    state: Option<String>,
    /// Print the server's answer as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct HqLogArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// How many commits.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Print the server's answer as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub enum ScriptsCmd {
    /// List the scripts (the executables in HQ `scripts/`).
    Ls(ListArgs),
    /// Run a script on every ready node matching --nodes, as one job tree.
    Run(ScriptRunArgs),
}

#[derive(Args)]
pub struct ScriptRunArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// The script's name.
    name: String,
    /// A node selector, KEY=VALUE[,KEY=VALUE...] (default: every ready node).
    #[arg(long, default_value = "")]
    nodes: String,
    /// The tree's workspace (default: your own).
    #[arg(long)]
    workspace: Option<String>,
    /// Print the JSON answer.
    #[arg(long)]
    json: bool,
    /// Arguments for the script.
    #[arg(last = true)]
    args: Vec<String>,
}

#[derive(Subcommand)]
pub enum PerfCmd {
    /// Count, p50, p95, p99 and max per route of one server run's perf logs.
    Summary(PerfSummaryArgs),
}

#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// Print the server's answer as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct NameArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// The name.
    name: String,
}

#[derive(Args)]
pub struct IdArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// The id.
    id: String,
}

#[derive(Args)]
pub struct UserAddArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// The user name.
    name: String,
    /// Make the user a cluster admin.
    #[arg(long)]
    admin: bool,
    /// Read the password from the first line of stdin (else env MUSTER_PASSWORD, else a prompt).
    #[arg(long)]
    password_stdin: bool,
    /// Print the server's answer as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct GrantArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// The workspace.
    workspace: String,
    /// The user.
    user: String,
    /// The role: viewer (reads), operator (also runs and aborts), admin (also manages members).
    #[arg(value_parser = ["viewer", "operator", "admin"])]
    role: String,
}

#[derive(Args)]
pub struct RevokeArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// The workspace.
    workspace: String,
    /// The user.
    user: String,
}

#[derive(Args)]
pub struct TokensLsArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// Every user's tokens (cluster admins only).
    #[arg(long)]
    all: bool,
    /// Print the server's answer as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct TokenCreateArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// A name for the token (what it is for).
    name: String,
    /// What it may do, comma-separated: read, operate, admin, predict.
    #[arg(long, value_delimiter = ',', required = true, num_args = 1..)]
    scopes: Vec<String>,
    /// Expire after this long: e.g. 30d, 12h, 90m, 3600s (bare digits: seconds). Default: never.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_s)]
    expires_in: Option<u64>,
    /// Print the server's whole answer (secret included) as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct PerfSummaryArgs {
    /// The server run (default: the newest).
    #[arg(long, value_name = "N")]
    run: Option<u64>,
    /// The data dir of the server (env MUSTER_DATA_DIR; default: muster-data).
    #[arg(long, env = "MUSTER_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

pub fn run(cmd: ClientCmd) -> Result<()> {
    match cmd {
        ClientCmd::Setup(a) => setup(a),
        ClientCmd::Login(a) => login(a),
        ClientCmd::Logout(a) => logout(a),
        ClientCmd::Procs { cmd } => match cmd {
            ProcsCmd::Run(a) => procs_run(*a),
            ProcsCmd::Ls(a) => procs_ls(a),
            ProcsCmd::Show(a) => procs_show(a),
            ProcsCmd::Logs(a) => procs_logs(a),
            ProcsCmd::Stop(a) => procs_verb(a, "stop"),
            ProcsCmd::Start(a) => procs_verb(a, "start"),
            ProcsCmd::Restart(a) => procs_verb(a, "restart"),
            ProcsCmd::Rm(a) => procs_verb(a, "rm"),
        },
        ClientCmd::Models { cmd } => models::run(cmd),
        ClientCmd::Services { cmd } => services::run(cmd),
        ClientCmd::Users { cmd } => match cmd {
            UsersCmd::Ls(a) => users_ls(a),
            UsersCmd::Add(a) => users_add(a),
            UsersCmd::Rm(a) => users_rm(a),
        },
        ClientCmd::Workspaces { cmd } => match cmd {
            WorkspacesCmd::Ls(a) => workspaces_ls(a),
            WorkspacesCmd::Add(a) => workspaces_add(a),
            WorkspacesCmd::Grant(a) => workspaces_grant(a),
            WorkspacesCmd::Revoke(a) => workspaces_revoke(a),
        },
        ClientCmd::Tokens { cmd } => match cmd {
            TokensCmd::Ls(a) => tokens_ls(a),
            TokensCmd::Create(a) => tokens_create(a),
            TokensCmd::Revoke(a) => tokens_revoke(a),
        },
        ClientCmd::Perf {
            cmd: PerfCmd::Summary(a),
        } => perf_summary(a),
        ClientCmd::Hq { cmd } => match cmd {
            HqCmd::Status(a) => hq_status(a),
            HqCmd::Sync(a) => hq_sync(a),
            HqCmd::Orders(a) => hq_orders(a),
            HqCmd::Log(a) => hq_log(a),
        },
        ClientCmd::Scripts { cmd } => match cmd {
            ScriptsCmd::Ls(a) => scripts_ls(a),
            ScriptsCmd::Run(a) => scripts_run(a),
        },
        ClientCmd::Nodes { cmd } => match cmd {
            NodesCmd::Ls(a) => nodes_ls(a),
            NodesCmd::Show(a) => nodes_show(a),
            NodesCmd::Label(a) => nodes_label(a),
            NodesCmd::Drain(a) => nodes_patch(
                a,
                json!({"state": "draining"}),
                "draining: it gets no new jobs",
            ),
            NodesCmd::Undrain(a) => {
                nodes_patch(a, json!({"state": "ready"}), "ready for jobs again")
            }
            NodesCmd::Rm(a) => nodes_rm(a),
            NodesCmd::Wait(a) => nodes_wait(a),
            NodesCmd::JoinToken(a) => nodes_join_token(a),
        },
        ClientCmd::Jobs { cmd } => match cmd {
            JobsCmd::Run(a) => jobs_run(a),
            JobsCmd::Ls(a) => jobs_ls(a),
            JobsCmd::Show(a) => jobs_show(a),
            JobsCmd::Tree(a) => jobs_tree(a),
            JobsCmd::Logs(a) => jobs_logs(a),
            JobsCmd::Abort(a) => jobs_abort(a),
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Credentials

/// What `login`/`setup` keep, in `$MUSTER_CONFIG_DIR/credentials.json`.
#[derive(Serialize, Deserialize)]
struct Credentials {
    server: String,
    token: String,
    username: String,
}

fn config_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("MUSTER_CONFIG_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".config").join("muster")),
        None => bail!("cannot tell where to keep the credentials: set MUSTER_CONFIG_DIR or HOME"),
    }
}

fn credentials_path() -> Result<PathBuf> {
    Ok(config_dir()?.join("credentials.json"))
}

/// The saved credentials, if any. A file that cannot be read is an error; a missing one is not.
fn load_credentials() -> Result<Option<Credentials>> {
    let path = credentials_path()?;
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let c = serde_json::from_str(&text).with_context(|| {
                format!(
                    "{} is damaged: log in again with `muster login`",
                    path.display()
                )
            })?;
            Ok(Some(c))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow!("cannot read {}: {e}", path.display())),
    }
}

/// Writes the credentials (mode 0600, in a 0700 directory), replacing the file atomically.
fn save_credentials(c: &Credentials) -> Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let dir = config_dir()?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot make {}", dir.display()))?;
    let path = dir.join("credentials.json");
    let tmp = dir.join(format!(".credentials.json.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(
            serde_json::to_string_pretty(c)
                .map_err(std::io::Error::other)?
                .as_bytes(),
        )?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        bail!("cannot write {}: {e}", path.display());
    }
    Ok(path)
}

/// `http://h:p/` and `http://h:p` are the same server.
fn normalize_url(url: &str) -> String {
    let u = url.trim().trim_end_matches('/');
    if u.contains("://") {
        u.to_string()
    } else {
        format!("http://{u}")
    }
}

fn resolve_server(opt: &ServerOpt, saved: Option<&Credentials>) -> String {
    match (&opt.server, saved) {
        (Some(s), _) if !s.trim().is_empty() => normalize_url(s),
        (_, Some(c)) => normalize_url(&c.server),
        _ => DEFAULT_SERVER.to_string(),
    }
}

/// A client for the server of `opt`, with the token a command needs.
fn authed_client(opt: &ServerOpt) -> Result<Client> {
    let saved = load_credentials()?;
    let base = resolve_server(opt, saved.as_ref());
    let token = match std::env::var("MUSTER_TOKEN").ok().filter(|t| !t.trim().is_empty()) {
        Some(t) => t.trim().to_string(),
        None => match &saved {
            Some(c) if normalize_url(&c.server) == base => c.token.clone(),
            Some(c) => bail!(
                "not logged in to {base} (the saved login is for {}): run `muster login --server {base} --username NAME`, or set MUSTER_TOKEN",
                normalize_url(&c.server)
            ),
            None => bail!("not logged in: run `muster login --server {base} --username NAME`, or set MUSTER_TOKEN"),
        },
    };
    Client::new(base, Some(token))
}

// ---------------------------------------------------------------------------------------------
// HTTP

struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

type Resp = ureq::http::Response<ureq::Body>;

/// Percent-encodes one path segment (job ids are UUIDs, but a typo must not change the route).
fn seg(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Client {
    /// A client of `base`; `https://` servers are checked against Mozilla's roots, or only
    /// against the certificates in the PEM file `MUSTER_CA_FILE` (a private CA).
    fn new(base: String, token: Option<String>) -> Result<Client> {
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .user_agent(concat!("muster-cli/", env!("CARGO_PKG_VERSION")));
        // A server on this machine is never reached through a proxy from the environment.
        let host = base
            .split("://")
            .nth(1)
            .unwrap_or("")
            .split('/')
            .next()
            .unwrap_or("");
        if host.starts_with("127.") || host.starts_with("localhost") || host.starts_with("[::1]") {
            config = config.proxy(None);
        }
        if let Some(path) = std::env::var_os("MUSTER_CA_FILE").filter(|p| !p.is_empty()) {
            let shown = PathBuf::from(&path).display().to_string();
            let pem = std::fs::read(&path).with_context(|| format!("MUSTER_CA_FILE {shown}"))?;
            let mut roots = Vec::new();
            for item in ureq::tls::parse_pem(&pem) {
                if let ureq::tls::PemItem::Certificate(c) =
                    item.with_context(|| format!("MUSTER_CA_FILE {shown} is not PEM"))?
                {
                    roots.push(c);
                }
            }
            if roots.is_empty() {
                bail!("MUSTER_CA_FILE {shown} holds no certificate");
            }
            config = config.tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::new_with_certs(&roots))
                    .build(),
            );
        }
        let agent: ureq::Agent = config.build().into();
        Ok(Client { base, token, agent })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn transport_error(&self, e: ureq::Error) -> anyhow::Error {
        let unreachable = match &e {
            ureq::Error::Io(io) => matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::AddrNotAvailable
            ),
            ureq::Error::ConnectionFailed | ureq::Error::HostNotFound | ureq::Error::Timeout(_) => {
                true
            }
            _ => false,
        };
        if unreachable {
            anyhow!(
                "cannot reach the muster server at {} ({e}): is it running? Start one with `muster up`, or name another with --server URL (or MUSTER_URL)",
                self.base
            )
        } else {
            anyhow!("request to {} failed: {e}", self.base)
        }
    }

    fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Resp> {
        let mut req = self.agent.get(self.url(path));
        for (k, v) in query {
            req = req.query(*k, v);
        }
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        req.call().map_err(|e| self.transport_error(e))
    }

    /// A request with a JSON body (POST, PUT, PATCH), the token and extra headers.
    fn send_json(
        &self,
        method: &str,
        path: &str,
        body: &Value,
        headers: &[(&str, String)],
    ) -> Result<Resp> {
        let mut req = ureq::http::Request::builder()
            .method(method)
            .uri(self.url(path))
            .header("Content-Type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let req = req.body(serde_json::to_string(body)?)?;
        self.agent.run(req).map_err(|e| self.transport_error(e))
    }

    fn post(&self, path: &str, body: &Value, headers: &[(&str, String)]) -> Result<Resp> {
        self.send_json("POST", path, body, headers)
    }

    fn put(&self, path: &str, body: &Value) -> Result<Resp> {
        self.send_json("PUT", path, body, &[])
    }

    fn patch(&self, path: &str, body: &Value) -> Result<Resp> {
        self.send_json("PATCH", path, body, &[])
    }

    fn delete(&self, path: &str) -> Result<Resp> {
        let mut req = self.agent.delete(self.url(path));
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        req.call().map_err(|e| self.transport_error(e))
    }

    /// DELETE, expecting a 2xx answer (its body, if any, is not read).
    fn delete_ok(&self, path: &str) -> Result<()> {
        let resp = self.delete(path)?;
        if !resp.status().is_success() {
            return Err(http_error(resp));
        }
        Ok(())
    }

    /// GET, expecting a 2xx JSON answer.
    fn get_json(&self, path: &str, query: &[(&str, String)]) -> Result<Value> {
        let resp = self.get(path, query)?;
        json_body(resp)
    }

    /// POST, expecting a 2xx JSON answer; gives the status too.
    fn post_json(
        &self,
        path: &str,
        body: &Value,
        headers: &[(&str, String)],
    ) -> Result<(u16, Value)> {
        let resp = self.post(path, body, headers)?;
        let status = resp.status().as_u16();
        Ok((status, json_body(resp)?))
    }
}

fn read_text(resp: &mut Resp) -> Result<String> {
    resp.body_mut()
        .with_config()
        .limit(u64::MAX)
        .read_to_string()
        .map_err(|e| anyhow!("cannot read the server's answer: {e}"))
}

/// The error of a non-2xx answer: the server's message and the status.
fn http_error(mut resp: Resp) -> anyhow::Error {
    let status = resp.status();
    let text = read_text(&mut resp).unwrap_or_default();
    let message = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| {
            let t = text.trim();
            if t.is_empty() {
                status.canonical_reason().unwrap_or("error").to_string()
            } else {
                t.chars().take(500).collect()
            }
        });
    anyhow!("{message} (HTTP {})", status.as_u16())
}

fn json_body(mut resp: Resp) -> Result<Value> {
    if !resp.status().is_success() {
        return Err(http_error(resp));
    }
    let text = read_text(&mut resp)?;
    serde_json::from_str(&text).map_err(|e| {
        anyhow!(
            "the server's answer is not JSON ({e}): {}",
            text.chars().take(200).collect::<String>()
        )
    })
}

// ---------------------------------------------------------------------------------------------
// setup, login

/// The password: `--password-stdin`, else MUSTER_PASSWORD, else a prompt on a terminal.
fn read_password(from_stdin: bool) -> Result<String> {
    if from_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("cannot read the password from stdin")?;
        let pw = line.trim_end_matches(['\n', '\r']).to_string();
        if pw.is_empty() {
            bail!("--password-stdin: stdin gave no password (pipe it in, e.g. `printf '%s\\n' \"$PW\" | muster login …`)");
        }
        return Ok(pw);
    }
    if let Ok(pw) = std::env::var("MUSTER_PASSWORD") {
        if !pw.is_empty() {
            return Ok(pw);
        }
    }
    if std::io::stdin().is_terminal() {
        eprint!("Password: ");
        let _ = std::io::stderr().flush();
        let pw = read_line_no_echo().context("cannot read the password")?;
        eprintln!();
        if pw.is_empty() {
            bail!("no password given");
        }
        return Ok(pw);
    }
    bail!("no password: pass --password-stdin and pipe it in, or set MUSTER_PASSWORD")
}

/// Reads one line from the terminal on stdin with echo turned off (restored afterwards).
fn read_line_no_echo() -> std::io::Result<String> {
    // SAFETY: termios is plain data; tcgetattr fills it, and fd 0 is a terminal (checked).
    let mut old: libc::termios = unsafe { std::mem::zeroed() };
    let have = unsafe { libc::tcgetattr(0, &mut old) } == 0;
    if have {
        let mut quiet = old;
        quiet.c_lflag &= !libc::ECHO;
        quiet.c_lflag |= libc::ECHONL;
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &quiet) };
    }
    let mut line = String::new();
    let res = std::io::stdin().lock().read_line(&mut line);
    if have {
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &old) };
    }
    res?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

/// How long `setup --code-file` waits for a server that is starting to write its code.
const CODE_FILE_WAIT: Duration = Duration::from_secs(30);

/// Reads the setup code file, waiting for it a while when it is not there yet (`muster up &`
/// followed at once by `muster setup`: the server writes it a moment later).
fn read_code_file(p: &Path) -> Result<String> {
    let deadline = std::time::Instant::now() + CODE_FILE_WAIT;
    let mut said = false;
    loop {
        match std::fs::read_to_string(p) {
            Ok(code) if !code.trim().is_empty() => return Ok(code.trim().to_string()),
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                bail!("cannot read the setup code from {}: {e}", p.display())
            }
            _ if std::time::Instant::now() >= deadline => bail!(
                "no setup code in {} after {} s: is the server starting with that data dir? (it writes the code at its first start, while no user exists)",
                p.display(),
                CODE_FILE_WAIT.as_secs()
            ),
            _ => {
                if !said {
                    eprintln!(
                        "muster: waiting for the server to write {}…",
                        p.display()
                    );
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Saves new credentials in place of the saved ones; the token they held is revoked when it was
/// for the same server, so logging in again leaves no second session behind.
fn replace_credentials(new: &Credentials) -> Result<PathBuf> {
    let old = load_credentials().ok().flatten();
    let path = save_credentials(new)?;
    if let Some(old) = old.filter(|o| o.token != new.token) {
        if normalize_url(&old.server) == normalize_url(&new.server) {
            // Best effort: a token that has expired or was revoked answers 401, which is fine.
            if let Ok(c) = Client::new(normalize_url(&old.server), Some(old.token)) {
                let _ = c.post("/api/v1/logout", &json!({}), &[]);
            }
        } else {
            eprintln!(
                "muster: the saved login for {} is replaced; its token stays valid until it expires (`muster tokens revoke` there)",
                normalize_url(&old.server)
            );
        }
    }
    Ok(path)
}

fn setup(a: SetupArgs) -> Result<()> {
    let code = match (&a.code, &a.code_file) {
        (Some(c), _) => c.trim().to_string(),
        (None, Some(p)) => read_code_file(p)?,
        (None, None) => bail!("give the one-time setup code: --code-file <data-dir>/setup-code (written by the server on first start), or --code CODE"),
    };
    if code.is_empty() {
        bail!("the setup code is empty");
    }
    let password = read_password(a.password_stdin)?;
    let saved = load_credentials().ok().flatten();
    let base = resolve_server(&a.server, saved.as_ref());
    let client = Client::new(base.clone(), None)?;
    let mut body = json!({"setup_code": code, "username": a.username, "password": password});
    if let Some(c) = &a.cluster_name {
        body["cluster_name"] = json!(c);
    }
    let (_, v) = client.post_json("/api/v1/setup", &body, &[])?;
    let token = v["token"]
        .as_str()
        .ok_or_else(|| anyhow!("the server gave no token"))?
        .to_string();
    let path = replace_credentials(&Credentials {
        server: base.clone(),
        token,
        username: a.username.clone(),
    })?;
    println!(
        "admin {:?} created on {base}; logged in (credentials in {})",
        a.username,
        path.display()
    );
    Ok(())
}

fn login(a: LoginArgs) -> Result<()> {
    let password = read_password(a.password_stdin)?;
    let saved = load_credentials().ok().flatten();
    let base = resolve_server(&a.server, saved.as_ref());
    let client = Client::new(base.clone(), None)?;
    let (_, v) = client.post_json(
        "/api/v1/login",
        &json!({"username": a.username, "password": password}),
        &[],
    )?;
    let token = v["token"]
        .as_str()
        .ok_or_else(|| anyhow!("the server gave no token"))?
        .to_string();
    let path = replace_credentials(&Credentials {
        server: base.clone(),
        token,
        username: a.username.clone(),
    })?;
    println!(
        "logged in to {base} as {:?} (credentials in {})",
        a.username,
        path.display()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// jobs run

/// Reads a tree file as JSON (or TOML for `.toml`). It is sent as written: the server checks it,
/// so its messages name the problem.
fn read_tree_file(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let is_toml = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("toml"));
    let v: Value = if is_toml {
        let t: toml::Value = toml::from_str(&text)
            .map_err(|e| anyhow!("{} is not valid TOML: {e}", path.display()))?;
        serde_json::to_value(t)?
    } else {
        serde_json::from_str(&text)
            .map_err(|e| anyhow!("{} is not valid JSON: {e}", path.display()))?
    };
    if !v.is_object() {
        bail!(
            "{}: a job tree is an object (a table in TOML) with at least a name",
            path.display()
        );
    }
    Ok(v)
}

/// Quotes a word for a shell only when it needs it (for display).
fn shell_word(w: &str) -> String {
    if !w.is_empty()
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&b))
    {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
}

/// A job name from a command line: the command, cut to the 200 characters a name may have.
fn name_from(cmd: &[String]) -> String {
    let line = cmd
        .iter()
        .map(|w| shell_word(w))
        .collect::<Vec<_>>()
        .join(" ");
    let clean: String = line
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let mut name: String = clean.trim().chars().take(200).collect();
    if name.is_empty() {
        name = "job".into();
    }
    name
}

fn build_spec(a: &RunArgs) -> Result<Value> {
    let mut spec = match &a.file {
        Some(p) => read_tree_file(p)?,
        None => {
            if a.cmd.is_empty() {
                bail!("nothing to run: give a command after `--` (e.g. `muster jobs run -- echo hi`), or a tree with --file");
            }
            let mut s = json!({"name": a.name.clone().unwrap_or_else(|| name_from(&a.cmd))});
            if a.shell {
                s["shell"] = json!(a.cmd.join(" "));
            } else {
                s["exec"] = json!(a.cmd);
            }
            if let Some(n) = &a.node {
                s["node"] = json!(n);
            }
            if let Some(t) = a.timeout {
                s["timeout_s"] = json!(t);
            }
            if let Some(r) = a.retries {
                s["retries"] = json!(r);
            }
            s
        }
    };
    if let Some(n) = &a.name {
        spec["name"] = json!(n);
    }
    let tags = [
        ("workspace", &a.workspace),
        ("application", &a.application),
        ("version", &a.version),
        ("instance", &a.instance),
    ];
    if tags.iter().any(|(_, v)| v.is_some()) {
        if !spec.get("tags").is_some_and(Value::is_object) {
            spec["tags"] = json!({});
        }
        for (k, v) in tags {
            if let Some(v) = v {
                spec["tags"][k] = json!(v);
            }
        }
    }
    Ok(spec)
}

fn jobs_run(a: RunArgs) -> Result<()> {
    let spec = build_spec(&a)?;
    let client = authed_client(&a.server)?;
    let mut headers = Vec::new();
    if let Some(k) = &a.idempotency_key {
        headers.push(("Idempotency-Key", k.clone()));
    }
    let (status, v) = client.post_json("/api/v1/jobs", &spec, &headers)?;
    let id = v["id"]
        .as_str()
        .ok_or_else(|| anyhow!("the server gave no tree id"))?
        .to_string();
    let jobs = v["jobs"].as_array().map(Vec::as_slice).unwrap_or_default();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        if status == 200 {
            eprintln!("muster: this idempotency key was used before; here is the tree it made");
        }
        if a.follow || jobs.len() > 1 {
            eprint!("{}", made_jobs(&id, jobs));
        }
        if !a.follow {
            println!("{id}");
        }
    }
    if !a.follow {
        return Ok(());
    }
    let state = if jobs.len() == 1 {
        follow_log(&client, &id)?;
        wait_tree(&client, &id)?
    } else {
        follow_tree(&client, &id)?
    };
    finish(&id, &state)
}

/// What `jobs run` made: the tree, then each job's id, key and name (with more than one job).
fn made_jobs(tree: &str, jobs: &[Value]) -> String {
    if jobs.len() <= 1 {
        return format!("tree {tree} (one job: logs with `muster jobs logs {tree}`)\n");
    }
    let mut rows = vec![vec![
        "  ID".to_string(),
        "KEY".to_string(),
        "NAME".to_string(),
    ]];
    for j in jobs {
        rows.push(vec![
            format!("  {}", text(&j["id"])),
            text(&j["key"]),
            text(&j["name"]),
        ]);
    }
    format!(
        "tree {tree}: {} jobs (a job's log: `muster jobs logs {tree}/KEY`)\n{}",
        jobs.len(),
        table(&rows)
    )
}

/// The end of a followed tree: fine if it succeeded, else an error (exit code 1).
fn finish(id: &str, state: &str) -> Result<()> {
    if state == "succeeded" {
        Ok(())
    } else {
        bail!("tree {id} ended {state}")
    }
}

/// Polls until the tree of `id` has ended; gives its state.
fn wait_tree(client: &Client, id: &str) -> Result<String> {
    loop {
        let t = client.get_json(&format!("/api/v1/jobs/{}/tree", seg(id)), &[])?;
        let s = t["tree_state"].as_str().unwrap_or("running").to_string();
        if s != "running" {
            return Ok(s);
        }
        std::thread::sleep(POLL);
    }
}

// ---------------------------------------------------------------------------------------------
// Naming jobs: an id, or TREE/KEY[/KEY…]

/// The children of a job in a nested tree.
fn kids(j: &Value) -> &[Value] {
    j["children"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// Every job of a nested tree, in pre-order (without recursion: trees may be deep).
fn all_jobs(root: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(j) = stack.pop() {
        out.push(j);
        stack.extend(kids(j).iter().rev());
    }
    out
}

/// The whole nested tree that job `id` belongs to (`GET /jobs/{id}/tree` of a child shows the
/// child alone).
fn whole_tree(client: &Client, id: &str) -> Result<Value> {
    let t = client.get_json(&format!("/api/v1/jobs/{}/tree", seg(id)), &[])?;
    if t["id"] == t["tree"] {
        return Ok(t);
    }
    client.get_json(
        &format!("/api/v1/jobs/{}/tree", seg(&text(&t["tree"]))),
        &[],
    )
}

/// The job `name` names: an id as it is, or `TREE/KEY` — the job with that key in the tree
/// (keys are unique in a tree) — where `TREE/A/B` walks down: B under A.
fn job_id(client: &Client, name: &str) -> Result<String> {
    let name = name.trim().trim_end_matches('/');
    let mut parts = name.split('/');
    let first = parts.next().unwrap_or_default();
    let keys: Vec<&str> = parts.collect();
    if keys.is_empty() {
        return Ok(first.to_string());
    }
    if first.is_empty() || keys.iter().any(|k| k.is_empty()) {
        bail!("{name:?} is not a job: give its id, or TREE/KEY (a tree's id, then job keys)");
    }
    let tree = whole_tree(client, first).with_context(|| format!("tree {first}"))?;
    let mut at = all_jobs(&tree)
        .into_iter()
        .find(|j| j["id"] == first)
        .unwrap_or(&tree);
    for (i, key) in keys.iter().enumerate() {
        // TREE/ROOTKEY names the root itself.
        if i == 0 && at["key"] == *key {
            continue;
        }
        let under = all_jobs(at);
        let found = kids(at)
            .iter()
            .find(|c| c["key"] == *key)
            .or_else(|| under.iter().skip(1).copied().find(|j| j["key"] == *key));
        match found {
            Some(j) => at = j,
            None => {
                let known: Vec<String> = under
                    .iter()
                    .skip(1)
                    .take(12)
                    .map(|j| text(&j["key"]))
                    .collect();
                bail!(
                    "no job with key {key:?} under {} in tree {first}{}",
                    text(&at["key"]),
                    if known.is_empty() {
                        " (it has no children)".to_string()
                    } else {
                        format!(
                            " (its keys: {}{})",
                            known.join(", "),
                            if under.len() > 13 { ", …" } else { "" }
                        )
                    }
                )
            }
        }
    }
    Ok(text(&at["id"]))
}

// ---------------------------------------------------------------------------------------------
// jobs ls, show

fn jobs_ls(a: LsArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let mut q: Vec<(&str, String)> = Vec::new();
    for (k, v) in [
        ("workspace", &a.workspace),
        ("application", &a.application),
        ("version", &a.version),
        ("instance", &a.instance),
        ("node", &a.node),
        ("state", &a.state),
        ("cursor", &a.cursor),
    ] {
        if let Some(v) = v {
            q.push((k, v.clone()));
        }
    }
    if let Some(l) = a.limit {
        q.push(("limit", l.to_string()));
    }
    let v = client.get_json("/api/v1/jobs", &q)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if items(&v).is_empty() {
        if a.cursor.is_some() {
            eprintln!("muster: no more job trees");
        } else if q.iter().any(|(k, _)| *k != "limit") {
            eprintln!("muster: no job trees match");
        } else {
            eprintln!("muster: no job trees yet (run one: muster jobs run -- echo hello)");
        }
        return Ok(());
    }
    let mut rows = vec![["ID", "STATE", "NAME", "WORKSPACE", "JOBS", "CREATED"]
        .map(String::from)
        .to_vec()];
    for t in items(&v) {
        let name = text(&t["name"]);
        let name = if name.chars().count() > 40 {
            format!("{}…", name.chars().take(39).collect::<String>())
        } else {
            name
        };
        rows.push(vec![
            text(&t["id"]),
            text(&t["state"]),
            name,
            text(&t["tags"]["workspace"]),
            text(&t["jobs"]),
            short_time(&t["created_at"]),
        ]);
    }
    print_table(&rows);
    if let Some(c) = v["next_cursor"].as_str() {
        eprintln!("more: muster jobs ls --cursor {c}");
    }
    Ok(())
}

/// A JSON value as plain text: strings unquoted, null as "-".
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `2026-11-23T16:39:21.123Z` → `2026-11-23 16:39:21`.
fn short_time(v: &Value) -> String {
    match v.as_str() {
        Some(s) if s.len() >= 19 => s[..19].replacen('T', " ", 1),
        _ => text(v),
    }
}

/// Rows as aligned columns.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map(|c| c.chars().count()).unwrap_or(0))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                line.push_str(c);
                line.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn print_table(rows: &[Vec<String>]) {
    print!("{}", table(rows));
}

/// What a job runs, for people.
fn what(job: &Value) -> String {
    if let Some(argv) = job["exec"].as_array() {
        let words: Vec<String> = argv.iter().map(|w| shell_word(&text(w))).collect();
        format!("exec: {}", words.join(" "))
    } else if let Some(s) = job["shell"].as_str() {
        format!("shell: {s}")
    } else if job["noop"].as_bool() == Some(true) {
        "noop".into()
    } else {
        "group (waits for its children)".into()
    }
}

fn jobs_show(a: ShowArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let id = job_id(&client, &a.id)?;
    let j = client.get_json(&format!("/api/v1/jobs/{}", seg(&id)), &[])?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    // Children and needs are ids: their keys and states come from the tree.
    let related = |list: &Value| list.as_array().is_some_and(|l| !l.is_empty());
    let tree = if related(&j["children"]) || related(&j["needs"]) {
        Some(whole_tree(&client, &id)?)
    } else {
        None
    };
    let by_id: std::collections::HashMap<String, &Value> = tree
        .as_ref()
        .map(|t| {
            all_jobs(t)
                .into_iter()
                .map(|x| (text(&x["id"]), x))
                .collect()
        })
        .unwrap_or_default();
    let mut rows: Vec<(&str, String)> = vec![
        ("id", text(&j["id"])),
        ("name", text(&j["name"])),
        ("key", text(&j["key"])),
        ("state", text(&j["state"])),
        ("tree", text(&j["tree"])),
    ];
    if !j["parent"].is_null() {
        rows.push(("parent", text(&j["parent"])));
    }
    rows.push(("runs", what(&j)));
    rows.push(("node", text(&j["node"])));
    let retries = j["retries"].as_u64().unwrap_or(0);
    rows.push((
        "attempt",
        if retries > 0 {
            format!("{} (retries: {retries})", text(&j["attempt"]))
        } else {
            text(&j["attempt"])
        },
    ));
    if !j["timeout_s"].is_null() {
        rows.push(("timeout", format!("{} s", text(&j["timeout_s"]))));
    }
    rows.push(("created", text(&j["created_at"])));
    rows.push(("started", text(&j["started_at"])));
    rows.push(("finished", text(&j["finished_at"])));
    if !j["retry_at"].is_null() {
        rows.push(("retry at", text(&j["retry_at"])));
    }
    if !j["exit_code"].is_null() {
        rows.push(("exit code", text(&j["exit_code"])));
    }
    if !j["error"].is_null() {
        rows.push(("error", text(&j["error"])));
    }
    if let Some(n) = j["needs"].as_array().filter(|n| !n.is_empty()) {
        let needs: Vec<String> = n
            .iter()
            .map(|id| match by_id.get(&text(id)) {
                Some(x) => format!("{} [{}]", text(&x["key"]), text(&x["state"])),
                None => text(id),
            })
            .collect();
        rows.push(("needs", needs.join(", ")));
    }
    if let Some(t) = j["tags"].as_object() {
        let tags: Vec<String> = t
            .iter()
            .filter(|(_, v)| !v.is_null() && v.as_object().is_none_or(|m| !m.is_empty()))
            .map(|(k, v)| {
                if k == "labels" {
                    format!("labels={v}")
                } else {
                    format!("{k}={}", text(v))
                }
            })
            .collect();
        rows.push(("tags", tags.join(" ")));
    }
    if let Some(r) = j.get("result").filter(|r| !r.is_null()) {
        rows.push(("result", r.to_string()));
    }
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        println!("{k:<w$}  {v}", k = format!("{k}:"), w = w + 1);
    }
    if let Some(c) = j["children"].as_array().filter(|c| !c.is_empty()) {
        println!("children:");
        let mut kids = Vec::new();
        for id in c {
            let id = text(id);
            kids.push(match by_id.get(&id) {
                Some(x) => vec![
                    format!("  {id}"),
                    text(&x["key"]),
                    format!("[{}]", text(&x["state"])),
                    text(&x["name"]),
                ],
                None => vec![format!("  {id}")],
            });
        }
        print_table(&kids);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// jobs tree

/// One line of a drawn job: key, state, and the name when it says more than the key.
fn job_line(j: &Value) -> String {
    let key = text(&j["key"]);
    let name = text(&j["name"]);
    let mut s = format!("{key} [{}]", text(&j["state"]));
    if name != key && !name.is_empty() {
        s.push_str(&format!(" {name}"));
    }
    if let Some(c) = j["exit_code"].as_i64().filter(|c| *c != 0) {
        s.push_str(&format!(" (exit {c})"));
    }
    if let Some(e) = j["error"].as_str() {
        s.push_str(&format!(" — {e}"));
    }
    s
}

/// Draws a nested tree (from `GET /jobs/{id}/tree`) with each job's id in front, without
/// recursion: trees may be deep.
fn render_tree(root: &Value) -> String {
    let mut out = format!("tree {} {}", text(&root["tree"]), text(&root["tree_state"]));
    if let Some(f) = root["on_failure"].as_str() {
        out.push_str(&format!(" (on failure: {f})"));
    }
    out.push('\n');
    let line = |out: &mut String, j: &Value, drawing: &str| {
        out.push_str(&text(&j["id"]));
        out.push_str("  ");
        out.push_str(drawing);
        out.push_str(&job_line(j));
        out.push('\n');
    };
    line(&mut out, root, "");
    // (job, the prefix of its line, whether it is the last of its siblings)
    let mut stack: Vec<(&Value, String, bool)> = Vec::new();
    for (i, k) in kids(root).iter().enumerate().rev() {
        stack.push((k, String::new(), i + 1 == kids(root).len()));
    }
    while let Some((j, prefix, last)) = stack.pop() {
        line(
            &mut out,
            j,
            &format!("{prefix}{}", if last { "└─ " } else { "├─ " }),
        );
        let child_prefix = format!("{prefix}{}", if last { "   " } else { "│  " });
        for (i, k) in kids(j).iter().enumerate().rev() {
            stack.push((k, child_prefix.clone(), i + 1 == kids(j).len()));
        }
    }
    out
}

/// The nested tree of job `id` (for a child: its part of the tree), with the tree's state.
fn subtree(client: &Client, id: &str) -> Result<Value> {
    let whole = whole_tree(client, id)?;
    if whole["id"] == id {
        return Ok(whole);
    }
    let mut part = all_jobs(&whole)
        .into_iter()
        .find(|j| j["id"] == id)
        .cloned()
        .ok_or_else(|| anyhow!("job {id} is not in its tree"))?;
    for k in ["tree_state", "on_failure"] {
        part[k] = whole[k].clone();
    }
    Ok(part)
}

fn jobs_tree(a: TreeArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let id = job_id(&client, &a.id)?;
    if a.follow {
        let state = follow_tree(&client, &id)?;
        return finish(&id, &state);
    }
    let t = subtree(&client, &id)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&t)?);
    } else {
        print!("{}", render_tree(&t));
    }
    Ok(())
}

/// Redraws the tree until it ends (on a terminal: in place; else a new snapshot per change).
/// Gives the tree's final state.
fn follow_tree(client: &Client, id: &str) -> Result<String> {
    let tty = std::io::stdout().is_terminal();
    let mut last = String::new();
    loop {
        let t = subtree(client, id)?;
        let drawn = render_tree(&t);
        if drawn != last {
            let mut out = std::io::stdout().lock();
            if tty {
                write!(out, "\x1b[H\x1b[2J{drawn}")?;
            } else {
                if !last.is_empty() {
                    writeln!(out)?;
                }
                write!(out, "{drawn}")?;
            }
            out.flush()?;
            last = drawn;
        }
        let state = t["tree_state"].as_str().unwrap_or("running");
        if state != "running" {
            return Ok(state.to_string());
        }
        std::thread::sleep(POLL);
    }
}

// ---------------------------------------------------------------------------------------------
// jobs logs, abort

/// Copies a body to stdout as it arrives.
fn stream_to_stdout(resp: Resp) -> Result<()> {
    let mut reader = resp.into_body().into_reader();
    let mut buf = vec![0u8; 16 * 1024];
    let stdout = std::io::stdout();
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => bail!("the log stream broke: {e}"),
        };
        let mut out = stdout.lock();
        if let Err(e) = out.write_all(&buf[..n]).and_then(|_| out.flush()) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(e.into());
        }
    }
    Ok(())
}

fn log_path(id: &str) -> String {
    format!("/api/v1/jobs/{}/log", seg(id))
}

fn is_final(j: &Value) -> bool {
    matches!(
        j["state"].as_str(),
        Some("succeeded" | "failed" | "aborted")
    )
}

/// Whether a node's `workspaces` label lets it run jobs of `ws`.
fn node_takes(n: &Value, ws: &str) -> bool {
    n["labels"]["workspaces"]
        .as_str()
        .is_some_and(|w| w.split(',').any(|x| x.trim() == ws || x.trim() == "*"))
}

/// Why a waiting job has not started, as well as the client can tell: a retry's backoff, the
/// jobs it waits for, or where it is queued (the nodes it may run on and their states).
fn waiting_reason(client: &Client, j: &Value) -> String {
    if let Some(at) = j["retry_at"].as_str() {
        let why = j["error"]
            .as_str()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        return format!("an attempt failed{why}; the next one starts at {at}");
    }
    let deps: Vec<String> = j["children"]
        .as_array()
        .into_iter()
        .chain(j["needs"].as_array())
        .flatten()
        .map(text)
        .collect();
    if !deps.is_empty() {
        if let Ok(tree) = whole_tree(client, &text(&j["id"])) {
            let jobs = all_jobs(&tree);
            let pending: Vec<String> = deps
                .iter()
                .filter_map(|d| jobs.iter().find(|x| text(&x["id"]) == *d))
                .filter(|x| x["state"] != "succeeded")
                .map(|x| format!("{} [{}]", text(&x["key"]), text(&x["state"])))
                .collect();
            if !pending.is_empty() {
                return format!("it starts once these succeed: {}", pending.join(", "));
            }
        }
    }
    if j["exec"].is_null() && j["shell"].is_null() && j["noop"].is_null() {
        return "a group: it ends with its children".into();
    }
    let Ok(nodes) = client.get_json("/api/v1/nodes", &[]) else {
        return "queued for a node".into();
    };
    let want = j["want_node"].as_str();
    let selector = j["node_selector"].as_object();
    let fits: Vec<&Value> = items(&nodes)
        .iter()
        .filter(|n| want.is_none_or(|w| n["name"] == w || n["id"] == w))
        .filter(|n| selector.is_none_or(|s| s.iter().all(|(k, v)| n["labels"][k] == *v)))
        .collect();
    let named = |ns: &[&Value]| {
        ns.iter()
            .map(|n| format!("{} ({})", text(&n["name"]), text(&n["state"])))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if fits.is_empty() {
        return match (want, selector) {
            (Some(w), _) => format!("queued for node {w:?}, which has not joined"),
            (None, Some(s)) if !s.is_empty() => {
                format!(
                    "queued for a node with labels {}, and none has joined",
                    Value::Object(s.clone())
                )
            }
            _ => "queued: no node has joined".into(),
        };
    }
    let ready: Vec<&Value> = fits
        .iter()
        .copied()
        .filter(|n| n["state"] == "ready")
        .collect();
    if ready.is_empty() {
        return match fits.as_slice() {
            [n] => {
                let state = text(&n["state"]);
                let fix = if state == "draining" {
                    format!(
                        " (`muster nodes undrain {}` gives it jobs again)",
                        text(&n["name"])
                    )
                } else {
                    String::new()
                };
                format!(
                    "queued for node {}, which is {state}{fix}",
                    text(&n["name"])
                )
            }
            all => format!("queued: none of its nodes is ready: {}", named(all)),
        };
    }
    let ws = text(&j["tags"]["workspace"]);
    let taking: Vec<&Value> = ready
        .iter()
        .copied()
        .filter(|n| node_takes(n, &ws))
        .collect();
    if taking.is_empty() {
        return format!(
            "queued: the ready nodes it may run on ({}) take no jobs of workspace {ws:?} (node label workspaces=...)",
            named(&ready)
        );
    }
    match taking.as_slice() {
        [n] => format!(
            "queued for a free slot on node {} ({} slots)",
            text(&n["name"]),
            text(&n["slots"])
        ),
        all => format!("queued for a free slot on one of {}", named(all)),
    }
}

/// Waits while job `id` is waiting, saying why (again whenever that changes); gives the job once
/// it has started or ended.
fn wait_for_start(client: &Client, id: &str, mut j: Value) -> Result<Value> {
    let job_path = format!("/api/v1/jobs/{}", seg(id));
    let mut said = String::new();
    let mut asked = std::time::Instant::now() - Duration::from_secs(60);
    while j["state"] == "waiting" {
        // The reason costs a look at the tree and the nodes: not on every poll.
        if asked.elapsed() >= Duration::from_secs(1) {
            let why = waiting_reason(client, &j);
            if why != said {
                eprintln!("muster: job {id} is waiting: {why}");
                said = why;
            }
            asked = std::time::Instant::now();
        }
        std::thread::sleep(POLL);
        j = client.get_json(&job_path, &[])?;
    }
    Ok(j)
}

/// Follows a job's log until the job ends, attempt after attempt when it is retried; a job that
/// has not started is waited for. Gives the job as it ended.
fn follow_log(client: &Client, id: &str) -> Result<Value> {
    let job_path = format!("/api/v1/jobs/{}", seg(id));
    let j = wait_for_start(client, id, client.get_json(&job_path, &[])?)?;
    let mut attempt = j["attempt"].as_u64().unwrap_or(1).max(1);
    loop {
        let q = [
            ("follow", "true".to_string()),
            ("attempt", attempt.to_string()),
        ];
        let resp = client.get(&log_path(id), &q)?;
        if !resp.status().is_success() {
            return Err(http_error(resp));
        }
        stream_to_stdout(resp)?;
        // The stream ends with the attempt; wait for the job to end or start another attempt.
        loop {
            let j = client.get_json(&job_path, &[])?;
            if is_final(&j) {
                return Ok(j);
            }
            let now = j["attempt"].as_u64().unwrap_or(attempt);
            if now > attempt {
                eprintln!("muster: attempt {now} of job {id}");
                attempt = now;
                break;
            }
            std::thread::sleep(POLL);
        }
    }
}

/// How a followed job ended, as the command's result: an error (exit 1) unless it succeeded.
fn job_ended(id: &str, j: &Value) -> Result<()> {
    if j["state"] == "succeeded" {
        return Ok(());
    }
    let mut how = text(&j["state"]);
    if let Some(c) = j["exit_code"].as_i64().filter(|c| *c != 0) {
        how.push_str(&format!(" (exit {c})"));
    }
    if let Some(e) = j["error"].as_str() {
        how.push_str(&format!(": {e}"));
    }
    bail!("job {id} ended {how}")
}

fn jobs_logs(a: LogsArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let id = job_id(&client, &a.id)?;
    if a.follow && a.attempt.is_none() {
        let j = follow_log(&client, &id)?;
        return job_ended(&id, &j);
    }
    let j = client.get_json(&format!("/api/v1/jobs/{}", seg(&id)), &[])?;
    let latest = j["attempt"].as_u64().unwrap_or(1);
    let asked = a.attempt.map_or(latest, u64::from);
    if j["state"] == "waiting" && asked == latest && !a.follow {
        eprintln!(
            "muster: job {id} has no log yet: it is waiting: {}; `muster jobs logs -f {}` waits for it",
            waiting_reason(&client, &j),
            a.id
        );
        return Ok(());
    }
    let mut q = Vec::new();
    if let Some(n) = a.attempt {
        q.push(("attempt", n.to_string()));
    }
    if a.follow {
        q.push(("follow", "true".to_string()));
    }
    let resp = client.get(&log_path(&id), &q)?;
    if !resp.status().is_success() {
        return Err(http_error(resp));
    }
    stream_to_stdout(resp)?;
    if a.follow {
        // One attempt followed to its end: its outcome is the job's only if it was the last.
        let j = client.get_json(&format!("/api/v1/jobs/{}", seg(&id)), &[])?;
        if is_final(&j) && j["attempt"].as_u64() == Some(asked) {
            return job_ended(&id, &j);
        }
    }
    Ok(())
}

fn jobs_abort(a: AbortArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let id = job_id(&client, &a.id)?;
    let resp = client.post(&format!("/api/v1/jobs/{}/abort", seg(&id)), &json!({}), &[])?;
    if resp.status().as_u16() == 409 {
        return Err(anyhow!("cannot abort: {}", http_error(resp)));
    }
    let v = json_body(resp)?;
    println!(
        "aborting tree {} (job {})",
        text(&v["tree"]),
        text(&v["id"])
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// logout

fn logout(a: LogoutArgs) -> Result<()> {
    // The saved login is what goes: a MUSTER_TOKEN from the environment is not touched (revoke
    // an API token with `muster tokens revoke`).
    let path = credentials_path()?;
    let Some(saved) = load_credentials()? else {
        bail!("not logged in (no saved credentials in {})", path.display());
    };
    let base = normalize_url(&saved.server);
    if let Some(s) = a.server.server.as_deref().filter(|s| !s.trim().is_empty()) {
        if normalize_url(s) != base {
            bail!(
                "not logged in to {} (the saved login is for {base})",
                normalize_url(s)
            );
        }
    }
    let client = Client::new(base.clone(), Some(saved.token.clone()))?;
    let revoked = match client.post("/api/v1/logout", &json!({}), &[]) {
        // 401: the token had already expired or been revoked; nothing left to revoke.
        Ok(resp) if resp.status().is_success() || resp.status().as_u16() == 401 => Ok(()),
        Ok(resp) => Err(http_error(resp)),
        Err(e) => Err(e),
    };
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => bail!("cannot remove {}: {e}", path.display()),
    }
    if let Err(e) = revoked {
        bail!("forgot the saved login, but {base} did not revoke its token (it stays valid until it expires): {e:#}");
    }
    println!("logged out of {base} ({:?})", saved.username);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// users

fn yes_no(v: &Value) -> String {
    match v.as_bool() {
        Some(true) => "yes".into(),
        Some(false) => "no".into(),
        None => text(v),
    }
}

fn items(v: &Value) -> &[Value] {
    v["items"].as_array().map(Vec::as_slice).unwrap_or_default()
}

fn users_ls(a: ListArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let v = client.get_json("/api/v1/users", &[])?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if items(&v).is_empty() {
        eprintln!("muster: no users");
        return Ok(());
    }
    let mut rows = vec![["NAME", "ADMIN", "CREATED"].map(String::from).to_vec()];
    for u in items(&v) {
        rows.push(vec![
            text(&u["name"]),
            yes_no(&u["admin"]),
            short_time(&u["created_at"]),
        ]);
    }
    print_table(&rows);
    Ok(())
}

fn users_add(a: UserAddArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let password = read_password(a.password_stdin)?;
    let (_, v) = client.post_json(
        "/api/v1/users",
        &json!({"username": a.name, "password": password, "admin": a.admin}),
        &[],
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "user {:?} added{} (with a workspace of the same name)",
            text(&v["name"]),
            if v["admin"].as_bool() == Some(true) {
                " as a cluster admin"
            } else {
                ""
            }
        );
    }
    Ok(())
}

fn users_rm(a: NameArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    client.delete_ok(&format!("/api/v1/users/{}", seg(&a.name)))?;
    println!("user {:?} removed", a.name);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// workspaces

fn workspaces_ls(a: ListArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let v = client.get_json("/api/v1/workspaces", &[])?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if items(&v).is_empty() {
        eprintln!("muster: you belong to no workspace (a workspace admin can add you: muster workspaces grant WS USER ROLE)");
        return Ok(());
    }
    let mut rows = vec![["NAME", "YOUR ROLE", "MEMBERS"].map(String::from).to_vec()];
    for w in items(&v) {
        let members: Vec<String> = w["members"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|m| format!("{}:{}", text(&m["user"]), text(&m["role"])))
            .collect();
        rows.push(vec![text(&w["name"]), text(&w["role"]), members.join(", ")]);
    }
    print_table(&rows);
    Ok(())
}

fn workspaces_add(a: NameArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let (_, v) = client.post_json("/api/v1/workspaces", &json!({"name": a.name}), &[])?;
    println!("workspace {:?} added; you are its admin", text(&v["name"]));
    Ok(())
}

fn member_path(ws: &str, user: &str) -> String {
    format!("/api/v1/workspaces/{}/members/{}", seg(ws), seg(user))
}

fn workspaces_grant(a: GrantArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let resp = client.put(
        &member_path(&a.workspace, &a.user),
        &json!({"role": a.role}),
    )?;
    let v = json_body(resp)?;
    println!(
        "{:?} is now {} in workspace {:?}",
        a.user,
        v["role"].as_str().unwrap_or(&a.role),
        a.workspace
    );
    Ok(())
}

fn workspaces_revoke(a: RevokeArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    client.delete_ok(&member_path(&a.workspace, &a.user))?;
    println!("{:?} is no longer in workspace {:?}", a.user, a.workspace);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// tokens

/// `30d`, `12h`, `90m`, `3600s` or bare seconds → seconds (at least 1).
fn parse_duration_s(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let mult: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => {
            return Err(format!(
                "{s:?} is not a duration: give e.g. 30d, 12h, 90m or 3600s"
            ))
        }
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration: give e.g. 30d, 12h, 90m or 3600s"))?;
    let secs = n
        .checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too long"))?;
    if secs == 0 {
        return Err("a token must live at least 1 s".into());
    }
    Ok(secs)
}

fn scopes_text(v: &Value) -> String {
    match v.as_array() {
        Some(a) => a.iter().map(text).collect::<Vec<_>>().join(","),
        None => text(v),
    }
}

fn tokens_ls(a: TokensLsArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let mut q = Vec::new();
    if a.all {
        q.push(("all", "true".to_string()));
    }
    let v = client.get_json("/api/v1/tokens", &q)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if items(&v).is_empty() {
        eprintln!("muster: no API tokens (make one: muster tokens create NAME --scopes read)");
        return Ok(());
    }
    let mut rows = vec![["ID", "PREFIX", "NAME", "USER", "SCOPES", "EXPIRES"]
        .map(String::from)
        .to_vec()];
    for t in items(&v) {
        rows.push(vec![
            text(&t["id"]),
            text(&t["prefix"]),
            text(&t["name"]),
            text(&t["user"]),
            scopes_text(&t["scopes"]),
            if t["expires_at"].is_null() {
                "never".into()
            } else {
                short_time(&t["expires_at"])
            },
        ]);
    }
    print_table(&rows);
    Ok(())
}

fn tokens_create(a: TokenCreateArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let scopes: Vec<&str> = a
        .scopes
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .collect();
    let mut body = json!({"name": a.name, "scopes": scopes});
    if let Some(s) = a.expires_in {
        body["expires_in_s"] = json!(s);
    }
    let (_, v) = client.post_json("/api/v1/tokens", &body, &[])?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let token = v["token"]
        .as_str()
        .ok_or_else(|| anyhow!("the server gave no token"))?;
    eprintln!(
        "token {:?} (id {}, scopes {}, expires {}); it is shown only once:",
        text(&v["name"]),
        text(&v["id"]),
        scopes_text(&v["scopes"]),
        if v["expires_at"].is_null() {
            "never".to_string()
        } else {
            text(&v["expires_at"])
        }
    );
    println!("{token}");
    Ok(())
}

fn tokens_revoke(a: IdArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    client.delete_ok(&format!("/api/v1/tokens/{}", seg(&a.id)))?;
    println!("token {} revoked", a.id);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// perf

fn perf_summary(a: PerfSummaryArgs) -> Result<()> {
    let dir = a
        .data_dir
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("muster-data"));
    let out = muster_server::perf::summary(&dir, a.run).map_err(anyhow::Error::msg)?;
    print!("{out}");
    Ok(())
}

fn node_path(node: &str) -> String {
    format!("/api/v1/nodes/{}", seg(node))
}

fn nodes_ls(a: ListArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let v = client.get_json("/api/v1/nodes", &[])?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if items(&v).is_empty() {
        eprintln!("muster: no node has joined (add one: muster nodes join-token)");
        return Ok(());
    }
    let mut rows = vec![["NAME", "STATE", "SLOTS", "LABELS", "LAST SEEN", "ID"]
        .map(String::from)
        .to_vec()];
    for n in items(&v) {
        let labels: Vec<String> = n["labels"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| format!("{k}={}", text(v))).collect())
            .unwrap_or_default();
        rows.push(vec![
            text(&n["name"]),
            text(&n["state"]),
            text(&n["slots"]),
            labels.join(","),
            text(&n["last_seen"]),
            text(&n["id"]),
        ]);
    }
    print_table(&rows);
    Ok(())
}

fn nodes_show(a: NodeArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let v = client.get_json(&node_path(&a.node), &[])?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    for k in ["name", "id", "state", "slots", "last_seen", "version"] {
        println!("{:<10} {}", format!("{k}:"), text(&v[k]));
    }
    if let Some(m) = v["labels"].as_object() {
        for (k, l) in m {
            println!("{:<10} {k}={}", "label:", text(l));
        }
    }
    Ok(())
}

fn nodes_label(a: NodeLabelArgs) -> Result<()> {
    let mut labels = serde_json::Map::new();
    for l in &a.labels {
        if let Some((k, v)) = l.split_once('=') {
            labels.insert(k.to_string(), json!(v));
        } else if let Some(k) = l.strip_suffix('-') {
            labels.insert(k.to_string(), Value::Null);
        } else {
            anyhow::bail!("{l:?} is neither KEY=VALUE (set) nor KEY- (remove)");
        }
    }
    let client = authed_client(&a.server)?;
    let v = json_body(client.patch(&node_path(&a.node), &json!({"labels": labels}))?)?;
    println!("node {} labels: {}", text(&v["name"]), v["labels"]);
    Ok(())
}

fn nodes_patch(a: NodeArgs, body: Value, what: &str) -> Result<()> {
    let client = authed_client(&a.server)?;
    let v = json_body(client.patch(&node_path(&a.node), &body)?)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("node {} is {what}", text(&v["name"]));
    }
    Ok(())
}

fn nodes_wait(a: NodeWaitArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(a.timeout);
    let mut last = String::new();
    loop {
        let resp = client.get(&node_path(&a.node), &[])?;
        let state = match resp.status().as_u16() {
            404 => "not joined yet".to_string(),
            _ => text(&json_body(resp)?["state"]),
        };
        if state == "ready" {
            println!("node {} is ready", a.node);
            return Ok(());
        }
        if state != last {
            eprintln!(
                "muster: node {} is {state}; waiting for it to be ready…",
                a.node
            );
            last = state.clone();
        }
        if std::time::Instant::now() >= deadline {
            bail!("node {} is still {state} after {} s", a.node, a.timeout);
        }
        std::thread::sleep(POLL);
    }
}

fn nodes_rm(a: NodeArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    client.delete_ok(&node_path(&a.node))?;
    println!("node {:?} removed; its credential is revoked", a.node);
    Ok(())
}

fn nodes_join_token(a: JoinTokenArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let (_, v) = client.post_json(
        "/api/v1/nodes/join-token",
        &json!({"ttl_s": a.ttl, "uses": a.uses}),
        &[],
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        eprintln!(
            "join token for {} agent(s), valid until {}; on the new node run:",
            a.uses,
            text(&v["expires_at"])
        );
        println!("{}", text(&v["command"]));
        if let Some(hint) = v["hint"].as_str() {
            eprintln!("muster: note: {hint}");
        }
    }
    Ok(())
}

fn scripts_ls(a: ListArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let v = client.get_json("/api/v1/scripts", &[])?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if items(&v).is_empty() {
        eprintln!(
            "muster: no node control scripts (commit executables to {} in HQ, or PUT /api/v1/scripts/NAME)",
            v["dir"].as_str().unwrap_or("scripts/")
        );
    }
    for s in items(&v) {
        println!("{}", text(&s["name"]));
    }
    Ok(())
}

/// Prints HQ's status as lines for a person.
fn print_hq(v: &Value) {
    let head = &v["head"];
    println!("path     {}", text(&v["path"]));
    println!(
        "remote   {}",
        v["remote"]
            .as_str()
            .filter(|r| !r.is_empty())
            .unwrap_or("(none)")
    );
    println!("branch   {}", text(&v["branch"]));
    if let Some(e) = v["error"].as_str() {
        println!("error    {e}");
    }
    if head.is_object() {
        let id = text(&head["id"]);
        println!(
            "head     {} {}",
            &id[..id.len().min(12)],
            text(&head["message"])
        );
    }
    if v["last_sync"].is_object() {
        let s = &v["last_sync"];
        println!(
            "sync     {} at {}: {}",
            if s["ok"] == true { "ok" } else { "FAILED" },
            text(&s["at"]),
            text(&s["message"])
        );
    }
    if v["conflict"].is_object() {
        println!("conflict {}", text(&v["conflict"]["message"]));
    }
    for p in v["problems"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        println!("problem  {}", text(&p["message"]));
    }
    for w in v["watchers"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        println!(
            "watcher  {:<8} {:<7} {:>5} ms  {}  {}",
            text(&w["name"]),
            text(&w["outcome"]),
            w["duration_ms"].as_u64().unwrap_or(0),
            text(&w["started_at"]),
            text(&w["message"])
        );
    }
    for t in v["reaper"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        println!(
            "reaper   {:<8} {:<7} {}  {}",
            text(&t["name"]),
            if t["ok"] == true { "ok" } else { "failed" },
            text(&t["started_at"]),
            text(&t["message"])
        );
    }
}

fn hq_status(a: ListArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let v = client.get_json("/api/v1/hq", &[])?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_hq(&v);
    }
    Ok(())
}

fn hq_sync(a: ListArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let (_, v) = client.post_json("/api/v1/hq/sync", &json!({}), &[])?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if v["synced"] != true {
        eprintln!("muster: the pulse has not finished yet; see `muster hq status`");
    }
    if v["last_sync"].is_object() {
        println!("{}", text(&v["last_sync"]["message"]));
    } else {
        println!("no remote set: nothing to sync");
    }
    if v["conflict"].is_object() {
        bail!("{}", text(&v["conflict"]["message"]));
    }
    if v["last_sync"]["ok"] == false {
        bail!("the sync failed");
    }
    Ok(())
}

fn hq_orders(a: HqOrdersArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    match a.action.as_slice() {
        [] => {}
        [verb, file] if verb == "resolve" => {
            let (_, v) =
                client.post_json("/api/v1/hq/orders/resolve", &json!({"file": file}), &[])?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                eprintln!("{file} resolved: its later lines run from the next pulse");
            }
            return Ok(());
        }
        _ => bail!("usage: muster hq orders [resolve FILE] [--file F] [--state S]"),
    }
    let mut q = Vec::new();
    if let Some(f) = &a.file {
        q.push(("file", f.clone()));
    }
    if let Some(s) = &a.state {
        q.push(("state", s.clone()));
    }
    let v = client.get_json("/api/v1/hq/orders", &q)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    for f in v["files"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        if let Some(why) = f["stopped"].as_str() {
            eprintln!(
                "muster: {} is STOPPED: {why}; an admin resolves it with `muster hq orders resolve {}`",
                text(&f["file"]),
                text(&f["file"])
            );
        }
    }
    if items(&v).is_empty() {
        eprintln!("muster: no orders yet (append lines to deployer/orders in HQ and commit)");
    }
    for o in items(&v) {
        let tree = o["tree"].as_str().unwrap_or("-");
        println!(
            "{}:{:<5} {:<9} {:<36} {}{}",
            text(&o["file"]),
            o["line"].as_u64().unwrap_or(0),
            text(&o["state"]),
            tree,
            text(&o["text"]),
            o["message"]
                .as_str()
                .filter(|m| !m.is_empty())
                .map(|m| format!("  ({m})"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

fn hq_log(a: HqLogArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let v = client.get_json("/api/v1/hq/log", &[("limit", a.limit.to_string())])?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    for c in items(&v) {
        let id = text(&c["id"]);
        println!(
            "{} {} {:<12} {}",
            &id[..id.len().min(12)],
            text(&c["at"]),
            text(&c["author"]),
            text(&c["message"])
        );
    }
    Ok(())
}

fn scripts_run(a: ScriptRunArgs) -> Result<()> {
    let mut nodes = serde_json::Map::new();
    for kv in a.nodes.split(',').filter(|s| !s.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--nodes: {kv:?} is not KEY=VALUE"))?;
        nodes.insert(k.to_string(), json!(v));
    }
    let mut body = json!({"nodes": nodes, "args": a.args});
    if let Some(ws) = &a.workspace {
        body["workspace"] = json!(ws);
    }
    let client = authed_client(&a.server)?;
    let (_, v) = client.post_json(&format!("/api/v1/scripts/{}/run", seg(&a.name)), &body, &[])?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let n = v["jobs"]
            .as_array()
            .map(|j| j.len().saturating_sub(1))
            .unwrap_or(0);
        eprintln!(
            "script {} runs on {n} node(s); follow it with `muster jobs tree -f {}`",
            a.name,
            text(&v["id"])
        );
        println!("{}", text(&v["id"]));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// procs

#[derive(Subcommand)]
pub enum ProcsCmd {
    /// Start a process: from a JSON spec file, or the command after `--`. Prints its id.
    Run(Box<ProcRunArgs>),
    /// List processes, newest first.
    Ls(ProcLsArgs),
    /// Show one process.
    Show(ProcIdArgs),
    /// Print a process's log (with -f: follow it).
    Logs(ProcLogsArgs),
    /// Stop a process (its stop signal, SIGKILL after its kill grace).
    Stop(ProcIdArgs),
    /// Start a stopped or failed process again.
    Start(ProcIdArgs),
    /// Restart a process.
    Restart(ProcIdArgs),
    /// Stop and remove a process.
    Rm(ProcIdArgs),
}

#[derive(Args)]
pub struct ProcRunArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// A process spec in JSON (SPEC §5a); the flags below then change it.
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// Its name (default: the program's name).
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    workspace: Option<String>,
    /// Pin it to a node (by name or id).
    #[arg(long)]
    node: Option<String>,
    /// A node label it needs, KEY=VALUE (repeat for several).
    #[arg(long = "select", value_name = "KEY=VALUE")]
    selector: Vec<String>,
    /// A named port the node gives it (repeat for several): MUSTER_PORT_<NAME>, and PORT for
    /// a single one; `$PORT` in the command is replaced by it.
    #[arg(long = "port", value_name = "NAME")]
    ports: Vec<String>,
    /// An environment variable, KEY=VALUE (repeat for several).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// always (default), on-failure or never.
    #[arg(long)]
    restart: Option<String>,
    /// At most this many restarts within the restart window, then failed.
    #[arg(long)]
    max_restarts: Option<u32>,
    /// Health check: GET this path on its (single, or --health-port) port, expecting 2xx.
    #[arg(long, value_name = "PATH")]
    health_http: Option<String>,
    /// Health check: connect to this named port.
    #[arg(long, value_name = "PORT")]
    health_tcp: Option<String>,
    /// The port of --health-http.
    #[arg(long, value_name = "PORT")]
    health_port: Option<String>,
    /// Limits: memory (64M, 1G), cpu (cores), pids.
    #[arg(long)]
    memory: Option<String>,
    #[arg(long)]
    cpu: Option<f64>,
    #[arg(long)]
    pids: Option<u64>,
    /// Run the arguments, joined with spaces, as a shell script instead of a program.
    #[arg(long)]
    shell: bool,
    /// Print the server's whole answer as JSON.
    #[arg(long)]
    json: bool,
    /// The command (after `--`).
    #[arg(last = true, value_name = "CMD")]
    cmd: Vec<String>,
}

#[derive(Args)]
pub struct ProcLsArgs {
    #[command(flatten)]
    server: ServerOpt,
    #[arg(long)]
    workspace: Option<String>,
    #[arg(long)]
    node: Option<String>,
    #[arg(long)]
    state: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ProcIdArgs {
    #[command(flatten)]
    server: ServerOpt,
    /// The process's id.
    id: String,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ProcLogsArgs {
    #[command(flatten)]
    server: ServerOpt,
    id: String,
    /// Follow the log as it grows.
    #[arg(short = 'f', long)]
    follow: bool,
}

fn key_values(what: &str, list: &[String]) -> Result<serde_json::Map<String, Value>> {
    let mut m = serde_json::Map::new();
    for kv in list {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("{what} {kv:?} is not KEY=VALUE"))?;
        m.insert(k.to_string(), json!(v));
    }
    Ok(m)
}

fn procs_run(a: ProcRunArgs) -> Result<()> {
    let mut spec = match &a.file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            serde_json::from_str::<Value>(&text)
                .with_context(|| format!("{} is not JSON", path.display()))?
        }
        None => json!({}),
    };
    if !spec.is_object() {
        bail!("a process spec is a JSON object");
    }
    if !a.cmd.is_empty() {
        if a.shell {
            spec["shell"] = json!(a.cmd.join(" "));
        } else {
            spec["exec"] = json!(a.cmd);
        }
    } else if a.file.is_none() {
        bail!("give the command after --, e.g. muster procs run --port http -- python3 -m http.server '$PORT'");
    }
    let name = a.name.clone().or_else(|| {
        spec["name"].as_str().map(str::to_string).or_else(|| {
            a.cmd.first().map(|c| {
                if a.shell {
                    "shell".to_string()
                } else {
                    c.rsplit('/').next().unwrap_or(c).to_string()
                }
            })
        })
    });
    spec["name"] = json!(name.unwrap_or_else(|| "process".into()));
    if let Some(ws) = &a.workspace {
        spec["tags"] = json!({"workspace": ws});
    }
    if let Some(n) = &a.node {
        spec["node"] = json!(n);
    }
    if !a.selector.is_empty() {
        spec["node_selector"] = Value::Object(key_values("--select", &a.selector)?);
    }
    if !a.ports.is_empty() {
        spec["ports"] = json!(a.ports);
    }
    if !a.env.is_empty() {
        spec["env"] = Value::Object(key_values("--env", &a.env)?);
    }
    if let Some(r) = &a.restart {
        spec["restart"] = json!(r);
    }
    if let Some(n) = a.max_restarts {
        spec["max_restarts"] = json!(n);
    }
    match (&a.health_http, &a.health_tcp) {
        (Some(_), Some(_)) => bail!("give --health-http or --health-tcp, not both"),
        (Some(path), None) => {
            spec["health"] = json!({"http": path});
            if let Some(p) = &a.health_port {
                spec["health"]["port"] = json!(p);
            }
        }
        (None, Some(port)) => spec["health"] = json!({"tcp": port}),
        (None, None) => {}
    }
    let mut limits = serde_json::Map::new();
    if let Some(m) = &a.memory {
        limits.insert("memory".into(), json!(m));
    }
    if let Some(c) = a.cpu {
        limits.insert("cpu".into(), json!(c));
    }
    if let Some(p) = a.pids {
        limits.insert("pids".into(), json!(p));
    }
    if !limits.is_empty() {
        spec["limits"] = Value::Object(limits);
    }
    let client = authed_client(&a.server)?;
    let (_, v) = client.post_json("/api/v1/processes", &spec, &[])?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{}", text(&v["id"]));
        eprintln!(
            "process {} ({}): {}",
            text(&v["name"]),
            text(&v["state"]),
            text(&v["reason"])
        );
    }
    Ok(())
}

/// `{"http": 20001}` → `http=20001`.
fn ports_text(v: &Value) -> String {
    let p: Vec<String> = v
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k}={v}")).collect())
        .unwrap_or_default();
    if p.is_empty() {
        "-".into()
    } else {
        p.join(",")
    }
}

/// How long since an RFC 3339 time, roughly (`3m`, `2h`).
fn since(v: &Value) -> String {
    let Some(t) = v.as_str().and_then(muster_core::Ts::parse) else {
        return "-".into();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let s = ((now - t.0) / 1000).max(0);
    match s {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn procs_ls(a: ProcLsArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let mut q: Vec<(&str, String)> = Vec::new();
    for (k, v) in [
        ("workspace", &a.workspace),
        ("node", &a.node),
        ("state", &a.state),
    ] {
        if let Some(v) = v {
            q.push((k, v.clone()));
        }
    }
    let v = client.get_json("/api/v1/processes", &q)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if items(&v).is_empty() {
        eprintln!("muster: no processes (start one: muster procs run --port http -- python3 -m http.server '$PORT')");
        return Ok(());
    }
    let mut rows = vec![[
        "ID", "STATE", "NAME", "NODE", "PORTS", "RESTARTS", "UPTIME", "REASON",
    ]
    .map(String::from)
    .to_vec()];
    for p in items(&v) {
        let running = matches!(
            p["state"].as_str(),
            Some("starting" | "healthy" | "unhealthy")
        );
        rows.push(vec![
            text(&p["id"]),
            text(&p["state"]),
            text(&p["name"]),
            text(&p["node"]),
            ports_text(&p["ports"]),
            text(&p["restarts"]),
            if running {
                since(&p["started_at"])
            } else {
                "-".into()
            },
            text(&p["reason"]),
        ]);
    }
    print_table(&rows);
    Ok(())
}

fn procs_show(a: ProcIdArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let p = client.get_json(&format!("/api/v1/processes/{}", seg(&a.id)), &[])?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
        return Ok(());
    }
    let what = if p["exec"].is_array() {
        p["exec"]
            .as_array()
            .map(|a| a.iter().map(text).collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    } else {
        text(&p["shell"])
    };
    let rows = [
        ("id", text(&p["id"])),
        ("name", text(&p["name"])),
        ("workspace", text(&p["workspace"])),
        (
            "state",
            format!("{} ({})", text(&p["state"]), text(&p["reason"])),
        ),
        ("node", text(&p["node"])),
        ("address", text(&p["address"])),
        ("ports", ports_text(&p["ports"])),
        ("pid", text(&p["pid"])),
        ("restarts", text(&p["restarts"])),
        ("started", short_time(&p["started_at"])),
        ("limits", text(&p["limits"]["status"])),
        ("runs", what),
    ];
    for (k, v) in rows {
        println!("{k:<10} {v}");
    }
    Ok(())
}

fn procs_logs(a: ProcLogsArgs) -> Result<()> {
    let client = authed_client(&a.server)?;
    let path = format!("/api/v1/processes/{}/log", seg(&a.id));
    let q = if a.follow {
        vec![("follow", "true".to_string())]
    } else {
        vec![]
    };
    let resp = client.get(&path, &q)?;
    if !resp.status().is_success() {
        return Err(http_error(resp));
    }
    stream_to_stdout(resp)
}

fn procs_verb(a: ProcIdArgs, verb: &str) -> Result<()> {
    let client = authed_client(&a.server)?;
    let path = format!("/api/v1/processes/{}", seg(&a.id));
    let resp = if verb == "rm" {
        client.delete(&path)?
    } else {
        client.post(&format!("{path}/{verb}"), &json!({}), &[])?
    };
    let v = json_body(resp)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let done = match verb {
            "stop" => "stopping",
            "start" => "starting",
            "restart" => "restarting",
            _ => "removed",
        };
        println!("{} {}: {done}", text(&v["name"]), text(&v["id"]));
    }
    Ok(())
}
