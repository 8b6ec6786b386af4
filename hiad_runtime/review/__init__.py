"""Review: the store of inspections and labels kept by `hiad-runtime serve --review-dir`, its page, and drift."""
