//! `import comments`: email, name, role, organization. Upserts by e-mail.
use super::source::{ColumnMap, FieldSpec, RecordFields, RowError};
use super::{Counts, ImportKind, Numbered, ParseOptions, WriterReject};

#[derive(Default)]
pub struct CommentImport {
    undelete: bool,
}
impl CommentImport {
    pub fn new(undelete: bool) -> Self {
        CommentImport { undelete }
    }
}
pub struct CommentRow;
impl ImportKind for CommentImport {
    type Row = CommentRow;
    const NAME: &'static str = "comments";
    const FIELDS: &'static [FieldSpec] = &[];
    fn parse(_f: &RecordFields<'_>, _o: &ParseOptions) -> Result<CommentRow, RowError> {
        todo!()
    }
    fn key(_r: &CommentRow) -> Option<&str> {
        None
    }
    fn configure(&mut self, _c: &ColumnMap) {
        let _ = self.undelete;
    }
    fn write_batch(
        &mut self,
        _c: &mut diesel::PgConnection,
        _o: i64,
        _r: Vec<Numbered<CommentRow>>,
        _n: &mut Counts,
    ) -> anyhow::Result<Vec<WriterReject>> {
        todo!()
    }
}
