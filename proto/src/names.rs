//! The Kubernetes API server's rules for names, shared by the controller (which refuses
//! objects that break them) and the agents (which refuse resources that break them, so
//! nothing a peer sends can put arbitrary text into kernel rules).
//!
//! Each check returns `Err` with a reason in the API server's words, never echoing the
//! value (callers quote a bounded prefix of it with [`quote_bounded`]).

/// Longest DNS label (RFC 1123 / RFC 1035).
pub const DNS_LABEL_MAX: usize = 63;
/// Longest DNS subdomain (RFC 1123).
pub const DNS_SUBDOMAIN_MAX: usize = 253;
/// Longest IANA service name (RFC 6335).
pub const IANA_SVC_NAME_MAX: usize = 15;

fn lower_alnum(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// A DNS label as Kubernetes reads RFC 1123: at most 63 characters, lowercase letters,
/// digits and `-`, starting and ending with a letter or digit (namespaces, port names).
pub fn dns1123_label(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        return Err("must not be empty");
    }
    if value.len() > DNS_LABEL_MAX {
        return Err("must be no more than 63 characters");
    }
    if !value.chars().all(|c| lower_alnum(c) || c == '-')
        || !value.starts_with(lower_alnum)
        || !value.ends_with(lower_alnum)
    {
        return Err(
            "must be a lowercase RFC 1123 label: a-z, 0-9 and '-', starting and ending with a letter or digit",
        );
    }
    Ok(())
}

/// A DNS label as Kubernetes reads RFC 1035: an RFC 1123 label that starts with a
/// letter (Service names).
pub fn dns1035_label(value: &str) -> Result<(), &'static str> {
    dns1123_label(value).map_err(|_| {
        "must be a lowercase RFC 1035 label: at most 63 characters a-z, 0-9 and '-', starting with a letter and ending with a letter or digit"
    })?;
    if !value.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(
            "must be a lowercase RFC 1035 label: at most 63 characters a-z, 0-9 and '-', starting with a letter and ending with a letter or digit",
        );
    }
    Ok(())
}

/// A DNS subdomain (RFC 1123): at most 253 characters, dot-separated RFC 1123 labels
/// (EndpointSlice and Node names).
pub fn dns1123_subdomain(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        return Err("must not be empty");
    }
    if value.len() > DNS_SUBDOMAIN_MAX {
        return Err("must be no more than 253 characters");
    }
    if value.split('.').any(|label| dns1123_label(label).is_err()) {
        return Err(
            "must be a lowercase RFC 1123 subdomain: labels of a-z, 0-9 and '-' separated by '.'",
        );
    }
    Ok(())
}

/// An IANA service name (RFC 6335) as Kubernetes checks named target ports: at most 15
/// characters of a-z, 0-9 and `-`, at least one letter, no `-` at either end and no `--`.
pub fn iana_svc_name(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        return Err("must not be empty");
    }
    if value.len() > IANA_SVC_NAME_MAX {
        return Err("must be no more than 15 characters");
    }
    if !value.chars().all(|c| lower_alnum(c) || c == '-') {
        return Err("must contain only a-z, 0-9 and '-'");
    }
    if !value.chars().any(|c| c.is_ascii_lowercase()) {
        return Err("must contain at least one letter");
    }
    if value.starts_with('-') || value.ends_with('-') || value.contains("--") {
        return Err("must not begin or end with '-' or hold '--'");
    }
    Ok(())
}

/// `value` in double quotes for an error message, cut to 64 characters and with control
/// characters escaped, so a hostile value can neither flood a log nor forge a line.
pub fn quote_bounded(value: &str) -> String {
    format!("\"{}\"", escape_bounded(value, 64))
}

/// `value` with control characters, quotes and backslashes escaped, cut to `keep`
/// characters (then `…`): free text from a peer (a NACK's message, an agent's version),
/// safe to keep, show and log.
pub fn escape_bounded(value: &str, keep: usize) -> String {
    let mut out = String::new();
    let mut count = 0;
    for c in value.chars() {
        let escaped = c.escape_debug();
        let len = escaped.len();
        if count + len > keep {
            out.push('…');
            return out;
        }
        out.extend(escaped);
        count += len;
    }
    out
}

/// `value` on one line: control characters escaped (`\n`, `\u{1b}`), everything else
/// as it is, cut to `keep` characters (then `…`). For messages that quote their own
/// values (problems, errors of libraries) on their way to logs and the query API.
pub fn one_line(value: &str, keep: usize) -> String {
    let mut out = String::with_capacity(value.len().min(keep + 4));
    let mut count = 0;
    for c in value.chars() {
        let len = if c.is_control() {
            c.escape_debug().len()
        } else {
            1
        };
        if count + len > keep {
            out.push('…');
            return out;
        }
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
        count += len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels_follow_the_api_server() {
        for ok in ["a", "web", "web-1", "1web", "a".repeat(63).as_str()] {
            assert_eq!(dns1123_label(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "Web",
            "-web",
            "web-",
            "we_b",
            "we.b",
            "we\"b",
            "we\nb",
            "a".repeat(64).as_str(),
        ] {
            assert!(dns1123_label(bad).is_err(), "{bad:?}");
        }
        assert_eq!(dns1035_label("web-1"), Ok(()));
        assert!(dns1035_label("1web").is_err());
    }

    #[test]
    fn dns_subdomains_are_dotted_labels_of_at_most_253_characters() {
        for ok in ["node-a", "node-a.example.com", "10.0.0.1"] {
            assert_eq!(dns1123_subdomain(ok), Ok(()), "{ok}");
        }
        let long = vec!["a".repeat(63); 4].join(".");
        assert_eq!(long.len(), 255);
        for bad in ["", ".a", "a..b", "a.", "A.b", "a b", long.as_str()] {
            assert!(dns1123_subdomain(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn iana_service_names_need_a_letter_and_no_double_hyphen() {
        for ok in ["http", "h2c", "web-ui", "a23456789012345"] {
            assert_eq!(iana_svc_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "8080",
            "-http",
            "http-",
            "we--b",
            "HTTP",
            "a234567890123456",
        ] {
            assert!(iana_svc_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn quoted_values_are_bounded_and_cannot_break_a_line() {
        assert_eq!(quote_bounded("web"), "\"web\"");
        assert_eq!(quote_bounded("a\"\nb"), "\"a\\\"\\nb\"");
        let quoted = quote_bounded(&"x".repeat(10_000));
        assert!(quoted.len() < 80, "{quoted}");
        assert!(quoted.ends_with("…\""));
        assert_eq!(escape_bounded("ok", 10), "ok");
        assert_eq!(escape_bounded("a\r\nb\u{1b}[2J", 100), "a\\r\\nb\\u{1b}[2J");
        assert_eq!(escape_bounded("abcdef", 3), "abc…");
        assert_eq!(one_line("a \"b\"\nc", 100), "a \"b\"\\nc");
        assert_eq!(one_line("abcdef", 3), "abc…");
        let cut = escape_bounded(&"\u{1b}".repeat(100), 20);
        assert!(cut.chars().count() <= 21, "bounded once escaped: {cut}");
    }
}
