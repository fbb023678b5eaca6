//! Stores for tests, on each backend: SQLite in a temporary directory, and
//! PostgreSQL in a throw-away schema of a real server.
//!
//! The PostgreSQL server is `FLEETGRID_TEST_POSTGRES_URL`, by default
//! `postgres://postgres@127.0.0.1:5432/test`. Tests fail with a clear message
//! when it is unreachable; they never skip.

use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

use crate::Store;

/// Names the PostgreSQL server the tests use.
pub const POSTGRES_URL_VARIABLE: &str = "FLEETGRID_TEST_POSTGRES_URL";

/// The server used when `POSTGRES_URL_VARIABLE` is not set.
pub const POSTGRES_URL_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Tells apart the schemas of one test process.
static SCHEMA_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The backends a store runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A PostgreSQL schema of its own, for one test; `remove` drops it.
pub struct PgSchema {
    name: String,
    url: String,
    server: PgConnectOptions,
}

impl PgSchema {
    /// Creates a fresh schema; panics, naming the server, when it cannot.
    pub async fn create() -> PgSchema {
        let url = std::env::var(POSTGRES_URL_VARIABLE)
            .unwrap_or_else(|_| POSTGRES_URL_DEFAULT.to_string());
        let server: PgConnectOptions = url
            .parse()
            .unwrap_or_else(|error| panic!("{POSTGRES_URL_VARIABLE}={url} is no URL: {error}"));
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|since| since.as_nanos())
            .unwrap_or_default();
        let name = format!(
            "store_test_{}_{nanos}_{}",
            std::process::id(),
            SCHEMA_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut admin = connect(&server, &url).await;
        sqlx::query(&format!("CREATE SCHEMA {name}"))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|error| panic!("create schema {name} at {url}: {error}"));
        let _ = admin.close().await;
        PgSchema { name, url, server }
    }

    /// A URL of the server whose connections use this schema.
    pub fn url(&self) -> String {
        let separator = if self.url.contains('?') { '&' } else { '?' };
        format!(
            "{}{separator}options=-c%20search_path%3D{}",
            self.url, self.name
        )
    }

    /// Connection options whose `search_path` is this schema.
    pub fn options(&self) -> PgConnectOptions {
        self.server
            .clone()
            .options([("search_path", self.name.as_str())])
    }

    /// Another store on this schema, as another process would open it.
    pub async fn store(&self) -> Store {
        Store::connect_postgres_with(self.options())
            .await
            .expect("connect a store to the test schema")
    }

    /// Drops the schema and everything in it.
    pub async fn remove(self) {
        let mut admin = connect(&self.server, &self.name).await;
        sqlx::query(&format!("DROP SCHEMA {} CASCADE", self.name))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|error| panic!("drop schema {}: {error}", self.name));
        let _ = admin.close().await;
    }
}

async fn connect(server: &PgConnectOptions, what: &str) -> PgConnection {
    PgConnection::connect_with(server)
        .await
        .unwrap_or_else(|error| {
            panic!(
                "the store's PostgreSQL tests need a server ({what}; set {POSTGRES_URL_VARIABLE} \
             to use another): {error}"
            )
        })
}

/// Where a test store lives, kept until the test ends.
enum Backing {
    Directory(tempfile::TempDir),
    Schema(Box<PgSchema>),
}

/// A fresh, empty store on one backend.
pub struct TestStore {
    pub store: Store,
    backing: Backing,
}

impl TestStore {
    pub async fn new(backend: Backend) -> TestStore {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("tempdir");
                let store = Store::open(dir.path()).await.expect("open a SQLite store");
                TestStore {
                    store,
                    backing: Backing::Directory(dir),
                }
            }
            Backend::Postgres => {
                let schema = PgSchema::create().await;
                TestStore {
                    store: schema.store().await,
                    backing: Backing::Schema(Box::new(schema)),
                }
            }
        }
    }

    /// Another store on the same database, with a pool of its own, as
    /// another process (a second gateway, a cell, the CLI) opens it.
    pub async fn another_handle(&self) -> Store {
        match &self.backing {
            Backing::Directory(dir) => Store::open(dir.path()).await.expect("reopen"),
            Backing::Schema(schema) => schema.store().await,
        }
    }

    /// The data directory (SQLite) or the schema (PostgreSQL).
    pub fn directory(&self) -> Option<&std::path::Path> {
        match &self.backing {
            Backing::Directory(dir) => Some(dir.path()),
            Backing::Schema(_) => None,
        }
    }

    /// The schema's connection options (PostgreSQL only).
    pub fn postgres_options(&self) -> Option<PgConnectOptions> {
        match &self.backing {
            Backing::Directory(_) => None,
            Backing::Schema(schema) => Some(schema.options()),
        }
    }

    /// Closes the store and removes what backed it.
    pub async fn finish(self) {
        self.store.close().await;
        match self.backing {
            Backing::Directory(_) => {}
            Backing::Schema(schema) => schema.remove().await,
        }
    }
}

/// Runs each named `async fn scenario(&TestStore)` of the calling module
/// once per backend, as the tests `sqlite::scenario` and
/// `postgres::scenario`.
#[macro_export]
macro_rules! on_each_backend {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let store =
                        $crate::testing::TestStore::new($crate::testing::Backend::Sqlite).await;
                    super::$scenario(&store).await;
                    store.finish().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let store =
                        $crate::testing::TestStore::new($crate::testing::Backend::Postgres).await;
                    super::$scenario(&store).await;
                    store.finish().await;
                }
            )*
        }
    };
}
