//! The name rule (SPEC §13) for users, workspaces, job keys, node names and the like.

/// Names that would collide with routes or HQ directories.
pub const RESERVED: &[&str] = &[
    "api",
    "assets",
    "healthz",
    "readyz",
    "metrics",
    "setup",
    "login",
    "services",
    "scripts",
    "uploads",
    "deployer",
    "interfaces",
    "verify",
    "batch",
];

/// The most characters of a caller's input an error message quotes (escapes included).
pub const QUOTE_MAX: usize = 80;

/// `text` quoted for an error message, as `{:?}` would, but cut after about [`QUOTE_MAX`]
/// characters (saying how long the whole was): an error never sends a big input back.
pub fn quote(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        let escaped: String = c.escape_debug().collect();
        if out.len() + escaped.len() > QUOTE_MAX {
            return format!("{out}\"… ({} bytes)", text.len());
        }
        out.push_str(&escaped);
    }
    out.push('"');
    out
}

/// Why a name was refused, as a sentence for the caller.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let b = name.as_bytes();
    let ok_end = |c: u8| c.is_ascii_alphanumeric();
    let ok_mid = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-';
    if b.is_empty()
        || b.len() > 63
        || !ok_end(b[0])
        || !ok_end(b[b.len() - 1])
        || !b.iter().all(|&c| ok_mid(c))
    {
        return Err(format!(
            "{what} {} must be 1-63 characters of letters, digits, '_', '.', '-', starting and ending with a letter or digit",
            quote(name)
        ));
    }
    if name.contains("__") {
        return Err(format!("{what} {} must not contain '__'", quote(name)));
    }
    if RESERVED.contains(&name) {
        return Err(format!("{what} {} is reserved", quote(name)));
    }
    Ok(())
}

/// Job names are free text: 1–200 printable characters.
pub fn check_job_name(name: &str) -> Result<(), String> {
    let n = name.chars().count();
    if n == 0 || n > 200 || name.chars().any(|c| c.is_control()) {
        return Err(format!(
            "job name {} must be 1-200 printable characters",
            quote(name)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_rule() {
        for good in ["a", "web-1", "A.b_c-9", &"x".repeat(63)] {
            assert!(check_name("name", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "a__b",
            "a b",
            "api",
            "é",
            &"x".repeat(64),
            "a/b",
        ] {
            assert!(check_name("name", bad).is_err(), "{bad}");
        }
        // Every name SPEC §13 reserves (routes, HQ's top-level directories, the yhat routes).
        let spec = "api assets healthz readyz metrics setup login services interfaces scripts \
                    uploads deployer verify batch";
        for reserved in spec.split_whitespace() {
            let e = check_name("workspace", reserved).unwrap_err();
            assert!(e.contains("reserved"), "{reserved}: {e}");
        }
        assert!(check_job_name("build the thing").is_ok());
        assert!(check_job_name("").is_err());
        assert!(check_job_name("a\nb").is_err());
    }

    #[test]
    fn errors_quote_little_of_the_input() {
        assert_eq!(quote("web-1"), "\"web-1\"");
        let big = "x".repeat(10 << 20);
        let q = quote(&big);
        assert!(q.len() < 120 && q.ends_with("(10485760 bytes)"), "{q}");
        // Escapes count: a name of control characters is cut as early.
        assert!(quote(&"\u{1}".repeat(1000)).len() < 120);
        for e in [
            check_name("workspace", &big).unwrap_err(),
            check_job_name(&big).unwrap_err(),
            check_name("node", &format!("a__{big}")).unwrap_err(),
        ] {
            assert!(e.len() < 300, "{} bytes", e.len());
        }
    }
}
