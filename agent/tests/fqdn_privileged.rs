//! DNS-based egress end to end: unmodified pods resolve names with their ordinary resolver (dig,
//! curl) at a real DNS server (nsd); the datapath hands their DNS flows to the proxy's DNS proxy,
//! which judges each query and puts what an allowed answer teaches into the kernel before the
//! client sees the answer. Root only; in CI (`CI=true`) always.

mod common;

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Lab, porin, privileged};
use serde_json::Value;

/// The fqdn lab (`config/labs/fqdn.yaml`) with extra zone records and settings.
fn fqdn_lab(tag: &str, extra_records: &str, settings: &str) -> Lab {
    let text = std::fs::read_to_string(common::repo().join("config/labs/fqdn.yaml")).unwrap();
    let text = text.replace("../examples/", "@REPO@/config/examples/").replace(
        "              - {name: alias, cname: api.example.com.}\n",
        &format!("              - {{name: alias, cname: api.example.com.}}\n{extra_records}"),
    );
    Lab::up(tag, &format!("{text}{settings}"))
}

fn dig(lab: &Lab, args: &[&str]) -> String {
    let mut a = vec!["dig", "+time=3", "+tries=1"];
    a.extend_from_slice(args);
    let o = lab.exec("client", &a);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn status_of(dig_out: &str) -> &str {
    dig_out.split("status: ").nth(1).and_then(|s| s.split(',').next()).unwrap_or("")
}

/// curl from the client: (exit code, body).
fn curl(lab: &Lab, args: &[&str], url: &str) -> (i32, String) {
    let mut a = vec!["curl", "-s", "-g", "-m", "3"];
    a.extend_from_slice(args);
    a.push(url);
    let o = lab.exec("client", &a);
    (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stdout).into_owned())
}

fn cache(lab: &Lab) -> Vec<Value> {
    let o = porin().args(["fqdn", "cache", "list", "-o", "json", "--lab", &lab.name]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn dns_flows(lab: &Lab) -> Vec<Value> {
    let o = porin().args(["observe", "-o", "json", "--lab", &lab.name, "--protocol", "dns"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["flow"].clone())
        .collect()
}

fn counter(lab: &Lab, name: &str) -> u64 {
    lab.counters()[name].as_u64().unwrap_or(0)
}

/// A big name: `n` A records (a ~16-byte record each: 3,800 make a ~60 KiB answer).
fn big_records(n: u32) -> String {
    let addrs: Vec<String> = (0..n).map(|i| format!("198.18.{}.{}", i / 250, i % 250 + 1)).collect();
    format!("              - {{name: big, addresses: [{}]}}\n", addrs.join(", "))
}

#[test]
fn dns_based_egress_as_the_lab_documents_it_privileged() {
    if !privileged() {
        return;
    }
    let lab = fqdn_lab("fqdn", &big_records(3800), "");
    let api = lab.addr("api", false);
    let (api6, coredns6) = (lab.addr("api", true), lab.addr("coredns", true));

    // Before any lookup the api's address is the world: dropped in the kernel.
    assert_eq!(curl(&lab, &[], &format!("http://{api}/")).0, 28, "no connection before a lookup");

    // Lookups the DNS rules allow are answered, over UDP and TCP, IPv4 and IPv6.
    let out = dig(&lab, &["api.example.com"]);
    assert_eq!(status_of(&out), "NOERROR", "{out}");
    assert!(out.contains(&api), "{out}");
    assert_eq!(status_of(&dig(&lab, &["+tcp", "api.example.com"])), "NOERROR");
    let out = dig(&lab, &[&format!("@{coredns6}"), "AAAA", "api.example.com"]);
    assert!(out.contains(&api6), "AAAA over IPv6: {out}");
    // Names they do not allow: REFUSED, with either transport; never asked of the server.
    assert_eq!(status_of(&dig(&lab, &["evil.test"])), "REFUSED");
    assert_eq!(status_of(&dig(&lab, &["+tcp", "evil.test"])), "REFUSED");

    // toFQDNs + HTTP: GET / allowed, POST refused by the proxy; the alias reaches the api; evil
    // resolves but its address is dropped in the kernel.
    assert_eq!(curl(&lab, &[], "http://api.example.com/"), (0, "api\n".into()));
    assert_eq!(curl(&lab, &["-XPOST"], "http://api.example.com/"), (0, "Access denied\r\n".into()));
    assert_eq!(curl(&lab, &[], "http://alias.example.com/"), (0, "api\n".into()));
    assert_eq!(curl(&lab, &["-6"], "http://api.example.com/"), (0, "api\n".into()), "over IPv6");
    let seq = lab.last_seq();
    assert_eq!(curl(&lab, &[], "http://evil.example.com/").0, 28, "evil resolves, its address is dropped");
    let drop = lab.wait_event(seq, |e| e["verdict"] == "DROPPED" && e["destination"]["identity"] == 9);
    assert_eq!(drop["drop_reason_desc"], "POLICY_DENIED");

    // A ~60 KiB answer: truncated over UDP, the client retries over TCP and gets all of it.
    let out = dig(&lab, &["big.example.com"]);
    assert!(out.contains("Truncated, retrying in TCP mode"), "{}", &out[..out.len().min(400)]);
    assert_eq!(status_of(&out), "NOERROR");
    assert_eq!(out.lines().filter(|l| l.starts_with("big.example.com.")).count(), 3800);

    // What was learned, and the records of it.
    let entries = cache(&lab);
    let api_entry = entries.iter().find(|e| e["name"] == "api.example.com." && e["ip"] == api.as_str()).unwrap();
    assert_eq!(api_entry["endpoints"][0], "default/client");
    assert!(entries.iter().any(|e| e["name"] == "alias.example.com." && e["ip"] == api.as_str()));
    let flows = dns_flows(&lab);
    let refused = flows.iter().find(|f| f["l7"]["dns"]["query"] == "evil.test.").unwrap();
    assert_eq!(
        (refused["verdict"].as_str(), refused["drop_reason_desc"].as_str()),
        (Some("DROPPED"), Some("POLICY_DENIED"))
    );
    let answer = flows
        .iter()
        .find(|f| f["l7"]["type"] == "RESPONSE" && f["l7"]["dns"]["query"] == "alias.example.com.")
        .unwrap();
    assert_eq!(answer["l7"]["dns"]["cnames"][0], "api.example.com.");
    assert_eq!(answer["l7"]["dns"]["ttl"], 30);
    assert_eq!(answer["l7"]["dns"]["ips"][0], api.as_str());
    // The kernel's drops were only the ones asked for: no first connection after a lookup lost.
    assert!(flows.iter().all(|f| f["Summary"].as_str().is_none_or(|s| !s.contains("SERVFAIL"))));
}

#[test]
fn expired_names_lose_access_but_live_connections_survive_privileged() {
    if !privileged() {
        return;
    }
    let lab =
        fqdn_lab("fqttl", "              - {name: short, pod: api, ttl: 2}\n", "settings:\n  ct_tcp_close_secs: 1\n");
    lab.apply(&[r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: short}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s:k8s-app: kube-dns}}]
    toPorts: [{ports: [{port: "53", protocol: UDP}], rules: {dns: [{matchPattern: "*.example.com"}]}}]
  - toFQDNs: [{matchName: short.example.com}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"#]);
    let api: SocketAddr = format!("{}:80", lab.addr("api", false)).parse().unwrap();
    assert!(dig(&lab, &["short.example.com"]).contains(&api.ip().to_string()));
    // A connection opened while the name is fresh.
    let mut live = lab.tcp("client", api).unwrap();
    let ask = |s: &mut std::net::TcpStream| {
        s.write_all(b"GET / HTTP/1.1\r\nHost: short.example.com\r\n\r\n").unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or("").to_owned()
    };
    assert_eq!(ask(&mut live), "HTTP/1.1 200 OK");
    // The name expires (TTL 2 s) while the connection lives: its address is kept (a zombie, as
    // in Cilium) and the connection goes on.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(ask(&mut live), "HTTP/1.1 200 OK", "the live connection survives expiry");
    let entries = cache(&lab);
    let z = entries.iter().find(|e| e["name"] == "short.example.com.").expect("kept while the connection lives");
    assert_eq!(z["zombie"], true);
    // The connection ends: the zombie goes once conntrack lets the flow go, and with it access.
    drop(live);
    let deadline = Instant::now() + Duration::from_secs(20);
    while cache(&lab).iter().any(|e| e["name"] == "short.example.com.") {
        assert!(Instant::now() < deadline, "the zombie outlived its connection: {:?}", cache(&lab));
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(lab.tcp("client", api).is_err(), "a new connection after expiry is dropped");
    // A new lookup brings access back.
    assert!(dig(&lab, &["short.example.com"]).contains(&api.ip().to_string()));
    assert!(lab.tcp("client", api).is_ok());
}

#[test]
fn dns_keeps_answering_across_agent_and_proxy_restarts_privileged() {
    if !privileged() {
        return;
    }
    let lab = fqdn_lab("fqrst", "", "");
    assert_eq!(status_of(&dig(&lab, &["api.example.com"])), "NOERROR");
    assert_eq!(curl(&lab, &[], "http://api.example.com/"), (0, "api\n".into()));

    // The agent is killed: DNS goes on being judged and answered, learned names stay reachable,
    // and names learned meanwhile work too (the proxy writes the kernel's FQDN map itself).
    let agent = lab.agent_pid();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent), nix::sys::signal::Signal::SIGKILL).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(status_of(&dig(&lab, &["evil.test"])), "REFUSED", "judged while the agent is down");
    assert_eq!(curl(&lab, &[], "http://api.example.com/"), (0, "api\n".into()), "learned before");
    assert_eq!(curl(&lab, &[], "http://alias.example.com/"), (0, "api\n".into()), "learned while the agent is down");
    let o = porin().args(["lab", "restart-agent", "--name", &lab.name]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(curl(&lab, &["-XPOST"], "http://api.example.com/"), (0, "Access denied\r\n".into()));

    // The proxy is killed and restarted: the cache comes back from its file; the learned address
    // works without a new lookup.
    let before: BTreeMap<String, Value> =
        cache(&lab).into_iter().map(|e| (format!("{} {}", e["name"], e["ip"]), e)).collect();
    let pid = lab.status()["proxy"]["pid"].as_i64().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    let o = porin().args(["lab", "restart-proxy", "--name", &lab.name]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let after: BTreeMap<String, Value> =
        cache(&lab).into_iter().map(|e| (format!("{} {}", e["name"], e["ip"]), e)).collect();
    assert_eq!(before.keys().collect::<Vec<_>>(), after.keys().collect::<Vec<_>>(), "the cache is restored");
    let api = lab.addr("api", false);
    assert_eq!(curl(&lab, &["-H", "Host: api.example.com"], &format!("http://{api}/")), (0, "api\n".into()));
}

#[test]
fn a_thousand_fresh_names_never_lose_their_first_connection_privileged() {
    if !privileged() {
        return;
    }
    const N: u32 = 1000;
    // 1,000 names, each with its own address on the api pod.
    let records: String = (0..N)
        .map(|i| format!("              - {{name: n{i}, addresses: [198.19.{}.{}]}}\n", i / 250, i % 250 + 1))
        .collect();
    let lab = fqdn_lab("fq1k", &records, "");
    let st = lab.status();
    let pod = |name: &str| st["pods"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap().clone();
    let api = pod("api");
    let (api_ns, api_if) = (api["netns"].as_str().unwrap(), api["ifname"].as_str().unwrap());
    let node = st["node_netns"].as_str().unwrap();
    let mut batch = String::new();
    for i in 0..N {
        batch.push_str(&format!("addr add 198.19.{}.{}/32 dev eth0\n", i / 250, i % 250 + 1));
    }
    let f = std::env::temp_dir().join(format!("porin-fq1k-{}", std::process::id()));
    std::fs::write(&f, batch).unwrap();
    let ok = std::process::Command::new("ip").args(["-n", api_ns, "-batch"]).arg(&f).status().unwrap();
    std::fs::remove_file(&f).unwrap();
    assert!(ok.success());
    let ok = std::process::Command::new("ip")
        .args(["-n", node, "route", "add", "198.19.0.0/22", "dev", api_if])
        .status()
        .unwrap();
    assert!(ok.success());
    lab.apply(&[r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: many}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s:k8s-app: kube-dns}}]
    toPorts: [{ports: [{port: "53", protocol: UDP}], rules: {dns: [{matchPattern: "*.example.com"}]}}]
  - toFQDNs: [{matchPattern: "n*.example.com"}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"#]);
    let dropped_before = counter(&lab, "dropped");
    // Resolve, then connect at once, 1,000 times (curl asks A and AAAA, then connects).
    let script = format!(
        "for i in $(seq 0 {}); do curl -s -o /dev/null -m 3 -w '%{{http_code}}\\n' http://n$i.example.com/; done | sort | uniq -c",
        N - 1
    );
    let start = Instant::now();
    let o = lab.exec("client", &["sh", "-c", &script]);
    let took = start.elapsed();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out.trim(), format!("{N} 200"), "every first connection answered");
    assert_eq!(counter(&lab, "dropped"), dropped_before, "no packet dropped: no first SYN lost");
    eprintln!("{N} resolve-then-connect cycles in {took:?}");
}

#[test]
fn hostile_dns_messages_are_never_forwarded_privileged() {
    if !privileged() {
        return;
    }
    let lab = fqdn_lab("fqbad", "", "");
    let server: SocketAddr = format!("{}:53", lab.addr("coredns", false)).parse().unwrap();
    let allowed = |id: [u8; 2]| {
        // id, RD, 1 question: api.example.com A IN
        let mut q = vec![id[0], id[1], 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in ["api", "example", "com"] {
            q.push(u8::try_from(l.len()).unwrap());
            q.extend_from_slice(l.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        q
    };
    let mut two_questions = allowed([0, 2]);
    two_questions[5] = 2;
    two_questions.extend_from_slice(&[4, b'e', b'v', b'i', b'l', 4, b't', b'e', b's', b't', 0, 0, 1, 0, 1]);
    let mut compression_loop = vec![0, 3, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    compression_loop.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
    let huge_counts = vec![0, 4, 0x01, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
    let mut truncated = allowed([0, 5]);
    truncated.truncate(20);
    let mut as_response = allowed([0, 6]);
    as_response[2] |= 0x80;
    let hostile: Vec<Vec<u8>> = vec![
        two_questions,
        compression_loop,
        huge_counts,
        truncated,
        as_response,
        vec![0xde, 0xad],
        vec![0u8; 12],
        // Random bytes, short of a fragment (fragments never reach the proxy: the kernel drops them).
        (0..=255u8).cycle().skip(7).take(1400).collect(),
    ];
    let rejected_before = lab.status()["proxy"]["status"]["counters"]["rejected"].as_u64().unwrap();
    let answers = lab.in_pod("client", move || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let mut answers = Vec::new();
        for m in &hostile {
            sock.send_to(m, server).unwrap();
            let mut buf = [0u8; 4096];
            answers.push(sock.recv(&mut buf).ok().map(|n| buf[..n].to_vec()));
        }
        answers
    });
    // Two questions: FORMERR (rcode 1), never forwarded.
    let formerr = answers[0].as_ref().expect("an answer to two questions");
    assert_eq!((formerr[3] & 0x0f, formerr[0], formerr[1]), (1, 0, 2));
    // Nothing hostile reached nsd's answers: no answer carries an address.
    for (i, a) in answers.iter().enumerate() {
        if let Some(a) = a {
            assert_eq!(u16::from_be_bytes([a[6], a[7]]), 0, "message {i} got an answer section: forwarded");
        }
    }
    let rejected = lab.status()["proxy"]["status"]["counters"]["rejected"].as_u64().unwrap();
    assert_eq!(rejected - rejected_before, 8, "every hostile message refused");
    // The proxy keeps serving.
    assert_eq!(status_of(&dig(&lab, &["api.example.com"])), "NOERROR");
    // Porin's own reason (no Cilium equivalent): its number in Hubble's `drop_reason`, its name in the summary.
    let malformed = dns_flows(&lab).iter().filter(|f| f["drop_reason"] == 210).count();
    assert_eq!(malformed, 8, "each recorded as malformed");
}

/// An answer teaches addresses only for names the client could have asked about: a CNAME from an
/// allowed name to one the DNS rules do not allow does not make the target's `toFQDNs` rule apply.
#[test]
fn a_cname_cannot_vouch_for_a_name_the_rules_do_not_allow_privileged() {
    if !privileged() {
        return;
    }
    let text = std::fs::read_to_string(common::repo().join("config/labs/fqdn.yaml")).unwrap();
    let text = text.replace("../examples/", "@REPO@/config/examples/").replace(
        "              - {name: alias, cname: api.example.com.}\n",
        "              - {name: alias, cname: api.example.com.}\n              - {name: sneaky, cname: api.other.test.}\n          - name: other.test\n            records:\n              - {name: api, pod: api}\n",
    );
    let lab = Lab::up("fqcname", &text);
    let policy = |dns: &str| {
        format!(
            r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: cname}}
spec:
  endpointSelector: {{matchLabels: {{app: client}}}}
  egress:
  - toEndpoints: [{{matchLabels: {{k8s:io.kubernetes.pod.namespace: kube-system, k8s:k8s-app: kube-dns}}}}]
    toPorts: [{{ports: [{{port: "53", protocol: UDP}}], rules: {{dns: [{dns}]}}}}]
  - toFQDNs: [{{matchName: api.other.test}}]
    toPorts: [{{ports: [{{port: "80", protocol: TCP}}]}}]
"#
        )
    };
    let api = lab.addr("api", false);
    let connect =
        |lab: &Lab| curl(lab, &["--resolve", &format!("api.other.test:80:{api}")], "http://api.other.test/").0;
    // Only *.example.com may be asked about: the chain's other.test name teaches nothing.
    lab.apply(&[&policy(r#"{matchPattern: "*.example.com"}"#)]);
    let out = dig(&lab, &["sneaky.example.com"]);
    assert!(out.contains("api.other.test.") && out.contains(&api), "nsd answers the whole chain: {out}");
    assert_eq!(connect(&lab), 28, "api.other.test was not learned through the CNAME");
    assert!(!cache(&lab).iter().any(|e| e["name"] == "api.other.test."));
    // Once the rules allow asking about other.test too, the same answer teaches it.
    lab.apply(&[&policy(r#"{matchPattern: "*.example.com"}, {matchPattern: "*.other.test"}"#)]);
    assert!(dig(&lab, &["sneaky.example.com"]).contains(&api));
    assert_eq!(connect(&lab), 0);
}
