//! `sqlx::migrate!` embeds `migrations/` when the crate compiles; a new or
//! changed migration file must rebuild it, though no Rust file changed.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
