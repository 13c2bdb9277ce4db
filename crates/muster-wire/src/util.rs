//! Small helpers both sides use: the wall clock as a [`Ts`] and hex.

use muster_core::Ts;
use std::time::{SystemTime, UNIX_EPOCH};

/// The current time as a [`Ts`] (Unix milliseconds).
pub fn now() -> Ts {
    Ts(SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0))
}

/// Lower-case hex.
pub use muster_core::orders::hex;

/// Hex (either case) as bytes; `None` if it is not.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let d = |c: u8| (c as char).to_digit(16).map(|v| v as u8);
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(d(p[0])? << 4 | d(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_round_trips() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(super::hex(&b), "0001abff");
        assert_eq!(super::unhex("0001ABff").unwrap(), b);
        assert_eq!(super::unhex("abc"), None);
        assert_eq!(super::unhex("zz"), None);
    }
}
