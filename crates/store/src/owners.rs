//! Vehicle owners in the store: owners, their hashed API keys, which vehicles
//! they own, and each vehicle's owner policy.
//!
//! A vehicle without a stored policy runs under `OwnerPolicy::default()`
//! (compute only while plugged in, stop 15 minutes before departure). Every
//! policy write takes the next `revision`, so a running coordinator can pick
//! up writes made by another process (the CLI) with `policies_since`.

use scheduler::{ClassSet, OwnerPolicy};

use crate::database::{in_revision_transaction, RevisionKind};
use crate::secrets;
use crate::{on_database, Store, StoreError};

/// Prefix of owner API keys; distinct from tenant keys (`fg-`), so a key in
/// the wrong place is recognisable.
pub const OWNER_KEY_PREFIX: &str = "fgo-";

/// Characters of a key kept in clear, after its prefix, to tell keys apart.
const KEY_PREFIX_SHOWN_CHARS: usize = 6;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerRecord {
    pub id: i64,
    pub name: String,
}

/// One vehicle as its owner sees it in the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedVehicle {
    pub name: String,
    pub last_seen_ms: Option<i64>,
}

/// A stored policy and the revision at which it was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyChange {
    pub node: String,
    pub policy: OwnerPolicy,
    pub revision: i64,
}

const POLICY_COLUMNS: &str = "node_name, allow_unplugged, unplugged_stop_soc_permille, \
     unplugged_resume_soc_permille, allowed_hours_mask, utc_offset_minutes, max_energy_per_day_wh, \
     max_chip_temperature_decicelsius, stop_before_departure_ms, allowed_classes_mask, revision";

/// A row of `POLICY_COLUMNS`, in that order.
type PolicyRow = (
    String,
    bool,
    i64,
    i64,
    i64,
    i64,
    Option<i64>,
    i64,
    i64,
    i64,
    i64,
);

/// Stores a policy at the next revision, in one statement; run in a
/// revision transaction, so that revisions commit in the order taken.
const UPSERT_POLICY: &str = "INSERT INTO node_policies (node_name, allow_unplugged, \
     unplugged_stop_soc_permille, unplugged_resume_soc_permille, allowed_hours_mask, \
     utc_offset_minutes, max_energy_per_day_wh, max_chip_temperature_decicelsius, \
     stop_before_departure_ms, allowed_classes_mask, revision, updated_ms) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, \
       (SELECT COALESCE(MAX(revision), 0) + 1 FROM node_policies), $11) \
     ON CONFLICT (node_name) DO UPDATE SET \
       allow_unplugged = excluded.allow_unplugged, \
       unplugged_stop_soc_permille = excluded.unplugged_stop_soc_permille, \
       unplugged_resume_soc_permille = excluded.unplugged_resume_soc_permille, \
       allowed_hours_mask = excluded.allowed_hours_mask, \
       utc_offset_minutes = excluded.utc_offset_minutes, \
       max_energy_per_day_wh = excluded.max_energy_per_day_wh, \
       max_chip_temperature_decicelsius = excluded.max_chip_temperature_decicelsius, \
       stop_before_departure_ms = excluded.stop_before_departure_ms, \
       allowed_classes_mask = excluded.allowed_classes_mask, \
       revision = excluded.revision, updated_ms = excluded.updated_ms \
     RETURNING revision";

impl Store {
    /// Creates an owner and a first API key; the key is returned once. The
    /// name is unique: of two processes creating it at once, one gets
    /// `OwnerExists`.
    pub async fn create_owner(
        &self,
        name: &str,
        now_ms: i64,
    ) -> Result<(OwnerRecord, String), StoreError> {
        let sql = "INSERT INTO owners (name, created_ms) VALUES ($1, $2) \
                   ON CONFLICT (name) DO NOTHING RETURNING id";
        let inserted: Option<(i64,)> = on_database!(self.database(), pool => sqlx::query_as(sql)
            .bind(name)
            .bind(now_ms)
            .fetch_optional(pool)
            .await?);
        let Some((id,)) = inserted else {
            return Err(StoreError::OwnerExists(name.to_string()));
        };
        let owner = OwnerRecord {
            id,
            name: name.to_string(),
        };
        let key = self.insert_owner_key(owner.id, now_ms).await?;
        Ok((owner, key))
    }

    /// The owner of this name, created (without a key) if there is none.
    pub async fn ensure_owner(&self, name: &str, now_ms: i64) -> Result<OwnerRecord, StoreError> {
        let sql =
            "INSERT INTO owners (name, created_ms) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING";
        on_database!(self.database(), pool => {
            sqlx::query(sql)
            .bind(name)
            .bind(now_ms)
            .execute(pool)
            .await?;
        });
        self.owner_by_name(name)
            .await?
            .ok_or_else(|| StoreError::NoSuchOwner(name.to_string()))
    }

    /// Issues another API key for an existing owner.
    pub async fn create_owner_key(&self, name: &str, now_ms: i64) -> Result<String, StoreError> {
        let owner = self
            .owner_by_name(name)
            .await?
            .ok_or_else(|| StoreError::NoSuchOwner(name.to_string()))?;
        self.insert_owner_key(owner.id, now_ms).await
    }

    async fn insert_owner_key(&self, owner_id: i64, now_ms: i64) -> Result<String, StoreError> {
        let key = secrets::generate(OWNER_KEY_PREFIX);
        let sql = "INSERT INTO owner_keys (key_hash, key_prefix, owner_id, created_ms) \
                   VALUES ($1, $2, $3, $4)";
        on_database!(self.database(), pool => {
            sqlx::query(sql)
            .bind(secrets::hash(&key))
            .bind(&key[..OWNER_KEY_PREFIX.len() + KEY_PREFIX_SHOWN_CHARS])
            .bind(owner_id)
            .bind(now_ms)
            .execute(pool)
            .await?;
        });
        Ok(key)
    }

    pub async fn owner_by_name(&self, name: &str) -> Result<Option<OwnerRecord>, StoreError> {
        let sql = "SELECT id, name FROM owners WHERE name = $1";
        let row: Option<(i64, String)> = on_database!(self.database(), pool => sqlx::query_as(sql)
            .bind(name)
            .fetch_optional(pool)
            .await?);
        Ok(row.map(owner_from_row))
    }

    /// The owner holding an unrevoked owner key. Tenant keys never match.
    pub async fn owner_for_key(&self, key: &str) -> Result<Option<OwnerRecord>, StoreError> {
        let sql = "SELECT o.id, o.name FROM owner_keys k JOIN owners o ON o.id = k.owner_id \
                   WHERE k.key_hash = $1 AND k.revoked_ms IS NULL";
        let row: Option<(i64, String)> = on_database!(self.database(), pool => sqlx::query_as(sql)
            .bind(secrets::hash(key))
            .fetch_optional(pool)
            .await?);
        Ok(row.map(owner_from_row))
    }

    /// Every owner with the number of vehicles they own.
    pub async fn list_owners(&self) -> Result<Vec<(OwnerRecord, i64)>, StoreError> {
        let sql = "SELECT o.id, o.name, \
                   (SELECT COUNT(*) FROM nodes n WHERE n.owner_id = o.id) AS vehicles \
                   FROM owners o ORDER BY o.id";
        let rows: Vec<(i64, String, i64)> =
            on_database!(self.database(), pool => sqlx::query_as(sql).fetch_all(pool).await?);
        Ok(rows
            .into_iter()
            .map(|(id, name, vehicles)| (owner_from_row((id, name)), vehicles))
            .collect())
    }

    /// The vehicles an owner owns, by name.
    pub async fn owner_vehicles(&self, owner_id: i64) -> Result<Vec<OwnedVehicle>, StoreError> {
        let sql = "SELECT name, last_seen_ms FROM nodes WHERE owner_id = $1 ORDER BY name";
        let rows: Vec<(String, Option<i64>)> = on_database!(self.database(), pool => sqlx::query_as(sql)
                .bind(owner_id)
                .fetch_all(pool)
                .await?);
        Ok(rows
            .into_iter()
            .map(|(name, last_seen_ms)| OwnedVehicle { name, last_seen_ms })
            .collect())
    }

    /// Whether `node` is enrolled and owned by `owner_id`.
    pub async fn owns(&self, owner_id: i64, node: &str) -> Result<bool, StoreError> {
        let sql = "SELECT name FROM nodes WHERE name = $1 AND owner_id = $2";
        let row: Option<(String,)> = on_database!(self.database(), pool => sqlx::query_as(sql)
            .bind(node)
            .bind(owner_id)
            .fetch_optional(pool)
            .await?);
        Ok(row.is_some())
    }

    /// Whether a node of this name is enrolled.
    async fn enrolled(&self, node: &str) -> Result<bool, StoreError> {
        let sql = "SELECT name FROM nodes WHERE name = $1";
        let row: Option<(String,)> = on_database!(self.database(), pool => sqlx::query_as(sql)
            .bind(node)
            .fetch_optional(pool)
            .await?);
        Ok(row.is_some())
    }

    /// The policy a vehicle runs under: its stored one, or the default.
    /// `NoSuchNode` when no such vehicle is enrolled.
    pub async fn node_policy(&self, node: &str) -> Result<OwnerPolicy, StoreError> {
        let sql = format!("SELECT {POLICY_COLUMNS} FROM node_policies WHERE node_name = $1");
        let row: Option<PolicyRow> = on_database!(self.database(), pool => sqlx::query_as(&sql)
            .bind(node)
            .fetch_optional(pool)
            .await?);
        match row {
            Some(row) => Ok(policy_from_row(row)?.policy),
            // Nodes are never removed, so one without a policy row now had
            // none a moment ago either.
            None if self.enrolled(node).await? => Ok(OwnerPolicy::default()),
            None => Err(StoreError::NoSuchNode(node.to_string())),
        }
    }

    /// Stores a vehicle's policy; returns the revision it was written at.
    pub async fn set_node_policy(
        &self,
        node: &str,
        policy: &OwnerPolicy,
        now_ms: i64,
    ) -> Result<i64, StoreError> {
        if !self.enrolled(node).await? {
            return Err(StoreError::NoSuchNode(node.to_string()));
        }
        let stop_before_departure_ms =
            i64::try_from(policy.stop_before_departure_ms).unwrap_or(i64::MAX);
        let (revision,): (i64,) = in_revision_transaction!(self.database(), RevisionKind::Policies, tx => {
            sqlx::query_as(UPSERT_POLICY)
                .bind(node)
                .bind(policy.allow_unplugged)
                .bind(i64::from(policy.unplugged_stop_soc_permille))
                .bind(i64::from(policy.unplugged_resume_soc_permille))
                .bind(i64::from(policy.allowed_hours_utc))
                .bind(i64::from(policy.utc_offset_minutes))
                .bind(policy.max_energy_per_day_wh.map(i64::from))
                .bind(i64::from(policy.max_chip_temperature_decicelsius))
                .bind(stop_before_departure_ms)
                .bind(i64::from(policy.allowed_classes.bits()))
                .bind(now_ms)
                .fetch_one(&mut *tx)
                .await?
        });
        Ok(revision)
    }

    /// Policies written after `revision`, oldest first, at most `limit`.
    pub async fn policies_since(
        &self,
        revision: i64,
        limit: u32,
    ) -> Result<Vec<PolicyChange>, StoreError> {
        let sql = format!(
            "SELECT {POLICY_COLUMNS} FROM node_policies WHERE revision > $1 \
             ORDER BY revision LIMIT $2"
        );
        let rows: Vec<PolicyRow> = on_database!(self.database(), pool => sqlx::query_as(&sql)
            .bind(revision)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?);
        rows.into_iter().map(policy_from_row).collect()
    }
}

fn owner_from_row((id, name): (i64, String)) -> OwnerRecord {
    OwnerRecord { id, name }
}

fn policy_from_row(row: PolicyRow) -> Result<PolicyChange, StoreError> {
    let (
        node,
        allow_unplugged,
        stop_soc,
        resume_soc,
        hours,
        utc_offset,
        energy,
        chip_temperature,
        stop_before_departure,
        classes,
        revision,
    ) = row;
    // The table's CHECK constraints keep every column in range; a value that
    // still does not fit is a corrupt database, reported as such.
    let corrupt = |column: &str| {
        StoreError::Database(sqlx::Error::ColumnDecode {
            index: column.to_string(),
            source: "value out of range".into(),
        })
    };
    let classes = u8::try_from(classes).map_err(|_| corrupt("allowed_classes_mask"))?;
    let mut allowed_classes = ClassSet::NONE;
    for class in scheduler::TenantClass::ALL {
        if classes & (1 << class.index()) != 0 {
            allowed_classes = allowed_classes.with(class);
        }
    }
    let policy = OwnerPolicy {
        allow_unplugged,
        unplugged_stop_soc_permille: u16::try_from(stop_soc)
            .map_err(|_| corrupt("unplugged_stop_soc_permille"))?,
        unplugged_resume_soc_permille: u16::try_from(resume_soc)
            .map_err(|_| corrupt("unplugged_resume_soc_permille"))?,
        allowed_hours_utc: u32::try_from(hours).map_err(|_| corrupt("allowed_hours_mask"))?,
        utc_offset_minutes: i16::try_from(utc_offset).map_err(|_| corrupt("utc_offset_minutes"))?,
        max_energy_per_day_wh: energy
            .map(|wh| u32::try_from(wh).map_err(|_| corrupt("max_energy_per_day_wh")))
            .transpose()?,
        max_chip_temperature_decicelsius: i16::try_from(chip_temperature)
            .map_err(|_| corrupt("max_chip_temperature_decicelsius"))?,
        stop_before_departure_ms: u64::try_from(stop_before_departure)
            .map_err(|_| corrupt("stop_before_departure_ms"))?,
        allowed_classes,
    };
    Ok(PolicyChange {
        node,
        policy,
        revision,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestStore;
    use scheduler::TenantClass;

    crate::on_each_backend!(owners_keys_vehicles_and_policies_round_trip);

    async fn owners_keys_vehicles_and_policies_round_trip(test: &TestStore) {
        let store = &test.store;
        let (alice, key) = store.create_owner("alice", 1).await.expect("create");
        assert!(key.starts_with(OWNER_KEY_PREFIX));
        assert!(matches!(
            store.create_owner("alice", 2).await,
            Err(StoreError::OwnerExists(_))
        ));
        assert_eq!(
            store.owner_for_key(&key).await.expect("lookup"),
            Some(alice.clone())
        );
        let second = store.create_owner_key("alice", 3).await.expect("key");
        assert_eq!(
            store.owner_for_key(&second).await.expect("lookup"),
            Some(alice.clone())
        );

        // Tenant keys and owner keys do not open each other's doors.
        let (_, tenant_key) = store
            .create_tenant("acme", crate::TenantClass::Spot, 4)
            .await
            .expect("tenant");
        assert_eq!(
            store.owner_for_key(&tenant_key).await.expect("lookup"),
            None
        );
        assert_eq!(store.tenant_for_api_key(&key).await.expect("lookup"), None);

        assert!(matches!(
            store.add_node("car-x", "nobody", 5).await,
            Err(StoreError::NoSuchOwner(_))
        ));
        store.add_node("car-a", "alice", 5).await.expect("add");
        store.add_node("car-b", "", 5).await.expect("add unowned");
        assert!(store.owns(alice.id, "car-a").await.expect("owns"));
        assert!(!store.owns(alice.id, "car-b").await.expect("owns"));
        let vehicles = store.owner_vehicles(alice.id).await.expect("vehicles");
        assert_eq!(vehicles.len(), 1);
        assert_eq!(vehicles[0].name, "car-a");
        assert_eq!(
            store.list_owners().await.expect("list"),
            vec![(alice.clone(), 1)]
        );

        assert_eq!(
            store.node_policy("car-a").await.expect("policy"),
            OwnerPolicy::default()
        );
        assert!(matches!(
            store.node_policy("car-z").await,
            Err(StoreError::NoSuchNode(_))
        ));
        let strict = OwnerPolicy {
            allow_unplugged: true,
            max_energy_per_day_wh: Some(1500),
            allowed_classes: ClassSet::only(TenantClass::Fleet),
            utc_offset_minutes: -300,
            ..OwnerPolicy::default()
        };
        let first = store
            .set_node_policy("car-a", &strict, 6)
            .await
            .expect("set");
        assert_eq!(store.node_policy("car-a").await.expect("policy"), strict);
        let second_revision = store
            .set_node_policy("car-b", &OwnerPolicy::default(), 7)
            .await
            .expect("set");
        assert!(second_revision > first);
        let changes = store.policies_since(0, 10).await.expect("since");
        assert_eq!(changes.len(), 2);
        assert_eq!(changes[0].policy, strict);
        assert_eq!(
            store.policies_since(first, 10).await.expect("since").len(),
            1
        );
        assert!(matches!(
            store.set_node_policy("car-z", &strict, 8).await,
            Err(StoreError::NoSuchNode(_))
        ));
    }
}
