//! Built-in servers for lab pods: an HTTP responder with canned routes (hyper), a UDP echo and a TCP
//! echo server, an authoritative DNS server (the real `nsd`, configured from the lab file) and a
//! Kafka broker (the real `tansu`, in memory, with the lab's topics created).
//! They run inside a pod's network namespace (`porin lab serve`), listen on both IPv4 and IPv6,
//! and write a ready file once every socket is bound (for DNS: once nsd answers).

use std::convert::Infallible;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioExecutor;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, UdpSocket};

/// One canned HTTP route.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Method (exact).
    pub method: String,
    /// Path (exact, without the query).
    pub path: String,
    /// Status code (default 200).
    #[serde(default)]
    pub status: Option<u16>,
    /// Response body; `{client}` is replaced with the address the request came from.
    #[serde(default)]
    pub body: String,
}

/// The servers of one pod.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSpec {
    /// HTTP responder.
    #[serde(default)]
    pub http: Option<HttpSpec>,
    /// UDP echo port.
    #[serde(default)]
    pub udp_echo: Option<u16>,
    /// TCP echo port.
    #[serde(default)]
    pub tcp_echo: Option<u16>,
    /// Authoritative DNS (nsd).
    #[serde(default)]
    pub dns: Option<DnsSpec>,
    /// A Kafka broker (tansu).
    #[serde(default)]
    pub kafka: Option<KafkaSpec>,
}

/// A Kafka broker for the lab (the real `tansu`, storage in memory), listening on IPv4 and IPv6 and
/// advertising the pod's address in its Metadata answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSpec {
    /// Port (default 9092).
    #[serde(default = "kafka_port")]
    pub port: u16,
    /// Topics created before the pod is ready (one partition each).
    #[serde(default)]
    pub topics: Vec<String>,
    /// The address advertised to clients (set by the lab: the pod's IPv4 address).
    #[serde(default)]
    pub advertise: Option<std::net::IpAddr>,
}

fn kafka_port() -> u16 {
    9092
}

/// An authoritative DNS server for the lab's zones (served by `nsd`, on UDP and TCP).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSpec {
    /// Port (default 53).
    #[serde(default = "dns_port")]
    pub port: u16,
    /// Zones.
    pub zones: Vec<ZoneSpec>,
}

fn dns_port() -> u16 {
    53
}

fn default_ttl() -> u32 {
    30
}

/// One zone.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneSpec {
    /// The zone's name (`example.com`).
    pub name: String,
    /// TTL of its records, seconds (default 30).
    #[serde(default = "default_ttl")]
    pub ttl: u32,
    /// Records.
    #[serde(default)]
    pub records: Vec<RecordSpec>,
}

/// One name of a zone: addresses (directly, or a lab pod's), a CNAME, or TXT.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordSpec {
    /// Name relative to the zone (`api`), or `@` for the zone itself.
    pub name: String,
    /// A lab pod: its IPv4 and IPv6 addresses (A and AAAA).
    #[serde(default)]
    pub pod: Option<String>,
    /// Addresses (A for IPv4, AAAA for IPv6).
    #[serde(default)]
    pub addresses: Vec<std::net::IpAddr>,
    /// An alias: a CNAME to this name (fully qualified, or relative to the zone).
    #[serde(default)]
    pub cname: Option<String>,
    /// TXT strings.
    #[serde(default)]
    pub txt: Vec<String>,
    /// This record's TTL (default: the zone's).
    #[serde(default)]
    pub ttl: Option<u32>,
}

impl DnsSpec {
    /// nsd's configuration for serving from `dir` (pid file, state, zone files all there).
    fn nsd_conf(&self, dir: &std::path::Path) -> String {
        let d = dir.display();
        let mut c = format!(
            "server:\n  ip-address: 0.0.0.0\n  ip-address: ::0\n  port: {}\n  username: \"\"\n  chroot: \"\"\n  zonesdir: \"{d}\"\n  pidfile: \"{d}/nsd.pid\"\n  xfrdfile: \"{d}/xfrd.state\"\n  zonelistfile: \"{d}/zone.list\"\n  database: \"\"\n  logfile: \"{d}/nsd.log\"\n  server-count: 1\n  verbosity: 1\n  hide-version: yes\n  rrl-ratelimit: 0\n  rrl-whitelist-ratelimit: 0\nremote-control:\n  control-enable: no\n",
            self.port
        );
        for z in &self.zones {
            c.push_str(&format!("zone:\n  name: {}\n  zonefile: {}.zone\n", z.name, z.name));
        }
        c
    }
}

impl ZoneSpec {
    /// The zone file.
    fn file(&self) -> String {
        use std::fmt::Write as _;
        let origin = format!("{}.", self.name.trim_end_matches('.'));
        let mut z = format!(
            "$ORIGIN {origin}\n$TTL {}\n@ IN SOA ns.{origin} admin.{origin} 1 3600 600 86400 {}\n@ IN NS ns.{origin}\nns IN A 127.0.0.1\n",
            self.ttl, self.ttl
        );
        for r in &self.records {
            let ttl = r.ttl.map(|t| format!("{t} ")).unwrap_or_default();
            for a in &r.addresses {
                let kind = if a.is_ipv4() { "A" } else { "AAAA" };
                let _ = writeln!(z, "{} {ttl}IN {kind} {a}", r.name);
            }
            if let Some(c) = &r.cname {
                let _ = writeln!(z, "{} {ttl}IN CNAME {c}", r.name);
            }
            for t in &r.txt {
                let _ = writeln!(z, "{} {ttl}IN TXT \"{t}\"", r.name);
            }
        }
        z
    }
}

/// Writes nsd's files into `dir`, starts it in the foreground (same process group: `lab down`
/// stops it with this process), and waits until it answers.
fn start_nsd(spec: &DnsSpec, dir: &std::path::Path) -> anyhow::Result<std::process::Child> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    for z in &spec.zones {
        std::fs::write(dir.join(format!("{}.zone", z.name)), z.file())?;
    }
    let conf = dir.join("nsd.conf");
    std::fs::write(&conf, spec.nsd_conf(dir))?;
    let mut child = std::process::Command::new("nsd")
        .args(["-d", "-c"])
        .arg(&conf)
        .spawn()
        .context("start nsd (install the nsd package)")?;
    // Ready when it answers a query for the first zone's SOA.
    let zone = spec.zones.first().map_or("example.com", |z| z.name.as_str());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if soa_answered(zone, spec.port) {
            return Ok(child);
        }
        if let Ok(Some(status)) = child.try_wait() {
            anyhow::bail!("nsd exited ({status}): see {}", dir.join("nsd.log").display());
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            anyhow::bail!("nsd did not answer in 10 s: see {}", dir.join("nsd.log").display());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The tansu binary: on PATH, else where `cargo install` put it.
fn tansu_bin() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("tansu"))
        .find(|p| p.is_file());
    on_path.unwrap_or_else(|| {
        let home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
            .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
        home.join("bin").join("tansu")
    })
}

/// Starts tansu in the foreground (same process group: `lab down` stops it with this process),
/// waits until it accepts connections, then creates the topics.
fn start_kafka(spec: &KafkaSpec) -> anyhow::Result<std::process::Child> {
    let bin = tansu_bin();
    let advertise = match spec.advertise {
        Some(std::net::IpAddr::V6(ip)) => format!("[{ip}]"),
        Some(ip) => ip.to_string(),
        None => "localhost".to_owned(),
    };
    let broker = format!("tcp://localhost:{}", spec.port);
    let mut child = std::process::Command::new(&bin)
        .args(["broker", "--listener-url", &format!("tcp://[::]:{}", spec.port)])
        .args(["--advertised-listener-url", &format!("tcp://{advertise}:{}", spec.port)])
        .args(["--storage-engine", "memory://tansu/"])
        .spawn()
        .with_context(|| format!("start {} (scripts/setup.sh installs tansu once per machine)", bin.display()))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.1", spec.port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            anyhow::bail!("tansu exited ({status})");
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            anyhow::bail!("tansu did not listen on port {} in 15 s", spec.port);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for topic in &spec.topics {
        let status = std::process::Command::new(&bin)
            .args(["topic", "create", topic, "--broker", &broker, "--partitions", "1"])
            .status()
            .with_context(|| format!("run tansu topic create {topic}"))?;
        anyhow::ensure!(status.success(), "tansu topic create {topic}: {status}");
    }
    Ok(child)
}

/// Whether a DNS server on localhost:`port` answers an SOA query for `zone`.
fn soa_answered(zone: &str, port: u16) -> bool {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};
    let Ok(name) = Name::from_ascii(format!("{}.", zone.trim_end_matches('.'))) else { return false };
    let mut m = Message::query();
    m.metadata.id = 4242;
    m.add_query(Query::query(name, RecordType::SOA));
    let Ok(bytes) = m.to_vec() else { return false };
    let Ok(sock) = std::net::UdpSocket::bind("127.0.0.1:0") else { return false };
    if sock.set_read_timeout(Some(std::time::Duration::from_millis(200))).is_err()
        || sock.send_to(&bytes, ("127.0.0.1", port)).is_err()
    {
        return false;
    }
    let mut buf = [0u8; 4096];
    sock.recv(&mut buf)
        .is_ok_and(|n| Message::from_vec(buf.get(..n).unwrap_or_default()).is_ok_and(|r| r.metadata.id == 4242))
}

/// HTTP responder settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSpec {
    /// Port.
    pub port: u16,
    /// Routes; anything else is 404.
    #[serde(default)]
    pub routes: Vec<Route>,
}

fn any_addr(port: u16) -> SocketAddr {
    // Dual-stack: an IPv6 wildcard socket also accepts IPv4 (bindv6only = 0).
    SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))
}

async fn respond(
    routes: Arc<Vec<Route>>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (head, body) = req.into_parts();
    // As an application does: the request whole (bounded), then the answer. (An HTTP/2 server that
    // answers first resets the rest of the stream, and hyper's counts such resets against a
    // connection's limit: a client sending bodies would see its connection closed.)
    if Limited::new(body, 1 << 20).collect().await.is_err() {
        let status = StatusCode::BAD_REQUEST;
        return Ok(Response::builder()
            .status(status)
            .body(Full::new(Bytes::from_static(b"Bad request body\n")))
            .unwrap_or_default());
    }
    let found = routes.iter().find(|r| r.method == head.method.as_str() && r.path == head.uri.path());
    let resp = match found {
        Some(r) => {
            // An IPv4 client of the dual-stack socket shows as ::ffff:a.b.c.d.
            let ip = match peer.ip() {
                std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
                v4 => v4,
            };
            Response::builder()
                .status(StatusCode::from_u16(r.status.unwrap_or(200)).unwrap_or(StatusCode::OK))
                .body(Full::new(Bytes::from(r.body.replace("{client}", &ip.to_string()))))
        }
        None => Response::builder().status(StatusCode::NOT_FOUND).body(Full::new(Bytes::from_static(b"Not found\n"))),
    };
    Ok(resp.unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))))
}

/// Runs the servers until killed; writes `ready` once all sockets are bound. nsd keeps its files in
/// `state_dir`.
pub fn run(spec: ServerSpec, ready: Option<PathBuf>, state_dir: &std::path::Path) -> anyhow::Result<()> {
    // Real servers run as children; this process waits for them when it serves nothing itself.
    let mut children = Vec::new();
    if let Some(d) = &spec.dns {
        children.push(("nsd", start_nsd(d, state_dir)?));
    }
    if let Some(k) = &spec.kafka {
        children.push(("tansu", start_kafka(k)?));
    }
    if !children.is_empty() && spec.http.is_none() && spec.udp_echo.is_none() && spec.tcp_echo.is_none() {
        if let Some(r) = &ready {
            std::fs::write(r, b"ready").with_context(|| format!("write {}", r.display()))?;
        }
        if let Some((name, child)) = children.first_mut() {
            let status = child.wait().with_context(|| format!("wait for {name}"))?;
            anyhow::bail!("{name} exited: {status}");
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let mut tasks = Vec::new();
        if let Some(h) = spec.http {
            let listener =
                TcpListener::bind(any_addr(h.port)).await.with_context(|| format!("bind HTTP port {}", h.port))?;
            let routes = Arc::new(h.routes);
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((stream, peer)) = listener.accept().await else { continue };
                    let routes = routes.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| respond(routes.clone(), peer, req));
                        // HTTP/1.1 and h2c (prior knowledge) alike.
                        let _ =
                            auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await;
                    });
                }
            }));
        }
        if let Some(port) = spec.udp_echo {
            let sock = UdpSocket::bind(any_addr(port)).await.with_context(|| format!("bind UDP port {port}"))?;
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    if let Ok((n, peer)) = sock.recv_from(&mut buf).await {
                        let _ = sock.send_to(buf.get(..n).unwrap_or_default(), peer).await;
                    }
                }
            }));
        }
        if let Some(port) = spec.tcp_echo {
            let listener = TcpListener::bind(any_addr(port)).await.with_context(|| format!("bind TCP port {port}"))?;
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((mut stream, _)) = listener.accept().await else { continue };
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16384];
                        while let Ok(n) = stream.read(&mut buf).await {
                            if n == 0 || stream.write_all(buf.get(..n).unwrap_or_default()).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            }));
        }
        if let Some(r) = ready {
            std::fs::write(&r, b"ready").with_context(|| format!("write {}", r.display()))?;
        }
        for t in tasks {
            let _ = t.await;
        }
        Ok(())
    })
}
