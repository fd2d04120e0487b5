"""SQL applied by db.migrate outside the versioned migrations (segmenter switches)."""
