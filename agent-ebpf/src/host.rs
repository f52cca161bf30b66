//! What the agent learns from the host it runs on: where the cgroup v2 hierarchy is
//! mounted (the default `--cgroup-path`), the node's addresses (node ports answer on
//! them, source NAT takes them) and its devices (the default `--devices`). The parsers
//! and the tables made from the addresses are pure.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::IpAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use ipnet::IpNet;

/// The first cgroup2 mount point in `/proc/self/mountinfo` text.
pub fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "36 25 0:31 / /sys/fs/cgroup rw,… shared:9 - cgroup2 cgroup2 rw"
        let (mount, fs) = line.split_once(" - ")?;
        if fs.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        mount.split_whitespace().nth(4).map(unescape_mount_path)
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(octal) = field.get(i + 1..i + 4)
            && let Ok(value) = u8::from_str_radix(octal, 8)
        {
            out.push(value);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
}

/// Where the cgroup v2 hierarchy is mounted on this host.
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    cgroup2_mount_in(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup2 file system in /proc/self/mountinfo (mount one, e.g. `mount -t cgroup2 none /sys/fs/cgroup`)",
        )
    })
}

/// The id of a cgroup v2 directory (its inode number).
pub fn cgroup_id(path: &Path) -> io::Result<u64> {
    Ok(std::fs::metadata(path)?.ino())
}

/// One address of one device.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct InterfaceAddr {
    pub device: String,
    pub addr: IpAddr,
    pub loopback: bool,
    pub up: bool,
}

/// Every address of every device in this network namespace.
pub fn interface_addrs() -> io::Result<Vec<InterfaceAddr>> {
    use nix::{ifaddrs::getifaddrs, net::if_::InterfaceFlags};
    let mut out = Vec::new();
    for ifa in getifaddrs().map_err(io::Error::from)? {
        let Some(address) = ifa.address else {
            continue;
        };
        let addr = if let Some(v4) = address.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = address.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        out.push(InterfaceAddr {
            device: ifa.interface_name,
            addr,
            loopback: ifa.flags.contains(InterfaceFlags::IFF_LOOPBACK),
            up: ifa.flags.contains(InterfaceFlags::IFF_UP),
        });
    }
    out.sort();
    Ok(out)
}

/// One address of one device, with the device's index and the address's prefix length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceAddr {
    pub device: String,
    pub ifindex: u32,
    pub addr: IpAddr,
    pub prefix_len: u8,
}

/// Every address of every device in this network namespace, in the kernel's order: a
/// device's primary IPv4 addresses before its secondary ones.
pub fn device_addrs() -> io::Result<Vec<DeviceAddr>> {
    use nix::ifaddrs::getifaddrs;
    let mut out = Vec::new();
    for ifa in getifaddrs().map_err(io::Error::from)? {
        let (Some(address), Some(netmask)) = (ifa.address, ifa.netmask) else {
            continue;
        };
        let (addr, prefix_len) = if let (Some(a), Some(m)) =
            (address.as_sockaddr_in(), netmask.as_sockaddr_in())
        {
            (IpAddr::V4(a.ip()), m.ip().to_bits().count_ones() as u8)
        } else if let (Some(a), Some(m)) = (address.as_sockaddr_in6(), netmask.as_sockaddr_in6()) {
            (IpAddr::V6(a.ip()), m.ip().to_bits().count_ones() as u8)
        } else {
            continue;
        };
        let ifindex =
            nix::net::if_::if_nametoindex(ifa.interface_name.as_str()).map_err(io::Error::from)?;
        out.push(DeviceAddr {
            device: ifa.interface_name,
            ifindex,
            addr,
            prefix_len,
        });
    }
    Ok(out)
}

/// A key of the source-address table: the prefix length over (ifindex, address), as
/// `struct swy_src_key` counts it (32 bits of ifindex, then the 128 of the address,
/// IPv4-mapped for IPv4), with the address bits past the prefix cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SrcKey {
    pub ifindex: u32,
    pub prefix_len: u32,
    pub addr: IpAddr,
}

/// The ifindex of [`src_addrs`]' node-wide entries: no device has it.
pub const SRC_ANY_DEVICE: u32 = 0;

/// The source addresses of source-NATed flows by the device a route leaves through and
/// its next hop (`swy_src_addrs`, for kernels whose `bpf_fib_lookup` cannot name a
/// source), chosen as the kernel chooses for a route without a preferred source
/// (`inet_select_addr`): the device's primary address whose subnet holds the next hop,
/// else the device's first address of the family, else (a device without one, as
/// unnumbered pod veths are) the node's first address of the family on any device in
/// ifindex order, under [`SRC_ANY_DEVICE`]. Loopback (`127.0.0.0/8`, `::1`) and
/// link-local addresses take no part, as their scope keeps the kernel from choosing
/// them; for IPv6 the first global address stands where IPv4 has the primary one (the
/// kernel's RFC 6724 choice agrees on devices with one global address).
pub fn src_addrs(addrs: &[DeviceAddr]) -> BTreeMap<SrcKey, IpAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr};
    let mut usable: Vec<&DeviceAddr> = addrs
        .iter()
        .filter(|a| match a.addr {
            IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local(),
            IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unicast_link_local(),
        })
        .collect();
    // Device by device in ifindex order, each device's addresses in the kernel's order.
    usable.sort_by_key(|a| a.ifindex);
    let mut out = BTreeMap::new();
    for a in usable {
        let (network, family_bits, any) = match a.addr {
            IpAddr::V4(v4) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(a.prefix_len))
                    .unwrap_or(0);
                (
                    IpAddr::V4(Ipv4Addr::from_bits(v4.to_bits() & mask)),
                    96,
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                )
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(a.prefix_len))
                    .unwrap_or(0);
                (
                    IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & mask)),
                    0,
                    IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                )
            }
        };
        // The first address of a subnet is its primary one (secondaries follow it).
        for (ifindex, prefix_len, addr) in [
            (
                a.ifindex,
                32 + family_bits + u32::from(a.prefix_len),
                network,
            ),
            (a.ifindex, 32 + family_bits, any),
            (SRC_ANY_DEVICE, 32 + family_bits, any),
        ] {
            let key = SrcKey {
                ifindex,
                prefix_len,
                addr,
            };
            out.entry(key).or_insert(a.addr);
        }
    }
    out
}

/// The addresses node ports answer on: every local address inside
/// `nodeport_addresses` (all when empty), except IPv6 loopback and link-local ones, as
/// kube-proxy does.
pub fn nodeport_addrs(addrs: &[InterfaceAddr], nodeport_addresses: &[IpNet]) -> BTreeSet<IpAddr> {
    addrs
        .iter()
        .map(|a| a.addr)
        .filter(|ip| match ip {
            IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unicast_link_local(),
            IpAddr::V4(_) => true,
        })
        .filter(|ip| {
            nodeport_addresses.is_empty() || nodeport_addresses.iter().any(|c| c.contains(ip))
        })
        .collect()
}

/// The node's own addresses (no loopback, no link-local): the source of its traffic.
pub fn node_ips(addrs: &[InterfaceAddr]) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = addrs
        .iter()
        .filter(|a| !a.loopback)
        .map(|a| a.addr)
        .filter(|ip| match ip {
            IpAddr::V6(v6) => !v6.is_unicast_link_local(),
            IpAddr::V4(v4) => !v4.is_link_local(),
        })
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// The default `--devices`: every device that is up, not loopback, and holds an
/// address that is not link-local.
pub fn default_devices(addrs: &[InterfaceAddr]) -> Vec<String> {
    let mut devices: Vec<String> = addrs
        .iter()
        .filter(|a| a.up && !a.loopback)
        .filter(|a| match a.addr {
            IpAddr::V6(v6) => !v6.is_unicast_link_local(),
            IpAddr::V4(v4) => !v4.is_link_local(),
        })
        .map(|a| a.device.clone())
        .collect();
    devices.sort();
    devices.dedup();
    devices
}

/// A device name as a file name in the pin directory: letters, digits, `_` and `-` kept,
/// every other byte as `%XX` (bpffs refuses dots; a slash would leave the directory).
pub fn escape_device(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"_-".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The device name [`escape_device`] made `escaped` from; `None` for a name it cannot
/// have made.
pub fn unescape_device(escaped: &str) -> Option<String> {
    let bytes = escaped.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = escaped.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_among_v1_mounts_and_unescaped() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                      32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "36 25 0:31 / /sys/fs/my\\040cgroups rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            cgroup2_mount_in(unified),
            Some(PathBuf::from("/sys/fs/my cgroups"))
        );
        assert_eq!(
            cgroup2_mount_in("1 2 0:3 / /proc rw - proc proc rw\n"),
            None
        );
    }

    fn addr(device: &str, ip: &str, loopback: bool) -> InterfaceAddr {
        InterfaceAddr {
            device: device.into(),
            addr: ip.parse().unwrap(),
            loopback,
            up: true,
        }
    }

    #[test]
    fn node_ports_answer_on_local_addresses_inside_nodeport_addresses() {
        let addrs = [
            addr("lo", "127.0.0.1", true),
            addr("lo", "::1", true),
            addr("eth0", "10.201.0.1", false),
            addr("eth0", "fe80::1", false),
            addr("eth1", "192.168.1.5", false),
        ];
        let all = nodeport_addrs(&addrs, &[]);
        let text: Vec<String> = all.iter().map(ToString::to_string).collect();
        assert_eq!(text, ["10.201.0.1", "127.0.0.1", "192.168.1.5"]);
        let only: Vec<String> = nodeport_addrs(&addrs, &["10.0.0.0/8".parse().unwrap()])
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(only, ["10.201.0.1"]);
        assert_eq!(default_devices(&addrs), ["eth0", "eth1"]);
        let ips: Vec<String> = node_ips(&addrs).iter().map(ToString::to_string).collect();
        assert_eq!(ips, ["10.201.0.1", "192.168.1.5"]);
    }

    fn dev(device: &str, ifindex: u32, cidr: &str) -> DeviceAddr {
        let net: IpNet = cidr.parse().unwrap();
        DeviceAddr {
            device: device.into(),
            ifindex,
            addr: net.addr(),
            prefix_len: net.prefix_len(),
        }
    }

    #[test]
    fn source_nat_takes_the_primary_address_of_the_next_hop_s_subnet_else_the_first_one() {
        let addrs = [
            // Kernel order is not ifindex order: eth1 (3) before eth0 (2).
            dev("eth1", 3, "172.16.0.1/32"),
            dev("lo", 1, "127.0.0.1/8"),
            dev("lo", 1, "::1/128"),
            dev("eth0", 2, "10.0.0.5/24"),
            dev("eth0", 2, "192.168.7.9/16"),
            // A secondary address of eth0's first subnet: never chosen.
            dev("eth0", 2, "10.0.0.6/24"),
            dev("eth0", 2, "fe80::1/64"),
            dev("eth0", 2, "fd00::5/64"),
        ];
        let table: Vec<String> = src_addrs(&addrs)
            .into_iter()
            .map(|(k, v)| format!("{}/{} {} -> {v}", k.ifindex, k.prefix_len, k.addr))
            .collect();
        assert_eq!(
            table,
            [
                // Devices without an address of the family: the node's first one.
                "0/32 :: -> fd00::5",
                "0/128 0.0.0.0 -> 10.0.0.5",
                "2/32 :: -> fd00::5",
                "2/96 fd00:: -> fd00::5",
                "2/128 0.0.0.0 -> 10.0.0.5",
                "2/144 192.168.0.0 -> 192.168.7.9",
                "2/152 10.0.0.0 -> 10.0.0.5",
                "3/128 0.0.0.0 -> 172.16.0.1",
                "3/160 172.16.0.1 -> 172.16.0.1",
            ]
        );
        // An address on lo other than loopback ones counts, lo coming first.
        let mut with_lo = addrs.to_vec();
        with_lo.push(dev("lo", 1, "10.9.9.9/32"));
        assert_eq!(
            src_addrs(&with_lo)[&SrcKey {
                ifindex: SRC_ANY_DEVICE,
                prefix_len: 128,
                addr: "0.0.0.0".parse().unwrap()
            }],
            "10.9.9.9".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn device_names_become_file_names_that_stay_in_the_pin_directory() {
        assert_eq!(escape_device("eth0"), "eth0");
        assert_eq!(escape_device("to-b1.100"), "to-b1%2E100");
        assert_eq!(escape_device("../x"), "%2E%2E%2Fx");
        assert_eq!(escape_device("a b"), "a%20b");
        for name in ["eth0", "to-b1.100", "../x", "a b", "veth%1"] {
            assert_eq!(unescape_device(&escape_device(name)).as_deref(), Some(name));
        }
        assert_eq!(unescape_device("bad%2"), None);
    }
}
