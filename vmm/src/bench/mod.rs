//! `vmm bench ...`: benchmarks that report side-by-side numbers.

pub mod boot;
pub mod clone;
pub mod dirty;
pub mod faults;
pub mod numa;
pub mod restore;
pub mod snapshot;

use crate::report::{EXIT_ERROR, EXIT_OK};
use std::path::Path;

/// Writes a benchmark's result as pretty JSON to `path` (when given);
/// returns the exit code, with the error printed under the bench's name.
pub fn write_json<T: serde::Serialize>(bench: &str, path: Option<&Path>, result: &T) -> i32 {
    let Some(path) = path else {
        return EXIT_OK;
    };
    let written = serde_json::to_string_pretty(result)
        .map_err(|e| format!("cannot encode JSON: {e}"))
        .and_then(|text| {
            std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
        });
    match written {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("vmm bench {bench}: {e}");
            EXIT_ERROR
        }
    }
}

/// Minimum and median of a sample (µs); `None` when empty.
pub fn min_median(samples: &[f64]) -> Option<(f64, f64)> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let median = if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    };
    Some((v[0], median))
}

/// The JSON report a `vmm ... --json` child printed; its error (as JSON
/// text) unless its status is ok.
pub fn ok_report(stdout: &[u8]) -> Result<serde_json::Value, String> {
    let j: serde_json::Value = serde_json::from_slice(stdout).unwrap_or_default();
    if j["status"] == "ok" {
        Ok(j)
    } else {
        Err(j["error"].to_string())
    }
}

/// Median of a sample (µs); 0 when empty.
pub fn median(samples: &[f64]) -> f64 {
    min_median(samples).map_or(0.0, |m| m.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_and_median() {
        assert_eq!(min_median(&[]), None);
        assert_eq!(min_median(&[3.0, 1.0, 2.0]), Some((1.0, 2.0)));
        assert_eq!(min_median(&[4.0, 1.0, 2.0, 3.0]), Some((1.0, 2.5)));
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
