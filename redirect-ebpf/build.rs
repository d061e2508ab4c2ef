//! Rebuild when `bpf-linker` changes (aya-template's approach: the linker is an undeclared tool
//! dependency of this crate).

fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(e) => println!("cargo:warning=bpf-linker not found ({e}); run scripts/setup.sh"),
    }
}
