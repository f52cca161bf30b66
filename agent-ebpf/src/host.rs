//! What the agent learns from the host it runs on: where the cgroup v2 hierarchy is
//! mounted (the default `--cgroup-path`), the node's addresses (node ports answer on
//! them) and its devices (the default `--devices`). The parsers are pure.

use std::{
    collections::BTreeSet,
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

    #[test]
    fn device_names_become_file_names_that_stay_in_the_pin_directory() {
        assert_eq!(escape_device("eth0"), "eth0");
        assert_eq!(escape_device("to-b1.100"), "to-b1%2E100");
        assert_eq!(escape_device("../x"), "%2E%2E%2Fx");
        assert_eq!(escape_device("a b"), "a%20b");
    }
}
