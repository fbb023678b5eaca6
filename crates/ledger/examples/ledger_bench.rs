//! Batched, durable transfer commits per second on SQLite and PostgreSQL.
//!
//! `cargo run --release -p ledger --example ledger_bench -- [transfers] [batch] [sqlite|postgres|both]`
//!
//! Each backend is measured twice in the same run: batched, and one transfer
//! per transaction as the reference, so the report gives the batching ratio.
//! SQLite writes to a temporary directory; PostgreSQL uses a fresh schema at
//! `LEDGER_BENCH_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`),
//! dropped afterwards.

use anyhow::Context;
use ledger::store::Store;
use sqlx::postgres::PgConnectOptions;
use sqlx::Connection;

/// Transfers committed one per transaction for the reference figure.
const REFERENCE_TRANSFERS: usize = 600;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let transfers: usize = args
        .next()
        .map_or(Ok(300_000), |a| a.parse())
        .context("parse transfers")?;
    let batch: usize = args
        .next()
        .map_or(Ok(4_096), |a| a.parse())
        .context("parse batch")?;
    let backends = args.next().unwrap_or_else(|| "both".to_owned());
    if backends != "postgres" {
        bench_sqlite(transfers, batch).await?;
    }
    if backends != "sqlite" {
        bench_postgres(transfers, batch).await?;
    }
    Ok(())
}

async fn bench_sqlite(transfers: usize, batch: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("create temporary directory")?;
    let sqlite = Store::open_sqlite(&dir.path().join("bench.db"))
        .await
        .context("open sqlite")?;
    report(&sqlite, transfers, batch).await?;
    sqlite.close().await;
    Ok(())
}

async fn bench_postgres(transfers: usize, batch: usize) -> anyhow::Result<()> {
    let url = std::env::var("LEDGER_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let options: PgConnectOptions = url.parse().context("parse postgres url")?;
    let schema = format!("ledger_bench_{}", std::process::id());
    let mut admin = sqlx::PgConnection::connect_with(&options)
        .await
        .context("connect to postgres")?;
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut admin)
        .await?;
    let postgres =
        Store::connect_postgres_with(options.clone().options([("search_path", &schema)]))
            .await
            .context("open postgres ledger")?;
    let measured = report(&postgres, transfers, batch).await;
    postgres.close().await;
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&mut admin)
        .await?;
    measured
}

async fn report(store: &Store, transfers: usize, batch: usize) -> anyhow::Result<()> {
    let reference = ledger::bench::transfers(store, REFERENCE_TRANSFERS, 1).await?;
    let batched = ledger::bench::transfers(store, transfers, batch).await?;
    let report = ledger::store::verify(store).await?;
    anyhow::ensure!(
        report.is_ok(),
        "ledger failed verification: {:?}",
        report.problems
    );
    println!(
        "{:<8} batched: {batched:>9.0} transfers/s ({transfers} in batches of {batch}); \
         one per transaction: {reference:>7.0}/s; ratio {:.1}x; verified {} transfers",
        store.backend_name(),
        batched / reference,
        report.transfers,
    );
    Ok(())
}
