//! Authentication and authorization: principals, signed API keys, short-lived tokens,
//! access policy and revocation.
//!
//! Owns every decision about who a caller is and what they may do. It never sees HTTP
//! types: the HTTP layer hands it header values and gets back a principal or an error.

mod action;
mod secret;

pub use action::{Action, Actions, UnknownAction};
pub use secret::Secret;
