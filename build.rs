//! Embeds the git revision for `/health/detailed` and `hokusai_build_info`. A build without
//! `.git` (the container build) passes it in `HOKUSAI_GIT_REVISION`.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=HOKUSAI_GIT_REVISION");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    let rev = std::env::var("HOKUSAI_GIT_REVISION")
        .ok()
        .filter(|r| !r.trim().is_empty())
        .or_else(|| {
            let out = Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=HOKUSAI_GIT_REVISION={rev}");
}
