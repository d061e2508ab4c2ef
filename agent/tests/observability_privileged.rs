//! Observability beyond the API, on real labs with real traffic: policy audit mode (the kernel's
//! and the proxy's drops recorded AUDIT and let through), L7 visibility without enforcement (the
//! proxy-visibility annotation), and the service map loaded by headless Chromium (nodes and edges
//! read from its DOM, a screenshot kept under `target/artifacts/`), and the kernel's lost events
//! told to a Hubble follower. Root only; in CI (`CI=true`) always, and a missing Chromium fails.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Lab, porin, privileged, repo};
use serde_json::Value;

fn lab(file: &str, tag: &str) -> Lab {
    let text = std::fs::read_to_string(repo().join("config/labs").join(file)).unwrap();
    Lab::up(tag, &text.replace("../examples/", "@REPO@/config/examples/"))
}

/// The node's flows through `porin observe` (the Hubble API's client), as Hubble JSON.
fn observe(lab: &Lab, args: &[&str]) -> Vec<Value> {
    let o = porin().args(["observe", "--lab", &lab.name, "-o", "json", "--last", "200"]).args(args).output().unwrap();
    assert!(o.status.success(), "observe {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok()?.get("flow").cloned())
        .collect()
}

/// Polls `observe` until `pred` holds for some flow (records reach the ring within ~100 ms).
fn wait_flow(lab: &Lab, args: &[&str], pred: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let flows = observe(lab, args);
        if let Some(f) = flows.iter().find(|f| pred(f)) {
            return f.clone();
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no such flow in {args:?}: {flows:#?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn audit_mode_records_what_policy_would_drop_and_lets_it_through_privileged() {
    if !privileged() {
        return;
    }
    let lab = lab("audit.yaml", "audit");
    let st = lab.status();
    assert_eq!(st["agent"]["policy_audit_mode"], true, "{st:#}");
    assert!(st["pods"].as_array().unwrap().iter().all(|p| p["policy_audit_mode"] == true), "{st:#}");

    // The kernel would drop the xwing (deathstar's ingress allows the empire only): it lands.
    assert_eq!(lab.curl("xwing", "POST", "http://deathstar/v1/request-landing", 5).1, "Ship landed\n");
    // The proxy would deny the tiefighter's PUT (no HTTP rule allows it): it goes through.
    assert_eq!(lab.curl("tiefighter", "PUT", "http://deathstar/v1/exhaust-port", 5).1, "Panic: deathstar exploded\n");
    // What policy allows is still plain FORWARDED.
    assert_eq!(lab.curl("tiefighter", "POST", "http://deathstar/v1/request-landing", 5).1, "Ship landed\n");

    let xwing = wait_flow(&lab, &["--verdict", "AUDIT", "--from-pod", "default/xwing"], |f| f["Type"] == "L3_L4");
    assert_eq!(xwing["drop_reason_desc"], "POLICY_DENIED", "{xwing:#}");
    assert_eq!(xwing["destination"]["pod_name"], "deathstar");
    let put = wait_flow(&lab, &["--verdict", "AUDIT", "--http-method", "PUT"], |f| f["l7"]["type"] == "REQUEST");
    assert_eq!(put["source"]["pod_name"], "tiefighter", "{put:#}");
    assert_eq!(put["drop_reason_desc"], "POLICY_DENIED");
    let landing = wait_flow(&lab, &["--http-method", "POST", "--from-pod", "default/tiefighter"], |f| {
        f["l7"]["type"] == "REQUEST"
    });
    assert_eq!(landing["verdict"], "FORWARDED", "{landing:#}");
    // Nothing was dropped, and the kernel counted what it audited.
    assert!(observe(&lab, &["--verdict", "DROPPED"]).is_empty());
    assert!(lab.counters()["audited"].as_u64().unwrap_or(0) >= 1, "{:#}", lab.counters());
}

#[test]
fn visibility_records_l7_without_enforcing_it_privileged() {
    if !privileged() {
        return;
    }
    let lab = lab("visibility.yaml", "vis");
    let st = lab.status();
    let deathstar = st["pods"].as_array().unwrap().iter().find(|p| p["name"] == "deathstar").unwrap().clone();
    assert_eq!(deathstar["visibility"], serde_json::json!(["<Ingress/80/TCP/HTTP>"]), "{st:#}");

    // L3/L4 policy only: every empire request goes through, and each is seen at L7.
    assert_eq!(lab.curl("tiefighter", "PUT", "http://deathstar/v1/exhaust-port", 5).1, "Panic: deathstar exploded\n");
    let put = wait_flow(&lab, &["--protocol", "http", "--http-method", "PUT"], |f| f["l7"]["type"] == "REQUEST");
    assert_eq!(put["verdict"], "FORWARDED", "{put:#}");
    assert_eq!(put["l7"]["http"]["url"], "http://deathstar/v1/exhaust-port");
    let answer =
        wait_flow(&lab, &["--protocol", "http", "--to-pod", "default/tiefighter"], |f| f["l7"]["type"] == "RESPONSE");
    assert_eq!(answer["l7"]["http"]["code"], 200, "{answer:#}");
    // Visibility never allows what L3/L4 drops: the xwing is dropped in the kernel, not proxied.
    assert_eq!(lab.curl("xwing", "GET", "http://deathstar/v1", 2).0, 28);
    let drop = wait_flow(&lab, &["--verdict", "DROPPED", "--from-pod", "default/xwing"], |_| true);
    assert_eq!(drop["Type"], "L3_L4", "{drop:#}");
    // Pods without the annotation are not proxied: the tiefighter's own port has no L7 records.
    assert!(
        observe(&lab, &["--protocol", "http", "--to-pod", "default/tiefighter", "--type", "l7"])
            .iter()
            .all(|f| f["is_reply"] == true)
    );
}

#[test]
fn a_bad_visibility_annotation_is_an_error_naming_the_pod_privileged() {
    if !privileged() {
        return;
    }
    let text = std::fs::read_to_string(repo().join("config/labs/visibility.yaml")).unwrap();
    let lab = Lab::up(
        "visbad",
        &text
            .replace("<Ingress/80/TCP/HTTP>", "<Ingress/80/UDP/HTTP>")
            .replace("../examples/", "@REPO@/config/examples/"),
    );
    let st = lab.status();
    let errors = st["agent"]["status"]["errors"].to_string();
    assert!(errors.contains("default/deathstar") && errors.contains("proxy-visibility"), "{errors}");
    // The pod keeps its policy as written (L3/L4, no proxy): traffic still flows.
    assert_eq!(lab.curl("tiefighter", "GET", "http://deathstar/v1", 5).0, 0);
}

/// A browser profile directory of its own, removed on drop (also on panic).
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("porin-chromium-{tag}"));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("could not remove {}: {e}", self.0.display());
        }
    }
}

/// The attributes of each `<g class="KIND" ...>` element of a DOM dump.
fn elements(dom: &str, kind: &str) -> Vec<std::collections::BTreeMap<String, String>> {
    let open = regex::Regex::new(&format!(r#"<g class="{kind}"([^>]*)>"#)).unwrap();
    let attr = regex::Regex::new(r#"([a-z-]+)="([^"]*)""#).unwrap();
    open.captures_iter(dom)
        .map(|c| attr.captures_iter(&c[1]).map(|a| (a[1].to_owned(), a[2].replace("&amp;", "&"))).collect())
        .collect()
}

#[test]
fn the_service_map_shows_the_star_wars_graph_in_chromium_privileged() {
    if !privileged() {
        return;
    }
    let chromium = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()));
    let Some(chromium) = chromium else {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "CI=true and no chromium (scripts/setup.sh installs it)"
        );
        eprintln!("SKIPPED: no chromium");
        return;
    };
    let lab = lab("observability.yaml", "ui");
    let url = lab.status()["agent"]["ui"].as_str().expect("the lab reports the service map's URL").to_owned();
    assert_eq!(lab.curl("tiefighter", "POST", "http://deathstar/v1/request-landing", 5).1, "Ship landed\n");
    assert_eq!(lab.curl("xwing", "POST", "http://deathstar/v1/request-landing", 2).0, 28);
    wait_flow(&lab, &["--from-pod", "default/tiefighter", "--protocol", "http"], |_| true);

    let profile = Scratch::new(&lab.name);
    let artifacts = repo().join("target/artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("service-map.png");
    let browse = |extra: &[&str]| {
        let o = Command::new(chromium)
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--window-size=1280,800"])
            .arg(format!("--user-data-dir={}", profile.0.display()))
            .arg("--virtual-time-budget=5000")
            .args(extra)
            .arg(&url)
            .output()
            .unwrap();
        assert!(o.status.success(), "chromium: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let dom = browse(&["--dump-dom"]);
    assert!(dom.contains(r#"data-ready="1""#), "the page never rendered its first poll:\n{dom}");
    let nodes: Vec<String> = elements(&dom, "node").into_iter().filter_map(|n| n.get("data-id").cloned()).collect();
    for pod in ["default/tiefighter", "default/deathstar", "default/xwing"] {
        assert!(nodes.iter().any(|n| n == pod), "node {pod} missing: {nodes:?}");
    }
    let edges = elements(&dom, "edge");
    let edge = |from: &str| {
        edges
            .iter()
            .find(|e| e["data-source"] == from && e["data-destination"] == "default/deathstar")
            .unwrap_or_else(|| panic!("no edge {from} -> deathstar: {edges:#?}"))
            .clone()
    };
    let tie = edge("default/tiefighter");
    assert_eq!(tie["data-verdict"], "forwarded", "{tie:?}");
    assert!(tie["data-protocols"].split(',').any(|p| p == "HTTP"), "{tie:?}");
    assert!(tie["data-requests"].parse::<u32>().unwrap() >= 1, "{tie:?}");
    let xwing = edge("default/xwing");
    assert_eq!(xwing["data-verdict"], "dropped", "{xwing:?}");
    assert_eq!(xwing["data-forwarded"], "0");

    browse(&[&format!("--screenshot={}", shot.display())]);
    assert!(std::fs::metadata(&shot).is_ok_and(|m| m.len() > 10_000), "screenshot {}", shot.display());
}

/// Kills a child process when dropped (also on panic).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The kernel's ring buffer overflows while the agent is stopped: a Hubble follower is told, as a
/// `LostEvent` from `PERF_EVENT_RING_BUFFER`, and the metric counts the same.
#[test]
fn kernel_losses_reach_hubble_followers_as_lost_events_privileged() {
    use std::io::BufRead as _;
    if !privileged() {
        return;
    }
    let lab = lab("observability.yaml", "lost");
    let st = lab.status();
    let agent = st["agent"]["pid"].as_u64().unwrap().to_string();
    let mut follower = Child(
        porin()
            .args(["observe", "--lab", &lab.name, "-f", "-o", "json"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let out = follower.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // The follower is connected once the xwing's first drop reaches it.
    let deathstar = lab.addr("deathstar", false);
    let wait_for = |what: &str, pred: &dyn Fn(&Value) -> bool| {
        let start = Instant::now();
        loop {
            let line =
                rx.recv_timeout(Duration::from_secs(10)).unwrap_or_else(|_| panic!("no {what} reached the follower"));
            let v: Value = serde_json::from_str(&line).unwrap();
            if pred(&v) {
                return v;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "no {what} reached the follower");
        }
    };
    assert_eq!(lab.curl("xwing", "POST", "http://deathstar/v1/request-landing", 1).0, 28);
    wait_for("xwing drop", &|v| v["flow"]["verdict"] == "DROPPED");
    // Stopped, the agent drains nothing: 60,000 dropped datagrams (each reported) overflow the
    // kernel's 1 MiB ring buffer.
    let signal = |sig: &str| assert!(Command::new("kill").args([sig, &agent]).status().unwrap().success());
    signal("-STOP");
    let flood = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nfor i in range(60000):\n    s.sendto(b'x', ('{deathstar}', 1024 + i % 30000))\n"
    );
    let sent = lab.exec("xwing", &["python3", "-c", &flood]);
    signal("-CONT");
    assert!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));
    let lost = wait_for("lost event", &|v| v["lost_events"]["source"] == "PERF_EVENT_RING_BUFFER");
    let n = lost["lost_events"]["num_events_lost"]
        .as_str()
        .map_or_else(|| lost["lost_events"]["num_events_lost"].as_u64().unwrap(), |s| s.parse().unwrap());
    assert!(n > 1000, "{lost}");
    assert!(lab.counters()["events_lost"].as_u64().unwrap() >= n, "{:#}", lab.counters());
}
