"""Models grouped by task: ``clip``, ``faces``, ``ocr``; ``registry`` resolves names, ``cache`` keeps them."""
