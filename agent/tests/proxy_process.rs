//! `porin proxy` as its own process: it enforces what was published, keeps the last good snapshot
//! when the publisher is gone, survives its own restart, follows new versions, and `porin observe`
//! filters its flow records. The privileged test has the real agent of a lab publish.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Dir, Lab, porin, privileged, repo};
use serde_json::Value;

/// A `porin proxy` child, killed on drop.
struct ProxyProc {
    child: Child,
    addrs: Value,
}

impl ProxyProc {
    fn start(config: &Path, ready: &Path, netns: Option<&str>) -> Self {
        let _ = std::fs::remove_file(ready);
        let mut cmd = porin();
        cmd.args(["proxy", "--config"]).arg(config).arg("--ready").arg(ready).arg("--threads").arg("1");
        if let Some(ns) = netns {
            cmd.args(["--netns", ns]);
        }
        let log = std::fs::File::create(ready.with_extension("log")).unwrap();
        let mut child = cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready.exists() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "porin proxy exited ({st}): {}",
                    std::fs::read_to_string(ready.with_extension("log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "porin proxy did not get ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        let addrs = serde_json::from_str(&std::fs::read_to_string(ready).unwrap()).unwrap();
        Self { child, addrs }
    }

    fn addr(&self, name: &str) -> String {
        self.addrs[name].as_str().unwrap().to_owned()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ProxyProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An HTTP/1.1 backend on 127.0.0.1 (hyper, on its own thread): answers `METHOD PATH`.
fn backend() -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let sock = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(sock.local_addr().unwrap()).unwrap();
            loop {
                let Ok((s, _)) = sock.accept().await else { continue };
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                        let body = format!("{} {}\n", req.method(), req.uri().path());
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(body),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
    });
    rx.recv().unwrap()
}

fn curl(args: &[&str]) -> (String, String) {
    let o = Command::new("curl").args(["-sS", "-m", "5", "-w", "\n%{http_code}"]).args(args).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", ""));
    (code.to_owned(), body.to_owned())
}

fn observe(sock: &Path, filters: &[&str]) -> Vec<Value> {
    let o = porin().args(["observe", "-o", "json", "--proxy"]).arg(sock).args(filters).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["flow"].clone())
        .collect()
}

const ENDPOINTS: &str = r#"{"endpoints": [
  {"id": 1, "name": "deathstar", "namespace": "default", "labels": {"org": "empire", "class": "deathstar"}, "ips": ["10.0.0.1"], "ifname": "none1"},
  {"id": 2, "name": "tiefighter", "namespace": "default", "labels": {"org": "empire", "class": "tiefighter"}, "ips": ["10.0.0.2"], "ifname": "none2"},
  {"id": 3, "name": "xwing", "namespace": "default", "labels": {"org": "alliance", "class": "xwing"}, "ips": ["10.0.0.3"], "ifname": "none3"}
]}"#;

#[test]
fn the_proxy_process_keeps_enforcing_and_follows_new_versions() {
    let dir = Dir::new("proc");
    let snap = dir.0.join("snapshot.json");
    let eps = dir.0.join("endpoints.json");
    std::fs::write(&eps, ENDPOINTS).unwrap();
    let l7 = repo().join("config/examples/starwars/l3-l4-l7.yaml");
    let publish = |policy: &Path| {
        let o = porin()
            .args(["policy", "publish", "--endpoints"])
            .arg(&eps)
            .arg("-o")
            .arg(&snap)
            .arg(policy)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    publish(&l7);
    let up = backend();
    let sock = dir.0.join("proxy.sock");
    let config = dir.0.join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "snapshot: {}\ncontrol_socket: {}\nlisteners:\n- {{name: tie, listen: \"127.0.0.1:0\", upstream: \"{up}\", source: {{pod: default/tiefighter}}, destination: {{pod: default/deathstar}}, port: 80}}\n- {{name: xwing, listen: \"127.0.0.1:0\", upstream: \"{up}\", source: {{pod: default/xwing}}, destination: {{pod: default/deathstar}}, port: 80}}\n",
            snap.display(),
            sock.display()
        ),
    )
    .unwrap();
    let ready = dir.0.join("ready.json");
    let mut p = ProxyProc::start(&config, &ready, None);
    let tie = p.addr("tie");
    assert_eq!(
        curl(&["-X", "POST", &format!("http://{tie}/v1/request-landing")]),
        ("200".into(), "POST /v1/request-landing\n".into())
    );
    assert_eq!(
        curl(&["-X", "PUT", &format!("http://{tie}/v1/exhaust-port")]),
        ("403".into(), "Access denied\r\n".into())
    );
    assert_eq!(curl(&["--http2-prior-knowledge", "-X", "PUT", &format!("http://{tie}/v1/exhaust-port")]).0, "403");
    assert_eq!(curl(&["-X", "POST", &format!("http://{}/v1/request-landing", p.addr("xwing"))]).0, "403");

    // porin observe: filters by verdict, pod and protocol.
    let all = observe(&sock, &[]);
    assert_eq!(all.len(), 5, "{all:#?}");
    let dropped = observe(&sock, &["--verdict", "DROPPED"]);
    assert_eq!(dropped.len(), 3);
    assert!(dropped.iter().all(|f| f["verdict"] == "DROPPED" && f["Type"] == "L7"));
    let xwing = observe(&sock, &["--pod", "default/xwing"]);
    assert_eq!(xwing.len(), 1);
    assert_eq!(xwing[0]["source"]["pod_name"], "xwing");
    let h2 = observe(&sock, &["--protocol", "http/2"]);
    assert_eq!(h2.len(), 1);
    assert_eq!(h2[0]["l7"]["http"]["method"], "PUT");
    let text = porin().args(["observe", "--proxy"]).arg(&sock).args(["--verdict", "FORWARDED"]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("http-response HTTP/1.1 200 POST"), "{text}");

    // The publisher is gone (nothing runs `policy publish` any more); the proxy is killed and
    // restarted on its own: it enforces the last published version at once.
    p.kill();
    let mut p = ProxyProc::start(&config, &ready, None);
    let tie = p.addr("tie");
    assert_eq!(curl(&["-X", "PUT", &format!("http://{tie}/v1/exhaust-port")]).0, "403");
    assert_eq!(curl(&["-X", "POST", &format!("http://{tie}/v1/request-landing")]).0, "200");

    // A new version is picked up by the running proxy within a second.
    let open = dir.0.join("open.yaml");
    std::fs::write(
        &open,
        std::fs::read_to_string(&l7).unwrap().replace("path: /v1/request-landing", "path: \"/v1/.*\""),
    )
    .unwrap();
    assert_ne!(
        std::fs::read_to_string(&open).unwrap(),
        std::fs::read_to_string(&l7).unwrap(),
        "the test edits the rule"
    );
    publish(&open);
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let r = curl(&["-X", "POST", &format!("http://{tie}/v1/anything")]);
        if r.0 == "200" {
            break;
        }
        assert!(Instant::now() < deadline, "the new version was not enforced within 1 s: {r:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // An invalid publication never replaces it.
    std::fs::write(&snap, "{\"version\": 99, \"policies\": [{\"name\": \"bad\", \"text\": \"kind: CiliumNetworkPolicy\\nspec: {nope: 1}\"}], \"environment\": {}}").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(curl(&["-X", "POST", &format!("http://{tie}/v1/anything")]).0, "200");
    let st = common::control_json(&sock, r#"{"cmd":"status"}"#);
    assert!(st["snapshot"]["last_error"].as_str().is_some_and(|e| e.contains("bad")), "{st}");
    p.kill();
}

#[test]
fn the_agent_publishes_and_the_proxy_outlives_it_privileged() {
    if !privileged() {
        return;
    }
    let text = std::fs::read_to_string(repo().join("config/labs/starwars-l3l4.yaml")).unwrap();
    let lab = Lab::up("l7pub", &text.replace("../examples/", "@REPO@/config/examples/"));
    let node = format!("porin-{}-node", lab.name);
    let labdir = PathBuf::from(format!("/run/porin/labs/{}", lab.name));
    let snap = labdir.join("snapshot.json");
    assert!(snap.exists(), "the agent publishes its policy inputs");

    // A backend and the proxy inside the lab's node namespace (a private network: fixed ports).
    let dir = Dir::new("pub");
    let spec = dir.0.join("spec.json");
    std::fs::write(&spec, r#"{"http": {"port": 18080, "routes": [{"method": "POST", "path": "/v1/request-landing", "body": "Ship landed\n"}, {"method": "PUT", "path": "/v1/exhaust-port", "body": "Panic\n"}]}}"#).unwrap();
    let server_ready = dir.0.join("server.ready");
    let mut server = porin()
        .args(["lab", "serve", "--netns", &node, "--spec"])
        .arg(&spec)
        .arg("--ready")
        .arg(&server_ready)
        .spawn()
        .unwrap();
    let config = dir.0.join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "snapshot: {}\nlisteners:\n- {{name: tie, listen: \"127.0.0.1:18081\", upstream: \"127.0.0.1:18080\", source: {{pod: default/tiefighter}}, destination: {{pod: default/deathstar}}, port: 80}}\n",
            snap.display()
        ),
    )
    .unwrap();
    let mut p = ProxyProc::start(&config, &dir.0.join("ready.json"), Some(&node));
    let curl_node = |method: &str, path: &str| {
        let o = porin()
            .args([
                "lab",
                "run-in",
                "--netns",
                &node,
                "--",
                "curl",
                "-s",
                "-m",
                "5",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                method,
            ])
            .arg(format!("http://127.0.0.1:18081{path}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server_ready.exists() {
        assert!(Instant::now() < deadline, "server not ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The L3/L4 policy has no HTTP rules: the proxy lets every tiefighter request through.
    assert_eq!(curl_node("PUT", "/v1/exhaust-port"), "200");
    // The L7 policy through the agent: the proxy follows.
    lab.apply(&[&std::fs::read_to_string(repo().join("config/examples/starwars/l3-l4-l7.yaml")).unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(2);
    while curl_node("PUT", "/v1/exhaust-port") != "403" {
        assert!(Instant::now() < deadline, "the proxy did not follow the agent's new version");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(curl_node("POST", "/v1/request-landing"), "200");
    // The agent dies: L7 enforcement goes on with the last version.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(lab.agent_pid()), nix::sys::signal::Signal::SIGKILL).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(curl_node("PUT", "/v1/exhaust-port"), "403");
    assert_eq!(curl_node("POST", "/v1/request-landing"), "200");
    // And the proxy restarts on its own while the agent is down.
    p.kill();
    let p2 = ProxyProc::start(&config, &dir.0.join("ready.json"), Some(&node));
    assert_eq!(curl_node("PUT", "/v1/exhaust-port"), "403");
    assert_eq!(curl_node("POST", "/v1/request-landing"), "200");
    drop(p2);
    let _ = server.kill();
    let _ = server.wait();
}

/// A free port on 127.0.0.1 (bound and let go: the caller binds it next).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `GET /metrics` of the proxy.
fn scrape(addr: &str) -> String {
    let o = Command::new("curl").args(["-sS", "-m", "5", &format!("http://{addr}/metrics")]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A Prometheus server (the real one), scraping `target` every second, killed on drop.
struct Prometheus {
    child: Child,
    url: String,
    _dir: Dir,
}

impl Prometheus {
    fn start(target: &str) -> Self {
        let dir = Dir::new("prom");
        let config = dir.0.join("prometheus.yml");
        std::fs::write(
            &config,
            format!("global: {{scrape_interval: 1s}}\nscrape_configs:\n- job_name: porin-proxy\n  static_configs: [{{targets: ['{target}']}}]\n"),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.0.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus (apt prometheus; scripts/setup.sh installs it)");
        Self { child, url: format!("http://127.0.0.1:{port}"), _dir: dir }
    }

    /// The value of an instant query's first sample, once Prometheus has one.
    fn query(&self, q: &str) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let o = Command::new("curl")
                .args([
                    "-sS",
                    "-m",
                    "5",
                    "-G",
                    &format!("{}/api/v1/query", self.url),
                    "--data-urlencode",
                    &format!("query={q}"),
                ])
                .output()
                .unwrap();
            if let Ok(v) = serde_json::from_slice::<Value>(&o.stdout)
                && let Some(s) = v["data"]["result"][0]["value"][1].as_str()
            {
                return s.parse().unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus has no sample for {q}: {}",
                String::from_utf8_lossy(&o.stdout)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_proxy_serves_hubble_metrics_that_promtool_and_prometheus_read() {
    let dir = Dir::new("metrics");
    let snap = dir.0.join("snapshot.json");
    let eps = dir.0.join("endpoints.json");
    std::fs::write(&eps, ENDPOINTS).unwrap();
    let o = porin()
        .args(["policy", "publish", "--endpoints"])
        .arg(&eps)
        .arg("-o")
        .arg(&snap)
        .arg(repo().join("config/examples/starwars/l3-l4-l7.yaml"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let up = backend();
    let config = dir.0.join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "snapshot: {}\nmetrics: \"127.0.0.1:{}\"\nlisteners:\n- {{name: tie, listen: \"127.0.0.1:0\", upstream: \"{up}\", source: {{pod: default/tiefighter}}, destination: {{pod: default/deathstar}}, port: 80}}\n",
            snap.display(),
            free_port()
        ),
    )
    .unwrap();
    let p = ProxyProc::start(&config, &dir.0.join("ready.json"), None);
    let (tie, metrics) = (p.addr("tie"), p.addr("metrics"));
    for _ in 0..3 {
        assert_eq!(curl(&["-X", "POST", &format!("http://{tie}/v1/request-landing")]).0, "200");
    }
    for _ in 0..2 {
        assert_eq!(curl(&["-X", "PUT", &format!("http://{tie}/v1/exhaust-port")]).0, "403");
    }

    // Hubble's names and labels; requests counted when seen (denied ones too), responses apart.
    let text = scrape(&metrics);
    for line in [
        r#"hubble_http_requests_total{method="POST",protocol="HTTP/1.1",reporter="server"} 3"#,
        r#"hubble_http_requests_total{method="PUT",protocol="HTTP/1.1",reporter="server"} 2"#,
        r#"hubble_http_responses_total{status="200",method="POST",reporter="server"} 3"#,
        r#"hubble_flows_processed_total{protocol="http",type="L7",subtype="HTTP",verdict="DROPPED"} 2"#,
        r#"hubble_drop_total{reason="POLICY_DENIED",protocol="TCP"} 2"#,
        r#"hubble_http_request_duration_seconds_count{method="POST",reporter="server"} 3"#,
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
    }
    let version = text.lines().find_map(|l| l.strip_prefix("porin_policy_version ")).unwrap_or("0");
    assert!(version.parse::<f64>().unwrap() >= 1.0, "the policy version in force: {text}");
    // promtool (Prometheus' own linter) accepts the exposition.
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (apt prometheus)");
    std::io::Write::write_all(check.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The real Prometheus scrapes it and answers a query over its HTTP API.
    let prom = Prometheus::start(&metrics);
    assert_eq!(prom.query(r#"sum(hubble_http_requests_total{method="PUT"})"#), 2.0);
    assert_eq!(prom.query(r#"sum(hubble_drop_total{reason="POLICY_DENIED"})"#), 2.0);
}
