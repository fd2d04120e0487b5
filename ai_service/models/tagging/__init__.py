"""Image tagging models: the zero-shot CLIP tagger over the shipped bilingual vocabulary, and RAM++-layout
ONNX taggers a user installs (``<model_dir>/tagging/<name>/``). See :mod:`ai_service.models.tagging.family`."""
