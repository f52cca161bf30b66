//! Compiles the eBPF programs in `bpf/` with clang (`-target bpf`) into
//! `$OUT_DIR/switchyard.bpf.o`, which the crate embeds. Only the C sources are committed.
//!
//! Needs clang and the headers of libbpf (`bpf/bpf_helpers.h`) and of the kernel's UAPI
//! (`linux/bpf.h`): Debian packages `clang`, `libbpf-dev`, `linux-libc-dev`. `SWY_CLANG`
//! names another clang.

use std::{env, path::PathBuf, process::Command};

const SOURCES: &[&str] = &[
    "bpf/switchyard.c",
    "bpf/swy.h",
    "bpf/maps.h",
    "bpf/lb.h",
    "bpf/sock.h",
    "bpf/nat.h",
];

fn main() {
    for source in SOURCES {
        println!("cargo:rerun-if-changed={source}");
    }
    println!("cargo:rerun-if-env-changed=SWY_CLANG");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out.join("switchyard.bpf.o");
    let clang = env::var("SWY_CLANG").unwrap_or_else(|_| "clang".into());
    // The multiarch include directory holds asm/types.h, which linux/types.h includes;
    // clang does not search it for the bpf target.
    let multiarch = match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => "x86_64-linux-gnu",
        Ok("aarch64") => "aarch64-linux-gnu",
        Ok("arm") => "arm-linux-gnueabihf",
        Ok("riscv64") => "riscv64-linux-gnu",
        Ok("powerpc64") => "powerpc64le-linux-gnu",
        Ok("s390x") => "s390x-linux-gnu",
        Ok(other) => panic!("no multiarch include directory known for target arch {other}"),
        Err(_) => panic!("cargo sets CARGO_CFG_TARGET_ARCH"),
    };
    let output = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg(format!("-I/usr/include/{multiarch}"))
        .args(["-c", "bpf/switchyard.c", "-o"])
        .arg(&object)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `{clang}` ({e}): the eBPF programs are built with clang; \
                 install the Debian packages clang, libbpf-dev and linux-libc-dev \
                 (scripts/test.sh does)"
            )
        });
    if !output.status.success() {
        panic!(
            "`{clang} -target bpf` failed on bpf/switchyard.c ({}); it needs the Debian \
             packages clang, libbpf-dev and linux-libc-dev:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
