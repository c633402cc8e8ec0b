//! Typed access to a command's `arguments` with QEMU's error texts
//! (`qapi/qobject-input-visitor.c`), so a handler answers bad arguments exactly as QEMU
//! would:
//!
//! | case | QEMU's text |
//! |---|---|
//! | missing | `Parameter 'uri' is missing` |
//! | wrong type | `Invalid parameter type for 'cpu-index', expected: integer` (also `boolean`, `string`, `number`, `object`, `array`) |
//! | not a `uint64` | `Parameter 'x' expects uint64` |
//! | unknown | `Parameter 'foo' is unexpected` |
//!
//! One difference: QEMU accepts a negative number for a `uint64` and wraps it ("for
//! backward compatibility"); [`Args`] refuses it with the `expects uint64` text.
//!
//! ```
//! use qmp::Args;
//! use serde_json::json;
//!
//! let args = Args::new(json!({"uri": "tcp:1.2.3.4:4444"}).as_object().cloned().unwrap());
//! assert_eq!(args.required_str("uri").unwrap(), "tcp:1.2.3.4:4444");
//! assert_eq!(args.optional_bool("detach").unwrap(), None);
//! let err = args.required_str("blk").unwrap_err();
//! assert_eq!(err.desc, "Parameter 'blk' is missing");
//! ```

use serde_json::{Map, Value};

use crate::error::CommandError;

/// A command's `arguments` object with QEMU-worded accessors.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Args {
    map: Map<String, Value>,
}

fn wrong_type(name: &str, expected: &str) -> CommandError {
    CommandError::generic(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

fn missing(name: &str) -> CommandError {
    CommandError::generic(format!("Parameter '{name}' is missing"))
}

impl Args {
    /// Wraps an `arguments` object.
    pub fn new(map: Map<String, Value>) -> Self {
        Args { map }
    }

    /// The raw object.
    pub fn as_map(&self) -> &Map<String, Value> {
        &self.map
    }

    /// Gives the raw object back.
    pub fn into_map(self) -> Map<String, Value> {
        self.map
    }

    /// The raw value of `name`, if present.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.map.get(name)
    }

    /// `Parameter 'NAME' is unexpected` for the first argument not in `allowed` (in key
    /// order). QEMU checks this after the members, so call it last to get the same error
    /// when an input has several faults.
    pub fn deny_unknown(&self, allowed: &[&str]) -> Result<(), CommandError> {
        match self.map.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(k) => Err(CommandError::generic(format!(
                "Parameter '{k}' is unexpected"
            ))),
            None => Ok(()),
        }
    }

    /// A string argument, if present.
    pub fn optional_str(&self, name: &str) -> Result<Option<&str>, CommandError> {
        match self.map.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(wrong_type(name, "string")),
        }
    }

    /// A string argument that must be present.
    pub fn required_str(&self, name: &str) -> Result<&str, CommandError> {
        self.optional_str(name)?.ok_or_else(|| missing(name))
    }

    /// A QAPI `int` (`int64`) argument, if present.
    pub fn optional_i64(&self, name: &str) -> Result<Option<i64>, CommandError> {
        match self.map.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| wrong_type(name, "integer")),
            Some(_) => Err(wrong_type(name, "integer")),
        }
    }

    /// A QAPI `int` argument that must be present.
    pub fn required_i64(&self, name: &str) -> Result<i64, CommandError> {
        self.optional_i64(name)?.ok_or_else(|| missing(name))
    }

    /// A QAPI `uint64` / `size` argument, if present.
    pub fn optional_u64(&self, name: &str) -> Result<Option<u64>, CommandError> {
        match self.map.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| CommandError::generic(format!("Parameter '{name}' expects uint64"))),
        }
    }

    /// A QAPI `uint64` / `size` argument that must be present.
    pub fn required_u64(&self, name: &str) -> Result<u64, CommandError> {
        self.optional_u64(name)?.ok_or_else(|| missing(name))
    }

    /// A QAPI `number` (double) argument, if present; integers are accepted as QEMU does.
    pub fn optional_f64(&self, name: &str) -> Result<Option<f64>, CommandError> {
        match self.map.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_f64()
                .map(Some)
                .ok_or_else(|| wrong_type(name, "number")),
            Some(_) => Err(wrong_type(name, "number")),
        }
    }

    /// A `bool` argument, if present.
    pub fn optional_bool(&self, name: &str) -> Result<Option<bool>, CommandError> {
        match self.map.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(wrong_type(name, "boolean")),
        }
    }

    /// A `bool` argument that must be present.
    pub fn required_bool(&self, name: &str) -> Result<bool, CommandError> {
        self.optional_bool(name)?.ok_or_else(|| missing(name))
    }

    /// A nested object argument, if present (wrap it in [`Args::new`] to check its members;
    /// their errors then name the member alone, where QEMU would say `outer.member`).
    pub fn optional_object(&self, name: &str) -> Result<Option<&Map<String, Value>>, CommandError> {
        match self.map.get(name) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(_) => Err(wrong_type(name, "object")),
        }
    }

    /// An array argument, if present.
    pub fn optional_array(&self, name: &str) -> Result<Option<&[Value]>, CommandError> {
        match self.map.get(name) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(_) => Err(wrong_type(name, "array")),
        }
    }

    /// An array of strings, if present; a bad element is named `NAME[i]` as QEMU does.
    pub fn optional_str_list(&self, name: &str) -> Result<Option<Vec<&str>>, CommandError> {
        let Some(items) = self.optional_array(name)? else {
            return Ok(None);
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .ok_or_else(|| wrong_type(&format!("{name}[{i}]"), "string"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(v: Value) -> Args {
        match v {
            Value::Object(m) => Args::new(m),
            _ => Args::default(),
        }
    }

    #[test]
    fn wrong_types_get_qemus_type_names() {
        let a = args(json!({"i": 1.5, "u": -1, "b": 1, "s": 2, "o": [], "l": {}, "n": "x"}));
        let desc = |r: Result<(), CommandError>| r.unwrap_err().desc;
        assert_eq!(
            desc(a.optional_i64("i").map(drop)),
            "Invalid parameter type for 'i', expected: integer"
        );
        assert_eq!(
            desc(a.optional_u64("u").map(drop)),
            "Parameter 'u' expects uint64"
        );
        assert_eq!(
            desc(a.optional_bool("b").map(drop)),
            "Invalid parameter type for 'b', expected: boolean"
        );
        assert_eq!(
            desc(a.optional_str("s").map(drop)),
            "Invalid parameter type for 's', expected: string"
        );
        assert_eq!(
            desc(a.optional_object("o").map(drop)),
            "Invalid parameter type for 'o', expected: object"
        );
        assert_eq!(
            desc(a.optional_array("l").map(drop)),
            "Invalid parameter type for 'l', expected: array"
        );
        assert_eq!(
            desc(a.optional_f64("n").map(drop)),
            "Invalid parameter type for 'n', expected: number"
        );
    }

    #[test]
    fn present_values_are_returned_and_missing_ones_reported() {
        let a = args(
            json!({"cpu-index": 3, "size": 4294967296u64, "on": true, "r": 0.5, "e": ["oob", 1]}),
        );
        assert_eq!(a.optional_i64("cpu-index").unwrap(), Some(3));
        assert_eq!(a.required_u64("size").unwrap(), 4294967296);
        assert!(a.required_bool("on").unwrap());
        assert_eq!(a.optional_f64("r").unwrap(), Some(0.5));
        assert_eq!(a.optional_f64("cpu-index").unwrap(), Some(3.0));
        assert_eq!(a.optional_i64("absent").unwrap(), None);
        assert_eq!(
            a.required_str("uri").unwrap_err().desc,
            "Parameter 'uri' is missing"
        );
        assert_eq!(
            a.optional_str_list("e").unwrap_err().desc,
            "Invalid parameter type for 'e[1]', expected: string"
        );
    }

    #[test]
    fn deny_unknown_names_the_first_unexpected_member() {
        let a = args(json!({"uri": "x", "foo": 1}));
        assert_eq!(
            a.deny_unknown(&["uri"]).unwrap_err().desc,
            "Parameter 'foo' is unexpected"
        );
        assert!(a.deny_unknown(&["uri", "foo", "bar"]).is_ok());
    }
}
