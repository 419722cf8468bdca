//! TOML text -> config or error, through `Config::from_toml` (parse and
//! every validator). Never a panic. Files a config names (passwords, TLS
//! material) are read by later steps, not here.

use quotad::config::Config;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(text) = std::str::from_utf8(data) {
            let _ = Config::from_toml(text);
        }
    });
}
