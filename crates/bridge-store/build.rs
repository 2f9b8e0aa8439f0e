// `sqlx::migrate!` embeds the migrations at compile time, but Cargo does not
// know it reads that directory: without this, a migration added or edited
// while no Rust file changed is left out of an incremental build.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
