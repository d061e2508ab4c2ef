//! Header access for policy, header rules' mismatch actions (Cilium's `HeaderMatch::allowed`), and
//! what they found for the access log.

use super::*;

/// Equality without an early exit on the first differing byte (secret values).
pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Cilium's `HeaderMatch::allowed`: returns whether matching can continue, applying the action.
pub(super) fn apply_header_match(hm: &HeaderMatch, headers: &mut dyn HeaderMap, log: &mut HeaderLog) -> bool {
    let current: Option<Vec<u8>> = headers.get(&hm.name).map(Cow::into_owned);
    let presence = hm.value.is_empty();
    let matches = match &current {
        None => false,
        Some(_) if presence => true,
        Some(v) => constant_time_eq(v, hm.value.as_bytes()),
    };
    let shown = |v: &str| if hm.secret { "[redacted]".to_owned() } else { v.to_owned() };
    if matches {
        match hm.match_action {
            MatchAction::Continue => true,
            MatchAction::Fail => {
                log.rejected.push((hm.name.clone(), shown(&hm.value)));
                false
            }
            MatchAction::Delete => {
                log.rejected.push((hm.name.clone(), shown(&hm.value)));
                headers.remove(&hm.name);
                true
            }
        }
    } else {
        match hm.mismatch_action {
            MismatchAction::Fail => {
                log.missing.push((hm.name.clone(), shown(&hm.value)));
                false
            }
            MismatchAction::Continue => {
                log.missing.push((hm.name.clone(), shown(&hm.value)));
                true
            }
            MismatchAction::Add => {
                headers.append(&hm.name, hm.value.as_bytes());
                log.missing.push((hm.name.clone(), shown(&hm.value)));
                true
            }
            MismatchAction::Delete => {
                if let (false, Some(v)) = (presence, &current) {
                    headers.remove(&hm.name);
                    log.rejected.push((hm.name.clone(), String::from_utf8_lossy(v).into_owned()));
                }
                true
            }
            MismatchAction::Replace => {
                if let Some(v) = &current {
                    log.rejected.push((hm.name.clone(), String::from_utf8_lossy(v).into_owned()));
                }
                headers.set(&hm.name, hm.value.as_bytes());
                log.missing.push((hm.name.clone(), shown(&hm.value)));
                true
            }
        }
    }
}

/// Header access for policy. Names are lower case. The proxy implements it over its request headers.
pub trait HeaderMap {
    /// All values of a header joined with `,`, or `None` when absent.
    fn get(&self, name: &str) -> Option<Cow<'_, [u8]>>;
    /// Adds a value (keeps existing ones).
    fn append(&mut self, name: &str, value: &[u8]);
    /// Replaces every value with one.
    fn set(&mut self, name: &str, value: &[u8]);
    /// Removes the header.
    fn remove(&mut self, name: &str);
}

/// A small ordered header list (offline evaluation, tests).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimpleHeaders(pub Vec<(String, Vec<u8>)>);

impl SimpleHeaders {
    /// Builds from name/value pairs (names are lower-cased).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self(pairs.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v.as_bytes().to_vec())).collect())
    }
}

impl HeaderMap for SimpleHeaders {
    fn get(&self, name: &str) -> Option<Cow<'_, [u8]>> {
        let mut vals = self.0.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_slice());
        let first = vals.next()?;
        match vals.next() {
            None => Some(Cow::Borrowed(first)),
            Some(second) => {
                let mut joined = first.to_vec();
                for v in std::iter::once(second).chain(vals) {
                    joined.push(b',');
                    joined.extend_from_slice(v);
                }
                Some(Cow::Owned(joined))
            }
        }
    }
    fn append(&mut self, name: &str, value: &[u8]) {
        self.0.push((name.to_owned(), value.to_vec()));
    }
    fn set(&mut self, name: &str, value: &[u8]) {
        self.remove(name);
        self.append(name, value);
    }
    fn remove(&mut self, name: &str) {
        self.0.retain(|(k, _)| k != name);
    }
}

/// Header findings for the access log (values of secret matches are `[redacted]`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderLog {
    /// Headers that were present with a rejected value (removed or replaced).
    pub rejected: Vec<(String, String)>,
    /// Expected headers that were missing (or added).
    pub missing: Vec<(String, String)>,
}
