//! The crate's test suite. It lives inside the crate (rather than in
//! `tests/`) so it can use the strategies the `methods!` table generates for
//! every method; `strategies` holds the generators everything else shares.
//!
//! - `golden`: frames checked byte for byte against the spec;
//! - `roundtrip`: encode then decode gives back the value, for every method,
//!   tables, properties, and frames fed in arbitrary chunks;
//! - `differential`: our bytes parse with the independent `amq-protocol`
//!   codec and its bytes parse with ours;
//! - `errors`: every failure mode maps to the right reply code, and no
//!   input panics;
//! - `zero_copy`: decoded strings and bodies borrow the read buffer.
//!
//! The allocation-counting check of the publish path is the integration test
//! `tests/publish_allocations.rs`, which needs its own global allocator.

mod differential;
mod errors;
mod golden;
mod roundtrip;
pub(crate) mod strategies;
mod zero_copy;
