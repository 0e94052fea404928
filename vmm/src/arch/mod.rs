//! Architecture-specific boot support. Only x86_64 is implemented; every `cfg(target_arch)`
//! stays inside this module.

#[cfg(target_arch = "x86_64")]
pub mod x86_64;

#[cfg(target_arch = "x86_64")]
pub use self::x86_64::*;
