//! Typed handles on the pinned maps, each operation's error naming the map and the call.
//!
//! The maps themselves (layout, sizes) are declared in `bpf/maps.h`; [`Maps::from_ebpf`]
//! takes them from a loaded object and refuses pinned maps whose shape this build does
//! not expect (a pin left by another version of the agent: `--cleanup` removes it).
//!
//! # Inserts refused for want of memory
//! Since Linux 6.1 a hash map without preallocation takes its elements from a per-CPU
//! cache that irq_work refills. Where irq_work has no interrupt of its own (user-mode
//! Linux) it runs at the next timer tick, so a burst of inserts from user space finds
//! the cache empty and the kernel answers `ENOMEM` though memory is plentiful.
//! [`insert`] therefore retries an `ENOMEM` for up to [`ENOMEM_RETRY`]; a map truly
//! out of memory still fails, that much later. Nothing changes where irq_work runs at
//! once.

use std::{
    borrow::BorrowMut,
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, lpm_trie::Key},
};

use crate::abi::{
    AffinityKey, AffinityValue, Backend, CidrData, Config, CtKey, CtValue, MaglevChunk, MaglevKey,
    Meta, NodeAddrKey, RangeData, SlotKey, SrcData, SrcValue, SvcKey, SvcValue, VersionKey,
    VersionValue,
};

/// A map operation that failed, with the map and the operation named. Retryable as a
/// whole apply; a full map (`E2BIG`, `ENOMEM`) fails the resource being written.
#[derive(Debug, thiserror::Error)]
#[error("{op} on map {map}: {source}")]
pub struct MapOpError {
    pub map: &'static str,
    pub op: &'static str,
    #[source]
    pub source: MapError,
}

/// Why the maps of a loaded object cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    /// The object has no map of this name (a build mismatch).
    #[error("the eBPF object has no map {0}")]
    Missing(&'static str),
    /// A pinned map has another shape than this build's.
    #[error(
        "pinned map {map} has {detail}; it was left by another version of the agent: run the agent with --cleanup (or remove the pin directory) and start again"
    )]
    Shape { map: &'static str, detail: String },
    /// The typed handle could not be made.
    #[error(transparent)]
    Op(#[from] MapOpError),
}

fn op(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> MapOpError {
    move |source| MapOpError { map, op, source }
}

/// Every map the agent reads or writes.
pub struct Maps {
    pub services: HashMap<MapData, SvcKey, SvcValue>,
    pub slots: HashMap<MapData, SlotKey, Backend>,
    pub maglev: HashMap<MapData, MaglevKey, MaglevChunk>,
    pub node_addrs: HashMap<MapData, NodeAddrKey, u32>,
    pub ranges: LpmTrie<MapData, RangeData, u8>,
    pub cidrs: LpmTrie<MapData, CidrData, u8>,
    pub src_addrs: LpmTrie<MapData, SrcData, SrcValue>,
    pub versions: HashMap<MapData, VersionKey, VersionValue>,
    pub config: Array<MapData, Config>,
    pub meta: Array<MapData, Meta>,
    pub ct: HashMap<MapData, CtKey, CtValue>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityValue>,
}

fn take(ebpf: &mut Ebpf, name: &'static str, key: usize, value: usize) -> Result<Map, MapsError> {
    let map = ebpf.take_map(name).ok_or(MapsError::Missing(name))?;
    let data = match &map {
        Map::HashMap(d) | Map::LruHashMap(d) | Map::LpmTrie(d) | Map::Array(d) => d,
        _ => return Err(MapsError::Missing(name)),
    };
    let info = data.info().map_err(op(name, "BPF_OBJ_GET_INFO_BY_FD"))?;
    let (k, v) = (info.key_size() as usize, info.value_size() as usize);
    if (k, v) != (key, value) {
        return Err(MapsError::Shape {
            map: name,
            detail: format!(
                "keys of {k} and values of {v} bytes, this build uses {key} and {value}"
            ),
        });
    }
    Ok(map)
}

macro_rules! typed {
    ($ebpf:expr, $name:literal, $ty:ident, $k:ty, $v:ty, $key_size:expr) => {{
        let map = take($ebpf, $name, $key_size, std::mem::size_of::<$v>())?;
        $ty::try_from(map).map_err(op($name, "open"))?
    }};
}

impl Maps {
    /// Takes the maps out of a loaded object (created or reused from their pins).
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        use std::mem::size_of;
        Ok(Self {
            services: typed!(
                ebpf,
                "swy_services",
                HashMap,
                SvcKey,
                SvcValue,
                size_of::<SvcKey>()
            ),
            slots: typed!(
                ebpf,
                "swy_slots",
                HashMap,
                SlotKey,
                Backend,
                size_of::<SlotKey>()
            ),
            maglev: typed!(
                ebpf,
                "swy_maglev",
                HashMap,
                MaglevKey,
                MaglevChunk,
                size_of::<MaglevKey>()
            ),
            node_addrs: typed!(
                ebpf,
                "swy_node_addrs",
                HashMap,
                NodeAddrKey,
                u32,
                size_of::<NodeAddrKey>()
            ),
            ranges: typed!(
                ebpf,
                "swy_ranges",
                LpmTrie,
                RangeData,
                u8,
                size_of::<Key<RangeData>>()
            ),
            cidrs: typed!(
                ebpf,
                "swy_cidrs",
                LpmTrie,
                CidrData,
                u8,
                size_of::<Key<CidrData>>()
            ),
            src_addrs: typed!(
                ebpf,
                "swy_src_addrs",
                LpmTrie,
                SrcData,
                SrcValue,
                size_of::<Key<SrcData>>()
            ),
            versions: typed!(
                ebpf,
                "swy_versions",
                HashMap,
                VersionKey,
                VersionValue,
                size_of::<VersionKey>()
            ),
            config: typed!(ebpf, "swy_config", Array, u32, Config, size_of::<u32>()),
            meta: typed!(ebpf, "swy_meta", Array, u32, Meta, size_of::<u32>()),
            ct: typed!(ebpf, "swy_ct", HashMap, CtKey, CtValue, size_of::<CtKey>()),
            affinity: typed!(
                ebpf,
                "swy_affinity",
                HashMap,
                AffinityKey,
                AffinityValue,
                size_of::<AffinityKey>()
            ),
        })
    }
}

/// Every key of a hash map, read before anything is deleted (deleting while walking
/// `get_next_key` restarts the walk).
pub fn keys<K: aya::Pod, V: aya::Pod, T: std::borrow::Borrow<MapData>>(
    map: &HashMap<T, K, V>,
    name: &'static str,
) -> Result<Vec<K>, MapOpError> {
    map.keys()
        .collect::<Result<Vec<_>, _>>()
        .map_err(op(name, "BPF_MAP_GET_NEXT_KEY"))
}

/// Every entry of a hash map; entries deleted during the walk are skipped.
pub fn entries<K: aya::Pod, V: aya::Pod, T: std::borrow::Borrow<MapData>>(
    map: &HashMap<T, K, V>,
    name: &'static str,
) -> Result<Vec<(K, V)>, MapOpError> {
    let mut out = Vec::new();
    for key in keys(map, name)? {
        match map.get(&key, 0) {
            Ok(value) => out.push((key, value)),
            Err(MapError::KeyNotFound) => {}
            Err(source) => return Err(op(name, "BPF_MAP_LOOKUP_ELEM")(source)),
        }
    }
    Ok(out)
}

/// How long [`insert`] retries an update the kernel refused with `ENOMEM` (see the
/// module docs): many timer ticks of user-mode Linux (10 ms each).
pub const ENOMEM_RETRY: Duration = Duration::from_secs(2);
/// `ENOMEM`.
const ENOMEM: i32 = 12;

fn is_enomem(error: &MapError) -> bool {
    matches!(error, MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(ENOMEM))
}

/// Inserts or replaces `key`; an `ENOMEM` is retried for up to [`ENOMEM_RETRY`].
pub fn insert<K: aya::Pod, V: aya::Pod, T: BorrowMut<MapData>>(
    map: &mut HashMap<T, K, V>,
    name: &'static str,
    key: &K,
    value: &V,
) -> Result<(), MapOpError> {
    let mut deadline = None;
    loop {
        match map.insert(key, value, 0) {
            Err(e)
                if is_enomem(&e)
                    && *deadline.get_or_insert_with(|| Instant::now() + ENOMEM_RETRY)
                        > Instant::now() =>
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            result => return result.map_err(op(name, "BPF_MAP_UPDATE_ELEM")),
        }
    }
}

/// Deletes a key; a key already gone is not an error.
pub fn remove<K: aya::Pod, V: aya::Pod, T: BorrowMut<MapData>>(
    map: &mut HashMap<T, K, V>,
    name: &'static str,
    key: &K,
) -> Result<(), MapOpError> {
    match map.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(source) => Err(op(name, "BPF_MAP_DELETE_ELEM")(source)),
    }
}

/// The same for an LPM trie.
pub fn lpm_insert<K: aya::Pod, T: BorrowMut<MapData>>(
    map: &mut LpmTrie<T, K, u8>,
    name: &'static str,
    key: &Key<K>,
) -> Result<(), MapOpError> {
    map.insert(key, 1, 0)
        .map_err(op(name, "BPF_MAP_UPDATE_ELEM"))
}

/// Sets `key` of an LPM trie to `value`.
pub fn lpm_set<K: aya::Pod, V: aya::Pod, T: BorrowMut<MapData>>(
    map: &mut LpmTrie<T, K, V>,
    name: &'static str,
    key: &Key<K>,
    value: &V,
) -> Result<(), MapOpError> {
    map.insert(key, value, 0)
        .map_err(op(name, "BPF_MAP_UPDATE_ELEM"))
}

pub fn lpm_remove<K: aya::Pod, V: aya::Pod, T: BorrowMut<MapData>>(
    map: &mut LpmTrie<T, K, V>,
    name: &'static str,
    key: &Key<K>,
) -> Result<(), MapOpError> {
    match map.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(source) => Err(op(name, "BPF_MAP_DELETE_ELEM")(source)),
    }
}

pub fn lpm_keys<K: aya::Pod, V: aya::Pod, T: std::borrow::Borrow<MapData>>(
    map: &LpmTrie<T, K, V>,
    name: &'static str,
) -> Result<Vec<Key<K>>, MapOpError> {
    map.keys()
        .collect::<Result<Vec<_>, _>>()
        .map_err(op(name, "BPF_MAP_GET_NEXT_KEY"))
}
