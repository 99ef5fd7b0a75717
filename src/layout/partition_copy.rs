//! `COPY` straight into the monthly partitions of tickets, for the initial load. PostgreSQL
//! refuses `COPY … FREEZE` on a partitioned table but takes it on a partition created or
//! truncated in the same transaction — which the load's `TRUNCATE tickets` makes every
//! partition, and `Partitions::ensure` every month it adds. Rows written frozen leave their
//! pages all-visible, so the index builds, validations and ANALYZE after the load neither
//! check each row's visibility nor write every page again to set its hint bits.

use std::cell::RefCell;
use std::marker::PhantomData;

use chrono::{DateTime, Utc};
use diesel::PgConnection;
use diesel::pg::{CopyTarget, Pg};
use diesel::query_builder::AstPass;

use super::{MonthlyPartition, monthly_partitions_of};

thread_local! {
    static TARGET_SQL: RefCell<String> = const { RefCell::new(String::new()) };
}

/// A `COPY … FROM STDIN` target given as SQL text (`partition (column, …)`) for a table named
/// at run time. Diesel's `copy_from` names its target by a type, not a value: this type reads
/// the text set by `NamedCopyTarget::with` for the duration of the call.
pub struct NamedCopyTarget<T>(PhantomData<T>);

impl<T: diesel::Table> NamedCopyTarget<T> {
    /// Runs `copy` (which executes a `copy_from(…).from_raw_data(target, …)`) with the target
    /// reading `target_sql`. `target_sql` is trusted SQL: names from the catalog.
    pub fn with<R>(target_sql: &str, copy: impl FnOnce(NamedCopyTarget<T>) -> R) -> R {
        TARGET_SQL.with_borrow_mut(|t| target_sql.clone_into(t));
        let result = copy(NamedCopyTarget(PhantomData));
        TARGET_SQL.with_borrow_mut(String::clear);
        result
    }
}

impl<T: diesel::Table> CopyTarget for NamedCopyTarget<T> {
    type Table = T;
    // Only the typed `from_insertable` path reads it; the raw-data path sends its own bytes.
    type SqlType = diesel::sql_types::BigInt;

    fn walk_target(mut pass: AstPass<'_, '_, Pg>) -> diesel::QueryResult<()> {
        TARGET_SQL.with_borrow(|sql| {
            if sql.is_empty() {
                return Err(diesel::result::Error::QueryBuilderError(
                    "a COPY target named at run time was used outside NamedCopyTarget::with".into(),
                ));
            }
            pass.push_sql(sql);
            Ok(())
        })
    }
}

/// Which monthly partition each row of a batch goes into, from the catalog's bounds: read on
/// first use, and again when a row falls outside every month known (a month the load made
/// since).
#[derive(Debug)]
pub struct MonthRouter {
    /// tickets or ticket_tags.
    table: &'static str,
    /// Sorted by `from`; only those this user may insert into.
    months: Vec<MonthlyPartition>,
    loaded: bool,
}

impl Default for MonthRouter {
    fn default() -> MonthRouter {
        MonthRouter::of("tickets")
    }
}

impl MonthRouter {
    /// For the months of `table`.
    pub fn of(table: &'static str) -> MonthRouter {
        MonthRouter {
            table,
            months: Vec::new(),
            loaded: false,
        }
    }

    /// For each time, the index of its partition (`name`), or None: no monthly partition holds
    /// it (the default partition) or this user may not write one directly — such rows go
    /// through the parent.
    pub fn route(&mut self, conn: &mut PgConnection, times: &[DateTime<Utc>]) -> anyhow::Result<Vec<Option<usize>>> {
        if !self.loaded {
            self.load(conn)?;
        }
        let mut routed: Vec<Option<usize>> = times.iter().map(|&t| self.find(t)).collect();
        if routed.iter().any(Option::is_none) {
            self.load(conn)?;
            routed = times.iter().map(|&t| self.find(t)).collect();
        }
        Ok(routed)
    }

    /// The partition's name, as the catalog gives it (quoted where needed).
    pub fn name(&self, index: usize) -> &str {
        &self.months[index].name
    }

    /// The partition, with its bounds.
    pub fn month(&self, index: usize) -> &MonthlyPartition {
        &self.months[index]
    }

    fn load(&mut self, conn: &mut PgConnection) -> anyhow::Result<()> {
        let mut months = monthly_partitions_of(conn, self.table)?;
        months.retain(|m| m.insertable);
        self.months = months;
        self.loaded = true;
        Ok(())
    }

    fn find(&self, t: DateTime<Utc>) -> Option<usize> {
        let after = self.months.partition_point(|m| m.from <= t);
        let candidate = after.checked_sub(1)?;
        (t < self.months[candidate].until).then_some(candidate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn month(name: &str, y: i32, m: u32) -> MonthlyPartition {
        let from = Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0).unwrap();
        let until = if m == 12 {
            Utc.with_ymd_and_hms(y + 1, 1, 1, 0, 0, 0).unwrap()
        } else {
            Utc.with_ymd_and_hms(y, m + 1, 1, 0, 0, 0).unwrap()
        };
        MonthlyPartition {
            name: name.into(),
            from,
            until,
            insertable: true,
            owned: true,
        }
    }

    #[test]
    fn a_time_goes_to_the_month_that_holds_it_and_a_gap_to_none() {
        let router = MonthRouter {
            table: "tickets",
            months: vec![month("jan", 2024, 1), month("feb", 2024, 2), month("apr", 2024, 4)],
            loaded: true,
        };
        let at = |y, m, d, h| Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap();
        assert_eq!(router.find(at(2024, 1, 1, 0)), Some(0));
        assert_eq!(router.find(at(2024, 1, 31, 23)), Some(0));
        assert_eq!(router.find(at(2024, 2, 1, 0)), Some(1));
        assert_eq!(router.find(at(2024, 3, 15, 0)), None, "no partition for March");
        assert_eq!(router.find(at(2024, 4, 30, 23)), Some(2));
        assert_eq!(router.find(at(2024, 5, 1, 0)), None, "after the last month");
        assert_eq!(router.find(at(2023, 12, 31, 23)), None, "before the first month");
    }
}
