//! Canonical JSON and the request hash (DESIGN §3).
//!
//! The bytes are exactly Python's
//! `json.dumps(v, sort_keys=True, separators=(',', ':'), ensure_ascii=False)`, so a hash computed
//! by the seed's tooling (or any auditor's script) over the same messages matches ours. Floats
//! follow Python's `repr` (shortest round-trip digits, exponent form outside 1e-4..1e16).

use std::fmt::{self, Write as _};

use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Number, Value};
use sha2::{Digest, Sha256};

use crate::config::Secret;

/// Appends the canonical JSON of `value` to `out`.
pub fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => write_number(n, out),
        Value::String(s) => write_json_str(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            // Python sorts by code point; UTF-8 byte order is the same order.
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json_str(key, out);
                out.push(':');
                write_canonical(item, out);
            }
            out.push('}');
        }
    }
}

/// The canonical JSON of `value` as a string.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::with_capacity(256);
    write_canonical(value, &mut out);
    out
}

/// SHA-256 (or HMAC-SHA256 with `key`) of the canonical JSON of `value`, lower-case hex.
///
/// With a key, a hash cannot be used to confirm a guessed prompt.
pub fn request_hash(value: &Value, key: Option<&Secret>) -> String {
    bytes_hash(canonical_json(value).as_bytes(), key)
}

/// SHA-256 (or HMAC-SHA256 with `key`) of `bytes`, lower-case hex: the hash of a body that could
/// not be parsed, keyed like every other request hash so it cannot confirm a guessed prompt.
pub fn bytes_hash(bytes: &[u8], key: Option<&Secret>) -> String {
    match key {
        None => hex::encode(Sha256::digest(bytes)),
        Some(key) => {
            // HMAC accepts keys of any length, so this cannot fail.
            let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key.expose().as_bytes())
                .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
            mac.update(bytes);
            hex::encode(mac.finalize().into_bytes())
        }
    }
}

fn write_number(n: &Number, out: &mut String) {
    if let Some(i) = n.as_i64() {
        let _ = write!(out, "{i}");
    } else if let Some(u) = n.as_u64() {
        let _ = write!(out, "{u}");
    } else if let Some(f) = n.as_f64() {
        write_json_f64(f, out);
    }
}

/// Python's `float.__repr__` for a finite float.
pub fn write_json_f64(f: f64, out: &mut String) {
    if !f.is_finite() {
        // JSON input never yields these; Python would print `NaN`/`Infinity`.
        out.push_str(if f.is_nan() {
            "NaN"
        } else if f > 0.0 {
            "Infinity"
        } else {
            "-Infinity"
        });
        return;
    }
    // ryu gives the shortest round-trip digits (as `{:e}` does, at a fraction of the cost of
    // core::fmt's float path: this runs twice per record on the request path). Its layout
    // ("1.25e-5", "0.001", "123.0") is read back into digits and a decimal point.
    let mut buf = ryu::Buffer::new();
    let mut digit_buf = StackStr::default();
    let (negative, decpt) = shortest_digits(buf.format_finite(f), &mut digit_buf);
    let digits = digit_buf.as_str();
    let exp = decpt - 1; // value = 0.DIGITS × 10^decpt = D.IGITS × 10^exp
    if negative {
        out.push('-');
    }
    if decpt <= -4 || decpt > 16 {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    } else if decpt <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', decpt.unsigned_abs() as usize));
        out.push_str(digits);
    } else {
        let point = decpt as usize;
        if point >= digits.len() {
            out.push_str(digits);
            out.extend(std::iter::repeat_n('0', point - digits.len()));
            out.push_str(".0");
        } else {
            out.push_str(&digits[..point]);
            out.push('.');
            out.push_str(&digits[point..]);
        }
    }
}

/// Reads ryu's output for a finite float ("-1.25e-5", "0.001", "123.0") into its significant
/// digits (no leading or trailing zeros; "0" for zero), returning the sign and the decimal
/// point position: value = ±0.DIGITS × 10^decpt.
fn shortest_digits(s: &str, digits: &mut StackStr) -> (bool, i32) {
    let (negative, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (mantissa, exp) = s.split_once('e').unwrap_or((s, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let mut decpt = int.len() as i32 + exp;
    for b in int.bytes().chain(frac.bytes()) {
        if b == b'0' && digits.len == 0 {
            decpt -= 1;
        } else {
            digits.push(char::from(b));
        }
    }
    while digits.len > 0 && digits.buf[digits.len - 1] == b'0' {
        digits.len -= 1;
    }
    if digits.len == 0 {
        digits.push('0');
        decpt = 1;
    }
    (negative, decpt)
}

/// A small fixed buffer for formatting one float (shortest f64 digits fit in 32 bytes).
struct StackStr {
    buf: [u8; 40],
    len: usize,
}

impl Default for StackStr {
    fn default() -> Self {
        Self {
            buf: [0; 40],
            len: 0,
        }
    }
}

impl StackStr {
    fn push(&mut self, c: char) {
        let mut tmp = [0u8; 4];
        let _ = fmt::Write::write_str(self, c.encode_utf8(&mut tmp));
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl fmt::Write for StackStr {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        let dst = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// A JSON string escaped as Python's `json.dumps(ensure_ascii=False)` does.
pub fn write_json_str(s: &str, out: &mut String) {
    out.push('"');
    // Most strings need no escaping: one vectorisable scan, one copy.
    if !s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        out.push_str(s);
        out.push('"');
        return;
    }
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn matches_python_dumps() {
        // Expected strings produced by CPython 3.11:
        // json.dumps(v, sort_keys=True, separators=(',', ':'), ensure_ascii=False)
        let v = json!([{"role": "user", "content": "안녕 \"hi\"\n\t\u{1}", "b": 1, "a": [1.0, 0.5, -0.0]}]);
        assert_eq!(
            canonical_json(&v),
            "[{\"a\":[1.0,0.5,-0.0],\"b\":1,\"content\":\"안녕 \\\"hi\\\"\\n\\t\\u0001\",\"role\":\"user\"}]"
        );
    }

    #[test]
    fn floats_follow_python_repr() {
        let cases = [
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (1.5e16, "1.5e+16"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.25e-7, "1.25e-07"),
            (123.456, "123.456"),
            (0.1, "0.1"),
            (1e300, "1e+300"),
            (-2.5, "-2.5"),
            (100.0, "100.0"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (0.30000000000000004, "0.30000000000000004"),
            (9.999e15, "9999000000000000.0"),
            // An exact tie between two shortest candidates (…164.25): Python rounds to even.
            (f64::from_bits(4829482527432194530), "765915814799164.2"),
        ];
        for (f, want) in cases {
            let mut s = String::new();
            write_json_f64(f, &mut s);
            assert_eq!(s, want, "{f}");
        }
    }

    /// Significant digits of `{:e}` (core::fmt's shortest round-trip digits).
    fn core_fmt_digits(f: f64) -> String {
        let sci = format!("{:e}", f.abs());
        sci.split_once('e').unwrap().0.replace('.', "")
    }

    proptest::proptest! {
        /// The digits read back from ryu are shortest (as many as core::fmt's) and round-trip.
        /// They may differ from core::fmt's only on an exact tie, which Python and ryu break
        /// to even and core::fmt does not (`floats_follow_python_repr` holds one such case).
        #[test]
        fn ryu_digits_are_shortest_and_round_trip(bits in proptest::prelude::any::<u64>()) {
            let f = f64::from_bits(bits);
            proptest::prop_assume!(f.is_finite());
            let mut buf = ryu::Buffer::new();
            let mut digits = StackStr::default();
            let (negative, decpt) = shortest_digits(buf.format_finite(f), &mut digits);
            let digits = digits.as_str();
            proptest::prop_assert_eq!(negative, f.is_sign_negative());
            proptest::prop_assert_eq!(digits.len(), core_fmt_digits(f).len());
            let back: f64 = format!("0.{digits}e{decpt}").parse().unwrap();
            proptest::prop_assert_eq!(back, f.abs());
        }
    }

    #[test]
    fn long_decimals_parse_as_python_does() {
        // Python's float() rounds correctly, as Rust's `str::parse` does; serde_json without
        // `float_roundtrip` missed the nearest double for about a third of 16–25-digit numbers,
        // so the request hash of such a prompt differed from the seed's.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let text = format!("{}.{:019}e{}", x % 1000, x >> 3, (x % 40) as i64 - 20);
            let parsed: f64 = serde_json::from_str(&text).unwrap();
            assert_eq!(
                parsed.to_bits(),
                text.parse::<f64>().unwrap().to_bits(),
                "{text}"
            );
        }
    }

    #[test]
    fn hash_is_sha256_or_hmac() {
        let v = json!([{"role": "user", "content": "hello"}]);
        // Computed with CPython: hashlib.sha256(dumps(v).encode()).hexdigest() and
        // hmac.new(b"k", dumps(v).encode(), hashlib.sha256).hexdigest().
        assert_eq!(
            request_hash(&v, None),
            "d98167dd28f22e330824942ba4d4ce217c2411a0d1141d60b40fe4cb8dc0d232"
        );
        assert_eq!(
            request_hash(&v, Some(&Secret::new("k"))),
            "f8fa137601cb6262c3e1eaf00c208fc9fd90dd94b303dae9a174ab2c3c71ba44"
        );
    }
}
