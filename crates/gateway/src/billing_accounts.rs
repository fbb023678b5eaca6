//! Whose ledger account is whose: accounts are keyed by immutable store ids,
//! never by a name a user chose, and names are looked up only to show them.
//!
//! - a tenant's account is `tenant:<tenant id>`;
//! - an owner's account is `owner:<owner id>`;
//! - a node enrolled without an owner is paid into `owner:node:<node name>`.
//!   A node's name is its identity (the store's primary key, the name it
//!   authenticates with, the key of its statements) and cannot change; the
//!   `node:` prefix keeps these accounts apart from owners' ids, which are
//!   digits only.
//!
//! Ledgers written before keyed accounts by names (a tenant's name, or
//! `tenant-<id>` when the name was not a valid ledger id; an owner's name; an
//! ownerless node's name as its owner). [`migrate_ledger`] moves them to the
//! id keys once, in one transaction (`ledger::store::Store::rekey_accounts`).
//! Where two parties shared one named account (the defect that made ids
//! necessary), the party whose own name it was keeps it: the ledger's rows
//! do not say which of its transfers were the other's.

use std::collections::{BTreeSet, HashMap};

use ledger::core::{AccountId, IdError, OwnerId, TenantId, TimestampMs};
use ledger::store::{Rekey, RekeyOutcome, Store as Ledger, StoreError as LedgerStoreError};

use crate::store::{NodeRecord, Store, StoreError, TenantRecord};
use crate::store_owners::OwnerRecord;

/// The name under which the move from name keys to id keys is recorded in
/// the ledger, so that it is applied once.
pub const REKEY_NAMES_TO_IDS: &str = "accounts-keyed-by-store-ids";

/// Prefix of the owner account of a node enrolled without an owner.
pub const OWNERLESS_NODE_PREFIX: &str = "node:";

/// The ledger's key of a tenant: its store id.
pub fn tenant_key(tenant_id: i64) -> TenantId {
    TenantId::new(tenant_id.to_string())
        .unwrap_or_else(|_| unreachable!("an integer is always a valid ledger id"))
}

/// The store id of the tenant a ledger key names; `None` for a key that
/// is not an id (a name key from before the move to ids).
pub fn tenant_id_of(key: &TenantId) -> Option<i64> {
    key.as_str().parse().ok()
}

/// The ledger's key of an owner: its store id.
pub fn owner_key(owner_id: i64) -> OwnerId {
    OwnerId::new(owner_id.to_string())
        .unwrap_or_else(|_| unreachable!("an integer is always a valid ledger id"))
}

/// The account a node enrolled without an owner is paid into.
pub fn ownerless_node_key(node: &str) -> Result<OwnerId, IdError> {
    OwnerId::new(format!("{OWNERLESS_NODE_PREFIX}{node}"))
}

/// The account a node's earnings go to.
pub fn node_owner_key(node: &NodeRecord) -> Result<OwnerId, IdError> {
    match node.owner_id {
        Some(owner_id) => Ok(owner_key(owner_id)),
        None => ownerless_node_key(&node.name),
    }
}

/// The account the earnings of node `node` go to, given its record if the
/// store still has one: a node deleted since it worked is still paid, into
/// the account of a node without owner.
pub fn earnings_account(node: &str, record: Option<&NodeRecord>) -> Result<OwnerId, IdError> {
    match record.map(node_owner_key) {
        Some(Ok(owner)) => Ok(owner),
        _ => ownerless_node_key(node),
    }
}

/// Human names of the accounts, as the store has them now.
#[derive(Debug, Default)]
pub struct AccountNames {
    tenants: HashMap<String, String>,
    owners: HashMap<String, String>,
}

impl AccountNames {
    pub async fn load(store: &Store) -> Result<AccountNames, StoreError> {
        let tenants = store.list_tenants().await?;
        let owners = store.list_owners().await?;
        Ok(AccountNames {
            tenants: tenants
                .into_iter()
                .map(|tenant| (tenant_key(tenant.id).to_string(), tenant.name))
                .collect(),
            owners: owners
                .into_iter()
                .map(|(owner, _)| (owner_key(owner.id).to_string(), owner.name))
                .collect(),
        })
    }

    /// A tenant's name, or its key when the store no longer knows it.
    pub fn tenant(&self, tenant: &TenantId) -> String {
        self.tenants
            .get(tenant.as_str())
            .cloned()
            .unwrap_or_else(|| tenant.to_string())
    }

    /// An owner's name; for an ownerless node's account, `vehicle <name>`.
    pub fn owner(&self, owner: &OwnerId) -> String {
        if let Some(name) = self.owners.get(owner.as_str()) {
            return name.clone();
        }
        match owner.as_str().strip_prefix(OWNERLESS_NODE_PREFIX) {
            Some(node) => format!("vehicle {node}"),
            None => owner.to_string(),
        }
    }

    /// An account as people read it: `tenant:<name>`, `owner:<name>`,
    /// `vehicle:<node>` for an ownerless node, system accounts as they are.
    pub fn label(&self, account: &AccountId) -> String {
        match account {
            AccountId::Tenant(tenant) => format!("tenant:{}", self.tenant(tenant)),
            AccountId::Owner(owner) => match owner.as_str().strip_prefix(OWNERLESS_NODE_PREFIX) {
                Some(node) => format!("vehicle:{node}"),
                None => format!("owner:{}", self.owner(owner)),
            },
            other => other.to_string(),
        }
    }
}

/// The account a tenant had when accounts were keyed by names.
fn named_tenant_account(tenant: &TenantRecord) -> Option<TenantId> {
    TenantId::new(tenant.name.as_str())
        .or_else(|_| TenantId::new(format!("tenant-{}", tenant.id)))
        .ok()
}

/// The moves from name keys to id keys for the parties the store knows.
/// A named account claimed by two parties goes to the one whose own name it
/// is: a tenant named so before a tenant whose fallback it was, an owner
/// before a node enrolled without owner.
pub fn rekeys_to_ids(
    tenants: &[TenantRecord],
    owners: &[OwnerRecord],
    nodes: &[NodeRecord],
) -> Vec<Rekey> {
    let mut rekeys = Vec::new();
    let mut claimed: BTreeSet<AccountId> = BTreeSet::new();
    let mut claim = |from: AccountId, to: AccountId, rekeys: &mut Vec<Rekey>| {
        if claimed.insert(from.clone()) {
            rekeys.push(Rekey { from, to });
        }
    };
    let exact_names = tenants
        .iter()
        .filter(|tenant| TenantId::new(tenant.name.as_str()).is_ok());
    let fallback_names = tenants
        .iter()
        .filter(|tenant| TenantId::new(tenant.name.as_str()).is_err());
    for tenant in exact_names.chain(fallback_names) {
        if let Some(named) = named_tenant_account(tenant) {
            let to = AccountId::Tenant(tenant_key(tenant.id));
            claim(AccountId::Tenant(named), to, &mut rekeys);
        }
    }
    for owner in owners {
        if let Ok(named) = OwnerId::new(owner.name.as_str()) {
            let to = AccountId::Owner(owner_key(owner.id));
            claim(AccountId::Owner(named), to, &mut rekeys);
        }
    }
    for node in nodes.iter().filter(|node| node.owner_id.is_none()) {
        if let (Ok(named), Ok(key)) = (
            OwnerId::new(node.name.as_str()),
            ownerless_node_key(&node.name),
        ) {
            claim(AccountId::Owner(named), AccountId::Owner(key), &mut rekeys);
        }
    }
    rekeys
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("read tenants, owners and nodes: {0}")]
    Store(#[from] StoreError),
    #[error("move ledger accounts to id keys: {0}")]
    Ledger(#[from] LedgerStoreError),
}

/// Moves a ledger keyed by names to id keys, once (a ledger that has been
/// moved, or was created keyed by ids, is left as it is).
pub async fn migrate_ledger(
    store: &Store,
    ledger: &Ledger,
    now: TimestampMs,
) -> Result<RekeyOutcome, MigrateError> {
    let tenants = store.list_tenants().await?;
    let owners: Vec<OwnerRecord> = store
        .list_owners()
        .await?
        .into_iter()
        .map(|(owner, _)| owner)
        .collect();
    let nodes = store.list_nodes().await?;
    let rekeys = rekeys_to_ids(&tenants, &owners, &nodes);
    if rekeys.is_empty() {
        // Nothing the store knows could have a named account: leave the
        // ledger unmarked, so that a store opened by mistake (an empty data
        // directory) cannot mark a ledger moved that was not.
        return Ok(RekeyOutcome::Applied { accounts: 0 });
    }
    let outcome = ledger
        .rekey_accounts(REKEY_NAMES_TO_IDS, &rekeys, now)
        .await?;
    if let RekeyOutcome::Applied { accounts } = outcome {
        tracing::info!(accounts, "ledger accounts moved from names to id keys");
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::TenantClass;

    fn tenant(id: i64, name: &str) -> TenantRecord {
        TenantRecord {
            id,
            name: name.into(),
            class: TenantClass::Spot,
        }
    }

    fn node(name: &str, owner_id: Option<i64>) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            owner: String::new(),
            owner_id,
            last_seen_ms: None,
        }
    }

    fn moves(rekeys: &[Rekey]) -> Vec<(String, String)> {
        rekeys
            .iter()
            .map(|rekey| (rekey.from.to_string(), rekey.to.to_string()))
            .collect()
    }

    #[test]
    fn keys_of_tenants_owners_and_ownerless_nodes_never_collide() {
        assert_eq!(tenant_key(5).as_str(), "5");
        assert_eq!(owner_key(5).as_str(), "5");
        assert_eq!(ownerless_node_key("5").unwrap().as_str(), "node:5");
        assert_eq!(
            node_owner_key(&node("alice", Some(3))).unwrap().as_str(),
            "3"
        );
        assert_ne!(
            node_owner_key(&node("alice", None)).unwrap(),
            node_owner_key(&node("bob", Some(3))).unwrap()
        );
    }

    #[test]
    fn a_named_account_goes_to_the_party_whose_name_it_is() {
        // "probe corp" (id 5) was billed on tenant-5, the account of the
        // tenant literally named "tenant-5" (id 6); node "alice" without an
        // owner was paid into owner alice's account.
        let tenants = [
            tenant(5, "probe corp"),
            tenant(6, "tenant-5"),
            tenant(7, "acme"),
        ];
        let owners = [OwnerRecord {
            id: 2,
            name: "alice".into(),
        }];
        let nodes = [
            node("alice", None),
            node("car-9", None),
            node("car-1", Some(2)),
        ];
        let rekeys = rekeys_to_ids(&tenants, &owners, &nodes);
        assert_eq!(
            moves(&rekeys),
            [
                ("tenant:tenant-5", "tenant:6"),
                ("tenant:acme", "tenant:7"),
                ("owner:alice", "owner:2"),
                ("owner:car-9", "owner:node:car-9"),
            ]
            .map(|(from, to)| (from.to_string(), to.to_string()))
        );
    }

    #[test]
    fn labels_show_names() {
        let names = AccountNames {
            tenants: [("5".to_string(), "probe corp".to_string())].into(),
            owners: [("2".to_string(), "alice".to_string())].into(),
        };
        let label = |text: &str| names.label(&text.parse::<AccountId>().unwrap());
        assert_eq!(label("tenant:5"), "tenant:probe corp");
        assert_eq!(label("owner:2"), "owner:alice");
        assert_eq!(label("owner:node:alice"), "vehicle:alice");
        assert_eq!(label("tenant:99"), "tenant:99");
        assert_eq!(label("platform:revenue"), "platform:revenue");
    }
}
