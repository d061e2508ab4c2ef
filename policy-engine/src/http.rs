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
//! A rule set compiles its paths into one index: literal paths in a hash map, regex paths in one
//! `RegexSet`, so a request costs one hash lookup plus one automaton pass however many rules there are.
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

/// If a regex can only ever match one exact string (`/v1/x`, `^/v1/x$`), returns it.
fn literal_of(re: &str) -> Option<Vec<u8>> {
    let hir = regex_syntax::Parser::new().parse(re).ok()?;
    let items: Vec<&regex_syntax::hir::Hir> = match hir.kind() {
        HirKind::Concat(items) => items.iter().collect(),
        HirKind::Empty => return Some(Vec::new()),
        _ => vec![&hir],
    };
    let mut out = Vec::new();
    let last = items.len().saturating_sub(1);
    for (i, item) in items.iter().enumerate() {
        match item.kind() {
            HirKind::Literal(lit) => out.extend_from_slice(&lit.0),
            HirKind::Look(Look::Start) if i == 0 => {}
            HirKind::Look(Look::End) if i == last => {}
            _ => return None,
        }
    }
    Some(out)
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

/// Shares compiled regexes between rules (10,000 rules with `method: GET` compile `GET` once).
#[derive(Default)]
struct RegexCache(HashMap<String, Arc<Regex>>);

impl RegexCache {
    fn get(&mut self, re: &str) -> Result<Arc<Regex>, regex::Error> {
        if let Some(r) = self.0.get(re) {
            return Ok(r.clone());
        }
        let r = Arc::new(compile_full_match(re)?);
        self.0.insert(re.to_owned(), r.clone());
        Ok(r)
    }

    fn matcher(&mut self, m: &StrMatch) -> Result<Matcher, regex::Error> {
        Ok(match m {
            StrMatch::Exact(s) => Matcher::Exact(s.as_bytes().into()),
            StrMatch::Regex(re) => match literal_of(re) {
                Some(lit) => Matcher::Exact(lit.into()),
                None => Matcher::Regex(self.get(re)?),
            },
        })
    }
}

type CacheFn = Box<dyn Fn() -> Cache + Send + Sync + UnwindSafe + RefUnwindSafe>;

/// All regex paths of a rule set as one lazy DFA, searched in overlapping mode: a search costs one pass
/// over the path plus one step per *matching* pattern, however many patterns there are.
struct PathAutomaton {
    dfa: Arc<DFA>,
    caches: Pool<Cache, CacheFn>,
}

impl fmt::Debug for PathAutomaton {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PathAutomaton").field("patterns", &self.dfa.pattern_len()).finish()
    }
}

impl PathAutomaton {
    fn build(patterns: &[String]) -> Option<Self> {
        let dfa = DFA::builder()
            .configure(
                DFA::config().match_kind(MatchKind::All).cache_capacity(PATH_DFA_CACHE).skip_cache_capacity_check(true),
            )
            .syntax(syntax::Config::new().utf8(false))
            .thompson(thompson::Config::new().utf8(false).nfa_size_limit(Some(REGEX_SET_SIZE_LIMIT)))
            .build_many(patterns)
            .ok()?;
        let dfa = Arc::new(dfa);
        let for_caches = dfa.clone();
        let create: CacheFn = Box::new(move || for_caches.create_cache());
        Some(Self { dfa, caches: Pool::new(create) })
    }

    /// Calls `hit` with the index of every pattern matching all of `path`; `false` if the search gave up.
    fn matches(&self, path: &[u8], mut hit: impl FnMut(usize)) -> bool {
        let mut cache = self.caches.get();
        let input = Input::new(path).anchored(Anchored::Yes);
        let mut state = OverlappingState::start();
        loop {
            if self.dfa.try_search_overlapping_fwd(&mut cache, &input, &mut state).is_err() {
                return false;
            }
            match state.get_match() {
                Some(m) => hit(m.pattern().as_usize()),
                None => return true,
            }
        }
    }
}

/// How the regex paths of a rule set are searched.
#[derive(Debug)]
enum PathRegexes {
    None,
    /// The normal case.
    Automaton(PathAutomaton),
    /// When the lazy DFA cannot be built (e.g. Unicode word boundaries): the regex crate's set.
    Set(RegexSet),
}

/// Path index: which rules can match a given path.
#[derive(Debug)]
struct PathIndex {
    /// Policy-controlled keys: a fast, non-keyed hash is safe here.
    exact: FxHashMap<Box<[u8]>, Vec<u32>>,
    regexes: PathRegexes,
    /// Each regex pattern alone, for a search the automaton gives up on.
    one_by_one: Vec<Arc<Regex>>,
    set_rules: Vec<Vec<u32>>,
    any: Vec<u32>,
}

/// Candidate rules of one request (rarely more than a handful: kept inline).
type Candidates = SmallVec<[u32; 8]>;

impl PathIndex {
    fn candidates(&self, path: &[u8]) -> Candidates {
        let mut out: Candidates = SmallVec::from_slice(&self.any);
        if let Some(ids) = self.exact.get(path) {
            out.extend_from_slice(ids);
        }
        let mut add = |pattern: usize| {
            if let Some(ids) = self.set_rules.get(pattern) {
                out.extend_from_slice(ids);
            }
        };
        match &self.regexes {
            PathRegexes::None => {}
            PathRegexes::Automaton(a) => {
                let mut hits: SmallVec<[usize; 8]> = SmallVec::new();
                if a.matches(path, |p| hits.push(p)) {
                    hits.into_iter().for_each(&mut add);
                } else {
                    // The lazy DFA gave up: check each pattern on its own (slow, but correct).
                    self.one_by_one.iter().enumerate().filter(|(_, re)| re.is_match(path)).for_each(|(i, _)| add(i));
                }
            }
            PathRegexes::Set(set) => set.matches(path).iter().for_each(&mut add),
        }
        if out.len() > 1 {
            out.sort_unstable();
        }
        out
    }
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

/// Equality without an early exit on the first differing byte (secret values).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Cilium's `HeaderMatch::allowed`: returns whether matching can continue, applying the action.
fn apply_header_match(hm: &HeaderMatch, headers: &mut dyn HeaderMap, log: &mut HeaderLog) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(method: &'a str, path: &'a str) -> HttpRequestInfo<'a> {
        HttpRequestInfo { method: method.as_bytes(), path: path.as_bytes(), authority: None }
    }

    fn rule(method: &str, path: &str) -> HttpRule {
        HttpRule {
            method: (!method.is_empty()).then(|| StrMatch::Regex(method.into())),
            path: (!path.is_empty()).then(|| StrMatch::Regex(path.into())),
            ..Default::default()
        }
    }

    fn allows(set: &HttpRuleSet, r: &HttpRequestInfo<'_>) -> bool {
        set.evaluate(r, &mut SimpleHeaders::default(), &mut HeaderLog::default()).is_some()
    }

    #[test]
    fn full_match_regexes() {
        let set =
            HttpRuleSet::compile(vec![rule("GET", "/v1/"), rule("POST", "/v1/request-landing$"), rule("", "/api/.*")])
                .unwrap();
        assert!(allows(&set, &req("GET", "/v1/")));
        assert!(!allows(&set, &req("GET", "/v1/x")), "path is a full match");
        assert!(allows(&set, &req("POST", "/v1/request-landing")));
        assert!(!allows(&set, &req("POST", "/v1/request-landing/extra")));
        assert!(allows(&set, &req("DELETE", "/api/anything?q=1")));
        assert!(!allows(&set, &req("GETX", "/v1/")), "method is a full match");
    }

    #[test]
    fn literal_detection() {
        assert_eq!(literal_of("/v1/request-landing"), Some(b"/v1/request-landing".to_vec()));
        assert_eq!(literal_of("^/v1/x$"), Some(b"/v1/x".to_vec()));
        assert_eq!(literal_of("/v1/.*"), None);
        assert_eq!(literal_of("/a|/b"), None);
        assert_eq!(literal_of("/a\\.b"), Some(b"/a.b".to_vec()));
    }

    #[test]
    fn empty_set_allows_everything() {
        let set = HttpRuleSet::compile(vec![]).unwrap();
        assert!(allows(&set, &req("PUT", "/anything")));
        let any = HttpRuleSet::compile(vec![HttpRule::default()]).unwrap();
        assert!(allows(&any, &req("PUT", "/anything")));
    }

    #[test]
    fn header_exact_and_presence() {
        let set = HttpRuleSet::compile(vec![HttpRule {
            headers: vec![
                HeaderMatcher { name: "x-has-force".into(), kind: HeaderMatcherKind::Exact("True".into()) },
                HeaderMatcher { name: "x-trace".into(), kind: HeaderMatcherKind::Present },
            ],
            ..Default::default()
        }])
        .unwrap();
        let r = req("PUT", "/");
        let mut ok = SimpleHeaders::from_pairs([("X-Has-Force", "True"), ("x-trace", "")]);
        assert!(set.evaluate(&r, &mut ok, &mut HeaderLog::default()).is_some());
        let mut wrong = SimpleHeaders::from_pairs([("X-Has-Force", "true"), ("x-trace", "1")]);
        assert!(set.evaluate(&r, &mut wrong, &mut HeaderLog::default()).is_none());
    }

    #[test]
    fn replace_on_mismatch_sets_the_header() {
        let set = HttpRuleSet::compile(vec![HttpRule {
            header_matches: vec![HeaderMatch {
                name: "authorization".into(),
                value: "Bearer 123456".into(),
                secret: true,
                match_action: MatchAction::Continue,
                mismatch_action: MismatchAction::Replace,
            }],
            ..Default::default()
        }])
        .unwrap();
        let mut h = SimpleHeaders::from_pairs([("Authorization", "Bearer wrong")]);
        let mut log = HeaderLog::default();
        assert!(set.evaluate(&req("POST", "/"), &mut h, &mut log).is_some());
        assert_eq!(h.get("authorization").as_deref(), Some(&b"Bearer 123456"[..]));
        assert_eq!(log.missing, vec![("authorization".to_owned(), "[redacted]".to_owned())]);
    }

    #[test]
    fn many_rules_are_indexed() {
        let mut rules = Vec::new();
        for i in 0..2000 {
            rules.push(rule("GET", &format!("/svc{i}/items/[0-9]+")));
            rules.push(rule("POST", &format!("/svc{i}/create")));
        }
        let set = HttpRuleSet::compile(rules).unwrap();
        assert!(allows(&set, &req("GET", "/svc1999/items/42")));
        assert!(allows(&set, &req("POST", "/svc7/create")));
        assert!(!allows(&set, &req("GET", "/svc7/create")));
        assert!(!allows(&set, &req("GET", "/svc2000/items/1")));
    }
}
