//! Message parsing and validation on arbitrary bytes: every input must end in a message or a
//! rejection that names a field and a rule, without a panic or an unbounded allocation.
#![no_main]

use hokusai_deployer::message::{parse, Rules};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rules = Rules {
        max_message_bytes: 65_536,
        min_improvement_percentage: 0.0,
    };
    match parse(data, &rules) {
        Ok(m) => {
            assert!(!m.message_id.is_empty());
            assert!(!m.model.model_id.is_empty());
            assert!(m.model.improvement_percentage.is_finite());
        }
        Err(r) => {
            assert!(!r.code.is_empty() && !r.field.is_empty() && !r.rule.is_empty());
        }
    }
});
