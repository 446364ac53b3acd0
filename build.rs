//! Keep `libtorch_cuda` linked and find the torch libraries without environment variables.
//!
//! rustc links with `--as-needed`, which drops `libtorch_cuda.so` (nothing references its
//! symbols directly; it registers the CUDA backend from a static initialiser), so a binary would
//! never see a GPU. torch-sys exports the libtorch lib dir to crates that depend on it directly
//! (`DEP_TCH_LIBTORCH_LIB`); we add an rpath to it and link the torch libraries with
//! `--no-as-needed`. See `docs/libtorch.md`.
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=DEP_TCH_LIBTORCH_LIB not set by torch-sys; no rpath added");
        return;
    };
    println!("cargo:rustc-link-search=native={dir}");
    println!("cargo:rustc-link-arg=-Wl,-rpath={dir}");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    if Path::new(&dir).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-ltorch_cuda");
    }
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
}
