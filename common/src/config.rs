//! Config parsing shared by every module kind.
//!
//! Envoy hands the `*_config` Any over as bytes: a `google.protobuf.Struct` arrives as compact
//! JSON, a `google.protobuf.StringValue` as its raw string (which we require to hold JSON),
//! an absent config as an empty buffer (treated as `{}`). Structs use
//! `#[serde(deny_unknown_fields)]`; errors carry the dotted path of the offending field.
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// A config rejection, always naming the field (`path`) it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the field, e.g. `filter.status_code.ge`; empty for the whole document.
    pub field: String,
    /// What is wrong and, where it helps, what is allowed.
    pub message: String,
}

impl ConfigError {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError { field: field.into(), message: message.into() }
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "field `{}`: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Parses the module config bytes into `T`.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ConfigError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| ConfigError::new("", "config is not valid UTF-8 (expected a JSON object)"))?;
    let text = if text.trim().is_empty() { "{}" } else { text };
    reject_duplicate_keys(text)?;
    let mut de = serde_json::Deserializer::from_str(text);
    let mut track = serde_path_to_error::Track::new();
    let pde = serde_path_to_error::Deserializer::new(&mut de, &mut track);
    match T::deserialize(pde) {
        // Text after the object (`{...}}`, a second object) would be dropped unread: reject it.
        Ok(v) => match de.end() {
            Ok(()) => Ok(v),
            Err(e) => Err(ConfigError::new("", format!("text after the config object ({e})"))),
        },
        Err(e) => {
            let path = track.path().to_string();
            let path = if path == "." { String::new() } else { path };
            let msg = e.to_string();
            // serde reports "missing field `x`" at the parent: name the field itself.
            let field = match extract_backticked(&msg) {
                Some(name) if msg.starts_with("missing field") => {
                    if path.is_empty() {
                        name
                    } else {
                        format!("{path}.{name}")
                    }
                }
                _ => path,
            };
            Err(ConfigError::new(field, strip_position(&msg)))
        }
    }
}

/// Rejects a key given twice in one JSON object, at any depth, naming it. A config in a
/// `StringValue` is JSON text that may repeat keys (a `Struct` cannot), and a map read into a
/// `serde_json::Map` or `BTreeMap` would keep the last one without a word.
pub fn reject_duplicate_keys(text: &str) -> Result<(), ConfigError> {
    use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
    use std::fmt;

    /// Walks one value; `path` names it in errors.
    struct Walk<'p>(&'p str);

    impl<'de> DeserializeSeed<'de> for Walk<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Walk<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let mut i = 0;
            while seq.next_element_seed(Walk(&format!("{}[{i}]", self.0)))?.is_some() {
                i += 1;
            }
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(k) = map.next_key::<String>()? {
                let path = if self.0.is_empty() { k.clone() } else { format!("{}.{k}", self.0) };
                if !seen.insert(k) {
                    return Err(serde::de::Error::custom(DupKey(path)));
                }
                map.next_value_seed(Walk(&path))?;
            }
            Ok(())
        }
    }

    /// The error's text: the path of the repeated key, recovered below.
    struct DupKey(String);
    impl fmt::Display for DupKey {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "\u{0}dup\u{0}{}\u{0}", self.0)
        }
    }

    let mut de = serde_json::Deserializer::from_str(text);
    match Walk("").deserialize(&mut de) {
        Ok(()) => Ok(()),
        Err(e) => {
            let msg = e.to_string();
            match msg.split('\u{0}').collect::<Vec<_>>().as_slice() {
                [_, "dup", path, ..] => Err(ConfigError::new(*path, "given more than once")),
                // Not JSON at all: the typed parse that follows says so in its own words.
                _ => Ok(()),
            }
        }
    }
}

fn extract_backticked(msg: &str) -> Option<String> {
    let start = msg.find('`')? + 1;
    let end = start + msg[start..].find('`')?;
    Some(msg[start..end].to_string())
}

fn strip_position(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        #[allow(dead_code)]
        ge: Option<u32>,
    }
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        #[allow(dead_code)]
        path: String,
        #[allow(dead_code)]
        #[serde(default)]
        inner: Option<Inner>,
    }

    /// A repeated key, at any depth, is named (a StringValue config may repeat keys).
    #[test]
    fn a_key_given_twice_is_named() {
        for (text, field) in [
            (r#"{"a":1,"a":2}"#, "a"),
            (r#"{"m":{"x":"1","y":2,"x":3}}"#, "m.x"),
            (r#"{"l":[{"k":1},{"k":1,"k":2}]}"#, "l[1].k"),
        ] {
            assert_eq!(reject_duplicate_keys(text).map_err(|e| e.field), Err(field.to_string()), "{text}");
        }
        assert!(reject_duplicate_keys(r#"{"a":{"x":1},"b":{"x":1},"c":[1,1]}"#).is_ok());
        assert!(reject_duplicate_keys("not json").is_ok(), "left to the typed parse");
    }

    #[test]
    fn names_unknown_missing_and_mistyped_fields() {
        let e = parse::<Cfg>(br#"{"path":"x","bogus":1}"#).unwrap_err();
        assert_eq!(e.field, "bogus");
        assert!(e.message.contains("unknown field"), "{e}");
        let e = parse::<Cfg>(b"{}").unwrap_err();
        assert_eq!(e.field, "path");
        let e = parse::<Cfg>(br#"{"path":"x","inner":{"ge":"high"}}"#).unwrap_err();
        assert_eq!(e.field, "inner.ge");
        assert!(e.message.contains("invalid type"), "{e}");
        let e = parse::<Cfg>(br#"{"path":"x","inner":{"le":1}}"#).unwrap_err();
        assert_eq!(e.field, "inner.le");
    }

    #[test]
    fn empty_is_empty_object_and_garbage_is_rejected() {
        assert_eq!(parse::<Cfg>(b"").unwrap_err().field, "path");
        // Text after the object: a StringValue config with a stray brace, or a second object
        // whose keys would be dropped unread.
        for bad in [&br#"{"path":"x"}}"#[..], br#"{"path":"x"} {"filter":1}"#] {
            assert!(parse::<Cfg>(bad).unwrap_err().message.contains("text after the config object"));
        }
        assert_eq!(parse::<Cfg>(b" {\"path\":\"x\"} \n").unwrap().path, "x");
        assert!(parse::<Cfg>(b"not json").is_err());
        assert!(parse::<Cfg>(&[0xff, 0xfe]).is_err());
    }
}

/// Deserializes an `f64` given either as a JSON number or as a numeric string.
///
/// Needed because Envoy's YAML loader hands some fractional scalars of a
/// `google.protobuf.Struct` to the module as strings (`sample: 0.01` arrives as `"0.01"`).
pub fn lenient_f64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum NumOrStr {
        Num(f64),
        Str(String),
    }
    match NumOrStr::deserialize(d)? {
        NumOrStr::Num(n) => Ok(n),
        NumOrStr::Str(s) => {
            s.trim().parse::<f64>().map_err(|_| serde::de::Error::custom(format!("expected a number, got {s:?}")))
        }
    }
}

#[cfg(test)]
mod lenient_tests {
    #[derive(serde::Deserialize)]
    struct F {
        #[serde(deserialize_with = "super::lenient_f64")]
        x: f64,
    }

    #[test]
    fn numbers_and_numeric_strings() {
        assert_eq!(serde_json::from_str::<F>(r#"{"x":0.25}"#).unwrap().x, 0.25);
        assert_eq!(serde_json::from_str::<F>(r#"{"x":"0.25"}"#).unwrap().x, 0.25);
        assert!(serde_json::from_str::<F>(r#"{"x":"lots"}"#).is_err());
    }
}
