//! DNS names and name patterns, as Cilium's DNS proxy and `toFQDNs` selectors match them.
//!
//! Owns name normalisation (lower case, trailing dot), `matchName` / `matchPattern` validation and
//! their translation to anchored regexes (`*` = one label's characters, a leading `**.` = one or more
//! labels, a lone `*` = every name), and the compiled per-port DNS rule set. It does no I/O and
//! parses no DNS messages (the proxy does that with hickory-proto).

use std::fmt;

use regex::Regex;

/// Characters allowed in one label by a `*` wildcard.
const LABEL_CHARS: &str = "[-a-zA-Z0-9_]";
/// Regex selecting every fully-qualified name (and the root).
const ALL_FQDNS: &str = r"(?:^(?:[-a-zA-Z0-9_]+[.])+$)|(?:^[.]$)";
/// Cilium's maximum length of a name or pattern in a selector.
pub const MAX_NAME_LEN: usize = 255;

/// Lower-cases a name and makes it fully qualified (trailing dot), as the DNS proxy does before
/// matching. The empty name stays empty (it matches nothing); the root is `.`.
///
/// ```
/// assert_eq!(policy_engine::dns::normalize_name("API.GitHub.com"), "api.github.com.");
/// assert_eq!(policy_engine::dns::normalize_name("."), ".");
/// ```
pub fn normalize_name(name: &str) -> String {
    let mut n = name.trim().to_ascii_lowercase();
    if !n.is_empty() && !n.ends_with('.') {
        n.push('.');
    }
    n
}

/// A name selector: `matchName` or `matchPattern`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NamePattern {
    /// Exactly this name (normalised, fully qualified).
    Name(String),
    /// A pattern as written by the user (normalised), see [`NamePattern::regex_source`].
    Pattern(String),
}

/// Why a selector is invalid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NamePatternError {
    /// Both or neither of `matchName` / `matchPattern`.
    #[error("only one of MatchName or MatchPattern is allowed in an FQDNSelector")]
    Both,
    /// Neither field is set.
    #[error("one of matchName or matchPattern must be set")]
    Neither,
    /// Characters outside the allowed set, or empty labels.
    #[error("invalid {field} {value:?}: must match {allowed}")]
    Invalid {
        /// `matchName` or `matchPattern`.
        field: &'static str,
        /// The offending value.
        value: String,
        /// The allowed form.
        allowed: &'static str,
    },
    /// Longer than 255 characters.
    #[error("{field} is longer than {MAX_NAME_LEN} characters")]
    TooLong {
        /// `matchName` or `matchPattern`.
        field: &'static str,
    },
}

/// `^([-a-zA-Z0-9_(extra)]+[.]?)+$`: allowed characters, no leading dot, no empty label.
fn valid_selector_chars(s: &str, allow_star: bool) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && !s.contains("..")
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' || (allow_star && c == '*'))
}

impl NamePattern {
    /// Validates a selector from its two optional fields (Cilium's CRD rules).
    pub fn new(match_name: Option<&str>, match_pattern: Option<&str>) -> Result<Self, NamePatternError> {
        let name = match_name.filter(|s| !s.is_empty());
        let pattern = match_pattern.filter(|s| !s.is_empty());
        match (name, pattern) {
            (Some(_), Some(_)) => Err(NamePatternError::Both),
            (None, None) => Err(NamePatternError::Neither),
            (Some(n), None) => {
                if n.len() > MAX_NAME_LEN {
                    return Err(NamePatternError::TooLong { field: "matchName" });
                }
                if !valid_selector_chars(n, false) {
                    return Err(NamePatternError::Invalid {
                        field: "matchName",
                        value: n.to_owned(),
                        allowed: "^([-a-zA-Z0-9_]+[.]?)+$",
                    });
                }
                Ok(Self::Name(normalize_name(n)))
            }
            (None, Some(p)) => {
                if p.len() > MAX_NAME_LEN {
                    return Err(NamePatternError::TooLong { field: "matchPattern" });
                }
                if !valid_selector_chars(p, true) {
                    return Err(NamePatternError::Invalid {
                        field: "matchPattern",
                        value: p.to_owned(),
                        allowed: "^([-a-zA-Z0-9_*]+[.]?)+$",
                    });
                }
                Ok(Self::Pattern(p.trim().to_ascii_lowercase()))
            }
        }
    }

    /// Builds a pattern without validation (used by conformance tests and internal callers that
    /// match Cilium's matcher on arbitrary input).
    pub fn pattern_unchecked(p: &str) -> Self {
        Self::Pattern(p.trim().to_ascii_lowercase())
    }

    /// True when this selects every name (`*`, `**`, `*.`, `**.`).
    pub fn is_match_all(&self) -> bool {
        matches!(self, Self::Pattern(p) if matches!(p.as_str(), "*" | "**" | "*." | "**."))
    }

    /// The unanchored regex this selector stands for (Cilium's `matchpattern.ToUnAnchoredRegexp`, with
    /// only a leading `**.` spanning several labels, as since v1.19).
    pub fn regex_source(&self) -> String {
        match self {
            Self::Name(n) => regex::escape(n),
            Self::Pattern(_) if self.is_match_all() => ALL_FQDNS.to_owned(),
            Self::Pattern(p) => {
                let fqdn = normalize_name(p);
                let (prefix, rest) = match fqdn.strip_prefix("**.") {
                    Some(rest) => (format!("(?:{LABEL_CHARS}+[.])+"), rest),
                    None => (String::new(), fqdn.as_str()),
                };
                let mut out = prefix;
                for c in rest.chars() {
                    match c {
                        '.' => out.push_str("[.]"),
                        '*' => {
                            out.push_str(LABEL_CHARS);
                            out.push('*');
                        }
                        c => out.push_str(&regex::escape(c.encode_utf8(&mut [0; 4]))),
                    }
                }
                out
            }
        }
    }

    /// Compiles the anchored form of this one selector.
    pub fn to_regex(&self) -> Regex {
        compile_anchored(std::slice::from_ref(self))
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(n) => write!(f, "matchName: {n}"),
            Self::Pattern(p) => write!(f, "matchPattern: {p}"),
        }
    }
}

/// One anchored regex for a list of selectors: `^(?:r1|r2|...)$`.
fn compile_anchored(patterns: &[NamePattern]) -> Regex {
    let alts: Vec<String> = patterns.iter().map(|p| format!("(?:{})", p.regex_source())).collect();
    let src = format!("^(?:{})$", alts.join("|"));
    // Every piece is escaped or built from a fixed alphabet, so this cannot fail; fall back to a
    // regex that matches nothing rather than panicking.
    Regex::new(&src).unwrap_or_else(|_| never_matches())
}

fn never_matches() -> Regex {
    #[expect(clippy::unwrap_used, reason = "a constant, valid regex")]
    Regex::new(r"[^\s\S]").unwrap()
}

/// The names one L7 DNS entry allows: the union of its rules, or every name.
#[derive(Clone, Debug)]
pub struct DnsRuleSet {
    matcher: Option<Regex>,
    patterns: Vec<NamePattern>,
}

impl DnsRuleSet {
    /// Compiles a rule list. An empty list, or any match-all pattern, allows every name (as Cilium).
    pub fn new(patterns: Vec<NamePattern>) -> Self {
        let matcher = if patterns.is_empty() || patterns.iter().any(NamePattern::is_match_all) {
            None
        } else {
            Some(compile_anchored(&patterns))
        };
        Self { matcher, patterns }
    }

    /// Whether a query name is allowed (the name is normalised first).
    ///
    /// ```
    /// use policy_engine::dns::{DnsRuleSet, NamePattern};
    /// let set = DnsRuleSet::new(vec![NamePattern::new(None, Some("*.cilium.io")).unwrap()]);
    /// assert!(set.allows("Sub.Cilium.io"));
    /// assert!(!set.allows("cilium.io"));
    /// ```
    pub fn allows(&self, qname: &str) -> bool {
        match &self.matcher {
            None => true,
            Some(re) => re.is_match(&normalize_name(qname)),
        }
    }

    /// The rules, as written.
    pub fn patterns(&self) -> &[NamePattern] {
        &self.patterns
    }

    /// True when every name is allowed.
    pub fn allows_all(&self) -> bool {
        self.matcher.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, name: &str) -> bool {
        NamePattern::pattern_unchecked(pattern).to_regex().is_match(name)
    }

    #[test]
    fn single_label_wildcard() {
        assert!(m("*.cilium.io", "sub.cilium.io."));
        assert!(!m("*.cilium.io", "cilium.io."));
        assert!(!m("*.cilium.io", "a.b.cilium.io."));
        assert!(m("special*service.api.cilium.io", "special-region1-service.api.cilium.io."));
        assert!(!m("special*service.api.cilium.io", "region1-service.api.cilium.io."));
    }

    #[test]
    fn leading_double_star_spans_labels() {
        assert!(m("**.cilium.io", "a.b.cilium.io."));
        assert!(!m("**.cilium.io", "cilium.io."));
        // Only a leading `**.` spans labels.
        assert!(!m("*.**.cilium.io.", "2._foobar._tcp.cilium.io."));
    }

    #[test]
    fn validation() {
        assert!(NamePattern::new(Some("cilium.io"), Some("*")).is_err());
        assert!(NamePattern::new(None, None).is_err());
        assert!(NamePattern::new(Some("a{1,2}.cilium.io."), None).is_err());
        assert!(NamePattern::new(Some("_cilium.io"), None).is_ok());
        assert!(NamePattern::new(None, Some("*cilium.io")).is_ok());
        assert!(NamePattern::new(None, Some("[a-z]*.cilium.io.")).is_err());
        assert!(NamePattern::new(Some(&"a".repeat(256)), None).is_err());
    }

    #[test]
    fn rule_set_wildcards() {
        assert!(DnsRuleSet::new(vec![]).allows("anything.example."));
        let star = DnsRuleSet::new(vec![NamePattern::new(None, Some("*")).unwrap()]);
        assert!(star.allows("www.example.org"));
        let names = DnsRuleSet::new(vec![
            NamePattern::new(Some("cilium.io"), None).unwrap(),
            NamePattern::new(None, Some("*.api.cilium.io")).unwrap(),
        ]);
        assert!(names.allows("CILIUM.io."));
        assert!(names.allows("service1.api.cilium.io"));
        assert!(!names.allows("example.com"));
        assert!(!names.allows(""));
    }
}
