//! Clears stale UDP conntrack entries after a Service changes, as kube-proxy's
//! conntrack cleanup does: [`flush_commands`] plans the `conntrack -D` commands (pure),
//! [`flush`] runs them, best effort. Every dataplane whose UDP flows live in netfilter's
//! conntrack (iptables, IPVS with `net/ipv4/vs/conntrack`) calls it.
//!
//! UDP has no connection teardown, so a flow NATed to a removed endpoint would keep
//! blackholing the client; and a flow created while the Service had no endpoints
//! (rejected) would keep being rejected after endpoints appear.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
};

use switchyard_proto::state::{PortState, Protocol, ServiceState};

use crate::{dataplane::DataplaneError, netfilter::Runner};

/// Runs the [`flush_commands`] for `service` going from `old` to `new`; failures are
/// logged, never returned (a stale flow is not worth failing an apply for).
pub fn flush(
    runner: &Runner,
    service: &str,
    old: Option<&ServiceState>,
    new: Option<&ServiceState>,
) {
    for args in flush_commands(old, new) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        match runner.run("conntrack", &args, None) {
            Ok(_) => tracing::debug!(service, ?args, "conntrack entries deleted"),
            // conntrack exits 1 when no entry matched: not worth a warning.
            Err(DataplaneError::Command { message, .. }) if message.contains("0 flow entries") => {
                tracing::trace!(service, ?args, "no conntrack entries");
            }
            Err(err) => tracing::warn!(service, %err, "conntrack cleanup failed"),
        }
    }
}

fn endpoints(port: &PortState) -> BTreeSet<SocketAddr> {
    port.cluster_endpoints
        .iter()
        .chain(&port.local_endpoints)
        .map(|e| SocketAddr::new(e.ip, e.port))
        .collect()
}

fn vips(state: &ServiceState) -> impl Iterator<Item = IpAddr> + '_ {
    state
        .cluster_ips
        .iter()
        .chain(&state.external_ips)
        .chain(&state.load_balancer_ips)
        .copied()
}

fn family_args(ip: IpAddr) -> Vec<String> {
    if ip.is_ipv6() {
        vec!["-f".into(), "ipv6".into()]
    } else {
        Vec::new()
    }
}

/// The `conntrack` argument lists to run after a Service went from `old` to `new`
/// (`None`: absent). Only UDP ports are considered; a port is matched by name.
pub fn flush_commands(old: Option<&ServiceState>, new: Option<&ServiceState>) -> Vec<Vec<String>> {
    let mut commands = BTreeSet::new();
    let Some(old) = old else {
        return Vec::new();
    };
    for old_port in old.ports.iter().filter(|p| p.protocol == Protocol::Udp) {
        let new_port = new.and_then(|n| {
            n.ports
                .iter()
                .find(|p| p.name == old_port.name && p.protocol == Protocol::Udp)
        });
        let kept = new_port.map(endpoints).unwrap_or_default();
        // Flows NATed to an endpoint that is gone.
        for gone in endpoints(old_port).difference(&kept) {
            let ep = gone.ip().to_string();
            for vip in vips(old).filter(|v| v.is_ipv4() == gone.is_ipv4()) {
                let mut args = family_args(vip);
                args.extend(
                    [
                        "-D",
                        "-p",
                        "udp",
                        "--orig-dst",
                        &vip.to_string(),
                        "--dst-nat",
                        &ep,
                    ]
                    .map(String::from),
                );
                commands.insert(args);
            }
            if let Some(node_port) = old_port.node_port {
                let mut args = family_args(gone.ip());
                args.extend(
                    [
                        "-D",
                        "-p",
                        "udp",
                        "--orig-port-dst",
                        &node_port.to_string(),
                        "--dst-nat",
                        &ep,
                    ]
                    .map(String::from),
                );
                commands.insert(args);
            }
        }
        // Flows rejected while there was no endpoint of a family.
        let (Some(new), Some(new_port)) = (new, new_port) else {
            continue;
        };
        for vip in vips(new) {
            let had = old_port.has_usable_endpoints_for(vip);
            let has = new_port.has_usable_endpoints_for(vip);
            if !had && has {
                let mut args = family_args(vip);
                args.extend(
                    [
                        "-D",
                        "-p",
                        "udp",
                        "--orig-dst",
                        &vip.to_string(),
                        "--orig-port-dst",
                        &new_port.port.to_string(),
                    ]
                    .map(String::from),
                );
                commands.insert(args);
            }
        }
    }
    commands.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{self as states, ep as endpoint};
    use switchyard_proto::state::EndpointState;

    fn ep(ip: &str, port: u16) -> EndpointState {
        endpoint(ip, port, false)
    }

    fn dns(endpoints: Vec<EndpointState>, protocol: Protocol) -> ServiceState {
        states::service(
            "kube-system/dns",
            &["10.96.0.10"],
            vec![states::port("dns", protocol, 53, endpoints)],
        )
    }

    fn joined(commands: Vec<Vec<String>>) -> Vec<String> {
        commands.into_iter().map(|c| c.join(" ")).collect()
    }

    #[test]
    fn a_removed_udp_endpoint_has_its_nated_flows_deleted() {
        let old = dns(
            vec![ep("10.244.0.5", 53), ep("10.244.0.6", 53)],
            Protocol::Udp,
        );
        let new = dns(vec![ep("10.244.0.6", 53)], Protocol::Udp);
        assert_eq!(
            joined(flush_commands(Some(&old), Some(&new))),
            ["-D -p udp --orig-dst 10.96.0.10 --dst-nat 10.244.0.5"]
        );
        assert_eq!(
            flush_commands(Some(&new), Some(&new)),
            Vec::<Vec<String>>::new()
        );
    }

    #[test]
    fn endpoints_appearing_clear_flows_rejected_before() {
        let old = dns(vec![], Protocol::Udp);
        let new = dns(vec![ep("10.244.0.6", 53)], Protocol::Udp);
        assert_eq!(
            joined(flush_commands(Some(&old), Some(&new))),
            ["-D -p udp --orig-dst 10.96.0.10 --orig-port-dst 53"]
        );
    }

    #[test]
    fn tcp_ports_and_new_services_need_no_flush() {
        let old = dns(vec![ep("10.244.0.5", 53)], Protocol::Tcp);
        assert!(flush_commands(Some(&old), None).is_empty());
        assert!(flush_commands(None, Some(&old)).is_empty());
    }

    #[test]
    fn a_removed_service_flushes_every_endpoint() {
        let old = dns(vec![ep("10.244.0.5", 53)], Protocol::Udp);
        assert_eq!(
            joined(flush_commands(Some(&old), None)),
            ["-D -p udp --orig-dst 10.96.0.10 --dst-nat 10.244.0.5"]
        );
    }
}
