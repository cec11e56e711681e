//! The public contract and the repository's record of what the API adds to it: every operation
//! in `openapi.json` is either one of the contract's routes (listed below, copied from the route
//! table of the shared design's CONTRACT.md) or named in `docs/contract-additions.md` as
//! `` `METHOD /path` ``; every operation that file names is served; and every contract route is
//! still in `openapi.json` (which the security sweep ties to the router), so a removed contract
//! route fails here.

use std::collections::BTreeSet;

use serde_json::Value;

/// The routes of CONTRACT.md (paths under `/api/v1`, or at the root for the last two), as
/// `openapi.json` spells them.
const CONTRACT_ROUTES: &[(&str, &str)] = &[
    ("POST", "/auth/login"),
    ("POST", "/auth/logout"),
    ("GET", "/agents"),
    ("GET", "/agents/{id}"),
    ("DELETE", "/agents/{id}"),
    ("POST", "/enrollment-tokens"),
    ("GET", "/servers"),
    ("POST", "/servers"),
    ("GET", "/servers/{id}"),
    ("PATCH", "/servers/{id}"),
    ("DELETE", "/servers/{id}"),
    ("POST", "/servers/{id}/install-agent"),
    ("GET", "/events"),
    ("POST", "/events"),
    ("GET", "/events/{id}"),
    ("PATCH", "/events/{id}"),
    ("DELETE", "/events/{id}"),
    ("POST", "/events/{id}/runs"),
    ("GET", "/runs/{id}"),
    ("GET", "/jobs/{id}"),
    ("GET", "/jobs/{id}/logs"),
    ("POST", "/jobs/{id}/cancel"),
    ("GET", "/workflows"),
    ("POST", "/workflows"),
    ("POST", "/workflows/{id}/runs"),
    ("GET", "/agents/{id}/terminal"),
    // Named in the contract's text rather than its table.
    ("GET", "/openapi.json"),
    ("GET", "/healthz"),
    ("GET", "/install.sh"),
];

const ADDITIONS: &str = include_str!("../../../../docs/contract-additions.md");

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

/// Every operation of `openapi.json` as (`METHOD`, path).
fn documented_operations() -> BTreeSet<(String, String)> {
    let document: Value = serde_json::from_str(crate::http::OPENAPI).unwrap();
    let mut operations = BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in METHODS {
            if item.get(method.to_lowercase()).is_some() {
                operations.insert((method.to_string(), path.clone()));
            }
        }
    }
    operations
}

/// Every `` `METHOD /path` `` code span of `text` (a query string is not part of the path).
fn named_operations(text: &str) -> BTreeSet<(String, String)> {
    text.split('`')
        .filter_map(|span| {
            let (method, path) = span.split_once(' ')?;
            let path = path.split('?').next().unwrap_or(path);
            (METHODS.contains(&method)
                && path.starts_with('/')
                && !path.contains(char::is_whitespace))
            .then(|| (method.to_string(), path.to_string()))
        })
        .collect()
}

#[test]
fn every_operation_beyond_the_contract_is_recorded_in_contract_additions() {
    let contract: BTreeSet<(String, String)> = CONTRACT_ROUTES
        .iter()
        .map(|(method, path)| (method.to_string(), path.to_string()))
        .collect();
    let documented = documented_operations();
    let named = named_operations(ADDITIONS);

    let missing: Vec<String> = documented
        .iter()
        .filter(|operation| !contract.contains(*operation) && !named.contains(*operation))
        .map(|(method, path)| format!("`{method} {path}`"))
        .collect();
    assert!(
        missing.is_empty(),
        "operations in openapi.json that are neither in CONTRACT.md nor in docs/contract-additions.md \
         (add a line for each to its \"Routes not in CONTRACT.md\" table): {}",
        missing.join(", ")
    );

    let unknown: Vec<String> = named
        .difference(&documented)
        .map(|(method, path)| format!("`{method} {path}`"))
        .collect();
    assert!(
        unknown.is_empty(),
        "docs/contract-additions.md names operations that openapi.json does not have: {}",
        unknown.join(", ")
    );

    let removed: Vec<String> = contract
        .difference(&documented)
        .map(|(method, path)| format!("{method} {path}"))
        .collect();
    assert!(
        removed.is_empty(),
        "contract routes missing from openapi.json (the contract may not lose a route): {}",
        removed.join(", ")
    );
}

#[test]
fn named_operations_are_found_in_code_spans_only() {
    let text =
        "a `GET /runs` and `POST /runs/{id}/retry?x=1` b `` `DELETE /x` `` GET /prose c `GET`";
    let found: Vec<(String, String)> = named_operations(text).into_iter().collect();
    let expected: Vec<(String, String)> = [
        ("DELETE", "/x"),
        ("GET", "/runs"),
        ("POST", "/runs/{id}/retry"),
    ]
    .iter()
    .map(|(method, path)| (method.to_string(), path.to_string()))
    .collect();
    assert_eq!(found, expected);
}
