"""Privacy audits independent of the filter: fingerprint (canary) audit, loss-based membership inference."""
