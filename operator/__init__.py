"""The kopf operator: cluster-unique adapter IDs, served-name ownership, status aggregation."""
