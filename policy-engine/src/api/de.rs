//! Deserialising API types from a parsed YAML value the way Cilium's Go decoder reads them.
//!
//! Two things serde_yaml alone does not give us:
//! * **Field paths in errors** (`spec.ingress[0].toPorts[1].ports[0].port: ...`), so a user is told
//!   where the problem is.
//! * **Go's field matching**: `encoding/json` matches a key to a struct field exactly, else
//!   case-insensitively. Policies written for Cilium rely on it (Cilium's own example writes
//!   `rules: {HTTP: [...]}`), so struct keys are matched the same way here. Unknown keys stay errors.
//!
//! The object envelope is the exception: Kubernetes decodes `apiVersion`, `kind` and `metadata`
//! (and `ObjectMeta`'s fields) case-sensitively, so a key there that differs only in case is an
//! error that names the right spelling ([`CASE_SENSITIVE`]).
//!
//! Only `deserialize_any`, `deserialize_option` and `deserialize_struct` need real work; everything
//! else is forwarded to `deserialize_any`.

use std::fmt;

use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use serde_yaml::Value;

/// A path into a document, built on the stack while descending.
#[derive(Clone, Copy)]
pub(crate) enum Path<'a> {
    Root(&'a str),
    Field(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Root(r) => f.write_str(r),
            Path::Field(parent, name) => {
                let p = parent.to_string();
                if p.is_empty() { f.write_str(name) } else { write!(f, "{p}.{name}") }
            }
            Path::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

/// A deserialisation error with the path where it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeError {
    pub(crate) path: Option<String>,
    pub(crate) message: String,
}

impl DeError {
    fn at(mut self, path: &Path<'_>) -> Self {
        if self.path.is_none() {
            self.path = Some(path.to_string());
        }
        self
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(p) if !p.is_empty() => write!(f, "{p}: {}", self.message),
            _ => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self { path: None, message: msg.to_string() }
    }
}

/// Deserialises `T` from `value`; errors carry paths starting at `root`.
pub(crate) fn from_value<T: de::DeserializeOwned>(value: &Value, root: &str) -> Result<T, DeError> {
    let path = Path::Root(root);
    T::deserialize(ValueDe { value, path: &path }).map_err(|e| e.at(&path))
}

/// Structs whose keys Kubernetes matches exactly: the document envelopes and `ObjectMeta`.
const CASE_SENSITIVE: &[&str] = &["ObjectMeta", "CiliumPolicyDoc", "NetworkPolicyDoc", "CidrGroupDoc"];

/// The message for a key that differs from a field only in case.
pub(crate) fn wrong_case(found: &str, expected: &str) -> String {
    format!("found `{found}`; keys are case-sensitive: `{expected}`")
}

struct ValueDe<'a> {
    value: &'a Value,
    path: &'a Path<'a>,
}

fn unexpected(v: &Value) -> de::Unexpected<'_> {
    match v {
        Value::Null => de::Unexpected::Unit,
        Value::Bool(b) => de::Unexpected::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => de::Unexpected::Signed(i),
            (None, Some(f)) => de::Unexpected::Float(f),
            _ => de::Unexpected::Other("number"),
        },
        Value::String(s) => de::Unexpected::Str(s),
        Value::Sequence(_) => de::Unexpected::Seq,
        Value::Mapping(_) => de::Unexpected::Map,
        Value::Tagged(_) => de::Unexpected::Other("tagged value"),
    }
}

impl<'de> de::Deserializer<'de> for ValueDe<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    visitor.visit_u64(u)
                } else if let Some(i) = n.as_i64() {
                    visitor.visit_i64(i)
                } else {
                    visitor.visit_f64(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            Value::String(s) => visitor.visit_str(s),
            Value::Sequence(items) => visitor.visit_seq(SeqDe { iter: items.iter().enumerate(), path: self.path }),
            Value::Mapping(m) => {
                visitor.visit_map(MapDe { iter: m.iter(), path: self.path, fields: Fields::Any, pending: None })
            }
            Value::Tagged(t) => ValueDe { value: &t.value, path: self.path }.deserialize_any(visitor),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match self.value {
            Value::Mapping(m) => {
                let fields = if CASE_SENSITIVE.contains(&name) { Fields::Exact(fields) } else { Fields::Go(fields) };
                visitor.visit_map(MapDe { iter: m.iter(), path: self.path, fields, pending: None })
            }
            Value::Tagged(t) => ValueDe { value: &t.value, path: self.path }.deserialize_struct(name, fields, visitor),
            other => Err(de::Error::invalid_type(unexpected(other), &visitor)),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match self.value {
            Value::String(s) => visitor.visit_enum(s.as_str().into_deserializer()),
            other => Err(de::Error::invalid_type(unexpected(other), &visitor)),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map identifier ignored_any
    }
}

struct SeqDe<'a, I> {
    iter: I,
    path: &'a Path<'a>,
}

impl<'de, 'a, I: Iterator<Item = (usize, &'a Value)>> SeqAccess<'de> for SeqDe<'a, I> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, DeError> {
        let Some((i, value)) = self.iter.next() else { return Ok(None) };
        let path = Path::Index(self.path, i);
        seed.deserialize(ValueDe { value, path: &path }).map(Some).map_err(|e| e.at(&path))
    }
}

/// How a map's keys are matched to names.
#[derive(Clone, Copy)]
enum Fields {
    /// A map: keys are data.
    Any,
    /// A struct, matched as Go's `encoding/json` does: exactly, else case-insensitively.
    Go(&'static [&'static str]),
    /// A struct Kubernetes matches exactly; a key differing only in case is an error.
    Exact(&'static [&'static str]),
}

struct MapDe<'a, I> {
    iter: I,
    path: &'a Path<'a>,
    fields: Fields,
    pending: Option<(String, &'a Value)>,
}

impl<'a, I> MapDe<'a, I> {
    /// The field a key names.
    fn canonical(&self, key: &str) -> Result<String, DeError> {
        let (fields, exact) = match self.fields {
            Fields::Go(f) => (f, false),
            Fields::Exact(f) => (f, true),
            Fields::Any => return Ok(key.to_owned()),
        };
        if fields.contains(&key) {
            return Ok(key.to_owned());
        }
        match fields.iter().find(|f| f.eq_ignore_ascii_case(key)) {
            Some(f) if exact => Err(DeError { path: Some(self.path.to_string()), message: wrong_case(key, f) }),
            Some(f) => Ok((*f).to_owned()),
            None => Ok(key.to_owned()),
        }
    }
}

impl<'de, 'a, I: Iterator<Item = (&'a Value, &'a Value)>> MapAccess<'de> for MapDe<'a, I> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, DeError> {
        let Some((k, v)) = self.iter.next() else { return Ok(None) };
        let key = match k {
            Value::String(s) => self.canonical(s)?,
            // Go map keys and field names are strings; YAML lets people write `80:` or `true:`.
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            other => {
                return Err(DeError {
                    path: Some(self.path.to_string()),
                    message: format!("invalid key {:?}: keys must be strings", unexpected(other)),
                });
            }
        };
        let out = seed.deserialize(key.as_str().into_deserializer()).map_err(|e: DeError| e.at(self.path))?;
        self.pending = Some((key, v));
        Ok(Some(out))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let Some((key, value)) = self.pending.take() else {
            return Err(de::Error::custom("value requested before key"));
        };
        let path = Path::Field(self.path, &key);
        seed.deserialize(ValueDe { value, path: &path }).map_err(|e| e.at(&path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct Inner {
        http: Option<Vec<String>>,
        client_id: Option<String>,
    }

    #[derive(Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        items: Vec<Inner>,
    }

    fn parse(y: &str) -> Result<Outer, DeError> {
        from_value(&serde_yaml::from_str::<Value>(y).unwrap(), "spec")
    }

    #[test]
    fn go_style_case_insensitive_fields() {
        let o = parse("items: [{HTTP: [a], ClientId: x}]").unwrap();
        assert_eq!(o.items[0].http.as_deref(), Some(&["a".to_owned()][..]));
        assert_eq!(o.items[0].client_id.as_deref(), Some("x"));
    }

    #[test]
    fn errors_name_the_path() {
        let e = parse("items: [{http: [a]}, {nope: 1}]").unwrap_err();
        assert_eq!(e.path.as_deref(), Some("spec.items[1]"));
        assert!(e.message.contains("unknown field `nope`"), "{e}");
        let e = parse("items: [{http: [1]}]").unwrap_err();
        assert_eq!(e.to_string(), "spec.items[0].http[0]: invalid type: integer `1`, expected a string");
        // Duplicate keys never reach us: the YAML parser rejects them.
        assert!(serde_yaml::from_str::<Value>("{http: [x], http: [y]}").is_err());
    }
}
