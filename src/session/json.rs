//! The session's wire form: compact JSON with every non-ASCII character escaped as `\uXXXX`,
//! so CGI/WSGI/PHP stacks that mangle header bytes above 0x7F see plain ASCII. DEL (0x7F) is
//! escaped too: it is ASCII, but a header value may not carry it (RFC 9110 §5.5), and serde_json
//! only escapes the controls below 0x20.

use std::io;

use serde::Serialize;
use serde_json::ser::{CharEscape, Formatter};

use super::Data;

struct AsciiFormatter;

impl Formatter for AsciiFormatter {
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut start = 0;
        for (i, ch) in fragment.char_indices() {
            if ch.is_ascii() && ch != '\x7f' {
                continue;
            }
            writer.write_all(&fragment.as_bytes()[start..i])?;
            let mut units = [0u16; 2];
            for unit in ch.encode_utf16(&mut units) {
                write!(writer, "\\u{unit:04x}")?;
            }
            start = i + ch.len_utf8();
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }

    fn write_char_escape<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        char_escape: CharEscape,
    ) -> io::Result<()> {
        serde_json::ser::CompactFormatter.write_char_escape(writer, char_escape)
    }
}

/// Encodes the session data exactly as the `X-Session` request header carries it.
pub fn encode_ascii(data: &Data) -> String {
    let mut out = Vec::with_capacity(64);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, AsciiFormatter);
    data.serialize(&mut ser)
        .expect("serializing a JSON map into memory cannot fail");
    String::from_utf8(out).expect("the formatter writes ASCII only")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn data(v: serde_json::Value) -> Data {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn non_ascii_is_escaped_and_round_trips() {
        let d = data(json!({"name": "Zoë 😀", "n": 1, "q": "a\"b\n"}));
        let s = encode_ascii(&d);
        assert!(s.is_ascii(), "{s}");
        assert!(s.contains("\\u00eb") && s.contains("\\ud83d\\ude00"), "{s}");
        assert!(!s.contains(": ") && !s.contains(", "), "compact: {s}");
        let back: Data = serde_json::from_str(&s).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn every_code_point_round_trips_as_a_valid_header_value() {
        let all: String = (0..=0x10ffffu32).filter_map(char::from_u32).collect();
        let d = data(json!({ "all": all, "del": "a\u{7f}b", "nul": "\u{0}" }));
        let s = encode_ascii(&d);
        assert!(s.contains("\\u007f"), "DEL is escaped");
        http::HeaderValue::from_str(&s).expect("a header value hyper accepts");
        let back: Data = serde_json::from_str(&s).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn empty_session_is_two_bytes() {
        assert_eq!(encode_ascii(&Data::new()), "{}");
    }
}
