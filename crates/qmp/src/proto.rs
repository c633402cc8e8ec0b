//! QMP messages on the wire: encoding of the greeting, replies and events (one JSON object
//! and `\r\n` each, as QEMU writes them), strict parsing of a received JSON text (duplicate
//! keys rejected, nesting bounded by `serde_json`'s recursion limit) and validation of a
//! command request with QEMU's error texts (`qapi/qmp-dispatch.c`).

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::error::CommandError;

/// An event's `timestamp` member: CLOCK_REALTIME split into seconds and microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp {
    /// Seconds since the Unix epoch (-1 if the clock is before it, as QEMU does).
    pub seconds: i64,
    /// Microseconds within the second (-1 with `seconds == -1`).
    pub microseconds: i64,
}

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp {
                seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                microseconds: i64::from(d.subsec_micros()),
            },
            Err(_) => Timestamp {
                seconds: -1,
                microseconds: -1,
            },
        }
    }
}

/// Appends `v` as compact JSON.
fn write_json(out: &mut Vec<u8>, v: &(impl serde::Serialize + ?Sized)) {
    // Serializing a `serde_json::Value` or a string into a Vec cannot fail (map keys are
    // strings, numbers are finite); `null` keeps the output JSON should that ever change.
    if serde_json::to_writer(&mut *out, v).is_err() {
        out.extend_from_slice(b"null");
    }
}

fn finish(mut out: Vec<u8>, id: Option<&Value>) -> Vec<u8> {
    if let Some(id) = id {
        out.extend_from_slice(b", \"id\": ");
        write_json(&mut out, id);
    }
    out.extend_from_slice(b"}\r\n");
    out
}

/// `{"return": VALUE, "id": ID}\r\n` (no `id` member if the request had none).
pub(crate) fn encode_return(value: &Value, id: Option<&Value>) -> Vec<u8> {
    let mut out = b"{\"return\": ".to_vec();
    write_json(&mut out, value);
    finish(out, id)
}

/// `{"error": {"class": CLASS, "desc": DESC}, "id": ID}\r\n`.
pub(crate) fn encode_error(err: &CommandError, id: Option<&Value>) -> Vec<u8> {
    let mut out = b"{\"error\": {\"class\": ".to_vec();
    write_json(&mut out, err.class.as_str());
    out.extend_from_slice(b", \"desc\": ");
    write_json(&mut out, &err.desc);
    out.push(b'}');
    finish(out, id)
}

/// `{"event": NAME, "data": {...}, "timestamp": {...}}\r\n` (`data` only if given).
pub(crate) fn encode_event(
    name: &str,
    data: Option<&Map<String, Value>>,
    ts: Timestamp,
) -> Vec<u8> {
    let mut out = b"{\"event\": ".to_vec();
    write_json(&mut out, name);
    if let Some(data) = data {
        out.extend_from_slice(b", \"data\": ");
        write_json(&mut out, data);
    }
    out.extend_from_slice(
        format!(
            ", \"timestamp\": {{\"seconds\": {}, \"microseconds\": {}}}}}\r\n",
            ts.seconds, ts.microseconds
        )
        .as_bytes(),
    );
    out
}

/// The greeting: `{"QMP": {"version": {"qemu": {...}, "package": ...}, "capabilities": []}}`.
pub(crate) fn encode_greeting(major: u32, minor: u32, micro: u32, package: &str) -> Vec<u8> {
    let mut out = format!(
        "{{\"QMP\": {{\"version\": {{\"qemu\": {{\"micro\": {micro}, \"minor\": {minor}, \"major\": {major}}}, \"package\": "
    )
    .into_bytes();
    write_json(&mut out, package);
    out.extend_from_slice(b"}, \"capabilities\": []}}\r\n");
    out
}

/// A JSON value whose objects had no duplicate keys (QEMU refuses them; taking the last one
/// silently would let `{"execute": "a", "execute": "b"}` mean whatever a parser picks).
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut m = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if m.contains_key(&key) {
                return Err(de::Error::custom(format_args!("duplicate key '{key}'")));
            }
            let Strict(v) = map.next_value()?;
            m.insert(key, v);
        }
        Ok(Value::Object(m))
    }
}

/// Parses one JSON text strictly; the error text is QEMU's `JSON parse error, ...`.
pub(crate) fn parse_json(frame: &[u8]) -> Result<Value, CommandError> {
    serde_json::from_slice::<Strict>(frame)
        .map(|s| s.0)
        .map_err(|e| CommandError::generic(format!("JSON parse error, {e}")))
}

/// A validated command request.
#[derive(Debug)]
pub(crate) struct Request {
    /// The `execute` member.
    pub name: String,
    /// The `arguments` member (empty if absent).
    pub args: Map<String, Value>,
    /// The `id` member, echoed verbatim in the reply.
    pub id: Option<Value>,
}

/// A request that failed validation, with the `id` to echo if one could be found.
#[derive(Debug)]
pub(crate) struct Rejected {
    pub error: CommandError,
    pub id: Option<Value>,
}

/// Parses and validates one received JSON text as a command request.
pub(crate) fn parse_request(frame: &[u8]) -> Result<Request, Rejected> {
    let value = parse_json(frame).map_err(|error| Rejected { error, id: None })?;
    let Value::Object(mut obj) = value else {
        return Err(Rejected {
            error: CommandError::generic("QMP input must be a JSON object"),
            id: None,
        });
    };
    let id = obj.remove("id");
    let reject = |desc: String, id: Option<Value>| Rejected {
        error: CommandError::generic(desc),
        id,
    };
    for (key, value) in &obj {
        match key.as_str() {
            "execute" if !value.is_string() => {
                return Err(reject(
                    "QMP input member 'execute' must be a string".into(),
                    id,
                ))
            }
            "arguments" if !value.is_object() => {
                return Err(reject(
                    "QMP input member 'arguments' must be an object".into(),
                    id,
                ))
            }
            "execute" | "arguments" => {}
            // `exec-oob` is unexpected too: out-of-band execution is not offered.
            other => {
                return Err(reject(
                    format!("QMP input member '{other}' is unexpected"),
                    id,
                ))
            }
        }
    }
    let name = match obj.remove("execute") {
        Some(Value::String(name)) => name,
        _ => return Err(reject("QMP input lacks member 'execute'".into(), id)),
    };
    let args = match obj.remove("arguments") {
        Some(Value::Object(args)) => args,
        _ => Map::new(),
    };
    Ok(Request { name, args, id })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reject_desc(text: &str) -> (String, Option<Value>) {
        match parse_request(text.as_bytes()) {
            Ok(r) => panic!("accepted {text}: {r:?}"),
            Err(r) => (r.error.desc, r.id),
        }
    }

    #[test]
    fn a_valid_request_keeps_name_arguments_and_id() {
        let r = parse_request(br#"{"execute":"x","arguments":{"a":1},"id":[1,"two"]}"#).unwrap();
        assert_eq!(r.name, "x");
        assert_eq!(Value::Object(r.args), json!({"a": 1}));
        assert_eq!(r.id, Some(json!([1, "two"])));
    }

    #[test]
    fn invalid_requests_get_qemus_texts_and_keep_their_id() {
        assert_eq!(reject_desc("[1]").0, "QMP input must be a JSON object");
        assert_eq!(
            reject_desc(r#"{"id": 7}"#),
            ("QMP input lacks member 'execute'".into(), Some(json!(7)))
        );
        assert_eq!(
            reject_desc(r#"{"execute": "x", "xyz": 1}"#).0,
            "QMP input member 'xyz' is unexpected"
        );
        assert_eq!(
            reject_desc(r#"{"execute": "x", "arguments": []}"#).0,
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(
            reject_desc(r#"{"execute": 3}"#).0,
            "QMP input member 'execute' must be a string"
        );
        assert_eq!(
            reject_desc(r#"{"exec-oob": "x"}"#).0,
            "QMP input member 'exec-oob' is unexpected"
        );
    }

    #[test]
    fn duplicate_keys_and_deep_nesting_are_parse_errors() {
        let (desc, _) = reject_desc(r#"{"execute": "a", "execute": "b"}"#);
        assert!(
            desc.starts_with("JSON parse error, duplicate key 'execute'"),
            "{desc}"
        );
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let (desc, _) = reject_desc(&deep);
        assert!(
            desc.starts_with("JSON parse error, recursion limit"),
            "{desc}"
        );
    }

    #[test]
    fn encoded_messages_are_one_json_object_and_crlf() {
        let ret = encode_return(&json!({"a": [1]}), Some(&json!("x")));
        assert!(ret.ends_with(b"}\r\n"));
        let v: Value = serde_json::from_slice(&ret).unwrap();
        assert_eq!(v, json!({"return": {"a": [1]}, "id": "x"}));
        let err = encode_error(&CommandError::command_not_found("q\"x"), None);
        let v: Value = serde_json::from_slice(&err).unwrap();
        assert_eq!(
            v,
            json!({"error": {"class": "CommandNotFound", "desc": "The command q\"x has not been found"}})
        );
        let ev = encode_event(
            "STOP",
            None,
            Timestamp {
                seconds: 5,
                microseconds: 6,
            },
        );
        let v: Value = serde_json::from_slice(&ev).unwrap();
        assert_eq!(
            v,
            json!({"event": "STOP", "timestamp": {"seconds": 5, "microseconds": 6}})
        );
        let g: Value = serde_json::from_slice(&encode_greeting(9, 2, 1, "p\"k")).unwrap();
        assert_eq!(
            g,
            json!({"QMP": {"version": {"qemu": {"micro": 1, "minor": 2, "major": 9}, "package": "p\"k"}, "capabilities": []}})
        );
    }
}
