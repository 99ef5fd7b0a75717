//! How another system's export is read: header renames (`--map`), value aliases
//! (`--value-map`), date formats (`--date-format`), and a map file holding all three for
//! exports that would need a dozen flags (`--map-file`, TOML; examples in `fixtures/maps/`).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;

use crate::exit::UsageError;

/// A source header read as a field.
#[derive(Debug, Clone, PartialEq)]
pub struct Rename {
    pub header: String,
    pub field: String,
    /// From `--map`: a header the file lacks is an error (a typo, or the wrong file). A map
    /// file describes a whole family of exports, and any one export may lack some columns.
    pub required: bool,
}

/// A source value rewritten before it is checked, per field.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueAlias {
    pub field: String,
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, Default)]
pub struct Mapping {
    /// `--map` first, then the map file's: the first rename of a header wins.
    pub renames: Vec<Rename>,
    /// The map file's first, then `--value-map`: the last alias of a value wins.
    pub values: Vec<ValueAlias>,
    /// strftime formats tried in order before the built-in timestamp shapes.
    pub date_formats: Vec<String>,
}

/// The map file as written.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MapFile {
    #[serde(default)]
    date_formats: Vec<String>,
    /// `"Source Header" = "field"`
    #[serde(default)]
    columns: BTreeMap<String, String>,
    /// `[values.status]` then `"Source Value" = "value"`
    #[serde(default)]
    values: BTreeMap<String, BTreeMap<String, String>>,
}

impl Mapping {
    /// The flags, with a map file's entries after them (the flags win).
    pub fn new(
        maps: &[String],
        value_maps: &[String],
        date_formats: &[String],
        map_file: Option<&Path>,
    ) -> anyhow::Result<Mapping> {
        let mut mapping = Mapping::default();
        for spec in maps {
            let (header, field) = spec
                .rsplit_once('=')
                .map(|(from, to)| (from.trim(), to.trim()))
                .filter(|(from, to)| !from.is_empty() && !to.is_empty())
                .ok_or_else(|| UsageError(format!("--map {spec:?} is not of the form 'Source Header=field'")))?;
            mapping.renames.push(Rename {
                header: header.into(),
                field: field.into(),
                required: true,
            });
        }
        mapping.date_formats.extend(date_formats.iter().cloned());
        if let Some(path) = map_file {
            let file = read_map_file(path)?;
            mapping
                .renames
                .extend(file.columns.into_iter().map(|(header, field)| Rename {
                    header,
                    field,
                    required: false,
                }));
            for (field, aliases) in file.values {
                mapping.values.extend(aliases.into_iter().map(|(from, to)| ValueAlias {
                    field: field.clone(),
                    from,
                    to,
                }));
            }
            mapping.date_formats.extend(file.date_formats);
        }
        for spec in value_maps {
            let parsed = spec
                .split_once(':')
                .and_then(|(field, rest)| rest.rsplit_once('=').map(|(from, to)| (field, from, to)));
            let Some((field, from, to)) = parsed else {
                return Err(UsageError(format!(
                    "--value-map {spec:?} is not of the form 'field:Source Value=value'"
                ))
                .into());
            };
            mapping.values.push(ValueAlias {
                field: field.trim().into(),
                from: from.trim().into(),
                to: to.trim().into(),
            });
        }
        for format in &mapping.date_formats {
            check_date_format(format).map_err(UsageError)?;
        }
        Ok(mapping)
    }

    /// Only `--map`-style renames, for the tests of the column mapping.
    #[cfg(test)]
    pub fn renames(pairs: &[(&str, &str)]) -> Mapping {
        Mapping {
            renames: pairs
                .iter()
                .map(|(header, field)| Rename {
                    header: header.to_string(),
                    field: field.to_string(),
                    required: true,
                })
                .collect(),
            ..Mapping::default()
        }
    }
}

fn read_map_file(path: &Path) -> anyhow::Result<MapFile> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the map file {}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        UsageError(format!(
            "the map file {} is not valid: {}",
            path.display(),
            e.to_string().trim_end()
        ))
        .into()
    })
}

/// A strftime format chrono can parse with: one with an unknown specifier (`%Q`) would
/// fail on every row instead of once here.
fn check_date_format(format: &str) -> Result<(), String> {
    use chrono::format::{Item, StrftimeItems};
    if format.trim().is_empty() {
        return Err("--date-format is empty".into());
    }
    if StrftimeItems::new(format).any(|item| matches!(item, Item::Error)) {
        return Err(format!(
            "--date-format {format:?} is not a valid strftime format (e.g. '%d/%b/%y %I:%M %p')"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_come_first_for_renames_and_last_for_values() {
        let dir = std::env::temp_dir().join(format!("ticketops-mapping-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("m.toml");
        std::fs::write(
            &file,
            "date_formats = [\"%d/%b/%y %I:%M %p\"]\n[columns]\n\"Issue key\" = \"external_id\"\n\
             [values.status]\n\"To Do\" = \"open\"\n",
        )
        .unwrap();
        let m = Mapping::new(
            &["Key=external_id".into()],
            &["status:To Do=new".into()],
            &["%Y".into()],
            Some(&file),
        )
        .unwrap();
        assert_eq!(m.renames[0].header, "Key");
        assert!(m.renames[0].required && !m.renames[1].required);
        assert_eq!(m.values.last().unwrap().to, "new");
        assert_eq!(m.date_formats, vec!["%Y".to_string(), "%d/%b/%y %I:%M %p".to_string()]);
        std::fs::write(&file, "[colums]\n").unwrap();
        let err = Mapping::new(&[], &[], &[], Some(&file)).unwrap_err().to_string();
        assert!(err.contains("is not valid") && err.contains("colums"), "{err}");
        assert!(Mapping::new(&[], &[], &["%Q".into()], None).is_err());
    }
}
