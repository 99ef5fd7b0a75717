// The migrations are embedded in the binary (diesel_migrations::embed_migrations!), so a
// change to any SQL file under migrations/ must rebuild it.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
