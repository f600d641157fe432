//! Caller-supplied text made fit for error messages, shared by every role so a 1 MB name never
//! becomes a 1 MB error and a status message never outgrows the header that carries it.

/// Longest message put in a gRPC status or an HTTP error body: it travels in a header
/// (`grpc-message`), which a peer refuses past its header-list limit.
pub const MAX_ERROR_MESSAGE: usize = 2048;

/// `msg` cut to [`MAX_ERROR_MESSAGE`] bytes on a character boundary (whatever it quotes).
pub fn clip_message(mut msg: String) -> String {
    if msg.len() > MAX_ERROR_MESSAGE {
        truncate_chars(&mut msg, MAX_ERROR_MESSAGE - 3);
        msg.push('…');
    }
    msg
}

/// Checks a tenant, function or job name: 1–63 of `[a-z0-9-]`, not starting with '-'
/// (names travel in URLs, logs and file names).
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} name {} must be 1-63 characters of a-z, 0-9 and '-', not starting with '-'",
            shown(name)
        ))
    }
}

/// Cuts `s` to at most `max` bytes, on a character boundary.
pub fn truncate_chars(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// A caller-supplied string fit to quote in an error: at most 64 characters, control
/// characters escaped, with its length when cut.
pub fn shown(s: &str) -> String {
    const MAX: usize = 64;
    let mut out = String::from("`");
    for (i, c) in s.chars().enumerate() {
        if i == MAX {
            out.push_str(&format!("…` ({} bytes)", s.len()));
            return out;
        }
        out.extend(c.escape_debug());
    }
    out.push('`');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_cut_on_a_character_boundary() {
        let m = clip_message("é".repeat(5000));
        assert!(m.len() <= MAX_ERROR_MESSAGE);
        assert!(m.ends_with('…'));
        let s = shown(&"x\n".repeat(100));
        assert!(s.contains("\\n") && s.contains("(200 bytes)"), "{s}");
        assert_eq!(shown("f"), "`f`");
    }
}
