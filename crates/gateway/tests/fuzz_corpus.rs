//! Replays every saved fuzz input (`fuzz/corpus/<target>/`, grown by `fuzz/run`) through
//! its target in `imgate_gateway::fuzz`, so what the fuzzer once found keeps working on
//! every `cargo test`. It needs no fuzzer: the targets are ordinary functions.

use std::path::Path;

#[test]
fn every_saved_fuzz_input_replays_cleanly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    for (name, target) in imgate_gateway::fuzz::TARGETS {
        let dir = root.join(name);
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("the corpus of {name} ({}): {e}", dir.display()));
        let mut inputs = 0;
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let replayed = std::panic::catch_unwind(|| target(&data));
            assert!(replayed.is_ok(), "{name} panics on {}", path.display());
            inputs += 1;
        }
        assert!(inputs > 0, "the corpus of {name} is empty");
    }
}
