//! The conformance matrix on this machine's kernel: every scenario of
//! `switchyard_integration::conformance` through the iptables and eBPF dataplanes (the
//! one agent binary, `--dataplane iptables` then `ebpf`), with real packets; each must
//! agree with the other and with the controller's state. IPVS joins them in user-mode
//! Linux (`conformance_uml.rs`).

mod common;

use common::{PinDir, agent};
use switchyard_integration::conformance::{self, Matrix};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_and_ebpf_agree_with_each_other_and_the_controller_on_every_scenario() {
    let scenarios = conformance::scenarios();
    let mut matrix = Matrix::default();
    for dataplane in ["iptables", "ebpf"] {
        let pins = PinDir::new();
        let (results, expected) = conformance::run(agent(dataplane, &pins), &scenarios).await;
        matrix.add(dataplane, results, expected);
    }
    matrix.assert_agreement();
}
