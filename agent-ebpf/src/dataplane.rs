//! The eBPF [`Dataplane`]: each Service's map entries written make-before-break, the
//! maps read back per Service, the node-wide maps (node addresses, cluster CIDRs,
//! settings) kept current, and conntrack entries of removed UDP backends flushed.
//!
//! # Make-before-break
//! A Service's changed backend sets go into fresh ranges (slots and Maglev tables under
//! a new `rev`) before any service entry points at them; each entry then switches in
//! one map update; old ranges, entries and source ranges go last. Sets that did not
//! change keep their range. A reader therefore sees the old Service or the new one,
//! never a mix (a reader that loses the race for a deleted range retries once, see
//! `bpf/lb.h`).
//!
//! # Versions
//! `swy_versions` maps the Service name to its id and the version last written, with a
//! dirty flag set while a write is under way: a Service caught mid-write (agent killed)
//! reads back without a version, so the runtime judges it by its entries.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
};

use ipnet::IpNet;
use sha2::{Digest, Sha256};
use switchyard_agent_core::{
    dataplane::{
        ApplyOutcome, Change, Dataplane, DataplaneError, Desired, DesiredService, Programmed,
        ProgrammedService,
    },
    policy::{Family, nets_of_family},
};
use switchyard_proto::{format_version, v1};

use crate::{
    abi::{
        self, CidrData, Config, CtKey, MaglevKey, NodeAddrKey, SlotKey, SrcData, SrcValue,
        VersionKey, VersionValue,
    },
    codec::{self, Dump, Installed, ReadBack},
    host,
    loader::{self, Attach, Features, LoadError, SnatSource, TcAttachMode, TcMode},
    maps::{self, MapOpError, Maps},
    render::{RenderConfig, RenderError, ServiceEntries, render_service},
};

/// The default source ports of source-NATed flows: above Linux's default ephemeral
/// range (32768–60999), so they never meet the node's own connections.
pub const DEFAULT_SNAT_PORTS: (u16, u16) = (61000, 65535);

/// Settings of the eBPF dataplane.
#[derive(Clone, Debug)]
pub struct EbpfConfig {
    /// Where the programs attach and the pins live.
    pub attach: Attach,
    /// What the entries say.
    pub render: RenderConfig,
    /// `--nodeport-addresses`: node ports answer only on local addresses inside these
    /// CIDRs; empty: on every local address.
    pub nodeport_addresses: Vec<IpNet>,
    /// Source ports of source-NATed flows (inclusive).
    pub snat_ports: (u16, u16),
    /// How the tc programs attach (TCX where the kernel has it, by default).
    pub tc_attach: TcAttachMode,
    /// Where source NAT takes the node's address from (`bpf_fib_lookup` where the
    /// kernel names one, by default).
    pub snat_source: SnatSource,
}

impl EbpfConfig {
    pub fn new(attach: Attach) -> Self {
        Self {
            attach,
            render: RenderConfig::default(),
            nodeport_addresses: Vec::new(),
            snat_ports: DEFAULT_SNAT_PORTS,
            tc_attach: TcAttachMode::Auto,
            snat_source: SnatSource::Auto,
        }
    }
}

/// Why one Service could not be written.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error(transparent)]
    Map(#[from] MapOpError),
    #[error("name {0:?} does not fit the versions map")]
    Name(String),
}

/// What the maps hold, as last written or read.
struct State {
    services: BTreeMap<String, Installed>,
    res_ids: HashMap<u32, String>,
    next_rev: u32,
    /// Ranges in use, built only once `next_rev` has wrapped around.
    used_revs: Option<BTreeSet<u32>>,
    /// Socket-scope entries that reject or drop, over every Service.
    blackholes: u32,
}

/// Programs Services into pinned BPF maps; see the crate docs for the layout.
pub struct EbpfDataplane {
    config: EbpfConfig,
    maps: Maps,
    state: Option<State>,
    /// `sock_blackholes` as last written to `swy_config`.
    blackholes_written: Option<u32>,
    reused_links: bool,
    features: Features,
    /// Whether the paths taken were logged (at the first apply or read-back: agents
    /// set up logging after they build their dataplane).
    announced: bool,
}

fn map_error(e: MapOpError) -> DataplaneError {
    DataplaneError::Io {
        operation: format!("{} on map {}", e.op, e.map),
        source: std::io::Error::other(e.source),
    }
}

impl EbpfDataplane {
    /// Mounts the bpffs if needed, creates or reuses the pinned maps, loads and attaches
    /// the programs unless the pinned links already run this build, and writes the
    /// node-wide maps. Service entries are left as they are.
    pub fn new(config: EbpfConfig) -> Result<Self, LoadError> {
        let kernel = loader::open(&config.attach, config.tc_attach, config.snat_source)?;
        let mut dataplane = Self {
            config,
            maps: kernel.maps,
            state: None,
            blackholes_written: None,
            reused_links: kernel.reused_links,
            features: kernel.features,
            announced: false,
        };
        dataplane.sync_globals()?;
        Ok(dataplane)
    }

    /// Whether the pinned links were found running this build and kept as they were.
    pub fn reused_links(&self) -> bool {
        self.reused_links
    }

    /// What the kernel offers and so which paths the dataplane took (tc attachment,
    /// source of source-NAT addresses), found when it started.
    pub fn features(&self) -> Features {
        self.features
    }

    /// Logs, once, which paths the dataplane takes on this kernel and why.
    fn announce(&mut self) {
        if std::mem::replace(&mut self.announced, true) {
            return;
        }
        let tc = match (self.features.tc, self.config.tc_attach) {
            (TcMode::Tcx, _) => "TCX links",
            (TcMode::Classic, TcAttachMode::Classic) => {
                "cls_bpf filters on a clsact qdisc (--tc-attach classic)"
            }
            (TcMode::Classic, _) => {
                "cls_bpf filters on a clsact qdisc (the kernel has no TCX, Linux 6.6)"
            }
        };
        let snat = match (self.features.fib_src, self.config.snat_source) {
            (true, _) => "the source bpf_fib_lookup names for the route",
            (false, SnatSource::Devices) => {
                "the out device's address from swy_src_addrs (--snat-source devices)"
            }
            (false, SnatSource::Auto) => {
                "the out device's address from swy_src_addrs (bpf_fib_lookup has no BPF_FIB_LOOKUP_SRC, Linux 6.7)"
            }
        };
        tracing::info!(
            tc,
            snat_source = snat,
            reused_links = self.reused_links,
            "eBPF dataplane attached"
        );
    }

    pub fn config(&self) -> &EbpfConfig {
        &self.config
    }

    /// The maps, for tests and tools that inspect them.
    pub fn maps(&mut self) -> &mut Maps {
        &mut self.maps
    }

    /// The entries `desired` renders to, in the kernel-object notation, one block per
    /// Service (`--dry-run`). Touches nothing.
    pub fn dry_run(render: &RenderConfig, desired: &Desired) -> String {
        let mut out = String::new();
        for (name, service) in desired {
            out.push_str(&format!(
                "# {name} version {}\n",
                format_version(service.version)
            ));
            match render_service(name, service, render).and_then(|r| r.objects()) {
                Ok(objects) => {
                    for object in objects {
                        out.push_str(&object);
                        out.push('\n');
                    }
                }
                Err(error) => out.push_str(&format!("! cannot render: {error}\n")),
            }
        }
        out
    }

    /// Writes the node addresses node ports answer on, the cluster CIDRs, the source
    /// addresses of source NAT per device and the settings the programs read.
    pub fn sync_globals(&mut self) -> Result<(), LoadError> {
        let addrs = host::interface_addrs().map_err(|source| LoadError::Io {
            op: "getifaddrs",
            path: "/".into(),
            source,
        })?;
        let wanted: BTreeSet<[u32; 4]> =
            host::nodeport_addrs(&addrs, &self.config.nodeport_addresses)
                .into_iter()
                .map(abi::addr)
                .collect();
        for key in maps::keys(&self.maps.node_addrs, "swy_node_addrs")? {
            if !wanted.contains(&key.addr) {
                maps::remove(&mut self.maps.node_addrs, "swy_node_addrs", &key)?;
            }
        }
        for addr in &wanted {
            maps::insert(
                &mut self.maps.node_addrs,
                "swy_node_addrs",
                &NodeAddrKey { addr: *addr },
                &abi::NODE_F_NODEPORT,
            )?;
        }

        let cidrs: Vec<aya::maps::lpm_trie::Key<CidrData>> = Family::ALL
            .into_iter()
            .filter_map(|f| {
                nets_of_family(&self.config.render.cluster_cidrs, f)
                    .first()
                    .copied()
            })
            .map(|net| {
                let extra = if net.addr().is_ipv4() { 96 } else { 0 };
                aya::maps::lpm_trie::Key::new(
                    extra + u32::from(net.prefix_len()),
                    CidrData {
                        addr: abi::addr(net.network()),
                    },
                )
            })
            .collect();
        for key in maps::lpm_keys(&self.maps.cidrs, "swy_cidrs")? {
            if !cidrs
                .iter()
                .any(|c| c.prefix_len() == key.prefix_len() && c.data() == key.data())
            {
                maps::lpm_remove(&mut self.maps.cidrs, "swy_cidrs", &key)?;
            }
        }
        for key in &cidrs {
            maps::lpm_insert(&mut self.maps.cidrs, "swy_cidrs", key)?;
        }
        if !self.features.fib_src {
            self.sync_src_addrs()?;
        }
        self.write_config(None)?;
        Ok(())
    }

    /// Keeps `swy_src_addrs` equal to the node's devices' addresses (see
    /// [`host::src_addrs`]), where source NAT reads it (not `bpf_fib_lookup`'s source).
    fn sync_src_addrs(&mut self) -> Result<(), LoadError> {
        let addrs = host::device_addrs().map_err(|source| LoadError::Io {
            op: "getifaddrs",
            path: "/".into(),
            source,
        })?;
        let wanted: BTreeMap<(u32, SrcData), SrcValue> = host::src_addrs(&addrs)
            .into_iter()
            .map(|(key, addr)| {
                let data = SrcData {
                    ifindex: key.ifindex,
                    addr: abi::addr(key.addr),
                };
                (
                    (key.prefix_len, data),
                    SrcValue {
                        addr: abi::addr(addr),
                    },
                )
            })
            .collect();
        let name = "swy_src_addrs";
        let map = &mut self.maps.src_addrs;
        let mut present = BTreeSet::new();
        for key in maps::lpm_keys(map, name)? {
            let id = (key.prefix_len(), key.data());
            if wanted.contains_key(&id) {
                present.insert(id);
            } else {
                maps::lpm_remove(map, name, &key)?;
            }
        }
        for (id @ (prefix_len, data), value) in &wanted {
            let key = aya::maps::lpm_trie::Key::new(*prefix_len, *data);
            // A lookup of a present key finds that key's own entry.
            if !present.contains(id) || map.get(&key, 0).ok().as_ref() != Some(value) {
                maps::lpm_set(map, name, &key, value)?;
            }
        }
        Ok(())
    }

    fn write_config(&mut self, blackholes: Option<u32>) -> Result<(), MapOpError> {
        let current = self.maps.config.get(&0, 0).unwrap_or_default();
        let (min, max) = self.config.snat_ports;
        let config = Config {
            sock_blackholes: blackholes.unwrap_or(current.sock_blackholes),
            snat_port_min: min,
            snat_port_max: max,
            flags: if self.features.fib_src {
                abi::CFG_F_FIB_SRC
            } else {
                0
            },
            pad: 0,
        };
        if config != current {
            self.maps
                .config
                .set(0, config, 0)
                .map_err(|source| MapOpError {
                    map: "swy_config",
                    op: "BPF_MAP_UPDATE_ELEM",
                    source,
                })?;
        }
        self.blackholes_written = Some(config.sock_blackholes);
        Ok(())
    }

    fn dump(&self) -> Result<Dump, MapOpError> {
        Ok(Dump {
            services: maps::entries(&self.maps.services, "swy_services")?,
            slots: maps::entries(&self.maps.slots, "swy_slots")?,
            maglev: maps::entries(&self.maps.maglev, "swy_maglev")?,
            ranges: maps::lpm_keys(&self.maps.ranges, "swy_ranges")?
                .into_iter()
                .map(|k| (k.prefix_len(), k.data()))
                .collect(),
            versions: maps::entries(&self.maps.versions, "swy_versions")?,
        })
    }

    /// Reads the maps and makes what they hold the state to write against.
    fn read(&mut self) -> Result<ReadBack, MapOpError> {
        let back = codec::assemble(self.dump()?);
        let res_ids = back
            .services
            .iter()
            .map(|(name, s)| (s.res_id, name.clone()))
            .collect();
        self.state = Some(State {
            blackholes: back.services.values().map(Installed::blackholes).sum(),
            services: back.services.clone(),
            res_ids,
            next_rev: back.max_rev,
            used_revs: None,
        });
        Ok(back)
    }

    fn state(&mut self) -> Result<&mut State, MapOpError> {
        if self.state.is_none() {
            self.read()?;
        }
        Ok(self.state.as_mut().expect("just read"))
    }

    /// Deletes what no Service claims.
    fn collect_orphans(&mut self, back: &ReadBack) -> Result<(), MapOpError> {
        let m = &mut self.maps;
        for key in &back.orphan_keys {
            maps::remove(&mut m.services, "swy_services", key)?;
        }
        for (prefixlen, data) in &back.orphan_ranges {
            let key = aya::maps::lpm_trie::Key::new(*prefixlen, *data);
            maps::lpm_remove(&mut m.ranges, "swy_ranges", &key)?;
        }
        for key in &back.orphan_slots {
            maps::remove(&mut m.slots, "swy_slots", key)?;
        }
        for key in &back.orphan_chunks {
            maps::remove(&mut m.maglev, "swy_maglev", key)?;
        }
        for key in &back.orphan_versions {
            maps::remove(&mut m.versions, "swy_versions", key)?;
        }
        let orphans = back.orphan_keys.len() + back.orphan_revs.len() + back.orphan_ranges.len();
        if orphans > 0 {
            tracing::info!(orphans, "removed map entries no Service claims");
        }
        Ok(())
    }

    /// Makes the maps hold `service`; `known` skips it when they already do.
    fn upsert(
        &mut self,
        name: &str,
        service: &DesiredService,
        udp_gone: &mut BTreeSet<SocketAddr>,
    ) -> Result<(), WriteError> {
        let rendered = render_service(name, service, &self.config.render)?;
        let descriptions = rendered
            .sets
            .iter()
            .map(|set| Ok(set.describe(set.maglev_table()?.as_deref())))
            .collect::<Result<Vec<_>, RenderError>>()?;
        let state = self.state()?;
        let old = state.services.get(name).cloned();
        if let Some(old) = &old
            && old.version == Some(service.version)
            && old.objects() == rendered.objects_with(&descriptions)
        {
            return Ok(());
        }
        let key = VersionKey::of(name).ok_or_else(|| WriteError::Name(name.into()))?;
        let res_id = match &old {
            Some(old) => old.res_id,
            None => allocate_res_id(state, name),
        };
        // 1. Mark the Service as being written.
        let dirty = VersionValue {
            version: old.as_ref().and_then(|o| o.version).unwrap_or(0),
            res_id,
            flags: abi::VERSION_F_DIRTY,
        };
        maps::insert(&mut self.maps.versions, "swy_versions", &key, &dirty)?;
        // 2. Ranges: unchanged sets keep theirs, the others get fresh ones.
        let state = self.state.as_mut().expect("state read above");
        let mut revs = Vec::with_capacity(rendered.sets.len());
        let mut fresh = Vec::with_capacity(rendered.sets.len());
        for (set, description) in rendered.sets.iter().zip(&descriptions) {
            let kept = old.as_ref().and_then(|o| {
                o.entries
                    .sets
                    .iter()
                    .zip(&o.set_descriptions)
                    .position(|(s, d)| s == set && d == description)
                    .map(|i| o.revs[i])
            });
            match kept {
                Some(rev) => {
                    revs.push(rev);
                    fresh.push(false);
                }
                None => {
                    revs.push(allocate_rev(state));
                    fresh.push(true);
                }
            }
        }
        let encoded = codec::encode(&rendered, res_id, &revs, &fresh)?;
        let m = &mut self.maps;
        for (key, backend) in &encoded.slots {
            maps::insert(&mut m.slots, "swy_slots", key, backend)?;
        }
        for (key, chunk) in &encoded.maglev {
            maps::insert(&mut m.maglev, "swy_maglev", key, chunk)?;
        }
        let old_ranges: BTreeSet<_> = old
            .as_ref()
            .map(|o| o.range_keys.iter().copied().collect())
            .unwrap_or_default();
        for (prefixlen, data) in &encoded.ranges {
            if !old_ranges.contains(&(*prefixlen, *data)) {
                let key = aya::maps::lpm_trie::Key::new(*prefixlen, *data);
                maps::lpm_insert(&mut m.ranges, "swy_ranges", &key)?;
            }
        }
        // 3. Entries switch to the new ranges, one update each.
        for (key, value) in &encoded.services {
            maps::insert(&mut m.services, "swy_services", key, value)?;
        }
        // 4. What the new state no longer has goes last.
        if let Some(old) = &old {
            let new_keys: BTreeSet<_> = encoded.services.iter().map(|(k, _)| *k).collect();
            for key in old.keys() {
                if !new_keys.contains(&key) {
                    maps::remove(&mut m.services, "swy_services", &key)?;
                }
            }
            let new_ranges: BTreeSet<_> = encoded.ranges.iter().copied().collect();
            for (prefixlen, data) in &old.range_keys {
                if !new_ranges.contains(&(*prefixlen, *data)) {
                    let key = aya::maps::lpm_trie::Key::new(*prefixlen, *data);
                    maps::lpm_remove(&mut m.ranges, "swy_ranges", &key)?;
                }
            }
            for (i, rev) in old.revs.iter().enumerate() {
                if !revs.contains(rev) {
                    delete_range(m, *rev, &old.entries, i)?;
                }
            }
            let now: BTreeSet<SocketAddr> = rendered.udp_backends().into_iter().collect();
            udp_gone.extend(
                old.entries
                    .udp_backends()
                    .into_iter()
                    .filter(|b| !now.contains(b)),
            );
        }
        // 5. The Service is whole again, at its new version.
        let done = VersionValue {
            version: service.version,
            res_id,
            flags: 0,
        };
        maps::insert(&mut m.versions, "swy_versions", &key, &done)?;
        let installed = Installed {
            res_id,
            version: Some(service.version),
            entries: rendered,
            revs,
            set_descriptions: descriptions,
            range_keys: encoded.ranges,
        };
        let state = self.state.as_mut().expect("state read above");
        state.blackholes += installed.blackholes();
        state.blackholes -= old.as_ref().map_or(0, Installed::blackholes);
        state.res_ids.insert(res_id, name.to_string());
        state.services.insert(name.to_string(), installed);
        Ok(())
    }

    /// Removes everything of Service `name`: entries first, then its ranges and record.
    fn remove(
        &mut self,
        name: &str,
        udp_gone: &mut BTreeSet<SocketAddr>,
    ) -> Result<(), WriteError> {
        let Some(old) = self.state()?.services.get(name).cloned() else {
            return Ok(());
        };
        let m = &mut self.maps;
        for key in old.keys() {
            maps::remove(&mut m.services, "swy_services", &key)?;
        }
        for (prefixlen, data) in &old.range_keys {
            let key = aya::maps::lpm_trie::Key::new(*prefixlen, *data);
            maps::lpm_remove(&mut m.ranges, "swy_ranges", &key)?;
        }
        for (i, rev) in old.revs.iter().enumerate() {
            delete_range(m, *rev, &old.entries, i)?;
        }
        if let Some(key) = VersionKey::of(name) {
            maps::remove(&mut m.versions, "swy_versions", &key)?;
        }
        udp_gone.extend(old.entries.udp_backends());
        let state = self.state.as_mut().expect("state read above");
        state.services.remove(name);
        state.res_ids.remove(&old.res_id);
        state.blackholes -= old.blackholes();
        Ok(())
    }

    /// Deletes the conntrack entries of flows to UDP backends that went away, as
    /// kube-proxy flushes UDP conntrack entries of removed endpoints.
    fn flush_udp(&mut self, gone: &BTreeSet<SocketAddr>) -> Result<usize, MapOpError> {
        let udp = 17;
        let mut doomed: Vec<CtKey> = Vec::new();
        for (key, value) in maps::entries(&self.maps.ct, "swy_ct")? {
            if key.proto != udp {
                continue;
            }
            let backend = if value.dir == abi::CT_FORWARD {
                SocketAddr::new(abi::ip(&value.addr), abi::host_port(value.port))
            } else {
                SocketAddr::new(abi::ip(&key.src), abi::host_port(key.sport))
            };
            if gone.contains(&backend) {
                doomed.push(key);
            }
        }
        for key in &doomed {
            maps::remove(&mut self.maps.ct, "swy_ct", key)?;
        }
        Ok(doomed.len())
    }

    fn write_blackholes(&mut self) -> Result<(), MapOpError> {
        let total = self.state.as_ref().map(|s| s.blackholes);
        if let Some(total) = total
            && self.blackholes_written != Some(total)
        {
            self.write_config(Some(total))?;
        }
        Ok(())
    }

    /// [`Dataplane::apply`]: the node-wide maps and leftovers first on a full sync, then
    /// each Service written or removed on its own (a failed one is reported and the maps
    /// read again before the next).
    fn sync(&mut self, desired: &Desired, change: &Change) -> Result<ApplyOutcome, DataplaneError> {
        if change.full {
            self.sync_globals().map_err(|e| DataplaneError::Io {
                operation: "writing the node-wide maps".into(),
                source: std::io::Error::other(e),
            })?;
            let back = self.read().map_err(map_error)?;
            self.collect_orphans(&back).map_err(map_error)?;
        }
        self.state().map_err(map_error)?;
        let mut failed = BTreeMap::new();
        let mut udp_gone = BTreeSet::new();
        for name in change.to_write(desired) {
            let Some(service) = desired.get(name) else {
                continue;
            };
            if let Err(error) = self.upsert(name, service, &mut udp_gone) {
                tracing::warn!(%name, %error, "cannot write a Service into the maps");
                failed.insert(name.clone(), error.to_string());
                // Re-read the maps before the next write: this one may have stopped midway.
                self.state = None;
                self.state().map_err(map_error)?;
            }
        }
        let removals: Vec<String> = if change.full {
            self.state()
                .map_err(map_error)?
                .services
                .keys()
                .filter(|n| !desired.contains_key(*n))
                .cloned()
                .collect()
        } else {
            change.removed.clone()
        };
        for name in removals {
            if let Err(error) = self.remove(&name, &mut udp_gone) {
                tracing::warn!(%name, %error, "cannot remove a Service from the maps");
                failed.insert(name, error.to_string());
                self.state = None;
                self.state().map_err(map_error)?;
            }
        }
        if !udp_gone.is_empty() {
            match self.flush_udp(&udp_gone) {
                Ok(n) if n > 0 => tracing::debug!(
                    flows = n,
                    "flushed conntrack entries of removed UDP backends"
                ),
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "cannot flush UDP conntrack entries"),
            }
        }
        self.write_blackholes().map_err(map_error)?;
        Ok(ApplyOutcome { failed })
    }
}

/// Deletes the slots and Maglev chunks of range `rev`, set `set` of `entries`.
fn delete_range(
    m: &mut Maps,
    rev: u32,
    entries: &ServiceEntries,
    set: usize,
) -> Result<(), MapOpError> {
    let Some(set) = entries.sets.get(set) else {
        return Ok(());
    };
    for slot in 0..set.backends.len() as u32 {
        maps::remove(&mut m.slots, "swy_slots", &SlotKey { rev, slot })?;
    }
    if let Some(size) = set.maglev {
        for chunk in 0..(size as usize).div_ceil(abi::MAGLEV_CHUNK) as u32 {
            maps::remove(&mut m.maglev, "swy_maglev", &MaglevKey { rev, chunk })?;
        }
    }
    Ok(())
}

/// A Service id from its name (stable across restarts), probing past ids in use.
fn allocate_res_id(state: &State, name: &str) -> u32 {
    let digest = Sha256::digest(name.as_bytes());
    let mut id = u32::from_be_bytes(digest[..4].try_into().expect("4 bytes"));
    while id == 0 || state.res_ids.get(&id).is_some_and(|n| n != name) {
        id = id.wrapping_add(1);
    }
    id
}

/// A range no entry uses: the next number, or after a wrap-around the next free one.
fn allocate_rev(state: &mut State) -> u32 {
    loop {
        state.next_rev = state.next_rev.wrapping_add(1);
        if state.next_rev == 0 {
            let used = state
                .services
                .values()
                .flat_map(|s| s.revs.iter().copied())
                .collect();
            state.used_revs = Some(used);
            continue;
        }
        match &state.used_revs {
            Some(used) if used.contains(&state.next_rev) => continue,
            _ => return state.next_rev,
        }
    }
}

impl Dataplane for EbpfDataplane {
    fn apply(
        &mut self,
        desired: &Desired,
        change: &Change,
    ) -> Result<ApplyOutcome, DataplaneError> {
        self.announce();
        self.sync(desired, change)
    }

    fn read_back(&mut self) -> Result<Programmed, DataplaneError> {
        self.announce();
        let back = self.read().map_err(map_error)?;
        Ok(back
            .services
            .iter()
            .map(|(name, installed)| {
                (
                    name.clone(),
                    ProgrammedService {
                        version: installed.version,
                        kernel_objects: installed.objects(),
                    },
                )
            })
            .collect())
    }

    fn expected(&self, name: &str, service: &DesiredService) -> Vec<String> {
        match render_service(name, service, &self.config.render).and_then(|r| r.objects()) {
            Ok(objects) => objects,
            Err(error) => vec![format!("! cannot render: {error}")],
        }
    }

    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        loader::cleanup(&self.config.attach.bpffs).map_err(|e| DataplaneError::Io {
            operation: format!(
                "removing the pins under {}",
                self.config.attach.bpffs.display()
            ),
            source: std::io::Error::other(e),
        })?;
        self.state = None;
        Ok(())
    }

    fn kind(&self) -> v1::Dataplane {
        v1::Dataplane::Ebpf
    }
}
