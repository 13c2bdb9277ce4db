//! The orders grammar and the identity of an order (SPEC §7), pure.
//!
//! An orders file is append-only: each line is one order, run exactly once. A line is
//! `VERB [WORD | KEY=VALUE ...] [-- ARG ...]`; words are split on whitespace, and a word may be
//! quoted with `'…'` or `"…"` to hold spaces. Blank lines and lines starting with `#` are no
//! orders (but part of the file, so editing them is an edit of the processed part like any other).
//!
//! An order's identity is its file, its line number, the hash of its text and the hash of the
//! file's prefix up to it ([`OrderId`]): the same line at the same place after the same prefix is
//! the same order, wherever and whenever it is read, which is what lets the server record it by
//! compare-and-set before it runs and derive the tree's idempotency key from it.

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// One parsed order line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OrderLine {
    /// The first word.
    pub verb: String,
    /// The plain words after the verb, before `--`.
    pub words: Vec<String>,
    /// The `KEY=VALUE` words before `--`, in order of their keys.
    pub params: BTreeMap<String, String>,
    /// Everything after `--`, verbatim words.
    pub args: Vec<String>,
}

/// Splits `text` into words: whitespace separates, `'…'` and `"…"` quote (no escapes).
fn split_words(text: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in text.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => cur.push(c),
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                in_word = true;
            }
            None if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            None => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        return Err("a quote is not closed".into());
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

fn is_verb(w: &str) -> bool {
    let b = w.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_')
}

fn is_key(k: &str) -> bool {
    let b = k.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-' | b'/'))
}

/// The longest order line accepted, in bytes.
pub const MAX_LINE: usize = 4096;

/// Parses one line: `Ok(None)` for a blank or comment line, `Err` with the reason for a
/// malformed one.
pub fn parse_line(text: &str) -> Result<Option<OrderLine>, String> {
    let text = text.strip_suffix('\r').unwrap_or(text);
    if text.len() > MAX_LINE {
        return Err(format!("the line is longer than {MAX_LINE} bytes"));
    }
    if text.chars().any(|c| c.is_control() && c != '\t') {
        return Err("the line holds control characters".into());
    }
    let t = text.trim();
    if t.is_empty() || t.starts_with('#') {
        return Ok(None);
    }
    let words = split_words(t)?;
    let mut it = words.into_iter();
    let verb = it.next().unwrap_or_default();
    if !is_verb(&verb) {
        return Err("an order starts with its verb (lower-case letters, digits, '-', '_')".into());
    }
    let mut line = OrderLine {
        verb,
        ..Default::default()
    };
    let mut after = false;
    for w in it {
        if after {
            line.args.push(w);
        } else if w == "--" {
            after = true;
        } else if let Some((k, v)) = w.split_once('=') {
            if !is_key(k) {
                return Err(format!("{k:?} is not a valid KEY of KEY=VALUE"));
            }
            if line.params.insert(k.to_string(), v.to_string()).is_some() {
                return Err(format!("{k:?} is given twice"));
            }
        } else {
            line.words.push(w);
        }
    }
    Ok(Some(line))
}

/// Lower-case hex.
/// Lower-case hex (by table: a plan hashes thousands of parts, and a `format!` per byte was a
/// fifth of its time).
pub fn hex(bytes: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for x in bytes {
        s.push(D[(x >> 4) as usize] as char);
        s.push(D[(x & 15) as usize] as char);
    }
    s
}

/// SHA-256 of `data`, as hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// What makes an order itself: its file, its line (from 1), the hash of its text and the hash
/// of everything before it in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderId {
    pub file: String,
    pub line: u32,
    pub line_hash: String,
    pub prefix_hash: String,
}

impl OrderId {
    /// The identity as one hash (hex), from which the order's tree's idempotency key comes.
    pub fn digest(&self) -> String {
        sha256_hex(
            format!(
                "{}\n{}\n{}\n{}",
                self.file, self.line, self.line_hash, self.prefix_hash
            )
            .as_bytes(),
        )
    }

    /// The idempotency key of the order's tree.
    pub fn idempotency_key(&self) -> String {
        idempotency_key(&self.digest())
    }
}

/// The idempotency key of the tree of the order whose identity has `digest`.
pub fn idempotency_key(digest: &str) -> String {
    format!("hq-order:{digest}")
}

/// One line of an orders file with its identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Numbered<'a> {
    pub id: OrderId,
    pub text: &'a str,
    /// The hash of the prefix that ends after this line (the next line's `prefix_hash`).
    pub through_hash: String,
}

/// Every line of `content` (an orders file named `file`) with its identity. Lines are taken as
/// ending in `\n` whether or not the last one does, so appending after an unterminated last line
/// changes no earlier identity.
pub fn number_lines<'a>(file: &str, content: &'a str) -> Vec<Numbered<'a>> {
    let mut h = Sha256::new();
    let mut prefix = hex(&h.clone().finalize());
    let mut out = Vec::new();
    let body = content.strip_suffix('\n').unwrap_or(content);
    if body.is_empty() && content.len() <= 1 {
        return out;
    }
    for (i, text) in body.split('\n').enumerate() {
        h.update(text.as_bytes());
        h.update(b"\n");
        let through = hex(&h.clone().finalize());
        out.push(Numbered {
            id: OrderId {
                file: file.to_string(),
                line: i as u32 + 1,
                line_hash: sha256_hex(text.as_bytes()),
                prefix_hash: prefix,
            },
            text,
            through_hash: through.clone(),
        });
        prefix = through;
    }
    out
}

/// The hash of an empty prefix (a file none of whose lines is processed yet).
pub fn empty_prefix_hash() -> String {
    sha256_hex(b"")
}

/// Where a file stands against what was processed of it: the first `processed` lines were
/// recorded with `through_hash` as the hash of that prefix.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// The processed part is intact; lines from index `processed` on are new.
    Intact,
    /// The processed part was edited or cut: nothing from this file may run until resolved.
    Edited(String),
}

/// Checks that the first `processed` lines of `lines` still hash to `through_hash`.
pub fn check_progress(lines: &[Numbered<'_>], processed: usize, through_hash: &str) -> Progress {
    if processed == 0 {
        return Progress::Intact;
    }
    if lines.len() < processed {
        return Progress::Edited(format!(
            "the file has {} lines but {processed} were processed: processed lines were removed",
            lines.len()
        ));
    }
    if lines[processed - 1].through_hash != through_hash {
        return Progress::Edited(format!(
            "a processed line (one of lines 1-{processed}) was edited"
        ));
    }
    Progress::Intact
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_lower_case_hex() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
    }

    #[test]
    fn lines_parse_into_verb_words_params_and_args() {
        let l = parse_line("script greet type=web 'two words' rack='2 b' -- --name \"a b\" x=y")
            .unwrap()
            .unwrap();
        assert_eq!(l.verb, "script");
        assert_eq!(l.words, vec!["greet".to_string(), "two words".to_string()]);
        assert_eq!(l.params["type"], "web");
        assert_eq!(l.params["rack"], "2 b");
        assert_eq!(l.args, vec!["--name", "a b", "x=y"]);
        assert_eq!(parse_line("   ").unwrap(), None);
        assert_eq!(parse_line("# a comment").unwrap(), None);
        assert_eq!(parse_line("noop\r").unwrap().unwrap().verb, "noop");
        for bad in ["Script x", "noop 'open", "x a=1 a=2", "x =v", "x\u{7}"] {
            assert!(parse_line(bad).is_err(), "{bad}");
        }
        assert!(parse_line(&format!("noop {}", "a".repeat(MAX_LINE))).is_err());
    }

    #[test]
    fn identities_depend_on_file_line_text_and_prefix() {
        let a = number_lines("deployer/orders", "noop\nnoop\n");
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].id.line_hash, a[1].id.line_hash);
        assert_ne!(a[0].id.digest(), a[1].id.digest(), "same text, other place");
        assert_eq!(a[0].id.prefix_hash, empty_prefix_hash());
        assert_eq!(a[1].id.prefix_hash, a[0].through_hash);
        // Appending after an unterminated last line changes no identity.
        let b = number_lines("deployer/orders", "noop\nnoop");
        let c = number_lines("deployer/orders", "noop\nnoop\nscript x\n");
        assert_eq!(b[1].id, c[1].id);
        assert_eq!(b[1].through_hash, c[1].through_hash);
        // Another file: another order.
        let d = number_lines("acme/models/M/orders", "noop\n");
        assert_ne!(d[0].id.digest(), a[0].id.digest());
        assert!(number_lines("f", "").is_empty());
    }

    #[test]
    fn an_edit_of_the_processed_part_is_seen() {
        let before = number_lines("f", "noop\nscript a\n");
        let through = before[1].through_hash.clone();
        let appended = number_lines("f", "noop\nscript a\nnoop\n");
        assert_eq!(check_progress(&appended, 2, &through), Progress::Intact);
        let edited = number_lines("f", "noop\nscript b\nnoop\n");
        assert!(matches!(
            check_progress(&edited, 2, &through),
            Progress::Edited(_)
        ));
        let cut = number_lines("f", "noop\n");
        assert!(matches!(
            check_progress(&cut, 2, &through),
            Progress::Edited(_)
        ));
        assert_eq!(check_progress(&cut, 0, ""), Progress::Intact);
    }
}
