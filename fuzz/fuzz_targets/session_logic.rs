//! Fuzzes the relay's I/O-free session core: the input is a script
//! (`session::script`) that splits a composed migration stream into arbitrary reads, cuts
//! the source link anywhere, faults pages from the destination, sends hostile requests and
//! bytes, lets time pass, and resumes. It panics on any broken invariant: a page placed
//! twice or lost, a well-formed stream refused, an impossible request passed on, a panic
//! instead of a typed refusal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postcopy_sidecar::session::script;

fuzz_target!(|data: &[u8]| {
    script::run(data);
});
