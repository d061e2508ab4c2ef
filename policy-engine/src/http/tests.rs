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
