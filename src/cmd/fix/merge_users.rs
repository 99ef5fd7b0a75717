//! `fix merge-users --from EMAIL --into EMAIL`: moves the duplicate user's tickets (as
//! requester and as assignee) and comments to the canonical user, then soft-deletes the
//! duplicate. Every moved row and the user's soft-delete are audited, so `undo` reverts the
//! whole merge.

use anyhow::{Context as _, bail};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Text, Timestamptz};
use diesel::{PgConnection, sql_query};
use serde_json::json;

use super::{Changed, SAMPLE_SIZE, Sample, print_dry_run};
use crate::args::{ApplyArgs, BatchArgs, confirm};
use crate::audit::FIX_ACTION;
use crate::context::Context;
use crate::db::{self};
use crate::exit::{self, UsageError};
use crate::job::{Job, Step};
use crate::layout::Layout;
use crate::schema::users;

pub const HELP: &str = "\
References move in batches (tickets first, then comments); the duplicate is soft-deleted in
the last, short transaction, which first checks that nothing refers to it any more. A merge
is undone with `ticketops undo ID` like any fix.

Examples:
  ticketops fix merge-users --from jane.doe@old-domain.com --into jane.doe@example.com
  ticketops fix merge-users --from jane.doe@old-domain.com --into jane.doe@example.com --apply --yes";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The duplicate user, whose tickets and comments move and who is soft-deleted
    #[arg(long, value_name = "EMAIL")]
    pub from: String,
    /// The canonical user who keeps everything
    #[arg(long, value_name = "EMAIL")]
    pub into: String,
    #[command(flatten)]
    pub apply: ApplyArgs,
    #[command(flatten)]
    pub batching: BatchArgs,
}

const KIND: &str = "fix merge-users";

#[derive(QueryableByName)]
struct References {
    #[diesel(sql_type = BigInt)]
    tickets: i64,
    #[diesel(sql_type = BigInt)]
    comments: i64,
}

/// A user found by e-mail: id and whether soft-deleted.
fn find_user(conn: &mut PgConnection, email: &str, flag: &str) -> anyhow::Result<(i64, bool)> {
    let found: Option<(i64, Option<chrono::DateTime<chrono::Utc>>)> = users::table
        .select((users::id, users::deleted_at))
        .filter(users::email.eq(email))
        .first(conn)
        .optional()?;
    let (id, deleted_at) = found.ok_or_else(|| UsageError(format!("{flag}: there is no user {email}")))?;
    Ok((id, deleted_at.is_some()))
}

/// A few of the tickets that move, before → after (requester and assignee).
fn merge_sample(conn: &mut PgConnection, from: i64, into_email: &str) -> anyhow::Result<Vec<Sample>> {
    Ok(sql_query(format!(
        "SELECT t.external_id,
                jsonb_build_object('requester', r.email, 'assignee', a.email) AS before,
                jsonb_build_object('requester', CASE WHEN t.requester_id = $1 THEN $2 ELSE r.email END,
                                   'assignee', CASE WHEN t.assignee_id = $1 THEN $2 ELSE a.email END) AS after
         FROM tickets t JOIN users r ON r.id = t.requester_id LEFT JOIN users a ON a.id = t.assignee_id
         WHERE t.requester_id = $1 OR t.assignee_id = $1
         ORDER BY t.id LIMIT {SAMPLE_SIZE}"
    ))
    .bind::<BigInt, _>(from)
    .bind::<Text, _>(into_email)
    .load(conn)?)
}

fn print_merge_dry_run(
    ctx: &Context,
    from_email: &str,
    into_email: &str,
    from_deleted: bool,
    refs: &References,
    would_change: u64,
    sample: &[Sample],
) -> anyhow::Result<()> {
    let described = format!(
        "{} ticket(s) and {} comment(s) move from {from_email} to {into_email}; {from_email} is {}",
        refs.tickets,
        refs.comments,
        if from_deleted {
            "already soft-deleted"
        } else {
            "soft-deleted"
        }
    );
    print_dry_run(
        ctx,
        KIND,
        &described,
        would_change,
        sample,
        json!({"from": from_email, "into": into_email, "tickets": refs.tickets, "comments": refs.comments}),
    )
}

fn references(conn: &mut PgConnection, from: i64) -> anyhow::Result<References> {
    sql_query(
        "SELECT (SELECT count(*) FROM tickets WHERE requester_id = $1 OR assignee_id = $1) AS tickets,
                (SELECT count(*) FROM comments WHERE author_id = $1) AS comments",
    )
    .bind::<BigInt, _>(from)
    .get_result(conn)
    .context("cannot count the duplicate's tickets and comments")
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<i32> {
    let (from_email, into_email) = (args.from.trim().to_lowercase(), args.into.trim().to_lowercase());
    let pool = ctx.pool(2)?;
    let mut conn = db::get(&pool)?;
    let (from, from_deleted) = find_user(&mut conn, &from_email, "--from")?;
    let (into, into_deleted) = find_user(&mut conn, &into_email, "--into")?;
    if from == into {
        return Err(UsageError(format!("--from and --into are the same user ({from_email})")).into());
    }
    if into_deleted {
        return Err(UsageError(format!(
            "--into: {into_email} is soft-deleted; merge into a live user (restore it first)"
        ))
        .into());
    }
    let refs = references(&mut conn, from)?;
    let would_change = (refs.tickets + refs.comments) as u64 + u64::from(!from_deleted);
    let asking = !args.apply.yes && std::io::IsTerminal::is_terminal(&std::io::stdin());
    if !args.apply.apply || asking {
        let sample = merge_sample(&mut conn, from, &into_email)?;
        if args.apply.apply {
            // The person asked sees what would change before answering.
            eprintln!("{KIND} ({from_email} into {into_email})");
            super::sample_table(&sample, refs.tickets as u64, &mut std::io::stderr().lock())?;
        } else {
            print_merge_dry_run(
                ctx,
                &from_email,
                &into_email,
                from_deleted,
                &refs,
                would_change,
                &sample,
            )?;
            return Ok(exit::SUCCESS);
        }
    }
    if !confirm(&args.apply, KIND, would_change)? {
        ctx.info("not confirmed; nothing was written");
        return Ok(exit::FAILURE);
    }
    let job = Job::start(
        &pool,
        ctx.database_url()?,
        &mut conn,
        KIND,
        json!({"from": from_email, "into": into_email, "batching": args.batching.settings().to_json()}),
    )?;
    let op = job.operation_id;

    let layout = Layout::of(&mut conn)?;
    let merge = Merge { layout, op, from, into };
    let mut phase = 0;
    let (mut tickets, mut comments, mut users_deleted) = (0i64, 0i64, 0i64);
    // The tickets are taken in id order, each batch after the last one's: from the start every
    // time, the scan in id order passed again over all the tickets moved before (a batch
    // of an agent's 60,000 tickets took 20 ms at first and 240 ms at the end). One more
    // pass from the start picks up a ticket a batch could not move (its row changed meanwhile).
    let (mut after_ticket, mut passed_over, mut second_pass) = (0i64, false, false);
    let stats = job.run(
        &mut conn,
        &args.batching.settings(),
        &ctx.watch(&job.kind).with_total(Some(would_change)),
        |conn, limit| {
            if layout.distributed() {
                // Citus refuses to write users (a reference table that tickets and comments
                // refer to) in a transaction that read those in parallel: one connection per worker.
                sql_query("SET LOCAL citus.multi_shard_modify_mode TO 'sequential'").execute(conn)?;
            }
            let limit = limit as i64;
            let (moved, candidates) = match phase {
                0 => {
                    let (moved, candidates, last) = merge
                        .move_tickets(conn, limit, after_ticket)
                        .context("cannot move the tickets")?;
                    tickets += moved;
                    after_ticket = last;
                    passed_over |= moved < candidates;
                    if candidates < limit && passed_over && !second_pass {
                        (after_ticket, second_pass) = (0, true);
                        return Ok(Step {
                            rows: moved as u64,
                            done: false,
                        });
                    }
                    (moved, candidates)
                }
                1 => {
                    let moved = merge.move_comments(conn, limit).context("cannot move the comments")?;
                    comments += moved.0;
                    moved
                }
                _ => {
                    // Rows written by the application since the moves started would be left behind.
                    let left = references(conn, from)?;
                    if left.tickets + left.comments > 0 {
                        bail!(
                            "{} ticket(s) and {} comment(s) refer to {from_email} again (written while the merge ran); \
                         run the merge again",
                            left.tickets,
                            left.comments
                        );
                    }
                    let n = merge
                        .delete_user(conn)
                        .context("cannot soft-delete the duplicate user")?;
                    users_deleted += n;
                    phase += 1;
                    return Ok(Step {
                        rows: n as u64,
                        done: true,
                    });
                }
            };
            if candidates < limit {
                phase += 1;
            }
            Ok(Step {
                rows: moved as u64,
                done: false,
            })
        },
    );
    ctx.finish_job(job.finish(
        &mut conn,
        stats,
        json!({"from": from_email, "into": into_email, "tickets": tickets, "comments": comments,
               "users_deleted": users_deleted}),
    ))
}

// Rows are locked and waited for (within the lock timeout, then retried) rather than skipped:
// a skipped row would keep referring to the user about to be deleted. The next batch's rows are
// read first and then locked by id — on Citus shard by shard, as it takes row locks only in
// one-shard statements — and changed where they still refer to the duplicate.

/// One merge: the duplicate `from` into `into`, recorded as operation `op`.
#[derive(Clone, Copy)]
struct Merge {
    layout: Layout,
    op: i64,
    from: i64,
    into: i64,
}

impl Merge {
    /// Moves the next `limit` tickets of `from` (as requester or assignee) after id `after` to
    /// `into`, audited; returns how many moved, how many were candidates, and the last
    /// candidate's id (0 without candidates). On the partitioned layout each
    /// ticket is locked, read and updated by (id, created_at) in its one partition: by id alone,
    /// every partition was probed for each id (a batch of 3,000 at 1M tickets: 0.8 s against
    /// 0.35).
    fn move_tickets(&self, conn: &mut PgConnection, limit: i64, after: i64) -> anyhow::Result<(i64, i64, i64)> {
        let Merge { layout, op, from, into } = *self;
        #[derive(QueryableByName)]
        struct Candidate {
            #[diesel(sql_type = BigInt)]
            id: i64,
            #[diesel(sql_type = Timestamptz)]
            created_at: chrono::DateTime<chrono::Utc>,
        }
        let candidates: Vec<Candidate> = sql_query(
            "SELECT id, created_at FROM tickets WHERE (requester_id = $1 OR assignee_id = $1) AND id > $3
             ORDER BY id LIMIT $2",
        )
        .bind::<BigInt, _>(from)
        .bind::<BigInt, _>(limit)
        .bind::<BigInt, _>(after)
        .load(conn)?;
        let ids: Vec<i64> = candidates.iter().map(|c| c.id).collect();
        let by_partition = layout.partitioned();
        let (locked, created): (Vec<i64>, Vec<chrono::DateTime<chrono::Utc>>) = if by_partition {
            let created: Vec<_> = candidates.iter().map(|c| c.created_at).collect();
            sql_query(
                "SELECT t.id, t.created_at FROM unnest($1::bigint[], $2::timestamptz[]) k(id, created_at)
                 CROSS JOIN LATERAL (SELECT t.id, t.created_at FROM tickets t
                                     WHERE t.id = k.id AND t.created_at = k.created_at OFFSET 0 FOR UPDATE) t",
            )
            .bind::<Array<BigInt>, _>(&ids)
            .bind::<Array<Timestamptz>, _>(&created)
            .load::<Candidate>(conn)?
            .into_iter()
            .map(|c| (c.id, c.created_at))
            .unzip()
        } else {
            (layout.lock_tickets(conn, &ids, "FOR UPDATE")?, Vec::new())
        };
        // Audit images: the old values from the target, the new ones as the UPDATE returns
        // them. On partitions the UPDATE runs as nested loops (a probe a ticket) and returns the
        // old values too, since a nested loop joining the batch to itself would be quadratic.
        let (target_from, in_batch, same_ticket, returned_old, audited_from, old) = if by_partition {
            crate::layout::by_key_plans(conn)?;
            (
                format!(
                    "unnest($3::bigint[], $4::timestamptz[]) k(id, created_at) {}",
                    crate::layout::probe_tickets("k", "t")
                ),
                "",
                "t.id = g.id AND t.created_at = g.created_at",
                ", g.requester_id, g.assignee_id, g.last_operation_id",
                "changed c",
                "c",
            )
        } else {
            (
                "tickets t".to_string(),
                "t.id = ANY($3) AND ",
                "t.id = g.id",
                "",
                "changed c JOIN target g ON g.id = c.id",
                "g",
            )
        };
        let query = sql_query(format!(
            "WITH target AS (
             SELECT t.id, t.created_at, t.requester_id, t.assignee_id, t.last_operation_id
             FROM {target_from} WHERE {in_batch}(t.requester_id = $1 OR t.assignee_id = $1)
         ), changed AS (
             UPDATE tickets t
             SET requester_id = CASE WHEN t.requester_id = $1 THEN $2 ELSE t.requester_id END,
                 assignee_id = CASE WHEN t.assignee_id = $1 THEN $2 ELSE t.assignee_id END,
                 last_operation_id = {op}
             FROM target g WHERE {same_ticket}
             RETURNING t.id, t.requester_id AS new_requester_id, t.assignee_id AS new_assignee_id,
                       t.last_operation_id AS new_operation_id{returned_old}
         ), audited AS (
             INSERT INTO audit_log (operation_id, table_name, row_id, action, before, after)
             SELECT {op}, 'tickets', c.id, '{FIX_ACTION}',
                    jsonb_build_object('requester_id', {old}.requester_id, 'assignee_id', {old}.assignee_id,
                                       'last_operation_id', {old}.last_operation_id),
                    jsonb_build_object('requester_id', c.new_requester_id, 'assignee_id', c.new_assignee_id,
                                       'last_operation_id', c.new_operation_id)
             FROM {audited_from}
         )
         SELECT count(*) AS changed FROM changed"
        ))
        .into_boxed()
        .bind::<BigInt, _>(from)
        .bind::<BigInt, _>(into)
        .bind::<Array<BigInt>, _>(&locked);
        let query = if by_partition {
            query.bind::<Array<Timestamptz>, _>(&created)
        } else {
            query
        };
        let moved: Changed = query.get_result(conn)?;
        Ok((moved.changed, candidates.len() as i64, ids.last().copied().unwrap_or(0)))
    }

    /// Moves the next `limit` comments of `from` to `into`, audited; returns how many moved and
    /// how many were candidates.
    fn move_comments(&self, conn: &mut PgConnection, limit: i64) -> anyhow::Result<(i64, i64)> {
        let Merge { layout, op, from, into } = *self;
        #[derive(QueryableByName)]
        struct Comment {
            #[diesel(sql_type = BigInt)]
            ticket_id: i64,
            #[diesel(sql_type = BigInt)]
            id: i64,
        }
        let candidates: Vec<Comment> =
            sql_query("SELECT ticket_id, id FROM comments WHERE author_id = $1 ORDER BY id LIMIT $2")
                .bind::<BigInt, _>(from)
                .bind::<BigInt, _>(limit)
                .load(conn)?;
        let ids: Vec<i64> = candidates.iter().map(|c| c.id).collect();
        let mut tickets: Vec<i64> = candidates.iter().map(|c| c.ticket_id).collect();
        tickets.sort_unstable();
        tickets.dedup();
        // Comments live on their ticket's shard.
        let locked: Vec<i64> = layout
            .lock_per_shard(conn, &tickets, |conn, tickets| {
                sql_query("SELECT id FROM comments WHERE ticket_id = ANY($1) AND id = ANY($2) FOR UPDATE")
                    .bind::<Array<BigInt>, _>(tickets)
                    .bind::<Array<BigInt>, _>(&ids)
                    .load::<db::Id>(conn)
            })?
            .into_iter()
            .map(|r| r.id)
            .collect();
        let moved: Changed = sql_query(format!(
            "WITH changed AS (
             UPDATE comments c SET author_id = $2
             WHERE c.ticket_id = ANY($3) AND c.id = ANY($4) AND c.author_id = $1
             RETURNING c.id
         ), audited AS (
             INSERT INTO audit_log (operation_id, table_name, row_id, action, before, after)
             SELECT {op}, 'comments', id, '{FIX_ACTION}', jsonb_build_object('author_id', $1::bigint),
                    jsonb_build_object('author_id', $2::bigint)
             FROM changed
         )
         SELECT count(*) AS changed FROM changed"
        ))
        .bind::<BigInt, _>(from)
        .bind::<BigInt, _>(into)
        .bind::<Array<BigInt>, _>(&tickets)
        .bind::<Array<BigInt>, _>(&locked)
        .get_result(conn)?;
        Ok((moved.changed, candidates.len() as i64))
    }

    /// Soft-deletes the duplicate, audited; returns 1, or 0 when it was soft-deleted already.
    fn delete_user(&self, conn: &mut PgConnection) -> anyhow::Result<i64> {
        let Merge { op, from, .. } = *self;
        let changed: Changed = sql_query(format!(
            "WITH before AS (
             SELECT id, deleted_at, updated_at FROM users WHERE id = $1 AND deleted_at IS NULL FOR UPDATE
         ), changed AS (
             UPDATE users u SET deleted_at = $2, updated_at = $2 FROM before b WHERE u.id = b.id
             RETURNING u.id, u.deleted_at, u.updated_at
         ), audited AS (
             INSERT INTO audit_log (operation_id, table_name, row_id, action, before, after)
             SELECT {op}, 'users', c.id, '{FIX_ACTION}',
                    jsonb_build_object('deleted_at', b.deleted_at, 'updated_at', b.updated_at),
                    jsonb_build_object('deleted_at', c.deleted_at, 'updated_at', c.updated_at)
             FROM changed c JOIN before b ON b.id = c.id
         )
         SELECT count(*) AS changed FROM changed"
        ))
        .bind::<BigInt, _>(from)
        .bind::<Timestamptz, _>(chrono::Utc::now())
        .get_result(conn)?;
        Ok(changed.changed)
    }
}
