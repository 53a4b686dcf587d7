//! The one reader of JSON config files: a model component's `config.json`, a
//! `scheduler_config.json`, `model_index.json`. Files are read as Python's `json.dump` writes
//! them, and deserialised into `serde`-derived structs whose errors name the file and the JSON
//! path of the key at fault.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::LoadError;
use crate::models::ModelConfig;

/// Deserialises a config `value` read from `file` into `T`. A missing key without a default, a
/// value of the wrong type or an unknown enum spelling is a [`LoadError::ModelFile`] naming the
/// file and the JSON path, e.g. `unet/config.json: block_out_channels[2]: invalid type ...`.
///
/// A top-level key set to `null` counts as absent (diffusers writes `null` for "the default").
pub fn parse_config<T: DeserializeOwned>(value: &Value, file: &str) -> Result<T, LoadError> {
    let without_nulls;
    let value = match value {
        Value::Object(map) if map.values().any(Value::is_null) => {
            without_nulls = Value::Object(
                map.iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            );
            &without_nulls
        }
        other => other,
    };
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        LoadError::ModelFile {
            path: file.to_string(),
            message: if path == "." {
                inner.to_string()
            } else {
                format!("key {path}: {inner}")
            },
        }
    })
}

/// A network config from its file's `value`: the file's serde-derived form
/// ([`ModelConfig::Raw`]), then the network's checks. Errors name `file` and the key.
pub fn model_config<C: ModelConfig>(value: &Value, file: &str) -> Result<C, LoadError> {
    let raw: C::Raw = parse_config(value, file)?;
    C::try_from(raw)
}

/// Reads and deserialises a config file into `T` ([`read_json_file`] then [`parse_config`]).
pub fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T, LoadError> {
    parse_config(&read_json_file(path)?, &path.display().to_string())
}

/// Reads a model's JSON file (a component `config.json`, `scheduler_config.json`,
/// `tokenizer_config.json`...). Files that Python's `json.dump` wrote may hold the bare tokens
/// `NaN`, `Infinity` and `-Infinity` (diffusers saves `lambda_min_clipped: -Infinity`); they
/// are read as `null` and as the largest finite numbers, which behave as infinities in every
/// comparison and clamp the configs use.
pub fn read_json_file(path: &Path) -> Result<Value, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|e| LoadError::ModelFile {
        path: path.display().to_string(),
        message: format!("cannot read: {e}"),
    })?;
    serde_json::from_str(&python_json_to_strict(&text)).map_err(|e| LoadError::ModelFile {
        path: path.display().to_string(),
        message: format!("invalid JSON: {e}"),
    })
}

/// Rewrites the non-standard number tokens of Python's JSON (`NaN`, `Infinity`, `-Infinity`)
/// outside string literals into standard JSON.
pub fn python_json_to_strict(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        let replaced = [
            ("-Infinity", "-1.7976931348623157e308"),
            ("Infinity", "1.7976931348623157e308"),
            ("NaN", "null"),
        ]
        .into_iter()
        .find(|(token, _)| rest.starts_with(token));
        if let Some((token, standard)) = replaced {
            out.push_str(standard);
            rest = &rest[token.len()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

#[cfg(test)]
mod python_json_tests {
    use super::*;

    #[test]
    fn pythons_non_finite_numbers_are_read_outside_strings_only() {
        let t = r#"{"a": -Infinity, "b": Infinity, "c": NaN, "d": "NaN -Infinity \" Infinity"}"#;
        let v: Value = serde_json::from_str(&python_json_to_strict(t)).unwrap();
        assert_eq!(v["a"].as_f64(), Some(-f64::MAX));
        assert_eq!(v["b"].as_f64(), Some(f64::MAX));
        assert!(v["c"].is_null());
        assert_eq!(v["d"], "NaN -Infinity \" Infinity");
    }
}
