//! Field tables as JSON, the way RabbitMQ's management API and policy definitions write
//! them: integers, strings, booleans, arrays and nested tables.
//!
//! Used by the admin service (policy definitions from `warrenctl`) and the server's
//! management HTTP API; the codec's `FieldTable` is the AMQP side.

use warren_codec::{FieldTable, FieldValue, LongStr, ShortStr};

pub fn value_to_json(v: &FieldValue) -> serde_json::Value {
    use serde_json::Value;
    match v {
        FieldValue::Bool(b) => Value::from(*b),
        FieldValue::LongStr(s) => Value::from(s.to_str_lossy().into_owned()),
        FieldValue::F32(f) => Value::from(f64::from(*f)),
        FieldValue::F64(f) => Value::from(*f),
        FieldValue::Timestamp(t) => Value::from(*t),
        FieldValue::Array(a) => Value::Array(a.iter().map(value_to_json).collect()),
        FieldValue::Table(t) => table_to_json(t),
        FieldValue::Void => Value::Null,
        FieldValue::Bytes(b) => Value::from(String::from_utf8_lossy(b).into_owned()),
        FieldValue::Decimal { scale, value } => {
            Value::from(f64::from(*value) / 10f64.powi(i32::from(*scale)))
        }
        other => other.as_i64().map_or(Value::Null, Value::from),
    }
}

pub fn table_to_json(t: &FieldTable) -> serde_json::Value {
    serde_json::Value::Object(
        t.iter()
            .map(|(k, v)| (k.as_str().to_owned(), value_to_json(v)))
            .collect(),
    )
}

pub fn value_from_json(v: &serde_json::Value) -> Result<FieldValue, String> {
    use serde_json::Value;
    Ok(match v {
        Value::Null => FieldValue::Void,
        Value::Bool(b) => FieldValue::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => FieldValue::I64(i),
            (None, Some(f)) => FieldValue::F64(f),
            _ => return Err(format!("number {n} is out of range")),
        },
        Value::String(s) => FieldValue::LongStr(LongStr::from(s.as_str())),
        Value::Array(a) => {
            FieldValue::Array(a.iter().map(value_from_json).collect::<Result<_, _>>()?)
        }
        Value::Object(_) => FieldValue::Table(table_from_json(v)?),
    })
}

/// A JSON object as a field table; anything else is an error.
pub fn table_from_json(v: &serde_json::Value) -> Result<FieldTable, String> {
    let serde_json::Value::Object(map) = v else {
        return Err("expected a JSON object".into());
    };
    let mut table = FieldTable::new();
    for (key, value) in map {
        let k = ShortStr::try_from(key.as_str()).map_err(|_| format!("key '{key}' is too long"))?;
        table.insert(k, value_from_json(value)?);
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let json = serde_json::json!({
            "x-message-ttl": 1000,
            "x-dead-letter-exchange": "dlx",
            "x-single-active-consumer": true,
            "nested": {"a": [1, "b"]},
        });
        let table = table_from_json(&json).unwrap();
        assert_eq!(table.get("x-message-ttl"), Some(&FieldValue::I64(1000)));
        assert_eq!(table_to_json(&table), json);
        assert!(table_from_json(&serde_json::json!([1])).is_err());
    }
}
