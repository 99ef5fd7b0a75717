//! The layering of `src/` as a test, so that it cannot silently rot: commands → engines →
//! database plumbing. It reads the sources (no database needed) and fails on
//! - a command module (`src/cmd/<name>…`) that uses another command module,
//! - anything below the commands (an engine, the plumbing) that uses `cli`, `cmd` or
//!   `context` (engines return results, the commands print them),
//! - a cycle among the modules (each command counts as one module, so does each top-level one).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::support::project_dir;

/// The unit a source file belongs to: `cmd::<name>` for commands, the top-level module else.
fn unit_of(relative: &Path) -> Option<String> {
    let parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    match parts.as_slice() {
        [only] if only == "lib" || only == "main" => None,
        [first, ..] if first == "bin" => None,
        [cmd, name, ..] if cmd == "cmd" && name != "mod" => Some(format!("cmd::{name}")),
        [first, ..] => Some(first.clone()),
        [] => None,
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The units a file's code refers to through `crate::…` paths (comments left out).
fn references(code: &str, unit: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut add = |path: &str| {
        let mut segments = path.split("::").map(str::trim);
        let Some(first) = segments.next().filter(|s| !s.is_empty()) else {
            return;
        };
        if first == "cmd" {
            if let Some(name) = segments
                .next()
                .filter(|s| s.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            {
                found.insert(format!("cmd::{name}"));
            } else {
                found.insert("cmd".to_string());
            }
        } else {
            found.insert(first.to_string());
        }
    };
    for line in code.lines() {
        let line = line.split("//").next().unwrap_or("");
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    add(item.trim());
                }
            } else {
                let end = rest
                    .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                    .unwrap_or(rest.len());
                add(&rest[..end]);
            }
        }
    }
    found.remove(unit);
    found
}

#[test]
fn commands_engines_and_plumbing_point_one_way() {
    let src = project_dir().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut problems = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let Some(unit) = unit_of(relative) else { continue };
        let code = std::fs::read_to_string(file).unwrap();
        let refs = references(&code, &unit);
        for target in &refs {
            let is_command = |u: &str| u.starts_with("cmd::") || u == "cmd";
            if is_command(&unit) && is_command(target) {
                problems.push(format!("{}: command {unit} uses command {target}", relative.display()));
            }
            let below_commands = unit != "cli" && unit != "context" && !is_command(&unit);
            if below_commands && (is_command(target) || target == "cli" || target == "context") {
                problems.push(format!(
                    "{}: {unit} (below the commands) uses {target}",
                    relative.display()
                ));
            }
        }
        graph.entry(unit).or_default().extend(refs);
    }
    // Cycles: a depth-first search that reports each back edge with the path that closes it.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
        problems: &mut Vec<String>,
    ) {
        state.insert(node.to_string(), 1);
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            match state.get(next.as_str()).copied().unwrap_or(0) {
                0 => visit(next, graph, state, path, problems),
                1 => {
                    let start = path.iter().position(|p| p == next).unwrap();
                    problems.push(format!("cycle: {} -> {next}", path[start..].join(" -> ")));
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(node.to_string(), 2);
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if state.get(node.as_str()).copied().unwrap_or(0) == 0 {
            visit(node, &graph, &mut state, &mut Vec::new(), &mut problems);
        }
    }
    assert!(
        problems.is_empty(),
        "the module layering is broken:\n  {}",
        problems.join("\n  ")
    );
}
