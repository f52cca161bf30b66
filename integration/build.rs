//! Builds the user-mode Linux XSAVE shim (`src/uml/xstate_preload.c`) into a shared
//! object that `uml.rs` preloads into `linux.uml`; see the C file for why.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let source = "src/uml/xstate_preload.c";
    println!("cargo:rerun-if-changed={source}");
    let out =
        PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("libswy_uml_xstate.so");
    let compiler = cc::Build::new().get_compiler();
    let status = Command::new(compiler.path())
        .args(["-O2", "-Wall", "-Werror", "-shared", "-fPIC", "-o"])
        .arg(&out)
        .arg(source)
        .arg("-ldl")
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "run {} to build {source}: {e} (install the Debian package `gcc`)",
                compiler.path().display()
            )
        });
    assert!(status.success(), "building {source} failed ({status})");
    println!(
        "cargo:rustc-env=SWITCHYARD_UML_XSTATE_SHIM={}",
        out.display()
    );
}
