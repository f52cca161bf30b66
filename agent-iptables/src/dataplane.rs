//! The iptables [`Dataplane`]: applies rendered rules with `iptables-restore --noflush`,
//! reads them back with `iptables-save`, installs the jumps from built-in chains, and
//! clears stale UDP conntrack entries.
//!
//! It never touches a chain outside `SWY-`, except to add and remove its own jumps.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use switchyard_agent_core::{
    conntrack,
    dataplane::{
        ApplyOutcome, Change, Dataplane, DataplaneError, Desired, DesiredService, Programmed,
        ProgrammedService,
    },
    netfilter::{Backend, Runner},
};
use switchyard_proto::{state::ServiceState, v1};

use crate::{
    readback::{Saved, parse_save},
    render::{
        self, Family, RenderConfig, ServiceRules, Table, TablePlan, builtin_jumps, global_chains,
        render_service, restore_input,
    },
};

/// Most chains declared in one `iptables-restore` transaction; see
/// [`IptablesDataplane`]'s `write`. Each chain a transaction names costs iptables-nft
/// 1.8 a sorted-list insert and a netlink request, unless the transaction flushes the
/// whole table, so one transaction grows quadratically; more transactions each cost a
/// process and a cache fetch. With 10,000 Services, 2,000 was the fastest of 500,
/// 1,000, 2,000, 3,000, 4,000 and 8,000 (`cargo bench --bench apply`, `SWY_CHUNK_CHAINS`).
pub const CHUNK_CHAINS: usize = 2000;

/// Settings of the iptables dataplane.
#[derive(Clone, Debug, Default)]
pub struct IptablesConfig {
    /// What the rules say (cluster CIDR, masquerade-all, node-port addresses, …).
    pub render: RenderConfig,
    /// Put in front of every command, e.g. `["ip", "netns", "exec", "ns1"]` to program
    /// another network namespace; empty: run the commands directly.
    pub command_prefix: Vec<String>,
    /// Force a backend; `None`: detect it like kube-proxy's iptables wrapper.
    pub backend: Option<Backend>,
    /// Skip IPv6 (`ip6tables`) entirely.
    pub disable_ipv6: bool,
    /// Do not run `conntrack` after UDP endpoint changes.
    pub disable_conntrack: bool,
    /// Most chains declared in one restore; 0: [`CHUNK_CHAINS`] with nft, no limit
    /// with legacy.
    pub chunk_chains: usize,
}

/// Programs Services into iptables; see the crate docs for the rule layout.
pub struct IptablesDataplane {
    config: IptablesConfig,
    backend: Backend,
    runner: Runner,
    /// What the kernel holds per Service, as last written (or read at startup).
    programmed: Option<BTreeMap<String, ServiceRules>>,
    /// The states last applied, to find UDP endpoints that went away.
    states: BTreeMap<String, Arc<ServiceState>>,
    /// A read-back found a jump from a built-in chain missing: the jumps it saw, so the
    /// next apply inserts the missing ones (and rewrites the shared chains whole).
    repair_jumps: Option<Saved>,
}

impl IptablesDataplane {
    /// Creates the dataplane; detects the backend unless the config forces one. Touches
    /// nothing in the kernel.
    pub fn new(config: IptablesConfig) -> Self {
        let runner = Runner {
            prefix: config.command_prefix.clone(),
        };
        let backend = config.backend.unwrap_or_else(|| runner.detect_backend());
        tracing::info!(?backend, "iptables backend");
        Self {
            config,
            backend,
            runner,
            programmed: None,
            states: BTreeMap::new(),
            repair_jumps: None,
        }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    fn families(&self) -> Vec<Family> {
        if self.config.disable_ipv6 {
            vec![Family::V4]
        } else {
            Family::ALL.to_vec()
        }
    }

    fn render(&self, name: &str, service: &DesiredService) -> ServiceRules {
        let mut rules = render_service(name, service, &self.config.render);
        if self.config.disable_ipv6 {
            rules.rules.retain(|r| r.family == Family::V4);
        }
        rules
    }

    /// Renders every Service of `desired`; on up to four threads when there are
    /// thousands (10,000 Services take about 100 ms on one core).
    fn render_all(&self, desired: &Desired) -> BTreeMap<String, ServiceRules> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
        if desired.len() < 2000 || threads == 1 {
            return desired
                .iter()
                .map(|(name, service)| (name.clone(), self.render(name, service)))
                .collect();
        }
        let entries: Vec<_> = desired.iter().collect();
        std::thread::scope(|scope| {
            let parts: Vec<_> = entries
                .chunks(entries.len().div_ceil(threads))
                .map(|part| {
                    scope.spawn(move || {
                        part.iter()
                            .map(|(name, service)| ((*name).clone(), self.render(name, service)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            parts
                .into_iter()
                .flat_map(|part| part.join().expect("rendering panicked"))
                .collect()
        })
    }

    /// The whole ruleset a full sync of `desired` would restore, per family, with the
    /// jumps from built-in chains, without touching the kernel (stale chains, which need
    /// the kernel to know, are not listed).
    pub fn dry_run(&self, desired: &Desired) -> String {
        let rendered: Vec<ServiceRules> = desired
            .iter()
            .map(|(name, service)| self.render(name, service))
            .collect();
        let plan = TablePlan {
            all: rendered.iter().collect(),
            touched: rendered.iter().collect(),
            stale: BTreeSet::new(),
        };
        let mut text = String::new();
        for family in self.families() {
            text.push_str(&format!("# {family}\n"));
            for table in [Table::Nat, Table::Filter] {
                let input = restore_input(family, table, &plan, &self.config.render);
                let body = input.strip_suffix("COMMIT\n").expect("a whole transaction");
                text.push_str(body);
                text.push_str(&render::jump_lines(table, &builtin_jumps()));
                text.push_str("COMMIT\n");
            }
        }
        text
    }

    /// `iptables-save` of one family (nat and filter).
    pub fn save(&self, family: Family) -> Result<String, DataplaneError> {
        let tool = self.backend.save(family);
        let mut text = self.runner.run(&tool, &["-t", "nat"], None)?;
        text.push_str(&self.runner.run(&tool, &["-t", "filter"], None)?);
        Ok(text)
    }

    fn read_kernel(&self) -> Result<Saved, DataplaneError> {
        let mut saved = Saved::default();
        for family in self.families() {
            let text = self.save(family)?;
            parse_save(family, &text, &mut saved).map_err(DataplaneError::ReadBack)?;
        }
        Ok(saved)
    }

    fn restore_streaming(
        &self,
        family: Family,
        produce: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()> + Send,
    ) -> Result<(), DataplaneError> {
        tracing::debug!(%family, "iptables-restore (streamed)");
        self.runner.run_streaming(
            &self.backend.restore(family),
            &["--noflush", "-w", "5"],
            produce,
        )?;
        Ok(())
    }

    fn restore(&self, family: Family, input: &str) -> Result<(), DataplaneError> {
        tracing::debug!(%family, bytes = input.len(), "iptables-restore");
        self.runner.run(
            &self.backend.restore(family),
            &["--noflush", "-w", "5"],
            Some(input),
        )?;
        Ok(())
    }

    /// Inserts the jumps from built-in chains that `saved` (read before this sync) lacks:
    /// one restore per family instead of an `iptables -C` and `-I` per jump, each of which
    /// would load the whole table (with 10,000 Services, about 20 ms apiece).
    fn ensure_jumps_from(&self, saved: &Saved) -> Result<(), DataplaneError> {
        for family in self.families() {
            if let Some(input) = render::insert_jumps_input(&Self::jumps_missing(saved, family)) {
                self.restore(family, &input)?;
            }
        }
        Ok(())
    }

    /// The jumps from built-in chains of `family` that `saved` lacks.
    fn jumps_missing(saved: &Saved, family: Family) -> Vec<render::BuiltinJump> {
        let present: BTreeSet<String> = saved.jumps.iter().map(|r| r.object()).collect();
        builtin_jumps()
            .into_iter()
            .filter(|j| !present.contains(&format!("{family} {} {}", j.table, j.line())))
            .collect()
    }

    /// Most chains declared in one transaction (see [`Self::write`]).
    fn chunk_limit(&self) -> usize {
        match (self.config.chunk_chains, self.backend) {
            // Legacy replaces the whole table per transaction: one is cheapest.
            (0, Backend::Legacy) => usize::MAX,
            (0, Backend::Nft) => CHUNK_CHAINS,
            (n, _) => n,
        }
    }

    /// `touched` split into runs of at most `limit` own chains, each Service whole.
    fn chunks<'a>(touched: &[&'a ServiceRules], limit: usize) -> Vec<Vec<&'a ServiceRules>> {
        let mut chunks = vec![Vec::new()];
        let mut size = 0;
        for service in touched {
            let n = service.owned_chains().len();
            if size + n > limit && size > 0 {
                chunks.push(Vec::new());
                size = 0;
            }
            chunks.last_mut().expect("never empty").push(*service);
            size += n;
        }
        chunks
    }

    /// Writes `next` for the Services in `touched`, deleting `stale` chains. `fresh`: the
    /// kernel holds no Service's rules yet (the first sync on this node). `jumps`: what
    /// the kernel held before, when the jumps from built-in chains it lacked should go in
    /// the same transaction; `true` if they did (the write was one transaction).
    ///
    /// With nft, up to [`CHUNK_CHAINS`] chains go in one plain transaction per family.
    /// Beyond that (a sync of thousands of Services) iptables-nft's `--noflush` restore
    /// grows quadratically with the chains one transaction names (40k chains: over two
    /// minutes). A fresh sync then goes in one transaction with the whole-table cache of
    /// [`render::write_restore_input`], as fast as a flushing restore; otherwise (or if
    /// that fails) it is split, make-before-break: the Services' own chains a chunk at a
    /// time (each Service whole, so each stays consistent), then the shared chains in one
    /// transaction, then stale chains flushed and deleted in chunks.
    fn write(
        &self,
        next: &BTreeMap<String, ServiceRules>,
        touched: &[&ServiceRules],
        stale: &BTreeSet<(Family, Table, String)>,
        fresh: bool,
        jumps: Option<&Saved>,
    ) -> Result<bool, DataplaneError> {
        if self.fits_one_transaction(touched, stale) {
            self.write_one(next, touched, stale, false, jumps)?;
            return Ok(jumps.is_some());
        }
        if fresh && self.backend == Backend::Nft {
            match self.write_one(next, touched, stale, true, jumps) {
                Ok(()) => return Ok(jumps.is_some()),
                Err(err) => {
                    tracing::warn!(%err, "one-transaction sync failed; writing in chunks")
                }
            }
        }
        let limit = self.chunk_limit();
        for chunk in Self::chunks(touched, limit) {
            self.write_own_chains(&chunk)?;
        }
        self.write_one(next, &[], &BTreeSet::new(), false, None)?;
        for delete in [false, true] {
            for family in self.families() {
                for table in Table::ALL {
                    let chains: Vec<String> = stale
                        .iter()
                        .filter(|(f, t, _)| *f == family && *t == table)
                        .map(|(_, _, c)| c.clone())
                        .collect();
                    for part in chains.chunks(limit) {
                        self.restore(family, &render::drop_chains_input(table, part, delete))?;
                    }
                }
            }
        }
        Ok(false)
    }

    fn write_own_chains(&self, chunk: &[&ServiceRules]) -> Result<(), DataplaneError> {
        if chunk.is_empty() {
            return Ok(());
        }
        let mut families = self.families();
        families.reverse();
        for family in families {
            let input: String = [Table::Nat, Table::Filter]
                .iter()
                .filter_map(|t| render::own_chains_input(family, *t, chunk, &self.config.render))
                .collect();
            if !input.is_empty() {
                self.restore(family, &input)?;
            }
        }
        Ok(())
    }

    /// Whether `touched` and `stale` fit in one transaction (see [`Self::write`]).
    fn fits_one_transaction(
        &self,
        touched: &[&ServiceRules],
        stale: &BTreeSet<(Family, Table, String)>,
    ) -> bool {
        let owned: usize = touched.iter().map(|s| s.owned_chains().len()).sum();
        owned + stale.len() <= self.chunk_limit()
    }

    /// A partial sync that leaves the shared chains' other lines in place (see
    /// [`render::incremental_input`]); IPv6 first so that the IPv4 version record lands
    /// last.
    fn write_incremental(
        &self,
        moves: &[render::ServiceMove<'_>],
        stale: &BTreeSet<(Family, Table, String)>,
    ) -> Result<(), DataplaneError> {
        let mut families = self.families();
        families.reverse();
        for family in families {
            let mut input = String::new();
            for table in [Table::Nat, Table::Filter] {
                let stale: BTreeSet<String> = stale
                    .iter()
                    .filter(|(f, t, _)| *f == family && *t == table)
                    .map(|(_, _, c)| c.clone())
                    .collect();
                input.push_str(&render::incremental_input(family, table, moves, &stale));
            }
            // A table with nothing to change costs a restore nothing, but a family with
            // nothing to change would still cost a process (usually IPv6).
            if !input.is_empty() {
                self.restore(family, &input)?;
            }
        }
        Ok(())
    }

    /// One transaction per family: touched chains, shared chains, stale chains; IPv6
    /// first so that the IPv4 version record lands last. `whole_table_cache`: see
    /// [`render::write_restore_input`]; `jumps`: insert the jumps from built-in chains
    /// that this read of the kernel lacks, at the end of the same transaction.
    fn write_one(
        &self,
        next: &BTreeMap<String, ServiceRules>,
        touched: &[&ServiceRules],
        stale: &BTreeSet<(Family, Table, String)>,
        whole_table_cache: bool,
        jumps: Option<&Saved>,
    ) -> Result<(), DataplaneError> {
        let mut families = self.families();
        families.reverse();
        for family in families {
            let missing = jumps.map(|saved| Self::jumps_missing(saved, family));
            let missing = missing.as_deref().unwrap_or_default();
            // Streamed: iptables-restore parses the first lines while the rest is written
            // (an initial sync of 10,000 Services is 12 MB of input).
            self.restore_streaming(family, |out| {
                for table in [Table::Nat, Table::Filter] {
                    let plan = TablePlan {
                        all: next.values().collect(),
                        touched: touched.to_vec(),
                        stale: stale
                            .iter()
                            .filter(|(f, t, _)| *f == family && *t == table)
                            .map(|(_, _, c)| c.clone())
                            .collect(),
                    };
                    render::write_restore_input(
                        out,
                        family,
                        table,
                        &plan,
                        &self.config.render,
                        whole_table_cache,
                        &render::jump_lines(table, missing),
                    )?;
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// The jumps from built-in chains that `saved` lacks, as `family table line`.
    pub fn missing_jumps(&self, saved: &Saved) -> Vec<String> {
        self.families()
            .into_iter()
            .flat_map(|family| {
                Self::jumps_missing(saved, family)
                    .into_iter()
                    .map(move |j| format!("{family} {} {}", j.table, j.line()))
            })
            .collect()
    }

    fn flush_conntrack(&self, name: &str, new: Option<&ServiceState>) {
        if self.config.disable_conntrack {
            return;
        }
        conntrack::flush(
            &self.runner,
            name,
            self.states.get(name).map(Arc::as_ref),
            new,
        );
    }

    /// A change that failed as a whole, retried one Service at a time (upserts first,
    /// make-before-break), so that a Service whose rules the kernel refuses is reported
    /// alone and the others still land. When every one fails, the problem is not any one
    /// Service: the first error is returned for the runtime to retry.
    fn apply_one_by_one(
        &mut self,
        desired: &Desired,
        change: &Change,
        error: DataplaneError,
    ) -> Result<ApplyOutcome, DataplaneError> {
        let total = change.upserted.len() + change.removed.len();
        tracing::warn!(%error, services = total, "change failed; applying its Services one at a time");
        let singles = change
            .upserted
            .iter()
            .map(|name| Change {
                upserted: vec![name.clone()],
                ..Change::default()
            })
            .chain(change.removed.iter().map(|name| Change {
                removed: vec![name.clone()],
                ..Change::default()
            }));
        let mut outcome = ApplyOutcome::default();
        for single in singles {
            let name = single
                .upserted
                .iter()
                .chain(&single.removed)
                .next()
                .cloned();
            match self.apply_partial(desired, &single) {
                Ok(one) => outcome.failed.extend(one.failed),
                Err(err) => {
                    let name = name.unwrap_or_default();
                    tracing::warn!(service = %name, %err, "Service rejected");
                    outcome.failed.insert(name, err.to_string());
                }
            }
        }
        if outcome.failed.len() == total {
            return Err(error);
        }
        Ok(outcome)
    }
}

impl Dataplane for IptablesDataplane {
    fn kind(&self) -> v1::Dataplane {
        v1::Dataplane::Iptables
    }

    fn apply(
        &mut self,
        desired: &Desired,
        change: &Change,
    ) -> Result<ApplyOutcome, DataplaneError> {
        if change.full {
            let kernel = self.read_kernel()?;
            let next = self.render_all(desired);
            let keep: BTreeSet<(Family, Table, String)> =
                next.values().flat_map(ServiceRules::owned_chains).collect();
            let stale: BTreeSet<(Family, Table, String)> = kernel
                .chains
                .iter()
                .filter(|(_, t, c)| !global_chains(*t).contains(&c.as_str()))
                .filter(|c| !keep.contains(*c))
                .cloned()
                .collect();
            let touched: Vec<&ServiceRules> = next.values().collect();
            let fresh = kernel.services.is_empty();
            // With legacy every transaction replaces the whole table, so the jumps ride
            // along; with nft a separate small transaction measured faster (10,000
            // Services: +0.5 s when folded into the big one).
            let fold_jumps = (self.backend == Backend::Legacy).then_some(&kernel);
            if !self.write(&next, &touched, &stale, fresh, fold_jumps)? {
                // The jumps are in built-in chains, which the write does not touch.
                self.ensure_jumps_from(&kernel)?;
            }
            self.repair_jumps = None;
            let gone: Vec<String> = self
                .states
                .keys()
                .filter(|n| !desired.contains_key(*n))
                .cloned()
                .collect();
            for name in gone {
                self.flush_conntrack(&name, None);
            }
            for (name, service) in desired {
                self.flush_conntrack(name, Some(&service.state));
            }
            self.states = desired
                .iter()
                .map(|(n, s)| (n.clone(), s.state.clone()))
                .collect();
            self.programmed = Some(next);
            return Ok(ApplyOutcome::default());
        }
        match self.apply_partial(desired, change) {
            Err(error) if change.upserted.len() + change.removed.len() > 1 => {
                self.apply_one_by_one(desired, change, error)
            }
            result => result,
        }
    }

    fn read_back(&mut self) -> Result<Programmed, DataplaneError> {
        let saved = self.read_kernel()?;
        let missing = self.missing_jumps(&saved);
        if !missing.is_empty() && self.programmed.is_some() {
            tracing::warn!(
                ?missing,
                "jumps into switchyard chains are missing; the next apply restores them"
            );
            self.repair_jumps = Some(Saved {
                jumps: saved.jumps.clone(),
                ..Saved::default()
            });
        }
        Ok(saved
            .services
            .iter()
            .map(|(name, rules)| {
                (
                    name.clone(),
                    ProgrammedService {
                        version: rules.version,
                        kernel_objects: rules.objects(),
                    },
                )
            })
            .collect())
    }

    fn expected(&self, name: &str, service: &DesiredService) -> Vec<String> {
        self.render(name, service).objects()
    }

    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        self.remove_everything()
    }

    fn tracks_connections(&self) -> bool {
        true
    }

    fn hold_connection_tracking(&mut self, hold: bool) -> Result<(), DataplaneError> {
        self.runner
            .set_conntrack_hold(self.backend, &self.families(), hold)
    }
}

impl IptablesDataplane {
    /// A partial sync of the Services `change` names, in as few transactions as it can.
    fn apply_partial(
        &mut self,
        desired: &Desired,
        change: &Change,
    ) -> Result<ApplyOutcome, DataplaneError> {
        let mut outcome = ApplyOutcome::default();
        let first = self.programmed.is_none();
        let mut read_at_start = None;
        let current = match self.programmed.take() {
            Some(current) => current,
            None => {
                let mut saved = self.read_kernel()?;
                let services = std::mem::take(&mut saved.services);
                read_at_start = Some(saved);
                services
            }
        };
        // Changed in place (a clone of 10,000 Services' rules would dominate a one-Service
        // change); the touched Services' previous rules are kept for the diff and to roll
        // back on failure.
        let mut next = current;
        let mut previous: BTreeMap<String, Option<ServiceRules>> = BTreeMap::new();
        let mut names = Vec::new();
        for name in &change.upserted {
            match desired.get(name) {
                Some(service) => {
                    let old = next.insert(name.clone(), self.render(name, service));
                    previous.entry(name.clone()).or_insert(old);
                    names.push(name.clone());
                }
                None => {
                    outcome
                        .failed
                        .insert(name.clone(), "upserted but not in the desired state".into());
                }
            }
        }
        for name in &change.removed {
            let old = next.remove(name);
            previous.entry(name.clone()).or_insert(old);
            names.push(name.clone());
        }
        let old = |name: &str| previous.get(name).and_then(Option::as_ref);
        let mut stale = BTreeSet::new();
        for name in &names {
            let new = next.get(name).map(ServiceRules::owned_chains);
            for chain in old(name)
                .map(ServiceRules::owned_chains)
                .unwrap_or_default()
            {
                if !new.as_ref().is_some_and(|n| n.contains(&chain)) {
                    stale.insert(chain);
                }
            }
        }
        let touched: Vec<&ServiceRules> = names.iter().filter_map(|n| next.get(n)).collect();
        // The common case touches a few lines of the shared chains instead of rewriting
        // them (one change with 10,000 Services in place: a rewrite is ~20,000 lines).
        // After a restart, or when jumps need repair, or when it fails because the
        // kernel is not what we wrote, the shared chains are rewritten whole.
        // A Service that renders exactly as programmed is applied only to repair drift:
        // its shared lines must be rewritten even though they did not change.
        let repair = names
            .iter()
            .any(|n| next.contains_key(n) && old(n) == next.get(n));
        let incremental = !first
            && !repair
            && self.repair_jumps.is_none()
            && self.fits_one_transaction(&touched, &stale);
        let moves: Vec<render::ServiceMove<'_>> =
            names.iter().map(|n| (old(n), next.get(n))).collect();
        let written = match incremental.then(|| self.write_incremental(&moves, &stale)) {
            Some(Ok(())) => Ok(()),
            Some(Err(err)) => {
                tracing::warn!(%err, "incremental sync failed; rewriting the shared chains");
                self.write(&next, &touched, &stale, false, None).map(drop)
            }
            None => self.write(&next, &touched, &stale, false, None).map(drop),
        };
        drop(moves);
        if let Err(err) = written {
            // Keep what we knew; the kernel still holds it (each restore is atomic).
            for (name, rules) in previous {
                match rules {
                    Some(rules) => next.insert(name, rules),
                    None => next.remove(&name),
                };
            }
            self.programmed = (!first).then_some(next);
            return Err(err);
        }
        if let Some(saved) = read_at_start.as_ref().or(self.repair_jumps.as_ref()) {
            self.ensure_jumps_from(saved)?;
            self.repair_jumps = None;
        }
        for name in &names {
            let new = desired.get(name).map(|s| &s.state);
            let new_state = new.map(Arc::as_ref);
            self.flush_conntrack(name, new_state);
            match new {
                Some(state) if !change.removed.contains(name) => {
                    self.states.insert(name.clone(), state.clone());
                }
                _ => {
                    self.states.remove(name);
                }
            }
        }
        self.programmed = Some(next);
        Ok(outcome)
    }

    /// `--cleanup`: every jump and chain the agent ever installed.
    fn remove_everything(&mut self) -> Result<(), DataplaneError> {
        for family in self.families() {
            let tool = self.backend.iptables(family);
            for jump in builtin_jumps() {
                let mut delete = vec!["-w", "5", "-t", jump.table.name(), "-D", jump.builtin];
                delete.extend(jump.args.iter().map(String::as_str));
                // A jump may have been inserted more than once; delete until none is left.
                for _ in 0..16 {
                    if !self.runner.succeeds(&tool, &delete)? {
                        break;
                    }
                }
            }
        }
        let kernel = self.read_kernel()?;
        for family in self.families() {
            let mut input = String::new();
            for table in [Table::Nat, Table::Filter] {
                let chains = kernel.chains_in(family, table);
                if chains.is_empty() {
                    continue;
                }
                input.push_str(&format!("*{table}\n"));
                // As for a sync into a fresh table (render::write_restore_input): without
                // a command naming no chain first, iptables-nft asks the kernel for each
                // declared chain in turn, and removing 40,000 chains took minutes.
                if self.backend == Backend::Nft {
                    input.push_str("-L -n\n");
                }
                for chain in &chains {
                    input.push_str(&format!(":{chain} - [0:0]\n"));
                }
                for chain in &chains {
                    input.push_str(&format!("-X {chain}\n"));
                }
                input.push_str("COMMIT\n");
            }
            if !input.is_empty() {
                self.restore(family, &input)?;
            }
        }
        self.programmed = None;
        self.states.clear();
        Ok(())
    }
}

/// The chain-name prefix, for callers that inspect the kernel themselves.
pub use render::CHAIN_PREFIX;
