//! Connection strings: masking them for display, scrubbing passwords out of libpq's
//! messages, and adding ticketops' own connection parameters.
//!
//! libpq quotes what it could not parse, so its error text can carry a password (an invalid
//! percent-escape, a whole malformed URI, the part of a password after an `@` that it took for
//! the host name). Nothing that reaches a terminal, a log or the database may carry one, so
//! every connection error goes through [`scrub`] with the URL it came from.

/// A libpq key/value connection string, parsed: `host=h user='a b' password=x`. `None` when
/// the text does not parse as one (an unterminated quote, a word without `=`).
pub fn parse_keyvalue(s: &str) -> Option<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Some(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') || key.is_empty() {
            return None;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next()? {
                    '\\' => value.push(chars.next()?),
                    '\'' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.push(chars.next()?);
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

/// Renders key/value pairs as a connection string, every value quoted (an empty value must be
/// `''`: a bare `user=` would make libpq take the next word as the user name).
fn render_keyvalue(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'")))
        .collect::<Vec<_>>()
        .join(" ")
}

fn is_uri(url: &str) -> bool {
    url.contains("://")
}

/// Returns the URL with any password replaced by `***`, safe to print and log.
pub fn mask_url(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        // libpq ends the user info at the first '@' before any '/'; a password holding '@' or
        // '/' un-encoded still belongs to the user info, so everything up to the last '@' of
        // the authority-and-path is hidden.
        let query_start = rest.find('?').unwrap_or(rest.len());
        if let Some(at) = rest[..query_start].rfind('@') {
            let userinfo = &rest[..at];
            if let Some(colon) = userinfo.find(':') {
                let masked = format!("{}{}:***{}", &url[..scheme_end + 3], &userinfo[..colon], &rest[at..]);
                return mask_query_password(&masked);
            }
        }
        return mask_query_password(url);
    }
    match parse_keyvalue(url) {
        Some(pairs) => pairs
            .iter()
            .map(|(k, v)| {
                if k.eq_ignore_ascii_case("password") {
                    format!("{k}=***")
                } else if v.is_empty() || v.contains(char::is_whitespace) {
                    format!("{k}='{v}'")
                } else {
                    format!("{k}={v}")
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
        // Unparseable: show nothing after a password keyword.
        None => match url.to_ascii_lowercase().find("password") {
            Some(at) => format!("{}password=***", &url[..at]),
            None => url.to_string(),
        },
    }
}

fn mask_query_password(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_string();
    };
    let masked: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => pair.to_string(),
        })
        .collect();
    format!("{base}?{}", masked.join("&"))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((high * 16 + low) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every spelling of a password the connection string holds: as written, percent-decoded,
/// and as libpq may cut it (at an `@`, `:`, `/` or `?` it takes for the end of the password).
pub fn secrets_of(url: &str) -> Vec<String> {
    let mut secrets = Vec::new();
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let query_start = rest.find('?').unwrap_or(rest.len());
        if let Some(at) = rest[..query_start].rfind('@')
            && let Some((_, password)) = rest[..at].split_once(':')
        {
            secrets.push(password.to_string());
        }
        if let Some((_, query)) = rest.split_once('?') {
            for pair in query.split('&') {
                if let Some((key, value)) = pair.split_once('=')
                    && key.eq_ignore_ascii_case("password")
                {
                    secrets.push(value.to_string());
                }
            }
        }
    } else if let Some(pairs) = parse_keyvalue(url) {
        secrets.extend(
            pairs
                .into_iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case("password"))
                .map(|(_, v)| v),
        );
    } else if let Some(at) = url.to_ascii_lowercase().find("password") {
        // Unparseable key/value text: whatever follows the keyword.
        let tail = url[at + "password".len()..]
            .trim_start()
            .trim_start_matches('=')
            .trim_start();
        secrets.push(
            tail.split_whitespace()
                .next()
                .unwrap_or("")
                .trim_matches('\'')
                .to_string(),
        );
    }
    if let Ok(password) = std::env::var("PGPASSWORD") {
        secrets.push(password);
    }
    let mut all = Vec::new();
    for secret in secrets.into_iter().filter(|s| !s.is_empty()) {
        let decoded = percent_decode(&secret);
        for spelling in [secret, decoded] {
            for piece in spelling.split(['@', ':', '/', '?', '%', '\0']) {
                if piece.len() >= 3 {
                    all.push(piece.to_string());
                }
            }
            all.push(spelling);
        }
    }
    all.retain(|s| !s.is_empty());
    // Longest first, so a whole password is replaced before its pieces.
    all.sort_by_key(|s| std::cmp::Reverse(s.len()));
    all.dedup();
    all
}

/// Removes every spelling of the URL's password from `message`, and masks any URL in it.
pub fn scrub(message: &str, url: &str) -> String {
    let mut text = message.to_string();
    // A connection URI quoted in the message (libpq quotes the whole of one it cannot parse).
    for scheme in ["postgresql://", "postgres://"] {
        let mut from = 0;
        while let Some(found) = text[from..].find(scheme) {
            let start = from + found;
            let end = text[start..]
                .find(|c: char| c.is_whitespace() || c == '"')
                .map_or(text.len(), |e| start + e);
            let masked = mask_url(&text[start..end]);
            text.replace_range(start..end, &masked);
            from = start + masked.len();
        }
    }
    for secret in secrets_of(url) {
        text = text.replace(&secret, "***");
    }
    // A NUL or other control byte from a decoded escape is shown escaped, never raw.
    crate::output::escape_controls(&text).into_owned()
}

/// Whether libpq's environment names a server or database (then no URL is needed).
pub fn libpq_environment_set() -> bool {
    ["PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE"]
        .iter()
        .any(|key| std::env::var(key).is_ok_and(|v| !v.is_empty()))
}

/// Which server and database a connection string names, for logs: host, port and database
/// name (never the user's password). Missing parts are libpq's defaults (`null` here).
pub fn target_of(url: &str) -> serde_json::Value {
    let (mut host, mut port, mut name): (Option<String>, Option<String>, Option<String>) = (None, None, None);
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
        let after_user = before_query
            .rfind('@')
            .map_or(before_query, |at| &before_query[at + 1..]);
        let (authority, path) = after_user.split_once('/').unwrap_or((after_user, ""));
        let (h, p) = match authority.rsplit_once(':') {
            Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => (h, Some(p)),
            _ => (authority, None),
        };
        host = Some(percent_decode(h)).filter(|h| !h.is_empty());
        port = p.map(str::to_string);
        name = Some(percent_decode(path)).filter(|n| !n.is_empty());
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("host", v)) => host = Some(percent_decode(v)),
                Some(("port", v)) => port = Some(v.to_string()),
                Some(("dbname", v)) => name = Some(percent_decode(v)),
                _ => {}
            }
        }
    } else if let Some(pairs) = parse_keyvalue(url) {
        for (k, v) in pairs {
            match k.as_str() {
                "host" | "hostaddr" if host.is_none() => host = Some(v),
                "port" => port = Some(v),
                "dbname" => name = Some(v),
                "service" if name.is_none() => name = Some(format!("service={v}")),
                _ => {}
            }
        }
    }
    let env = |key: &str| std::env::var(key).ok().filter(|v| !v.is_empty());
    serde_json::json!({
        "host": host.or_else(|| env("PGHOST")),
        "port": port.or_else(|| env("PGPORT")).and_then(|p| p.parse::<u16>().ok()),
        "name": name.or_else(|| env("PGDATABASE")),
    })
}

/// The connection string as it may be shown (masked), or what stands for it when empty.
pub fn describe(url: &str) -> String {
    if url.trim().is_empty() {
        "the server of libpq's environment (PGHOST, PGPORT, PGDATABASE, PGSERVICE)".to_string()
    } else {
        mask_url(url)
    }
}

/// What to do about a connection failure, from libpq's message.
pub fn next_step(reason: &str) -> &'static str {
    let r = reason.to_ascii_lowercase();
    if r.contains("password authentication failed") || r.contains("no password supplied") {
        "check the password (in the URL, PGPASSWORD or ~/.pgpass)"
    } else if r.contains("database") && r.contains("does not exist") {
        "check the database name, or create the database first"
    } else if r.contains("role") && r.contains("does not exist") {
        "check the user name: that role does not exist on the server"
    } else if r.contains("pg_hba.conf") {
        "the server does not accept this user from this host: see its pg_hba.conf"
    } else if r.contains("connection refused")
        || r.contains("no such file or directory")
        || r.contains("could not translate host name")
        || r.contains("timeout expired")
        || r.contains("network is unreachable")
        || r.contains("no route to host")
    {
        "is the server running? check the host and port"
    } else if r.contains("ssl") {
        "check the SSL settings (sslmode) of the connection string"
    } else {
        "check the connection string (--database-url or DATABASE_URL)"
    }
}

/// Adds `application_name=ticketops` (so the DBA sees who we are in pg_stat_activity) and a
/// connect timeout, unless the connection string sets them already.
pub fn with_connection_params(url: &str) -> String {
    let defaults = [("application_name", "ticketops"), ("connect_timeout", "10")];
    if !is_uri(url) {
        let Some(mut pairs) = parse_keyvalue(url) else {
            return url.to_string(); // libpq reports what is wrong with it
        };
        for (key, value) in defaults {
            if !pairs.iter().any(|(k, _)| k == key) {
                pairs.push((key.to_string(), value.to_string()));
            }
        }
        return render_keyvalue(&pairs);
    }
    let mut s = url.to_string();
    for (key, value) in defaults {
        if !url.contains(&format!("{key}=")) {
            s.push(if s.contains('?') { '&' } else { '?' });
            s.push_str(&format!("{key}={value}"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_password_in_urls() {
        assert_eq!(
            mask_url("postgres://u:secret@host:5432/db"),
            "postgres://u:***@host:5432/db"
        );
        assert_eq!(
            mask_url("postgresql://u:p%40ss@h/db?sslmode=require"),
            "postgresql://u:***@h/db?sslmode=require"
        );
        assert_eq!(mask_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            mask_url("postgres://h/db?user=u&password=pw"),
            "postgres://h/db?user=u&password=***"
        );
        assert_eq!(
            mask_url("host=h user=u password=pw dbname=d"),
            "host=h user=u password=*** dbname=d"
        );
        assert_eq!(mask_url("postgres://u:pa/ss@h/db"), "postgres://u:***@h/db");
        assert_eq!(
            mask_url("postgres://u:s3cr3tPW@t3tPW@127.0.0.1/db"),
            "postgres://u:***@127.0.0.1/db"
        );
        assert_eq!(mask_url("host=h password='a b c'"), "host=h password=***");
        assert_eq!(mask_url("host=h password='unterminated"), "host=h password=***");
    }

    /// Malformed connection strings and the libpq messages they give (as seen from libpq 15):
    /// no spelling of the password survives scrubbing.
    #[test]
    fn scrubs_passwords_from_libpq_messages() {
        let cases = [
            (
                "postgres://u:s3cr3tPW%zz@127.0.0.1/x",
                "invalid percent-encoded token: \"s3cr3tPW%zz\"",
                "s3cr3tPW",
            ),
            (
                "postgresql://u:s3cr3tPW@[::1:5432/x",
                "end of string reached when looking for matching \"]\" in IPv6 host address in URI: \"postgresql://u:s3cr3tPW@[::1:5432/x\"",
                "s3cr3tPW",
            ),
            (
                "postgres://u:s3cr3tPW@t3tPW@127.0.0.1/x",
                "could not translate host name \"t3tPW@127.0.0.1\" to address: Name or service not known",
                "t3tPW",
            ),
            (
                "postgres://u:s3cr%00tPW@127.0.0.1/x",
                "invalid URI query parameter: \"s3cr%00tPW\" s3cr\0tPW",
                "s3cr",
            ),
            (
                "host=127.0.0.1 password='s3cr3t PW' port=x",
                "invalid integer value \"x\" for connection option \"port\" (password s3cr3t PW)",
                "s3cr3t",
            ),
            (
                "postgres://127.0.0.1/x?password=s3cr3tPW&port=x",
                "invalid port number: \"x\" postgres://127.0.0.1/x?password=s3cr3tPW&port=x",
                "s3cr3tPW",
            ),
        ];
        for (url, message, secret) in cases {
            let scrubbed = scrub(message, url);
            assert!(!scrubbed.contains(secret), "{url}: {scrubbed}");
            assert!(!scrubbed.contains('\0'), "{url}: {scrubbed}");
        }
    }

    #[test]
    fn the_target_of_a_connection_string() {
        assert_eq!(
            target_of("postgres://u:pw@db.internal:6432/support?sslmode=require"),
            serde_json::json!({"host": "db.internal", "port": 6432, "name": "support"})
        );
        assert_eq!(
            target_of("host=h port=5433 dbname=d password=x"),
            serde_json::json!({"host": "h", "port": 5433, "name": "d"})
        );
        assert!(!target_of("postgres://u:s3cret@h/d").to_string().contains("s3cret"));
    }

    #[test]
    fn adds_application_name() {
        assert_eq!(
            with_connection_params("postgres://u@h/db"),
            "postgres://u@h/db?application_name=ticketops&connect_timeout=10"
        );
        assert_eq!(
            with_connection_params("postgres://u@h/db?application_name=x"),
            "postgres://u@h/db?application_name=x&connect_timeout=10"
        );
        // A trailing `user=` must stay empty, not swallow the parameter added after it.
        assert_eq!(
            with_connection_params("host=h user="),
            "host='h' user='' application_name='ticketops' connect_timeout='10'"
        );
        assert_eq!(
            parse_keyvalue("host = h  password='a \\'b' x=\\ y").unwrap(),
            vec![
                ("host".to_string(), "h".to_string()),
                ("password".into(), "a 'b".into()),
                ("x".into(), " y".into())
            ]
        );
        assert_eq!(parse_keyvalue("host=h 'x"), None);
    }
}
