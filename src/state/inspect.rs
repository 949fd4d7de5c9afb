//! `hadal state inspect`: what a state file holds, in words.

use std::fmt::Write;

use super::file::Header;
use crate::inspect::bytes;

/// `YYYY-MM-DD hh:mm:ss UTC` of seconds since the Unix epoch.
pub fn utc(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A report on a checked file of `size` bytes; `model` is the fingerprint of a model to compare
/// with, and where it came from.
pub fn report(header: &Header, size: u64, model: Option<(&str, &str)>) -> String {
    let mut o = String::new();
    let sum = |pred: &dyn Fn(&str) -> bool| -> u64 {
        header
            .sections
            .iter()
            .filter(|s| pred(&s.name))
            .map(|s| s.bytes)
            .sum()
    };
    let _ = writeln!(
        o,
        "format      hadal state, version {}; {} in {} sections, every checksum matches",
        super::file::VERSION,
        bytes(size),
        header.sections.len()
    );
    let _ = write!(o, "model       {}", header.model);
    match model {
        Some((fp, from)) if fp == header.model => {
            let _ = write!(o, " (the model in {from})");
        }
        Some((fp, from)) => {
            let _ = write!(o, " (NOT the model in {from}, which is {fp})");
        }
        None => {}
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "written     {}", utc(header.created));
    let _ = write!(
        o,
        "position    {} tokens ({} token ids stored)",
        header.pos, header.tokens
    );
    if let Some(p) = &header.prompt {
        let _ = write!(o, "; its prompt ends at {} (restorable)", p.pos);
    }
    let _ = writeln!(o);
    let kinds = |attn: bool, index: bool| {
        header
            .blocks
            .iter()
            .filter(|b| b.attn.is_some() == attn && b.index.is_some() == index)
            .count()
    };
    let entries: usize = header
        .blocks
        .iter()
        .flat_map(|b| [b.attn, b.index])
        .flatten()
        .sum();
    let _ = writeln!(
        o,
        "blocks      {}: {} sliding-window only, {} with compressed attention and an indexer (CSA), {} with compressed attention only (HCA); {entries} compressed entries",
        header.blocks.len(),
        kinds(false, false),
        kinds(true, true),
        kinds(true, false),
    );
    let main = |n: &str| !n.starts_with("prompt.");
    let _ = writeln!(
        o,
        "bytes       windows {}, pending compressor rows {}, compressed entries {}, prompt point {}, token ids {}",
        bytes(sum(&|n| main(n) && n.ends_with(".window"))),
        bytes(sum(&|n| main(n) && (n.ends_with("kv") || n.ends_with("score")))),
        bytes(sum(&|n| n.ends_with(".entries"))),
        bytes(sum(&|n| !main(n))),
        bytes(sum(&|n| n == "tokens")),
    );
    let saved_by = match header.extra.get("chat") {
        Some(c) => format!(
            "a chat: {} messages, {} mode",
            c["messages"].as_array().map_or(0, Vec::len),
            c["mode"].as_str().unwrap_or("?")
        ),
        None if header.extra.get("server").is_some() => "a server's prefix cache".into(),
        None => "-".into(),
    };
    let _ = writeln!(o, "saved by    {saved_by}");
    o
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(super::utc(1_796_083_199), "2026-11-30 23:59:59 UTC");
    }
}
