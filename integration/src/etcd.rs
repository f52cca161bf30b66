//! A real etcd (Debian's `etcd-server`) on loopback for tests: free ports, a temporary
//! data directory, killed when dropped; stopped and started again on the same ports and
//! data for outage tests.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// A running etcd member of a one-member cluster.
pub struct Etcd {
    client: SocketAddr,
    peer: SocketAddr,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

impl Etcd {
    /// Starts etcd and waits until it accepts connections.
    pub fn start() -> anyhow::Result<Self> {
        let mut etcd = Self {
            client: free_port()?,
            peer: free_port()?,
            dir: tempfile::tempdir()?,
            child: None,
        };
        etcd.resume()?;
        Ok(etcd)
    }

    /// The client URL, for `--etcd-endpoints`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.client)
    }

    /// Kills etcd (SIGKILL): every client loses it at once.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        let peer = format!("http://{}", self.peer);
        let child = Command::new("etcd")
            .arg("--name=switchyard-test")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={}", self.endpoint()))
            .arg(format!("--advertise-client-urls={}", self.endpoint()))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=switchyard-test={peer}"))
            .arg("--log-level=error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting etcd (Debian package etcd-server)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(self.client).is_err() {
            if Instant::now() > deadline {
                bail!("etcd did not listen on {} within 20 s", self.client);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}
