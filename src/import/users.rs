//! `import users`: email, name, role, organization — upserted by e-mail.
//!
//! Each batch is one set-based statement: rows that differ from the stored user (or are new)
//! are merged with `INSERT … ON CONFLICT (email) DO UPDATE … WHERE <differs> RETURNING`, and
//! the before-image of every updated user goes to `audit_log` in the same statement. A blank
//! name, role or organization never erases a stored one.

use std::borrow::Cow;

use anyhow::Context as _;
use diesel::sql_types::{Array, BigInt, Bool, Nullable, Text};
use diesel::{PgConnection, QueryableByName, RunQueryDsl, sql_query};

use super::entities::EntityCache;
use super::normalize;
use super::source::{FieldSpec, RecordFields, RowError};
use super::{Counts, ImportKind, Numbered, ParseOptions, WriterReject};
use crate::models::UserRole;

const EMAIL: usize = 0;
const NAME: usize = 1;
const ROLE: usize = 2;
const ORGANIZATION: usize = 3;

pub const FIELDS: &[FieldSpec] = &[
    FieldSpec::required("email").indexed(),
    FieldSpec::optional("name"),
    FieldSpec::optional("role"),
    FieldSpec::optional("organization").indexed(),
];

#[derive(Debug, Clone)]
pub struct UserRow {
    pub email: String,
    pub name: Option<String>,
    /// `None` when blank: new users become customers, stored ones keep their role.
    pub role: Option<UserRole>,
    pub organization: Option<String>,
}

pub struct UserImport {
    undelete: bool,
    cache: EntityCache,
}

impl UserImport {
    pub fn new(undelete: bool) -> UserImport {
        UserImport {
            undelete,
            cache: EntityCache::default(),
        }
    }
}

#[derive(QueryableByName)]
struct MergeCounts {
    #[diesel(sql_type = BigInt)]
    inserted: i64,
    #[diesel(sql_type = BigInt)]
    updated: i64,
    #[diesel(sql_type = BigInt)]
    skipped_deleted: i64,
}

const MERGE_USERS_SQL: &str = concat!(
    "
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])
        AS i(email, name, role, organization_id)
), target AS MATERIALIZED (
    SELECT i.email,
           coalesce(i.name, e.name) AS name,
           coalesce(i.role::user_role, e.role, 'customer') AS role,
           coalesce(i.organization_id, e.organization_id) AS organization_id,
           CASE WHEN $5 THEN NULL ELSE e.deleted_at END AS deleted_at,
           e.id IS NULL AS is_new,
           -- The before-image is read here, with the row it decides on: read again after the
           -- write, on Citus (which runs a statement's parts one after the other) it held the
           -- new values, and an undo found nothing to put back.
           to_jsonb(e) AS before_image
    FROM input i LEFT JOIN users e ON e.email = i.email
    WHERE e.id IS NULL
       OR ((e.deleted_at IS NULL OR $5)
           AND (e.name, e.role, e.organization_id, e.deleted_at) IS DISTINCT FROM
               (coalesce(i.name, e.name), coalesce(i.role::user_role, e.role), coalesce(i.organization_id, e.organization_id),
                CASE WHEN $5 THEN NULL ELSE e.deleted_at END))
), written AS (
    INSERT INTO users AS u (email, name, role, organization_id, deleted_at, updated_at)
    SELECT email, name, role, organization_id, deleted_at, now() FROM target
    -- The time comes in with the row: Citus takes only column references and immutable
    -- expressions in DO UPDATE SET.
    ON CONFLICT (email) DO UPDATE SET
        name = excluded.name, role = excluded.role, organization_id = excluded.organization_id,
        deleted_at = excluded.deleted_at, updated_at = excluded.updated_at
    WHERE (u.name, u.role, u.organization_id, u.deleted_at) IS DISTINCT FROM
          (excluded.name, excluded.role, excluded.organization_id, excluded.deleted_at)
    RETURNING u.id, u.email, (u.xmax = 0) AS inserted, CASE WHEN u.xmax = 0 THEN NULL ELSE to_jsonb(u) END AS after_image
), audited AS (
    INSERT INTO audit_log (operation_id, table_name, row_id, action, before, after)
    SELECT $6, 'users', w.id, CASE WHEN w.inserted THEN '", crate::audit_action!(Insert), "' ELSE '", crate::audit_action!(Update), "' END,
           CASE WHEN w.inserted THEN NULL ELSE t.before_image END, w.after_image
    FROM written w LEFT JOIN target t ON t.email = w.email
)
SELECT (SELECT count(*) FROM written WHERE inserted) AS inserted,
       (SELECT count(*) FROM written WHERE NOT inserted) AS updated,
       (SELECT count(*) FROM input i JOIN users e ON e.email = i.email
         WHERE e.deleted_at IS NOT NULL AND NOT $5) AS skipped_deleted"
);

impl ImportKind for UserImport {
    type Row = UserRow;
    type Prefetched = ();
    const NAME: &'static str = "users";
    const FIELDS: &'static [FieldSpec] = FIELDS;

    fn parse(fields: &RecordFields<'_>, _options: &ParseOptions) -> Result<UserRow, RowError> {
        let email = fields
            .parse(EMAIL, "invalid e-mail", normalize::email)?
            .ok_or_else(|| RowError::new(Some("email"), "missing required value", "email is empty"))?;
        let role = match fields.non_empty(ROLE)? {
            Some(_) => Some(fields.parse(ROLE, "invalid role", normalize::user_role)?),
            None => None,
        };
        Ok(UserRow {
            email,
            // Or the display name of a `Name <address>` e-mail.
            name: match fields.non_empty(NAME)? {
                Some(name) => Some(name.into_owned()),
                None => fields.get(EMAIL)?.and_then(|v| normalize::display_name(&v)),
            },
            role,
            organization: fields.non_empty(ORGANIZATION)?.map(|v| v.into_owned()),
        })
    }

    const KEY_COLUMN: Option<(&'static str, &'static str)> = Some(("users", "email"));

    fn key(row: &UserRow) -> Option<&str> {
        Some(&row.email)
    }

    fn normalize_key(raw: &str) -> Cow<'_, str> {
        Cow::Owned(raw.trim().to_lowercase())
    }

    fn reset(&mut self) {
        self.cache.clear();
    }

    fn another_writer(&self) -> Option<UserImport> {
        Some(UserImport::new(self.undelete))
    }

    fn share_caches(&mut self, writers: usize) {
        self.cache.share_limit(writers);
    }

    fn write_batch(
        &mut self,
        conn: &mut PgConnection,
        op_id: i64,
        rows: &[Numbered<UserRow>],
        _prefetched: Option<()>,
        counts: &mut Counts,
    ) -> anyhow::Result<Vec<WriterReject>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        self.cache
            .ensure_organizations(conn, rows.iter().filter_map(|r| r.row.organization.as_deref()))
            .context("cannot resolve organizations")?;
        let emails: Vec<&str> = rows.iter().map(|r| r.row.email.as_str()).collect();
        let names: Vec<Option<&str>> = rows.iter().map(|r| r.row.name.as_deref()).collect();
        let roles: Vec<Option<&str>> = rows.iter().map(|r| r.row.role.map(UserRole::as_str)).collect();
        let orgs: Vec<Option<i64>> = rows
            .iter()
            .map(|r| {
                r.row
                    .organization
                    .as_deref()
                    .and_then(|o| self.cache.organization_id(o))
            })
            .collect();
        let merged: MergeCounts = sql_query(MERGE_USERS_SQL)
            .bind::<Array<Text>, _>(&emails)
            .bind::<Array<Nullable<Text>>, _>(&names)
            .bind::<Array<Nullable<Text>>, _>(&roles)
            .bind::<Array<Nullable<BigInt>>, _>(&orgs)
            .bind::<Bool, _>(self.undelete)
            .bind::<BigInt, _>(op_id)
            .get_result(conn)
            .context("cannot merge users")?;
        let (inserted, updated, skipped) = (
            merged.inserted as u64,
            merged.updated as u64,
            merged.skipped_deleted as u64,
        );
        counts.inserted += inserted;
        counts.updated += updated;
        counts.skipped_deleted += skipped;
        counts.unchanged += rows.len() as u64 - inserted - updated - skipped;
        Ok(Vec::new())
    }
}
