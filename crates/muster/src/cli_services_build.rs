//! A step's `[build]`, on the service's node: when its key has no artifacts yet, fetch the
//! source (HQ's directory as an archive from the server, or `git clone` at the planned
//! commit), run the command (`sh -c` in the source) or `actions/build` (with
//! `MUSTER_BUILD_DIR`), pack what the artifact globs match (files only: no link is followed or
//! kept) and upload it; then unpack the key's artifacts into the state dir's `artifacts/`.

use super::*;

/// Builds (unless cached) and fetches the artifacts of `b` (the step's `build`) into `into`.
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    client: &Client,
    base: &str,
    b: &Value,
    dir: Option<&Path>,
    ctx: &Value,
    env: &[(String, String)],
    mask: &Mask,
    root: &Path,
    into: &Path,
) -> Result<()> {
    let key = text(&b["key"]);
    let short = &key[..key.len().min(12)];
    if b["cached"].is_string() {
        println!("build {short}: cached (the same inputs were built before)");
    } else {
        println!("build {short}: needed");
        let work = root
            .join("builds")
            .join(format!("{short}.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        let res = build(client, base, b, dir, ctx, env, mask, &work);
        let _ = std::fs::remove_dir_all(&work);
        res?;
    }
    // The artifacts, unpacked beside and swapped in whole.
    let tmp = into.with_extension(format!("new.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    fetch_unpack(client, &format!("{base}/build/artifacts"), &tmp)?;
    let _ = std::fs::remove_dir_all(into);
    std::fs::rename(&tmp, into)
        .with_context(|| format!("cannot put the artifacts at {}", into.display()))?;
    println!("build {short}: artifacts at {}", into.display());
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn build(
    client: &Client,
    base: &str,
    b: &Value,
    dir: Option<&Path>,
    ctx: &Value,
    env: &[(String, String)],
    mask: &Mask,
    work: &Path,
) -> Result<()> {
    let src = work.join("src");
    match b["source"]["kind"].as_str() {
        Some("git") => {
            let (url, commit) = (text(&b["source"]["url"]), text(&b["source"]["commit"]));
            println!("build: git clone {url} at {commit}");
            git(
                &["clone", "--quiet", "--no-checkout", "--", &url],
                Some(&src),
            )?;
            git_in(&src, &["checkout", "--quiet", "--detach", &commit])?;
        }
        _ => {
            fetch_unpack(client, &format!("{base}/build/source"), &src)?;
            println!("build: source {} unpacked", text(&b["source"]["dir"]));
        }
    }
    let mut env = env.to_vec();
    env.push((
        "MUSTER_BUILD_DIR".into(),
        src.to_string_lossy().into_owned(),
    ));
    match b["command"].as_str() {
        Some(cmd) => {
            println!("build: sh -c {cmd:?}");
            let status = Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .current_dir(&src)
                .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .env("MUSTER_ACTION", "build")
                .stdin(Stdio::null())
                .status()
                .context("cannot run the build command")?;
            match status.code() {
                Some(0) => {}
                Some(c) => bail!("the build failed with exit code {c}"),
                None => bail!("the build was killed by a signal"),
            }
        }
        None => {
            let d = dir.context("no service directory for actions/build")?;
            let mut ctx = ctx.clone();
            ctx["action"] = json!("build");
            if matches!(run_action(d, "build", &ctx, &env, mask)?, Ran::Missing) {
                bail!("[build] has no command and the service no actions/build");
            }
        }
    }
    let globs: Vec<String> = b["artifacts"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let out = work.join("out");
    std::fs::create_dir_all(&out)?;
    let mut kept = 0usize;
    collect(&src, &src, &globs, &out, &mut kept)?;
    if kept == 0 {
        bail!("the build left no file that artifacts {globs:?} match");
    }
    let mut packed = Vec::new();
    archive::pack(&out, &mut packed).map_err(anyhow::Error::msg)?;
    let v = post_gzip(client, &format!("{base}/build"), packed)?;
    println!(
        "build: {kept} artifacts kept as {} ({} bytes)",
        text(&v["blob"]),
        text(&v["size"])
    );
    Ok(())
}

/// Copies every file under `at` whose path relative to `src` matches a glob into `out`, at
/// the same relative path. A matching link is an error (artifacts are files); `.git` is skipped.
fn collect(src: &Path, at: &Path, globs: &[String], out: &Path, kept: &mut usize) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(at)?.collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let rel = p
            .strip_prefix(src)
            .unwrap_or(&p)
            .to_string_lossy()
            .into_owned();
        if rel == ".git" {
            continue;
        }
        let meta = std::fs::symlink_metadata(&p)?;
        let matches = globs
            .iter()
            .any(|g| muster_core::service::glob_match(g, &rel));
        if meta.file_type().is_symlink() {
            if matches {
                bail!("artifact {rel} is a symbolic link: artifacts are files");
            }
        } else if meta.is_dir() {
            collect(src, &p, globs, out, kept)?;
        } else if meta.is_file() && matches {
            let dst = out.join(&rel);
            if let Some(parent) = dst.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::copy(&p, &dst).with_context(|| format!("cannot keep artifact {rel}"))?;
            *kept += 1;
        }
    }
    Ok(())
}

fn git(args: &[&str], into: Option<&Path>) -> Result<()> {
    let mut c = Command::new("git");
    c.args(args);
    if let Some(d) = into {
        c.arg(d);
    }
    let out = c
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .output()
        .context("cannot run git")?;
    if !out.status.success() {
        bail!(
            "git {} failed: {}",
            args.first().copied().unwrap_or(""),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn git_in(dir: &Path, args: &[&str]) -> Result<()> {
    let d = dir.to_string_lossy().into_owned();
    let mut all = vec!["-C", d.as_str()];
    all.extend_from_slice(args);
    git(&all, None)
}
