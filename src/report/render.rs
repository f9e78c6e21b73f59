//! The report for people: an aligned terminal report (colour only on a TTY) and Markdown that
//! pastes into a ticket. The JSON form is the [`Report`] serialized as is.

use std::fmt::Write as _;

use super::{Money, Report, Stats};

/// Text from the log (user ids, models, upstream error messages) as one inert line: control
/// characters — newlines, and the escape sequences a terminal would obey — are shown escaped, so
/// a crafted user id cannot forge report lines or hide others.
pub fn inert(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_owned();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// `12345678` → `12,345,678`.
pub fn thousands(n: impl Into<i128>) -> String {
    let n: i128 = n.into();
    let digits = n.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if n < 0 {
        out.push('-');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// USD with four decimals as the seed prints it (six for amounts under a cent), rounded from
/// the exact picodollars.
fn usd(m: Money) -> String {
    let p = m.0.abs();
    let sign = if m.0 < 0 { "-" } else { "" };
    if p != 0 && p < 10_000_000_000 {
        let micro = (p + 500_000) / 1_000_000;
        return format!("{sign}${}.{:06}", micro / 1_000_000, micro % 1_000_000);
    }
    let q = (p + 50_000_000) / 100_000_000;
    format!("{sign}${}.{:04}", thousands(q / 10_000), q % 10_000)
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2} ms"))
}

fn pct(v: f64) -> String {
    format!("{:.1}%", v * 100.0)
}

fn period_line(r: &Report) -> String {
    format!(
        "{} → {} ({})",
        r.period.since,
        r.period.until.as_deref().unwrap_or("now"),
        human_minutes(r.period.minutes)
    )
}

fn human_minutes(m: f64) -> String {
    if m >= 60.0 && (m / 60.0).fract().abs() < 1e-9 {
        format!("{} h", m / 60.0)
    } else if m >= 60.0 {
        format!("{:.1} h", m / 60.0)
    } else if m >= 1.0 {
        format!("{m:.0} min")
    } else {
        format!("{:.1} s", m * 60.0)
    }
}

/// A plain table: left-aligned first column, right-aligned numbers.
fn table(out: &mut String, indent: &str, header: &[&str], rows: &[Vec<String>]) {
    let cols = header.len();
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |out: &mut String, cells: &[String]| {
        out.push_str(indent);
        for (i, (cell, w)) in cells.iter().zip(&width).enumerate() {
            let pad = w - cell.chars().count();
            if i == 0 {
                out.push_str(cell);
                if i + 1 < cols {
                    out.push_str(&" ".repeat(pad));
                }
            } else {
                out.push_str("  ");
                out.push_str(&" ".repeat(pad));
                out.push_str(cell);
            }
        }
        out.push('\n');
    };
    let head: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    line(out, &head);
    for row in rows {
        line(out, row);
    }
}

struct Paint(bool);

impl Paint {
    fn wrap(&self, code: &str, s: &str) -> String {
        if self.0 {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_owned()
        }
    }
    fn bold(&self, s: &str) -> String {
        self.wrap("1", s)
    }
    fn severity(&self, sev: &str) -> String {
        let code = match sev {
            "CRITICAL" => "1;31",
            "WARNING" => "1;33",
            _ => "1;36",
        };
        self.wrap(code, &format!("[{sev}]"))
    }
}

/// The terminal report.
pub fn text(r: &Report, colour: bool) -> String {
    let p = Paint(colour);
    let s = &r.stats;
    let mut out = String::new();
    let _ = writeln!(out, "{}", p.bold("llm-audit security report"));
    let _ = writeln!(out, "  period     {}", period_line(r));
    let _ = writeln!(out, "  database   {}", r.database);
    let _ = writeln!(out, "  generated  {}", r.generated_at);
    out.push('\n');
    if s.total_requests == 0 {
        let _ = writeln!(out, "No audit records in this period.");
        return out;
    }
    let _ = writeln!(out, "{}", p.bold("Overview"));
    let rows = vec![
        vec!["requests".into(), thousands(s.total_requests)],
        vec![
            "failed (status >= 400)".into(),
            format!(
                "{} ({})",
                thousands(s.failed_requests),
                pct(s.failure_ratio)
            ),
        ],
        vec!["cost".into(), usd(s.total_cost)],
        vec![
            "tokens (input / output)".into(),
            format!(
                "{} ({} / {})",
                thousands(s.total_tokens),
                thousands(s.prompt_tokens),
                thousands(s.completion_tokens)
            ),
        ],
        vec!["latency avg".into(), ms(s.avg_latency_ms)],
        vec![
            "latency p50 / p95 / p99".into(),
            format!(
                "{} / {} / {}",
                ms(s.latency_ms.p50),
                ms(s.latency_ms.p95),
                ms(s.latency_ms.p99)
            ),
        ],
    ];
    for row in rows {
        let _ = writeln!(out, "  {:<26}{}", row[0], row[1]);
    }
    out.push('\n');
    let _ = writeln!(out, "{}", p.bold("Per model"));
    table(
        &mut out,
        "  ",
        &["model", "requests", "cost", "avg latency"],
        &model_rows(s, inert),
    );
    out.push('\n');
    let _ = writeln!(out, "{}", p.bold("Top errors"));
    if s.errors.is_empty() {
        let _ = writeln!(out, "  none");
    } else {
        let rows = error_rows(s, |e| truncate(e, 90));
        table(&mut out, "  ", &["error", "count"], &rows);
    }
    out.push('\n');
    let _ = writeln!(out, "{}", p.bold("Top users"));
    if s.top_users.is_empty() {
        let _ = writeln!(out, "  none identified");
    } else {
        table(
            &mut out,
            "  ",
            &["user", "requests", "cost"],
            &user_rows(s, inert),
        );
    }
    out.push('\n');
    let _ = writeln!(out, "{}", p.bold("Anomalies"));
    if r.anomalies.is_empty() {
        let _ = writeln!(out, "  none ✓");
    }
    for a in &r.anomalies {
        let _ = writeln!(out, "  {} {}", p.severity(a.severity), a.kind);
        let _ = writeln!(out, "      {}", inert(&a.details));
        let _ = writeln!(out, "      → {}", a.recommendation);
    }
    if !r.repeated_hashes.is_empty() {
        out.push('\n');
        let _ = writeln!(
            out,
            "{}",
            p.bold(&format!(
                "Request hashes repeated more than {} times",
                r.thresholds.repeated_request_count
            ))
        );
        let rows: Vec<Vec<String>> = r
            .repeated_hashes
            .iter()
            .map(|h| vec![h.request_hash.clone(), thousands(h.count)])
            .collect();
        table(&mut out, "  ", &["request hash", "count"], &rows);
    }
    out
}

// The table rows both renderings share; `clean` makes text from the log safe for the output.

fn model_rows(s: &Stats, clean: impl Fn(&str) -> String) -> Vec<Vec<String>> {
    s.models
        .iter()
        .map(|m| {
            vec![
                clean(&m.model),
                thousands(m.requests),
                usd(m.cost),
                ms(m.avg_latency_ms),
            ]
        })
        .collect()
}

fn error_rows(s: &Stats, clean: impl Fn(&str) -> String) -> Vec<Vec<String>> {
    s.errors
        .iter()
        .map(|e| vec![clean(&e.error), thousands(e.count)])
        .collect()
}

fn user_rows(s: &Stats, clean: impl Fn(&str) -> String) -> Vec<Vec<String>> {
    s.top_users
        .iter()
        .map(|u| vec![clean(&u.user_id), thousands(u.requests), usd(u.cost)])
        .collect()
}

fn truncate(s: &str, max: usize) -> String {
    let one_line = inert(s);
    if one_line.chars().count() <= max {
        one_line
    } else {
        let mut t: String = one_line.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

/// Text from the log made literal in Markdown: emphasis, code, links and HTML characters
/// escaped (pipes are escaped per cell), so a model name or user id cannot inject markup
/// into a ticket.
fn md_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(
            c,
            '\\' | '`' | '*' | '_' | '[' | ']' | '<' | '>' | '~' | '#' | '!'
        ) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A Markdown table cell: pipes escaped, one line.
fn cell(s: &str) -> String {
    truncate(s, 200).replace('|', "\\|")
}

fn md_table(out: &mut String, header: &[&str], right: &[bool], rows: &[Vec<String>]) {
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let sep: Vec<&str> = right
        .iter()
        .map(|r| if *r { "---:" } else { "---" })
        .collect();
    let _ = writeln!(out, "| {} |", sep.join(" | "));
    for row in rows {
        let cells: Vec<String> = row.iter().map(|c| cell(c)).collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
}

/// The Markdown report.
pub fn markdown(r: &Report) -> String {
    let s = &r.stats;
    let mut out = String::new();
    let _ = writeln!(out, "## llm-audit security report\n");
    let _ = writeln!(
        out,
        "Period: {} · database `{}` · generated {}\n",
        period_line(r),
        r.database,
        r.generated_at
    );
    if s.total_requests == 0 {
        let _ = writeln!(out, "No audit records in this period.");
        return out;
    }
    let _ = writeln!(out, "### Overview\n");
    md_table(
        &mut out,
        &["", "value"],
        &[false, true],
        &[
            vec!["Requests".into(), thousands(s.total_requests)],
            vec![
                "Failed (status ≥ 400)".into(),
                format!(
                    "{} ({})",
                    thousands(s.failed_requests),
                    pct(s.failure_ratio)
                ),
            ],
            vec!["Cost".into(), usd(s.total_cost)],
            vec!["Tokens".into(), thousands(s.total_tokens)],
            vec!["Latency avg".into(), ms(s.avg_latency_ms)],
            vec!["Latency p50".into(), ms(s.latency_ms.p50)],
            vec!["Latency p95".into(), ms(s.latency_ms.p95)],
            vec!["Latency p99".into(), ms(s.latency_ms.p99)],
        ],
    );
    let _ = writeln!(out, "\n### Per model\n");
    md_table(
        &mut out,
        &["Model", "Requests", "Cost", "Avg latency"],
        &[false, true, true, true],
        &model_rows(s, md_escape),
    );
    let _ = writeln!(out, "\n### Top errors\n");
    if s.errors.is_empty() {
        let _ = writeln!(out, "None.");
    } else {
        let rows = error_rows(s, md_escape);
        md_table(&mut out, &["Error", "Count"], &[false, true], &rows);
    }
    let _ = writeln!(out, "\n### Top users\n");
    if s.top_users.is_empty() {
        let _ = writeln!(out, "None identified.");
    } else {
        md_table(
            &mut out,
            &["User", "Requests", "Cost"],
            &[false, true, true],
            &user_rows(s, md_escape),
        );
    }
    let _ = writeln!(out, "\n### Anomalies\n");
    if r.anomalies.is_empty() {
        let _ = writeln!(out, "None.");
    }
    for a in &r.anomalies {
        let _ = writeln!(
            out,
            "- **{}** `{}` — {}  \n  → {}",
            a.severity,
            a.kind,
            cell(&md_escape(&a.details)),
            a.recommendation
        );
    }
    if !r.repeated_hashes.is_empty() {
        let _ = writeln!(
            out,
            "\n### Request hashes repeated more than {} times\n",
            r.thresholds.repeated_request_count
        );
        let rows: Vec<Vec<String>> = r
            .repeated_hashes
            .iter()
            .map(|h| vec![format!("`{}`", h.request_hash), thousands(h.count)])
            .collect();
        md_table(&mut out, &["Request hash", "Count"], &[false, true], &rows);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_for_people() {
        assert_eq!(thousands(0u32), "0");
        assert_eq!(thousands(999u32), "999");
        assert_eq!(thousands(1_000u32), "1,000");
        assert_eq!(thousands(12_345_678i64), "12,345,678");
        assert_eq!(usd(Money(1_234_567_800_000_000)), "$1,234.5678");
        assert_eq!(usd(Money(4_200_000)), "$0.000004");
        assert_eq!(usd(Money(0)), "$0.0000");
    }

    #[test]
    fn log_text_cannot_forge_lines_or_markup() {
        assert_eq!(inert("alice"), "alice");
        assert_eq!(inert("x\n  none \u{1b}[8m"), "x\\n  none \\u{1b}[8m");
        assert_eq!(
            md_escape("gpt`4 <img> [a](b) *x*"),
            "gpt\\`4 \\<img\\> \\[a\\](b) \\*x\\*"
        );
        assert_eq!(cell("a|b\nc"), "a\\|b\\nc");
    }
}
