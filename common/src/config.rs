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
