//! The name rule (SPEC §13) for users, workspaces, job keys, node names and the like.

/// Names that would collide with routes or HQ directories.
pub const RESERVED: &[&str] = &[
    "api", "assets", "healthz", "readyz", "metrics", "setup", "login", "services", "scripts",
    "uploads", "deployer",
];

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
            "{what} {name:?} must be 1-63 characters of letters, digits, '_', '.', '-', starting and ending with a letter or digit"
        ));
    }
    if name.contains("__") {
        return Err(format!("{what} {name:?} must not contain '__'"));
    }
    if RESERVED.contains(&name) {
        return Err(format!("{what} {name:?} is reserved"));
    }
    Ok(())
}

/// Job names are free text: 1–200 printable characters.
pub fn check_job_name(name: &str) -> Result<(), String> {
    let n = name.chars().count();
    if n == 0 || n > 200 || name.chars().any(|c| c.is_control()) {
        return Err(format!(
            "job name {name:?} must be 1-200 printable characters"
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
        assert!(check_job_name("build the thing").is_ok());
        assert!(check_job_name("").is_err());
        assert!(check_job_name("a\nb").is_err());
    }
}
