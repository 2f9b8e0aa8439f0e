// `bridge --version` names the commit the binary was built from, so an
// operator can tell which build is deployed and a benchmark result names
// the code it measured (`bridge-bench` asks the binary it runs). A build
// outside a git checkout, such as a source archive, says "unknown".
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

fn main() {
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=BRIDGE_BUILD_COMMIT={commit}");
    // Run again when HEAD moves: the HEAD file (another branch checked
    // out), the branch's ref (a commit) and the packed refs. Any of them may
    // be missing; Cargo then runs this on every build, which is harmless.
    let branch = git(&["symbolic-ref", "-q", "HEAD"]);
    let mut watched = vec![git(&["rev-parse", "--git-path", "HEAD"]), git(&["rev-parse", "--git-path", "packed-refs"])];
    if let Some(branch) = branch {
        watched.push(git(&["rev-parse", "--git-path", &branch]));
    }
    for path in watched.into_iter().flatten() {
        println!("cargo:rerun-if-changed={path}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
