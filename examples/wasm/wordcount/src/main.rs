//! `wordcount`: word frequencies of the text on stdin, most frequent first, as
//! `count<TAB>word` lines. Words are runs of letters, digits or apostrophes, lower-cased.
//! `--top N` (argument) keeps the N most frequent; ties sort alphabetically, so the output
//! (and the fuel it costs) is the same on every node.
//!
//! Run on its own:
//!   cargo build --release --target wasm32-wasip1 --manifest-path examples/wasm/Cargo.toml
//!   wasmtime target/wasm32-wasip1/release/wordcount.wasm --top 5 < README.md

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let top = match args.as_slice() {
        [] => usize::MAX,
        [flag, n] if flag == "--top" => match n.parse() {
            Ok(n) => n,
            Err(_) => {
                eprintln!("wordcount: --top needs a number, got `{n}`");
                return ExitCode::from(2);
            }
        },
        _ => {
            eprintln!("usage: wordcount [--top N] < text");
            return ExitCode::from(2);
        }
    };
    let mut text = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut text) {
        eprintln!("wordcount: cannot read stdin: {e}");
        return ExitCode::from(1);
    }
    let text = String::from_utf8_lossy(&text);
    // A BTreeMap, not a HashMap: std's hasher is seeded from WASI's random_get, which would
    // make the fuel an invocation costs differ from run to run.
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for word in text
        .split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .map(|w| w.trim_matches('\''))
        .filter(|w| !w.is_empty())
    {
        *counts.entry(word.to_lowercase()).or_default() += 1;
    }
    let mut ranked: Vec<(String, u64)> = counts.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (word, n) in ranked.into_iter().take(top) {
        if writeln!(out, "{n}\t{word}").is_err() {
            return ExitCode::from(1);
        }
    }
    if out.flush().is_err() {
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
