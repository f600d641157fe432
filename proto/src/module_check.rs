//! What a deployable function module is, checked before it is stored: a valid WebAssembly
//! core module (not a component), a WASI preview 1 command (`_start`, no other imports)
//! whose declared memory fits the function's limit. The control plane refuses anything
//! else at deploy with the reason, and the CLI checks before uploading, so a bad module never
//! reaches a worker to hang every call; the worker's compile stays the final word (a module
//! can still use a proposal this worker's engine lacks: that is a load failure, reported).

use wasmparser::{Parser, Payload, TypeRef, Validator, WasmFeatures, types::EntityType};

/// The only module a function may import from.
pub const WASI_P1_MODULE: &str = "wasi_snapshot_preview1";

/// The functions WASI preview 1 defines (the worker's linker provides exactly these).
pub const WASI_P1_FUNCTIONS: [&str; 46] = [
    "args_get",
    "args_sizes_get",
    "environ_get",
    "environ_sizes_get",
    "clock_res_get",
    "clock_time_get",
    "fd_advise",
    "fd_allocate",
    "fd_close",
    "fd_datasync",
    "fd_fdstat_get",
    "fd_fdstat_set_flags",
    "fd_fdstat_set_rights",
    "fd_filestat_get",
    "fd_filestat_set_size",
    "fd_filestat_set_times",
    "fd_pread",
    "fd_prestat_get",
    "fd_prestat_dir_name",
    "fd_pwrite",
    "fd_read",
    "fd_readdir",
    "fd_renumber",
    "fd_seek",
    "fd_sync",
    "fd_tell",
    "fd_write",
    "path_create_directory",
    "path_filestat_get",
    "path_filestat_set_times",
    "path_link",
    "path_open",
    "path_readlink",
    "path_remove_directory",
    "path_rename",
    "path_symlink",
    "path_unlink_file",
    "poll_oneoff",
    "proc_exit",
    "proc_raise",
    "sched_yield",
    "random_get",
    "sock_accept",
    "sock_recv",
    "sock_send",
    "sock_shutdown",
];

/// The smallest module the check accepts: one page of memory and a `_start` that returns
/// at once (placement benchmarks and tests deploy it; a worker can run it).
pub const MINIMAL_COMMAND: &[u8] = &[
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // \0asm, version 1
    0x01, 0x04, 0x01, 0x60, 0x00, 0x00, // types: [] -> []
    0x03, 0x02, 0x01, 0x00, // functions: one of type 0
    0x05, 0x03, 0x01, 0x00, 0x01, // memories: one, at least one page
    0x07, 0x0a, 0x01, 0x06, b'_', b's', b't', b'a', b'r', b't', 0x00, 0x00, // export _start
    0x0a, 0x04, 0x01, 0x02, 0x00, 0x0b, // code: an empty body
];

/// Why a module cannot be deployed; each says what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleError {
    /// Not WebAssembly at all.
    NotWasm,
    /// A component (WASI preview 2), not a core module.
    Component,
    /// Truncated or invalid WebAssembly.
    Invalid(String),
    /// No `_start` export, or not a function of no parameters and results.
    NoStart,
    /// An import that is not a WASI preview 1 function.
    Import {
        /// The import's module.
        module: String,
        /// The import's name.
        name: String,
    },
    /// More than one memory or table (an instance gets one of each).
    TooMany {
        /// `memories` or `tables`.
        what: &'static str,
        /// How many the module has.
        count: u32,
    },
    /// A shared (threads) or 64-bit memory.
    MemoryKind(&'static str),
    /// The memory's declared minimum is above the function's memory limit.
    MemoryMinimum {
        /// The minimum, bytes.
        minimum_bytes: u64,
        /// The limit, MiB.
        limit_mib: u32,
    },
}

impl std::fmt::Display for ModuleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModuleError::NotWasm => write!(
                f,
                "the module is not WebAssembly (no \\0asm header); build it with `cargo build --target wasm32-wasip1 --release`"
            ),
            ModuleError::Component => write!(
                f,
                "the module is a WebAssembly component (WASI preview 2); StellarCloud runs WASI preview 1 core modules: build with `--target wasm32-wasip1`"
            ),
            ModuleError::Invalid(e) => write!(f, "the module is not valid WebAssembly: {e}"),
            ModuleError::NoStart => write!(
                f,
                "the module exports no `_start` function taking and returning nothing; a function is a WASI command (a `fn main` built for wasm32-wasip1)"
            ),
            ModuleError::Import { module, name } => write!(
                f,
                "the module imports `{}::{}`; a function may import only WASI preview 1 functions ({WASI_P1_MODULE})",
                clip(module),
                clip(name)
            ),
            ModuleError::TooMany { what, count } => {
                write!(f, "the module has {count} {what}; at most one is allowed")
            }
            ModuleError::MemoryKind(kind) => {
                write!(
                    f,
                    "the module's memory is {kind}; only a 32-bit unshared memory is supported"
                )
            }
            ModuleError::MemoryMinimum {
                minimum_bytes,
                limit_mib,
            } => write!(
                f,
                "the module's memory starts at {} MiB but the function's limit is {limit_mib} MiB; raise --memory or shrink the module's initial memory",
                minimum_bytes.div_ceil(1 << 20)
            ),
        }
    }
}

impl std::error::Error for ModuleError {}

/// Names quoted from a module, cut short (a 1 MB import name is not an error message).
fn clip(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}…", &s[..end]),
        None => s.to_string(),
    }
}

/// Checks `wasm` as a function module for an instance limited to `memory_limit_mib`.
pub fn check_module(wasm: &[u8], memory_limit_mib: u32) -> Result<(), ModuleError> {
    if !wasm.starts_with(b"\0asm") {
        return Err(ModuleError::NotWasm);
    }
    if Parser::is_component(wasm) {
        return Err(ModuleError::Component);
    }
    let types = Validator::new_with_features(WasmFeatures::default())
        .validate_all(wasm)
        .map_err(|e| ModuleError::Invalid(e.to_string()))?;
    let types = types.as_ref();
    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload.map_err(|e| ModuleError::Invalid(e.to_string()))?;
        if let Payload::ImportSection(reader) = payload {
            for import in reader.into_imports() {
                let import = import.map_err(|e| ModuleError::Invalid(e.to_string()))?;
                let wasi = import.module == WASI_P1_MODULE
                    && matches!(import.ty, TypeRef::Func(_))
                    && WASI_P1_FUNCTIONS.contains(&import.name);
                if !wasi {
                    return Err(ModuleError::Import {
                        module: import.module.to_string(),
                        name: import.name.to_string(),
                    });
                }
            }
        }
    }
    let start = types.core_exports().and_then(|mut exports| {
        exports.find_map(|(name, ty)| match (name, ty) {
            ("_start", EntityType::Func(id)) => Some(id),
            _ => None,
        })
    });
    match start.map(|id| types[id].unwrap_func()) {
        Some(f) if f.params().is_empty() && f.results().is_empty() => {}
        _ => return Err(ModuleError::NoStart),
    }
    for (what, count) in [
        ("memories", types.memory_count()),
        ("tables", types.table_count()),
    ] {
        if count > 1 {
            return Err(ModuleError::TooMany { what, count });
        }
    }
    if types.memory_count() == 1 {
        let m = types.memory_at(0);
        if m.shared {
            return Err(ModuleError::MemoryKind("shared (threads)"));
        }
        if m.memory64 {
            return Err(ModuleError::MemoryKind("64-bit"));
        }
        let minimum_bytes = m.initial.saturating_mul(1 << m.page_size_log2());
        if minimum_bytes > u64::from(memory_limit_mib) << 20 {
            return Err(ModuleError::MemoryMinimum {
                minimum_bytes,
                limit_mib: memory_limit_mib,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal WASI command: one memory of `pages` pages, `_start`, and `imports`.
    fn module(pages: u32, imports: &str, start: &str) -> Vec<u8> {
        // Hand-assembled: type section, import section (when given), function, memory,
        // export, code. Kept tiny so the tests need no assembler.
        let mut types = vec![0x60, 0x00, 0x00]; // type 0: [] -> []
        types.extend([0x60, 0x01, 0x7f, 0x00]); // type 1: [i32] -> []
        let mut m = b"\0asm\x01\0\0\0".to_vec();
        section(&mut m, 1, &[&[2], types.as_slice()].concat());
        if !imports.is_empty() {
            let (module, name) = imports.split_once("::").unwrap();
            let mut body = vec![1];
            body.extend(name_bytes(module));
            body.extend(name_bytes(name));
            body.extend([0x00, 0x01]); // func of type 1
            section(&mut m, 2, &body);
        }
        section(&mut m, 3, &[1, 0]); // one function of type 0
        section(&mut m, 5, &[1, 0x00, pages as u8]); // one memory, min `pages`
        let mut exports = vec![1];
        exports.extend(name_bytes(start));
        exports.extend([0x00, if imports.is_empty() { 0 } else { 1 }]);
        section(&mut m, 7, &exports);
        section(&mut m, 10, &[1, 2, 0, 0x0b]); // one body: no locals, end
        m
    }

    fn name_bytes(s: &str) -> Vec<u8> {
        let mut v = vec![s.len() as u8];
        v.extend(s.as_bytes());
        v
    }

    fn section(m: &mut Vec<u8>, id: u8, body: &[u8]) {
        m.push(id);
        m.push(body.len() as u8);
        m.extend_from_slice(body);
    }

    #[test]
    fn the_minimal_command_passes() {
        assert_eq!(check_module(MINIMAL_COMMAND, 1), Ok(()));
    }

    #[test]
    fn a_wasi_command_passes_and_each_fault_is_named() {
        let good = module(1, "wasi_snapshot_preview1::proc_exit", "_start");
        assert_eq!(check_module(&good, 16), Ok(()));
        assert_eq!(check_module(b"hello", 16), Err(ModuleError::NotWasm));
        let truncated = &good[..good.len() - 3];
        assert!(matches!(
            check_module(truncated, 16),
            Err(ModuleError::Invalid(_))
        ));
        assert_eq!(
            check_module(&module(1, "", "main"), 16),
            Err(ModuleError::NoStart)
        );
        assert_eq!(
            check_module(&module(1, "env::abort", "_start"), 16),
            Err(ModuleError::Import {
                module: "env".into(),
                name: "abort".into()
            })
        );
        assert!(matches!(
            check_module(
                &module(1, "wasi_snapshot_preview1::not_a_call", "_start"),
                16
            ),
            Err(ModuleError::Import { .. })
        ));
        // 32 pages = 2 MiB against a 1 MiB limit.
        let e = check_module(&module(32, "", "_start"), 1).unwrap_err();
        assert_eq!(
            e,
            ModuleError::MemoryMinimum {
                minimum_bytes: 2 << 20,
                limit_mib: 1
            }
        );
        assert!(e.to_string().contains("2 MiB"), "{e}");
        let component = b"\0asm\x0d\0\x01\0";
        assert_eq!(check_module(component, 16), Err(ModuleError::Component));
        assert!(ModuleError::Component.to_string().contains("wasm32-wasip1"));
    }
}
