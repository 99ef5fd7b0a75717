//! `import users`: email, name, role, organization. Upserts by e-mail.
use super::source::{ColumnMap, FieldSpec, RecordFields, RowError};
use super::{Counts, ImportKind, Numbered, ParseOptions, WriterReject};

pub struct UserImport {
    undelete: bool,
}
impl UserImport {
    pub fn new(undelete: bool) -> Self {
        UserImport { undelete }
    }
}
pub struct UserRow;
impl ImportKind for UserImport {
    type Row = UserRow;
    const NAME: &'static str = "users";
    const FIELDS: &'static [FieldSpec] = &[];
    fn parse(_f: &RecordFields<'_>, _o: &ParseOptions) -> Result<UserRow, RowError> {
        todo!()
    }
    fn key(_r: &UserRow) -> Option<&str> {
        None
    }
    fn configure(&mut self, _c: &ColumnMap) {
        let _ = self.undelete;
    }
    fn write_batch(
        &mut self,
        _c: &mut diesel::PgConnection,
        _o: i64,
        _r: Vec<Numbered<UserRow>>,
        _n: &mut Counts,
    ) -> anyhow::Result<Vec<WriterReject>> {
        todo!()
    }
}
