"""The inference job: submission, quoting, routing, execution and settlement."""
