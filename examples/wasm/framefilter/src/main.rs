//! `framefilter`: a filter over raw video frames, the per-segment step of a transcoding job.
//! Reads `yuv420p` frames (the layout `ffmpeg -f rawvideo -pix_fmt yuv420p` writes) from
//! stdin and writes the filtered frames to stdout.
//!
//!   framefilter WIDTH HEIGHT gray   drop the colour (chroma planes to 128)
//!   framefilter WIDTH HEIGHT blur   3x3 box blur of the luma plane
//!   framefilter WIDTH HEIGHT half   halve both dimensions (2x2 averages), a cheap thumbnail
//!
//! Run on its own:
//!   cargo build --release --target wasm32-wasip1 --manifest-path examples/wasm/Cargo.toml
//!   ffmpeg -f lavfi -i testsrc=size=320x240:rate=10 -t 1 -f rawvideo -pix_fmt yuv420p - \
//!     | wasmtime target/wasm32-wasip1/release/framefilter.wasm 320 240 half \
//!     | ffmpeg -f rawvideo -pix_fmt yuv420p -s 160x120 -i - half.mp4

use std::io::{Read, Write};
use std::process::ExitCode;

#[derive(Clone, Copy)]
enum Op {
    Gray,
    Blur,
    Half,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (w, h, op) = match parse(&args) {
        Ok(v) => v,
        Err(msg) => {
            eprintln!("framefilter: {msg}\nusage: framefilter WIDTH HEIGHT gray|blur|half");
            return ExitCode::from(2);
        }
    };
    let frame = w * h * 3 / 2;
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        eprintln!("framefilter: cannot read stdin: {e}");
        return ExitCode::from(1);
    }
    if input.len() % frame != 0 {
        eprintln!(
            "framefilter: {} bytes is not a whole number of {w}x{h} yuv420p frames ({frame} bytes each)",
            input.len()
        );
        return ExitCode::from(1);
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for f in input.chunks_exact(frame) {
        let filtered = match op {
            Op::Gray => gray(f, w, h),
            Op::Blur => blur(f, w, h),
            Op::Half => half(f, w, h),
        };
        if out.write_all(&filtered).is_err() {
            return ExitCode::from(1);
        }
    }
    if out.flush().is_err() {
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

fn parse(args: &[String]) -> Result<(usize, usize, Op), String> {
    let [w, h, op] = args else {
        return Err(format!("expected 3 arguments, got {}", args.len()));
    };
    let dim = |s: &str, what: &str| -> Result<usize, String> {
        match s.parse::<usize>() {
            // Multiples of 4 keep the halved frame's chroma planes whole.
            Ok(v) if (4..=8192).contains(&v) && v % 4 == 0 => Ok(v),
            _ => Err(format!(
                "{what} must be a multiple of 4 in 4..=8192, got `{s}`"
            )),
        }
    };
    let op = match op.as_str() {
        "gray" => Op::Gray,
        "blur" => Op::Blur,
        "half" => Op::Half,
        other => return Err(format!("unknown filter `{other}`")),
    };
    Ok((dim(w, "WIDTH")?, dim(h, "HEIGHT")?, op))
}

/// The luma plane, then the two quarter-size chroma planes.
fn planes(f: &[u8], w: usize, h: usize) -> (&[u8], &[u8], &[u8]) {
    let (y, uv) = f.split_at(w * h);
    let (u, v) = uv.split_at(w * h / 4);
    (y, u, v)
}

fn gray(f: &[u8], w: usize, h: usize) -> Vec<u8> {
    let mut out = f.to_vec();
    out[w * h..].fill(128);
    out
}

fn blur(f: &[u8], w: usize, h: usize) -> Vec<u8> {
    let (y, _, _) = planes(f, w, h);
    let mut out = f.to_vec();
    for r in 0..h {
        for c in 0..w {
            let (mut sum, mut n) = (0u32, 0u32);
            for rr in r.saturating_sub(1)..=(r + 1).min(h - 1) {
                for cc in c.saturating_sub(1)..=(c + 1).min(w - 1) {
                    sum += u32::from(y[rr * w + cc]);
                    n += 1;
                }
            }
            out[r * w + c] = ((sum + n / 2) / n) as u8;
        }
    }
    out
}

fn half(f: &[u8], w: usize, h: usize) -> Vec<u8> {
    let (y, u, v) = planes(f, w, h);
    let mut out = Vec::with_capacity(w * h * 3 / 8);
    shrink(y, w, h, &mut out);
    shrink(u, w / 2, h / 2, &mut out);
    shrink(v, w / 2, h / 2, &mut out);
    out
}

/// Appends `plane` (w x h, both even) at half size.
fn shrink(plane: &[u8], w: usize, h: usize, out: &mut Vec<u8>) {
    for r in (0..h).step_by(2) {
        for c in (0..w).step_by(2) {
            let s = u32::from(plane[r * w + c])
                + u32::from(plane[r * w + c + 1])
                + u32::from(plane[(r + 1) * w + c])
                + u32::from(plane[(r + 1) * w + c + 1]);
            out.push(((s + 2) / 4) as u8);
        }
    }
}
