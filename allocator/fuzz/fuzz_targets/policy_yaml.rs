//! Fuzzes the policy parser: any text must parse to a valid policy or to located errors, never
//! panic; a policy that parses also validates.
#![no_main]

use foresight_allocator::Policy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Policy::from_yaml(text) {
        Ok(policy) => assert!(policy.validate().is_empty()),
        Err(errors) => assert!(!errors.is_empty()),
    }
});
