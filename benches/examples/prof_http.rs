//! Profiling driver: evaluates requests over 4,096 distinct paths against N rules in a loop, for
//! `perf record ./target/release/examples/prof_http 10000`.

use policy_engine::http::{HeaderLog, HttpRequestInfo, HttpRuleSet, SimpleHeaders};
use std::hint::black_box;
fn main() {
    // Rule count from the command line (default 10,000).
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let set = HttpRuleSet::compile(porin_benches::http_rules(n)).unwrap();
    let paths: Vec<String> = (0..4096)
        .map(|i| match i % 3 {
            0 => format!("/api/v1/service{}/items", (i * 7919) % 10_000),
            1 => format!("/api/v1/service{}/items/{}?q={i}", (i * 104_729) % 10_000, i * 31),
            _ => format!("/static/{i}/app.js"),
        })
        .collect();
    for k in 0..30_000_000usize {
        let p = &paths[k % paths.len()];
        let req = HttpRequestInfo { method: b"GET", path: p.as_bytes(), authority: None };
        black_box(set.evaluate(&req, &mut SimpleHeaders::default(), &mut HeaderLog::default()));
    }
}
