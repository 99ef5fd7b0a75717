//! Organizations, users and tags referenced by imported rows: resolved to ids through
//! client-side caches, the missing ones upserted in one set-based statement per batch.

use std::collections::HashMap;

use diesel::pg::CopyFormat;
use diesel::prelude::ExecuteCopyFromDsl as _;
use diesel::sql_types::{Array, BigInt, Bool, Nullable, Text};
use diesel::{PgConnection, QueryResult, QueryableByName, RunQueryDsl, sql_query};

use super::copy_binary::{BinaryCopy, write_error};
use super::initial_load::{Definition, Rebuild, drop_for_rebuild, reserve_id_block};
use crate::models::UserRole;
use crate::schema::users;

/// Caches are cleared past this many entries, so memory stays bounded on exports with
/// millions of distinct users.
const CACHE_LIMIT: usize = 100_000;

#[derive(QueryableByName)]
struct IdName {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    name: String,
}

#[derive(QueryableByName)]
struct StoredUser {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    email: String,
    #[diesel(sql_type = Text)]
    role: String,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    has_name: bool,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    has_organization: bool,
}

/// What the cache remembers of a user: enough to know whether a row could still change it.
/// Aligned to 4 bytes, so that with its 12-byte key an entry takes 24 bytes instead of 32
/// (3.3 instead of 4.3 MB at 100,000 users).
#[derive(Debug, Clone, Copy)]
#[repr(C, packed(4))]
struct CachedUser {
    id: i64,
    role: UserRole,
    has_name: bool,
    has_organization: bool,
}

impl CachedUser {
    /// A reference changes a stored user only by promoting a customer, or by filling a
    /// missing name or organization; anything else is already true.
    fn could_change(&self, r: &UserRef<'_>) -> bool {
        (self.role == UserRole::Customer && r.role > self.role)
            || (!self.has_name && r.name.is_some())
            || (!self.has_organization && r.organization_id.is_some())
    }
}

/// A user as an imported row refers to it.
#[derive(Debug, Clone)]
pub struct UserRef<'a> {
    pub email: &'a str,
    pub name: Option<&'a str>,
    pub role: UserRole,
    pub organization_id: Option<i64>,
}

pub struct EntityCache {
    // Keyed by a hash of the name, not the name itself: a million-row import has ~100,000
    // distinct e-mails, and their strings were most of the import's memory growth.
    organizations: KeyMap<i64>,
    users: KeyMap<CachedUser>,
    tags: KeyMap<i64>,
    /// Set by `lock_users_for_load`: no other transaction writes users until ours ends.
    users_locked: bool,
    /// The cache holds every user in the table (it was empty when locked, and the cache has
    /// not been cleared since): a user the cache lacks does not exist.
    users_complete: bool,
    /// Every user the load inserted into a table empty when locked: once the cache has
    /// forgotten some, a user missing from this too does not exist either.
    inserted_users: Option<Box<InsertedUsers>>,
    /// Changes to existing users held back under the lock, by user id.
    user_changes: HashMap<i64, UserChange>,
    /// What `lock_users_for_load` dropped from an empty users table, to recreate.
    users_rebuild: Rebuild,
    /// The organizations and tags caches are cleared, before a batch is resolved, once they
    /// hold more than this; the users cache is sized for it.
    limit: usize,
}

impl Default for EntityCache {
    fn default() -> Self {
        EntityCache::with_limit(CACHE_LIMIT)
    }
}

impl EntityCache {
    /// A cache for about `limit` users, organizations and tags each (`default()`: 100,000).
    pub fn with_limit(limit: usize) -> EntityCache {
        EntityCache {
            organizations: KeyMap::default(),
            // Sized once for the limit: growing it held the old table and the new one at once,
            // the import's peak (6.5 MB at 100,000 users). Its pages become resident as users
            // fill them.
            users: KeyMap::with_capacity_and_hasher(limit, Default::default()),
            tags: KeyMap::default(),
            users_locked: false,
            users_complete: false,
            inserted_users: None,
            user_changes: HashMap::new(),
            users_rebuild: Rebuild::default(),
            limit,
        }
    }

    /// Keeps a 1/`writers` share of the limit (one of several writers, each with its cache);
    /// what is cached is forgotten.
    pub fn share_limit(&mut self, writers: usize) {
        self.limit = self.limit.div_ceil(writers.max(1));
        self.users = KeyMap::with_capacity_and_hasher(self.limit, Default::default());
        self.clear();
    }

    /// Forgets everything, e.g. after a rolled-back batch whose inserts are gone.
    pub fn clear(&mut self) {
        self.organizations.clear();
        self.users.clear();
        self.tags.clear();
        self.users_complete = false;
        // Only after a rollback: what was held back is gone with the rows it was for.
        self.user_changes.clear();
    }

    pub fn organization_id(&self, name: &str) -> Option<i64> {
        self.organizations.get(&key(name)).copied()
    }

    pub fn user_id(&self, email: &str) -> Option<i64> {
        self.users.get(&key(email)).map(|u| u.id)
    }

    pub fn tag_id(&self, name: &str) -> Option<i64> {
        self.tags.get(&key(name)).copied()
    }

    pub fn ensure_organizations<'a>(
        &mut self,
        conn: &mut PgConnection,
        names: impl IntoIterator<Item = &'a str>,
    ) -> QueryResult<()> {
        // Bounded before the batch is resolved, never during: what it finds cached must stay.
        bound_cache(&mut self.organizations, self.limit);
        let missing = missing_keys(&self.organizations, names);
        if missing.is_empty() {
            return Ok(());
        }
        for row in upsert_names(conn, "organizations", &missing)? {
            self.organizations.insert(key(&row.name), row.id);
        }
        Ok(())
    }

    pub fn ensure_tags<'a>(
        &mut self,
        conn: &mut PgConnection,
        names: impl IntoIterator<Item = &'a str>,
    ) -> QueryResult<()> {
        bound_cache(&mut self.tags, self.limit);
        let missing = missing_keys(&self.tags, names);
        if missing.is_empty() {
            return Ok(());
        }
        for row in upsert_names(conn, "tags", &missing)? {
            self.tags.insert(key(&row.name), row.id);
        }
        Ok(())
    }

    /// Makes sure every user exists. A new user is inserted with the given role; an existing
    /// customer referred to as an agent becomes an agent (never the other way round). A name
    /// or organization only fills a missing one: the first non-empty value in file order
    /// wins and is never overwritten, so the result does not depend on batch boundaries, a
    /// resume, or how often the file is imported.
    pub fn ensure_users(&mut self, conn: &mut PgConnection, refs: &[UserRef<'_>]) -> QueryResult<()> {
        // Room for the batch's users is made before it is resolved, never during: the users
        // it finds cached are not read again, and its rows are written with their cached ids.
        // The map's capacity is what the table allocated once holds without growing; growing
        // would hold the old table and the new one at once (see `with_limit`). Forgetting only
        // some users would leave tombstones that make the next insert grow it all the same.
        // Only the batch's users the cache lacks take room: a batch of users it holds already
        // (a re-import, larger batches) must not empty it.
        let keys: Vec<NameKey> = refs.iter().map(|r| key(r.email)).collect();
        let uncached = keys.iter().filter(|k| !self.users.contains_key(k)).count();
        if self.users.len() + uncached > self.users.capacity() {
            // A lookup by e-mail of the users forgotten needs the unique index again.
            self.rebuild_user_keys(conn)?;
            self.users.clear();
            self.users_complete = false;
        }
        // One entry per e-mail: the strongest role, the first non-empty name and organization.
        let mut wanted: KeyMap<UserRef<'_>> = KeyMap::default();
        for (r, k) in refs.iter().zip(keys) {
            if self.users.get(&k).is_some_and(|cached| !cached.could_change(r)) {
                continue;
            }
            let entry = wanted.entry(k).or_insert_with(|| r.clone());
            if r.role > entry.role {
                entry.role = r.role;
            }
            if entry.name.is_none() {
                entry.name = r.name;
            }
            if entry.organization_id.is_none() {
                entry.organization_id = r.organization_id;
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        // Read first: on a re-import nearly every user exists already, and a plain read neither
        // writes nor locks them, where ON CONFLICT DO UPDATE locks each conflicting row. Not
        // needed when the cache holds every user there is.
        if !self.users_complete {
            // (Of an initial load into an empty table, only those it may have inserted: with
            // 1M distinct requesters, reading each new one first took half the load's time.)
            let unknown: Vec<&str> = wanted
                .iter()
                .filter(|(k, _)| !self.users.contains_key(k))
                .filter(|(k, _)| self.inserted_users.as_ref().is_none_or(|f| f.may_contain(k)))
                .map(|(_, r)| r.email)
                .collect();
            self.read_users(conn, &unknown)?;
        }
        wanted.retain(|k, r| self.users.get(k).is_none_or(|cached| cached.could_change(r)));
        if wanted.is_empty() {
            return Ok(());
        }
        if self.users_locked {
            // No other transaction can write users: the new ones go in with COPY, and changes
            // to existing ones are held back and written together (`flush_held_users`).
            let mut new = Vec::new();
            for (k, r) in wanted {
                match self.users.get_mut(&k) {
                    Some(cached) => hold_change(&mut self.user_changes, cached, &r),
                    None => new.push(r),
                }
            }
            self.copy_new_users(conn, &new)?;
            if self.user_changes.len() > self.limit / 5 {
                self.write_user_changes(conn)?;
            }
            return Ok(());
        }
        // In e-mail order, as every writer of an import (--jobs) inserts them: two that insert
        // the same new users wait for each other in one order, never in a cycle.
        let mut wanted: Vec<UserRef<'_>> = wanted.into_values().collect();
        wanted.sort_unstable_by(|a, b| a.email.cmp(b.email));
        self.upsert_users(conn, &wanted)
    }

    /// For `--initial-load`: locks users against other writers until the transaction ends
    /// (readers are not blocked), so that users missing from the table can be inserted with
    /// a binary COPY instead of INSERT … ON CONFLICT (measured: 0.56 s against 1.4 s for
    /// 100,000 users upserted batch by batch). When the table is empty, the cache then knows
    /// every user there is and the read before each batch's insert is skipped, until the
    /// cache is next cleared.
    pub fn lock_users_for_load(&mut self, conn: &mut PgConnection) -> anyhow::Result<()> {
        #[derive(QueryableByName)]
        struct Empty {
            #[diesel(sql_type = Bool)]
            empty: bool,
        }
        crate::db::lock_tables(conn, &["users"], "SHARE ROW EXCLUSIVE")?;
        let users: Empty = sql_query("SELECT NOT EXISTS (SELECT 1 FROM users) AS empty").get_result(conn)?;
        self.users_locked = true;
        self.users_complete = users.empty;
        self.inserted_users = users.empty.then(Default::default);
        self.users.clear();
        if users.empty {
            // Nothing needs the secondary indexes, the e-mail key or the organization key while
            // the cache knows every user: the users go into a bare table (primary key kept)
            // and they are rebuilt once (measured: 0.31 s against 0.77 s for 100,000 users).
            let definitions: Vec<Definition> = sql_query(
                "SELECT c.conname::text AS name, 'users' AS table_name, pg_get_constraintdef(c.oid) AS definition,
                        c.contype::text AS kind
                 FROM pg_constraint c WHERE c.conrelid = 'users'::regclass AND c.contype IN ('u', 'f')
                 UNION ALL
                 SELECT i.indexrelid::regclass::text, 'users', pg_get_indexdef(i.indexrelid), NULL
                 FROM pg_index i
                 WHERE i.indrelid = 'users'::regclass AND NOT i.indisprimary
                   AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)",
            )
            .load(conn)?;
            self.users_rebuild = drop_for_rebuild(conn, definitions)?;
        }
        Ok(())
    }

    /// Recreates the keys `lock_users_for_load` dropped from an empty users table, before the
    /// cache forgets users: lookups by e-mail need the e-mail key again. The other indexes and
    /// the foreign key wait for the load's end (kept up row by row meanwhile, they took the
    /// COPYs of 1M new users from ~2 to 5.4 s).
    fn rebuild_user_keys(&mut self, conn: &mut PgConnection) -> QueryResult<()> {
        let keys = self.users_rebuild.keys;
        self.users_rebuild.keys = 0;
        for statement in self.users_rebuild.keys_and_indexes.drain(..keys) {
            sql_query(statement).execute(conn)?;
        }
        Ok(())
    }

    /// Recreates what `lock_users_for_load` dropped from an empty users table and is still
    /// to be recreated, at the load's end.
    fn rebuild_users(&mut self, conn: &mut PgConnection) -> QueryResult<()> {
        let rebuild = std::mem::take(&mut self.users_rebuild);
        for statement in rebuild.keys_and_indexes.iter().chain(&rebuild.foreign_keys) {
            sql_query(statement).execute(conn)?;
        }
        Ok(())
    }

    /// Finishes what `lock_users_for_load` started: writes the held-back changes and
    /// rebuilds what it dropped. Must run before the load's transaction commits, and before
    /// the foreign keys to users are validated.
    pub fn flush_held_users(&mut self, conn: &mut PgConnection) -> QueryResult<()> {
        self.write_user_changes(conn)?;
        self.rebuild_users(conn)
    }

    /// Writes the changes to existing users held back under the lock, in one statement by
    /// id: the same fill-ins and promotions the upsert would have made batch by batch (35,000
    /// of 100,000 users in the benchmark's dump: 0.43 s, against 0.55 s in 200 upserts).
    fn write_user_changes(&mut self, conn: &mut PgConnection) -> QueryResult<()> {
        if self.user_changes.is_empty() {
            return Ok(());
        }
        let changes = std::mem::take(&mut self.user_changes);
        let mut ids = Vec::with_capacity(changes.len());
        let mut names = Vec::with_capacity(changes.len());
        let mut roles = Vec::with_capacity(changes.len());
        let mut orgs = Vec::with_capacity(changes.len());
        for (id, change) in changes {
            ids.push(id);
            names.push(change.name);
            roles.push(change.role.as_str());
            orgs.push(change.organization_id);
        }
        // The role arrives as user_role and the time as a parameter: Citus (users is a
        // reference table there) takes no cast or now() inside CASE or COALESCE of an UPDATE.
        sql_query(
            "UPDATE users AS u SET
                 name = coalesce(nullif(u.name, ''), c.name),
                 role = CASE WHEN u.role = 'customer' THEN c.role ELSE u.role END,
                 organization_id = coalesce(u.organization_id, c.organization_id),
                 updated_at = $5
             FROM unnest($1::bigint[], $2::text[], $3::user_role[], $4::bigint[]) AS c(id, name, role, organization_id)
             WHERE u.id = c.id",
        )
        .bind::<Array<BigInt>, _>(&ids)
        .bind::<Array<Nullable<Text>>, _>(&names)
        .bind::<Array<Text>, _>(&roles)
        .bind::<Array<Nullable<BigInt>>, _>(&orgs)
        .bind::<diesel::sql_types::Timestamptz, _>(chrono::Utc::now())
        .execute(conn)?;
        Ok(())
    }
}

/// A change to an existing user, held back until `flush_held_users`.
struct UserChange {
    name: Option<String>,
    role: UserRole,
    organization_id: Option<i64>,
}

/// Records what `r` changes in the cached user (as the upsert would: a missing name or
/// organization filled, a customer promoted) and updates the cache to match.
fn hold_change(changes: &mut HashMap<i64, UserChange>, cached: &mut CachedUser, r: &UserRef<'_>) {
    let change = changes.entry(cached.id).or_insert_with(|| UserChange {
        name: None,
        role: cached.role,
        organization_id: None,
    });
    // The first value in file order wins, also when the cache forgot the user meanwhile and
    // read it back without the change.
    if !cached.has_name
        && let Some(name) = stored_name(r)
    {
        change.name.get_or_insert_with(|| name.to_string());
        cached.has_name = true;
    }
    if cached.role == UserRole::Customer && r.role > cached.role {
        change.role = change.role.max(r.role);
        cached.role = r.role;
    }
    if !cached.has_organization
        && let Some(org) = r.organization_id
    {
        change.organization_id.get_or_insert(org);
        cached.has_organization = true;
    }
}

impl EntityCache {
    /// Upserts users: inserts the new, fills and promotes the existing (see `ensure_users`).
    fn upsert_users(&mut self, conn: &mut PgConnection, wanted: &[UserRef<'_>]) -> QueryResult<()> {
        if wanted.is_empty() {
            return Ok(());
        }
        let mut emails = Vec::with_capacity(wanted.len());
        let mut names = Vec::with_capacity(wanted.len());
        let mut roles = Vec::with_capacity(wanted.len());
        let mut orgs = Vec::with_capacity(wanted.len());
        for r in wanted {
            emails.push(r.email.to_string());
            names.push(r.name.map(str::to_string));
            roles.push(r.role.as_str().to_string());
            orgs.push(r.organization_id);
        }
        let rows: Vec<StoredUser> = sql_query(UPSERT_USERS_SQL)
            .bind::<Array<Text>, _>(&emails)
            .bind::<Array<Nullable<Text>>, _>(&names)
            .bind::<Array<Text>, _>(&roles)
            .bind::<Array<Nullable<BigInt>>, _>(&orgs)
            .load(conn)?;
        self.remember_users(rows);
        // Users the upsert left alone (nothing to fill after all, e.g. written meanwhile by
        // another import) are not in its RETURNING: read them.
        let unseen: Vec<&str> = emails
            .iter()
            .map(String::as_str)
            .filter(|e| !self.users.contains_key(&key(e)))
            .collect();
        self.read_users(conn, &unseen)?;
        if let Some(missing) = emails.iter().find(|e| !self.users.contains_key(&key(e))) {
            // Inserted by a concurrent transaction after our snapshot: the caller retries.
            return Err(diesel::result::Error::QueryBuilderError(
                format!("user {missing} was created concurrently; retry the batch").into(),
            ));
        }
        Ok(())
    }

    /// Inserts users known not to exist, under `lock_users_for_load`'s lock, with one binary
    /// COPY and ids from the table's sequence.
    fn copy_new_users(&mut self, conn: &mut PgConnection, new: &[UserRef<'_>]) -> QueryResult<()> {
        if new.is_empty() {
            return Ok(());
        }
        // One call for the batch's ids (a nextval per id cost 0.22 s per 100,000).
        let ids = reserve_id_block(conn, "users", new.len())?;
        diesel::copy_from(users::table)
            .from_raw_data(
                (
                    users::id,
                    users::email,
                    users::name,
                    users::role,
                    users::organization_id,
                ),
                |out| -> QueryResult<()> {
                    let mut copy = BinaryCopy::start(out).map_err(write_error)?;
                    for (r, id) in new.iter().zip(ids.clone()) {
                        (|| -> std::io::Result<()> {
                            copy.row(5)?;
                            copy.int8(id)?;
                            copy.text(r.email)?;
                            copy.opt_text(stored_name(r))?;
                            copy.text(r.role.as_str())?;
                            copy.opt_int8(r.organization_id)
                        })()
                        .map_err(write_error)?;
                    }
                    copy.finish().map_err(write_error)
                },
            )
            .with_format(CopyFormat::Binary)
            .execute(conn)?;
        for (r, id) in new.iter().zip(ids) {
            if let Some(inserted) = &mut self.inserted_users {
                inserted.insert(&key(r.email));
            }
            let cached = CachedUser {
                id,
                role: r.role,
                has_name: stored_name(r).is_some(),
                has_organization: r.organization_id.is_some(),
            };
            self.users.insert(key(r.email), cached);
        }
        Ok(())
    }

    /// Reads the stored users among `emails` (by the unique e-mail index) into the cache.
    fn read_users(&mut self, conn: &mut PgConnection, emails: &[&str]) -> QueryResult<()> {
        if emails.is_empty() {
            return Ok(());
        }
        let stored: Vec<StoredUser> = sql_query(
            "SELECT id, email, role::text AS role, coalesce(name, '') <> '' AS has_name,
                    organization_id IS NOT NULL AS has_organization
             FROM users WHERE email = ANY($1)",
        )
        .bind::<Array<Text>, _>(emails)
        .load(conn)?;
        self.remember_users(stored);
        Ok(())
    }

    fn remember_users(&mut self, rows: Vec<StoredUser>) {
        for row in rows {
            let role = UserRole::from_label(&row.role).unwrap_or(UserRole::Customer);
            let cached = CachedUser {
                id: row.id,
                role,
                has_name: row.has_name,
                has_organization: row.has_organization,
            };
            self.users.insert(key(&row.email), cached);
        }
    }
}

const UPSERT_USERS_SQL: &str = "
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) AS i(email, name, role, organization_id)
), written AS (
    INSERT INTO users AS u (email, name, role, organization_id, updated_at)
    SELECT email, nullif(name, ''), role::user_role, organization_id, now() FROM input
    -- The time comes in with the row: Citus takes only column references and immutable
    -- expressions in DO UPDATE SET.
    ON CONFLICT (email) DO UPDATE SET
        name = coalesce(nullif(u.name, ''), excluded.name),
        role = CASE WHEN u.role = 'customer' THEN excluded.role ELSE u.role END,
        organization_id = coalesce(u.organization_id, excluded.organization_id),
        updated_at = excluded.updated_at
    WHERE ((u.name IS NULL OR u.name = '') AND excluded.name IS NOT NULL)
       OR (u.role = 'customer' AND excluded.role <> 'customer')
       OR (u.organization_id IS NULL AND excluded.organization_id IS NOT NULL)
    RETURNING u.id, u.email, u.role::text AS role, coalesce(u.name, '') <> '' AS has_name,
              u.organization_id IS NOT NULL AS has_organization
)
SELECT id, email, role, has_name, has_organization FROM written";

/// Inserts the names that do not exist yet into `table` (organizations or tags, both with a
/// unique `name`) and returns the ids of all of them.
fn upsert_names(conn: &mut PgConnection, table: &str, names: &[String]) -> QueryResult<Vec<IdName>> {
    let sql = format!(
        "WITH input AS (SELECT DISTINCT unnest($1::text[]) AS name),
              inserted AS (INSERT INTO {table} (name) SELECT name FROM input ORDER BY name
                           ON CONFLICT (name) DO NOTHING RETURNING id, name)
         SELECT id, name FROM inserted
         UNION ALL SELECT t.id, t.name FROM {table} t JOIN input USING (name)"
    );
    let rows: Vec<IdName> = sql_query(&sql).bind::<Array<Text>, _>(names).load(conn)?;
    if rows.len() < names.len() {
        // A concurrent transaction inserted one after our snapshot; a second look sees it.
        let again: Vec<IdName> = sql_query(format!("SELECT id, name FROM {table} WHERE name = ANY($1)"))
            .bind::<Array<Text>, _>(names)
            .load(conn)?;
        return Ok(again);
    }
    Ok(rows)
}

/// A map keyed by `key()` hashes. They are hashes already, so the map uses their low bits
/// as they are instead of hashing them again (SipHash was 13 % of an import's CPU time).
type KeyMap<V> = HashMap<NameKey, V, std::hash::BuildHasherDefault<PreHashed>>;

/// A 96-bit key for a name: the first 96 bits of its xxh3-128 hash. A collision among even
/// a billion names is not a practical possibility (about one in 10^11), and 4-byte aligned
/// words keep the map's entries small.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NameKey([u32; 3]);

impl std::hash::Hash for NameKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(u64::from(self.0[0]) | u64::from(self.0[1]) << 32);
    }
}

/// A map keyed by strings (a batch's external ids), hashed with xxh3 in one pass instead of
/// SipHash: the read-ahead builds and the writer probes one for every batch.
pub type StrMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<StrHasher>>;
pub type StrSet<K> = std::collections::HashSet<K, std::hash::BuildHasherDefault<StrHasher>>;

/// Hashes what a `str` writes (its bytes, then one 0xff byte) with xxh3.
#[derive(Default)]
pub struct StrHasher(u64);

impl std::hash::Hasher for StrHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0 = xxhash_rust::xxh3::xxh3_64_with_seed(bytes, self.0);
    }

    fn write_u8(&mut self, byte: u8) {
        self.0 = self.0.rotate_left(8) ^ u64::from(byte);
    }
}

/// A hasher for keys that are hashes already (xxh3): it passes them through.
#[derive(Default)]
pub(crate) struct PreHashed(u64);

impl std::hash::Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 hashes are hashed here (`NameKey` writes one); fold anything else rather
        // than lose it.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

/// The e-mails of the users an initial load inserted, as a Bloom filter of a fixed 1 MiB: no
/// false negatives (every one inserted answers maybe), and a false positive only costs a
/// lookup — about one in 30 at 1M users, one in 7 at 2M, more beyond, where it approaches
/// looking every one up as before. Each of a key's three 32-bit words (xxh3 bits) picks one bit.
struct InsertedUsers {
    words: Vec<u64>,
}

impl InsertedUsers {
    const BITS: u32 = 1 << 23;

    fn bits(key: &NameKey) -> impl Iterator<Item = usize> + '_ {
        key.0.iter().map(|&word| (word & (Self::BITS - 1)) as usize)
    }

    fn insert(&mut self, key: &NameKey) {
        for bit in Self::bits(key) {
            self.words[bit / 64] |= 1 << (bit % 64);
        }
    }

    fn may_contain(&self, key: &NameKey) -> bool {
        Self::bits(key).all(|bit| self.words[bit / 64] & (1 << (bit % 64)) != 0)
    }
}

impl Default for InsertedUsers {
    fn default() -> Self {
        InsertedUsers {
            words: vec![0; (Self::BITS / 64) as usize],
        }
    }
}

/// The key for a name (see `NameKey`): xxh3 is several times faster than two SipHash passes.
fn key(name: &str) -> NameKey {
    let hash = xxhash_rust::xxh3::xxh3_128(name.as_bytes());
    NameKey([hash as u32, (hash >> 32) as u32, (hash >> 64) as u32])
}

fn missing_keys<'a, V>(cache: &KeyMap<V>, keys: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut missing: Vec<String> = keys
        .into_iter()
        .filter(|k| !cache.contains_key(&key(k)))
        .map(str::to_string)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    missing
}

/// A user's name as the upsert stores it: an empty name is no name.
fn stored_name<'a>(r: &UserRef<'a>) -> Option<&'a str> {
    r.name.filter(|n| !n.is_empty())
}

fn bound_cache<V>(cache: &mut KeyMap<V>, limit: usize) {
    if cache.len() > limit {
        cache.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_user_takes_24_bytes_with_its_key() {
        // What the users cache costs per slot (the import's largest structure at 100,000 users).
        assert_eq!(std::mem::size_of::<(NameKey, CachedUser)>(), 24);
        assert_eq!(std::mem::size_of::<(NameKey, i64)>(), 24);
    }

    #[test]
    fn writers_share_the_cache_limit() {
        let mut cache = EntityCache::with_limit(100_000);
        cache.share_limit(3);
        assert_eq!(cache.limit, 33_334);
        assert!(cache.users.capacity() >= 33_334 && cache.users.capacity() < 100_000);
    }

    #[test]
    fn the_inserted_users_filter_knows_every_user_inserted_and_few_others() {
        let mut inserted = InsertedUsers::default();
        let emails: Vec<String> = (0..1_000_000).map(|i| format!("user{i}@example.com")).collect();
        for email in &emails {
            inserted.insert(&key(email));
        }
        assert!(emails.iter().all(|e| inserted.may_contain(&key(e))));
        let others = (0..100_000)
            .filter(|i| inserted.may_contain(&key(&format!("other{i}@example.com"))))
            .count();
        assert!(others < 5_000, "{others} of 100,000 others taken for inserted");
    }

    #[test]
    fn keys_of_different_names_differ_and_of_one_name_agree() {
        assert_eq!(key("a@example.com"), key("a@example.com"));
        assert_ne!(key("a@example.com"), key("b@example.com"));
    }
}
