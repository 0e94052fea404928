//! `containerd-shim-husk-v2`: husk's containerd shim v2 (see `husk::shim`).

fn main() {
    std::process::exit(husk::shim::main_entry());
}
