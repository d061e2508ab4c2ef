//! Harness for privileged tests: a lab guard (`porin lab up` / `down` on drop, also on panic), real
//! clients in pod namespaces, and helpers to read the agent's events and counters.
#![allow(dead_code, reason = "each test binary uses a subset of the harness")]

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

pub(crate) mod cni;

/// The `porin` binary under test.
pub(crate) fn porin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_porin"))
}

/// Root of the repository.
pub(crate) fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Returns false (after saying why) when this machine cannot run privileged tests; with `CI=true`
/// a missing capability fails the test instead.
pub(crate) fn privileged() -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    let bpf = std::path::Path::new("/sys/fs/bpf").exists() || root;
    if root && bpf {
        return true;
    }
    let why = "needs root (network namespaces, eBPF)";
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("privileged test cannot run: {why} (CI=true: a missing capability is a failure)");
    }
    eprintln!("SKIPPED: {why}");
    false
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A private scratch directory (`porin-<tag>-<pid>-<n>` under the temporary directory), removed on
/// drop, also on panic.
pub(crate) struct Dir(pub PathBuf);

impl Dir {
    pub(crate) fn new(tag: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("porin-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What `wrk` reported.
#[derive(Debug, Default)]
pub(crate) struct Wrk {
    pub requests: u64,
    pub connect_errors: u64,
    /// Read, write and timeout errors (a connection that broke or stalled).
    pub other_errors: u64,
    pub non_2xx: u64,
    pub output: String,
}

/// What `h2load` reported.
#[derive(Debug, Default)]
pub(crate) struct H2load {
    pub succeeded: u64,
    /// Failed, errored and timed-out requests.
    pub failed: u64,
    /// Answers other than 2xx.
    pub not_2xx: u64,
    pub output: String,
}

/// A running lab; `porin lab down` when dropped.
pub(crate) struct Lab {
    pub name: String,
    /// The test's own directory (the lab file; files a test writes).
    pub dir: PathBuf,
}

impl Lab {
    /// Brings up a lab from YAML text (policy paths in it are relative to the repository root).
    pub(crate) fn up(tag: &str, yaml: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("{tag}-{}-{n}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("porin-test-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("lab.yaml");
        std::fs::write(&file, yaml.replace("@REPO@", &repo().display().to_string())).unwrap();
        let lab = Self { name, dir };
        let out = porin().args(["lab", "up", "--name", &lab.name]).arg(&file).output().unwrap();
        assert!(
            out.status.success(),
            "lab up failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        lab
    }

    /// Runs a command in a pod.
    pub(crate) fn exec(&self, pod: &str, args: &[&str]) -> Output {
        porin().args(["lab", "exec", "--name", &self.name, pod, "--"]).args(args).output().unwrap()
    }

    /// curl from a pod; returns (exit code, body). `-m` bounds the whole request.
    pub(crate) fn curl(&self, pod: &str, method: &str, url: &str, timeout_s: u32) -> (i32, String) {
        let t = timeout_s.to_string();
        let (exit, _, body) = self.curl_status(pod, &["-m", &t, "--connect-timeout", &t, "-X", method], url);
        (exit, body)
    }

    /// ping from a pod: whether one echo request got its reply within a second.
    pub(crate) fn ping(&self, pod: &str, target: &str, v6: bool) -> bool {
        let mut args = vec!["ping", "-c", "1", "-W", "1", target];
        if v6 {
            args.insert(1, "-6");
        }
        self.exec(pod, &args).status.success()
    }

    /// The lab's status (`porin lab status -o json`).
    pub(crate) fn status(&self) -> Value {
        let o = porin().args(["lab", "status", "-o", "json", "--name", &self.name]).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    }

    /// Address of a pod (`v6` picks the IPv6 one).
    pub(crate) fn addr(&self, pod: &str, v6: bool) -> String {
        let st = self.status();
        let p =
            st["pods"].as_array().unwrap().iter().find(|p| p["name"] == pod).unwrap_or_else(|| panic!("no pod {pod}"));
        p["addresses"][usize::from(v6)].as_str().unwrap().to_owned()
    }

    /// curl in a pod (`-s -g -m 3`, then `args`: a later `-m` wins): its exit code, the HTTP
    /// status and the body.
    pub(crate) fn curl_status(&self, pod: &str, args: &[&str], url: &str) -> (i32, String, String) {
        let mut a = vec!["curl", "-s", "-g", "-m", "3", "-w", "\n%{http_code}"];
        a.extend_from_slice(args);
        a.push(url);
        let o = self.exec(pod, &a);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", ""));
        (o.status.code().unwrap_or(-1), code.to_owned(), body.to_owned())
    }

    /// Runs wrk in a pod: `conns` keep-alive connections for `secs`, `POST /v1/request-landing`.
    pub(crate) fn wrk(&self, pod: &str, url: &str, conns: u32, secs: u32) -> Wrk {
        let script = self.dir.join("wrk-post.lua");
        std::fs::write(&script, "wrk.method = \"POST\"\n").unwrap();
        let cmd = format!(
            "ulimit -n 20000; wrk -t2 -c{conns} -d{secs}s --timeout 30s -s {} {url}/v1/request-landing",
            script.display()
        );
        let o = self.exec(pod, &["bash", "-c", &cmd]);
        let output = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "wrk failed: {output}");
        let mut w = Wrk { output: output.clone(), ..Wrk::default() };
        for line in output.lines().map(str::trim) {
            if let Some(rest) = line.split_once(" requests in ") {
                w.requests = rest.0.trim().parse().unwrap_or(0);
            }
            if let Some(rest) = line.strip_prefix("Socket errors: ") {
                for part in rest.split(',') {
                    let (what, n) = part.trim().split_once(' ').unwrap_or(("", "0"));
                    let n: u64 = n.trim().parse().unwrap_or(0);
                    match what {
                        "connect" => w.connect_errors = n,
                        _ => w.other_errors += n,
                    }
                }
            }
            if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses: ") {
                w.non_2xx = rest.trim().parse().unwrap_or(0);
            }
        }
        w
    }

    /// Runs h2load (h2c, prior knowledge) in a pod: `clients` connections with `streams` streams
    /// each for `secs`, `POST`ing a small body to `url`.
    pub(crate) fn h2load(&self, pod: &str, url: &str, clients: u32, streams: u32, secs: u32) -> H2load {
        let body = self.dir.join("h2load-post.txt");
        std::fs::write(&body, "landing\n").unwrap();
        let (c, m, d) = (clients.to_string(), streams.to_string(), secs.to_string());
        let args = ["h2load", "-c", &c, "-m", &m, "-D", &d, "-d", body.to_str().unwrap(), url];
        let o = self.exec(pod, &args);
        let output = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        let mut h = H2load { output: output.clone(), ..H2load::default() };
        // "requests: 10 total, 10 started, 10 done, 9 succeeded, 1 failed, 1 errored, 0 timeout"
        // "status codes: 9 2xx, 0 3xx, 1 4xx, 0 5xx"
        let n = |part: &str| part.trim().split(' ').next().unwrap_or("0").parse::<u64>().unwrap_or(0);
        for line in output.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("requests: ") {
                for part in rest.split(',') {
                    match part.trim().split(' ').nth(1) {
                        Some("succeeded") => h.succeeded = n(part),
                        Some("failed" | "errored" | "timeout") => h.failed += n(part),
                        _ => {}
                    }
                }
            }
            if let Some(rest) = line.strip_prefix("status codes: ") {
                h.not_2xx = rest.split(',').filter(|p| !p.trim().ends_with("2xx")).map(n).sum();
            }
        }
        assert!(o.status.success() && output.contains("requests: "), "h2load failed: {output}");
        h
    }

    /// Identity of an endpoint pod.
    pub(crate) fn identity(&self, pod: &str) -> u64 {
        let st = self.status();
        st["pods"].as_array().unwrap().iter().find(|p| p["name"] == pod).unwrap()["identity"].as_u64().unwrap()
    }

    /// Replaces the lab's policies (YAML texts) and returns how long the apply took.
    pub(crate) fn apply(&self, policies: &[&str]) -> Duration {
        let mut files = Vec::new();
        for (i, p) in policies.iter().enumerate() {
            let f = self.dir.join(format!("apply-{i}.yaml"));
            std::fs::write(&f, p).unwrap();
            files.push(f);
        }
        let start = Instant::now();
        let o = porin().args(["lab", "apply", "--name", &self.name]).args(&files).output().unwrap();
        let took = start.elapsed();
        assert!(
            o.status.success(),
            "apply failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        took
    }

    /// Flow events after `after`.
    pub(crate) fn events(&self, after: u64) -> Vec<Value> {
        let o = porin()
            .args(["lab", "events", "-o", "json", "--name", &self.name, "--after", &after.to_string()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// Waits (briefly) for an event matching `pred`, after `after`.
    pub(crate) fn wait_event(&self, after: u64, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(e) = self.events(after).into_iter().find(|e| pred(e)) {
                return e;
            }
            assert!(Instant::now() < deadline, "no matching event; events: {:#?}", self.events(after));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last event sequence number so far.
    pub(crate) fn last_seq(&self) -> u64 {
        self.events(0).last().and_then(|e| e["seq"].as_u64()).unwrap_or(0)
    }

    /// Datapath counters (of the first node).
    pub(crate) fn counters(&self) -> Value {
        self.counters_of(None)
    }

    /// Datapath counters of a node (`None`: the first).
    pub(crate) fn counters_of(&self, node: Option<&str>) -> Value {
        let mut args = vec!["lab", "counters", "--name", &self.name];
        args.extend(node.iter().flat_map(|n| ["--node", *n]));
        let o = porin().args(args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    }

    /// Runs `f` inside a pod's network namespace (on a scratch thread); sockets it creates stay in
    /// that namespace and can be used from anywhere afterwards.
    pub(crate) fn in_pod<T: Send + 'static>(&self, pod: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let netns = format!("/run/netns/porin-{}-{pod}", self.name);
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&netns).unwrap();
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    /// A TCP connection from a pod.
    pub(crate) fn tcp(&self, pod: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
        self.in_pod(pod, move || TcpStream::connect_timeout(&to, Duration::from_secs(1)))
    }

    /// A UDP socket in a pod, bound to an ephemeral port.
    pub(crate) fn udp(&self, pod: &str, v6: bool) -> UdpSocket {
        self.in_pod(pod, move || UdpSocket::bind(if v6 { "[::]:0" } else { "0.0.0.0:0" }).unwrap())
    }

    /// The agent's process id.
    pub(crate) fn agent_pid(&self) -> i32 {
        i32::try_from(self.status()["agent"]["pid"].as_u64().unwrap()).unwrap()
    }

    /// Path of a pinned map of this lab.
    pub(crate) fn pinned_map(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("/run/porin/labs/{}/bpf/maps/{name}", self.name))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let o = porin().args(["lab", "down", "--name", &self.name]).output();
        if let Ok(o) = o
            && !o.status.success()
        {
            eprintln!("lab down {}: {}", self.name, String::from_utf8_lossy(&o.stderr));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Echoes one line over a TCP echo connection; false when the connection is broken.
pub(crate) fn echo(stream: &mut TcpStream, msg: &str) -> bool {
    use std::io::{Read as _, Write as _};
    stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    if stream.write_all(msg.as_bytes()).is_err() {
        return false;
    }
    let mut buf = vec![0u8; msg.len()];
    stream.read_exact(&mut buf).is_ok() && buf == msg.as_bytes()
}

/// One request on a control socket (agent or proxy).
pub(crate) fn control_json(sock: &std::path::Path, req: &str) -> Value {
    use std::io::{BufRead as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.write_all(format!("{req}\n").as_bytes()).unwrap();
    let mut line = String::new();
    std::io::BufReader::new(&s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}
