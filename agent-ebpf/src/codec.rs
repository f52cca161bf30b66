//! Both ways between a Service's rendered entries and the maps' keys and values. Pure.
//!
//! [`encode`] gives what to write for a Service, given its id and the range (`rev`) of
//! each backend set; [`assemble`] puts map dumps back together into the entries, backend
//! sets and source ranges of each Service, with the version its `swy_versions` entry
//! records. Entries, source ranges and backend ranges that no Service claims (left by an
//! apply interrupted before it recorded the Service) are reported as orphans, for the
//! next full sync to delete.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;

use crate::{
    abi::{
        self, Backend, MaglevChunk, MaglevKey, RangeData, SlotKey, SvcKey, SvcValue, VersionKey,
        VersionValue,
    },
    render::{Action, BackendSet, Entry, Scope, ServiceEntries},
};

/// Every entry of the maps that describe Services.
#[derive(Clone, Debug, Default)]
pub struct Dump {
    pub services: Vec<(SvcKey, SvcValue)>,
    pub slots: Vec<(SlotKey, Backend)>,
    pub maglev: Vec<(MaglevKey, MaglevChunk)>,
    /// LPM keys: prefix length (of the whole key data) and data.
    pub ranges: Vec<(u32, RangeData)>,
    pub versions: Vec<(VersionKey, VersionValue)>,
}

/// One Service as the maps hold it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Installed {
    pub res_id: u32,
    /// `None` while an apply of it is unfinished (the dirty flag).
    pub version: Option<u64>,
    pub entries: ServiceEntries,
    /// The range of each of `entries.sets`.
    pub revs: Vec<u32>,
    /// Each set as the kernel-object notation shows it.
    pub set_descriptions: Vec<String>,
    /// LPM keys of its source ranges.
    pub range_keys: Vec<(u32, RangeData)>,
}

impl Installed {
    /// The kernel objects, in the notation of `render`.
    pub fn objects(&self) -> Vec<String> {
        self.entries.objects_with(&self.set_descriptions)
    }

    /// Service-map keys of its entries.
    pub fn keys(&self) -> Vec<SvcKey> {
        self.entries.entries.iter().map(Entry::key).collect()
    }

    /// Socket-scope entries that reject or drop (the egress program's switch).
    pub fn blackholes(&self) -> u32 {
        self.entries
            .entries
            .iter()
            .filter(|e| e.scope == Scope::Sock && !matches!(e.action, Action::Forward { .. }))
            .count() as u32
    }
}

/// What [`assemble`] finds.
#[derive(Clone, Debug, Default)]
pub struct ReadBack {
    pub services: BTreeMap<String, Installed>,
    /// Service entries of no recorded Service.
    pub orphan_keys: Vec<SvcKey>,
    /// Backend ranges no entry points at.
    pub orphan_revs: BTreeSet<u32>,
    /// Source ranges of no recorded Service.
    pub orphan_ranges: Vec<(u32, RangeData)>,
    /// Version entries whose key is not a name.
    pub orphan_versions: Vec<VersionKey>,
    /// Slots and Maglev chunks of the orphan ranges.
    pub orphan_slots: Vec<SlotKey>,
    pub orphan_chunks: Vec<MaglevKey>,
    /// The highest range in the maps.
    pub max_rev: u32,
}

/// A source range from its LPM key: `prefixlen` counts the 32 bits of the Service id.
pub fn range_net(prefixlen: u32, data: &RangeData) -> Option<IpNet> {
    let ip = abi::ip(&data.addr);
    let bits = prefixlen.checked_sub(32)?;
    let bits = match ip {
        std::net::IpAddr::V4(_) => bits.checked_sub(96)?,
        std::net::IpAddr::V6(_) => bits,
    };
    IpNet::new(ip, u8::try_from(bits).ok()?).ok()
}

/// The LPM key of a source range of Service `res_id`.
pub fn range_key(res_id: u32, net: &IpNet) -> (u32, RangeData) {
    let extra = if net.addr().is_ipv4() { 96 } else { 0 };
    (
        32 + extra + u32::from(net.prefix_len()),
        RangeData {
            res_id,
            addr: abi::addr(net.network()),
        },
    )
}

/// The entry an (key, value) pair describes; `None` for an unknown scope or action.
fn entry(key: &SvcKey, value: &SvcValue, set: Option<usize>) -> Option<Entry> {
    let action = match value.action {
        abi::ACT_FORWARD => Action::Forward { set: set? },
        abi::ACT_REJECT => Action::Reject,
        abi::ACT_DROP => Action::Drop,
        _ => return None,
    };
    Some(Entry {
        scope: Scope::from_code(key.scope)?,
        addr: abi::ip(&key.addr),
        port: abi::host_port(key.port),
        proto: key.proto,
        action,
        flags: value.flags & !(abi::F_AFFINITY | abi::F_MAGLEV),
        affinity: (value.flags & abi::F_AFFINITY != 0).then_some(value.affinity_timeout),
        affinity_id: value.affinity_id,
    })
}

/// Puts the dumps back together; see the module docs.
pub fn assemble(dump: Dump) -> ReadBack {
    let mut out = ReadBack::default();
    let mut names: BTreeMap<u32, (String, Option<u64>)> = BTreeMap::new();
    for (key, value) in &dump.versions {
        match key.name() {
            Some(name) if !name.is_empty() => {
                let version = (value.flags & abi::VERSION_F_DIRTY == 0).then_some(value.version);
                names.insert(value.res_id, (name.to_string(), version));
            }
            _ => out.orphan_versions.push(*key),
        }
    }
    let slots: BTreeMap<SlotKey, Backend> = dump.slots.iter().copied().collect();
    let chunks: BTreeMap<MaglevKey, MaglevChunk> = dump.maglev.iter().copied().collect();
    let mut referenced = BTreeSet::new();

    let mut by_service: BTreeMap<u32, Vec<(SvcKey, SvcValue)>> = BTreeMap::new();
    for (key, value) in &dump.services {
        if names.contains_key(&value.res_id) {
            by_service
                .entry(value.res_id)
                .or_default()
                .push((*key, *value));
        } else {
            out.orphan_keys.push(*key);
        }
        if value.action == abi::ACT_FORWARD {
            referenced.insert(value.rev);
        }
    }
    for (res_id, (name, version)) in &names {
        let mut installed = Installed {
            res_id: *res_id,
            version: *version,
            ..Installed::default()
        };
        let mut pairs = by_service.remove(res_id).unwrap_or_default();
        pairs.sort_by_key(|(k, _)| (Scope::from_code(k.scope), *k));
        for (key, value) in pairs {
            let set = if value.action == abi::ACT_FORWARD {
                Some(match installed.revs.iter().position(|r| *r == value.rev) {
                    Some(i) => i,
                    None => {
                        let (set, description) = read_set(&value, &slots, &chunks);
                        installed.revs.push(value.rev);
                        installed.entries.sets.push(set);
                        installed.set_descriptions.push(description);
                        installed.revs.len() - 1
                    }
                })
            } else {
                None
            };
            match entry(&key, &value, set) {
                Some(e) => installed.entries.entries.push(e),
                None => out.orphan_keys.push(key),
            }
        }
        out.services.insert(name.clone(), installed);
    }
    for (prefixlen, data) in &dump.ranges {
        let owner = names
            .get(&data.res_id)
            .and_then(|(name, _)| out.services.get_mut(name));
        match (owner, range_net(*prefixlen, data)) {
            (Some(installed), Some(net)) => {
                installed.entries.ranges.push(net);
                installed.range_keys.push((*prefixlen, *data));
            }
            _ => out.orphan_ranges.push((*prefixlen, *data)),
        }
    }
    for installed in out.services.values_mut() {
        installed.entries.ranges.sort();
    }
    let all_revs: BTreeSet<u32> = slots
        .keys()
        .map(|k| k.rev)
        .chain(chunks.keys().map(|k| k.rev))
        .collect();
    out.max_rev = all_revs
        .iter()
        .chain(&referenced)
        .copied()
        .max()
        .unwrap_or(0);
    out.orphan_revs = all_revs.difference(&referenced).copied().collect();
    out.orphan_slots = slots
        .keys()
        .filter(|k| out.orphan_revs.contains(&k.rev))
        .copied()
        .collect();
    out.orphan_chunks = chunks
        .keys()
        .filter(|k| out.orphan_revs.contains(&k.rev))
        .copied()
        .collect();
    out
}

/// The backend set of a forwarding entry's range, and its description.
fn read_set(
    value: &SvcValue,
    slots: &BTreeMap<SlotKey, Backend>,
    chunks: &BTreeMap<MaglevKey, MaglevChunk>,
) -> (BackendSet, String) {
    let mut backends = Vec::with_capacity(usize::from(value.count));
    let mut missing = false;
    for slot in 0..u32::from(value.count) {
        match slots.get(&SlotKey {
            rev: value.rev,
            slot,
        }) {
            Some(b) => backends.push(std::net::SocketAddr::new(
                abi::ip(&b.addr),
                abi::host_port(b.port),
            )),
            None => missing = true,
        }
    }
    let maglev = (value.flags & abi::F_MAGLEV != 0).then_some(value.maglev_size);
    let table = maglev.and_then(|size| read_table(value.rev, size, chunks));
    let set = BackendSet { backends, maglev };
    let mut description = set.describe(table.as_deref());
    if missing {
        description.push_str(" (slots missing)");
    }
    (set, description)
}

fn read_table(rev: u32, size: u32, chunks: &BTreeMap<MaglevKey, MaglevChunk>) -> Option<Vec<u16>> {
    let size = size as usize;
    let mut table = Vec::with_capacity(size);
    for chunk in 0..size.div_ceil(abi::MAGLEV_CHUNK) {
        let c = chunks.get(&MaglevKey {
            rev,
            chunk: chunk as u32,
        })?;
        let take = (size - table.len()).min(abi::MAGLEV_CHUNK);
        table.extend_from_slice(&c.slot[..take]);
    }
    Some(table)
}

/// What one Service puts into the maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Encoded {
    pub services: Vec<(SvcKey, SvcValue)>,
    pub slots: Vec<(SlotKey, Backend)>,
    pub maglev: Vec<(MaglevKey, MaglevChunk)>,
    pub ranges: Vec<(u32, RangeData)>,
}

/// The map entries of `entries` for Service `res_id`, the sets living in `revs`
/// (one per set). `sets_to_write` says which sets need their slots and tables written
/// (the others are already in the maps under their range).
pub fn encode(
    entries: &ServiceEntries,
    res_id: u32,
    revs: &[u32],
    sets_to_write: &[bool],
) -> Result<Encoded, crate::render::RenderError> {
    let mut out = Encoded::default();
    for (i, set) in entries.sets.iter().enumerate() {
        if !sets_to_write.get(i).copied().unwrap_or(true) {
            continue;
        }
        for (slot, backend) in set.backends.iter().enumerate() {
            out.slots.push((
                SlotKey {
                    rev: revs[i],
                    slot: slot as u32,
                },
                Backend {
                    addr: abi::addr(backend.ip()),
                    port: abi::port(backend.port()),
                    pad: 0,
                },
            ));
        }
        if let Some(table) = set.maglev_table()? {
            out.maglev.extend(table_chunks(revs[i], &table));
        }
    }
    for e in &entries.entries {
        let mut value = SvcValue {
            res_id,
            affinity_id: e.affinity_id,
            flags: e.flags,
            ..SvcValue::default()
        };
        match e.action {
            Action::Forward { set } => {
                let backend_set = &entries.sets[set];
                value.action = abi::ACT_FORWARD;
                value.rev = revs[set];
                value.count = backend_set.backends.len() as u16;
                if let Some(size) = backend_set.maglev {
                    value.flags |= abi::F_MAGLEV;
                    value.maglev_size = size;
                }
                if let Some(timeout) = e.affinity {
                    value.flags |= abi::F_AFFINITY;
                    value.affinity_timeout = timeout;
                }
            }
            Action::Reject => value.action = abi::ACT_REJECT,
            Action::Drop => value.action = abi::ACT_DROP,
        }
        out.services.push((e.key(), value));
    }
    out.ranges = entries
        .ranges
        .iter()
        .map(|r| range_key(res_id, r))
        .collect();
    Ok(out)
}

/// The Maglev chunks of a table.
pub fn table_chunks(rev: u32, table: &[u16]) -> Vec<(MaglevKey, MaglevChunk)> {
    table
        .chunks(abi::MAGLEV_CHUNK)
        .enumerate()
        .map(|(i, part)| {
            let mut chunk = MaglevChunk {
                slot: [0; abi::MAGLEV_CHUNK],
            };
            chunk.slot[..part.len()].copy_from_slice(part);
            (
                MaglevKey {
                    rev,
                    chunk: i as u32,
                },
                chunk,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests;
