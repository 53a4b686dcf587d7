//! The reader of the experiment config's JSON objects: every part of the tool that owns a
//! section of the config (the pipelines their `pipeline_call_args`, the verifiers their
//! `verifier_args`, each search strategy its `search_args` keys) reads it through a [`Section`],
//! so that every error names the file, the key's JSON path (`search_args.threshold`,
//! `verifier_args.ensemble[1].name`) and what is allowed, and unknown keys are warned about with
//! a "did you mean" suggestion.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// A key that is missing or has a value that is not allowed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{}: `{key}` {problem}", file.display())]
pub struct KeyError {
    /// The config file.
    pub file: PathBuf,
    /// The key's JSON path, e.g. `search_args.threshold`.
    pub key: String,
    /// What is wrong and what is allowed.
    pub problem: String,
}

/// Non-fatal findings of a config read (unknown keys, keys that do not apply), one sentence
/// each, shared by every [`Section`] of one file.
pub type Warnings = RefCell<Vec<String>>;

/// One JSON object of a config file, at a JSON path, with the typed readers of its keys.
#[derive(Clone, Debug)]
pub struct Section<'a> {
    file: &'a Path,
    at: String,
    obj: &'a Map<String, Value>,
    warnings: &'a Warnings,
}

/// `key` under the JSON path `prefix` (`prefix.key`, or `key` at the top level).
pub fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// How a JSON value's type is named in messages ("a string", "an array"...).
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Levenshtein distance, for "did you mean" suggestions.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The known key closest to `key`, when it is close enough to be a likely typo.
fn suggest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, k)| *d <= 3.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

impl<'a> Section<'a> {
    /// The top-level object `obj` of config file `file`, its warnings collected in
    /// `warnings`.
    pub fn new(file: &'a Path, obj: &'a Map<String, Value>, warnings: &'a Warnings) -> Self {
        Self {
            file,
            at: String::new(),
            obj,
            warnings,
        }
    }

    /// The config file.
    pub fn file(&self) -> &'a Path {
        self.file
    }

    /// This object's JSON path (`""` at the top level).
    pub fn at(&self) -> &str {
        &self.at
    }

    /// The object itself.
    pub fn object(&self) -> &'a Map<String, Value> {
        self.obj
    }

    /// The JSON path of `key` in this object.
    pub fn path_of(&self, key: &str) -> String {
        join(&self.at, key)
    }

    /// Whether the object has `key` (even as `null`).
    pub fn has(&self, key: &str) -> bool {
        self.obj.contains_key(key)
    }

    /// The raw value of `key`.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key)
    }

    /// An error for `key` (a key of this object, or a JSON path below it when it holds `.`
    /// or `[`).
    pub fn invalid(&self, key: &str, problem: impl Into<String>) -> KeyError {
        KeyError {
            file: self.file.to_path_buf(),
            key: self.path_of(key),
            problem: problem.into(),
        }
    }

    /// Records a non-fatal finding; the file's name is put in front.
    pub fn warn(&self, message: impl std::fmt::Display) {
        self.warnings
            .borrow_mut()
            .push(format!("{}: {message}", self.file.display()));
    }

    /// Warns about every key of the object that is not in `known`, suggesting the closest.
    pub fn check_keys(&self, known: &[&str]) {
        for key in self.obj.keys() {
            if known.contains(&key.as_str()) {
                continue;
            }
            let jp = self.path_of(key);
            match suggest(key, known) {
                Some(s) => self.warn(format!(
                    "unknown key `{jp}` is ignored; did you mean `{}`?",
                    self.path_of(s)
                )),
                None => self.warn(format!(
                    "unknown key `{jp}` is ignored (known keys: {})",
                    known.join(", ")
                )),
            }
        }
    }

    /// Warns about each of `keys` the object has: `by` does not read them.
    pub fn ignored(&self, keys: &[&str], by: &str) {
        for k in keys {
            if self.has(k) {
                self.warn(format!("`{}` is ignored by {by}", self.path_of(k)));
            }
        }
    }

    /// The object at `key`, which must be there.
    pub fn section(&self, key: &str) -> Result<Section<'a>, KeyError> {
        match self.obj.get(key) {
            None => Err(self.invalid(key, "is missing; it must be a JSON object")),
            Some(Value::Object(m)) => Ok(self.nested(self.path_of(key), m)),
            Some(other) => Err(self.invalid(
                key,
                format!("must be a JSON object, not {}", type_name(other)),
            )),
        }
    }

    /// A string, `None` when absent or `null`.
    pub fn string(&self, key: &str) -> Result<Option<String>, KeyError> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => {
                Err(self.invalid(key, format!("must be a string, not {}", type_name(other))))
            }
        }
    }

    /// A string that must be there; `allowed` says what to give.
    pub fn required_string(&self, key: &str, allowed: &str) -> Result<String, KeyError> {
        self.string(key)?
            .ok_or_else(|| self.invalid(key, format!("is missing; {allowed}")))
    }

    /// One of `choices` (given by their names), `None` when absent.
    pub fn choice<T: Copy>(&self, key: &str, choices: &[(&str, T)]) -> Result<Option<T>, KeyError> {
        let Some(s) = self.string(key)? else {
            return Ok(None);
        };
        match choices.iter().find(|(name, _)| *name == s) {
            Some((_, v)) => Ok(Some(*v)),
            None => Err(self.invalid(
                key,
                format!(
                    "is \"{s}\"; allowed: {}",
                    choices
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }

    /// A whole number `>= min`, `None` when absent or `null`.
    pub fn uint(&self, key: &str, min: u64) -> Result<Option<u64>, KeyError> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => {
                let v = n.as_u64().or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 9.0e15)
                        .map(|f| f as u64)
                });
                match v {
                    Some(v) if v >= min => Ok(Some(v)),
                    _ => {
                        Err(self.invalid(key, format!("must be a whole number >= {min}, not {n}")))
                    }
                }
            }
            Some(other) => Err(self.invalid(
                key,
                format!("must be a whole number >= {min}, not {}", type_name(other)),
            )),
        }
    }

    /// A whole number in `min..=max`; an error naming the key and the range otherwise.
    pub fn uint_in(&self, key: &str, min: u64, max: u64) -> Result<Option<u64>, KeyError> {
        match self.uint(key, min)? {
            Some(v) if v > max => {
                Err(self.invalid(key, format!("is {v}; it must be from {min} to {max}")))
            }
            v => Ok(v),
        }
    }

    /// [`Section::uint_in`] as a `usize`.
    pub fn count_in(&self, key: &str, min: u64, max: u64) -> Result<Option<usize>, KeyError> {
        Ok(self
            .uint_in(key, min, max)?
            .and_then(|v| usize::try_from(v).ok()))
    }

    /// A finite number, `None` when absent or `null`.
    pub fn number(&self, key: &str) -> Result<Option<f64>, KeyError> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_f64()
                .filter(|f| f.is_finite())
                .map(Some)
                .ok_or_else(|| self.invalid(key, "must be a finite number")),
            Some(other) => {
                Err(self.invalid(key, format!("must be a number, not {}", type_name(other))))
            }
        }
    }

    /// A finite number in `min..=max` (`min` excluded when `open_min`).
    pub fn number_in(
        &self,
        key: &str,
        (min, open_min): (f64, bool),
        max: f64,
    ) -> Result<Option<f64>, KeyError> {
        match self.number(key)? {
            Some(v) if v > max || v < min || (open_min && v == min) => {
                let low = if open_min { ">" } else { ">=" };
                Err(self.invalid(key, format!("is {v}; it must be {low} {min} and <= {max}")))
            }
            v => Ok(v),
        }
    }

    /// `true` or `false`, `None` when absent or `null`.
    pub fn boolean(&self, key: &str) -> Result<Option<bool>, KeyError> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.invalid(
                key,
                format!("must be true or false, not {}", type_name(other)),
            )),
        }
    }

    /// The objects of the array at `key`, each as a section at its JSON path (`key[i]`); `what`
    /// names an element (`a verifier_args object`) and `example` shows an array, for the errors.
    pub fn objects(
        &self,
        key: &str,
        what: &str,
        example: &str,
    ) -> Result<Vec<Section<'a>>, KeyError> {
        let Some(Value::Array(items)) = self.obj.get(key) else {
            return Err(self.invalid(key, format!("must be an array of {what}s ({example})")));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let at = format!("{}[{i}]", self.path_of(key));
                match item {
                    Value::Object(obj) => Ok(self.nested(at, obj)),
                    other => Err(KeyError {
                        file: self.file.to_path_buf(),
                        key: at,
                        problem: format!("must be a {what}, not {}", type_name(other)),
                    }),
                }
            })
            .collect()
    }

    /// The object `obj` at JSON path `at` of the same file, as a section.
    pub fn nested(&self, at: String, obj: &'a Map<String, Value>) -> Section<'a> {
        Section {
            file: self.file,
            at,
            obj,
            warnings: self.warnings,
        }
    }

    /// `rel` joined to the folder of the config file, when `rel` is a relative path and the
    /// config has a folder: where relative paths in a config are looked for after the current
    /// folder.
    pub fn beside_file(&self, rel: &str) -> Option<PathBuf> {
        let rel = Path::new(rel);
        if rel.is_absolute() {
            return None;
        }
        let dir = self.file.parent().filter(|d| !d.as_os_str().is_empty())?;
        Some(dir.join(rel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with<R>(json: serde_json::Value, f: impl FnOnce(Section<'_>) -> R) -> (R, Vec<String>) {
        let obj = json.as_object().cloned().unwrap_or_default();
        let warnings = Warnings::default();
        let top = serde_json::Map::new();
        let root = Section::new(Path::new("c.json"), &top, &warnings);
        let r = f(root.nested("s".into(), &obj));
        (r, warnings.into_inner())
    }

    #[test]
    fn errors_name_the_file_the_json_path_and_what_is_allowed() {
        let (e, _) = with(serde_json::json!({"n": 0, "x": "a"}), |s| {
            (s.uint("n", 1).unwrap_err(), s.number("x").unwrap_err())
        });
        assert_eq!(
            e.0.to_string(),
            "c.json: `s.n` must be a whole number >= 1, not 0"
        );
        assert_eq!(
            e.1.to_string(),
            "c.json: `s.x` must be a number, not a string"
        );
        let (e, _) = with(serde_json::json!({"k": "z"}), |s| {
            s.choice("k", &[("a", 1), ("b", 2)]).unwrap_err()
        });
        assert!(
            e.to_string().ends_with("`s.k` is \"z\"; allowed: a, b"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_are_warned_about_with_the_closest_known_key() {
        let (_, w) = with(serde_json::json!({"treshold": 1, "zzz": 2}), |s| {
            s.check_keys(&["threshold", "rounds"])
        });
        assert_eq!(
            w,
            [
                "c.json: unknown key `s.treshold` is ignored; did you mean `s.threshold`?",
                "c.json: unknown key `s.zzz` is ignored (known keys: threshold, rounds)"
            ]
        );
    }

    #[test]
    fn ranges_and_whole_numbers_are_checked() {
        let (r, _) = with(
            serde_json::json!({"a": 2.0, "b": 2.5, "c": 10, "d": 0.0}),
            |s| {
                (
                    s.uint("a", 1).unwrap(),
                    s.uint("b", 1).is_err(),
                    s.uint_in("c", 1, 5).unwrap_err().problem,
                    s.number_in("d", (0.0, true), 1.0).unwrap_err().problem,
                )
            },
        );
        assert_eq!(r.0, Some(2));
        assert!(r.1);
        assert_eq!(r.2, "is 10; it must be from 1 to 5");
        assert_eq!(r.3, "is 0; it must be > 0 and <= 1");
    }
}
