//! One module per `husk` command.

pub mod check;
