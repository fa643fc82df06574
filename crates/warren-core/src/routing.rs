//! Pure matching rules of the AMQP exchange types: topic patterns and the headers exchange's
//! `x-match` table comparison.
//!
//! The metadata state (`meta`) owns the bindings and calls into this module while it walks
//! exchanges; nothing here knows about vhosts or queues. The rules copy RabbitMQ's observable
//! behaviour (including its quirks around empty words and numeric equality of table values),
//! because clients written against RabbitMQ depend on them.

use warren_codec::{FieldTable, FieldValue};

/// Splits a routing or binding key into words the way RabbitMQ does: the empty key has zero
/// words, while `"a."` has two (`"a"` and `""`).
pub fn topic_words(key: &str) -> Vec<&str> {
    if key.is_empty() {
        Vec::new()
    } else {
        key.split('.').collect()
    }
}

/// A parsed topic binding key; parsing once at bind time keeps the publish path free of
/// string splitting for the pattern side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicPattern {
    words: Vec<PatternWord>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum PatternWord {
    Literal(String),
    /// `*`: exactly one word.
    One,
    /// `#`: zero or more words.
    Any,
}

impl TopicPattern {
    pub fn parse(binding_key: &str) -> Self {
        let words = topic_words(binding_key)
            .into_iter()
            .map(|w| match w {
                "*" => PatternWord::One,
                "#" => PatternWord::Any,
                other => PatternWord::Literal(other.to_owned()),
            })
            .collect();
        TopicPattern { words }
    }

    /// True when the pattern matches the routing key's words. Runs in O(pattern × key) with a
    /// single row of state, so hostile keys full of `#` cannot cause exponential backtracking.
    pub fn matches(&self, key_words: &[&str]) -> bool {
        // reachable[j]: the pattern prefix processed so far can consume exactly j key words.
        let mut reachable = vec![false; key_words.len() + 1];
        reachable[0] = true;
        for word in &self.words {
            match word {
                PatternWord::Any => {
                    // `#` extends every reachable position to all later positions.
                    let mut seen = false;
                    for slot in reachable.iter_mut() {
                        seen |= *slot;
                        *slot = seen;
                    }
                }
                PatternWord::One | PatternWord::Literal(_) => {
                    for j in (1..=key_words.len()).rev() {
                        let word_ok = match word {
                            PatternWord::Literal(lit) => lit == key_words[j - 1],
                            _ => true,
                        };
                        reachable[j] = reachable[j - 1] && word_ok;
                    }
                    reachable[0] = false;
                }
            }
            if !reachable.iter().any(|r| *r) {
                return false;
            }
        }
        reachable[key_words.len()]
    }
}

/// How a headers-exchange binding combines its entries (`x-match`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadersMatch {
    All,
    Any,
    AllWithX,
    AnyWithX,
}

impl HeadersMatch {
    /// Reads `x-match` from binding arguments. Unknown values are rejected at bind time by
    /// [`validate_headers_binding`], so here an absent or odd value means the default, `all`.
    pub fn from_arguments(args: &FieldTable) -> Self {
        match args.get("x-match").and_then(FieldValue::as_str) {
            Some("any") => HeadersMatch::Any,
            Some("all-with-x") => HeadersMatch::AllWithX,
            Some("any-with-x") => HeadersMatch::AnyWithX,
            _ => HeadersMatch::All,
        }
    }

    fn considers(self, key: &str) -> bool {
        if key == "x-match" {
            return false;
        }
        match self {
            HeadersMatch::All | HeadersMatch::Any => !key.starts_with("x-"),
            HeadersMatch::AllWithX | HeadersMatch::AnyWithX => true,
        }
    }

    fn is_all(self) -> bool {
        matches!(self, HeadersMatch::All | HeadersMatch::AllWithX)
    }
}

/// Rejects binding arguments RabbitMQ rejects: an `x-match` that is not one of the four
/// known words. Returns the text for a 406 PRECONDITION_FAILED.
pub fn validate_headers_binding(args: &FieldTable) -> Result<(), String> {
    match args.get("x-match") {
        None => Ok(()),
        Some(value) => match value.as_str() {
            Some("all" | "any" | "all-with-x" | "any-with-x") => Ok(()),
            _ => Err(format!(
                "Invalid x-match field value {value:?}; expected all, any, all-with-x, or any-with-x"
            )),
        },
    }
}

/// Headers-exchange match of a binding's arguments against a message's headers.
///
/// A binding entry of type void matches on the header's presence alone. Otherwise values
/// must be equal, where numbers compare by value across integer and float types (RabbitMQ
/// compares Erlang terms with `==`).
pub fn headers_match(binding_args: &FieldTable, headers: Option<&FieldTable>) -> bool {
    let mode = HeadersMatch::from_arguments(binding_args);
    let mut any_matched = false;
    let mut all_matched = true;
    for (key, expected) in binding_args.iter() {
        if !mode.considers(key.as_str()) {
            continue;
        }
        let actual = headers.and_then(|h| h.get(key.as_str()));
        let matched = match (expected, actual) {
            (_, None) => false,
            (FieldValue::Void, Some(_)) => true,
            (expected, Some(actual)) => field_values_equal(expected, actual),
        };
        if matched {
            any_matched = true;
        } else {
            all_matched = false;
        }
    }
    if mode.is_all() {
        all_matched
    } else {
        any_matched
    }
}

/// Equality of table values as RabbitMQ's term comparison sees them.
pub fn field_values_equal(a: &FieldValue, b: &FieldValue) -> bool {
    use FieldValue as V;
    if let (Some(x), Some(y)) = (integer_of(a), integer_of(b)) {
        return x == y;
    }
    if let (Some(x), Some(y)) = (number_of(a), number_of(b)) {
        return x == y;
    }
    match (a, b) {
        (V::Bool(x), V::Bool(y)) => x == y,
        (V::LongStr(_) | V::Bytes(_), V::LongStr(_) | V::Bytes(_)) => bytes_of(a) == bytes_of(b),
        (
            V::Decimal {
                scale: s1,
                value: v1,
            },
            V::Decimal {
                scale: s2,
                value: v2,
            },
        ) => s1 == s2 && v1 == v2,
        (V::Void, V::Void) => true,
        (V::Array(x), V::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| field_values_equal(p, q))
        }
        (V::Table(x), V::Table(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y.iter())
                    .all(|((k1, v1), (k2, v2))| k1 == k2 && field_values_equal(v1, v2))
        }
        _ => false,
    }
}

fn integer_of(v: &FieldValue) -> Option<i128> {
    use FieldValue as V;
    Some(match *v {
        V::I8(x) => x as i128,
        V::U8(x) => x as i128,
        V::I16(x) => x as i128,
        V::U16(x) => x as i128,
        V::I32(x) => x as i128,
        V::U32(x) => x as i128,
        V::I64(x) => x as i128,
        V::Timestamp(x) => x as i128,
        _ => return None,
    })
}

fn number_of(v: &FieldValue) -> Option<f64> {
    match *v {
        FieldValue::F32(x) => Some(x as f64),
        FieldValue::F64(x) => Some(x),
        _ => integer_of(v).map(|i| i as f64),
    }
}

fn bytes_of(v: &FieldValue) -> &[u8] {
    match v {
        FieldValue::LongStr(s) => s.as_bytes(),
        FieldValue::Bytes(b) => b,
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use warren_codec::{LongStr, ShortStr};

    fn topic(pattern: &str, key: &str) -> bool {
        TopicPattern::parse(pattern).matches(&topic_words(key))
    }

    #[test]
    fn topic_basics() {
        assert!(topic("a.b.c", "a.b.c"));
        assert!(!topic("a.b.c", "a.b"));
        assert!(topic("a.*.c", "a.x.c"));
        assert!(!topic("a.*.c", "a.c"));
        assert!(topic("a.#", "a"));
        assert!(topic("a.#", "a.b.c"));
        assert!(topic("#.a", "a"));
        assert!(topic("#.a", "x.y.a"));
        assert!(!topic("#.a", "x.y.b"));
        assert!(topic("#", ""));
        assert!(topic("#", "anything.at.all"));
        assert!(!topic("*", ""));
        assert!(topic("*", "one"));
        assert!(topic("", ""));
        assert!(!topic("", "a"));
        assert!(topic("*.orange.*", "quick.orange.rabbit"));
        assert!(topic("lazy.#", "lazy.orange.male.rabbit"));
        assert!(!topic("*.*.rabbit", "quick.orange.male.rabbit"));
        assert!(topic("a.#.#.b", "a.b"));
        assert!(topic("#.*", "a"));
        assert!(!topic("#.*", ""));
    }

    #[test]
    fn topic_empty_words_count() {
        assert!(topic("a.*", "a."));
        assert!(topic("*.a", ".a"));
        assert!(topic("*.*", "."));
        assert!(!topic("*", "."));
        assert!(topic("a..b", "a..b"));
    }

    /// Obvious recursive definition, exponential but fine for short inputs; the DP must agree.
    fn reference_match(p: &[&str], k: &[&str]) -> bool {
        match p.split_first() {
            None => k.is_empty(),
            Some((&"#", rest)) => (0..=k.len()).any(|i| reference_match(rest, &k[i..])),
            Some((&w, rest)) => match k.split_first() {
                Some((&kw, krest)) => (w == "*" || w == kw) && reference_match(rest, krest),
                None => false,
            },
        }
    }

    proptest! {
        #[test]
        fn topic_dp_agrees_with_reference(
            pattern in proptest::collection::vec(prop_oneof!["a", "b", "", "\\*", "#"], 0..7),
            key in proptest::collection::vec(prop_oneof!["a", "b", ""], 0..7),
        ) {
            let pattern = pattern.join(".");
            let key = key.join(".");
            let p = topic_words(&pattern);
            let k = topic_words(&key);
            prop_assert_eq!(TopicPattern::parse(&pattern).matches(&k), reference_match(&p, &k));
        }
    }

    fn table(entries: &[(&str, FieldValue)]) -> FieldTable {
        let mut t = FieldTable::new();
        for (k, v) in entries {
            t.insert(ShortStr::try_from(*k).unwrap(), v.clone());
        }
        t
    }

    fn s(v: &str) -> FieldValue {
        FieldValue::LongStr(LongStr::from(v))
    }

    #[test]
    fn headers_all_and_any() {
        let all = table(&[
            ("x-match", s("all")),
            ("format", s("pdf")),
            ("type", s("report")),
        ]);
        let any = table(&[
            ("x-match", s("any")),
            ("format", s("pdf")),
            ("type", s("report")),
        ]);
        let both = table(&[("format", s("pdf")), ("type", s("report"))]);
        let one = table(&[("format", s("pdf")), ("type", s("log"))]);
        assert!(headers_match(&all, Some(&both)));
        assert!(!headers_match(&all, Some(&one)));
        assert!(headers_match(&any, Some(&one)));
        assert!(!headers_match(&any, Some(&table(&[("other", s("x"))]))));
        assert!(!headers_match(&all, None));
        // A binding with only x- entries: `all` matches everything, `any` nothing.
        let empty_all = table(&[("x-match", s("all"))]);
        let empty_any = table(&[("x-match", s("any"))]);
        assert!(headers_match(&empty_all, None));
        assert!(!headers_match(&empty_any, Some(&both)));
    }

    #[test]
    fn headers_x_keys_and_void_and_numbers() {
        let with_x = table(&[("x-match", s("all-with-x")), ("x-tenant", s("t1"))]);
        assert!(headers_match(
            &with_x,
            Some(&table(&[("x-tenant", s("t1"))]))
        ));
        let plain = table(&[("x-match", s("all")), ("x-tenant", s("t1"))]);
        assert!(headers_match(&plain, Some(&table(&[]))));
        let presence = table(&[("flag", FieldValue::Void)]);
        assert!(headers_match(
            &presence,
            Some(&table(&[("flag", s("whatever"))]))
        ));
        assert!(!headers_match(&presence, Some(&table(&[]))));
        let num = table(&[("n", FieldValue::I64(1))]);
        assert!(headers_match(
            &num,
            Some(&table(&[("n", FieldValue::U8(1))]))
        ));
        assert!(headers_match(
            &num,
            Some(&table(&[("n", FieldValue::F64(1.0))]))
        ));
        assert!(!headers_match(&num, Some(&table(&[("n", s("1"))]))));
    }

    #[test]
    fn x_match_validation() {
        assert!(validate_headers_binding(&table(&[("x-match", s("any"))])).is_ok());
        assert!(validate_headers_binding(&table(&[("x-match", s("some"))])).is_err());
        assert!(validate_headers_binding(&table(&[])).is_ok());
    }
}
