"""Versioned SQL migrations of our schema (applied by db.migrate)."""
