//! Checks a command's `--json` output against its JSON Schema in `schemas/`
//! (docs/json.md says which file describes which document).

use std::path::PathBuf;

use serde_json::Value;

fn schema_path(name: &str) -> PathBuf {
    super::repo()
        .join("schemas")
        .join(format!("{name}.schema.json"))
}

/// The schema `schemas/<name>.schema.json`, compiled; panics naming the file when
/// it is missing or not a valid schema, so a typo in a schema fails every test
/// that uses it.
pub fn validator(name: &str) -> jsonschema::Validator {
    let path = schema_path(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("schema {} unreadable: {e}", path.display()));
    let schema: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("schema {} is not JSON: {e}", path.display()));
    jsonschema::validator_for(&schema)
        .unwrap_or_else(|e| panic!("schema {} is not a valid JSON Schema: {e}", path.display()))
}

/// Panics with every violation when `doc` does not follow `schemas/<name>.schema.json`.
pub fn assert_valid(doc: &Value, name: &str) {
    let validator = validator(name);
    let problems: Vec<String> = validator
        .iter_errors(doc)
        .map(|e| format!("  at {}: {e}", e.instance_path()))
        .collect();
    assert!(
        problems.is_empty(),
        "document does not follow schemas/{name}.schema.json:\n{}\ndocument:\n{}",
        problems.join("\n"),
        serde_json::to_string_pretty(doc).unwrap_or_default()
    );
}

/// Parses `stdout` as one JSON document and checks it against `name`; the document.
pub fn valid_document(stdout: &[u8], name: &str) -> Value {
    let doc: Value = serde_json::from_slice(stdout).unwrap_or_else(|e| {
        panic!(
            "not one JSON document ({e}):\n{}",
            String::from_utf8_lossy(stdout)
        )
    });
    assert_valid(&doc, name);
    doc
}
