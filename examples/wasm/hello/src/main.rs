//! `hello`: greets whoever is named on stdin (or "world"), the smallest useful function.
//!
//! Run on its own:
//!   cargo build --release --target wasm32-wasip1 --manifest-path examples/wasm/Cargo.toml
//!   echo -n Ada | wasmtime target/wasm32-wasip1/release/hello.wasm
//! or through StellarCloud:
//!   stellar deploy examples/wasm/prebuilt/hello.wasm --name hello && stellar invoke hello --data Ada

use std::io::{Read, Write};

fn main() {
    let mut name = String::new();
    // A closed or absent stdin greets the world.
    let _ = std::io::stdin().read_to_string(&mut name);
    let name = name.trim();
    let name = if name.is_empty() { "world" } else { name };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "Hello, {name}!");
}
