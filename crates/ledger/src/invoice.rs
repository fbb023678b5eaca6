//! What a tenant sees of the ledger: usage per model over a period, and the
//! monthly invoice, with a CSV export.
//!
//! Every figure comes from [`RequestSummary`] rows that are committed in the
//! same transaction as the request's transfers, and an invoice's total is
//! checked against the sum of the tenant's token-charge transfers in the same
//! period, so an invoice matches the ledger to the micro-dollar or is not
//! issued at all.

use std::collections::BTreeMap;
use std::io::{self, Write};

use crate::core::{MicroUsd, ModelId, RequestId, TenantId, TimestampMs, TokenCount};
use crate::pricing::TenantClass;
use crate::settlement::{CompletedRequest, Settlement};
use crate::statement::Period;

/// One settled request as the tenant is billed for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestSummary {
    pub request_id: RequestId,
    pub tenant: TenantId,
    pub class: TenantClass,
    /// The model of the first segment: the one the customer asked for.
    pub model: ModelId,
    /// The prompt, billed once.
    pub prompt_tokens: TokenCount,
    /// Every completion token, billed once, whichever node produced it.
    pub completion_tokens: TokenCount,
    /// The amount of the token-charge transfer (zero if there was none).
    pub charge: MicroUsd,
    pub segments: u32,
    pub admitted_at: TimestampMs,
    pub completed_at: TimestampMs,
}

impl RequestSummary {
    /// The summary of a request and its settlement. `settle` has checked that
    /// there is at least one segment.
    pub fn of(request: &CompletedRequest, settlement: &Settlement) -> Option<RequestSummary> {
        let first = request.segments.first()?;
        Some(RequestSummary {
            request_id: request.request_id.clone(),
            tenant: request.tenant.clone(),
            class: request.class,
            model: first.model.clone(),
            prompt_tokens: first.prompt_tokens,
            completion_tokens: TokenCount(
                request
                    .segments
                    .iter()
                    .map(|segment| segment.completion_tokens.0)
                    .sum(),
            ),
            charge: settlement.charge,
            segments: u32::try_from(request.segments.len()).unwrap_or(u32::MAX),
            admitted_at: request.admitted_at,
            completed_at: request.completed_at,
        })
    }
}

/// Usage of one model in a period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UsageTotals {
    pub requests: u64,
    pub prompt_tokens: TokenCount,
    pub completion_tokens: TokenCount,
    pub charged: MicroUsd,
}

impl UsageTotals {
    fn add(&mut self, other: &UsageTotals) {
        self.requests += other.requests;
        self.prompt_tokens.0 += other.prompt_tokens.0;
        self.completion_tokens.0 += other.completion_tokens.0;
        self.charged.0 += other.charged.0;
    }
}

/// A tenant's usage in a period, per model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageReport {
    pub tenant: TenantId,
    pub period: Period,
    pub by_model: BTreeMap<ModelId, UsageTotals>,
    pub totals: UsageTotals,
}

impl UsageReport {
    pub fn new(
        tenant: TenantId,
        period: Period,
        by_model: BTreeMap<ModelId, UsageTotals>,
    ) -> UsageReport {
        let mut totals = UsageTotals::default();
        for line in by_model.values() {
            totals.add(line);
        }
        UsageReport {
            tenant,
            period,
            by_model,
            totals,
        }
    }
}

/// A tenant's invoice for one calendar month (UTC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invoice {
    /// `YYYY-MM`.
    pub month: String,
    pub usage: UsageReport,
    /// Prepaid top-ups received in the month.
    pub top_ups: MicroUsd,
    /// The tenant's balance now (negative when on credit).
    pub balance: MicroUsd,
}

/// Why a month could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a month; expected YYYY-MM, e.g. 2026-11")]
pub struct BadMonth(pub String);

/// The UTC period of a `YYYY-MM` month.
pub fn month_period(month: &str) -> Result<Period, BadMonth> {
    let bad = || BadMonth(month.to_owned());
    let (year, number) = month.split_once('-').ok_or_else(bad)?;
    if year.len() != 4 || number.len() != 2 {
        return Err(bad());
    }
    let year: i64 = year.parse().map_err(|_| bad())?;
    let number: u32 = number.parse().map_err(|_| bad())?;
    if !(1970..=9999).contains(&year) || !(1..=12).contains(&number) {
        return Err(bad());
    }
    let (next_year, next_number) = if number == 12 {
        (year + 1, 1)
    } else {
        (year, number + 1)
    };
    Ok(Period {
        from: TimestampMs(days_from_civil(year, number, 1) * TimestampMs::PER_DAY),
        until: TimestampMs(days_from_civil(next_year, next_number, 1) * TimestampMs::PER_DAY),
    })
}

/// The UTC midnight starting `YYYY-MM-DD`, for period query parameters.
pub fn day_start(date: &str) -> Option<TimestampMs> {
    let mut parts = date.splitn(3, '-');
    let year: i64 = parts.next().filter(|p| p.len() == 4)?.parse().ok()?;
    let month: u32 = parts.next().filter(|p| p.len() == 2)?.parse().ok()?;
    let day: u32 = parts.next().filter(|p| p.len() == 2)?.parse().ok()?;
    if !(1..=12).contains(&month) || !(1..=days_in_month(year, month)).contains(&day) {
        return None;
    }
    Some(TimestampMs(
        days_from_civil(year, month, day) * TimestampMs::PER_DAY,
    ))
}

fn days_in_month(year: i64, month: u32) -> u32 {
    let next = if month == 12 {
        days_from_civil(year + 1, 1, 1)
    } else {
        days_from_civil(year, month + 1, 1)
    };
    u32::try_from(next - days_from_civil(year, month, 1)).unwrap_or(31)
}

/// The `YYYY-MM` month (UTC) containing an instant.
pub fn month_containing(at: TimestampMs) -> String {
    let (year, month, _) = civil_from_days(at.0.div_euclid(TimestampMs::PER_DAY));
    format!("{year:04}-{month:02}")
}

/// The date of a day counted from 1970-01-01 (the inverse of `days_from_civil`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    // Both are within their calendar ranges by construction.
    (year, month as u32, day as u32)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// algorithm), so that no date library is needed for month boundaries.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let shifted_month = if month > 2 { month - 3 } else { month + 9 };
    let day_of_year = (153 * shifted_month + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Writes an invoice's requests as CSV: one line per request, then a total.
pub fn write_csv(
    out: &mut impl Write,
    invoice: &Invoice,
    requests: &[RequestSummary],
) -> io::Result<()> {
    writeln!(
        out,
        "request_id,completed_at_ms,model,class,prompt_tokens,completion_tokens,segments,charge_usd"
    )?;
    for request in requests {
        writeln!(
            out,
            "{},{},{},{},{},{},{},{}",
            request.request_id,
            request.completed_at.0,
            request.model,
            request.class,
            request.prompt_tokens,
            request.completion_tokens,
            request.segments,
            request.charge
        )?;
    }
    let totals = &invoice.usage.totals;
    writeln!(
        out,
        "total,,,,{},{},,{}",
        totals.prompt_tokens, totals.completion_tokens, totals.charged
    )
}

/// Writes an invoice as text for the terminal, naming the tenant as
/// `tenant_name` (the ledger keys the tenant by an id, people by a name).
pub fn write_text(out: &mut impl Write, invoice: &Invoice, tenant_name: &str) -> io::Result<()> {
    let usage = &invoice.usage;
    writeln!(out, "invoice {} for tenant {tenant_name}", invoice.month)?;
    writeln!(
        out,
        "{:<32} {:>9} {:>14} {:>14} {:>16}",
        "model", "requests", "prompt tok", "completion tok", "charge usd"
    )?;
    for (model, line) in &usage.by_model {
        writeln!(
            out,
            "{:<32} {:>9} {:>14} {:>14} {:>16}",
            model.as_str(),
            line.requests,
            line.prompt_tokens.to_string(),
            line.completion_tokens.to_string(),
            line.charged.to_string()
        )?;
    }
    let totals = &usage.totals;
    writeln!(
        out,
        "{:<32} {:>9} {:>14} {:>14} {:>16}",
        "total",
        totals.requests,
        totals.prompt_tokens.to_string(),
        totals.completion_tokens.to_string(),
        totals.charged.to_string()
    )?;
    writeln!(out, "top-ups received: {}", invoice.top_ups)?;
    writeln!(out, "balance now:      {}", invoice.balance)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_are_utc_calendar_months() {
        let november = month_period("2026-11").unwrap();
        assert_eq!(Some(november.from), day_start("2026-11-01"));
        assert_eq!(Some(november.until), day_start("2026-12-01"));
        let december = month_period("2026-12").unwrap();
        assert_eq!(Some(december.until), day_start("2027-01-01"));
        assert_eq!(month_period("1970-01").unwrap().from, TimestampMs(0));
        // 2024 is a leap year: February has 29 days.
        let february = month_period("2024-02").unwrap();
        assert_eq!(
            february.until.0 - february.from.0,
            29 * TimestampMs::PER_DAY
        );
        for bad in ["2026-13", "2026-1", "26-11", "2026/11", "", "2026-00"] {
            assert!(month_period(bad).is_err(), "{bad}");
        }
        assert_eq!(day_start("2026-02-30"), None);
        assert_eq!(month_containing(november.from), "2026-11");
        assert_eq!(
            month_containing(TimestampMs(november.until.0 - 1)),
            "2026-11"
        );
        assert_eq!(month_containing(november.until), "2026-12");
        assert_eq!(month_containing(TimestampMs(0)), "1970-01");
    }
}
