//! Policy-engine benchmarks.
//!
//! * `http_eval/{10,1000,10000}`: one request against a compiled allow-list of N method/path rules
//!   (half literal paths, half regexes). Target: 10,000 rules cost at most 1.5x what 10 rules cost.
//! * `resolve/1000x100`: resolve and compile 1,000 policies over 100 endpoints. Target: under 1 s.
//!
//! After criterion's report the bench prints the ratios the targets are about.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use policy_engine::api::{LoadOptions, load_str};
use policy_engine::http::{HeaderLog, HttpRequestInfo, HttpRuleSet, SimpleHeaders};
use policy_engine::identity::IdentityAllocator;
use policy_engine::resolve::resolve;
use porin_benches::{environment, http_rules, policies_yaml};

const SIZES: [usize; 3] = [10, 1_000, 10_000];

/// Requests: a literal-path hit, a regex-path hit, and a miss (the common case for a deny).
fn requests() -> [HttpRequestInfo<'static>; 3] {
    [
        HttpRequestInfo { method: b"GET", path: b"/api/v1/service4/items", authority: None },
        HttpRequestInfo { method: b"GET", path: b"/api/v1/service7/items/123456?page=2", authority: None },
        HttpRequestInfo { method: b"DELETE", path: b"/api/v1/service9999999/admin", authority: None },
    ]
}

fn eval_all(set: &HttpRuleSet) -> usize {
    let mut n = 0;
    for r in requests() {
        if set.evaluate(&r, &mut SimpleHeaders::default(), &mut HeaderLog::default()).is_some() {
            n += 1;
        }
    }
    n
}

fn bench_http(c: &mut Criterion) {
    let mut g = c.benchmark_group("http_eval");
    for n in SIZES {
        let set = HttpRuleSet::compile(http_rules(n)).expect("rules compile");
        assert_eq!(eval_all(&set), 2, "two requests allowed, one denied");
        g.bench_with_input(BenchmarkId::from_parameter(n), &set, |b, set| b.iter(|| eval_all(black_box(set))));
    }
    g.finish();
}

fn bench_resolve(c: &mut Criterion) {
    let text = policies_yaml(1_000);
    let loaded = load_str("bench.yaml", &text, &LoadOptions::default());
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors.first());
    let env = environment(100);
    let mut g = c.benchmark_group("resolve");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.bench_function("1000x100", |b| {
        b.iter(|| resolve(black_box(&loaded.policies), &[], &env, &mut IdentityAllocator::new(), 1))
    });
    g.bench_function("load_1000", |b| b.iter(|| load_str("bench.yaml", black_box(&text), &LoadOptions::default())));
    g.finish();
}

/// Median of `rounds` timings of `iters` calls, per call.
fn per_call(rounds: usize, iters: u32, mut f: impl FnMut()) -> Duration {
    let mut v: Vec<Duration> = (0..rounds)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed() / iters
        })
        .collect();
    v.sort();
    v[v.len() / 2]
}

fn summary() {
    println!("\n== summary (median of 15 rounds) ==");
    let mut base = None;
    for n in SIZES {
        let set = HttpRuleSet::compile(http_rules(n)).expect("rules compile");
        let t = per_call(15, 20_000, || {
            black_box(eval_all(black_box(&set)));
        }) / 3;
        let b = *base.get_or_insert(t);
        println!(
            "http_eval {n:>6} rules: {:>8.1} ns/request  ratio to 10 rules: {:.2}x",
            t.as_nanos() as f64,
            t.as_secs_f64() / b.as_secs_f64()
        );
    }
    // Many distinct paths (the lazy DFA builds states per path shape): 4096 paths, cycled.
    let paths: Vec<String> = (0..4096)
        .map(|i| match i % 3 {
            0 => format!("/api/v1/service{}/items", (i * 7919) % 10_000),
            1 => format!("/api/v1/service{}/items/{}?q={i}", (i * 104_729) % 10_000, i * 31),
            _ => format!("/static/{i}/app.js"),
        })
        .collect();
    let mut base = None;
    for n in SIZES {
        let set = HttpRuleSet::compile(http_rules(n)).expect("rules compile");
        let mut k = 0usize;
        let t = per_call(15, 20_000, || {
            k = (k + 1) % paths.len();
            let req = HttpRequestInfo { method: b"GET", path: paths[k].as_bytes(), authority: None };
            black_box(set.evaluate(&req, &mut SimpleHeaders::default(), &mut HeaderLog::default()));
        });
        let b = *base.get_or_insert(t);
        println!(
            "http_eval {n:>6} rules, 4096 distinct paths: {:>8.1} ns/request  ratio to 10 rules: {:.2}x",
            t.as_nanos() as f64,
            t.as_secs_f64() / b.as_secs_f64()
        );
    }
    let text = policies_yaml(1_000);
    let loaded = load_str("bench.yaml", &text, &LoadOptions::default());
    let env = environment(100);
    let t = per_call(5, 1, || {
        black_box(resolve(&loaded.policies, &[], &env, &mut IdentityAllocator::new(), 1));
    });
    println!("resolve+compile 1000 policies x 100 endpoints: {:.1} ms (target < 1000 ms)", t.as_secs_f64() * 1e3);
    let t = per_call(5, 1, || {
        black_box(HttpRuleSet::compile(http_rules(10_000)).expect("compile"));
    });
    println!("compile 10000 HTTP rules: {:.1} ms", t.as_secs_f64() * 1e3);
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_http(&mut c);
    bench_resolve(&mut c);
    c.final_summary();
    // `cargo test --benches` runs the bench binary in test mode: skip the timed summary there.
    if !std::env::args().any(|a| a == "--test") {
        summary();
    }
}
