//! `porin observe`: flows from a node's Hubble API (`--server`, `--lab`), or straight from one
//! process's control socket (`--proxy`, `--agent`: a proxy run without an agent). The flags are
//! Hubble's filters; they are sent to the server, or applied here with the same filter code when
//! reading a control socket. `-o json` prints what `hubble observe -o json` prints: one
//! `GetFlowsResponse` per line in protobuf's JSON mapping.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::Args;
use porin_flow::control::{Reply, Request};
use porin_hubble::filter::Filters;
use porin_hubble::pb::flow::{self as fpb, FlowFilter};
use porin_hubble::pb::observer::get_flows_response::ResponseTypes;
use porin_hubble::pb::observer::{GetFlowsRequest, GetFlowsResponse};

/// `porin observe` arguments.
#[derive(Debug, Args)]
pub struct ObserveArgs {
    /// Read the Hubble API of this lab's nodes (every node's, merged in time order).
    #[cfg(feature = "lab")]
    #[arg(long)]
    pub lab: Option<String>,
    /// With `--lab`: only this node's.
    #[cfg(feature = "lab")]
    #[arg(long, requires = "lab")]
    pub node: Option<String>,
    /// The Hubble API to read: `unix:PATH` or `HOST:PORT`.
    #[arg(long, default_value = "unix:/run/porin/hubble.sock")]
    pub server: String,
    /// Read this proxy's control socket instead (a proxy without an agent); filters apply here.
    #[arg(long, conflicts_with = "agent")]
    pub proxy: Option<PathBuf>,
    /// Read this agent's control socket instead; filters apply here.
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// Only these verdicts (FORWARDED, DROPPED, REDIRECTED, ERROR, AUDIT); repeatable.
    #[arg(long)]
    pub verdict: Vec<String>,
    /// Flows from or to this pod (`namespace/name-prefix`, `namespace/`, or `name-prefix`).
    #[arg(long)]
    pub pod: Vec<String>,
    /// Flows from this pod.
    #[arg(long)]
    pub from_pod: Vec<String>,
    /// Flows to this pod.
    #[arg(long)]
    pub to_pod: Vec<String>,
    /// Flows from or to this namespace.
    #[arg(long)]
    pub namespace: Vec<String>,
    /// Flows from or to endpoints with these labels (a Kubernetes label selector: `app=x,!y`).
    #[arg(long)]
    pub label: Vec<String>,
    /// Flows from endpoints with these labels.
    #[arg(long)]
    pub from_label: Vec<String>,
    /// Flows to endpoints with these labels.
    #[arg(long)]
    pub to_label: Vec<String>,
    /// Flows from or to this address or prefix.
    #[arg(long)]
    pub ip: Vec<String>,
    /// Flows from this address or prefix.
    #[arg(long)]
    pub from_ip: Vec<String>,
    /// Flows to this address or prefix.
    #[arg(long)]
    pub to_ip: Vec<String>,
    /// Flows from or to this security identity.
    #[arg(long)]
    pub identity: Vec<u32>,
    /// Flows to this port.
    #[arg(long)]
    pub to_port: Vec<String>,
    /// Flows to names matching this pattern (`*.example.com`).
    #[arg(long)]
    pub to_fqdn: Vec<String>,
    /// Only this protocol (tcp, udp, icmp, http, http/1.1, http/2, dns, kafka, l7); repeatable.
    #[arg(long)]
    pub protocol: Vec<String>,
    /// HTTP method.
    #[arg(long)]
    pub http_method: Vec<String>,
    /// HTTP path (a regular expression).
    #[arg(long)]
    pub http_path: Vec<String>,
    /// HTTP status (`404`, `5+`).
    #[arg(long)]
    pub http_status: Vec<String>,
    /// DNS query (a regular expression).
    #[arg(long)]
    pub dns_query: Vec<String>,
    /// INGRESS or EGRESS.
    #[arg(long)]
    pub traffic_direction: Vec<String>,
    /// Event type: drop, policy-verdict, l7.
    #[arg(long = "type")]
    pub event_type: Vec<String>,
    /// Keep printing new flows.
    #[arg(short, long)]
    pub follow: bool,
    /// The last N matching flows (before following).
    #[arg(long, conflicts_with = "first")]
    pub last: Option<u64>,
    /// The first N matching flows the ring holds.
    #[arg(long, conflicts_with = "follow")]
    pub first: Option<u64>,
    /// Flows since this time (RFC 3339, or an age: `30s`, `5m`, `2h`).
    #[arg(long)]
    pub since: Option<String>,
    /// Flows until this time (RFC 3339, or an age).
    #[arg(long)]
    pub until: Option<String>,
    /// Output format: `text` lines, `json` (Hubble's JSON, one response per line), or a `table`
    /// that grows as flows happen (with `-f`).
    #[arg(short, long, value_enum, default_value_t)]
    pub output: ObserveOutput,
}

/// `porin observe -o`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum ObserveOutput {
    /// One line per flow.
    #[default]
    Text,
    /// JSON Lines (`hubble observe -o json`).
    Json,
    /// Aligned columns: time, source, destination, request, verdict, why.
    Table,
}

fn enum_value(field: &str, name: &str, parse: fn(&str) -> Option<i32>) -> anyhow::Result<i32> {
    parse(&name.to_ascii_uppercase()).with_context(|| format!("--{field}: unknown value {name:?}"))
}

/// A time flag: RFC 3339, or an age before now.
fn time_flag(flag: &str, v: &str) -> anyhow::Result<pbjson_types::Timestamp> {
    let age = |n: &str, unit: u64| n.parse::<u64>().ok().map(|n| n * unit);
    let secs = v
        .strip_suffix('s')
        .and_then(|n| age(n, 1))
        .or_else(|| v.strip_suffix('m').and_then(|n| age(n, 60)))
        .or_else(|| v.strip_suffix('h').and_then(|n| age(n, 3600)));
    if let Some(ago) = secs {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let t = now.saturating_sub(Duration::from_secs(ago));
        return Ok(pbjson_types::Timestamp {
            seconds: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(t.subsec_nanos()).unwrap_or(0),
        });
    }
    porin_hubble::convert::timestamp(v)
        .with_context(|| format!("--{flag}: {v:?} is neither RFC 3339 nor an age like 5m"))
}

/// The flags as Hubble's request: one-sided flags in every filter; flags naming either side
/// make two filters (source side, destination side), as `hubble observe` does.
pub fn request(a: &ObserveArgs) -> anyhow::Result<GetFlowsRequest> {
    let mut base = FlowFilter {
        source_pod: a.from_pod.clone(),
        destination_pod: a.to_pod.clone(),
        source_label: a.from_label.clone(),
        destination_label: a.to_label.clone(),
        source_ip: a.from_ip.clone(),
        destination_ip: a.to_ip.clone(),
        destination_port: a.to_port.clone(),
        destination_fqdn: a.to_fqdn.clone(),
        protocol: a.protocol.clone(),
        http_method: a.http_method.clone(),
        http_path: a.http_path.clone(),
        http_status_code: a.http_status.clone(),
        dns_query: a.dns_query.clone(),
        ..FlowFilter::default()
    };
    for v in &a.verdict {
        base.verdict.push(enum_value("verdict", v, |s| fpb::Verdict::from_str_name(s).map(|v| v as i32))?);
    }
    for d in &a.traffic_direction {
        base.traffic_direction
            .push(enum_value("traffic-direction", d, |s| fpb::TrafficDirection::from_str_name(s).map(|v| v as i32))?);
    }
    for t in &a.event_type {
        let r#type = match t.to_ascii_lowercase().as_str() {
            "drop" => 1,
            "policy-verdict" => 5,
            "l7" | "access-log" => 129,
            other => bail!("--type: unknown event type {other:?} (drop, policy-verdict, l7)"),
        };
        base.event_type.push(fpb::EventTypeFilter { r#type, ..Default::default() });
    }
    let namespaces = a.namespace.iter().map(|n| format!("{}/", n.trim_end_matches('/')));
    let pods: Vec<String> = a.pod.iter().cloned().chain(namespaces).collect();
    let either = !(pods.is_empty() && a.label.is_empty() && a.ip.is_empty() && a.identity.is_empty());
    let whitelist = if either {
        let mut from = base.clone();
        from.source_pod.extend(pods.iter().cloned());
        from.source_label.extend(a.label.iter().cloned());
        from.source_ip.extend(a.ip.iter().cloned());
        from.source_identity.extend(&a.identity);
        let mut to = base;
        to.destination_pod.extend(pods);
        to.destination_label.extend(a.label.iter().cloned());
        to.destination_ip.extend(a.ip.iter().cloned());
        to.destination_identity.extend(&a.identity);
        vec![from, to]
    } else if base == FlowFilter::default() {
        vec![]
    } else {
        vec![base]
    };
    Ok(GetFlowsRequest {
        number: a.first.or(a.last).unwrap_or(0),
        first: a.first.is_some(),
        follow: a.follow,
        whitelist,
        since: a.since.as_deref().map(|v| time_flag("since", v)).transpose()?,
        until: a.until.as_deref().map(|v| time_flag("until", v)).transpose()?,
        ..GetFlowsRequest::default()
    })
}

/// Prints one response (and flushes: a follower sees each flow as it comes).
/// Prints one response and flushes: for the Hubble API's stream, a message at a time.
fn print(output: ObserveOutput, r: GetFlowsResponse) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    write(&mut out, output, r)?;
    out.flush()?;
    Ok(())
}

/// Writes one response (the caller flushes).
fn write(out: &mut impl std::io::Write, output: ObserveOutput, r: GetFlowsResponse) -> anyhow::Result<()> {
    if output == ObserveOutput::Json {
        serde_json::to_writer(&mut *out, &r).map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    match r.response_types {
        Some(ResponseTypes::Flow(f)) => {
            let f = porin_hubble::convert::from_pb(f);
            match output {
                ObserveOutput::Table => writeln!(out, "{}", crate::render::row(&f))?,
                _ => writeln!(out, "{} {}", f.time, crate::render::text(&f))?,
            }
        }
        Some(ResponseTypes::LostEvents(l)) => {
            let source = fpb::LostEventSource::try_from(l.source).map_or("unknown", |s| s.as_str_name());
            eprintln!("porin observe: {} flows lost ({source})", l.num_events_lost);
        }
        Some(ResponseTypes::NodeStatus(_)) | None => {}
    }
    Ok(())
}

async fn from_server(server: &str, req: GetFlowsRequest, output: ObserveOutput) -> anyhow::Result<()> {
    let mut client = porin_hubble::client::connect(server)
        .await
        .with_context(|| format!("connect to the Hubble API at {server}"))?;
    let mut stream =
        client.get_flows(req).await.map_err(|s| anyhow::anyhow!("{server}: {}", s.message()))?.into_inner();
    while let Some(r) = stream.message().await.map_err(|s| anyhow::anyhow!("{server}: {}", s.message()))? {
        print(output, r)?;
    }
    Ok(())
}

/// Reads a control socket's records, filtered here (no ring, no ids: a single process's backlog).
/// Following a proxy takes its record stream; an agent's socket is asked again every 200 ms.
fn from_socket(
    socket: &std::path::Path,
    req: &GetFlowsRequest,
    output: ObserveOutput,
    stream: bool,
) -> anyhow::Result<()> {
    let filters = Filters::new(&req.whitelist, &req.blacklist)?;
    let (mut after, mut first) = (0, true);
    loop {
        let r = crate::agent::control(socket, &Request::Flows { after, limit: None })
            .with_context(|| format!("read {}", socket.display()))?;
        let Reply::Flows { epoch, last, missed, flows } = r else {
            bail!("{}: not a flows reply: {r:?}", socket.display());
        };
        if missed > 0 {
            eprintln!("porin observe: {missed} records from {} were let go before they were read", socket.display());
        }
        after = last;
        let mut picked: Vec<_> = flows.iter().filter(|f| filters.admit(f, "", "")).collect();
        if first && req.number > 0 {
            let n = usize::try_from(req.number).unwrap_or(usize::MAX);
            if req.first {
                picked.truncate(n);
            } else {
                picked.drain(..picked.len().saturating_sub(n));
            }
        }
        write_flows(output, picked)?;
        first = false;
        if !req.follow {
            return Ok(());
        }
        if stream {
            return follow_stream(socket, after, epoch, &filters, output);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Follows a proxy's record stream from record `after` of run `epoch`; a stream that ends (the
/// proxy restarting, this terminal paused past the proxy's patience) is followed again from where
/// it stopped, and what the proxy let go meanwhile is said.
fn follow_stream(
    socket: &std::path::Path,
    mut after: u64,
    mut epoch: u64,
    filters: &Filters,
    output: ObserveOutput,
) -> anyhow::Result<()> {
    let mut reader = porin_flow::stream::StreamReader::connect(socket, after, epoch)?;
    loop {
        let mut batch = match reader.next_batch() {
            Ok(b) => b,
            Err(e) => {
                eprintln!("porin observe: {e}; following {} again", socket.display());
                std::thread::sleep(Duration::from_millis(500));
                match porin_flow::stream::StreamReader::connect(socket, after, epoch) {
                    Ok(r) => reader = r,
                    Err(e) => eprintln!("porin observe: {e}"),
                }
                continue;
            }
        };
        if batch.epoch != epoch && epoch != 0 {
            eprintln!("porin observe: {} restarted: its records start again", socket.display());
        }
        epoch = batch.epoch;
        after = batch.records.last().map_or(batch.last, |r| r.seq);
        if batch.missed > 0 {
            eprintln!(
                "porin observe: {} records from {} were let go before they were read",
                batch.missed,
                socket.display()
            );
        }
        // Records whose verdict no filter takes go before their flows are built (a record whose
        // verdict is unknown is kept: reading it reports it).
        batch
            .records
            .retain(|r| porin_flow::flow::Verdict::from_number(r.verdict).is_none_or(|v| filters.may_admit_verdict(v)));
        let mut errors = Vec::new();
        let admitted = batch.flows().filter_map(|f| match f {
            Ok(f) => filters.admit(&f, "", "").then_some(f),
            Err(e) => {
                errors.push(e);
                None
            }
        });
        write_flows(output, admitted)?;
        for e in errors {
            eprintln!("porin observe: {}: {e}", socket.display());
        }
    }
}

/// Writes flows read from a control socket, then flushes.
fn write_flows(
    output: ObserveOutput,
    flows: impl IntoIterator<Item = impl std::borrow::Borrow<porin_flow::flow::Flow>>,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::BufWriter::with_capacity(64 << 10, std::io::stdout().lock());
    for f in flows {
        let pb = porin_hubble::convert::to_pb(f.borrow(), String::new(), "");
        let time = pb.time;
        write(
            &mut out,
            output,
            GetFlowsResponse { response_types: Some(ResponseTypes::Flow(pb)), node_name: String::new(), time },
        )?;
    }
    out.flush()?;
    Ok(())
}

/// `porin observe`: a reader that stopped reading (`| head`) ends it quietly.
pub fn observe(a: &ObserveArgs) -> anyhow::Result<ExitCode> {
    match observe_inner(a) {
        Err(e) if e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) => {
            Ok(ExitCode::SUCCESS)
        }
        other => other,
    }
}

fn observe_inner(a: &ObserveArgs) -> anyhow::Result<ExitCode> {
    let req = request(a)?;
    if a.output == ObserveOutput::Table {
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), "{}", crate::render::TABLE_HEADER)?;
    }
    if let Some(socket) = a.proxy.as_ref().or(a.agent.as_ref()) {
        from_socket(socket, &req, a.output, a.proxy.is_some())?;
        return Ok(ExitCode::SUCCESS);
    }
    #[cfg(feature = "lab")]
    let servers = match &a.lab {
        Some(lab) => lab_servers(lab, a.node.as_deref())?,
        None => vec![a.server.clone()],
    };
    #[cfg(not(feature = "lab"))]
    let servers = vec![a.server.clone()];
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    match servers.as_slice() {
        [one] => rt.block_on(from_server(one, req, a.output))?,
        _ => rt.block_on(from_servers(&servers, req, a.output))?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The Hubble sockets of a lab's nodes (one node's with `node`).
#[cfg(feature = "lab")]
fn lab_servers(lab: &str, node: Option<&str>) -> anyhow::Result<Vec<String>> {
    let st = crate::lab::load_state(lab)?;
    let nodes = match node {
        Some(_) => vec![st.node(node)?.name.clone()],
        None => st.nodes.iter().map(|n| n.name.clone()).collect(),
    };
    Ok(nodes.iter().map(|n| format!("unix:{}", crate::lab::LabPaths::node(lab, n).hubble().display())).collect())
}

/// How long a merged follow holds a response back so that one from a slower node can still come
/// before it (what arrives later than this is written as it comes).
const MERGE_WINDOW: Duration = Duration::from_millis(200);

/// Several nodes' Hubble APIs as one, like Hubble Relay: each node is asked the same; what they
/// have is merged in time order (`--last N` / `--first N`: of the merged flows), and a follow writes
/// each node's flows (its last N first, when asked) in time order within [`MERGE_WINDOW`]. A node
/// that cannot be read fails the whole command, naming it, after what was held is written.
async fn from_servers(servers: &[String], req: GetFlowsRequest, output: ObserveOutput) -> anyhow::Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<anyhow::Result<Option<GetFlowsResponse>>>(4096);
    for server in servers {
        let (server, req, tx) = (server.clone(), req.clone(), tx.clone());
        tokio::spawn(async move {
            let result = async {
                let mut client = porin_hubble::client::connect(&server)
                    .await
                    .with_context(|| format!("connect to the Hubble API at {server}"))?;
                let mut stream =
                    client.get_flows(req).await.map_err(|s| anyhow::anyhow!("{server}: {}", s.message()))?.into_inner();
                while let Some(r) = stream.message().await.map_err(|s| anyhow::anyhow!("{server}: {}", s.message()))? {
                    if tx.send(Ok(Some(r))).await.is_err() {
                        break;
                    }
                }
                anyhow::Ok(())
            }
            .await;
            // Ok(None): this node is done.
            drop(tx.send(result.map(|()| None)).await);
        });
    }
    drop(tx);
    let key = |r: &GetFlowsResponse| r.time.as_ref().map_or((0, 0), |t| (t.seconds, t.nanos));
    if !req.follow {
        let mut all = Vec::new();
        while let Some(r) = rx.recv().await {
            if let Some(r) = r? {
                all.push(r);
            }
        }
        all.sort_by_key(key);
        let n = usize::try_from(req.number).unwrap_or(usize::MAX);
        if req.number > 0 && all.len() > n {
            if req.first {
                all.truncate(n);
            } else {
                all.drain(..all.len() - n);
            }
        }
        for r in all {
            print(output, r)?;
        }
        return Ok(());
    }
    // Following: hold each response for the window, write the oldest first.
    let mut held: std::collections::BTreeMap<((i64, i32), u64), (tokio::time::Instant, GetFlowsResponse)> =
        std::collections::BTreeMap::new();
    let (mut n, mut open) = (0u64, servers.len());
    let mut tick = tokio::time::interval(MERGE_WINDOW / 4);
    while open > 0 || !held.is_empty() {
        tokio::select! {
            r = rx.recv(), if open > 0 => match r {
                Some(Ok(Some(r))) => {
                    n += 1;
                    held.insert((key(&r), n), (tokio::time::Instant::now(), r));
                }
                Some(Ok(None)) => {
                    open -= 1;
                    eprintln!("porin observe: a node ended its stream; {open} still followed");
                }
                Some(Err(e)) => {
                    // What was held is written before saying why the rest is not.
                    while let Some((_, (_, r))) = held.pop_first() {
                        print(output, r)?;
                    }
                    return Err(e);
                }
                None => open = 0,
            },
            _ = tick.tick() => {
                let now = tokio::time::Instant::now();
                while let Some(entry) = held.first_entry() {
                    if open > 0 && now.duration_since(entry.get().0) < MERGE_WINDOW {
                        break;
                    }
                    print(output, entry.remove().1)?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        a: ObserveArgs,
    }

    fn req(args: &[&str]) -> GetFlowsRequest {
        let cli = Cli::try_parse_from(std::iter::once("observe").chain(args.iter().copied())).unwrap();
        request(&cli.a).unwrap()
    }

    #[test]
    fn flags_become_hubbles_filters() {
        assert_eq!(req(&[]).whitelist, vec![]);
        let r =
            req(&["--from-pod", "default/tie", "--http-method", "PUT", "--verdict", "dropped", "--last", "5", "-f"]);
        assert_eq!((r.number, r.first, r.follow), (5, false, true));
        assert_eq!(r.whitelist.len(), 1);
        let f = &r.whitelist[0];
        assert_eq!(
            (f.source_pod.clone(), f.http_method.clone()),
            (vec!["default/tie".to_owned()], vec!["PUT".to_owned()])
        );
        assert_eq!(f.verdict, vec![fpb::Verdict::Dropped as i32]);
        // Either side: two filters, each with the one-sided flags.
        let r = req(&["--pod", "xwing", "--namespace", "prod", "--protocol", "http"]);
        assert_eq!(r.whitelist.len(), 2);
        assert_eq!(r.whitelist[0].source_pod, ["xwing", "prod/"]);
        assert_eq!(r.whitelist[1].destination_pod, ["xwing", "prod/"]);
        assert!(r.whitelist.iter().all(|f| f.protocol == ["http"]));
        let r = req(&["--first", "3", "--since", "5m", "--type", "drop"]);
        assert!(r.first && r.number == 3 && r.since.is_some());
        assert_eq!(r.whitelist[0].event_type[0].r#type, 1);
        let bad = Cli::try_parse_from(["observe", "--verdict", "MAYBE"]).unwrap();
        assert!(request(&bad.a).unwrap_err().to_string().contains("--verdict"));
        let bad = Cli::try_parse_from(["observe", "--since", "yesterday"]).unwrap();
        assert!(request(&bad.a).unwrap_err().to_string().contains("--since"));
    }
}
