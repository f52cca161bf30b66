//! Turns what the kernel holds (IPVS dump, `ipset save`, the dummy device's addresses)
//! back into [`ServicePlan`]s per Service, from the kernel alone. Pure.
//!
//! Attribution follows [`crate::render`]: an ipset element belongs to the Service its
//! comment names; a virtual service to the Service owning the destination element (in
//! `SWY-CLUSTER-IP`, `SWY-EXTERNAL`, `SWY-EXTERNAL-LOCAL`, `SWY-REJECT` or `SWY-DROP`)
//! with its address, protocol and port; a VIP on the dummy device to every Service with a
//! destination element on it; a hairpin element to every Service with a real server it
//! describes (hairpin elements are shared by Services selecting the same endpoint).
//! Real servers at weight 0 are draining (being removed gracefully) and belong to no
//! plan. What switchyard owns but no Service claims is reported for cleanup.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use switchyard_agent_core::state::Protocol;

use crate::{
    ipset::Saved,
    render::{RealServer, ServicePlan, SetElement, SetKind, VirtualService, VsKey, loop_back},
};

/// One real server as the IPVS dump shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelReal {
    pub addr: SocketAddr,
    pub server: RealServer,
    pub active_connections: u32,
    pub inactive_connections: u32,
}

/// One virtual service as the IPVS dump shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelVs {
    pub key: VsKey,
    pub scheduler: String,
    pub persistence: Option<u32>,
    pub reals: Vec<KernelReal>,
}

/// A real server draining after its endpoint went away.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Draining {
    pub key: VsKey,
    pub real: SocketAddr,
    /// Established connections still using it. Inactive ones (closing, TIME_WAIT) are
    /// not counted: they no longer carry data and linger for minutes after the last
    /// byte.
    pub active_connections: u32,
}

/// What the kernel holds, by Service, and what switchyard owns that no Service claims.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelView {
    pub services: BTreeMap<String, ServicePlan>,
    /// Every virtual service of switchyard's (claimed or on the dummy device), as held.
    pub virtual_services: BTreeMap<VsKey, VirtualService>,
    /// The dummy device's addresses.
    pub addresses: BTreeSet<IpAddr>,
    /// Every hairpin element present.
    pub loop_backs: BTreeSet<SetElement>,
    pub draining: Vec<Draining>,
    /// Virtual services on the dummy device's addresses that no Service claims.
    pub orphan_virtual_services: Vec<VsKey>,
    /// Addresses on the dummy device that no Service claims.
    pub orphan_addresses: Vec<IpAddr>,
    /// Elements without a comment naming a Service, hairpin elements no real server
    /// uses, and version elements that cannot be read.
    pub orphan_elements: Vec<SetElement>,
    pub stray_versions: Vec<String>,
}

/// `ip,proto:port` → the destination it names.
pub fn destination_of(element: &str) -> Option<VsKey> {
    let mut parts = element.split(',');
    let addr: IpAddr = parts.next()?.parse().ok()?;
    let (proto, port) = parts.next()?.split_once(':')?;
    let protocol = match proto {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "sctp" => Protocol::Sctp,
        _ => return None,
    };
    Some(VsKey {
        protocol,
        addr,
        port: port.parse().ok()?,
    })
}

/// Attributes the kernel's objects to Services.
pub fn attribute(
    virtual_services: Vec<KernelVs>,
    sets: Saved,
    addresses: BTreeSet<IpAddr>,
) -> KernelView {
    let mut view = KernelView {
        addresses,
        stray_versions: sets.stray_versions,
        ..KernelView::default()
    };
    for version in sets.versions {
        view.services.entry(version.service).or_default().version = Some(version.version);
    }
    let mut owner: BTreeMap<VsKey, String> = BTreeMap::new();
    for saved in sets.elements {
        let element = saved.element;
        if element.kind == SetKind::LoopBack {
            view.loop_backs.insert(element);
            continue;
        }
        let Some(name) = saved.comment.filter(|c| c.contains('/')) else {
            view.orphan_elements.push(element);
            continue;
        };
        if element.kind.names_destination()
            && let Some(key) = destination_of(&element.element)
        {
            if view.addresses.contains(&key.addr) {
                view.services
                    .entry(name.clone())
                    .or_default()
                    .addresses
                    .insert(key.addr);
            }
            owner.entry(key).or_insert_with(|| name.clone());
        }
        view.services
            .entry(name)
            .or_default()
            .elements
            .insert(element);
    }

    let mut used_loop_backs = BTreeSet::new();
    for vs in virtual_services {
        let mut held = VirtualService {
            scheduler: vs.scheduler,
            persistence: vs.persistence,
            reals: BTreeMap::new(),
        };
        for real in vs.reals {
            let element = SetElement {
                kind: SetKind::LoopBack,
                family: vs.key.family(),
                element: loop_back(real.addr, vs.key.protocol),
            };
            used_loop_backs.insert(element);
            if real.server.weight == 0 {
                view.draining.push(Draining {
                    key: vs.key,
                    real: real.addr,
                    active_connections: real.active_connections,
                });
            } else {
                held.reals.insert(real.addr, real.server);
            }
        }
        match owner.get(&vs.key) {
            Some(name) => {
                let plan = view.services.entry(name.clone()).or_default();
                for real in held.reals.keys() {
                    let element = SetElement {
                        kind: SetKind::LoopBack,
                        family: vs.key.family(),
                        element: loop_back(*real, vs.key.protocol),
                    };
                    if view.loop_backs.contains(&element) {
                        plan.elements.insert(element);
                    }
                }
                plan.virtual_services.insert(vs.key, held.clone());
            }
            None if view.addresses.contains(&vs.key.addr) => {
                view.orphan_virtual_services.push(vs.key);
            }
            // Neither claimed nor on switchyard's device: someone else's.
            None => continue,
        }
        view.virtual_services.insert(vs.key, held);
    }
    view.orphan_elements.extend(
        view.loop_backs
            .iter()
            .filter(|e| !used_loop_backs.contains(*e))
            .cloned(),
    );
    let claimed: BTreeSet<IpAddr> = view
        .services
        .values()
        .flat_map(|plan| plan.addresses.iter().copied())
        .collect();
    view.orphan_addresses = view
        .addresses
        .iter()
        .filter(|a| !claimed.contains(a))
        .copied()
        .collect();
    view
}

#[cfg(test)]
mod tests {
    use switchyard_agent_core::{fixtures::*, netfilter::Family};

    use super::*;
    use crate::{
        ipset::{SavedElement, SavedVersion},
        render::{RenderConfig, render_service},
    };

    /// What the kernel would hold after programming `plans` exactly.
    fn kernel_of(
        plans: &BTreeMap<String, ServicePlan>,
    ) -> (Vec<KernelVs>, Saved, BTreeSet<IpAddr>) {
        let mut sets = Saved::default();
        let mut vss = Vec::new();
        let mut addresses = BTreeSet::new();
        for (name, plan) in plans {
            sets.versions.push(SavedVersion {
                service: name.clone(),
                version: plan.version.unwrap(),
            });
            for element in &plan.elements {
                sets.elements.push(SavedElement {
                    element: element.clone(),
                    comment: Some(name.clone()),
                });
            }
            addresses.extend(plan.addresses.iter().copied());
            for (key, vs) in &plan.virtual_services {
                vss.push(KernelVs {
                    key: *key,
                    scheduler: vs.scheduler.clone(),
                    persistence: vs.persistence,
                    reals: vs
                        .reals
                        .iter()
                        .map(|(addr, server)| KernelReal {
                            addr: *addr,
                            server: *server,
                            active_connections: 0,
                            inactive_connections: 0,
                        })
                        .collect(),
                });
            }
        }
        (vss, sets, addresses)
    }

    fn plans() -> BTreeMap<String, ServicePlan> {
        let cfg = RenderConfig {
            node_addresses: vec![
                "10.201.0.1".parse().unwrap(),
                "fd00:201::1".parse().unwrap(),
            ],
            ..RenderConfig::default()
        };
        let mut sink = kitchen_sink();
        sink.key.name = "sink".into();
        let web = service(
            "default/web",
            &["10.96.0.10"],
            // The same endpoint as the kitchen sink's: a shared hairpin element.
            vec![port(
                "http",
                Protocol::Tcp,
                80,
                vec![ep("10.244.0.5", 8080, true)],
            )],
        );
        let empty = service(
            "default/empty",
            &["10.96.0.12"],
            vec![port("http", Protocol::Tcp, 80, vec![])],
        );
        [sink, web, empty]
            .into_iter()
            .map(|s| (s.key.to_string(), render_service(&desired(s), &cfg)))
            .collect()
    }

    #[test]
    fn what_was_programmed_reads_back_as_the_same_plans() {
        let plans = plans();
        let (vss, sets, addresses) = kernel_of(&plans);
        let view = attribute(vss, sets, addresses);
        assert_eq!(view.services, plans);
        assert!(view.orphan_virtual_services.is_empty());
        assert!(view.orphan_addresses.is_empty());
        assert!(
            view.orphan_elements.is_empty(),
            "{:?}",
            view.orphan_elements
        );
        assert!(view.draining.is_empty());
    }

    #[test]
    fn draining_reals_leave_the_plan_and_unclaimed_objects_are_orphans() {
        let plans = plans();
        let (mut vss, mut sets, mut addresses) = kernel_of(&plans);
        let web = vss
            .iter_mut()
            .find(|v| v.key.addr == "10.96.0.10".parse::<IpAddr>().unwrap())
            .unwrap();
        web.reals.push(KernelReal {
            addr: "10.244.9.9:8080".parse().unwrap(),
            server: RealServer {
                weight: 0,
                masquerade: true,
            },
            active_connections: 1,
            inactive_connections: 2,
        });
        // A virtual service on the dummy device nobody claims; one elsewhere (not ours).
        addresses.insert("10.96.7.7".parse().unwrap());
        for addr in ["10.96.7.7", "192.168.1.1"] {
            vss.push(KernelVs {
                key: VsKey {
                    protocol: Protocol::Udp,
                    addr: addr.parse().unwrap(),
                    port: 53,
                },
                scheduler: "rr".into(),
                persistence: None,
                reals: vec![],
            });
        }
        sets.elements.push(SavedElement {
            element: SetElement {
                kind: SetKind::Reject,
                family: Family::V4,
                element: "10.96.8.8,tcp:80".into(),
            },
            comment: None,
        });
        let view = attribute(vss, sets, addresses);
        assert_eq!(view.services, plans, "draining reals are not in any plan");
        assert_eq!(
            view.draining,
            [Draining {
                key: VsKey {
                    protocol: Protocol::Tcp,
                    addr: "10.96.0.10".parse().unwrap(),
                    port: 80
                },
                real: "10.244.9.9:8080".parse().unwrap(),
                active_connections: 1,
            }]
        );
        assert_eq!(view.orphan_virtual_services.len(), 1);
        assert_eq!(
            view.orphan_addresses,
            ["10.96.7.7".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(view.orphan_elements.len(), 1);
        assert!(
            !view
                .virtual_services
                .keys()
                .any(|k| k.addr == "192.168.1.1".parse::<IpAddr>().unwrap()),
            "someone else's virtual service is not ours"
        );
    }

    #[test]
    fn a_missing_hairpin_element_or_real_shows_in_the_plan() {
        let plans = plans();
        let (mut vss, mut sets, addresses) = kernel_of(&plans);
        sets.elements
            .retain(|e| e.element.element != "10.244.2.5,tcp:8080,10.244.2.5");
        vss.iter_mut()
            .find(|v| v.key.addr == "10.96.0.20".parse::<IpAddr>().unwrap() && v.key.port == 80)
            .unwrap()
            .reals
            .retain(|r| r.addr != "10.244.1.5:8080".parse().unwrap());
        let view = attribute(vss, sets, addresses);
        let sink = &view.services["shop/sink"];
        let want = &plans["shop/sink"];
        let missing: Vec<String> = want
            .objects()
            .into_iter()
            .filter(|o| !sink.objects().contains(o))
            .collect();
        assert_eq!(
            missing,
            [
                // No real server uses it any more: an orphan until the real is back.
                "ipset SWY-LOOP-BACK 10.244.1.5,tcp:8080,10.244.1.5",
                "ipset SWY-LOOP-BACK 10.244.2.5,tcp:8080,10.244.2.5",
                "ipvs TCP 10.96.0.20:80 -> 10.244.1.5:8080 masq 1",
            ]
        );
    }
}
