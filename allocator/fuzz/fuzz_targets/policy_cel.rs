//! Fuzzes the CEL conditions of policies: any text as a rule's `when` must compile or be
//! reported with the rule's location, never panic.
#![no_main]

use foresight_allocator::Policy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(condition) = std::str::from_utf8(data) else {
        return;
    };
    // The condition as a YAML string (JSON is YAML), so only the CEL is arbitrary.
    let Ok(quoted) = serde_json::to_string(condition) else {
        return;
    };
    let text = format!(
        "name: fuzz\nrules:\n  - name: r\n    when: {quoted}\n    actions:\n      - kind: migrate\n"
    );
    match Policy::from_yaml(&text) {
        Ok(policy) => assert!(policy.validate().is_empty()),
        Err(errors) => assert!(errors.iter().all(|e| !e.message.is_empty())),
    }
});
