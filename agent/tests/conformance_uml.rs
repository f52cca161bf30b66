//! The conformance matrix on one kernel for the three dataplanes: user-mode Linux when
//! the host has no IPVS (its kernel has IPVS, iptables-legacy and interpreted eBPF).
//! Every scenario of `switchyard_integration::conformance` runs through each dataplane
//! with real packets; all must agree with each other and with the controller's state.

mod common;

use std::time::Duration;

use common::{PinDir, agent};
use switchyard_integration::{
    conformance::{self, Matrix},
    uml::{Guest, in_ipvs_kernel_with},
};

#[test]
fn iptables_ipvs_and_ebpf_agree_with_each_other_and_the_controller_on_every_scenario() {
    let guest = Guest::new().mem_mib(2048).timeout(Duration::from_secs(600));
    in_ipvs_kernel_with(guest, || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let scenarios = conformance::scenarios();
                let mut matrix = Matrix::default();
                for dataplane in ["iptables", "ipvs", "ebpf"] {
                    let pins = PinDir::new();
                    let (results, expected) =
                        conformance::run(agent(dataplane, &pins), &scenarios).await;
                    matrix.add(dataplane, results, expected);
                }
                matrix.assert_agreement();
            });
    });
}
