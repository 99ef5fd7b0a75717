//! Parsing and normalising one field's text: enums with their common aliases, timestamps,
//! e-mail addresses, tag lists. Every function returns a reason a person can act on.

use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;

use crate::models::{TicketChannel, TicketPriority, TicketStatus, UserRole};

/// Lower-cases and folds spaces, hyphens and underscores, so that `On Hold`, `on-hold` and
/// `ON_HOLD` compare equal.
fn fold(value: &str) -> String {
    value
        .trim()
        .chars()
        .map(|c| {
            if c == ' ' || c == '-' {
                '_'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect()
}

pub fn ticket_status(value: &str) -> Result<TicketStatus, String> {
    let folded = fold(value);
    let status = match folded.as_str() {
        "new" | "unopened" => TicketStatus::New,
        "open" | "opened" | "in_progress" | "active" | "reopened" => TicketStatus::Open,
        "pending" | "waiting" | "awaiting_customer" | "waiting_on_customer" => TicketStatus::Pending,
        "on_hold" | "onhold" | "hold" | "held" => TicketStatus::OnHold,
        "solved" | "resolved" | "done" => TicketStatus::Solved,
        "closed" | "close" | "archived" => TicketStatus::Closed,
        "" => return Err("status is empty".into()),
        _ => {
            return Err(format!(
                "unknown status {:?} (expected one of new, open, pending, on_hold, solved, closed; use --value-map for others)",
                value.trim()
            ));
        }
    };
    Ok(status)
}

/// A blank priority means `normal`.
pub fn ticket_priority(value: &str) -> Result<TicketPriority, String> {
    let folded = fold(value);
    let priority = match folded.as_str() {
        "" | "normal" | "medium" | "med" | "moderate" | "p3" => TicketPriority::Normal,
        "low" | "minor" | "p4" => TicketPriority::Low,
        "high" | "major" | "important" | "p2" => TicketPriority::High,
        "urgent" | "critical" | "blocker" | "emergency" | "highest" | "p1" => TicketPriority::Urgent,
        _ => {
            return Err(format!(
                "unknown priority {:?} (expected one of low, normal, high, urgent; use --value-map for others)",
                value.trim()
            ));
        }
    };
    Ok(priority)
}

/// A blank channel means `other`.
pub fn ticket_channel(value: &str) -> Result<TicketChannel, String> {
    let folded = fold(value);
    let channel = match folded.as_str() {
        "" | "other" | "unknown" => TicketChannel::Other,
        "email" | "e_mail" | "mail" => TicketChannel::Email,
        "web" | "web_form" | "webform" | "form" | "portal" => TicketChannel::Web,
        "chat" | "live_chat" | "livechat" | "messaging" => TicketChannel::Chat,
        "phone" | "voice" | "call" | "telephone" => TicketChannel::Phone,
        "social" | "twitter" | "facebook" | "social_media" => TicketChannel::Social,
        "api" => TicketChannel::Api,
        _ => {
            return Err(format!(
                "unknown channel {:?} (expected one of email, web, chat, phone, social, api, other; use --value-map for others)",
                value.trim()
            ));
        }
    };
    Ok(channel)
}

/// A blank role means `customer`.
pub fn user_role(value: &str) -> Result<UserRole, String> {
    let folded = fold(value);
    let role = match folded.as_str() {
        "" | "customer" | "end_user" | "enduser" | "user" | "requester" | "contact" => UserRole::Customer,
        "agent" | "staff" | "support" => UserRole::Agent,
        "admin" | "administrator" => UserRole::Admin,
        _ => {
            return Err(format!(
                "unknown role {:?} (expected one of customer, agent, admin; use --value-map for others)",
                value.trim()
            ));
        }
    };
    Ok(role)
}

pub fn boolean(value: &str) -> Result<Option<bool>, String> {
    match fold(value).as_str() {
        "" => Ok(None),
        "true" | "t" | "yes" | "y" | "1" | "public" => Ok(Some(true)),
        "false" | "f" | "no" | "n" | "0" | "private" | "internal" => Ok(Some(false)),
        _ => Err(format!("not a boolean: {:?} (expected true or false)", value.trim())),
    }
}

/// Lower-cases and checks the shape `local@domain.tld`, no spaces. An empty value is `None`.
/// The address of a mail header's `Display Name <local@domain.tld>` and of a `mailto:` link is
/// taken as it is: exports of mail-based helpdesks write their people so.
pub fn email(value: &str) -> Result<Option<String>, String> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Ok(None);
    }
    let address = name_addr(trimmed).map_or(trimmed, |(_, address)| address.trim());
    let address = match address.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case("mailto:") => &address[7..],
        _ => address,
    };
    let lower = address.to_lowercase();
    let valid = match lower.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.is_empty()
                && !domain.contains('@')
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !domain.contains("..")
                && !lower
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || "<>(),;:\"[]\\".contains(c))
        }
        None => false,
    };
    if valid {
        Ok(Some(lower))
    } else {
        Err(format!("not an e-mail address: {trimmed:?}"))
    }
}

/// The display name of a `Display Name <local@domain.tld>` address (its quotes removed), which
/// names the person where the file has no name column or leaves it empty.
pub fn display_name(value: &str) -> Option<String> {
    let (name, _) = name_addr(value.trim())?;
    let name = name.trim();
    let name = name
        .strip_prefix('"')
        .and_then(|quoted| quoted.strip_suffix('"'))
        .unwrap_or(name)
        .trim();
    (!name.is_empty()).then(|| name.to_owned())
}

/// A mail header's `Display Name <address>` split in its two parts (untrimmed), for
/// [`email`] and [`display_name`]; `None` when the value is not of that form.
fn name_addr(value: &str) -> Option<(&str, &str)> {
    value.strip_suffix('>')?.split_once('<')
}

/// The time zone assumed for timestamps that carry no offset.
#[derive(Debug, Clone, Copy)]
pub enum InputZone {
    Utc,
    Named(Tz),
}

impl InputZone {
    pub fn parse(name: &str) -> Result<InputZone, String> {
        if name.eq_ignore_ascii_case("utc") || name == "Z" {
            return Ok(InputZone::Utc);
        }
        name.parse::<Tz>()
            .map(InputZone::Named)
            .map_err(|_| format!("unknown time zone {name:?} (use an IANA name such as Europe/Berlin, or UTC)"))
    }

    fn to_utc(self, naive: NaiveDateTime) -> Result<DateTime<Utc>, String> {
        match self {
            InputZone::Utc => Ok(naive.and_utc()),
            InputZone::Named(tz) => match tz.from_local_datetime(&naive) {
                chrono::LocalResult::Single(dt) => Ok(dt.with_timezone(&Utc)),
                // An autumn-back hour happens twice: take the earlier, as PostgreSQL does.
                chrono::LocalResult::Ambiguous(earlier, _) => Ok(earlier.with_timezone(&Utc)),
                chrono::LocalResult::None => Err(format!("{naive} does not exist in {tz} (a daylight-saving gap)")),
            },
        }
    }
}

/// `timestamp`, with the `--date-format`s (strftime) tried first, in order: a format with an
/// offset (`%z`) gives that instant, one without is local time in `zone`, a date-only format
/// is midnight.
pub fn timestamp_in(value: &str, zone: InputZone, formats: &[String]) -> Result<Option<DateTime<Utc>>, String> {
    let v = value.trim();
    if v.is_empty() || formats.is_empty() {
        return timestamp(v, zone);
    }
    for format in formats {
        if let Ok(dt) = DateTime::parse_from_str(v, format) {
            return Ok(Some(dt.with_timezone(&Utc)));
        }
        if let Ok(naive) = NaiveDateTime::parse_from_str(v, format) {
            return zone.to_utc(naive).map(Some);
        }
        if let Ok(date) = NaiveDate::parse_from_str(v, format) {
            return zone
                .to_utc(date.and_hms_opt(0, 0, 0).expect("midnight exists"))
                .map(Some);
        }
    }
    timestamp(v, zone).map_err(|_| {
        format!(
            "not a timestamp: {v:?} (tried --date-format {} and RFC 3339, YYYY-MM-DD HH:MM:SS[.frac], YYYY-MM-DD, RFC 2822)",
            formats.iter().map(|f| format!("{f:?}")).collect::<Vec<_>>().join(", ")
        )
    })
}

/// RFC 3339 (`2024-03-01T12:00:00Z`, `+02:00`), `YYYY-MM-DD HH:MM:SS[.frac]` (with `T` or a
/// space, optional offset), a bare date (midnight), or RFC 2822 (`Tue, 14 May 2019 09:38:20
/// +0000`). An empty value is `None`.
pub fn timestamp(value: &str, zone: InputZone) -> Result<Option<DateTime<Utc>>, String> {
    let v = value.trim();
    if v.is_empty() {
        return Ok(None);
    }
    if let Some(parsed) = common_timestamp(v.as_bytes()) {
        return match parsed {
            (naive, None) => zone.to_utc(naive).map(Some),
            (naive, Some(offset)) => Ok(Some(naive.and_utc() - chrono::TimeDelta::seconds(offset.into()))),
        };
    }
    parse_timestamp_formats(v, zone)
}

/// The shapes nearly every export uses, read by hand: chrono's format-string parsing of
/// several candidate formats per value cost more than the rest of a row's validation.
/// `YYYY-MM-DD`, or `YYYY-MM-DD[ T]HH:MM:SS[.frac]` then nothing, `Z` or `±HH:MM`: the local
/// time and the offset in seconds, if any. Anything else (or out of range) is `None` and goes
/// through `parse_timestamp_formats`, which has the same meaning for these shapes.
fn common_timestamp(v: &[u8]) -> Option<(NaiveDateTime, Option<i32>)> {
    fn number(digits: &[u8]) -> Option<u32> {
        digits
            .iter()
            .try_fold(0u32, |n, &d| d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0')))
    }
    if v.len() < 10 || v[4] != b'-' || v[7] != b'-' {
        return None;
    }
    let date = NaiveDate::from_ymd_opt(number(&v[0..4])? as i32, number(&v[5..7])?, number(&v[8..10])?)?;
    if v.len() == 10 {
        return Some((date.and_hms_opt(0, 0, 0)?, None));
    }
    if v.len() < 19 || !matches!(v[10], b' ' | b'T') || v[13] != b':' || v[16] != b':' {
        return None;
    }
    let (hour, minute, second) = (number(&v[11..13])?, number(&v[14..16])?, number(&v[17..19])?);
    let mut rest = &v[19..];
    let mut nanos = 0;
    if let Some(fraction) = rest.strip_prefix(b".") {
        let digits = fraction.iter().take_while(|d| d.is_ascii_digit()).count();
        if digits == 0 || digits > 9 {
            return None;
        }
        nanos = number(&fraction[..digits])? * 10u32.pow(9 - digits as u32);
        rest = &fraction[digits..];
    }
    if second > 59 {
        return None; // a leap second: left to chrono
    }
    let naive = date.and_hms_nano_opt(hour, minute, second, nanos)?;
    let offset = match rest {
        b"" => None,
        b"Z" => Some(0),
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let (hours, minutes) = (number(&[*h1, *h2])?, number(&[*m1, *m2])?);
            if hours > 23 || minutes > 59 {
                return None;
            }
            let seconds = (hours * 3600 + minutes * 60) as i32;
            Some(if *sign == b'-' { -seconds } else { seconds })
        }
        _ => return None,
    };
    Some((naive, offset))
}

/// Every accepted timestamp shape, by chrono's format strings.
fn parse_timestamp_formats(v: &str, zone: InputZone) -> Result<Option<DateTime<Utc>>, String> {
    if let Ok(dt) = DateTime::parse_from_rfc3339(v) {
        return Ok(Some(dt.with_timezone(&Utc)));
    }
    // E-mail's date (`Tue, 14 May 2019 09:38:20 +0000`), as mail-fed helpdesks export it: it
    // names its offset, so it is as unambiguous as RFC 3339.
    if let Ok(dt) = DateTime::parse_from_rfc2822(v) {
        return Ok(Some(dt.with_timezone(&Utc)));
    }
    for format in [
        "%Y-%m-%d %H:%M:%S%.f%:z",
        "%Y-%m-%d %H:%M:%S%.f%#z",
        "%Y-%m-%dT%H:%M:%S%.f%#z",
    ] {
        if let Ok(dt) = DateTime::parse_from_str(v, format) {
            return Ok(Some(dt.with_timezone(&Utc)));
        }
    }
    if let Some(stripped) = v.strip_suffix(" UTC").or_else(|| v.strip_suffix('Z')) {
        for format in [
            "%Y-%m-%d %H:%M:%S%.f",
            "%Y-%m-%dT%H:%M:%S%.f",
            "%Y-%m-%d %H:%M",
            "%Y-%m-%dT%H:%M",
        ] {
            if let Ok(naive) = NaiveDateTime::parse_from_str(stripped.trim_end(), format) {
                return Ok(Some(naive.and_utc()));
            }
        }
    }
    for format in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M",
        // Year first with slashes (some spreadsheets' ISO-like form): unambiguous, unlike
        // 01/02/2024, which is left to --date-format.
        "%Y/%m/%d %H:%M:%S%.f",
        "%Y/%m/%d %H:%M",
    ] {
        if let Ok(naive) = NaiveDateTime::parse_from_str(v, format) {
            return zone.to_utc(naive).map(Some);
        }
    }
    for format in ["%Y-%m-%d", "%Y/%m/%d"] {
        if let Ok(date) = NaiveDate::parse_from_str(v, format) {
            let midnight = date.and_hms_opt(0, 0, 0).expect("midnight exists");
            return zone.to_utc(midnight).map(Some);
        }
    }
    Err(format!(
        "not a timestamp: {v:?} (expected RFC 3339, YYYY-MM-DD HH:MM[:SS[.frac]], YYYY/MM/DD …, YYYY-MM-DD \
         or RFC 2822; another format can be named with --date-format)"
    ))
}

/// Splits a tag list on `separator`, trims, lower-cases, drops empties and duplicates,
/// and returns the tags sorted (a stable order makes set comparison cheap).
pub fn tags(value: &str, separator: char) -> Result<Vec<String>, String> {
    let mut tags: Vec<String> = value
        .split(separator)
        .map(|t| t.trim().to_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    if let Some(bad) = tags.iter().find(|t| t.chars().count() > 100) {
        return Err(format!("tag longer than 100 characters: {bad:?}"));
    }
    tags.sort();
    tags.dedup();
    Ok(tags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_formats_are_tried_in_order_before_the_built_in_shapes() {
        let jira = vec!["%d/%b/%y %I:%M %p".to_string()];
        let t = timestamp_in("14/Jul/25 3:42 PM", InputZone::Utc, &jira)
            .unwrap()
            .unwrap();
        assert_eq!(t.to_rfc3339(), "2025-07-14T15:42:00+00:00");
        let t = timestamp_in("01/Feb/24 12:05 AM", InputZone::Utc, &jira)
            .unwrap()
            .unwrap();
        assert_eq!(t.to_rfc3339(), "2024-02-01T00:05:00+00:00");
        // The built-in shapes still work alongside.
        let t = timestamp_in("2024-03-01T12:00:00Z", InputZone::Utc, &jira)
            .unwrap()
            .unwrap();
        assert_eq!(t.to_rfc3339(), "2024-03-01T12:00:00+00:00");
        let us_then_eu = vec!["%m/%d/%Y".to_string(), "%d.%m.%Y %H:%M %z".to_string()];
        let t = timestamp_in("07/04/2024", InputZone::Utc, &us_then_eu)
            .unwrap()
            .unwrap();
        assert_eq!(t.to_rfc3339(), "2024-07-04T00:00:00+00:00");
        let t = timestamp_in("04.07.2024 10:00 +0200", InputZone::Utc, &us_then_eu)
            .unwrap()
            .unwrap();
        assert_eq!(t.to_rfc3339(), "2024-07-04T08:00:00+00:00");
        let err = timestamp_in("31/Foo/25 3:42 PM", InputZone::Utc, &jira).unwrap_err();
        assert!(err.contains("tried --date-format"), "{err}");
        assert_eq!(timestamp_in("", InputZone::Utc, &jira), Ok(None));
    }

    #[test]
    fn status_aliases() {
        assert_eq!(ticket_status("On Hold"), Ok(TicketStatus::OnHold));
        assert_eq!(ticket_status("on-hold"), Ok(TicketStatus::OnHold));
        assert_eq!(ticket_status(" OPEN "), Ok(TicketStatus::Open));
        assert!(ticket_status("bogus").unwrap_err().contains("unknown status \"bogus\""));
        assert!(ticket_status("").is_err());
    }

    #[test]
    fn priority_aliases() {
        assert_eq!(ticket_priority("Critical"), Ok(TicketPriority::Urgent));
        assert_eq!(ticket_priority("Medium"), Ok(TicketPriority::Normal));
        assert_eq!(ticket_priority(""), Ok(TicketPriority::Normal));
        assert!(ticket_priority("asap").is_err());
    }

    #[test]
    fn emails() {
        assert_eq!(email(" Ann@Example.COM "), Ok(Some("ann@example.com".into())));
        assert_eq!(email(""), Ok(None));
        assert!(email("not-an-email").is_err());
        assert!(email("a@b").is_err());
        assert!(email("a b@c.com").is_err());
        assert!(email("a@@c.com").is_err());
        assert_eq!(email("Jane Doe <Jane@X.com>"), Ok(Some("jane@x.com".into())));
        assert_eq!(email("\"Smith, Al\" <al@x.com> "), Ok(Some("al@x.com".into())));
        assert_eq!(email("<al@x.com>"), Ok(Some("al@x.com".into())));
        assert_eq!(email("MAILTO:zed@x.com"), Ok(Some("zed@x.com".into())));
        assert!(email("Jane <not an address>").is_err());
        assert!(email("a@b.co;c@d.co").is_err(), "two addresses are not one");
        assert!(email("Jane <a@b.co> <c@d.co>").is_err());
        assert_eq!(display_name(" Jane Doe <jane@x.com>"), Some("Jane Doe".into()));
        assert_eq!(display_name("\"Smith, Al\" <al@x.com>"), Some("Smith, Al".into()));
        assert_eq!(display_name("<al@x.com>"), None);
        assert_eq!(display_name("al@x.com"), None);
    }

    #[test]
    fn timestamps() {
        let utc = InputZone::Utc;
        let expect = |s: &str| timestamp(s, utc).unwrap().unwrap().to_rfc3339();
        assert_eq!(expect("2024-03-01T12:00:00Z"), "2024-03-01T12:00:00+00:00");
        assert_eq!(expect("2024-03-01T12:00:00+02:00"), "2024-03-01T10:00:00+00:00");
        assert_eq!(expect("2024-03-01 12:00:00"), "2024-03-01T12:00:00+00:00");
        assert_eq!(expect("2024-03-01 12:00:00.250"), "2024-03-01T12:00:00.250+00:00");
        assert_eq!(expect("2024-03-01 12:00:00+01"), "2024-03-01T11:00:00+00:00");
        assert_eq!(expect("2024-03-01"), "2024-03-01T00:00:00+00:00");
        assert_eq!(expect("2024-03-01T12:00Z"), "2024-03-01T12:00:00+00:00");
        assert_eq!(expect("2024/03/01 12:00:00"), "2024-03-01T12:00:00+00:00");
        assert_eq!(expect("2024/03/01"), "2024-03-01T00:00:00+00:00");
        assert_eq!(expect("Tue, 14 May 2019 09:38:20 +0200"), "2019-05-14T07:38:20+00:00");
        assert_eq!(expect("14 May 2019 09:38 -0000"), "2019-05-14T09:38:00+00:00");
        assert_eq!(expect("Tue, 14 May 2019 09:38:20 GMT"), "2019-05-14T09:38:20+00:00");
        assert!(
            timestamp("Tue, 14 May 2019 09:38:20", utc).is_err(),
            "RFC 2822 names its offset"
        );
        assert!(timestamp("01/03/2024", utc).is_err(), "day or month first: ambiguous");
        assert_eq!(timestamp("  ", utc), Ok(None));
        assert!(timestamp("2024-13-01", utc).is_err());
        assert!(timestamp("yesterday", utc).is_err());
        let berlin = InputZone::parse("Europe/Berlin").unwrap();
        assert_eq!(
            timestamp("2024-07-01 12:00:00", berlin).unwrap().unwrap().to_rfc3339(),
            "2024-07-01T10:00:00+00:00"
        );
        assert!(timestamp("2024-03-31 02:30:00", berlin).is_err());
    }

    #[test]
    fn common_timestamps_read_as_the_formats_do() {
        let berlin = InputZone::parse("Europe/Berlin").unwrap();
        for value in [
            "2024-03-01",
            "2024-03-01 12:00:00",
            "2024-03-01T12:00:00",
            "2024-03-01 12:00:00.5",
            "2024-03-01T12:00:00.123456789",
            "2024-03-01T12:00:00Z",
            "2024-03-01T12:00:00.25Z",
            "2024-03-01T12:00:00+02:00",
            "2024-03-01 23:30:00-05:30",
            "2024-02-29 00:00:00",
            "2024-10-27 02:30:00",
            "1999-12-31T23:59:59.999999+00:00",
        ] {
            let (naive, offset) = common_timestamp(value.as_bytes()).unwrap_or_else(|| panic!("{value}"));
            for zone in [InputZone::Utc, berlin] {
                let fast = match offset {
                    None => zone.to_utc(naive).map(Some),
                    Some(o) => Ok(Some(naive.and_utc() - chrono::TimeDelta::seconds(o.into()))),
                };
                assert_eq!(fast, parse_timestamp_formats(value, zone), "{value}");
            }
        }
        // Other shapes and impossible values are left to the formats.
        for value in [
            "2024-02-30",
            "2024-03-01 24:00:00",
            "2024-03-01 12:00",
            "2024-03-01 12:00:60",
            "2024-03-01 12:00:00+01",
            "2024-03-01 12:00:00 UTC",
            "2024-03-01T12:00:00.1234567891",
            "2024-3-1",
            "20240301",
        ] {
            assert_eq!(common_timestamp(value.as_bytes()), None, "{value}");
        }
    }

    #[test]
    fn tag_lists() {
        assert_eq!(tags(" VIP; billing;;vip ", ';').unwrap(), vec!["billing", "vip"]);
        assert!(tags("", ';').unwrap().is_empty());
    }
}
