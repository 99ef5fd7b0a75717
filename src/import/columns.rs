//! Which column of a file feeds which field of an import kind (header names, `--map`, a map
//! file, repeated columns of a list field), and the value aliases applied before parsing.

use std::borrow::Cow;
use std::collections::HashMap;

use anyhow::bail;

use super::mapping::{Mapping, Rename, ValueAlias};
use super::source::FieldSpec;
use crate::exit::UsageError;

/// Header names compare case-, space- and punctuation-insensitively: `External ID`,
/// `external_id` and `ExternalId` are the same column.
pub fn header_key(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(|c| c.to_lowercase())
        .collect()
}

/// Which column of the file feeds each field of the import kind.
#[derive(Debug, Clone)]
pub struct ColumnMap {
    /// Indexed like the kind's field list: the file column, if any.
    pub positions: Vec<Option<usize>>,
    /// Further columns of list fields: (field, column), after the field's first column.
    pub more: Vec<(usize, usize)>,
    /// What joins the values of a list field's columns.
    pub list_separator: char,
    /// Header columns that feed no field (columns starting with `_` are not listed), each
    /// name once.
    pub ignored: Vec<String>,
    pub header_len: usize,
}

impl ColumnMap {
    pub fn resolve(
        header: &[String],
        fields: &[FieldSpec],
        mapping: &Mapping,
        list_separator: char,
    ) -> anyhow::Result<ColumnMap> {
        let renames = &mapping.renames;
        for Rename { field, .. } in renames {
            if !fields.iter().any(|f| f.name == field) {
                let known: Vec<&str> = fields.iter().map(|f| f.name).collect();
                return Err(UsageError(format!(
                    "--map (or the map file) names an unknown field {field:?}; the fields are: {}",
                    known.join(", ")
                ))
                .into());
            }
        }
        // A --map whose column is not in the file is a typo, or the wrong file: either way
        // the import would not do what was asked.
        for Rename {
            header: source, field, ..
        } in renames.iter().filter(|r| r.required)
        {
            if !header.iter().any(|h| header_key(h) == header_key(source)) {
                return Err(UsageError(format!(
                    "--map '{source}={field}' names a column {source:?} that the header does not have (header: {})",
                    header
                        .iter()
                        .map(|h| crate::output::escape_controls(h))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
                .into());
            }
        }
        let mut positions = vec![None; fields.len()];
        let mut more = Vec::new();
        let mut ignored: Vec<String> = Vec::new();
        for (column, name) in header.iter().enumerate() {
            if name.trim().starts_with('_') {
                continue; // our own _record/_line/_error columns from a rejects file
            }
            let key = header_key(name);
            let target = renames
                .iter()
                .find(|r| header_key(&r.header) == key)
                .map(|r| r.field.as_str())
                .or_else(|| fields.iter().find(|f| header_key(f.name) == key).map(|f| f.name));
            match target.and_then(|t| fields.iter().position(|f| f.name == t)) {
                Some(field) if positions[field].is_none() => positions[field] = Some(column),
                Some(field) if fields[field].list => more.push((field, column)),
                Some(field) => bail!(
                    "columns {:?} and {:?} both map to the field {}",
                    header[positions[field].unwrap()],
                    name,
                    fields[field].name
                ),
                // A column without a header (a spreadsheet's trailing commas) is named by place.
                None if name.trim().is_empty() => ignored.push(format!("(column {}, no header)", column + 1)),
                None if ignored.contains(name) => {}
                None => ignored.push(name.clone()),
            }
        }
        let missing: Vec<&str> = fields
            .iter()
            .zip(&positions)
            .filter(|(f, p)| f.required && p.is_none())
            .map(|(f, _)| f.name)
            .collect();
        if !missing.is_empty() {
            let hint = header_hint(header);
            bail!(
                "the header has no column for the required field(s) {} (header: {}); use --map 'Header Name=field'{hint}",
                missing.join(", "),
                header.join(", ")
            );
        }
        Ok(ColumnMap {
            positions,
            more,
            list_separator,
            ignored,
            header_len: header.len(),
        })
    }

    pub fn has(&self, field: usize) -> bool {
        self.positions[field].is_some()
    }
}

/// What a header without the required columns most likely is, for the error: "" when nothing
/// is recognized.
fn header_hint(header: &[String]) -> String {
    if header.iter().any(|name| name.contains('\0')) {
        // Every other byte zero: UTF-16, as Excel's "Unicode Text" saves a sheet.
        return " — the file looks UTF-16 (as Excel's \"Unicode Text\" saves it): convert it to UTF-8 first, \
                e.g. iconv -f UTF-16 -t UTF-8 export.txt > export.csv (such files are tab-separated: --delimiter tab)"
            .to_owned();
    }
    if let [first, ..] = header
        && first.trim().to_ascii_lowercase().starts_with("sep=")
    {
        // Excel's first line "sep=;" declares the delimiter; the header is the next line.
        return format!(
            " — the first line ({:?}) is Excel's delimiter declaration: remove it (e.g. tail -n +2) and give that \
             delimiter with --delimiter",
            header.join(",")
        );
    }
    match header {
        // A one-column header holding another common delimiter: the file is not split.
        [only] => [(';', "';'"), ('\t', "tab"), ('|', "'|'")]
            .into_iter()
            .find(|(c, _)| only.contains(*c))
            .map(|(_, name)| format!(" — the header looks {name}-separated: try --delimiter {name}"))
            .unwrap_or_default(),
        _ => String::new(),
    }
}

/// `--value-map 'status:Pending Customer Response=pending'`: source values rewritten before
/// parsing, per field, compared trimmed and case-insensitively.
#[derive(Debug, Clone, Default)]
pub struct ValueMap {
    map: HashMap<(String, String), String>,
}

impl ValueMap {
    pub fn new(aliases: &[ValueAlias], fields: &[FieldSpec]) -> anyhow::Result<ValueMap> {
        let mut map = HashMap::new();
        for ValueAlias { field, from, to } in aliases {
            if !fields.iter().any(|f| f.name == field) {
                let known: Vec<&str> = fields.iter().map(|f| f.name).collect();
                return Err(UsageError(format!(
                    "a value map ('{field}:{from}={to}') names an unknown field {field:?}; the fields are: {}",
                    known.join(", ")
                ))
                .into());
            }
            map.insert((field.clone(), from.trim().to_lowercase()), to.trim().to_string());
        }
        Ok(ValueMap { map })
    }

    pub fn apply<'a>(&'a self, field: &str, value: Cow<'a, str>) -> Cow<'a, str> {
        if self.map.is_empty() {
            return value;
        }
        match self.map.get(&(field.to_string(), value.trim().to_lowercase())) {
            Some(mapped) => Cow::Borrowed(mapped.as_str()),
            None => value,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::source::{Encoding, RecordFields};
    use csv::ByteRecord;

    const FIELDS: &[FieldSpec] = &[
        FieldSpec::required("external_id").indexed(),
        FieldSpec::required("subject"),
        FieldSpec::optional("tags"),
    ];

    #[test]
    fn header_names_are_forgiving() {
        let header: Vec<String> = ["External ID", " SUBJECT ", "Extra", "_error", " "]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let map = ColumnMap::resolve(&header, FIELDS, &Mapping::default(), ';').unwrap();
        assert_eq!(map.positions, vec![Some(0), Some(1), None]);
        assert_eq!(
            map.ignored,
            vec!["Extra".to_string(), "(column 5, no header)".to_string()]
        );
    }

    #[test]
    fn a_header_split_on_another_delimiter_gets_a_hint() {
        let header = vec!["external_id;subject;status".to_string()];
        let err = ColumnMap::resolve(&header, FIELDS, &Mapping::default(), ';')
            .unwrap_err()
            .to_string();
        assert!(err.contains("try --delimiter ';'"), "{err}");
        let header = vec!["Ticket".to_string(), "Title".to_string()];
        let err = ColumnMap::resolve(&header, FIELDS, &Mapping::default(), ';')
            .unwrap_err()
            .to_string();
        assert!(!err.contains("--delimiter"), "{err}");
        // UTF-16LE with its BOM, as read as UTF-8: "external_id\tsubject" in two-byte units.
        let header = vec!["\u{fffd}\u{fffd}e\0x\0t\0e\0r\0".to_string()];
        let err = ColumnMap::resolve(&header, FIELDS, &Mapping::default(), ',')
            .unwrap_err()
            .to_string();
        assert!(err.contains("looks UTF-16") && err.contains("iconv -f UTF-16"), "{err}");
        // Excel's delimiter line before the header, split on the delimiter or not.
        for first_line in [vec!["sep=;"], vec!["sep=", ""]] {
            let header: Vec<String> = first_line.iter().map(|s| s.to_string()).collect();
            let err = ColumnMap::resolve(&header, FIELDS, &Mapping::default(), ',')
                .unwrap_err()
                .to_string();
            assert!(err.contains("Excel's delimiter declaration"), "{err}");
        }
    }

    #[test]
    fn renames_and_missing_required() {
        let header: Vec<String> = ["Ticket Number", "Title"].iter().map(|s| s.to_string()).collect();
        let err = ColumnMap::resolve(&header, FIELDS, &Mapping::default(), ';')
            .unwrap_err()
            .to_string();
        assert!(err.contains("external_id, subject"), "{err}");
        let renames = Mapping::renames(&[("ticket number", "external_id"), ("Title", "subject")]);
        let map = ColumnMap::resolve(&header, FIELDS, &renames, ';').unwrap();
        assert_eq!(map.positions, vec![Some(0), Some(1), None]);
    }

    #[test]
    fn repeated_columns_of_a_list_field_are_joined_and_of_others_refused() {
        let fields = &[FieldSpec::required("external_id"), FieldSpec::optional("tags").list()];
        let header: Vec<String> = ["Key", "Labels", "Labels", "Labels", "Other", "Other"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mapping = Mapping::renames(&[("Key", "external_id"), ("Labels", "tags")]);
        let map = ColumnMap::resolve(&header, fields, &mapping, ';').unwrap();
        assert_eq!(map.positions, vec![Some(0), Some(1)]);
        assert_eq!(map.more, vec![(1, 2), (1, 3)]);
        assert_eq!(map.ignored, vec!["Other".to_string()]);
        let record = ByteRecord::from(vec!["K-1", "a", "", "b c", "x", "y"]);
        let value_map = ValueMap::default();
        let row = RecordFields {
            record: &record,
            columns: &map,
            fields,
            encoding: Encoding::Utf8,
            value_map: &value_map,
        };
        assert_eq!(row.get(1).unwrap().as_deref(), Some("a;b c"));
        let not_a_list = &[FieldSpec::required("external_id"), FieldSpec::optional("subject")];
        let mapping = Mapping::renames(&[("Key", "external_id"), ("Labels", "subject")]);
        let err = ColumnMap::resolve(&header, not_a_list, &mapping, ';').unwrap_err();
        assert!(err.to_string().contains("both map to the field subject"), "{err}");
    }

    #[test]
    fn value_maps() {
        let alias = |field: &str| ValueAlias {
            field: field.into(),
            from: "Foo Bar".into(),
            to: "baz".into(),
        };
        let vm = ValueMap::new(&[alias("external_id")], FIELDS).unwrap();
        assert_eq!(vm.apply("external_id", Cow::Borrowed(" foo bar ")), "baz");
        assert_eq!(vm.apply("subject", Cow::Borrowed("foo bar")), "foo bar");
        assert!(ValueMap::new(&[alias("nonsense")], FIELDS).is_err());
    }
}
