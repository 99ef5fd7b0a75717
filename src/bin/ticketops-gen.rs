//! Deterministic generator of synthetic helpdesk dumps in ticketops' import format, for
//! fixtures, tests and the benchmark. The same arguments always give the same bytes.
//!
//!   ticketops-gen tickets --rows 1000000 --seed 7 --bad-share 0.01 > tickets.csv
//!   ticketops-gen users --rows 500 > users.csv
//!   ticketops-gen comments --rows 1000 --tickets 200 > comments.csv

use std::io::{self, BufWriter, Write};

use clap::{Parser, ValueEnum};

#[derive(Parser)]
#[command(about = "Generate a deterministic synthetic CSV dump in the ticketops import format")]
struct Args {
    /// What to generate
    #[arg(value_enum)]
    kind: Kind,
    /// Number of data rows
    #[arg(long, default_value_t = 1000)]
    rows: u64,
    /// Seed of the pseudo-random sequence
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Share of deliberately bad rows (0.0 to 1.0), of every kind the importer rejects
    #[arg(long, default_value_t = 0.0)]
    bad_share: f64,
    /// Share of rows that repeat an earlier external_id (a later version of the ticket)
    #[arg(long, default_value_t = 0.0)]
    duplicate_share: f64,
    /// Distinct requesters (default: rows / 10, at least 10)
    #[arg(long)]
    users: Option<u64>,
    /// For comments: how many tickets (T-000001 …) the comments refer to
    #[arg(long, default_value_t = 200)]
    tickets: u64,
    /// The first day timestamps fall on (they span about two years from it); `--start 730d`
    /// means 730 days before today, for data that reaches the present
    #[arg(long, default_value = "2023-01-01", value_parser = parse_start)]
    start: i64,
}

/// When timestamps start, in seconds since the Unix epoch (set once from `--start`).
static START_EPOCH: std::sync::OnceLock<i64> = std::sync::OnceLock::new();

fn parse_start(value: &str) -> Result<i64, String> {
    if let Some(days) = value.strip_suffix('d').and_then(|d| d.parse::<i64>().ok()) {
        let today = chrono::Utc::now().date_naive();
        let start = today - chrono::Duration::days(days);
        return Ok(start.and_hms_opt(0, 0, 0).expect("midnight").and_utc().timestamp());
    }
    chrono::NaiveDate::parse_from_str(value, "%Y-%m-%d")
        .map(|d| d.and_hms_opt(0, 0, 0).expect("midnight").and_utc().timestamp())
        .map_err(|_| "a date YYYY-MM-DD or a number of days back like 730d".to_string())
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    Tickets,
    Users,
    Comments,
}

/// SplitMix64: tiny, fast and good enough for test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p && p > 0.0
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

const FIRST: &[&str] = &[
    "Ann", "Bob", "Chloé", "Dmitri", "Eve", "Farah", "Gustav", "Hiro", "Ines", "Jamal", "Kai", "Lena", "Mateo", "Nora",
    "Olu", "Priya", "Quinn", "Rosa", "Sven", "Tariq",
];
const LAST: &[&str] = &[
    "Smith", "Müller", "Okafor", "Garcia", "Kowalski", "Nguyen", "O'Brien", "Rossi", "Tanaka", "Dubois", "Larsen",
    "Haddad",
];
const SUBJECTS: &[&str] = &[
    "Cannot log in",
    "Refund request for order",
    "Printer on floor 3 is on fire",
    "Password reset link expired",
    "Invoice shows the wrong VAT",
    "App crashes on start",
    "Feature request: dark mode",
    "Shipping delayed, where is my parcel?",
    "Charged twice this month",
    "Export to CSV is empty",
    "\"Urgent\": account locked",
    "Question about the Pro plan, pricing",
];
const SENTENCES: &[&str] = &[
    "Hello, I tried again this morning and it still fails.",
    "Steps: open the app, click \"Sign in\", nothing happens.",
    "Please advise, this blocks our whole team.",
    "Attached is the screenshot; error code 0x80070005.",
    "Thanks in advance!",
    "We are on the Enterprise plan, invoice #4711.",
    "It worked fine until the update last week.",
];
const STATUSES: &[&str] = &[
    "new", "open", "open", "pending", "on_hold", "solved", "solved", "closed", "closed",
];
const STATUS_SPELLINGS: &[&str] = &["Open", "OPEN", "On Hold", "on-hold", "Solved", "Closed"];
const PRIORITIES: &[&str] = &[
    "low", "normal", "normal", "normal", "high", "urgent", "", "Medium", "Critical",
];
const CHANNELS: &[&str] = &["email", "email", "web", "chat", "phone", "social", "api", "other"];
const TAGS: &[&str] = &[
    "vip",
    "billing",
    "refund",
    "login",
    "bug",
    "feature",
    "printer",
    "shipping",
    "invoice",
    "mobile",
    "urgent",
    "enterprise",
    "churn-risk",
    "onboarding",
    "api",
    "sso",
];
const ORGS: &[&str] = &[
    "Acme Corp",
    "Globex",
    "Initech",
    "Umbrella GmbH",
    "Stark Industries",
    "Wayne Enterprises",
    "Tyrell",
    "Soylent, Inc.",
    "Hooli",
    "Vandelay Industries",
];

fn quote(field: &str) -> String {
    if field.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_string()
    }
}

fn timestamp(rng: &mut Rng, base_days: i64) -> (String, i64) {
    // Seconds since the start day.
    let secs = base_days * 86_400 + rng.below(86_400) as i64;
    let start = START_EPOCH.get().copied().unwrap_or(1_672_531_200);
    let dt = chrono::DateTime::from_timestamp(start + secs, 0).expect("in range");
    let text = match rng.below(3) {
        0 => dt.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        1 => dt.format("%Y-%m-%d %H:%M:%S").to_string(),
        _ => dt.format("%Y-%m-%dT%H:%M:%S+00:00").to_string(),
    };
    (text, secs)
}

fn person(rng: &mut Rng, n: u64, domain: &str) -> (String, String) {
    let first = FIRST[(n % FIRST.len() as u64) as usize];
    let last = LAST[((n / FIRST.len() as u64) % LAST.len() as u64) as usize];
    let email = format!(
        "{}.{}{}@{domain}",
        first.to_lowercase(),
        last.to_lowercase().replace('\'', ""),
        n
    );
    let email = if rng.chance(0.1) { email.to_uppercase() } else { email };
    (email, format!("{first} {last}"))
}

const HEADER: &str = "external_id,subject,description,status,priority,channel,requester_email,requester_name,assignee_email,organization,tags,created_at,updated_at,solved_at";

fn ticket_row(rng: &mut Rng, id: u64, users: u64) -> Vec<String> {
    let user = rng.below(users);
    let (email, name) = person(rng, user, "example.com");
    let status = if rng.chance(0.05) {
        rng.pick(STATUS_SPELLINGS)
    } else {
        rng.pick(STATUSES)
    };
    let day = rng.below(700) as i64;
    let (created, _) = timestamp(rng, day);
    let later = day + 1 + rng.below(30) as i64;
    let (updated, _) = timestamp(rng, later);
    let solved = if matches!(status, "solved" | "closed" | "Solved" | "Closed") {
        timestamp(rng, later).0
    } else {
        String::new()
    };
    let assignee = if rng.chance(0.8) {
        format!("agent{}@support.example.org", rng.below(40))
    } else {
        String::new()
    };
    let org = if rng.chance(0.7) {
        ORGS[(user % ORGS.len() as u64) as usize].to_string()
    } else {
        String::new()
    };
    let mut tags = Vec::new();
    for _ in 0..rng.below(4) {
        tags.push(rng.pick(TAGS));
    }
    let mut description: Vec<&str> = Vec::new();
    for _ in 0..1 + rng.below(3) {
        description.push(rng.pick(SENTENCES));
    }
    let sep = if rng.chance(0.2) { "\n" } else { " " };
    vec![
        format!("T-{id:06}"),
        format!("{} ({})", rng.pick(SUBJECTS), id % 97),
        description.join(sep),
        status.to_string(),
        rng.pick(PRIORITIES).to_string(),
        rng.pick(CHANNELS).to_string(),
        email,
        if rng.chance(0.05) { String::new() } else { name },
        assignee,
        org,
        tags.join(";"),
        created,
        updated,
        solved,
    ]
}

/// Spoils one field of a good row in one of the ways real exports are broken.
fn spoil(rng: &mut Rng, row: &mut Vec<String>) -> Option<Vec<u8>> {
    match rng.below(8) {
        0 => row[3] = "escalated-to-mars".into(),
        1 => row[11] = "31/02/2024 25:61".into(),
        2 => row[6] = "not-an-email".into(),
        3 => row[1] = String::new(),
        4 => {
            row.pop(); // wrong number of fields
        }
        5 => row[1] = "x".repeat(501),
        6 => row[4] = "whenever".into(),
        _ => {
            // invalid UTF-8 in the subject
            let mut bytes = row.iter().map(|f| quote(f)).collect::<Vec<_>>().join(",").into_bytes();
            let pos = bytes.iter().position(|&b| b == b',').unwrap_or(0) + 2;
            bytes.insert(pos, 0xFF);
            return Some(bytes);
        }
    }
    None
}

fn main() -> io::Result<()> {
    let args = Args::parse();
    START_EPOCH.set(args.start).expect("set once");
    let mut rng = Rng(args.seed);
    let mut out = BufWriter::with_capacity(1 << 20, io::stdout().lock());
    let users = args.users.unwrap_or((args.rows / 10).max(10));
    let result = (|| -> io::Result<()> {
        match args.kind {
            Kind::Tickets => {
                writeln!(out, "{HEADER}")?;
                let mut next_id = 1;
                for _ in 0..args.rows {
                    let id = if next_id > 1 && rng.chance(args.duplicate_share) {
                        1 + rng.below(next_id - 1)
                    } else {
                        next_id += 1;
                        next_id - 1
                    };
                    let mut row = ticket_row(&mut rng, id, users);
                    if rng.chance(args.bad_share)
                        && let Some(bytes) = spoil(&mut rng, &mut row)
                    {
                        out.write_all(&bytes)?;
                        out.write_all(b"\n")?;
                        continue;
                    }
                    let line: Vec<String> = row.iter().map(|f| quote(f)).collect();
                    writeln!(out, "{}", line.join(","))?;
                }
            }
            Kind::Users => {
                writeln!(out, "email,name,role,organization")?;
                for n in 0..args.rows {
                    let (email, name) = person(&mut rng, n, "example.com");
                    let role = if rng.chance(0.05) { "agent" } else { "customer" };
                    let org = if rng.chance(0.7) {
                        ORGS[(n % ORGS.len() as u64) as usize]
                    } else {
                        ""
                    };
                    let email = if rng.chance(args.bad_share) {
                        "broken-address".to_string()
                    } else {
                        email
                    };
                    writeln!(out, "{},{},{role},{}", quote(&email), quote(&name), quote(org))?;
                }
            }
            Kind::Comments => {
                writeln!(
                    out,
                    "external_id,ticket_external_id,author_email,body,public,created_at"
                )?;
                for n in 0..args.rows {
                    let ticket = 1 + rng.below(args.tickets.max(1));
                    let ticket = if rng.chance(args.bad_share) {
                        args.tickets + 1000 + ticket
                    } else {
                        ticket
                    };
                    let author = rng.below(users);
                    let (email, _) = person(&mut rng, author, "example.com");
                    let body = rng.pick(SENTENCES);
                    let public = if rng.chance(0.8) { "true" } else { "false" };
                    let day = rng.below(700) as i64;
                    let (created, _) = timestamp(&mut rng, day);
                    writeln!(
                        out,
                        "C-{:07},T-{ticket:06},{},{},{public},{created}",
                        n + 1,
                        quote(&email),
                        quote(body)
                    )?;
                }
            }
        }
        out.flush()
    })();
    match result {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}
