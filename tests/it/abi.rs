//! `abi/` must be what the pinned compiler makes of `contracts/` today.

use std::process::Command;

#[test]
fn abi_artifacts_match_the_contract_sources() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("node")
        .arg(format!("{root}/contracts/build.mjs"))
        .arg("--check")
        .output()
        .expect("node must be installed to check abi/ (make tools)");
    assert!(
        out.status.success(),
        "abi/ is stale or the compiler is missing (run `make abi`): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
