//! `porin-tunnel-rate`: how fast new flows open through the mTLS tunnel, with the pool warm (one
//! connection to the destination node carries every stream) or cold (every flow opens its own
//! connection: TCP, the TLS 1.3 handshake with client certificate, HTTP/2, then the stream).
//! Each flow is one `GET /` over its stream, read to the end (the destination's proxy relays it).
//!
//! `porin-tunnel-rate CREDENTIALS NODE NODE_ADDR IDENTITY CLIENT_IP DEST SECS CONNS warm|cold`
//! (run in the source node's network namespace, with its credentials file): prints flows per
//! second.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use proxy::tunnel::client::Pool;
use proxy::tunnel::credentials::{self, Tls};
use proxy::tunnel::target::Target;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

struct Args {
    tls: Tls,
    node: String,
    node_addr: SocketAddr,
    identity: u32,
    client: IpAddr,
    dest: SocketAddr,
    secs: u64,
    conns: usize,
    cold: bool,
}

fn args() -> Result<Args, String> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let [creds, node, node_addr, identity, client, dest, secs, conns, mode] = a.as_slice() else {
        return Err(
            "usage: porin-tunnel-rate CREDENTIALS NODE NODE_ADDR IDENTITY CLIENT_IP DEST SECS CONNS warm|cold".into()
        );
    };
    let file = credentials::read(std::path::Path::new(creds)).map_err(|e| e.to_string())?;
    let bad = |what: &str, v: &str| format!("{what}: {v:?}");
    Ok(Args {
        tls: Tls::build(&file, 1).map_err(|e| e.to_string())?,
        node: node.clone(),
        node_addr: node_addr.parse().map_err(|_| bad("NODE_ADDR", node_addr))?,
        identity: identity.parse().map_err(|_| bad("IDENTITY", identity))?,
        client: client.parse().map_err(|_| bad("CLIENT_IP", client))?,
        dest: dest.parse().map_err(|_| bad("DEST", dest))?,
        secs: secs.parse().map_err(|_| bad("SECS", secs))?,
        conns: conns.parse().map_err(|_| bad("CONNS", conns))?,
        cold: match mode.as_str() {
            "cold" => true,
            "warm" => false,
            m => return Err(bad("mode (warm or cold)", m)),
        },
    })
}

/// One flow: a stream, `GET /`, the answer read to its end.
async fn flow(a: &Args, pool: &Pool, opened: &AtomicU64) -> Result<(), String> {
    let target = Target { destination: a.dest, client: SocketAddr::new(a.client, 0) };
    let up = pool.open(&a.tls, &a.node, a.node_addr, a.identity, target, opened).await.map_err(|e| e.to_string())?;
    let mut io = up;
    io.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").await.map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    io.read_to_end(&mut answer).await.map_err(|e| e.to_string())?;
    if answer.starts_with(b"HTTP/1.1 200") { Ok(()) } else { Err(String::from_utf8_lossy(&answer).into_owned()) }
}

async fn run(a: Arc<Args>) -> (f64, u64, u64, Option<String>) {
    let shared = Arc::new(Pool::new(Duration::from_secs(3)));
    let (done, failed, opened) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let first_error = Arc::new(std::sync::Mutex::new(None));
    let until = Instant::now() + Duration::from_secs(a.secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a.conns {
        let (a, shared, done, failed, opened, first_error) =
            (a.clone(), shared.clone(), done.clone(), failed.clone(), opened.clone(), first_error.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                // Cold: a pool of its own per flow, dropped after it (its connection closes).
                let own = a.cold.then(|| Pool::new(Duration::from_secs(3)));
                match flow(&a, own.as_ref().unwrap_or(&shared), &opened).await {
                    Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        if let Ok(mut f) = first_error.lock() {
                            f.get_or_insert(e);
                        }
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    for t in tasks {
        if let Err(e) = t.await {
            eprintln!("a load task failed: {e}");
        }
    }
    let rate = done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    let error = first_error.lock().ok().and_then(|mut f| f.take());
    (rate, failed.load(Ordering::Relaxed), opened.load(Ordering::Relaxed), error)
}

fn main() {
    let a = match args() {
        Ok(a) => Arc::new(a),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            std::process::exit(1);
        }
    };
    let (rate, failed, opened, error) = rt.block_on(run(a));
    eprintln!("tunnel connections opened: {opened}; failed flows: {failed}");
    if let Some(e) = error {
        eprintln!("first failure: {e}");
        std::process::exit(1);
    }
    println!("{rate:.0}");
}
