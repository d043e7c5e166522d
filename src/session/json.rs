//! The session's wire form: compact JSON with every non-ASCII character escaped as `\uXXXX`,
//! so CGI/WSGI/PHP stacks that mangle header bytes above 0x7F see plain ASCII. DEL (0x7F) is
//! escaped too: it is ASCII, but a header value may not carry it (RFC 9110 §5.5), and serde_json
//! only escapes the controls below 0x20.
//!
//! Numbers travel as the app wrote them: [`parse_object`] keeps each number token's text
//! (serde_json's `arbitrary_precision` keeps the digits, and the raw token keeps the rest:
//! `1E3` is not rewritten `1e+3`), and the encoder writes that text back. A big integer never
//! becomes a float, `1.10` stays `1.10`.

use std::collections::BTreeMap;
use std::io;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::ser::{CharEscape, Formatter};
use serde_json::value::RawValue;
use serde_json::{Number, Value};

use super::Data;

/// The JSON object in `text`, every number token kept as written; `Ok(None)` when `text` is
/// well-formed JSON but not an object.
pub fn parse_object(text: &[u8]) -> Result<Option<Data>, serde_json::Error> {
    let raw: &RawValue = serde_json::from_slice(text)?;
    match exact(raw)? {
        Value::Object(map) => Ok(Some(map)),
        _ => Ok(None),
    }
}

/// The value `raw` holds, numbers as written. Each level is read from its own raw text, which
/// serde_json has already checked (and held to its nesting limit).
fn exact(raw: &RawValue) -> Result<Value, serde_json::Error> {
    let text = raw.get();
    Ok(match text.as_bytes().first() {
        Some(b'{') => {
            let members: BTreeMap<String, &RawValue> = serde_json::from_str(text)?;
            let mut map = Data::new();
            for (k, v) in members {
                map.insert(k, exact(v)?);
            }
            Value::Object(map)
        }
        Some(b'[') => {
            let items: Vec<&RawValue> = serde_json::from_str(text)?;
            Value::Array(items.into_iter().map(exact).collect::<Result<_, _>>()?)
        }
        // A number token, already validated: its text is the number.
        Some(b'-' | b'0'..=b'9') => Value::Number(Number::from_string_unchecked(text.to_string())),
        _ => serde_json::from_str(text)?,
    })
}

/// `deserialize_with` for stored session data: numbers as written (see [`parse_object`]).
pub fn deserialize_data<'de, D: Deserializer<'de>>(d: D) -> Result<Data, D::Error> {
    let raw = Box::<RawValue>::deserialize(d)?;
    match exact(&raw).map_err(serde::de::Error::custom)? {
        Value::Object(map) => Ok(map),
        _ => Err(serde::de::Error::custom(
            "session data is not a JSON object",
        )),
    }
}

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
    use crate::session::entry::{Codec, Entry};
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
    fn every_number_comes_back_as_written() {
        for token in [
            "12345678901234567890123",
            "-98765432109876543210987654321",
            "1.10",
            "1.0",
            "-0",
            "0.000",
            "1e3",
            "1E+03",
            "2.5e-400",
            "1.7976931348623157e309",
            "18446744073709551616",
            "9007199254740993",
        ] {
            let text = format!(r#"{{"a":{token},"b":[{token}],"c":{{"x":{token}}}}}"#);
            let data = parse_object(text.as_bytes()).unwrap().unwrap();
            assert_eq!(encode_ascii(&data), text, "{token}");
            // And through a stored record, sealed or not.
            let mut record = crate::session::Record::new(0);
            record.data = data;
            for codec in [Codec::plain(), Codec::sealed(&"s".repeat(32), &[])] {
                let raw = codec.encode("k", &Entry::Session(record.clone()));
                let Ok(Entry::Session(back)) = codec.decode("k", &raw) else {
                    panic!("a session")
                };
                assert_eq!(encode_ascii(&back.data), text, "{token} stored");
            }
        }
    }

    #[test]
    fn empty_session_is_two_bytes() {
        assert_eq!(encode_ascii(&Data::new()), "{}");
    }
}
