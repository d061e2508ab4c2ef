//! The path index of a rule set: literal paths in a hash map, regex paths in one overlapping lazy
//! DFA (a `RegexSet` when the DFA cannot be built), and the cache that shares compiled regexes.

use super::*;

/// If a regex can only ever match one exact string (`/v1/x`, `^/v1/x$`), returns it.
pub(super) fn literal_of(re: &str) -> Option<Vec<u8>> {
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

/// Shares compiled regexes between rules (10,000 rules with `method: GET` compile `GET` once).
#[derive(Default)]
pub(super) struct RegexCache(HashMap<String, Arc<Regex>>);

impl RegexCache {
    pub(super) fn get(&mut self, re: &str) -> Result<Arc<Regex>, regex::Error> {
        if let Some(r) = self.0.get(re) {
            return Ok(r.clone());
        }
        let r = Arc::new(compile_full_match(re)?);
        self.0.insert(re.to_owned(), r.clone());
        Ok(r)
    }

    pub(super) fn matcher(&mut self, m: &StrMatch) -> Result<Matcher, regex::Error> {
        Ok(match m {
            StrMatch::Exact(s) => Matcher::Exact(s.as_bytes().into()),
            StrMatch::Regex(re) => match literal_of(re) {
                Some(lit) => Matcher::Exact(lit.into()),
                None => Matcher::Regex(self.get(re)?),
            },
        })
    }
}

pub(super) type CacheFn = Box<dyn Fn() -> Cache + Send + Sync + UnwindSafe + RefUnwindSafe>;

/// All regex paths of a rule set as one lazy DFA, searched in overlapping mode: a search costs one pass
/// over the path plus one step per *matching* pattern, however many patterns there are.
pub(super) struct PathAutomaton {
    pub(super) dfa: Arc<DFA>,
    pub(super) caches: Pool<Cache, CacheFn>,
}

impl fmt::Debug for PathAutomaton {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PathAutomaton").field("patterns", &self.dfa.pattern_len()).finish()
    }
}

impl PathAutomaton {
    pub(super) fn build(patterns: &[String]) -> Option<Self> {
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
    pub(super) fn matches(&self, path: &[u8], mut hit: impl FnMut(usize)) -> bool {
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
pub(super) enum PathRegexes {
    None,
    /// The normal case.
    Automaton(PathAutomaton),
    /// When the lazy DFA cannot be built (e.g. Unicode word boundaries): the regex crate's set.
    Set(RegexSet),
}

/// Path index: which rules can match a given path.
#[derive(Debug)]
pub(super) struct PathIndex {
    /// Policy-controlled keys: a fast, non-keyed hash is safe here.
    pub(super) exact: FxHashMap<Box<[u8]>, Vec<u32>>,
    pub(super) regexes: PathRegexes,
    /// Each regex pattern alone, for a search the automaton gives up on.
    pub(super) one_by_one: Vec<Arc<Regex>>,
    pub(super) set_rules: Vec<Vec<u32>>,
    pub(super) any: Vec<u32>,
}

/// Candidate rules of one request (rarely more than a handful: kept inline).
pub(super) type Candidates = SmallVec<[u32; 8]>;

impl PathIndex {
    pub(super) fn candidates(&self, path: &[u8]) -> Candidates {
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
