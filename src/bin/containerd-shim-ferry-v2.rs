//! containerd-shim-ferry-v2: containerd's runtime `io.containerd.ferry.v2`.
//!
//! containerd runs it as `containerd-shim-ferry-v2 -namespace NS -id ID -address ADDR start`
//! (prints the ttrpc address it serves on and leaves a serving copy of itself behind) and
//! `… delete` (cleanup). See `ferry::shim`.

#[tokio::main]
async fn main() {
    containerd_shim::asynchronous::run::<ferry::shim::FerryShim>(ferry::shim::RUNTIME_TYPE, None)
        .await;
}
