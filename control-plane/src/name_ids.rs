//! Small integer ids for resource names ([`NameTable`]) and each node's acknowledged
//! versions stored by id ([`HeldVersions`]).
//!
//! A node's agent holds a version of every Service: 10,000 entries per node, thousands
//! of nodes per replica. Kept as a hash map from name to version that cost about 400 KB
//! per node (16-byte name pointers, hashing, a table a third empty); by id it is a dense
//! vector of versions and a bitset, and a lookup is an index. Its size follows the table:
//! about 80 KB at 10,000 ids; the hub starts a new table only once its ids pass twice the
//! live names plus 4,096, so for 10,000 live Services at most about 190 KB.
//!
//! # Who may add names, and how the table stays small
//! Only the hub interns names, and only of Services the source holds: names an agent
//! declares are looked up, never added (a peer cannot grow the table), and those the
//! table lacks are kept beside the ids, bounded by what the stream allows one peer to
//! declare. Ids are never reused within a table, so an id held by a stream means one
//! name for as long as the table lives; when Services come and go and dead ids
//! outnumber the live ones, the hub starts a new, dense table (an epoch) and each
//! stream moves its versions over by name ([`HeldVersions::adopt`]) before it diffs
//! against a generation of that table.

use std::sync::{Arc, RwLock};

/// The names of one epoch by id: append-only, shared by the hub (which adds) and the
/// streams (which look up).
#[derive(Debug, Default)]
pub struct NameTable {
    inner: RwLock<Names>,
}

#[derive(Debug, Default)]
struct Names {
    by_id: Vec<Arc<str>>,
    ids: foldhash::HashMap<Arc<str>, u32>,
}

impl NameTable {
    /// A table holding `names`, in that order.
    pub fn with_names<'a>(names: impl IntoIterator<Item = &'a Arc<str>>) -> Arc<Self> {
        let table = Self::default();
        for name in names {
            table.intern(name);
        }
        Arc::new(table)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Names> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The id of `name`, adding it if new. For the hub only: it adds names of Services
    /// the source holds, never names a peer sent.
    pub fn intern(&self, name: &Arc<str>) -> u32 {
        if let Some(id) = self.id(name) {
            return id;
        }
        let mut names = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if let Some(id) = names.ids.get(&**name) {
            return *id;
        }
        let id = u32::try_from(names.by_id.len()).expect("fewer than 2^32 names per epoch");
        names.by_id.push(name.clone());
        names.ids.insert(name.clone(), id);
        id
    }

    pub fn id(&self, name: &str) -> Option<u32> {
        self.read().ids.get(name).copied()
    }

    #[cfg(test)]
    pub fn name(&self, id: u32) -> Option<Arc<str>> {
        self.read().by_id.get(id as usize).cloned()
    }

    /// How many names the table has given ids to, live or not.
    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Resource name → version a node holds: by id for names of its [`NameTable`], by name
/// for the others (names an agent declared that the table lacked).
#[derive(Debug, Default)]
pub struct HeldVersions {
    table: Arc<NameTable>,
    /// Version by id; meaningful where `held` has the bit.
    versions: Vec<u64>,
    /// One bit per id: versions are hashes, so no value can mean "not held".
    held: Vec<u64>,
    /// How many ids are held.
    by_id: usize,
    /// Names the table lacked when recorded.
    other: foldhash::HashMap<Arc<str>, u64>,
    /// The table's length when `other` was last checked against it.
    checked: usize,
}

impl HeldVersions {
    /// What an agent declared on connect, ids taken from `table` where it has them.
    pub fn from_declared(
        table: &Arc<NameTable>,
        declared: impl IntoIterator<Item = (Arc<str>, u64)>,
    ) -> Self {
        let mut held = Self {
            table: table.clone(),
            ..Self::default()
        };
        let names = table.read();
        for (name, version) in declared {
            match names.ids.get(&name) {
                Some(id) => {
                    // Sized here: `set` must not take the table's lock again.
                    held.grow(names.by_id.len());
                    held.set(*id, version);
                }
                None => {
                    held.other.insert(name, version);
                }
            }
        }
        held.checked = names.by_id.len();
        held
    }

    #[cfg(test)]
    pub fn table(&self) -> &Arc<NameTable> {
        &self.table
    }

    /// The version held of the name with id `id` in this map's table.
    pub fn get_id(&self, id: u32) -> Option<u64> {
        let i = id as usize;
        let word = *self.held.get(i / 64)?;
        (word & (1 << (i % 64)) != 0).then(|| self.versions[i])
    }

    pub fn get(&self, name: &str) -> Option<u64> {
        match self.table.id(name) {
            Some(id) => self.get_id(id).or_else(|| self.other.get(name).copied()),
            None => self.other.get(name).copied(),
        }
    }

    /// Records `version` of `name`, whose id in this map's table is `id` when the caller
    /// knows it; returns the version held before.
    pub fn insert(&mut self, name: Arc<str>, id: Option<u32>, version: u64) -> Option<u64> {
        match id.or_else(|| self.table.id(&name)) {
            Some(id) => {
                let before = if self.other.is_empty() {
                    None
                } else {
                    self.other.remove(&name)
                };
                self.set(id, version).or(before)
            }
            None => self.other.insert(name, version),
        }
    }

    pub fn remove(&mut self, name: &str) -> Option<u64> {
        let by_id = self.table.id(name).and_then(|id| self.clear(id));
        self.other.remove(name).or(by_id)
    }

    fn grow(&mut self, len: usize) {
        if len > self.versions.len() {
            self.versions.resize(len, 0);
            self.held.resize(len.div_ceil(64), 0);
        }
    }

    fn set(&mut self, id: u32, version: u64) -> Option<u64> {
        let i = id as usize;
        if i >= self.versions.len() {
            // To the table's size at once, not one id at a time.
            self.grow((i + 1).max(self.table.len()));
        }
        let before = self.get_id(id);
        self.versions[i] = version;
        if before.is_none() {
            self.held[i / 64] |= 1 << (i % 64);
            self.by_id += 1;
        }
        before
    }

    fn clear(&mut self, id: u32) -> Option<u64> {
        let before = self.get_id(id)?;
        let i = id as usize;
        self.held[i / 64] &= !(1 << (i % 64));
        self.by_id -= 1;
        Some(before)
    }

    pub fn len(&self) -> usize {
        self.by_id + self.other.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes reserved for entries: 0 once [`HeldVersions::release`] ran.
    pub fn reserved(&self) -> usize {
        self.versions.capacity() * 8 + self.held.capacity() * 8 + self.other.capacity()
    }

    /// Drops every entry and what was reserved for them, and the table: a closed
    /// session kept for the query API must not pin an old epoch's table and its dead
    /// names.
    pub fn release(&mut self) {
        *self = Self::default();
    }

    /// Every name held with its version, in no particular order.
    pub fn entries(&self) -> Vec<(Arc<str>, u64)> {
        let names = self.table.read();
        let mut entries = Vec::with_capacity(self.len());
        for (word_index, word) in self.held.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let i = word_index * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                entries.push((names.by_id[i].clone(), self.versions[i]));
            }
        }
        entries.extend(self.other.iter().map(|(n, v)| (n.clone(), *v)));
        entries
    }

    /// Makes ids of `table` valid here before a diff against a generation of it: moves
    /// every entry over by name when `table` is a new epoch, and otherwise takes ids for
    /// names kept by name that the table has gained since (an agent may declare a
    /// Service before this controller has read it).
    pub fn adopt(&mut self, table: &Arc<NameTable>) {
        if !Arc::ptr_eq(&self.table, table) {
            let entries = self.entries();
            *self = Self::from_declared(table, entries);
            return;
        }
        if self.other.is_empty() || self.checked == table.len() {
            return;
        }
        let found: Vec<(Arc<str>, u32)> = {
            let names = table.read();
            self.checked = names.by_id.len();
            self.other
                .keys()
                .filter_map(|name| Some((name.clone(), *names.ids.get(name)?)))
                .collect()
        };
        for (name, id) in found {
            if let Some(version) = self.other.remove(&name) {
                self.set(id, version);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<Arc<str>> {
        list.iter().map(|n| Arc::from(*n)).collect()
    }

    fn sorted(held: &HeldVersions) -> Vec<(String, u64)> {
        let mut entries: Vec<_> = held
            .entries()
            .into_iter()
            .map(|(n, v)| (n.to_string(), v))
            .collect();
        entries.sort();
        entries
    }

    #[test]
    fn interning_gives_each_name_one_id_and_looking_up_adds_nothing() {
        let table = NameTable::with_names(&names(&["a/x", "a/y"]));
        assert_eq!(table.intern(&Arc::from("a/y")), 1);
        assert_eq!(table.intern(&Arc::from("b/z")), 2);
        assert_eq!(table.id("a/x"), Some(0));
        assert_eq!(table.id("c/unknown"), None);
        assert_eq!(table.name(2).as_deref(), Some("b/z"));
        assert_eq!(table.len(), 3, "a lookup interns nothing");
    }

    #[test]
    fn versions_are_kept_by_id_or_by_name_and_zero_is_a_version() {
        let table = NameTable::with_names(&names(&["a/x", "a/y"]));
        let declared = [(Arc::from("a/x"), 0), (Arc::from("z/declared-only"), 7)];
        let mut held = HeldVersions::from_declared(&table, declared);
        assert_eq!(
            held.get("a/x"),
            Some(0),
            "0 (unparsable) is held, not absent"
        );
        assert_eq!(held.get_id(0), Some(0));
        assert_eq!(held.get_id(1), None);
        assert_eq!(held.get_id(999), None);
        assert_eq!(held.get("z/declared-only"), Some(7));
        assert_eq!(held.len(), 2);
        assert_eq!(held.insert("a/y".into(), Some(1), 5), None);
        assert_eq!(held.insert("a/y".into(), None, 6), Some(5));
        assert_eq!(held.remove("z/declared-only"), Some(7));
        assert_eq!(held.remove("a/x"), Some(0));
        assert_eq!(held.remove("a/x"), None);
        assert_eq!(sorted(&held), [("a/y".to_string(), 6)]);
        assert_eq!(table.len(), 2, "declared names never enter the table");
        held.release();
        assert!(held.is_empty() && held.reserved() == 0);
    }

    #[test]
    fn a_declared_name_the_table_gains_later_moves_to_its_id() {
        let table = NameTable::with_names(&names(&["a/x"]));
        let mut held = HeldVersions::from_declared(&table, [(Arc::from("a/later"), 3)]);
        let id = table.intern(&Arc::from("a/later"));
        held.adopt(&table);
        assert_eq!(
            held.get_id(id),
            Some(3),
            "found by id, as a diff looks it up"
        );
        assert_eq!(held.len(), 1);
        assert_eq!(held.insert("a/later".into(), Some(id), 4), Some(3));
        assert_eq!(held.len(), 1);
    }

    #[test]
    fn a_new_epoch_moves_every_version_over_by_name() {
        let old = NameTable::with_names(&names(&["a/gone", "a/kept", "a/other"]));
        let mut held = HeldVersions::from_declared(&old, []);
        held.insert("a/gone".into(), Some(0), 1);
        held.insert("a/kept".into(), Some(1), 2);
        held.insert("x/undeclared".into(), None, 9);
        let new = NameTable::with_names(&names(&["a/kept", "x/undeclared"]));
        held.adopt(&new);
        assert!(Arc::ptr_eq(held.table(), &new));
        assert_eq!(held.get_id(0), Some(2), "a/kept has id 0 now");
        assert_eq!(held.get_id(1), Some(9));
        assert_eq!(
            held.get("a/gone"),
            Some(1),
            "kept by name: its removal is still due"
        );
        assert_eq!(
            sorted(&held),
            [
                ("a/gone".to_string(), 1),
                ("a/kept".to_string(), 2),
                ("x/undeclared".to_string(), 9)
            ]
        );
    }
}
