//! `porin-rr`: request/response load for datapath benchmarks (netperf's TCP_RR / TCP_CRR shapes).
//!
//! * `porin-rr serve PORT` — a one-byte echo server.
//! * `porin-rr rr ADDR SECS CONNS` — CONNS connections, each sending one byte and waiting for it back,
//!   as fast as possible; prints transactions per second.
//! * `porin-rr crr ADDR SECS CONNS` — CONNS loops of connect, one-byte request/response, close; prints
//!   transactions (connections) per second.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

async fn serve(port: u16) -> std::io::Result<()> {
    let listener = TcpListener::bind(SocketAddr::from(([0u16; 8], port))).await?;
    loop {
        let (mut s, _) = listener.accept().await?;
        s.set_nodelay(true)?;
        tokio::spawn(async move {
            let mut b = [0u8; 1];
            while s.read_exact(&mut b).await.is_ok() {
                if s.write_all(&b).await.is_err() {
                    break;
                }
            }
        });
    }
}

async fn one_rr(s: &mut TcpStream) -> std::io::Result<()> {
    let mut b = [7u8; 1];
    s.write_all(&b).await?;
    s.read_exact(&mut b).await?;
    Ok(())
}

async fn load(mode: &str, addr: SocketAddr, secs: u64, conns: usize) -> std::io::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (done, errors, mode) = (done.clone(), errors.clone(), mode.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut keep: Option<TcpStream> = None;
            while Instant::now() < until {
                let r = async {
                    if mode == "crr" || keep.is_none() {
                        let s = TcpStream::connect(addr).await?;
                        s.set_nodelay(true)?;
                        keep = Some(s);
                    }
                    if let Some(s) = keep.as_mut() {
                        one_rr(s).await?;
                    }
                    if mode == "crr" {
                        keep = None;
                    }
                    Ok::<(), std::io::Error>(())
                }
                .await;
                match r {
                    Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => {
                        keep = None;
                        errors.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    let start = Instant::now();
    for t in tasks {
        let _ = t.await;
    }
    let e = errors.load(Ordering::Relaxed);
    if e > 0 {
        eprintln!("{e} failed transactions");
    }
    Ok(done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    match args.get(1).map(String::as_str) {
        Some("serve") => rt.block_on(serve(args.get(2).and_then(|p| p.parse().ok()).unwrap_or(5001))),
        Some(mode @ ("rr" | "crr")) => {
            let addr: SocketAddr = args.get(2).and_then(|a| a.parse().ok()).expect("ADDR");
            let secs = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(10);
            let conns = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(1);
            let tps = rt.block_on(load(mode, addr, secs, conns))?;
            println!("{tps:.0}");
            Ok(())
        }
        _ => {
            eprintln!("usage: porin-rr serve PORT | rr ADDR SECS CONNS | crr ADDR SECS CONNS");
            std::process::exit(2);
        }
    }
}
