//! HTTP L7 rules: the validated rule model, its compiled and indexed form, and per-request evaluation
//! with Cilium's semantics.
//!
//! * `method`, `path` and `host` are RE2-style regexes that must match the **whole** value (Envoy
//!   `safe_regex`); `path` is the request target as sent (`:path`, query included).
//! * `headers: ["Name: value"]` is an exact match (presence when there is no value); `headerMatches`
//!   carry a mismatch action (`""` fail, `LOG`, `ADD`, `DELETE`, `REPLACE`) and may take their value
//!   from a secret. When a rule set has header matches, every matching rule runs its actions (no
//!   short-circuit), exactly as cilium-envoy does.
//!
//! A rule set compiles its paths into one index (`index`): literal paths in a hash map, regex paths
//! in one overlapping lazy DFA (a `RegexSet` only when the DFA cannot be built), so a request costs
//! one hash lookup plus one automaton pass however many rules there are. Header rules and their
//! mismatch actions are `headers`.
//! This module knows nothing of sockets or HTTP parsing; the proxy hands it method, path, authority and
//! a header map.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use std::panic::{RefUnwindSafe, UnwindSafe};

use regex::bytes::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};
use regex_automata::hybrid::dfa::{Cache, DFA, OverlappingState};
use regex_automata::util::pool::Pool;
use regex_automata::util::syntax;
use regex_automata::{Anchored, Input, MatchKind, nfa::thompson};
use regex_syntax::hir::{HirKind, Look};
use rustc_hash::FxHashMap;
use smallvec::SmallVec;

mod headers;
mod index;
#[cfg(test)]
mod tests;

use self::headers::apply_header_match;
pub use self::headers::{HeaderLog, HeaderMap, SimpleHeaders};
use self::index::{PathAutomaton, PathIndex, PathRegexes, RegexCache, literal_of};

/// Upper bound for one compiled regex program (bytes).
const REGEX_SIZE_LIMIT: usize = 16 << 20;
/// Upper bound for the path automaton of one rule set (bytes).
const REGEX_SET_SIZE_LIMIT: usize = 256 << 20;
/// Transition cache of the path automaton, per thread that evaluates (bytes).
const PATH_DFA_CACHE: usize = 16 << 20;

/// How a string value is matched.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StrMatch {
    /// The whole value equals this.
    Exact(String),
    /// The whole value matches this regex.
    Regex(String),
}

impl fmt::Display for StrMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(s) => write!(f, "{s:?}"),
            Self::Regex(s) => write!(f, "/{s}/"),
        }
    }
}

/// A header requirement of a rule (Envoy `HeaderMatcher`): all of a rule's requirements must hold.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HeaderMatcher {
    /// Lower-case header name.
    pub name: String,
    /// What the value must be.
    pub kind: HeaderMatcherKind,
}

/// What a [`HeaderMatcher`] requires.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HeaderMatcherKind {
    /// The header is present with exactly this value (several values are joined with `,`).
    Exact(String),
    /// The header is present and its value matches this regex in full.
    Regex(String),
    /// The header is present.
    Present,
    /// Never holds (a header match whose secret could not be read).
    Never,
}

/// What a header match does when the header matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MatchAction {
    /// Keep going.
    Continue,
    /// The rule does not match.
    Fail,
    /// Remove the header and keep going.
    Delete,
}

/// What a header match does when the header does not match.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MismatchAction {
    /// The rule does not match (CRD `mismatch: ""`).
    Fail,
    /// Log and keep going (CRD `LOG`).
    Continue,
    /// Add the expected value (CRD `ADD`).
    Add,
    /// Remove the header (CRD `DELETE`).
    Delete,
    /// Set the header to the expected value (CRD `REPLACE`).
    Replace,
}

impl MismatchAction {
    /// Parses the CRD `mismatch` field.
    pub fn from_crd(s: &str) -> Option<Self> {
        Some(match s {
            "" => Self::Fail,
            "LOG" => Self::Continue,
            "ADD" => Self::Add,
            "DELETE" => Self::Delete,
            "REPLACE" => Self::Replace,
            _ => return None,
        })
    }
}

/// A header match with actions (Cilium `HeaderMatch`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HeaderMatch {
    /// Lower-case header name.
    pub name: String,
    /// Expected value; empty means presence only.
    pub value: String,
    /// The value came from a secret: never log it.
    pub secret: bool,
    /// Action on match.
    pub match_action: MatchAction,
    /// Action on mismatch.
    pub mismatch_action: MismatchAction,
}

/// One HTTP rule. Every field that is set must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HttpRule {
    /// Method (`:method`).
    pub method: Option<StrMatch>,
    /// Path with query (`:path`).
    pub path: Option<StrMatch>,
    /// Host (`:authority` / `Host`).
    pub host: Option<StrMatch>,
    /// Plain header requirements.
    pub headers: Vec<HeaderMatcher>,
    /// Header matches with actions.
    pub header_matches: Vec<HeaderMatch>,
}

impl fmt::Display for HttpRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(m) = &self.method {
            parts.push(format!("method={m}"));
        }
        if let Some(p) = &self.path {
            parts.push(format!("path={p}"));
        }
        if let Some(h) = &self.host {
            parts.push(format!("host={h}"));
        }
        for h in &self.headers {
            parts.push(match &h.kind {
                HeaderMatcherKind::Exact(v) => format!("header {}={v:?}", h.name),
                HeaderMatcherKind::Regex(v) => format!("header {}=/{v}/", h.name),
                HeaderMatcherKind::Present => format!("header {}", h.name),
                HeaderMatcherKind::Never => format!("header {} (secret unavailable: never matches)", h.name),
            });
        }
        for h in &self.header_matches {
            parts.push(format!("headerMatch {} ({:?} on mismatch)", h.name, h.mismatch_action));
        }
        if parts.is_empty() { f.write_str("{} (any request)") } else { f.write_str(&parts.join(" ")) }
    }
}

/// Compiles a full-match regex (`^(?:re)$`).
pub fn compile_full_match(re: &str) -> Result<Regex, regex::Error> {
    RegexBuilder::new(&format!("^(?:{re})$")).size_limit(REGEX_SIZE_LIMIT).build()
}

#[derive(Clone, Debug)]
enum Matcher {
    Exact(Box<[u8]>),
    Regex(Arc<Regex>),
}

impl Matcher {
    fn matches(&self, v: &[u8]) -> bool {
        match self {
            Self::Exact(e) => &**e == v,
            Self::Regex(r) => r.is_match(v),
        }
    }
}

#[derive(Clone, Debug)]
enum CompiledHeaderMatcher {
    Exact(String, Box<[u8]>),
    Regex(String, Arc<Regex>),
    Present(String),
    Never,
}

#[derive(Clone, Debug)]
struct CompiledRule {
    method: Option<Matcher>,
    host: Option<Matcher>,
    headers: Vec<CompiledHeaderMatcher>,
    header_matches: Vec<HeaderMatch>,
}

/// The compiled HTTP rules of one L7 entry.
#[derive(Debug)]
pub struct HttpRuleSet {
    specs: Vec<HttpRule>,
    rules: Vec<CompiledRule>,
    index: PathIndex,
    has_header_matches: bool,
}

/// A rule set that does not compile.
#[derive(Debug, thiserror::Error)]
#[error("HTTP rule {rule}: {source}")]
pub struct HttpCompileError {
    /// Index of the offending rule.
    pub rule: usize,
    /// The regex error.
    #[source]
    pub source: regex::Error,
}

impl HttpRuleSet {
    /// Compiles rules. An empty list allows every request.
    ///
    /// ```
    /// use policy_engine::http::{HttpRule, HttpRuleSet, StrMatch, HttpRequestInfo, SimpleHeaders, HeaderLog};
    /// let set = HttpRuleSet::compile(vec![HttpRule {
    ///     method: Some(StrMatch::Regex("POST".into())),
    ///     path: Some(StrMatch::Regex("/v1/request-landing".into())),
    ///     ..Default::default()
    /// }]).unwrap();
    /// let req = HttpRequestInfo { method: b"POST", path: b"/v1/request-landing", authority: None };
    /// assert!(set.evaluate(&req, &mut SimpleHeaders::default(), &mut HeaderLog::default()).is_some());
    /// let put = HttpRequestInfo { method: b"PUT", path: b"/v1/exhaust-port", authority: None };
    /// assert!(set.evaluate(&put, &mut SimpleHeaders::default(), &mut HeaderLog::default()).is_none());
    /// ```
    pub fn compile(specs: Vec<HttpRule>) -> Result<Self, HttpCompileError> {
        let mut cache = RegexCache::default();
        let mut rules = Vec::with_capacity(specs.len());
        let mut index = PathIndex {
            exact: FxHashMap::default(),
            regexes: PathRegexes::None,
            one_by_one: Vec::new(),
            set_rules: Vec::new(),
            any: Vec::new(),
        };
        let mut set_patterns: Vec<String> = Vec::new();
        let mut set_pos: HashMap<String, usize> = HashMap::new();
        for (i, spec) in specs.iter().enumerate() {
            let err = |source| HttpCompileError { rule: i, source };
            let id = u32::try_from(i).unwrap_or(u32::MAX);
            match &spec.path {
                None => index.any.push(id),
                Some(StrMatch::Exact(p)) => index.exact.entry(p.as_bytes().into()).or_default().push(id),
                Some(StrMatch::Regex(re)) => match literal_of(re) {
                    Some(lit) => index.exact.entry(lit.into()).or_default().push(id),
                    None => {
                        // Compiled alone first, so a bad rule is named, not the whole set.
                        let alone = cache.get(re).map_err(err)?;
                        let pos = *set_pos.entry(re.clone()).or_insert_with(|| {
                            set_patterns.push(format!("^(?:{re})$"));
                            index.one_by_one.push(alone);
                            index.set_rules.push(Vec::new());
                            set_patterns.len() - 1
                        });
                        if let Some(ids) = index.set_rules.get_mut(pos) {
                            ids.push(id);
                        }
                    }
                },
            }
            let method = spec.method.as_ref().map(|m| cache.matcher(m)).transpose().map_err(err)?;
            let host = spec.host.as_ref().map(|m| cache.matcher(m)).transpose().map_err(err)?;
            let mut headers = Vec::with_capacity(spec.headers.len());
            for h in &spec.headers {
                headers.push(match &h.kind {
                    HeaderMatcherKind::Exact(v) => CompiledHeaderMatcher::Exact(h.name.clone(), v.as_bytes().into()),
                    HeaderMatcherKind::Regex(re) => {
                        CompiledHeaderMatcher::Regex(h.name.clone(), cache.get(re).map_err(err)?)
                    }
                    HeaderMatcherKind::Present => CompiledHeaderMatcher::Present(h.name.clone()),
                    HeaderMatcherKind::Never => CompiledHeaderMatcher::Never,
                });
            }
            rules.push(CompiledRule { method, host, headers, header_matches: spec.header_matches.clone() });
        }
        if !set_patterns.is_empty() {
            index.regexes = match PathAutomaton::build(&set_patterns) {
                Some(a) => PathRegexes::Automaton(a),
                None => PathRegexes::Set(
                    RegexSetBuilder::new(&set_patterns)
                        .size_limit(REGEX_SET_SIZE_LIMIT)
                        .dfa_size_limit(REGEX_SET_SIZE_LIMIT)
                        .build()
                        .map_err(|source| HttpCompileError { rule: 0, source })?,
                ),
            };
        }
        let has_header_matches = specs.iter().any(|s| !s.header_matches.is_empty());
        Ok(Self { specs, rules, index, has_header_matches })
    }

    /// The rules as given.
    pub fn rules(&self) -> &[HttpRule] {
        &self.specs
    }

    /// True when header matches force evaluating every rule.
    pub fn has_header_matches(&self) -> bool {
        self.has_header_matches
    }

    /// Evaluates a request. Returns the index of the first rule that allows it, or `None` (deny).
    /// Header actions of every matching rule are applied to `headers` in rule order.
    pub fn evaluate(
        &self,
        req: &HttpRequestInfo<'_>,
        headers: &mut dyn HeaderMap,
        log: &mut HeaderLog,
    ) -> Option<usize> {
        if self.rules.is_empty() {
            return Some(0);
        }
        let mut allowed = None;
        for id in self.index.candidates(req.path) {
            let idx = id as usize;
            let Some(rule) = self.rules.get(idx) else { continue };
            if !rule_basic_match(rule, req, headers) {
                continue;
            }
            if !self.has_header_matches {
                return Some(idx);
            }
            let mut accepted = true;
            for hm in &rule.header_matches {
                if !apply_header_match(hm, headers, log) {
                    accepted = false;
                }
            }
            if accepted && allowed.is_none() {
                allowed = Some(idx);
            }
        }
        allowed
    }

    /// Explains, for each rule, whether it matches the request (for `porin policy trace`); header
    /// actions run on a scratch copy of the headers.
    pub fn explain(&self, req: &HttpRequestInfo<'_>, headers: &SimpleHeaders) -> Vec<(usize, bool)> {
        let mut scratch = headers.clone();
        let mut log = HeaderLog::default();
        let candidates = self.index.candidates(req.path);
        (0..self.rules.len())
            .map(|idx| {
                let matched = candidates.contains(&u32::try_from(idx).unwrap_or(u32::MAX))
                    && self.rules.get(idx).is_some_and(|rule| {
                        if !rule_basic_match(rule, req, &scratch) {
                            return false;
                        }
                        // Every header match runs (its action applies) even after one fails.
                        let mut accepted = true;
                        for hm in &rule.header_matches {
                            accepted &= apply_header_match(hm, &mut scratch, &mut log);
                        }
                        accepted
                    });
                (idx, matched)
            })
            .collect()
    }
}

fn rule_basic_match(rule: &CompiledRule, req: &HttpRequestInfo<'_>, headers: &dyn HeaderMap) -> bool {
    if let Some(m) = &rule.method
        && !m.matches(req.method)
    {
        return false;
    }
    if let Some(m) = &rule.host {
        match req.authority {
            Some(a) if m.matches(a) => {}
            _ => return false,
        }
    }
    rule.headers.iter().all(|h| match h {
        CompiledHeaderMatcher::Exact(name, v) => headers.get(name).is_some_and(|got| *got == **v),
        CompiledHeaderMatcher::Regex(name, re) => headers.get(name).is_some_and(|got| re.is_match(&got)),
        CompiledHeaderMatcher::Present(name) => headers.get(name).is_some(),
        CompiledHeaderMatcher::Never => false,
    })
}

/// What policy reads of a request besides headers.
#[derive(Clone, Copy, Debug)]
pub struct HttpRequestInfo<'a> {
    /// Method.
    pub method: &'a [u8],
    /// Request target as sent (path and query).
    pub path: &'a [u8],
    /// `:authority` or `Host`.
    pub authority: Option<&'a [u8]>,
}
