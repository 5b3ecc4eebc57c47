"""The market: the catalog of providers and offerings, the selection rules, the
provider adapters and their health."""
