//! Runs the test API server until killed, for poking it with kubectl: prints the kubeconfig path
//! (written to the directory given as the argument, else `$TMPDIR/porin-apiserver-<pid>`).
//! `PORIN_TEST_APISERVER_LOG=1` prints every request on stderr.

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join(format!("porin-apiserver-{}", std::process::id())));
    std::fs::create_dir_all(&dir).expect("directory");
    let server = porin_tests::apiserver::ApiServer::start();
    println!("{}", server.kubeconfig(&dir).display());
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
