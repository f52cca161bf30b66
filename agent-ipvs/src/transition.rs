//! Plans the kernel operations that move some Services from the plans the kernel holds
//! to new ones, in make-before-break order, touching nothing else. Pure.
//!
//! Entry point: [`plan_transition`]. Objects several Services share (VIPs on the dummy
//! device, hairpin elements, a virtual service two Services both claim) are counted in
//! [`Refs`]: one is added when its first user appears and removed when its last user
//! goes. Virtual services are compared with what the kernel holds ([`Mirror`]), not with
//! the old plan, so a real server deleted by hand is added back.
//!
//! # Order
//! 1. VIPs appear on the dummy device;
//! 2. virtual services and real servers are created or updated;
//! 3. ipset elements are added, then deleted (a VIP turns from reject to served only once
//!    its virtual service exists, and from served to reject before it goes);
//! 4. real servers leave (TCP and SCTP ones drain at weight 0, so established
//!    connections finish while new ones go elsewhere; UDP ones are deleted) and virtual
//!    services are deleted;
//! 5. VIPs no Service uses leave the dummy device.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use switchyard_agent_core::state::Protocol;

use crate::render::{RealServer, ServicePlan, SetElement, SetKind, VirtualService, VsKey};

/// What the kernel holds, as far as the plan needs to know.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mirror {
    /// switchyard's virtual services, with their real servers in service.
    pub virtual_services: BTreeMap<VsKey, VirtualService>,
    /// Real servers draining at weight 0.
    pub draining: BTreeSet<(VsKey, SocketAddr)>,
    pub addresses: BTreeSet<IpAddr>,
    pub loop_backs: BTreeSet<SetElement>,
}

/// How many programmed Services use each shared object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Refs {
    pub addresses: BTreeMap<IpAddr, usize>,
    pub loop_backs: BTreeMap<SetElement, usize>,
    pub virtual_services: BTreeMap<VsKey, usize>,
}

impl Refs {
    /// The counts over `plans`.
    pub fn of<'a>(plans: impl IntoIterator<Item = &'a ServicePlan>) -> Self {
        let mut refs = Refs::default();
        for plan in plans {
            refs.add(plan);
        }
        refs
    }

    pub fn add(&mut self, plan: &ServicePlan) {
        for address in &plan.addresses {
            *self.addresses.entry(*address).or_default() += 1;
        }
        for element in plan.elements.iter().filter(|e| e.kind == SetKind::LoopBack) {
            *self.loop_backs.entry(element.clone()).or_default() += 1;
        }
        for key in plan.virtual_services.keys() {
            *self.virtual_services.entry(*key).or_default() += 1;
        }
    }

    pub fn remove(&mut self, plan: &ServicePlan) {
        fn down<K: Ord + Clone>(map: &mut BTreeMap<K, usize>, key: &K) {
            if let Some(count) = map.get_mut(key) {
                *count -= 1;
                if *count == 0 {
                    map.remove(key);
                }
            }
        }
        for address in &plan.addresses {
            down(&mut self.addresses, address);
        }
        for element in plan.elements.iter().filter(|e| e.kind == SetKind::LoopBack) {
            down(&mut self.loop_backs, element);
        }
        for key in plan.virtual_services.keys() {
            down(&mut self.virtual_services, key);
        }
    }
}

/// One IPVS operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpvsOp {
    /// Create a virtual service (without real servers).
    AddService(VsKey, VirtualService),
    /// Change a virtual service's scheduler or persistence.
    UpdateService(VsKey, VirtualService),
    DeleteService(VsKey),
    AddReal(VsKey, SocketAddr),
    /// Set a real server's weight (and masquerade forwarding): 1 to serve, 0 to drain.
    SetReal(VsKey, SocketAddr, u32),
    DeleteReal(VsKey, SocketAddr),
}

/// The kernel operations of one change, each attributed to the Service that needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Transition {
    pub add_addresses: Vec<IpAddr>,
    /// Creations and updates, before the ipset changes.
    pub ipvs_first: Vec<(String, IpvsOp)>,
    pub element_adds: Vec<(SetElement, String)>,
    pub element_dels: Vec<(SetElement, String)>,
    /// Version records to write (`Some`) or delete (`None`).
    pub versions: Vec<(String, Option<u64>)>,
    /// Drains and deletions, after the ipset changes.
    pub ipvs_last: Vec<(String, IpvsOp)>,
    pub del_addresses: Vec<IpAddr>,
}

impl Transition {
    pub fn is_empty(&self) -> bool {
        *self == Transition::default()
    }
}

/// One Service moving from `old` (what the kernel holds for it) to `new` (`None`: absent).
pub struct Move<'a> {
    pub name: &'a str,
    pub old: Option<&'a ServicePlan>,
    pub new: Option<&'a ServicePlan>,
}

/// The operations that carry out `moves`, given what the kernel holds and how many
/// programmed Services (including the moving ones, with their old plans) use each
/// shared object. Updates `refs` to the counts after the moves.
pub fn plan_transition(moves: &[Move<'_>], mirror: &Mirror, refs: &mut Refs) -> Transition {
    let mut t = Transition::default();
    let empty = ServicePlan::default();
    for m in moves {
        refs.remove(m.old.unwrap_or(&empty));
        refs.add(m.new.unwrap_or(&empty));
    }

    // 1. VIPs.
    let mut added = BTreeSet::new();
    for m in moves {
        for address in &m.new.unwrap_or(&empty).addresses {
            if !mirror.addresses.contains(address) && added.insert(*address) {
                t.add_addresses.push(*address);
            }
        }
    }

    // 2 and 4. Virtual services and real servers, against what the kernel holds.
    let mut planned_services = BTreeSet::new();
    for m in moves {
        let name = m.name.to_string();
        let new = m.new.unwrap_or(&empty);
        for (key, want) in &new.virtual_services {
            if !planned_services.insert(*key) {
                continue;
            }
            let held = mirror.virtual_services.get(key);
            let settings_differ = |h: &VirtualService| {
                h.scheduler != want.scheduler || h.persistence != want.persistence
            };
            match held {
                None => t
                    .ipvs_first
                    .push((name.clone(), IpvsOp::AddService(*key, settings(want)))),
                Some(h) if settings_differ(h) => t
                    .ipvs_first
                    .push((name.clone(), IpvsOp::UpdateService(*key, settings(want)))),
                Some(_) => {}
            }
            let held_reals = held.map(|h| &h.reals);
            for (real, server) in &want.reals {
                match held_reals.and_then(|r| r.get(real)) {
                    Some(h) if h == server => {}
                    Some(_) => t
                        .ipvs_first
                        .push((name.clone(), IpvsOp::SetReal(*key, *real, server.weight))),
                    None if mirror.draining.contains(&(*key, *real)) => t
                        .ipvs_first
                        .push((name.clone(), IpvsOp::SetReal(*key, *real, server.weight))),
                    None => t
                        .ipvs_first
                        .push((name.clone(), IpvsOp::AddReal(*key, *real))),
                }
            }
            for real in held_reals.into_iter().flat_map(|r| r.keys()) {
                if !want.reals.contains_key(real) {
                    t.ipvs_last.push((name.clone(), leave(*key, *real)));
                }
            }
        }
    }
    for m in moves {
        for key in m.old.unwrap_or(&empty).virtual_services.keys() {
            if !refs.virtual_services.contains_key(key)
                && mirror.virtual_services.contains_key(key)
                && planned_services.insert(*key)
            {
                t.ipvs_last
                    .push((m.name.to_string(), IpvsOp::DeleteService(*key)));
            }
        }
    }

    // 3. ipset elements: a Service's own by its plans; hairpin elements by count.
    let mut loop_backs_added = BTreeSet::new();
    let mut loop_backs_deleted = BTreeSet::new();
    for m in moves {
        let name = m.name.to_string();
        let old = m.old.unwrap_or(&empty);
        let new = m.new.unwrap_or(&empty);
        for element in new.elements.difference(&old.elements) {
            if element.kind == SetKind::LoopBack {
                continue;
            }
            t.element_adds.push((element.clone(), name.clone()));
        }
        for element in old.elements.difference(&new.elements) {
            if element.kind == SetKind::LoopBack {
                continue;
            }
            t.element_dels.push((element.clone(), name.clone()));
        }
        for element in new.elements.iter().filter(|e| e.kind == SetKind::LoopBack) {
            if !mirror.loop_backs.contains(element) && loop_backs_added.insert(element.clone()) {
                t.element_adds.push((element.clone(), name.clone()));
            }
        }
        for element in old.elements.iter().filter(|e| e.kind == SetKind::LoopBack) {
            if !refs.loop_backs.contains_key(element)
                && mirror.loop_backs.contains(element)
                && loop_backs_deleted.insert(element.clone())
            {
                t.element_dels.push((element.clone(), name.clone()));
            }
        }
        if old.version != new.version || m.new.is_none() {
            t.versions.push((name, m.new.and_then(|p| p.version)));
        }
    }

    // 5. VIPs nobody uses any more.
    let mut removed = BTreeSet::new();
    for m in moves {
        for address in &m.old.unwrap_or(&empty).addresses {
            if !refs.addresses.contains_key(address)
                && mirror.addresses.contains(address)
                && removed.insert(*address)
            {
                t.del_addresses.push(*address);
            }
        }
    }
    t
}

/// A virtual service's settings, without its real servers.
fn settings(vs: &VirtualService) -> VirtualService {
    VirtualService {
        reals: BTreeMap::new(),
        ..vs.clone()
    }
}

/// How a real server leaves: TCP and SCTP drain at weight 0 (graceful termination, as
/// kube-proxy's IPVS mode does); UDP has no connection to finish and goes at once.
fn leave(key: VsKey, real: SocketAddr) -> IpvsOp {
    match key.protocol {
        Protocol::Udp => IpvsOp::DeleteReal(key, real),
        Protocol::Tcp | Protocol::Sctp => IpvsOp::SetReal(key, real, 0),
    }
}

impl Mirror {
    /// What the kernel holds after `ops` succeeded.
    pub fn record(&mut self, op: &IpvsOp) {
        match op {
            IpvsOp::AddService(key, vs) | IpvsOp::UpdateService(key, vs) => {
                let entry = self
                    .virtual_services
                    .entry(*key)
                    .or_insert_with(|| vs.clone());
                entry.scheduler = vs.scheduler.clone();
                entry.persistence = vs.persistence;
            }
            IpvsOp::DeleteService(key) => {
                self.virtual_services.remove(key);
                self.draining.retain(|(k, _)| k != key);
            }
            IpvsOp::AddReal(key, real) => {
                if let Some(vs) = self.virtual_services.get_mut(key) {
                    vs.reals.insert(*real, RealServer::IN_SERVICE);
                }
            }
            IpvsOp::SetReal(key, real, 0) => {
                if let Some(vs) = self.virtual_services.get_mut(key) {
                    vs.reals.remove(real);
                }
                self.draining.insert((*key, *real));
            }
            IpvsOp::SetReal(key, real, weight) => {
                self.draining.remove(&(*key, *real));
                if let Some(vs) = self.virtual_services.get_mut(key) {
                    vs.reals.insert(
                        *real,
                        RealServer {
                            weight: *weight,
                            masquerade: true,
                        },
                    );
                }
            }
            IpvsOp::DeleteReal(key, real) => {
                self.draining.remove(&(*key, *real));
                if let Some(vs) = self.virtual_services.get_mut(key) {
                    vs.reals.remove(real);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use switchyard_agent_core::{dataplane::DesiredService, fixtures::*};

    use super::*;
    use crate::render::{RenderConfig, render_service};

    fn render(service: DesiredService) -> ServicePlan {
        render_service(&service, &RenderConfig::default())
    }

    fn web(endpoints: &[&str], protocol: Protocol) -> ServicePlan {
        render(desired(service(
            "default/web",
            &["10.96.0.10"],
            vec![port(
                "http",
                protocol,
                80,
                endpoints.iter().map(|ip| ep(ip, 8080, false)).collect(),
            )],
        )))
    }

    /// The mirror of a kernel holding exactly `plans`.
    fn mirror_of(plans: &[&ServicePlan]) -> Mirror {
        let mut mirror = Mirror::default();
        for plan in plans {
            mirror.addresses.extend(plan.addresses.iter().copied());
            mirror
                .virtual_services
                .extend(plan.virtual_services.iter().map(|(k, v)| (*k, v.clone())));
            mirror.loop_backs.extend(
                plan.elements
                    .iter()
                    .filter(|e| e.kind == SetKind::LoopBack)
                    .cloned(),
            );
        }
        mirror
    }

    /// The transition of `default/web` from `old` to `new` on a kernel that holds
    /// `kernel`.
    fn web_moves(old: &ServicePlan, new: &ServicePlan, kernel: &Mirror) -> Transition {
        plan_transition(
            &[Move {
                name: "default/web",
                old: Some(old),
                new: Some(new),
            }],
            kernel,
            &mut Refs::of([old]),
        )
    }

    fn key(addr: &str, port: u16, protocol: Protocol) -> VsKey {
        VsKey {
            protocol,
            addr: addr.parse().unwrap(),
            port,
        }
    }

    #[test]
    fn a_new_service_comes_up_address_first_and_its_elements_after_its_virtual_service() {
        let new = web(&["10.244.1.2", "10.244.2.2"], Protocol::Tcp);
        let mut refs = Refs::default();
        let t = plan_transition(
            &[Move {
                name: "default/web",
                old: None,
                new: Some(&new),
            }],
            &Mirror::default(),
            &mut refs,
        );
        assert_eq!(t.add_addresses, ["10.96.0.10".parse::<IpAddr>().unwrap()]);
        let vs = key("10.96.0.10", 80, Protocol::Tcp);
        assert!(matches!(t.ipvs_first[0].1, IpvsOp::AddService(k, _) if k == vs));
        assert_eq!(t.ipvs_first.len(), 3);
        assert_eq!(
            t.element_adds.len(),
            3,
            "cluster IP and two hairpin elements"
        );
        assert!(t.element_dels.is_empty() && t.ipvs_last.is_empty() && t.del_addresses.is_empty());
        assert_eq!(t.versions, [("default/web".to_string(), new.version)]);
        assert_eq!(refs, Refs::of([&new]));
    }

    #[test]
    fn a_removed_tcp_endpoint_drains_and_a_returning_one_is_reweighted() {
        let old = web(&["10.244.1.2", "10.244.2.2"], Protocol::Tcp);
        let new = web(&["10.244.1.2"], Protocol::Tcp);
        let mirror = mirror_of(&[&old]);
        let mut refs = Refs::of([&old]);
        let t = plan_transition(
            &[Move {
                name: "default/web",
                old: Some(&old),
                new: Some(&new),
            }],
            &mirror,
            &mut refs,
        );
        let vs = key("10.96.0.10", 80, Protocol::Tcp);
        let gone: SocketAddr = "10.244.2.2:8080".parse().unwrap();
        assert!(t.ipvs_first.is_empty());
        assert_eq!(
            t.ipvs_last,
            [("default/web".into(), IpvsOp::SetReal(vs, gone, 0))]
        );
        assert_eq!(t.element_dels.len(), 1, "its hairpin element goes");
        assert!(t.add_addresses.is_empty() && t.del_addresses.is_empty());

        let mut drained = mirror.clone();
        drained.record(&IpvsOp::SetReal(vs, gone, 0));
        let t = plan_transition(
            &[Move {
                name: "default/web",
                old: Some(&new),
                new: Some(&old),
            }],
            &drained,
            &mut refs,
        );
        assert_eq!(
            t.ipvs_first,
            [("default/web".into(), IpvsOp::SetReal(vs, gone, 1))]
        );
    }

    #[test]
    fn a_removed_udp_endpoint_is_deleted_at_once() {
        let old = web(&["10.244.1.2", "10.244.2.2"], Protocol::Udp);
        let new = web(&["10.244.1.2"], Protocol::Udp);
        let t = web_moves(&old, &new, &mirror_of(&[&old]));
        assert_eq!(
            t.ipvs_last,
            [(
                "default/web".into(),
                IpvsOp::DeleteReal(
                    key("10.96.0.10", 80, Protocol::Udp),
                    "10.244.2.2:8080".parse().unwrap()
                )
            )]
        );
    }

    #[test]
    fn losing_every_endpoint_rejects_before_the_virtual_service_goes_and_keeps_the_vip() {
        let old = web(&["10.244.1.2"], Protocol::Tcp);
        let new = web(&[], Protocol::Tcp);
        let t = web_moves(&old, &new, &mirror_of(&[&old]));
        assert_eq!(t.element_adds.len(), 1);
        assert_eq!(t.element_adds[0].0.kind, SetKind::Reject);
        assert_eq!(
            t.ipvs_last,
            [(
                "default/web".into(),
                IpvsOp::DeleteService(key("10.96.0.10", 80, Protocol::Tcp))
            )]
        );
        assert!(t.del_addresses.is_empty(), "the VIP stays for the reject");
    }

    #[test]
    fn a_vip_two_services_share_stays_until_the_last_one_goes() {
        let mut a = service(
            "default/a",
            &["10.96.0.1"],
            vec![port(
                "http",
                Protocol::Tcp,
                80,
                vec![ep("10.244.1.2", 80, false)],
            )],
        );
        a.external_ips = vec!["192.0.2.1".parse().unwrap()];
        let mut b = a.clone();
        b.key.name = "b".into();
        b.cluster_ips = vec!["10.96.0.2".parse().unwrap()];
        b.ports[0].port = 443;
        let (a, b) = (render(desired(a)), render(desired(b)));
        let mirror = mirror_of(&[&a, &b]);
        let mut refs = Refs::of([&a, &b]);
        let t = plan_transition(
            &[Move {
                name: "default/a",
                old: Some(&a),
                new: None,
            }],
            &mirror,
            &mut refs,
        );
        assert_eq!(t.del_addresses, ["10.96.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(t.versions, [("default/a".to_string(), None)]);
        assert!(
            t.element_dels
                .iter()
                .all(|(e, _)| e.kind != SetKind::LoopBack),
            "b still uses the hairpin element"
        );
    }

    #[test]
    fn a_real_server_deleted_by_hand_is_added_back_although_the_plan_did_not_change() {
        let plan = web(&["10.244.1.2", "10.244.2.2"], Protocol::Tcp);
        let mut mirror = mirror_of(&[&plan]);
        let vs = key("10.96.0.10", 80, Protocol::Tcp);
        let lost: SocketAddr = "10.244.2.2:8080".parse().unwrap();
        mirror.record(&IpvsOp::DeleteReal(vs, lost));
        let t = web_moves(&plan, &plan, &mirror);
        assert_eq!(
            t.ipvs_first,
            [("default/web".into(), IpvsOp::AddReal(vs, lost))]
        );
        assert!(t.versions.is_empty());
    }

    #[test]
    fn nothing_changes_for_an_unchanged_service() {
        let plan = web(&["10.244.1.2"], Protocol::Tcp);
        let t = web_moves(&plan, &plan, &mirror_of(&[&plan]));
        assert!(t.is_empty(), "{t:?}");
    }
}
