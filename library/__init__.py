"""Library mode: index any image collection (near-duplicates with PDQ, search by image/text, a known-image
blocklist, an imgsmlr-server compatible API) on the project's own engine (``ai_service`` for inference,
``db`` for Chinese text segmentation, PostgreSQL + pgvector for storage)."""
