//! The cells of a cluster and the enrolment of vehicles on them.
//!
//! Each `fleetgrid cell` records itself (`cell_seen`: its id and the gRPC
//! address its agents dial) when it starts and again every
//! [`CELL_SEEN_INTERVAL`] while it runs; a cell seen within
//! [`CELL_LIVE_WINDOW`] is live. Enrolling a vehicle ([`Store::enrol_node`])
//! gives it a home cell, recorded on the node, and the order in which it
//! fails over to the others ([`failover_order`]): the live cell with the
//! fewest vehicles at home is its home (ties go to the smallest id), then
//! the other live cells in id order, starting after the home, so that the
//! vehicles of a lost cell spread over the others instead of all landing
//! on one. With no cell recorded (the single-process `fleetgrid serve`)
//! enrolment gives no cell: the agent is told where to dial.
//!
//! Times are the callers' wall clocks, in epoch milliseconds: a cell's
//! clock and the operator's need only agree within a fraction of the
//! window.

use std::time::Duration;

use crate::{on_database, Store, StoreError};

/// How often a running cell records that it is alive.
pub const CELL_SEEN_INTERVAL: Duration = Duration::from_secs(5);

/// A cell not seen for this long is taken to be gone: new vehicles are not
/// given to it.
pub const CELL_LIVE_WINDOW: Duration = Duration::from_secs(30);

/// A cell as recorded, with the number of vehicles whose home it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CellRecord {
    pub id: String,
    /// The gRPC URL agents dial, `http://HOST:PORT`.
    pub grpc_url: String,
    pub last_seen_ms: i64,
    /// Enrolled vehicles whose home cell this is.
    pub vehicles: i64,
}

/// A node's enrolment: its credential and the cells it dials, its home
/// first (empty where no cell is recorded).
#[derive(Clone, PartialEq, Eq)]
pub struct NodeEnrolment {
    pub credential: String,
    pub cells: Vec<CellRecord>,
}

impl std::fmt::Debug for NodeEnrolment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The credential is a secret.
        f.debug_struct("NodeEnrolment")
            .field("credential", &"<redacted>")
            .field("cells", &self.cells)
            .finish()
    }
}

/// The order in which a new vehicle dials `live` cells: its home (the
/// fewest vehicles, then the smallest id) first, then the others in id
/// order from the home on, wrapping around.
pub fn failover_order(live: &[CellRecord]) -> Vec<CellRecord> {
    let home = live
        .iter()
        .min_by(|a, b| a.vehicles.cmp(&b.vehicles).then_with(|| a.id.cmp(&b.id)));
    match home {
        Some(home) => order_from(live, &home.id),
        None => Vec::new(),
    }
}

/// `live` in id order from the cell `home` on, wrapping around; in id
/// order if `home` is not among them.
fn order_from(live: &[CellRecord], home: &str) -> Vec<CellRecord> {
    let mut by_id = live.to_vec();
    by_id.sort_by(|a, b| a.id.cmp(&b.id));
    if let Some(at) = by_id.iter().position(|cell| cell.id == home) {
        by_id.rotate_left(at);
    }
    by_id
}

fn window_ms(window: Duration) -> i64 {
    i64::try_from(window.as_millis()).unwrap_or(i64::MAX)
}

impl Store {
    /// Records that cell `id` runs and is dialled at `grpc_url`, as of `now_ms`.
    pub async fn cell_seen(&self, id: &str, grpc_url: &str, now_ms: i64) -> Result<(), StoreError> {
        let sql = "INSERT INTO cells (id, grpc_url, last_seen_ms) VALUES ($1, $2, $3) \
                   ON CONFLICT (id) DO UPDATE SET grpc_url = excluded.grpc_url, \
                   last_seen_ms = excluded.last_seen_ms";
        on_database!(&self.database, pool => {
            sqlx::query(sql)
                .bind(id)
                .bind(grpc_url)
                .bind(now_ms)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Records that cell `id` stopped: it gets no new vehicles until it
    /// runs again. Its vehicles keep it as their home.
    pub async fn cell_stopped(&self, id: &str) -> Result<(), StoreError> {
        let sql = "UPDATE cells SET last_seen_ms = 0 WHERE id = $1";
        on_database!(&self.database, pool => {
            sqlx::query(sql).bind(id).execute(pool).await?;
        });
        Ok(())
    }

    /// The cells seen within `window` of `now_ms`, by id, with their
    /// vehicles.
    pub async fn live_cells(
        &self,
        now_ms: i64,
        window: Duration,
    ) -> Result<Vec<CellRecord>, StoreError> {
        let sql = "SELECT c.id, c.grpc_url, c.last_seen_ms, \
                   (SELECT COUNT(*) FROM nodes n WHERE n.home_cell = c.id) \
                   FROM cells c WHERE c.last_seen_ms >= $1 ORDER BY c.id";
        let rows: Vec<(String, String, i64, i64)> = on_database!(&self.database, pool => sqlx::query_as(sql)
                .bind(now_ms.saturating_sub(window_ms(window)))
                .fetch_all(pool)
                .await?);
        Ok(rows
            .into_iter()
            .map(|(id, grpc_url, last_seen_ms, vehicles)| CellRecord {
                id,
                grpc_url,
                last_seen_ms,
                vehicles,
            })
            .collect())
    }

    /// The home cell recorded for `node`, if any.
    pub async fn home_cell(&self, node: &str) -> Result<Option<String>, StoreError> {
        let sql = "SELECT home_cell FROM nodes WHERE name = $1";
        let row: Option<(Option<String>,)> = on_database!(&self.database, pool => sqlx::query_as(sql)
                .bind(node)
                .fetch_optional(pool)
                .await?);
        Ok(row.and_then(|(home,)| home))
    }

    /// Enrols `name` (see `add_node`) and, where cells are live as of
    /// `now_ms`, gives it a home among them and the order of the others.
    pub async fn enrol_node(
        &self,
        name: &str,
        owner: &str,
        now_ms: i64,
    ) -> Result<NodeEnrolment, StoreError> {
        let credential = self.add_node(name, owner, now_ms).await?;
        let cells = failover_order(&self.live_cells(now_ms, CELL_LIVE_WINDOW).await?);
        self.give_home(name, &cells).await?;
        Ok(NodeEnrolment { credential, cells })
    }

    /// Records the first of `cells` (a failover order) as `name`'s home;
    /// nothing if there is none.
    async fn give_home(&self, name: &str, cells: &[CellRecord]) -> Result<(), StoreError> {
        if let Some(home) = cells.first() {
            let sql = "UPDATE nodes SET home_cell = $1 WHERE name = $2";
            on_database!(&self.database, pool => {
                sqlx::query(sql).bind(&home.id).bind(name).execute(pool).await?;
            });
        }
        Ok(())
    }

    /// Gives `name` a new credential (the old one stops working) and the
    /// cells it dials as of `now_ms`: its home first while that cell is
    /// live, else a new home chosen as `enrol_node` chooses one; `None` if
    /// no node has that name.
    pub async fn rotate_node_enrolment(
        &self,
        name: &str,
        now_ms: i64,
    ) -> Result<Option<NodeEnrolment>, StoreError> {
        let Some(credential) = self.rotate_node_credential(name).await? else {
            return Ok(None);
        };
        let live = self.live_cells(now_ms, CELL_LIVE_WINDOW).await?;
        let home = self.home_cell(name).await?;
        let cells = match home.filter(|home| live.iter().any(|cell| &cell.id == home)) {
            Some(home) => order_from(&live, &home),
            None => {
                let cells = failover_order(&live);
                self.give_home(name, &cells).await?;
                cells
            }
        };
        Ok(Some(NodeEnrolment { credential, cells }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestStore;

    crate::on_each_backend!(
        live_cells_are_recorded_renewed_and_forgotten,
        a_vehicle_is_enrolled_at_the_live_cell_with_the_fewest_vehicles,
        a_rotated_credential_keeps_a_live_home_and_replaces_a_lost_one,
    );

    const NOW: i64 = 1_700_000_000_000;

    fn cell(id: &str, vehicles: i64) -> CellRecord {
        CellRecord {
            id: id.to_owned(),
            grpc_url: format!("http://{id}:7070"),
            last_seen_ms: NOW,
            vehicles,
        }
    }

    fn ids(cells: &[CellRecord]) -> Vec<&str> {
        cells.iter().map(|cell| cell.id.as_str()).collect()
    }

    #[test]
    fn the_home_has_the_fewest_vehicles_and_the_others_follow_it_in_a_ring() {
        let live = [cell("c", 1), cell("a", 2), cell("d", 1), cell("b", 5)];
        assert_eq!(ids(&failover_order(&live)), ["c", "d", "a", "b"]);
        let even = [cell("b", 0), cell("a", 0)];
        assert_eq!(ids(&failover_order(&even)), ["a", "b"]);
        assert!(failover_order(&[]).is_empty());
    }

    async fn live_cells_are_recorded_renewed_and_forgotten(test: &TestStore) {
        let store = &test.store;
        let window = CELL_LIVE_WINDOW;
        let window_ms = super::window_ms(window);
        store
            .cell_seen("a", "http://10.0.0.1:7070", NOW)
            .await
            .unwrap();
        store
            .cell_seen("b", "http://10.0.0.2:7070", NOW)
            .await
            .unwrap();
        assert_eq!(
            ids(&store.live_cells(NOW, window).await.unwrap()),
            ["a", "b"]
        );

        // Past the window only a renewed cell is live; a restart may move it.
        let later = NOW + window_ms + 1;
        store
            .cell_seen("b", "http://10.0.0.3:7070", later)
            .await
            .unwrap();
        let live = store.live_cells(later, window).await.unwrap();
        assert_eq!(ids(&live), ["b"]);
        assert_eq!(live[0].grpc_url, "http://10.0.0.3:7070");

        store.cell_stopped("b").await.unwrap();
        assert!(store.live_cells(later, window).await.unwrap().is_empty());
    }

    async fn a_vehicle_is_enrolled_at_the_live_cell_with_the_fewest_vehicles(test: &TestStore) {
        let store = &test.store;
        // No cell: the enrolment is the credential alone, as on one machine.
        let alone = store.enrol_node("car-0", "", NOW).await.unwrap();
        assert!(alone.cells.is_empty());
        assert_eq!(store.home_cell("car-0").await.unwrap(), None);

        for id in ["a", "b", "c"] {
            store
                .cell_seen(id, &format!("http://{id}:7070"), NOW)
                .await
                .unwrap();
        }
        let mut homes = Vec::new();
        for index in 1..=4 {
            let name = format!("car-{index}");
            let enrolment = store.enrol_node(&name, "", NOW).await.unwrap();
            assert!(enrolment
                .credential
                .starts_with(crate::secrets::NODE_CREDENTIAL_PREFIX));
            assert_eq!(enrolment.cells.len(), 3, "every live cell, home first");
            let home = enrolment.cells[0].id.clone();
            assert_eq!(store.home_cell(&name).await.unwrap().as_ref(), Some(&home));
            homes.push(home);
        }
        assert_eq!(homes, ["a", "b", "c", "a"], "each to the emptiest cell");

        // A cell gone quiet gets no new vehicle and is not offered.
        let later = NOW + super::window_ms(CELL_LIVE_WINDOW) + 1;
        store.cell_seen("c", "http://c:7070", later).await.unwrap();
        let enrolment = store.enrol_node("car-5", "", later).await.unwrap();
        assert_eq!(ids(&enrolment.cells), ["c"]);
        assert!(matches!(
            store.enrol_node("car-5", "", later).await,
            Err(StoreError::NodeExists(_))
        ));
    }

    async fn a_rotated_credential_keeps_a_live_home_and_replaces_a_lost_one(test: &TestStore) {
        let store = &test.store;
        for id in ["a", "b"] {
            store
                .cell_seen(id, &format!("http://{id}:7070"), NOW)
                .await
                .unwrap();
        }
        let first = store.enrol_node("car-1", "", NOW).await.unwrap();
        store.enrol_node("car-2", "", NOW).await.unwrap();
        assert_eq!(ids(&first.cells), ["a", "b"]);

        // b has no more vehicles than a now, but car-1 stays at home in a.
        let rotated = store
            .rotate_node_enrolment("car-1", NOW)
            .await
            .unwrap()
            .expect("car-1 is enrolled");
        assert_eq!(ids(&rotated.cells), ["a", "b"]);
        assert_ne!(rotated.credential, first.credential);
        let stored = store.node_credential_hash("car-1").await.unwrap().unwrap();
        assert!(crate::secrets::hashes_equal(
            &stored,
            &crate::secrets::hash(&rotated.credential)
        ));

        // Its home gone quiet, it gets a live one.
        let later = NOW + super::window_ms(CELL_LIVE_WINDOW) + 1;
        store.cell_seen("b", "http://b:7070", later).await.unwrap();
        let moved = store
            .rotate_node_enrolment("car-1", later)
            .await
            .unwrap()
            .expect("car-1 is enrolled");
        assert_eq!(ids(&moved.cells), ["b"]);
        assert_eq!(
            store.home_cell("car-1").await.unwrap().as_deref(),
            Some("b")
        );

        assert!(store
            .rotate_node_enrolment("car-9", later)
            .await
            .unwrap()
            .is_none());
    }
}
