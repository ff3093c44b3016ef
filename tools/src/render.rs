//! How bytes and strings are printed.
//!
//! Text output quotes keys and values and escapes them byte by byte, so any byte string is
//! printed unambiguously on one line: printable ASCII (0x20..=0x7e) stands for itself except
//! `"` and `\`, which become `\"` and `\\`; `\n`, `\r`, `\t` are written so; every other byte
//! (control bytes and all bytes >= 0x80, so also UTF-8 text) is `\xNN` with two lowercase hex
//! digits. JSON output carries bytes as lowercase hex strings in fields ending in `_hex`.

use std::fmt::Write as _;

/// `bytes` in double quotes with the escapes described in the module documentation.
pub fn quoted(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() + 2);
    out.push('"');
    for &byte in bytes {
        match byte {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            0x20..=0x7e => out.push(char::from(byte)),
            _ => write!(out, "\\x{byte:02x}").expect("writing to a String"),
        }
    }
    out.push('"');
    out
}

/// Lowercase hex, two digits per byte, no prefix.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        write!(out, "{byte:02x}").expect("writing to a String");
    }
    out
}

/// `text` as a JSON string literal, quotes included.
pub fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                write!(out, "\\u{:04x}", u32::from(c)).expect("writing to a String")
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_escapes_everything_but_printable_ascii() {
        assert_eq!(quoted(b"plain key"), r#""plain key""#);
        assert_eq!(quoted(b"a\x00\xff"), r#""a\x00\xff""#);
        assert_eq!(quoted(b"q\"b\\\n"), r#""q\"b\\\n""#);
        assert_eq!(quoted("é".as_bytes()), r#""\xc3\xa9""#);
    }

    #[test]
    fn hex_is_lowercase_two_digits_per_byte() {
        assert_eq!(hex(&[0x00, 0xab, 0x7f]), "00ab7f");
        assert_eq!(hex(&[]), "");
    }

    #[test]
    fn json_string_escapes_quotes_and_controls() {
        assert_eq!(json_string("a\"b\\c\n\u{1}é"), r#""a\"b\\c\n\u0001é""#);
    }
}
