"""The kernel every layer may use: settings, errors, state paths, the release policy, locks, the registry."""
