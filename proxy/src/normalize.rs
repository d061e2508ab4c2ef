//! Request-target normalisation: the one path the proxy both judges and forwards.
//!
//! Policy paths are full-match regexes over the request target, so every way of writing the same
//! resource must reach the matcher in one form, and the upstream must receive that same form (a
//! backend that normalises differently could otherwise serve a resource the proxy never judged).
//! The rules, and why, are in `docs/normalization.md`:
//!
//! * reject: `#`, backslashes, control characters, malformed `%` escapes, encoded NUL, encoded
//!   slash or backslash (`%2F`, `%5C`: backends disagree on them), double encoding in the path
//!   (`%252e`: for backends that decode twice), escapes that decode to invalid
//!   UTF-8 (overlong encodings included), and `.`/`..` segments hidden behind `;` parameters;
//! * normalise: decode escaped unreserved characters (`%41` → `A`), upper-case the hex of the
//!   others, merge repeated slashes, and remove `.` and `..` segments (RFC 3986 §5.2.4);
//! * keep the query as sent (it is part of the path Cilium matches), after the same character and
//!   escape checks.

use std::fmt;

/// Why a request target is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    /// Not origin-form (`/...`) or `*`.
    #[error("request target must start with '/'")]
    NotOriginForm,
    /// A character that has no place in a request target.
    #[error("forbidden character {0:?} in the request target")]
    Forbidden(char),
    /// `%` not followed by two hex digits.
    #[error("malformed percent-escape")]
    BadEscape,
    /// `%00`.
    #[error("encoded NUL")]
    EncodedNul,
    /// `%2F` / `%5C` in the path.
    #[error("encoded slash or backslash in the path")]
    EncodedSlash,
    /// Escapes that are not valid UTF-8 (overlong encodings included).
    #[error("percent-escapes that are not valid UTF-8")]
    InvalidUtf8,
    /// `%25` followed by two hex digits in the path: an escape meant to survive one decoding.
    #[error("double percent-encoding in the path")]
    DoubleEncoding,
    /// `..;x` and friends.
    #[error("dot segment with path parameters")]
    DotSegmentParams,
}

/// A normalised target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Path and query, normalised: what policy matches and what the upstream receives.
    pub path_and_query: String,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path_and_query)
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Checks characters and escapes of one component; returns it with unreserved escapes decoded and
/// the remaining escapes upper-cased. `is_path` adds the slash rules.
fn clean(component: &str, is_path: bool) -> Result<String, TargetError> {
    let bytes = component.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    let mut decoded: Vec<u8> = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let (Some(h), Some(l)) =
                    (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex))
                else {
                    return Err(TargetError::BadEscape);
                };
                let v = h * 16 + l;
                if v == 0 {
                    return Err(TargetError::EncodedNul);
                }
                if is_path && (v == b'/' || v == b'\\') {
                    return Err(TargetError::EncodedSlash);
                }
                if is_path
                    && v == b'%'
                    && bytes.get(i + 3).copied().and_then(hex).is_some()
                    && bytes.get(i + 4).copied().and_then(hex).is_some()
                {
                    return Err(TargetError::DoubleEncoding);
                }
                decoded.push(v);
                if unreserved(v) {
                    out.push(char::from(v));
                } else {
                    out.push('%');
                    out.push(char::from_digit(u32::from(h), 16).unwrap_or('0').to_ascii_uppercase());
                    out.push(char::from_digit(u32::from(l), 16).unwrap_or('0').to_ascii_uppercase());
                }
                i += 3;
            }
            b'#' | b'\\' => return Err(TargetError::Forbidden(char::from(b))),
            0x00..=0x20 | 0x7f..=0xff => return Err(TargetError::Forbidden(char::from(b))),
            _ => {
                decoded.push(b);
                out.push(char::from(b));
                i += 1;
            }
        }
    }
    if std::str::from_utf8(&decoded).is_err() {
        return Err(TargetError::InvalidUtf8);
    }
    Ok(out)
}

/// RFC 3986 §5.2.4 on a path that starts with `/`, with empty segments merged away.
fn remove_dot_segments(path: &str) -> Result<String, TargetError> {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        let bare = seg.split(';').next().unwrap_or("");
        if seg.contains(';') && (bare == "." || bare == "..") {
            return Err(TargetError::DotSegmentParams);
        }
        match *seg {
            "" => trailing_slash = i == last,
            "." => trailing_slash = i == last,
            ".." => {
                out.pop();
                trailing_slash = i == last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut p = String::with_capacity(path.len());
    for s in &out {
        p.push('/');
        p.push_str(s);
    }
    if p.is_empty() || trailing_slash {
        p.push('/');
    }
    Ok(p)
}

/// Normalises an origin-form request target (`/path?query`) or `*`.
///
/// ```
/// use proxy::normalize::{normalize, TargetError};
/// assert_eq!(normalize("/public/../private").unwrap().path_and_query, "/private");
/// assert_eq!(normalize("/%70ublic//x/./y?q=%2f").unwrap().path_and_query, "/public/x/y?q=%2F");
/// assert_eq!(normalize("/a%2Fb"), Err(TargetError::EncodedSlash));
/// assert_eq!(normalize("/%c0%ae%c0%ae/"), Err(TargetError::InvalidUtf8));
/// ```
pub fn normalize(target: &str) -> Result<Target, TargetError> {
    if is_plain(target) {
        return Ok(Target { path_and_query: target.to_owned() });
    }
    normalize_slow(target)
}

/// Already normal: origin-form, printable ASCII with nothing to decode or forbid, no empty or dot
/// segment anywhere. Most requests are; they skip the component-wise pass.
fn is_plain(target: &str) -> bool {
    let b = target.as_bytes();
    b.first() == Some(&b'/')
        && b.iter().all(|&c| matches!(c, 0x21..=0x7e) && !matches!(c, b'%' | b'\\' | b'#'))
        && !b.windows(2).any(|w| w == b"//" || w == b"/.")
}

fn normalize_slow(target: &str) -> Result<Target, TargetError> {
    if target == "*" {
        return Ok(Target { path_and_query: "*".into() });
    }
    if !target.starts_with('/') {
        return Err(TargetError::NotOriginForm);
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let path = remove_dot_segments(&clean(path, true)?)?;
    let mut out = path;
    if let Some(q) = query {
        out.push('?');
        out.push_str(&clean(q, false)?);
    }
    Ok(Target { path_and_query: out })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn the_fast_path_agrees_with_the_full_one(t in "/[a-zA-Z0-9./%;?=&_~-]{0,24}") {
            if is_plain(&t) {
                prop_assert_eq!(normalize_slow(&t).map(|x| x.path_and_query), Ok(t.clone()));
            }
        }
    }

    fn n(s: &str) -> Result<String, TargetError> {
        normalize(s).map(|t| t.path_and_query)
    }

    #[test]
    fn dot_segments_and_slashes() {
        assert_eq!(n("/"), Ok("/".into()));
        assert_eq!(n("/a/b/../c"), Ok("/a/c".into()));
        assert_eq!(n("/a/./b/"), Ok("/a/b/".into()));
        assert_eq!(n("/../../etc/passwd"), Ok("/etc/passwd".into()));
        assert_eq!(n("//admin"), Ok("/admin".into()));
        // Slashes merge before dot segments are removed (as nginx does): the `..` climbs out of `api`.
        assert_eq!(n("/api//../admin"), Ok("/admin".into()));
        assert_eq!(n("/a/.."), Ok("/".into()));
        assert_eq!(n("/a/%2e%2e/b"), Ok("/b".into()));
        assert_eq!(n("/a/%2E/b"), Ok("/a/b".into()));
    }

    #[test]
    fn escapes() {
        assert_eq!(n("/%7Euser/%41"), Ok("/~user/A".into()));
        assert_eq!(n("/caf%c3%a9"), Ok("/caf%C3%A9".into()));
        assert_eq!(n("/x%2"), Err(TargetError::BadEscape));
        assert_eq!(n("/x%zz"), Err(TargetError::BadEscape));
        assert_eq!(n("/x%00"), Err(TargetError::EncodedNul));
        assert_eq!(n("/x%5cy"), Err(TargetError::EncodedSlash));
        assert_eq!(n("/%ff"), Err(TargetError::InvalidUtf8));
        assert_eq!(n("/a\\b"), Err(TargetError::Forbidden('\\')));
        assert_eq!(n("/a#b"), Err(TargetError::Forbidden('#')));
        assert_eq!(n("/..;/admin"), Err(TargetError::DotSegmentParams));
        assert_eq!(n("/a/%252e%252e/b"), Err(TargetError::DoubleEncoding));
        assert_eq!(n("/100%25"), Ok("/100%25".into()));
        assert_eq!(n("/q?v=%2541"), Ok("/q?v=%2541".into()));
        assert_eq!(n("/a;b/c"), Ok("/a;b/c".into()));
        assert_eq!(n("http://x/"), Err(TargetError::NotOriginForm));
        assert_eq!(n("/q?a=%2F&b=%20"), Ok("/q?a=%2F&b=%20".into()));
        assert_eq!(n("/q?x=%00"), Err(TargetError::EncodedNul));
    }

    proptest! {
        // Normalisation is idempotent and its output has no dot segments or empty segments.
        #[test]
        fn idempotent(segs in proptest::collection::vec(prop_oneof!["[a-z]{1,3}", Just(".".to_owned()), Just("..".to_owned()), Just(String::new()), Just("%2e".to_owned()), Just("%41".to_owned())], 0..8)) {
            let target = format!("/{}", segs.join("/"));
            if let Ok(once) = n(&target) {
                prop_assert_eq!(n(&once), Ok(once.clone()));
                for seg in once.split('/').skip(1) {
                    prop_assert!(seg != "." && seg != "..");
                }
                prop_assert!(!once.contains("//"));
            }
        }
    }
}
