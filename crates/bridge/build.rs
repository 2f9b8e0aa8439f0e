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
    // out), the branches' refs (a commit; a directory is watched as all it
    // holds, so a ref written as a new loose file counts) and the packed
    // refs. Only paths that exist are named: Cargo runs a script that names
    // a missing one on every build.
    let watched = ["HEAD", "refs/heads", "packed-refs"].map(|path| git(&["rev-parse", "--git-path", path]));
    for path in watched.into_iter().flatten().filter(|path| std::path::Path::new(path).exists()) {
        println!("cargo:rerun-if-changed={path}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
