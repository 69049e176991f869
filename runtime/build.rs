//! Rebuilds the binary when a migration is added: `sqlx::migrate!` embeds `migrations/` at compile
//! time, and Cargo does not otherwise know the directory is an input.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
